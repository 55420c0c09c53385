"""The corpus grid: 36 runs (14 healthy, 22 faulty), each a `RunSpec`.

Names (`grpo_c00` …) say the trainer only, not the label. Seeds differ per run; onsets fall at 35-65 % of the
run (drawn from the run's seed) and are even where the run logs every 2 steps or reuses each generation for
2 iterations, so that the first faulty logged entry and the first faulty generation both come right after it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from faults import GRADUAL, kind_of

BASE_SEED = 91000


@dataclass
class RunSpec:
    name: str
    trainer: str  # "grpo" | "rloo" | "dpo"
    steps: int
    config: dict[str, Any]
    fault: str = "none"
    fault_params: dict[str, Any] = field(default_factory=dict)
    ramp: int = 0  # gradual faults: steps from the onset to full strength
    onset_frac: float | None = None  # None: drawn in [0.35, 0.65]
    seed: int = 0
    onset_step: int | None = None

    @property
    def kind(self) -> str | None:
        return kind_of(self.fault)


# Trainer-level defaults; each run overrides some of them.
GRPO_DEFAULTS: dict[str, Any] = {
    "learning_rate": 5e-4,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "per_device_train_batch_size": 32,
    "num_generations": 4,
    "max_completion_length": 12,
    "beta": 0.04,
    "temperature": 1.0,
    "logging_steps": 1,
}
DPO_DEFAULTS: dict[str, Any] = {
    "learning_rate": 2e-4,
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "per_device_train_batch_size": 16,
    "beta": 0.1,
    "logging_steps": 1,
}

_RESTARTS = {"lr_scheduler_type": "cosine_with_restarts", "lr_scheduler_kwargs": {"num_cycles": 3}}

# (trainer, steps, config overrides, fault, fault_params, ramp)
_GRID: list[tuple[str, int, dict[str, Any], str, dict[str, Any], int]] = [
    # ---- healthy (14) ---------------------------------------------------------------------------------------
    ("grpo", 400, {"loss_type": "grpo", "lr_scheduler_type": "linear", "warmup_steps": 40}, "none", {}, 0),
    ("grpo", 360, {"loss_type": "dapo", **_RESTARTS, "warmup_steps": 10}, "none", {}, 0),
    ("grpo", 440, {"loss_type": "dr_grpo", "learning_rate": 2e-3, "logging_steps": 2}, "none", {}, 0),
    ("grpo", 320, {"loss_type": "bnpo", "beta": 0.0, "temperature": 0.7}, "none", {}, 0),
    (
        "grpo",
        400,
        {"loss_type": "grpo", "num_iterations": 2, "temperature": 1.2, "scale_rewards": "none"},
        "none",
        {},
        0,
    ),
    (
        "grpo",
        480,
        {"loss_type": "dapo", "num_iterations": 2, "scale_rewards": "batch", "logging_steps": 2},
        "none",
        {},
        0,
    ),
    ("grpo", 340, {"loss_type": "dr_grpo", "lr_scheduler_type": "cosine", "warmup_steps": 30}, "none", {}, 0),
    ("grpo", 420, {"loss_type": "bnpo", "temperature": 1.2, "num_generations": 8, "logging_steps": 2}, "none", {}, 0),
    ("rloo", 380, {"lr_scheduler_type": "linear", "warmup_steps": 30}, "none", {}, 0),
    ("rloo", 460, {**_RESTARTS, "logging_steps": 2, "num_generations": 8}, "none", {}, 0),
    ("dpo", 400, {"lr_scheduler_type": "linear", "warmup_steps": 40}, "none", {}, 0),
    ("dpo", 340, {**_RESTARTS, "learning_rate": 6e-4, "beta": 0.3}, "none", {}, 0),
    ("grpo", 360, {"loss_type": "grpo", "beta": 0.0, "num_iterations": 2, **_RESTARTS}, "none", {}, 0),
    ("grpo", 300, {"loss_type": "dapo", "learning_rate": 2e-3, "temperature": 0.7}, "none", {}, 0),
    # ---- sudden faults (13) ---------------------------------------------------------------------------------
    ("grpo", 380, {"loss_type": "grpo"}, "lr_spike", {"factor": 40.0, "mode": "scheduler"}, 0),
    ("rloo", 340, {"lr_scheduler_type": "cosine"}, "lr_spike", {"factor": 60.0, "mode": "optimizer"}, 0),
    ("dpo", 360, {"lr_scheduler_type": "linear", "warmup_steps": 20}, "lr_spike", {"factor": 50.0}, 0),
    (
        "grpo",
        420,
        {"loss_type": "dapo", "logging_steps": 2},
        "reward_nan",
        {"frac": 0.8, "target": "correctness"},
        0,
    ),
    ("rloo", 360, {}, "reward_nan", {"frac": 1.0, "target": "format_ok"}, 0),
    ("grpo", 400, {"loss_type": "dr_grpo"}, "reward_scale", {"factor": 50.0, "target": "correctness"}, 0),
    (
        "grpo",
        440,
        {"loss_type": "bnpo", "num_iterations": 2, "scale_rewards": "none"},
        "reward_scale",
        {"factor": 200.0, "target": "length_ok"},
        0,
    ),
    ("dpo", 380, {}, "label_flip", {"frac": 0.8}, 0),
    ("dpo", 420, {"lr_scheduler_type": "cosine", "logging_steps": 2}, "label_flip", {"frac": 0.6}, 0),
    ("grpo", 360, {"loss_type": "grpo", "max_grad_norm": 1.0}, "grad_explosion", {"factor": 1000.0}, 0),
    ("rloo", 400, {"max_grad_norm": 1e6}, "grad_explosion", {"factor": 300.0}, 0),
    ("grpo", 380, {"loss_type": "dapo"}, "dead_reward", {"value": 0.0, "target": "correctness"}, 0),
    ("rloo", 340, {"logging_steps": 2}, "dead_reward", {"value": 0.5, "target": "format_ok"}, 0),
    # ---- gradual faults (9) ---------------------------------------------------------------------------------
    ("grpo", 440, {"loss_type": "grpo"}, "reward_drift", {"mu": 0.5, "sigma": 1.0, "target": "correctness"}, 60),
    (
        "rloo",
        400,
        {"lr_scheduler_type": "linear"},
        "reward_drift",
        {"mu": 0.0, "sigma": 1.5, "target": "format_ok"},
        80,
    ),
    ("grpo", 380, {"loss_type": "dapo"}, "entropy_collapse", {"sharpen": 12.0}, 40),
    ("grpo", 460, {"loss_type": "bnpo", "num_iterations": 2}, "entropy_collapse", {"sharpen": 8.0}, 60),
    ("rloo", 360, {}, "entropy_collapse", {"sharpen": 10.0}, 30),
    ("grpo", 420, {"loss_type": "grpo", "beta": 0.2}, "kl_runaway", {"beta_end": -1.5}, 50),
    ("rloo", 400, {"beta": 0.15, "logging_steps": 2}, "kl_runaway", {"beta_end": -0.5}, 70),
    (
        "grpo",
        400,
        {"loss_type": "dr_grpo", "temperature": 1.2, "scale_rewards": "none"},
        "length_exploit",
        {"gain": 12.0, "tokens": 12, "base_tokens": 5, "target": "length_ok"},
        50,
    ),
    (
        "grpo",
        480,
        {"loss_type": "dapo", "num_iterations": 2, "logging_steps": 2, "temperature": 1.2, "scale_rewards": "none"},
        "length_exploit",
        {"gain": 12.0, "tokens": 12, "base_tokens": 5, "target": "length_ok"},
        60,
    ),
]


def _onset(spec: RunSpec) -> int:
    rng = random.Random(spec.seed)
    frac = spec.onset_frac if spec.onset_frac is not None else rng.uniform(0.35, 0.65)
    onset = int(spec.steps * frac)
    # a gradual fault reaches full strength with at least 20 logged entries left to see it
    onset = min(onset, spec.steps - spec.ramp - 20 * spec.config.get("logging_steps", 1))
    if spec.config.get("logging_steps", 1) > 1 or spec.config.get("num_iterations", 1) > 1:
        onset -= onset % 2
    return onset


def build_grid() -> list[RunSpec]:
    """The runs in a fixed shuffled order (so a run's number says nothing about its label)."""
    order = list(range(len(_GRID)))
    random.Random(BASE_SEED).shuffle(order)
    specs = []
    for i, g in enumerate(order):
        trainer, steps, overrides, fault, params, ramp = _GRID[g]
        defaults = DPO_DEFAULTS if trainer == "dpo" else GRPO_DEFAULTS
        seed = BASE_SEED + 17 * i
        config = {"seed": seed, "max_steps": steps, **defaults, **overrides}
        if trainer == "rloo":
            config.pop("loss_type", None)
        spec = RunSpec(f"{trainer}_c{i:02d}", trainer, steps, config, fault, dict(params), ramp, seed=seed)
        if fault != "none":
            spec.onset_step = _onset(spec)
            if fault in GRADUAL and not ramp:
                raise ValueError(f"{spec.name}: a gradual fault needs a ramp")
        specs.append(spec)
    return specs


def strengthen(fault: str, params: dict[str, Any], attempt: int) -> dict[str, Any]:
    """The fault's parameters for a retry (attempt 2, 3, …) when attempt 1 left no visible trace."""
    p = dict(params)
    k = 2.0 ** (attempt - 1)
    for key in ("factor", "sigma", "gain", "sharpen", "beta_end"):
        if key in p:
            p[key] = float(p[key]) * k
    if "frac" in p:
        p["frac"] = min(1.0, float(p["frac"]) + 0.1 * (attempt - 1))
    return p
