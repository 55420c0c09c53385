"""The demo's training process: a REAL tiny TRL GRPO run with RLHFMonitorCallback on a given address.

`python -m rlhf_tui.bridge.demo.train --address tcp://127.0.0.1:PORT --steps 200 --output-dir DIR`
Used by `rlhf-tui demo` (in a subprocess) and by the tests.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def make_grpo_trainer(
    model_path: str,
    output_dir: str,
    callback,
    *,
    steps: int = 200,
    save_steps: int = 0,
    learning_rate: float = 1e-3,
    beta: float = 0.04,
    step_delay: float = 0.0,
    num_generations: int = 4,
    seed: int = 0,
):
    """A GRPOTrainer on the tiny model with our callback and the demo reward wrapped by monitor_rewards."""
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_tui.bridge.demo.tiny import length_reward, prompt_dataset
    from rlhf_tui.bridge.training.rewards import monitor_rewards

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    args = GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=num_generations,
        num_generations=num_generations,
        max_completion_length=16,
        max_steps=steps,
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        learning_rate=learning_rate,
        beta=beta,
        save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500,
        disable_dropout=True,
        disable_tqdm=True,
        seed=seed,
        temperature=1.0,
    )
    callbacks = [callback]
    if step_delay > 0:

        class _Slow(TrainerCallback):  # the demo runs at a watchable pace
            def on_step_end(self, *a, **k):
                time.sleep(step_delay)

        callbacks.append(_Slow())
    trainer = GRPOTrainer(
        model=model_path,
        reward_funcs=monitor_rewards([length_reward], callback),
        args=args,
        train_dataset=prompt_dataset(max(64, steps * num_generations)),
        processing_class=tok,
        callbacks=callbacks,
    )
    callback.trainer = trainer
    return trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_tui.bridge.demo.train")
    parser.add_argument("--address", required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--model", default=None, help="tiny model folder (built if missing)")
    parser.add_argument("--save-steps", type=int, default=0)
    parser.add_argument("--step-delay", type=float, default=0.0)
    parser.add_argument("--log-dir", default=None)
    parser.add_argument("--run-id", default=None)
    ns = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rlhf_tui.bridge.demo.tiny import quiet_libraries

    quiet_libraries()
    from rlhf_tui.bridge.demo.tiny import build_tiny_model
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

    model = build_tiny_model(ns.model)
    cb = RLHFMonitorCallback(
        address=ns.address, log_dir=ns.log_dir or os.path.join(ns.output_dir, "rlhf-tui"), run_id=ns.run_id
    )
    trainer = make_grpo_trainer(
        model, ns.output_dir, cb, steps=ns.steps, save_steps=ns.save_steps, step_delay=ns.step_delay
    )
    trainer.train()
    cb.wait_for_checkpoints(60)
    # Stay reachable briefly so a monitor sees the end and late joiners can still fetch the history.
    linger = float(os.environ.get("RLHF_TUI_DEMO_LINGER", "2"))
    time.sleep(linger)
    cb.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
