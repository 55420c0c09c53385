"""`monitor_rewards`: wrap GRPO/RLOO reward functions so each batch of scores reaches the monitor.

Each batch's scores (and references to its prompts and completions) are queued; the publisher thread gathers
batches and picks a few sample completions (best, worst, one at random; truncated) for those it publishes. The
wrapper keeps `__name__`, so TRL's `rewards/<name>/*` keys do not change, and never raises into the reward.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence
from typing import Any

SAMPLE_CHARS = 300
MAX_SAMPLES = 3  # sample completions published per reward message


def _text(value: Any) -> str:
    """A completion as plain text: conversational completions are lists of {role, content} messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = [m.get("content", "") if isinstance(m, dict) else str(m) for m in value]
        return " ".join(p if isinstance(p, str) else str(p) for p in parts)
    return str(value)


def _samples(prompts: Sequence | None, completions: Sequence | None, scores: Sequence) -> list[dict]:
    if not completions:
        return []
    scored = [(i, s) for i, s in enumerate(scores) if isinstance(s, (int, float)) and math.isfinite(s)]
    picks: list[tuple[str, int]] = []
    if scored:
        picks.append(("best", max(scored, key=lambda x: x[1])[0]))
        picks.append(("worst", min(scored, key=lambda x: x[1])[0]))
    picks.append(("random", random.randrange(len(completions))))
    out, seen = [], set()
    for label, i in picks:
        if i in seen or i >= len(completions):
            continue
        seen.add(i)
        prompt = _text(prompts[i]) if prompts is not None and i < len(prompts) else ""
        score = scores[i] if i < len(scores) else None
        out.append(
            {
                "label": label,
                "score": score,
                "prompt": prompt[-SAMPLE_CHARS:],
                "completion": _text(completions[i])[:SAMPLE_CHARS],
            }
        )
    return out


def _wrap(fn: Callable, cb: Any) -> Callable:
    name = getattr(fn, "__name__", None) or type(fn).__name__

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        scores = fn(*args, **kwargs)
        try:
            if scores is not None:
                prompts = kwargs.get("prompts", args[0] if args else None)
                completions = kwargs.get("completions", args[1] if len(args) > 1 else None)
                state = kwargs.get("trainer_state")
                step_of = getattr(cb, "reward_step", None)  # the step TRL logs this batch under
                step = step_of(state) if callable(step_of) else int(getattr(state, "global_step", 0) or 0)
                values = [None if s is None else float(s) for s in scores]
                cb.log_rewards(step, values, name=name, prompts=prompts, completions=completions)
        except Exception:
            pass  # monitoring must never change what the reward function returns
        return scores

    wrapped.__name__ = name
    return wrapped


def monitor_rewards(reward_funcs: Callable | Sequence[Callable], cb: Any) -> list | Callable:
    """Wrap reward functions (a list, or one function) for `cb`; model ids/paths are passed through
    untouched (TRL logs their `rewards/<name>/*` itself)."""
    if callable(reward_funcs) and not isinstance(reward_funcs, (list, tuple)):
        return _wrap(reward_funcs, cb)
    return [f if isinstance(f, str) or not callable(f) or _is_model(f) else _wrap(f, cb) for f in reward_funcs]


def _is_model(obj: Any) -> bool:
    return hasattr(obj, "config") and hasattr(obj, "forward")
