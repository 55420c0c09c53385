"""The plain data the panes receive: a report dict built from a Store (the same dict `rlhf-tui report` renders)
plus what only a screen needs (sparklines at the pane's width, each metric's threshold band, the step picked in
the anomaly feed). Pure numpy + stdlib: no Textual here, so the headless report can use it too.

Callers hold `store.lock` while building (it reads the store's arrays); everything returned is a copy.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import numpy as np

from rlhf_tui.analysis.detectors import band_metrics, zscore_band
from rlhf_tui.analysis.report import build_report
from rlhf_tui.analysis.store import RunHistory, Store
from rlhf_tui.tui.view import bucket_means, spark_marker


def _row_of_step(run: RunHistory, step: int | None) -> int | None:
    if step is None or not run.rows:
        return None
    idx = int(np.searchsorted(run.steps, step, side="right")) - 1
    return idx if idx >= 0 else None


def active_metrics(anomalies: list[dict], at_step: int | None = None) -> set[str]:
    """Metrics with an anomaly in progress (at `at_step` when given, else ongoing now)."""
    out = set()
    for a in anomalies:
        if at_step is None:
            if a.get("ongoing"):
                out.add(a.get("metric"))
        else:
            first = a.get("first_step", a.get("step"))
            last = a.get("last_step", first)
            if isinstance(first, int) and isinstance(last, int) and first <= at_step <= last:
                out.add(a.get("metric"))
    return out


KEEP_LOW = 1000  # the monitor keeps the newest low-severity episodes ...
KEEP_OTHER = 2000  # ... and the newest medium+ ones (ongoing ones always); the counts stay exact


def view_report(
    store: Store,
    thresholds=None,
    *,
    run_id: str | None = None,
    anomalies: list | None = None,
    spark_width: int = 24,
    at_step: int | None = None,
    anomaly_counts: dict | None = None,
) -> dict:
    """`build_report` plus per-metric `band`, a sparkline `spark_width` wide, `at` (value at `at_step`) and
    `marker` (which sparkline character is `at_step`), and `active` (an anomaly in progress)."""
    report = build_report(store, thresholds, run_id=run_id, anomalies=anomalies)
    run = store.runs.get(run_id) if run_id else store.current_run
    report["at_step"] = at_step
    if anomaly_counts is not None:  # the detection pass's exact counts, plus the reward-function episodes
        counts = dict(anomaly_counts)
        rewards = report.get("rewards") or {}
        for e in rewards.get("anomalies") or [] if "functions" in rewards else []:
            counts[e["severity"]] = counts.get(e["severity"], 0) + 1
        report["anomaly_counts"] = counts
    report["stale_since"] = store.stale_since
    if run is not None:
        report["run"]["max_steps"] = run.meta.get("max_steps")
        if run.last_step_time is not None:  # monotonic → wall clock, for "no new step since …"
            report["last_step_wall"] = time.time() - (time.monotonic() - run.last_step_time)
    report["thresholds"] = {
        "anomaly_threshold": getattr(thresholds, "anomaly_threshold", 4.0),
        "muted": list(getattr(thresholds, "muted", []) or []),
    }
    if run is None:
        return report
    row = _row_of_step(run, at_step)
    active = active_metrics(report["anomalies"], at_step)
    banded = band_metrics(list(report["metrics"]))
    for name, entry in report["metrics"].items():
        values = run.values(name)
        buckets = bucket_means(values, spark_width)
        entry["buckets"] = buckets.tolist()
        entry["band"] = zscore_band(values, thresholds, name) if name in banded and thresholds is not None else None
        entry["active"] = name in active
        if row is not None:
            v = float(values[row]) if row < values.size else math.nan
            entry["at"] = v if math.isfinite(v) else None
            entry["marker"] = spark_marker(values, spark_width, row)
        last = entry.get("at") if row is not None else entry.get("last")
        band = entry["band"]
        entry["out_of_band"] = bool(band and last is not None and not band[0] <= last <= band[1])
    return report


def filter_metrics(names: list[str], pattern: str) -> tuple[list[str], str | None]:
    """Names matching a case-insensitive regular expression; (all names, error) when it does not compile."""
    if not pattern:
        return names, None
    try:
        rx = re.compile(pattern, re.IGNORECASE)
    except re.error as exc:
        return names, str(exc)
    return [n for n in names if rx.search(n)], None


def series(run: RunHistory, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) copies of one metric's finite points, for charts."""
    values = run.values(name)
    mask = np.isfinite(values)
    return run.steps[mask].copy(), values[mask].copy()


def anomaly_key(a: dict[str, Any]) -> str:
    return f"{a.get('detector')}|{a.get('metric')}|{a.get('step')}"
