"""A real tiny GRPO run with two reward functions, logging JSONL (the test data beside it):
`python make_two_functions.py OUTPUT_DIR STEPS ADDRESS`; prints the log's path."""

import os
import sys

from rlhf_tui.bridge.demo.tiny import build_tiny_model, prompt_dataset, quiet_libraries
from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
from rlhf_tui.bridge.training.rewards import monitor_rewards


def great_reward(completions, **kw):
    return [0.5 * sum(w in (c if isinstance(c, str) else str(c)) for w in ("great", "good")) - 0.2 for c in completions]


def length_reward(completions, **kw):
    return [-abs(len(c if isinstance(c, str) else str(c)) - 12) / 60.0 - 0.8 for c in completions]


def main(out, steps, addr):
    quiet_libraries()
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    model = build_tiny_model("/tmp/rw/tiny")
    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"
    cb = RLHFMonitorCallback(address=addr, log_dir=os.path.join(out, "logs"))
    args = GRPOConfig(
        output_dir=out,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        max_steps=steps,
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        report_to="none",
        learning_rate=1e-3,
        beta=0.04,
        save_strategy="no",
        disable_dropout=True,
        disable_tqdm=True,
        seed=0,
        temperature=1.0,
    )
    tr = GRPOTrainer(
        model=model,
        reward_funcs=monitor_rewards([great_reward, length_reward], cb),
        args=args,
        train_dataset=prompt_dataset(max(64, steps * 4)),
        processing_class=tok,
        callbacks=[cb],
    )
    cb.trainer = tr
    tr.train()
    cb.close()
    print(cb.log_path)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
