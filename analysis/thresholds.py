"""Every anomaly-detector setting in one dataclass: documented defaults, TOML load/save, and a field table
(`THRESHOLD_FIELDS`) from which the TUI builds its threshold editor.

Pure standard library (tomllib, or tomli before Python 3.11; tomli_w for writing). A threshold means the same
thing on the training side and in the monitor because both call `analysis.detectors` with these values.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


@dataclass
class Thresholds:
    """All detector settings. Step counts are optimizer steps; factors and z-scores are unit-free.

    The defaults were tuned on real tiny-model TRL runs (see docs/anomaly-detection.md) to raise no medium+
    alarm on healthy runs while catching injected faults within a few steps.
    """

    # -- alarm hygiene ------------------------------------------------------------------------------
    anomaly_threshold: float = 4.0  # generic robust z-score threshold (the seed's name); `zscore` is low only
    grace_steps: int = 10  # no alarm (other than non-finite values) in the first N steps of a run
    cooldown_steps: int = 10  # flags of one detector+metric closer than this merge into one episode
    muted: list[str] = field(default_factory=list)  # detector names that never report

    # -- baselines ------------------------------------------------------------------------------------
    block_steps: int = 10  # baseline statistics are taken per block of N logged rows
    baseline_blocks: int = 5  # the trailing baseline is the previous K blocks (excludes the current point)
    min_history: int = 20  # finite values needed in the baseline before a detector may fire (warm-up)
    early_steps: int = 20  # first N finite values of a metric define the run's own early level
    recent_steps: int = 5  # "current level" = median of the last N values (robust to one spike)

    # -- level shifts (CUSUM of clipped robust z-scores) -------------------------------------------------
    shift_clip: float = 6.0  # a single point adds at most this much evidence (isolated spikes stay small)
    shift_kref: float = 1.25  # allowance per step: drift below this many scales never accumulates
    shift_h: float = 6.0  # evidence needed for a medium "level shift" alarm
    rise_kref: float = 2.0  # allowance for upward shifts of metrics that rise in healthy training
    rise_h: float = 8.0  # evidence needed for a reward climb to count with a hacking tell, and for policy shifts
    climb_h: float = 24.0  # evidence for a reward climb alone to alarm: far faster than learning (medium)

    # -- KL ------------------------------------------------------------------------------------------
    kl_spike_factor: float = 20.0  # |KL - baseline| in multiples of max(spread, |baseline|): isolated spike (low)
    kl_runaway_factor: float = 15.0  # the same ratio held for `persist_k` of the last `persist_n` steps: runaway
    kl_runaway_high: float = 100.0  # runaway held at this ratio: high severity
    kl_floor: float = 0.01  # KL levels below this (nats per token) are the policy leaving the reference, not news
    persist_k: int = 4  # k of the last n steps must exceed a level for it to count as persistent (k <= n)
    persist_n: int = 5

    # -- entropy -------------------------------------------------------------------------------------
    entropy_collapse_frac: float = 0.9  # current entropy this fraction below its early level: collapse (medium)
    entropy_collapse_high: float = 0.97  # ... this far below: high

    # -- reward --------------------------------------------------------------------------------------
    reward_scale_factor: float = 10.0  # reward_std this many times its baseline: reward scale jump (high)
    reward_scale_z: float = 50.0  # or reward this many spreads from its baseline in one step
    reward_mismatch_tol: float = 1e-3  # |reward - sum(rewards/<f>/mean)| relative to the reward scale
    no_signal_frac: float = 0.9  # frac_reward_zero_std at or above this: no learning signal (high)
    no_signal_jump: float = 0.35  # frac_reward_zero_std this far above its baseline level: a jump (medium)
    groups_flat_frac: float = 0.75  # groups/too_easy (too_hard) recent median at or above: most solved (hopeless)
    fraction_floor: float = 0.2  # smallest scale used for 0..1 fraction metrics (they move in coarse steps)
    reward_std_collapse: float = 0.05  # reward_std below this fraction of its early level: no signal (high)
    hack_window: int = 50  # reward climb this recent + a hacking sign = reward hacking
    hack_clipped_ratio: float = 0.5  # completions/clipped_ratio at or above: lengths running to the limit
    hack_length_frac: float = 0.95  # completion_length / max_completion_length (when args are known)
    hack_entropy_drop: float = 0.5  # entropy this fraction below its early level counts as falling
    truncation_ratio: float = 0.9  # completions/clipped_ratio held at or above: the length limit shapes the reward
    # -- sampling vs training (vLLM) ----------------------------------------------------------------------------
    sampling_difference: float = 0.01  # sampling/sampling_logp_difference/mean reference level (medium; 10x high)
    sampling_is_band: float = 0.2  # importance-sampling ratio mean further than this from 1 (either way)
    # per reward function, batch by batch (analysis/reward_episodes.py; docs/reward-reliability.md)
    reward_batch_z: float = 4.0  # batch mean this many spreads from the function's recent batches (medium; 2x high)
    reward_saturation_share: float = 0.8  # share of a function's scores at a bound over persist_n batches
    reward_invalid_high: float = 0.1  # share of None/NaN scores in a batch for high (any is medium, half critical)
    reward_drift_psi: float = 0.25  # PSI excess over chance for a significant drift (0.4x: moderate)

    # -- losses and gradients ------------------------------------------------------------------------
    spike_z: float = 10.0  # loss / grad_norm single-step robust z: spike (low)
    grad_norm_factor: float = 6.0  # grad_norm this many times its baseline for k of n steps (medium)
    loss_persist_z: float = 10.0  # loss robust z held for k of n steps (medium)
    value_loss_factor: float = 10.0  # PPO value loss this many times its early/baseline level (high)
    clip_ratio_high: float = 0.3  # clip fraction at or above (only when training is off-policy)
    lr_jump_factor: float = 5.0  # learning_rate jumping up by this factor in one step (medium)

    # -- DPO -----------------------------------------------------------------------------------------
    dpo_accuracy_drop: float = 0.25  # accuracies this far below their level in 2 of 3 steps, or twice as far once
    dpo_margin_factor: float = 10.0  # rewards/margins this many baseline levels above (medium)
    dpo_pinned_steps: int = 20  # accuracies at 1.0 for this many steps early: pinned (low)
    dpo_loss_margin: float = 0.05  # loss above ln 2 + this after it was below ln 2 - this (medium)

    # -- system --------------------------------------------------------------------------------------
    memory_leak_frac: float = 0.10  # memory grew by this fraction over the leak window, steadily (medium)
    memory_leak_blocks: int = 10  # leak window in blocks (block_steps each)
    gpu_frac_high: float = 0.90  # device memory used/total at or above: near OOM (high)
    gpu_frac_critical: float = 0.97  # ... critical
    step_time_factor: float = 2.0  # recent step time this many times its baseline (medium)

    # ----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["muted"] = list(self.muted)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Thresholds:
        """Build from a mapping; unknown keys or wrong types raise ValueError with a one-line message."""
        if not isinstance(data, Mapping):
            raise ValueError(f"thresholds must be a table of settings, not {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in known:
                raise ValueError(f"unknown threshold setting '{key}'")
            values[key] = _coerce(key, value, _FIELD_TYPES[key])
        th = cls(**values)
        th.validate()
        return th

    def validate(self) -> None:
        """Range checks; a bad value raises ValueError naming the setting."""
        for spec in THRESHOLD_FIELDS:
            name = spec["name"]
            if name == "muted":
                continue
            value = getattr(self, name)
            if "min" in spec and value < spec["min"]:
                raise ValueError(f"threshold '{name}' must be >= {spec['min']} (got {value})")
            if "max" in spec and value > spec["max"]:
                raise ValueError(f"threshold '{name}' must be <= {spec['max']} (got {value})")

    def replace(self, **changes: Any) -> Thresholds:
        return Thresholds.from_dict({**self.to_dict(), **changes})

    def is_muted(self, detector: str) -> bool:
        return detector in self.muted


_FIELD_TYPES: dict[str, type] = {}


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
            if math.isfinite(number):
                return number
            raise ValueError(f"threshold '{key}' must be a finite number (got {value!r})")
    elif kind is list:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return [str(v) for v in value]
        raise ValueError(f"threshold '{key}' must be a list of detector names (got {value!r})")
    raise ValueError(f"threshold '{key}' must be {kind.__name__} (got {type(value).__name__} {value!r})")


def _h(name: str, help_text: str, step: float, **extra: Any) -> dict[str, Any]:
    return {"name": name, "help": help_text, "step": step, **extra}


# Field table for editors and docs: name, default, type, help text, +/- step and bounds.
_FIELD_SPECS: list[dict[str, Any]] = [
    _h("anomaly_threshold", "generic robust z-score threshold (low-severity feed)", 0.5, min=0.5),
    _h("grace_steps", "steps at the start of a run with no alarms (non-finite values still reported)", 5, min=0),
    _h("cooldown_steps", "flags closer than this merge into one episode", 5, min=0),
    _h("muted", "detectors that never report", 0),
    _h("block_steps", "rows per baseline block", 1, min=2, max=1000),
    _h("baseline_blocks", "blocks in the trailing baseline window", 1, min=1, max=100),
    _h("min_history", "finite baseline values needed before alarms (warm-up)", 5, min=2),
    _h("early_steps", "first values that define a metric's early level", 5, min=3),
    _h("recent_steps", "values in the robust 'current level' median", 1, min=1, max=50),
    _h("shift_clip", "most evidence one step adds to a level shift", 0.5, min=0.5),
    _h("shift_kref", "per-step allowance of the level-shift CUSUM", 0.25, min=0.0),
    _h("shift_h", "CUSUM evidence for a level-shift alarm", 1.0, min=0.5),
    _h("rise_kref", "per-step allowance for rises of reward/entropy/length", 0.25, min=0.0),
    _h("rise_h", "CUSUM evidence for a reward climb with a hacking tell, and policy shifts", 1.0, min=0.5),
    _h("climb_h", "CUSUM evidence for a reward climb alone: 'climbing abnormally fast'", 2.0, min=0.5),
    _h("kl_spike_factor", "KL deviation (in typical levels) for an isolated spike", 5.0, min=1.0),
    _h("kl_runaway_factor", "KL deviation held k of n steps for runaway KL", 1.0, min=1.0),
    _h("kl_runaway_high", "KL deviation held k of n steps for high severity", 10.0, min=1.0),
    _h("kl_floor", "smallest KL reference level for spikes and runaway (early growth from 0)", 0.005, min=0.0),
    _h("persist_k", "k of the last n steps for persistence", 1, min=1),
    _h("persist_n", "n steps considered for persistence", 1, min=1, max=50),
    _h("entropy_collapse_frac", "entropy drop from its early level: collapse", 0.01, min=0.0, max=1.0),
    _h("entropy_collapse_high", "entropy drop from its early level: high", 0.01, min=0.0, max=1.0),
    _h("reward_scale_factor", "reward_std jump factor: reward scale changed", 1.0, min=1.0),
    _h("reward_scale_z", "single-step reward z-score: reward scale changed", 5.0, min=1.0),
    _h("reward_mismatch_tol", "relative reward vs sum of reward functions mismatch", 1e-3, min=0.0),
    _h("no_signal_frac", "frac_reward_zero_std for no learning signal", 0.05, min=0.0, max=1.0),
    _h("no_signal_jump", "frac_reward_zero_std jump above its level for no learning signal", 0.05, min=0.0, max=1.0),
    _h("groups_flat_frac", "groups/too_easy or too_hard recent median: most solved/hopeless", 0.05, min=0.5, max=1.0),
    _h("fraction_floor", "smallest scale for 0..1 fraction metrics", 0.05, min=0.0, max=1.0),
    _h("reward_std_collapse", "reward_std / early level for no learning signal", 0.01, min=0.0, max=1.0),
    _h("hack_window", "steps a reward climb stays relevant for reward hacking", 10, min=1),
    _h("hack_clipped_ratio", "completions/clipped_ratio that counts as running to the limit", 0.05, min=0.0, max=1.0),
    _h("hack_length_frac", "completion length / limit that counts as running to the limit", 0.01, min=0.0, max=1.0),
    _h("hack_entropy_drop", "entropy drop that counts as falling for reward hacking", 0.05, min=0.0, max=1.0),
    _h("truncation_ratio", "completions/clipped_ratio held at or above: truncation", 0.05, min=0.05, max=1.0),
    _h("sampling_difference", "sampling/sampling_logp_difference reference level (10x: high)", 0.005, min=1e-4),
    _h("sampling_is_band", "importance-sampling ratio mean this far from 1: mismatch", 0.05, min=0.01, max=10.0),
    _h("reward_batch_z", "per reward function: batch-mean z for a shift (medium, 2x high, 4x critical)", 0.5, min=3.0),
    _h("reward_saturation_share", "per reward function: share of scores at a bound", 0.05, min=0.05, max=1.0),
    _h("reward_invalid_high", "per reward function: share of None/NaN scores for high", 0.05, min=0.0, max=1.0),
    _h("reward_drift_psi", "per reward function: PSI excess for a significant drift", 0.05, min=0.01),
    _h("spike_z", "single-step loss/grad_norm z-score for a spike", 1.0, min=1.0),
    _h("grad_norm_factor", "grad_norm / baseline held k of n steps", 0.5, min=1.0),
    _h("loss_persist_z", "loss z-score held k of n steps", 1.0, min=1.0),
    _h("value_loss_factor", "PPO value loss / its level for blow-up", 1.0, min=1.0),
    _h("clip_ratio_high", "clip fraction too high (off-policy only)", 0.05, min=0.0, max=1.0),
    _h("lr_jump_factor", "learning-rate jump factor in one step", 1.0, min=1.0),
    _h("dpo_accuracy_drop", "DPO accuracy drop below its baseline", 0.05, min=0.0, max=1.0),
    _h("dpo_margin_factor", "DPO margin rise in baseline levels", 1.0, min=1.0),
    _h("dpo_pinned_steps", "steps of accuracy 1.0 counted as pinned", 5, min=1),
    _h("dpo_loss_margin", "DPO loss margin around ln 2", 0.01, min=0.0),
    _h("memory_leak_frac", "memory growth over the leak window", 0.01, min=0.0),
    _h("memory_leak_blocks", "leak window in blocks", 1, min=2),
    _h("gpu_frac_high", "device memory fraction: near OOM", 0.01, min=0.0, max=1.0),
    _h("gpu_frac_critical", "device memory fraction: critical", 0.01, min=0.0, max=1.0),
    _h("step_time_factor", "step time / baseline for a regression", 0.1, min=1.0),
]

for _f in dataclasses.fields(Thresholds):
    _FIELD_TYPES[_f.name] = list if _f.name == "muted" else type(_f.default)

_DEFAULTS = Thresholds()
THRESHOLD_FIELDS: list[dict[str, Any]] = []
for _spec in _FIELD_SPECS:
    _spec = dict(_spec)
    _spec["default"] = getattr(_DEFAULTS, _spec["name"])
    _spec["type"] = _FIELD_TYPES[_spec["name"]].__name__
    THRESHOLD_FIELDS.append(_spec)
assert [s["name"] for s in THRESHOLD_FIELDS] == [f.name for f in dataclasses.fields(Thresholds)], (
    "THRESHOLD_FIELDS must list every Thresholds field in order"
)


def read_toml(path: str | Path, what: str) -> dict[str, Any]:
    """A TOML file as a dict; an unreadable file or invalid TOML raises ValueError with one line naming
    `what` ("thresholds file", "config file") and the path."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{what} {path}: not valid TOML ({str(exc).splitlines()[0]})") from None


def load_thresholds(path: str | Path) -> Thresholds:
    """Read a TOML file of settings (top level, or under a [thresholds] table). Missing keys keep defaults;
    unknown keys, wrong types, unreadable or invalid TOML raise ValueError with one clear line."""
    path = Path(path)
    data = read_toml(path, "thresholds file")
    if set(data) == {"thresholds"} and isinstance(data["thresholds"], dict):
        data = data["thresholds"]
    try:
        return Thresholds.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"thresholds file {path}: {exc}") from None


def save_thresholds(th: Thresholds, path: str | Path) -> None:
    """Write all settings as a flat TOML table (round-trips through load_thresholds)."""
    import tomli_w

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        tomli_w.dump(th.to_dict(), fh)
