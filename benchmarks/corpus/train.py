"""Train one corpus run (a `RunSpec`) on CPU and write `<out>/<name>/trainer_state.json`; returns its label."""

from __future__ import annotations

import os
import random
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

from effect import effect
from faults import REWARD_FAULTS, Clock, FaultCallback, wrap_reward
from grid import RunSpec, strengthen
from task import MODEL_SHAPE, REWARDS, preference_dataset, prompt_dataset

MAX_ATTEMPTS = 3
TRAINER_CLASS = {"grpo": "GRPOTrainer", "rloo": "RLOOTrainer", "dpo": "DPOTrainer"}
# TRL 1.16's values for the settings the grid varies, written into a label when a run leaves them unset
TRL_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": {"loss_type": "dapo", "num_iterations": 1, "scale_rewards": "group", "max_grad_norm": 1.0},
    "rloo": {"num_iterations": 1, "max_grad_norm": 1.0},
    "dpo": {"loss_type": "sigmoid", "max_grad_norm": 1.0},
}
_COMMON = {
    "use_cpu": True,
    "bf16": False,
    "gradient_checkpointing": False,
    "report_to": "none",
    "save_strategy": "no",
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
}


def _quiet() -> None:
    import datasets
    import transformers

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


def _build_trainer(spec: RunSpec, params: dict[str, Any], model_path: str, output_dir: str, callback):
    from transformers import AutoTokenizer, PrinterCallback

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    cfg = {k: v for k, v in spec.config.items() if k != "seed"}
    args_kw = {**_COMMON, **cfg, "output_dir": output_dir, "seed": spec.seed, "data_seed": spec.seed}
    if spec.trainer == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(
            model=model_path,
            args=DPOConfig(**args_kw),
            train_dataset=preference_dataset(spec.seed),
            processing_class=tok,
            callbacks=[callback],
        )
    else:
        from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

        config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if spec.trainer == "grpo" else (RLOOConfig, RLOOTrainer)
        funcs = []
        for name, func in REWARDS.items():
            if spec.fault in REWARD_FAULTS and params.get("target") == name:
                func = wrap_reward(func, spec.fault, params, callback.clock)
            funcs.append(func)
        trainer = trainer_cls(
            model=model_path,
            reward_funcs=funcs,
            args=config_cls(**args_kw),
            train_dataset=prompt_dataset(spec.seed),
            processing_class=tok,
            callbacks=[callback],
        )
    trainer.remove_callback(PrinterCallback)
    callback.trainer = trainer
    return trainer


def train_once(spec: RunSpec, params: dict[str, Any], model_path: str, run_dir: Path) -> dict[str, Any]:
    """One training run; writes trainer_state.json and returns the label without `effect`."""
    import torch
    from transformers import set_seed

    torch.set_num_threads(1)
    _quiet()
    set_seed(spec.seed)
    clock = Clock(spec.onset_step, spec.ramp, rng=random.Random(spec.seed + 1))
    callback = FaultCallback(spec.fault, params, clock)
    crashed, error = False, None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="corpus-run-") as tmp:
        trainer = _build_trainer(spec, params, model_path, tmp, callback)
        try:
            trainer.train()
        except Exception as exc:  # a fault that crashes training is a result, not a generator error
            crashed, error = True, f"{type(exc).__name__}: {exc}"[:500]
    run_dir.mkdir(parents=True, exist_ok=True)
    part = run_dir / "trainer_state.json.part"
    trainer.state.save_to_json(str(part))
    os.replace(part, run_dir / "trainer_state.json")
    fault_params = dict(params)
    if spec.ramp:
        fault_params["ramp_steps"] = spec.ramp
    config = {**TRL_DEFAULTS.get(spec.trainer, {}), **spec.config}
    if spec.trainer != "dpo":
        config["prompts_per_step"] = config["per_device_train_batch_size"] // config["num_generations"]
    config["model"] = {"arch": "LlamaForCausalLM", **MODEL_SHAPE, "vocab_size": trainer.model.config.vocab_size}
    return {
        "trainer": TRAINER_CLASS[spec.trainer],
        "fault": spec.fault,
        "kind": spec.kind,
        "onset_step": spec.onset_step,
        "config": config,
        "fault_params": fault_params if spec.fault != "none" else {},
        "crashed": crashed,
        "crash_error": error,
        "steps_logged": int(trainer.state.global_step),
        "runtime_s": round(time.monotonic() - started, 1),
        "_log_history": trainer.state.log_history,
    }


def run_spec(spec: RunSpec, model_path: str, out: str) -> dict[str, Any]:
    """Train `spec`, retrying a faulty run with a stronger fault while its expected metric shows no change."""
    run_dir = Path(out) / spec.name
    attempt = 1
    while True:
        params = strengthen(spec.fault, spec.fault_params, attempt)
        label = train_once(spec, params, model_path, run_dir)
        history = label.pop("_log_history")
        if spec.fault == "none" or spec.onset_step is None:
            label["effect"] = None
            return label
        label["effect"] = effect(history, spec.fault, spec.onset_step, spec.ramp)
        label["effect"]["attempt"] = attempt
        if label["effect"]["expected_visible"] or attempt >= MAX_ATTEMPTS:
            return label
        attempt += 1
