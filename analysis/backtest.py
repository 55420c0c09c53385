"""Back-testing a threshold set on recorded runs: per detector, on how many runs it would have alarmed and where.

A team runs it on its past healthy runs to estimate the false-alarm rate of a setting before trusting it (and on
runs with a known fault to see it caught). The same engine as the monitor and the training side (`detect`), so
a run alarmed here is a run the monitor would have alarmed on. Pure numpy + stdlib; `tui/backtest.py` draws it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from rlhf_tui.analysis.detectors import REGISTRY, detect
from rlhf_tui.analysis.severity import Severity
from rlhf_tui.analysis.store import RunHistory
from rlhf_tui.analysis.thresholds import Thresholds

DEFAULT_LEVEL = "medium"


def alarm_start(episode: dict, level: Severity) -> tuple[int, str] | None:
    """(step, severity) where an episode first reached `level` or worse, None if it never did."""
    worst = Severity.from_name(episode.get("severity"))
    if worst is None or worst < level:
        return None
    first = episode.get("first_step", episode.get("step"))
    reached = episode.get("severity_steps") or {}
    at: list[tuple[int, Severity]] = []
    for name, step in reached.items():
        sev = Severity.from_name(name)
        if sev is not None and sev >= level and isinstance(step, int):
            at.append((step, sev))
    if not at:  # an episode without the per-level steps (e.g. folded from the wire): its start and severity
        return (first if isinstance(first, int) else -1), str(worst)
    step = min(s for s, _ in at)
    return step, str(max(sev for s, sev in at if s == step))


def _changed(th: Thresholds) -> dict[str, Any]:
    """The settings that differ from the defaults."""
    default = Thresholds().to_dict()
    return {k: v for k, v in th.to_dict().items() if default.get(k) != v}


def run_alarms(name: str, run: RunHistory, thresholds: Thresholds, level: Severity) -> dict[str, Any]:
    """One run's alarms at `level`+: its first alarm, and per detector the first alarm, worst severity and count."""
    by_detector: dict[str, dict[str, Any]] = {}
    for episode in detect(run, thresholds) if run.rows else []:
        start = alarm_start(episode, level)
        if start is None:
            continue
        step, severity = start
        detector = str(episode.get("detector"))
        hit = by_detector.get(detector)
        if hit is None:
            hit = by_detector[detector] = {"run": name, "episodes": 0, "worst": severity, "first_step": step}
            hit.update(metric=episode.get("metric"), severity=severity)
        hit["episodes"] += 1
        if Severity.at_least(severity, hit["worst"]):
            hit["worst"] = severity
        if step < hit["first_step"]:
            hit.update(first_step=step, metric=episode.get("metric"), severity=severity)
    first = min(by_detector.items(), key=lambda kv: kv[1]["first_step"], default=None)
    return {
        "run": name,
        "run_id": run.run_id,
        "trainer": run.trainer,
        "steps": run.rows,
        "last_step": run.last_step,
        "alarmed": bool(by_detector),
        "first_alarm": {"detector": first[0], **first[1]} if first else None,
        "detectors": by_detector,
    }


def backtest(
    runs: Sequence[tuple[str, RunHistory]],
    thresholds: Thresholds | None = None,
    level: Any = DEFAULT_LEVEL,
    detectors: Iterable[str] | None = None,
) -> dict[str, Any]:
    """Per detector (every one in the registry, or `detectors`), the runs it would have alarmed on at `level` or
    worse, with the run's first alarm step, its severity there, the worst it reached and how many episodes.

    Detectors are sorted by how many runs they alarmed on (most first), then in registry order."""
    th = thresholds or Thresholds()
    lvl = Severity.from_name(level)
    if lvl is None:
        raise ValueError(f"unknown level {level!r}: expected one of {', '.join(Severity.names())}")
    per_run = [run_alarms(name, run, th, lvl) for name, run in runs]
    names = list(detectors) if detectors is not None else list(REGISTRY)
    for r in per_run:  # a detector not in the registry (a newer training side): still counted
        names += [d for d in r["detectors"] if d not in names]
    total = len(per_run)
    table: list[dict[str, Any]] = []
    for order, detector in enumerate(names):
        alarms = [r["detectors"][detector] for r in per_run if detector in r["detectors"]]
        record = REGISTRY.get(detector)
        table.append(
            {
                "detector": detector,
                "means": record.means if record is not None else "",
                "muted": th.is_muted(detector),
                "runs_alarmed": len(alarms),
                "rate": len(alarms) / total if total else 0.0,
                "alarms": [
                    {k: a[k] for k in ("run", "first_step", "metric", "severity", "worst", "episodes")} for a in alarms
                ],
                "_order": order,
            }
        )
    table.sort(key=lambda d: (-d["runs_alarmed"], d["_order"]))
    for d in table:
        del d["_order"]
    alarmed = sum(r["alarmed"] for r in per_run)
    return {
        "level": str(lvl),
        "thresholds": _changed(th),
        "total_runs": total,
        "runs_alarmed": alarmed,
        "rate": alarmed / total if total else 0.0,
        "detectors": table,
        "runs": [{k: v for k, v in r.items() if k != "detectors"} for r in per_run],
    }
