"""Before/after summary of a faulty run's metrics: is the injected fault visible in what was logged?

Windows are counted in logged entries (`W = 20`), so a run logged every 2 steps compares 40 steps each side:

* `before`: the last W entries with `step <= onset`;
* `after`: the first W entries with `step > onset` (sudden faults), or the first W entries after the ramp
  has reached full strength, `step > onset + ramp` (gradual faults; clipped to the run's last W entries);
* `last20_vs_before`: the same `before` against the run's last W entries.

Per metric: the two means, the relative change `(after - before) / |before|`, a Welch t statistic and the count
of NaN/null values in each window. `visible_metrics`: a change of at least 25 % with |t| >= 3, or more NaN/null
values after than before; `visible_metrics_rel25`: the 25 % rule alone. `expected_visible` says whether the
metric the fault is meant to move (`EXPECTED`) is among `visible_metrics`.
"""

from __future__ import annotations

import math
from typing import Any

W = 20
SKIP = {"step", "epoch", "num_tokens", "step_time", "train_runtime", "total_flos"}
# The metric each fault must move; a prefix ends with "/" and matches any key under it.
EXPECTED: dict[str, tuple[str, ...]] = {
    "lr_spike": ("grad_norm", "loss", "entropy", "kl", "reward", "learning_rate", "rewards/", "logps/"),
    "grad_explosion": ("grad_norm",),
    "reward_nan": ("reward", "reward_std", "rewards/"),
    "reward_scale": ("reward", "reward_std", "rewards/"),
    "dead_reward": ("rewards/",),
    "label_flip": ("rewards/accuracies", "rewards/margins", "loss"),
    "reward_drift": ("rewards/",),
    "length_exploit": ("completions/mean_length",),
    "entropy_collapse": ("entropy",),
    "kl_runaway": ("kl",),
}


def _r(x: float | None, nd: int = 6) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{nd}g}")


def _stats(values: list[float]) -> tuple[float, float, int]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, var, n


def _column(rows: list[dict], key: str) -> tuple[list[float], int]:
    vals, bad = [], 0
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            vals.append(float(v))
        elif key in r:
            bad += 1
    return vals, bad


def compare(before: list[dict], after: list[dict], full: bool = True) -> dict[str, dict[str, Any]]:
    keys = sorted({k for r in before + after for k in r if k not in SKIP})
    out: dict[str, dict[str, Any]] = {}
    for key in keys:
        b, nb = _column(before, key)
        a, na = _column(after, key)
        if not b and not a:
            if nb or na:
                out[key] = {"before": None, "after": None, "nan_before": nb, "nan_after": na}
            continue
        mb, vb, n_b = _stats(b) if b else (math.nan, 0.0, 0)
        ma, va, n_a = _stats(a) if a else (math.nan, 0.0, 0)
        rel = (ma - mb) / abs(mb) if b and a and mb != 0 else (0.0 if ma == mb else math.inf)
        entry: dict[str, Any] = {"before": _r(mb), "after": _r(ma), "rel_change": _r(rel)}
        if full:
            se = math.sqrt(vb / max(n_b, 1) + va / max(n_a, 1))
            t = (ma - mb) / se if se > 0 else (0.0 if ma == mb else math.inf)
            entry.update({"t": _r(t), "nan_before": nb, "nan_after": na})
            entry["_visible"] = bool(b and a and abs(rel) >= 0.25 and abs(t) >= 3) or na > nb
            entry["_rel25"] = bool(b and a and abs(rel) >= 0.25)
        out[key] = entry
    return out


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
    return any(key.startswith(p) if p.endswith("/") else key == p for p in patterns)


def effect(log_history: list[dict], fault: str, onset: int, ramp: int = 0) -> dict[str, Any]:
    rows = [r for r in log_history if "train_runtime" not in r and "step" in r]
    before = [r for r in rows if r["step"] <= onset][-W:]
    start = onset + (ramp if ramp > 0 else 0)
    after = [r for r in rows if r["step"] > start][:W]
    if len(after) < W:
        after = [r for r in rows if r["step"] > onset][-W:]
    metrics = compare(before, after)
    visible = [k for k, m in metrics.items() if m.pop("_visible", False)]
    rel25 = [k for k, m in metrics.items() if m.pop("_rel25", False)]
    last = compare(before, [r for r in rows if r["step"] > onset][-W:], full=False)
    return {
        "window": W,
        "before_steps": [before[0]["step"], before[-1]["step"]] if before else None,
        "after_steps": [after[0]["step"], after[-1]["step"]] if after else None,
        "metrics": metrics,
        "visible_metrics": visible,
        "visible_metrics_rel25": rel25,
        "expected_visible": any(_matches(k, EXPECTED.get(fault, ())) for k in visible),
        "last20_vs_before": last,
    }
