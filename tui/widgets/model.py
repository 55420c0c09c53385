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
from rlhf_tui.analysis.report import build_report, run_units
from rlhf_tui.analysis.rollout import TOKENS_PER_S, token_source, tokens_per_second
from rlhf_tui.analysis.store import RunHistory, Store
from rlhf_tui.analysis.trends import eval_gap_series, summarise
from rlhf_tui.bridge.wire.metrics import metric_units
from rlhf_tui.tui.view import bucket_means, spark_marker

# Rows the monitor derives from logged metrics (not in the store, not judged by the detectors; tokens/s:
# analysis/rollout.py):
GAP_SUFFIX = ": eval−train"  # "loss: eval−train", the overfitting signal (trends.eval_gap_series)
GAP_METRICS = ("loss",)  # the pairs that get a row in the Metrics pane (every pair is in the report's eval_pairs)


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


def _same_values(run: RunHistory):
    def same(a: str, b: str) -> bool:
        return bool(np.array_equal(run.values(a), run.values(b), equal_nan=True))

    return same


def run_metric_units(run: RunHistory) -> dict[str, str]:
    """{metric: "per token" | "per sequence"} for the run's KL and entropy metrics (bridge/wire/metrics.py): from
    the keys logged, the trainer and the units the training side recorded."""
    names = run.metric_names()
    return metric_units(run.meta.get("trainer"), names, same=_same_values(run), recorded=run_units(run))


def derived_series(run: RunHistory, name: str) -> np.ndarray | None:
    """The row-aligned values of a derived row (`loss: eval−train`, `tokens/s`), None for any other name."""
    if name == TOKENS_PER_S:
        return tokens_per_second(run)
    if name.endswith(GAP_SUFFIX) and name not in run.columns:
        train = name[: -len(GAP_SUFFIX)]
        if train in run.columns and "eval_" + train in run.columns:
            return eval_gap_series(run.values(train), run.values("eval_" + train))
    return None


def _derived_rows(run: RunHistory, report: dict) -> list[tuple[str, str, bool, np.ndarray]]:
    """(name, anchor, after, values): each derived row and the metric it is shown next to (after it, or before)."""
    out = []
    for train in GAP_METRICS:
        pair = (report.get("eval_pairs") or {}).get(train)
        name = train + GAP_SUFFIX
        values = derived_series(run, name) if pair and name not in report["metrics"] else None
        if values is not None:
            out.append((name, pair["eval"], True, values))
    rate = tokens_per_second(run)  # from the token counts (analysis/rollout.py)
    source = token_source(run)
    if rate is not None and source is not None and np.isfinite(rate).any():
        out.append((TOKENS_PER_S, source, False, rate))
    return out


def _with_derived(run: RunHistory, report: dict) -> dict[str, np.ndarray]:
    """Put the derived rows into report["metrics"] next to their anchors; returns their values by name."""
    rows = _derived_rows(run, report)
    if not rows:
        return {}
    metrics, values = report["metrics"], {}
    before = {anchor: [] for _, anchor, after, _ in rows if not after}
    after = {anchor: [] for _, anchor, is_after, _ in rows if is_after}
    for name, anchor, is_after, series_ in rows:
        data = series_[np.isfinite(series_)]
        entry = {k: (v if k == "trend" else None if v is None else float(v)) for k, v in summarise(data).items()}
        entry.update(count=int(data.size), derived=True)
        (after if is_after else before)[anchor].append((name, entry))
        values[name] = series_
    ordered: dict[str, dict] = {}
    for name, entry in metrics.items():
        ordered.update(before.get(name, []))
        ordered[name] = entry
        ordered.update(after.get(name, []))
    report["metrics"] = ordered
    return values


def complete_units(report: dict, run: RunHistory | None) -> dict:
    """report["run"]["units"] from everything known (recorded, trainer, keys) and each metric's "unit"."""
    if run is None:
        return report
    units = run_metric_units(run)
    report["run"]["units"] = {k: units[k] for k in ("kl", "entropy") if k in units}
    for name, entry in (report.get("metrics") or {}).items():
        entry["unit"] = units.get(name)
    return report


def split_units(series: list[dict]) -> tuple[list[dict], list[dict]]:
    """An overlay never mixes units: the series whose known unit differs from the reference one (the active
    tab's, else the first known) are left out. Series of unknown unit stay (nothing says they differ)."""
    reference = next((s.get("unit") for s in series if s.get("active") and s.get("unit")), None)
    reference = reference or next((s.get("unit") for s in series if s.get("unit")), None)
    kept = [s for s in series if not s.get("unit") or s.get("unit") == reference]
    return kept, [s for s in series if s.get("unit") and s.get("unit") != reference]


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
    derived = _with_derived(run, report)
    complete_units(report, run)
    banded = band_metrics(list(report["metrics"]))
    for name, entry in report["metrics"].items():
        values = derived.get(name)
        if values is None:
            values = run.values(name)
        buckets = bucket_means(values, spark_width)
        entry["buckets"] = buckets.tolist()
        judged = name in banded and name not in derived and thresholds is not None
        entry["band"] = zscore_band(values, thresholds, name) if judged else None
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
    """(steps, values) copies of one metric's finite points (a derived row's too), for charts."""
    values = derived_series(run, name)
    if values is None:
        values = run.values(name)
    mask = np.isfinite(values)
    return run.steps[mask].copy(), values[mask].copy()


def anomaly_key(a: dict[str, Any]) -> str:
    return f"{a.get('detector')}|{a.get('metric')}|{a.get('step')}"
