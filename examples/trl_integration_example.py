"""Complete TRL integration example: the guide's configuration and manager on today's TRL (GRPO or RLOO) —
set up a trainer with rlhf-tui monitoring, really train, then print metrics, anomalies, checkpoint health,
reward reliability and per-phase timings.

Offline by default, on a tiny GPT-2 built locally (no download):
    python examples/trl_integration_example.py --fast
    python examples/trl_integration_example.py --algorithm rloo --steps 60
    python examples/trl_integration_example.py --model Qwen/Qwen2.5-0.5B-Instruct --dataset trl-lib/tldr
Watch it live from another terminal: `rlhf-tui` (or `rlhf-tui tcp://127.0.0.1:PORT` with --address).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the tiny local GPT-2)")
    parser.add_argument(
        "--dataset",
        default=None,
        help="hub id, .json/.jsonl/.csv/.parquet file or save_to_disk folder (default: a small "
        "JSONL of prompts written to the work dir)",
    )
    parser.add_argument("--algorithm", choices=("grpo", "rloo"), default="grpo")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 40; 8 with --fast)")
    parser.add_argument("--workdir", default=None, help="where checkpoints and logs go (default: a temp dir)")
    parser.add_argument(
        "--address",
        default=None,
        help="where live monitors connect (default tcp://127.0.0.1:5555 or $RLHF_TUI_ADDRESS)",
    )
    parser.add_argument("--fast", action="store_true", help="a few steps only (tests, smoke checks)")
    return parser.parse_args(argv)


def write_prompts(path: str) -> str:
    from rlhf_tui.bridge.demo.tiny import PROMPTS

    with open(path, "w") as fh:
        for prompt in PROMPTS * 4:
            fh.write(json.dumps({"prompt": prompt}) + "\n")
    return path


def main(argv=None) -> int:
    ns = parse_args(argv)
    if ns.model is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never ask the hub
    from rlhf_tui.bridge.demo.tiny import quiet_libraries

    quiet_libraries()
    from transformers import PrinterCallback, ProgressCallback

    from rlhf_tui.bridge import TRLIntegrationConfig, TRLIntegrationManager
    from rlhf_tui.bridge.demo.tiny import build_tiny_model, length_reward
    from rlhf_tui.bridge.training.integration import PROFILE_KEYS, format_results

    workdir = ns.workdir or tempfile.mkdtemp(prefix="rlhf-tui-example-")
    os.makedirs(workdir, exist_ok=True)
    steps = ns.steps or (8 if ns.fast else 40)
    model = ns.model or build_tiny_model()
    if ns.model is None:
        import torch

        torch.set_num_threads(1)  # a tiny model is overhead-bound: extra threads only contend
    dataset = ns.dataset or write_prompts(os.path.join(workdir, "prompts.jsonl"))

    config = TRLIntegrationConfig(
        model_name=model,
        algorithm=ns.algorithm,
        learning_rate=1e-5,
        batch_size=4,
        ppo_epochs=2,  # -> num_iterations: each generated batch is used for 2 updates
        init_kl_coef=0.05,  # -> beta
        max_completion_length=12 if ns.model is None else 64,
        save_freq=max(2, steps // 2),  # -> save_steps (+ a final checkpoint)
        log_with="none",
        logging_dir=os.path.join(workdir, "logs"),
        output_dir=os.path.join(workdir, "checkpoints"),
        monitor_address=ns.address,
        enable_profiling=True,
        enable_checkpoint_analysis=True,
        enable_reward_monitoring=True,
    )
    print(f"== configuration -> TRL {ns.algorithm.upper()} ==")
    for row in config.mapping():
        if row["trl_field"] not in ("—", "any") and row["trl_value"] is not None:
            print(f"  {row['field']:<28} -> {row['trl_field']} = {row['trl_value']}")

    manager = TRLIntegrationManager(config)
    trainer = manager.setup_trl_trainer(model_name=model, dataset_name=dataset, reward_funcs=[length_reward])
    for noisy in (PrinterCallback, ProgressCallback):  # our own summary is printed below
        trainer.remove_callback(noisy)
    print(f"\n== training {type(trainer).__name__} for {steps} steps (model: {model}) ==")
    results = manager.train_with_monitoring(num_steps=steps, save_checkpoints=True)

    print("\n== results ==")
    print(format_results(results))
    profiled = {key: results["report"]["metrics"].get(key, {}).get("mean") for key in PROFILE_KEYS.values()}
    print(
        "\nper-phase timings in the report (mean per step): "
        + ", ".join(f"{k}={v * 1000:.1f}ms" for k, v in profiled.items() if v is not None)
    )
    print(f"\nthe same view: rlhf-tui report {results['log_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
