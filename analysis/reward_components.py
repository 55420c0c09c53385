"""The report's blocks about what the policy writes and how it is scored: `reward_components` (each reward
function as a part of the total: mean, spread, share of the total's variance, correlation with the others,
`dead` and `dominating`), `groups` (the prompt groups' zero-spread split, analysis/groups.py, with a word) and
`completions` (the newest steps' kept samples from the completions buffer, analysis/samples.py).

A component is **dead** when its scores had no spread (max − min ≤ 1e-9 of its scale) in each of its newest
`DEAD_BATCHES` batches: it tells no completion from another. It is **dominating** when its share of the total's
variance is at least `DOMINATING_SHARE` while another component still varies: the total is, in effect, that one
function. Pure numpy + stdlib.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from rlhf_tui.analysis.groups import METRICS as GROUP_METRICS
from rlhf_tui.analysis.plain_json import finite_number
from rlhf_tui.analysis.reward_streams import RewardStream

DEAD_BATCHES = 4  # newest batches of a function that must all be flat for it to count as dead
DOMINATING_SHARE = 0.9  # share of the total's variance at or above which one function is the total
GROUP_STEPS = 5  # newest steps the groups' word is judged on
GROUP_WORD_SHARE = 0.5  # mean share of groups over those steps that makes the word
COMPLETION_STEPS = 3  # newest steps with samples the report lists
COMPLETION_CHARS = 2000  # characters of a prompt or completion the report keeps


def is_dead(stream: RewardStream, batches: int = DEAD_BATCHES) -> bool:
    """Every one of the newest `batches` batches (fewer when the stream has fewer, at least 2) had one score."""
    table = stream.table
    if table.rows < 2:
        return False
    std, mean, valid = (table.column(c)[-batches:] for c in ("std", "mean", "n_valid"))
    if not (np.isfinite(std).all() and (valid >= 2).all()):
        return False
    scale = max(1.0, float(np.max(np.abs(mean))))
    return bool((std <= 1e-9 * scale).all())


def reward_components(streams: Any, functions: dict[str, dict]) -> dict[str, dict]:
    """{function: {mean, std, share, correlation, dead, dominating}} from the streams and their summary's
    `functions` (reward_streams.RewardStreams.summary)."""
    dead = {name: is_dead(streams.streams[name]) for name in functions if name in streams.streams}
    out: dict[str, dict] = {}
    for name, f in functions.items():
        share = finite_number(f.get("share"))
        others_vary = any(not d for other, d in dead.items() if other != name)
        out[name] = {
            "mean": finite_number(f.get("mean")),
            "std": finite_number(f.get("std")),
            "share": share,
            "correlation": {k: finite_number(v) for k, v in (f.get("correlation") or {}).items()},
            "dead": dead.get(name, False),
            "dominating": len(functions) >= 2
            and not dead.get(name, False)
            and others_vary
            and share is not None
            and share >= DOMINATING_SHARE,
        }
    return out


def groups_section(run: Any) -> dict[str, Any]:
    """The prompt groups' split: the newest value and the mean over the newest GROUP_STEPS steps of each
    `groups/*` metric, and `word`: "too easy" / "too hard" when that share of groups averages at least
    GROUP_WORD_SHARE, "no signal" when the other equal groups do, else "ok"; None without the metrics."""
    names = set(run.metric_names())
    if not any(m in names for m in GROUP_METRICS):
        return {"word": None, "steps": 0}
    out: dict[str, Any] = {}
    logged = None
    for metric in GROUP_METRICS:
        values = run.values(metric) if metric in names else np.zeros(0)
        finite = values[np.isfinite(values)]
        key = metric.split("/", 1)[1]
        out[key] = {
            "last": float(finite[-1]) if finite.size else None,
            "recent": float(finite[-GROUP_STEPS:].mean()) if finite.size else None,
        }
        logged = finite.size if logged is None else max(logged, finite.size)
    recent = {k: (out[k]["recent"] or 0.0) for k in ("too_easy", "too_hard", "zero_std_other")}
    word = "ok"
    if recent["too_easy"] >= GROUP_WORD_SHARE:
        word = "too easy"
    elif recent["too_hard"] >= GROUP_WORD_SHARE:
        word = "too hard"
    elif recent["zero_std_other"] >= GROUP_WORD_SHARE:
        word = "no signal"
    out["word"], out["steps"] = word, int(logged or 0)
    return out


def completions_section(run: Any, steps: int = COMPLETION_STEPS) -> list[dict]:
    """The newest `steps` steps' kept samples, newest first: {step, samples: [{index, label, prompt,
    completion, scores, total, advantage, truncated, length, nonfinite}]} (text clipped to COMPLETION_CHARS)."""
    buffer = run.samples
    args = run.meta.get("args")
    args = args if isinstance(args, dict) else {}
    out = []
    for step in reversed(buffer.sample_steps()[-steps:] if steps > 0 else []):
        rows = buffer.rows(step, args.get("num_generations"), args.get("reward_weights"))
        samples = [
            {
                "index": r.get("index"),
                "label": r.get("label"),
                "rank": r.get("rank"),
                "prompt": str(r.get("prompt") or "")[-COMPLETION_CHARS:],
                "completion": str(r.get("completion") or "")[:COMPLETION_CHARS],
                "scores": {k: finite_number(v) for k, v in (r.get("scores") or {}).items()},
                "total": finite_number(r.get("total")),
                "advantage": finite_number(r.get("advantage")),
                "truncated": bool(r.get("truncated")),
                "length": r.get("length"),
                "nonfinite": bool(r.get("nonfinite")),
            }
            for r in rows
        ]
        out.append({"step": step, "samples": samples})
    return out
