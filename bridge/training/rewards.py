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
from dataclasses import dataclass
from typing import Any

from rlhf_tui.bridge.wire.protocol import to_json_safe

SAMPLE_CHARS = 300  # prompt / completion characters the Rewards pane's few samples keep
MAX_SAMPLES = 3  # samples the Rewards pane shows per reward message (the browser keeps `SampleSetting.per_step`)


@dataclass(frozen=True)
class SampleSetting:
    """How many sample completions of each batch reach the monitor: every one when the batch has at most
    `per_step`, else a stratified pick (best, worst, median, every truncated one, then random ones) of
    `per_step`; each text clipped to `chars` characters and the batch's samples to `max_bytes` (UTF-8)."""

    per_step: int = 16
    max_bytes: int = 32 << 10
    chars: int = 2000


DEFAULT_SETTING = SampleSetting()


def _text(value: Any) -> str:
    """A completion as plain text: conversational completions are lists of {role, content} messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = [m.get("content", "") if isinstance(m, dict) else str(m) for m in value]
        return " ".join(p if isinstance(p, str) else str(p) for p in parts)
    return str(value)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def stratified_indices(
    scores: Sequence, n: int, per_step: int, truncated: Sequence[bool] = ()
) -> list[tuple[str, int]]:
    """(label, index) of the completions to keep from a batch of `n`: best, worst and median first, then all
    the others (label "all") when n <= per_step, else the truncated ones, two non-finite ones and random ones,
    `per_step` in all."""
    per_step = max(1, int(per_step))
    m = min(n, len(scores))
    order = sorted((i for i in range(m) if _finite(scores[i])), key=lambda i: scores[i])
    picks: list[tuple[str, int]] = []
    if order:
        picks += [("best", order[-1]), ("worst", order[0]), ("median", order[len(order) // 2])]
    if n <= per_step:  # every completion is kept: the best, worst and median first, then the others in order
        out, seen = [], set()
        for label, i in picks:
            if i not in seen:
                seen.add(i)
                out.append((label, i))
        return out + [("all", i) for i in range(n) if i not in seen]
    picks += [("truncated", i) for i, t in enumerate(truncated[:n]) if t]
    picks += [("nonfinite", i) for i in range(m) if not _finite(scores[i])][:2]
    rest = list(range(n))
    random.shuffle(rest)
    picks += [("random", i) for i in rest]
    out, seen = [], set()
    for label, i in picks:
        if i not in seen:
            seen.add(i)
            out.append((label, i))
        if len(out) == per_step:
            break
    return out


def _samples(
    prompts: Sequence | None,
    completions: Sequence | None,
    scores: Sequence,
    setting: SampleSetting = DEFAULT_SETTING,
    lengths: Sequence[int] | None = None,
    max_length: int | None = None,
    step: int | None = None,
) -> list[dict]:
    """The kept samples of one batch (see `SampleSetting`), on the publisher thread: `index` is the
    completion's place in the batch (the monitor joins every reward function's score on it), `truncated`
    whether it reached `max_length` tokens. The whole list stays within `setting.max_bytes`."""
    return _picked(prompts, completions, scores, setting, lengths, max_length, step)[0]


def _picked(prompts, completions, scores, setting, lengths, max_length, step) -> tuple[list[dict], list[int]]:
    """`_samples`, JSON-safe, and each sample's `_size` (measured once: the message's bounds read them again)."""
    if not completions:
        return [], []
    n = len(completions)
    lengths = list(lengths or [])[:n]
    truncated = [bool(max_length) and lengths[i] >= max_length if i < len(lengths) else False for i in range(n)]
    step = to_json_safe(step)
    out: list[dict] = []
    sizes: list[int] = []
    budget, chars = max(0, int(setting.max_bytes)), setting.chars
    for label, i in stratified_indices(scores, n, setting.per_step, truncated):
        prompt = _text(prompts[i]) if prompts is not None and i < len(prompts) else ""
        score = scores[i] if i < len(scores) else None
        sample = {
            "label": label,
            "index": i,
            "score": score if type(score) is float and math.isfinite(score) else to_json_safe(score),
            "prompt": prompt[-chars:],
            "completion": _text(completions[i])[:chars],
            "truncated": truncated[i],
        }
        if i < len(lengths):
            sample["length"] = lengths[i]
        if step is not None:
            sample["step"] = step
        size = _size(sample)
        if size > budget:  # clip this one to what is left, then stop
            room = max(0, budget - 64)
            sample["completion"] = sample["completion"].encode("utf-8", "replace")[:room].decode("utf-8", "ignore")
            room -= len(sample["completion"].encode("utf-8"))
            sample["prompt"] = (
                sample["prompt"].encode("utf-8", "replace")[-room:].decode("utf-8", "ignore") if room > 0 else ""
            )
            sample["clipped"] = True
            if sample["completion"] or sample["prompt"]:
                out.append(sample)
                sizes.append(_size(sample))
            break
        budget -= size
        out.append(sample)
        sizes.append(size)
    return out, sizes


MESSAGE_BYTES = 1 << 20  # samples' text in one reward message (the newest steps' kept when more)


def _size(sample: dict) -> int:
    return 64 + len(sample["prompt"].encode("utf-8", "replace")) + len(sample["completion"].encode("utf-8", "replace"))


def batch_samples(batches: Sequence, setting: SampleSetting = DEFAULT_SETTING, max_length: Any = None) -> list[dict]:
    """The samples of every gathered batch (`RewardBatch`es of one function, oldest first), each tagged with
    its step; a step's batches (gradient accumulation) share the step's `setting.max_bytes`, and the message's
    samples stay within MESSAGE_BYTES (the oldest steps' left out). JSON-safe (`protocol.to_json_safe`): the
    samples picked here are made so as they are built (their only value that may need it is the score)."""
    out: list[dict] = []
    sizes: list[int] = []
    used: dict[int, int] = {}
    limit = max_length if isinstance(max_length, int) and max_length > 0 else None
    for batch in batches:
        if batch.samples is not None:
            given = [dict(s, step=s.get("step", batch.step)) for s in batch.samples if isinstance(s, dict)]
            sizes.extend(_size_of(s) for s in given)
            out.extend(to_json_safe(given))
            continue
        left = setting.max_bytes - used.get(batch.step, 0)
        if left <= 64 or not batch.completions:
            continue
        ids = batch.completion_ids
        lengths = [len(x) for x in ids] if isinstance(ids, (list, tuple)) else None
        part, part_sizes = _picked(
            batch.prompts,
            batch.completions,
            batch.scores,
            SampleSetting(setting.per_step, left, setting.chars),
            lengths,
            limit,
            batch.step,
        )
        used[batch.step] = used.get(batch.step, 0) + sum(part_sizes)
        out.extend(part)
        sizes.extend(part_sizes)
    total, keep = 0, len(out)
    while keep and total + sizes[keep - 1] <= MESSAGE_BYTES:
        total += sizes[keep - 1]
        keep -= 1
    return out[keep:]


def _size_of(sample: dict) -> int:
    return _size({"prompt": str(sample.get("prompt") or ""), "completion": str(sample.get("completion") or "")})


def _wrap(fn: Callable, cb: Any, texts: bool = True) -> Callable:
    name = getattr(fn, "__name__", None) or type(fn).__name__

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        scores = fn(*args, **kwargs)
        try:
            if scores is not None:
                prompts = kwargs.get("prompts", args[0] if args else None)
                completions = kwargs.get("completions", args[1] if len(args) > 1 else None)
                ids = kwargs.get("completion_ids") if texts else None
                state = kwargs.get("trainer_state")
                step_of = getattr(cb, "reward_step", None)  # the step TRL logs this batch under
                step = step_of(state) if callable(step_of) else int(getattr(state, "global_step", 0) or 0)
                values = [None if s is None else float(s) for s in scores]
                if not texts:  # one function's batches carry the texts; the monitor joins the others' scores
                    prompts = completions = None
                cb.log_rewards(step, values, name=name, prompts=prompts, completions=completions, completion_ids=ids)
        except Exception:
            pass  # monitoring must never change what the reward function returns
        return scores

    wrapped.__name__ = name
    return wrapped


def monitor_rewards(
    reward_funcs: Callable | Sequence[Callable],
    cb: Any,
    samples: int | None = None,
    sample_bytes: int | None = None,
) -> list | Callable:
    """Wrap reward functions (a list, or one function) for `cb`; model ids/paths are passed through
    untouched (TRL logs their `rewards/<name>/*` itself). `samples`: completions kept per batch (all of a
    smaller batch, else a stratified pick; default 16); `sample_bytes`: their bound per step (default 32 KiB).
    The first wrapped function's batches carry the texts; every function's scores are joined to them."""
    if samples is not None or sample_bytes is not None:
        try:
            cb.sample_setting = SampleSetting(
                max(1, int(samples if samples is not None else DEFAULT_SETTING.per_step)),
                max(256, int(sample_bytes if sample_bytes is not None else DEFAULT_SETTING.max_bytes)),
            )
        except Exception:
            pass
    if callable(reward_funcs) and not isinstance(reward_funcs, (list, tuple)):
        return _wrap(reward_funcs, cb)
    out, first = [], True
    for f in reward_funcs:
        if isinstance(f, str) or not callable(f) or _is_model(f):
            out.append(f)
        else:
            out.append(_wrap(f, cb, texts=first))
            first = False
    return out


def _is_model(obj: Any) -> bool:
    return hasattr(obj, "config") and hasattr(obj, "forward")
