"""The report's `rewards` section, from a run's reward streams: the combined reliability (CONTRACT.md's
`reliability_metrics`), one entry per reward function under `functions`, the combined view under `combined`, and
the reward episodes under `anomalies` (the same episodes the report's top-level `anomalies` holds). The
monitor judges the scores itself: the training side's `analysis` of a reward message is not used.
"""

from __future__ import annotations

from typing import Any

from rlhf_tui.analysis.plain_json import finite_number
from rlhf_tui.analysis.reward_episodes import reward_episodes, severity_counts
from rlhf_tui.analysis.store import RunHistory

RELIABILITY_KEYS = ("stability", "consistency", "variance", "mean_reward")


def run_reward_episodes(run: RunHistory, thresholds=None) -> list[dict]:
    """The run's reward-function anomaly episodes (empty when no batch reached the streams)."""
    if not run.reward_streams.streams:
        return []
    return reward_episodes(run.reward_streams, thresholds, run.last_step)


def rewards_section(run: RunHistory, episodes: list[dict]) -> dict[str, Any]:
    streams = run.reward_streams
    if not streams.streams:
        return {"reliability_metrics": dict.fromkeys(RELIABILITY_KEYS), "batches": 0, "anomalies": []}
    args = run.meta.get("args")
    summary = streams.summary(_hashable(args.get("reward_weights")) if isinstance(args, dict) else None)
    functions, combined = summary["functions"], summary["combined"]
    for name, entry in functions.items():
        mine = [e for e in episodes if e["metric"].startswith(f"rewards/{name}/")]
        entry["anomaly_counts"] = severity_counts(mine)
    names = list(functions)
    if len(names) == 1:
        only = functions[names[0]]
        rel = only["reliability_metrics"]
        extra = {"drift": only["drift"], "saturation": only["saturation"], "histogram": only["histogram"]}
    else:
        view = combined.get("reliability_metrics") or {}
        rel = {
            "stability": view.get("stability"),
            "consistency": view.get("consistency"),
            "variance": combined.get("variance"),
            "mean_reward": combined.get("mean_reward"),
        }
        extra = {"histogram": combined.get("histogram")}
    recommendations: list[str] = []
    for e in episodes:
        recommendations.append(e["recommendation"])
    for entry in functions.values():
        recommendations.extend(entry.get("recommendations") or [])
    out: dict[str, Any] = {
        "reliability_metrics": {k: finite_number(rel.get(k)) for k in RELIABILITY_KEYS},
        "batches": streams.batches(),
        **extra,
        "anomalies": episodes,
        "recommendations": list(dict.fromkeys(recommendations)),
        "num_invalid": sum(int(f.get("num_invalid") or 0) for f in functions.values()),
        "functions": functions,
        "combined": combined,
    }
    if run.rewards:
        out["samples"], out["last_step"] = newest_samples(run.rewards)
    return out


PANE_SAMPLES = 6  # samples the Rewards pane shows from several ranks in all (at least one a rank)


def _rank(batch: dict) -> int | None:
    rank = batch.get("rank")
    return rank if type(rank) is int else None


def newest_samples(rewards: Any) -> tuple[list[dict], Any]:
    """(samples, step) of the newest batch with texts (only the first wrapped function's batches carry them).
    A batch with a `rank` (a run of several processes) brings each other rank's newest batch with texts too,
    its samples tagged with their `rank` (PANE_SAMPLES shared between the ranks)."""
    newest = next((b for b in reversed(rewards) if b.get("samples")), rewards[-1])
    if _rank(newest) is None:
        return list(newest.get("samples") or []), newest.get("step")
    per_rank: dict[int, dict] = {}
    for batch in reversed(rewards):  # newest first (bounded: the store keeps the newest 256 batches)
        rank = _rank(batch)
        if rank is not None and rank not in per_rank and batch.get("samples"):
            per_rank[rank] = batch
    share = max(1, PANE_SAMPLES // max(1, len(per_rank)))
    samples = [dict(s, rank=r) for r in sorted(per_rank) for s in per_rank[r]["samples"][:share]]
    return samples, newest.get("step")


def _hashable(weights: Any) -> tuple | None:
    return tuple(weights) if isinstance(weights, list) and all(isinstance(w, (int, float)) for w in weights) else None
