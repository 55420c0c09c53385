"""What a run's run_start says about it: its id, the process, the versions, the trainer, model and key args."""

from __future__ import annotations

import os
import secrets
import time
from datetime import datetime
from typing import Any

from rlhf_tui.bridge.wire import protocol
from rlhf_tui.bridge.wire.metrics import trainer_units

KEY_ARGS = (
    "learning_rate",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_generations",
    "beta",
    "num_iterations",
    "epsilon",
    "temperature",
    "max_completion_length",
    "max_prompt_length",
    "max_length",
    "lr_scheduler_type",
    "warmup_steps",
    "seed",
    "output_dir",
    "logging_steps",
    "save_steps",
    "loss_type",
    "bf16",
    "fp16",
    "gradient_checkpointing",
    "use_vllm",
    "scale_rewards",
)


def new_run_id() -> str:
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("trl", "transformers", "torch", "rlhf-tui"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def hostname() -> str:
    return os.uname().nodename if hasattr(os, "uname") else ""


def _process() -> dict[str, Any]:
    return {"pid": os.getpid(), "started": time.time(), "versions": versions()}


def custom_meta(run_id: str) -> dict:
    """A custom loop's run_start (`log_step` without a trainer)."""
    return {"run_id": run_id, "trainer": "custom", **_process()}


def trainer_meta(run_id: str, trainer: Any, args: Any, state: Any, kwargs: dict) -> dict:
    """A `train()`'s run_start, from what on_train_begin was given (and the trainer, when the callback has it)."""
    meta: dict[str, Any] = {"run_id": run_id, **_process()}
    if trainer is not None:
        meta["trainer"] = type(trainer).__name__
    elif args is not None:
        name = type(args).__name__
        meta["trainer"] = name[:-6] + "Trainer" if name.endswith("Config") else "Trainer"
    units = trainer_units(trainer if trainer is not None else meta.get("trainer", ""))
    if units:  # per-token or per-sequence kl / entropy, from the trainer class (its MRO)
        meta["units"] = units
    model = kwargs.get("model")
    cfg = getattr(model, "config", None)
    meta["model"] = (
        getattr(cfg, "_name_or_path", None)
        or getattr(model, "name_or_path", None)
        or (type(model).__name__ if model is not None else None)
    )
    if args is not None:
        meta["args"] = {k: getattr(args, k) for k in KEY_ARGS if hasattr(args, k)}
        meta["world_size"] = int(getattr(args, "world_size", 1) or 1)
    if state is not None:
        meta["max_steps"] = getattr(state, "max_steps", None)
    meta["hostname"] = hostname()
    return protocol.to_json_safe(meta)
