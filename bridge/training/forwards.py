"""Forwards, both ways: what a non-main rank sends the main process (system samples, reward batches) and what
the main process takes of them (docs/protocol.md, "Many ranks, one address"; docs/security.md, "Forwarded samples").

A rank's reward batch is cut to fit one forward (`fit_reward`: at most MAX_FORWARD_BYTES, the newest step's
samples kept first). The main process (`ForwardIntake`) takes a forward only with the run's token, only for a
rank of this job, within a rate per rank that nothing a peer sends can move, and keeps only the fields it knows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from rlhf_tui.bridge.training import run_token
from rlhf_tui.bridge.wire import protocol

FORWARD_MIN_S = 0.1  # at most 10 forwarded system samples a second per rank
REWARD_RATE = 10.0  # reward forwards a second per rank, sustained (a rank sends ~2 per reward function) ...
REWARD_BURST = 30.0  # ... and at once (a rank's retry queue, sent when the main process comes up)
DEFAULT_FORWARD_RANKS = 64  # ranks 1..63 may forward when the job's world size is not known
MAX_FORWARD_GPUS = 16  # devices kept of a forwarded sample
MAX_FORWARD_BYTES = protocol.MAX_INBOUND_BYTES  # one forward frame (the main's socket refuses larger ones)
FRAME_RESERVE = 512  # of those, left for the envelope around the data: the token (<= 256), ts, rank
MAX_REWARD_SCORES = 4096
MAX_REWARD_SAMPLES = 256
FORWARDED_KINDS = frozenset({protocol.SYSTEM, protocol.REWARD})

_SAMPLE_FIELDS: dict[str, tuple[type, ...]] = {
    "label": (str,),
    "prompt": (str,),
    "completion": (str,),
    "index": (int,),
    "length": (int,),
    "step": (int,),
    "score": (float, int, str, type(None)),
    "truncated": (bool,),
    "clipped": (bool,),
}


def _size(data: dict) -> int:
    return len(protocol.dumps(protocol.to_json_safe(data)))


def _clip_completion(sample: dict, room: int) -> dict | None:
    """`sample` with its completion (then its prompt) shortened so it encodes in `room` bytes, or None."""
    out = dict(sample, clipped=True)
    for key in ("completion", "prompt"):
        text = str(out.get(key) or "")
        while text and _size(out) > room:
            over = _size(out) - room
            text = text[: max(0, len(text) - over)]  # a character is at least a byte: never cut too much
            out[key] = text
        if _size(out) <= room:
            return out
    return None


def fit_reward(data: dict, budget: int = MAX_FORWARD_BYTES - FRAME_RESERVE) -> tuple[dict | None, int, int]:
    """`data` (one reward message, JSON-safe) cut to encode within `budget` bytes: (data or None when even its
    newest batch's scores do not fit, samples cut or clipped, batches left out). The oldest batches of a gathered
    message go first, then samples of the oldest steps; a sample that does not fit whole is clipped."""
    if _size(data) <= budget:
        return data, 0, 0
    samples = [s for s in data.get("samples") or [] if isinstance(s, dict)]
    base = dict(data, samples=[])
    steps, sizes = base.get("steps"), base.get("sizes")
    batches_cut = 0
    if isinstance(steps, list) and isinstance(sizes, list) and len(steps) == len(sizes):
        steps, sizes, scores = list(steps), list(sizes), list(base.get("scores") or [])
        while _size(base) > budget and len(steps) > 1:
            scores = scores[sizes[0] :]
            steps, sizes = steps[1:], sizes[1:]
            batches_cut += 1
            base.update(steps=steps, sizes=sizes, scores=scores, num_scores=sum(sizes))
    if _size(base) > budget:
        return None, len(samples), batches_cut + 1
    room = budget - _size(base)
    first = base.get("steps")[0] if isinstance(base.get("steps"), list) and base.get("steps") else None
    newest_first = sorted(range(len(samples)), key=lambda i: -_step_of(samples[i]))
    kept: dict[int, dict] = {}
    for i in newest_first:
        sample = samples[i]
        if first is not None and _step_of(sample) < first:
            continue  # its batch was left out
        need = _size(sample) + 1  # and a comma
        if need > room:
            clipped = _clip_completion(sample, room - 1) if room > 64 else None
            if clipped is None:
                continue
            sample, need = clipped, _size(clipped) + 1
        kept[i] = sample
        room -= need
    base["samples"] = [kept[i] for i in sorted(kept)]
    cut = len(samples) - sum(1 for i, s in kept.items() if s is samples[i])
    return base, cut, batches_cut


def _step_of(sample: dict) -> int:
    step = sample.get("step")
    return step if type(step) is int else -1


def _count(value: Any, high: int = protocol.MAX_SEQ) -> bool:
    return type(value) is int and 0 <= value <= high


def _number(value: Any) -> bool:
    return type(value) in (float, int, type(None)) or (type(value) is str and value in protocol.NON_FINITE)


def reward_batch(data: Any, rank: int) -> dict | None:
    """The fields of a forwarded reward message the main process keeps (checked, the sender's `rank` set from
    the envelope, never from the data), or None when it is not one."""
    if not isinstance(data, dict):
        return None
    name, step, scores = data.get("reward_func"), data.get("step"), data.get("scores")
    if type(name) is not str or not 0 < len(name) <= 200 or not _count(step):
        return None
    if type(scores) is not list or len(scores) > MAX_REWARD_SCORES or not all(map(_number, scores)):
        return None
    out: dict[str, Any] = {"step": step, "reward_func": name, "scores": scores, "rank": rank}
    steps, sizes = data.get("steps"), data.get("sizes")
    if (
        type(steps) is list
        and type(sizes) is list
        and 0 < len(steps) == len(sizes)
        and all(map(_count, steps + sizes))
        and sum(sizes) == len(scores)
    ):
        out.update(steps=steps, sizes=sizes)
    num = data.get("num_scores")
    out["num_scores"] = num if _count(num) and num >= len(scores) else len(scores)
    out["num_invalid"] = sum(1 for s in scores if type(s) not in (int, float) or not math.isfinite(s))
    samples = data.get("samples")
    kept = []
    for sample in samples[:MAX_REWARD_SAMPLES] if type(samples) is list else []:
        if isinstance(sample, dict):
            clean = {k: v for k, v in sample.items() if k in _SAMPLE_FIELDS and type(v) in _SAMPLE_FIELDS[k]}
            if clean:
                kept.append(clean)
    out["samples"] = kept
    return out


class ForwardIntake:
    """The main process's side: `take(env, now)` gives the messages to publish for one `forward` envelope
    (through `sink`, which logs them: the recorder) or none, counting in `stats` what it refuses."""

    def __init__(
        self,
        token: str | None,
        world_size: int | None,
        stats: dict,
        sink: Callable[[str, dict, int], Iterable[tuple]] | None = None,
    ):
        self.token = token  # None: forwards are taken from nobody
        self.ranks = world_size if type(world_size) is int and world_size >= 1 else DEFAULT_FORWARD_RANKS
        self.stats = stats
        self.sink = sink
        self._system_last: dict[int, float] = {}
        self._reward_bucket: dict[int, tuple[float, float]] = {}  # rank -> (tokens, when)
        for key in ("forwarded", "forwarded_rewards", "rejected"):
            stats.setdefault(key, 0)

    def take(self, env: dict, now: float) -> Iterable[tuple]:
        # Any local process can connect, so only with the run's token, only for a rank of this job, and within
        # a rate per rank kept here (a peer's data has no say in it).
        rank, data = env.get("rank", 0), env["data"]
        kind, payload = data.get("kind"), data.get("data")
        if (
            not run_token.matches(self.token, data.get("token"))
            or kind not in FORWARDED_KINDS
            or not isinstance(payload, dict)
            or type(rank) is not int
            or not 1 <= rank < self.ranks
        ):
            return self._reject()
        if kind == protocol.SYSTEM:
            if now - self._system_last.get(rank, -math.inf) < FORWARD_MIN_S:
                return self._reject()  # a rank may not flood the history
            self._system_last[rank] = now
            gpus = payload.get("gpus")
            if isinstance(gpus, list) and len(gpus) > MAX_FORWARD_GPUS:
                payload["gpus"] = gpus[:MAX_FORWARD_GPUS]
            payload["rank"] = rank
        else:
            payload = reward_batch(payload, rank)
            tokens, when = self._reward_bucket.get(rank, (REWARD_BURST, now))
            tokens = min(REWARD_BURST, tokens + (now - when) * REWARD_RATE)
            self._reward_bucket[rank] = (tokens, now)
            if payload is None or tokens < 1.0:
                return self._reject()
            self._reward_bucket[rank] = (tokens - 1.0, now)
            self.stats["forwarded_rewards"] += 1
        self.stats["forwarded"] += 1
        return self.sink(kind, payload, rank) if self.sink is not None else [(kind, payload, rank)]

    def _reject(self) -> list:
        self.stats["rejected"] += 1
        return []
