"""Checkpoint analysis demo: train a few steps with checkpoints, analyse them (health score, weight statistics,
training state, drift from a reference checkpoint, recommendations), then analyse a deliberately damaged copy
to show what the issues look like.

Offline by default on a tiny local GPT-2:
    python examples/checkpoint_analysis_demo.py --fast
    python examples/checkpoint_analysis_demo.py --model gpt2
Any checkpoint from the command line: `rlhf-tui analyze-checkpoint PATH [--reference PATH]`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="hub id or local folder (default: the tiny local GPT-2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 12; 4 with --fast)")
    parser.add_argument("--workdir", default=None, help="where checkpoints and logs go (default: a temp dir)")
    parser.add_argument("--fast", action="store_true", help="a few steps only (tests, smoke checks)")
    return parser.parse_args(argv)


def show(analysis: dict, title: str) -> None:
    """Print an analysis the way the guide does: health score, issues, recommendations (+ a few details)."""
    print(f"\n== {title} ==")
    print(f"Health Score: {analysis['health_score']:.2f}")
    print(
        f"File size: {analysis['file_size_mb']:.2f} MB, tensors: {analysis.get('num_tensors')}, "
        f"parameters: {analysis.get('num_parameters')}"
    )
    if analysis.get("learning_rate") is not None:
        print(f"Training state: learning_rate={analysis['learning_rate']:.3g}")
    stats = analysis.get("weight_stats") or {}
    largest = sorted(stats.items(), key=lambda item: -(item[1].get("norm") or 0.0))[:3]
    print("Weight statistics (largest norms):")
    for name, row in largest:
        print(f"  {name}: mean={row['mean']:.3g} std={row['std']:.3g} norm={row['norm']:.3g}")
    drift = analysis.get("drift")
    if isinstance(drift, dict) and drift.get("overall") is not None:
        print(f"Drift from reference: {drift['overall']:.3g} (relative L2 over all weights)")
    print(f"Issues: {analysis['issues']}")
    print(f"Recommendations: {analysis['recommendations']}")


def damage(source: str, target: str) -> str:
    """A copy of a checkpoint with one exploding weight matrix and NaNs in another (what a diverged run saves)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target, dirs_exist_ok=True)
    path = os.path.join(target, "model.safetensors")
    tensors = load_file(path)
    matrices = [n for n, t in tensors.items() if t.ndim == 2 and "wte" not in n and "wpe" not in n]
    tensors[matrices[0]] = tensors[matrices[0]] * 1e5
    poisoned = tensors[matrices[-1]].clone()
    poisoned.view(-1)[: poisoned.numel() // 10] = float("nan")
    tensors[matrices[-1]] = poisoned
    save_file(tensors, path, metadata={"format": "pt"})
    return target


def main(argv=None) -> int:
    ns = parse_args(argv)
    if ns.model is None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rlhf_tui.bridge.demo.tiny import quiet_libraries

    quiet_libraries()
    from transformers import PrinterCallback, ProgressCallback

    from rlhf_tui.analysis.checkpoint import CheckpointAnalyzer
    from rlhf_tui.bridge import TRLIntegrationConfig, TRLIntegrationManager
    from rlhf_tui.bridge.demo.tiny import PROMPTS, build_tiny_model, length_reward

    workdir = ns.workdir or tempfile.mkdtemp(prefix="rlhf-tui-checkpoints-")
    steps = ns.steps or (4 if ns.fast else 12)
    model = ns.model or build_tiny_model()
    if ns.model is None:
        import torch

        torch.set_num_threads(1)  # a tiny model is overhead-bound: extra threads only contend

    # 1. Train with checkpoints; the manager analyses each one as it is saved.
    config = TRLIntegrationConfig(
        model_name=model,
        batch_size=4,
        ppo_epochs=1,
        init_kl_coef=0.0,
        max_completion_length=8 if ns.model is None else 32,
        save_freq=max(1, steps // 2),
        log_with="none",
        monitor_address=False,
        enable_profiling=False,
        logging_dir=os.path.join(workdir, "logs"),
        output_dir=os.path.join(workdir, "checkpoints"),
    )
    manager = TRLIntegrationManager(config)
    trainer = manager.setup_trl_trainer(model, [{"prompt": p} for p in PROMPTS], reward_funcs=[length_reward])
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    results = manager.train_with_monitoring(num_steps=steps, save_checkpoints=True)
    print("== checkpoints analysed during training ==")
    for c in results["checkpoints"]:
        print(
            f"step {c['step']}: health_score={c['health_score']:.2f} issues={len(c['issues'])} "
            f"drift={c['drift'] if c['drift'] is None else format(c['drift'], '.3g')} {c['path']}"
        )

    # 2. The seed's API on the last checkpoint, with the first one as reference.
    first, last = results["checkpoints"][0]["path"], results["checkpoints"][-1]["path"]
    analyzer = CheckpointAnalyzer(log_dir=os.path.join(workdir, "logs", "checkpoints"))
    analysis = analyzer.analyze_checkpoint(
        model_path=last, step=results["checkpoints"][-1]["step"], reference_checkpoint=first
    )
    show(analysis, f"healthy checkpoint {os.path.basename(last)} (reference {os.path.basename(first)})")

    # 3. A damaged copy: exploding weights and NaNs must lower the score and produce recommendations.
    broken = damage(last, os.path.join(workdir, "checkpoint-damaged"))
    analysis = analyzer.analyze_checkpoint(
        model_path=broken, step=results["checkpoints"][-1]["step"], reference_checkpoint=last
    )
    show(analysis, "damaged copy (x1e5 weights, 10% NaN)")
    print(f"\nsame analysis from the command line: rlhf-tui analyze-checkpoint {broken} --reference {last}")
    summary = {"healthy": results["checkpoints"][-1]["health_score"], "damaged": analysis["health_score"]}
    print("health scores: " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
