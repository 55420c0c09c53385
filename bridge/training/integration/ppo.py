"""PPO support: which PPOTrainer the installed TRL has, and the PPOTrainer (TRL 0.12–1.12) set up with our
callback attached. GRPO/RLOO are set up by the manager itself."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from rlhf_tui.bridge.training.integration.errors import AlgorithmUnavailableError, IntegrationError


def trl_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("trl")
    except metadata.PackageNotFoundError:
        return None


def ppo_support(version: str | None = None) -> str:
    """Which PPOTrainer the installed TRL has: 'trainer' (0.12–1.12, a transformers Trainer), 'legacy' (≤ 0.11,
    `trainer.step(queries, responses, scores)`), 'removed' (≥ 1.13) or 'missing' (TRL not installed)."""
    version = version if version is not None else trl_version()
    if version is None:
        return "missing"
    try:
        from packaging.version import Version

        v = Version(version)
        major_minor = (v.major, v.minor)
    except Exception:
        parts = (version.split(".") + ["0"])[:2]
        major_minor = tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)
    if major_minor < (0, 12):
        return "legacy"
    if major_minor < (1, 13):
        return "trainer"
    return "removed"


PPO_VERSIONS = (
    "TRL 0.12–1.12 have a PPOTrainer that is a transformers Trainer (`from trl import PPOTrainer` "
    "in 0.12–0.28, `from trl.experimental.ppo import PPOTrainer` in 0.26–1.12); TRL ≤ 0.11 has the "
    "legacy one (`trainer.step(queries, responses, scores)`, no callbacks)"
)


def ppo_unavailable_message(version: str | None) -> str:
    return (
        f"algorithm='ppo' is not available: the installed TRL {version} has no PPOTrainer (removed in 1.13). "
        f"{PPO_VERSIONS}. Use algorithm='grpo' or 'rloo' (same clipped objective, no value model), or "
        "install 'trl>=0.12,<1.13' for PPO."
    )


def is_model(obj: Any) -> bool:
    return hasattr(obj, "config") and hasattr(obj, "forward")


def setup_ppo_trainer(
    cfg,
    model,
    dataset_name,
    reward_funcs,
    *,
    eval_dataset,
    dataset_split,
    processing_class,
    peft_config,
    callbacks,
    text_prompt_words,
    monitor,
    final_checkpoint,
    load_tokenizer,
):
    """TRL 0.12–1.12: PPOTrainer with a reward model and a value model (not exercised on TRL ≥ 1.13).

    `monitor`: the (monitor callback, RunCollector) to attach; `final_checkpoint` is the manager's last-step saver and
    `load_tokenizer` its tokenizer loader."""
    from rlhf_tui.bridge.training.integration.config import available_reporters
    from rlhf_tui.bridge.training.integration.datasets import load_prompt_dataset

    support = ppo_support()
    if support == "removed":
        raise AlgorithmUnavailableError(ppo_unavailable_message(trl_version()))
    if support == "legacy":
        raise AlgorithmUnavailableError(
            f"TRL {trl_version()}'s PPOTrainer (≤ 0.11) is not a transformers Trainer, so the manager cannot "
            "drive it: in your own loop call RLHFMonitorCallback.log_step(step, stats) after each "
            "ppo_trainer.step(...) (see examples/ppo_monitoring_demo.py), or use TRL 0.12–1.12."
        )
    if support == "missing":
        raise AlgorithmUnavailableError("algorithm='ppo' needs TRL: pip install 'trl>=0.12,<1.13'")
    if not isinstance(reward_funcs, (str, os.PathLike)) and not is_model(reward_funcs):
        raise IntegrationError(
            "PPO (TRL 0.12–1.12) needs a reward model (a sequence-classification model or "
            "its id/path) as reward_funcs, not reward functions; use algorithm='grpo' or "
            "'rloo' for reward functions"
        )
    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer
    except ImportError:
        from trl import PPOConfig, PPOTrainer
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cb, collector = monitor

    tok = processing_class if processing_class is not None else load_tokenizer(model)
    dataset = load_prompt_dataset(dataset_name, dataset_split, text_prompt_words)
    dataset = dataset.map(
        lambda row: {"input_ids": tok(row["prompt"])["input_ids"]}, remove_columns=dataset.column_names
    )
    policy = AutoModelForCausalLM.from_pretrained(model) if isinstance(model, (str, os.PathLike)) else model
    ref = (
        None
        if peft_config is not None
        else (AutoModelForCausalLM.from_pretrained(model) if isinstance(model, (str, os.PathLike)) else None)
    )
    reward = (
        AutoModelForSequenceClassification.from_pretrained(reward_funcs, num_labels=1)
        if isinstance(reward_funcs, (str, os.PathLike))
        else reward_funcs
    )
    value = AutoModelForSequenceClassification.from_pretrained(
        reward_funcs if isinstance(reward_funcs, (str, os.PathLike)) else reward.config._name_or_path, num_labels=1
    )
    wanted = {
        "output_dir": cfg.output_dir,
        "learning_rate": cfg.learning_rate,
        "per_device_train_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "num_mini_batches": max(1, cfg.batch_size // cfg.mini_batch_size),
        "num_ppo_epochs": cfg.ppo_epochs,
        "max_grad_norm": cfg.max_grad_norm,
        "cliprange": cfg.cliprange,
        "cliprange_value": cfg.cliprange_value,
        "vf_coef": cfg.vf_coef,
        "gamma": cfg.gamma,
        "lam": cfg.lam,
        "kl_coef": cfg.init_kl_coef,
        "kl_estimator": "k1" if cfg.kl_penalty == "kl" else "k3",
        "response_length": cfg.max_completion_length,
        "temperature": cfg.temperature,
        "logging_steps": cfg.logging_steps,
        "save_steps": cfg.save_freq,
        "save_strategy": "no",
        "report_to": available_reporters(cfg.reporters()) or "none",
        "use_cpu": cfg.use_cpu(),
        "fp16": cfg.fp16 and not cfg.use_cpu(),
        "bf16": cfg.bf16,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "seed": cfg.seed,
        "run_name": cb.run_id,
    }
    wanted.update(cfg.trl_args)
    names = {f.name for f in dataclasses.fields(PPOConfig)}
    args = PPOConfig(**{k: v for k, v in wanted.items() if k in names})
    trainer = PPOTrainer(
        args=args,
        processing_class=tok,
        model=policy,
        ref_model=ref,
        reward_model=reward,
        value_model=value,
        train_dataset=dataset,
        callbacks=[cb, collector, final_checkpoint] + list(callbacks or []),
        **({"peft_config": peft_config} if peft_config is not None else {}),
    )
    cb.trainer = trainer
    return trainer
