"""The report: one dict (CONTRACT.md's JSON) built from a Store, shared by `rlhf-tui report`, the TUI's
snapshot key and the TUI panes. Pure numpy + stdlib.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from rlhf_tui.analysis.detectors.episodes import EPISODE_ORDER
from rlhf_tui.analysis.plain_json import finite
from rlhf_tui.analysis.reward_components import completions_section, groups_section, reward_components
from rlhf_tui.analysis.reward_report import rewards_section, run_reward_episodes
from rlhf_tui.analysis.rollout import rollout_section
from rlhf_tui.analysis.severity import Severity
from rlhf_tui.analysis.store import RunHistory, Store, run_status
from rlhf_tui.analysis.workloads import RL, RL_ORDER, eval_pairs, workload_kind
from rlhf_tui.analysis.workloads import ordered_metrics as workload_order

# Display order of an RL run: the canonical names of CONTRACT.md first, then everything else alphabetically (other
# kinds of run put their own block first: analysis/workloads.py).
CANONICAL_ORDER = RL_ORDER


def log_errors(run: RunHistory) -> dict:
    """The training's JSONL log writes that failed (from its heartbeats): a count and the first one's line."""
    status = run.server_status
    return {"count": int(status.get("log_errors") or 0), "first": str(status.get("log_error") or "")}


def ordered_metrics(names, kind: str = RL) -> list[str]:
    return workload_order(names, kind)


severity_at_least = Severity.at_least


def run_anomalies(run: RunHistory, thresholds=None) -> list[dict]:
    """The monitor's own anomaly episodes for a run (same detectors as the training side)."""
    from rlhf_tui.analysis.detectors import detect
    from rlhf_tui.analysis.thresholds import Thresholds

    if run.rows == 0:
        return []
    return detect(run, thresholds or Thresholds())


def run_kind(run: RunHistory) -> str:
    """The kind of run (analysis/workloads.py): from its trainer, else from the keys it logs."""
    return workload_kind(run.meta.get("trainer"), run.metric_names())


def metric_table(run: RunHistory, kind: str | None = None) -> dict[str, dict]:
    from rlhf_tui.analysis.trends import summarise

    out = {}
    for name in ordered_metrics(run.metric_names(), kind or run_kind(run)):
        values = run.values(name)
        ok = np.isfinite(values)
        data = values if ok.all() else values[ok]  # one pass over a long column, one copy at most
        if data.size == 0:
            if run.logged(name).any():
                out[name] = {
                    "last": None,
                    "mean": None,
                    "std": None,
                    "min": None,
                    "max": None,
                    "trend": "stable",
                    "count": 0,
                }
            continue
        summary = summarise(data)
        row: dict[str, Any] = {k: (v if k == "trend" else finite(v)) for k, v in summary.items()}
        row["count"] = int(data.size)
        out[name] = row
    return out


def _checkpoints(run: RunHistory) -> list[dict]:
    out = []
    for c in run.checkpoints:
        drift = c.get("drift")
        out.append(
            {
                "step": c.get("step"),
                "path": c.get("path"),
                "health_score": finite(c.get("health_score")),
                "issues": list(c.get("issues") or []),
                "recommendations": list(c.get("recommendations") or []),
                "drift": finite(drift.get("overall")) if isinstance(drift, dict) else finite(drift),
                "file_size_mb": finite(c.get("file_size_mb")),
                "status": c.get("status"),
            }
        )
    return out


def _system(run: RunHistory) -> dict:
    ranks = []
    for rank in sorted(run.system):
        s = run.system[rank]
        ranks.append(
            {
                "rank": rank,
                "rss_mb": finite(s.get("rss_mb")),
                "gpus": s.get("gpus") or [],
                "gpu_available": bool(s.get("gpu_available")),
            }
        )
    return {"ranks": ranks, "gpu_available": any(r["gpu_available"] for r in ranks)}


def eval_section(run: RunHistory, table: dict[str, dict] | None = None) -> dict[str, dict]:
    """Every eval metric against its training twin (`loss` → {"eval": "eval_loss", train_last, eval_last, gap,
    gap_mean, points, gap_trend, train_trend, eval_trend, better, overfitting}; see trends.eval_pair). `table`:
    the run's metric_table, whose summaries are reused."""
    from rlhf_tui.analysis.trends import eval_pair

    table = table or {}
    out = {}
    for train, evaluated in eval_pairs(run.metric_names()):
        summaries = (table.get(train), table.get(evaluated))
        pair = eval_pair(train, run.values(train), run.values(evaluated), *summaries)
        if pair["points"]:
            out[train] = {"eval": evaluated, **{k: finite(v) if isinstance(v, float) else v for k, v in pair.items()}}
    return out


def run_units(run: RunHistory) -> dict[str, str]:
    """The units the training side recorded for the run's trainer class ({"kl": "per token", ...}); the
    monitor completes them from the keys logged (tui/widgets/model.py)."""
    units = run.meta.get("units")
    if not isinstance(units, dict):
        return {}
    return {k: v for k, v in units.items() if k in ("kl", "entropy") and v in ("per token", "per sequence")}


def run_summary(run: RunHistory) -> dict[str, Any]:
    """The trainer's end-of-run summary (train_loss, train_runtime, train_samples_per_second, total_flos ...;
    from run_end, or a trainer_state.json's last entry): {} while the run has not finished."""
    return {k: v if isinstance(v, str) else finite(v) for k, v in run.summary.items()}


def run_actions(run: RunHistory) -> list[dict[str, Any]]:
    """What the training side did on its alarms (`on_alarm`), oldest first: action, step and why."""
    out = []
    for ep in run.training_anomalies:
        if isinstance(ep, dict) and ep.get("action") in ("save", "stop"):
            out.append(
                {
                    "action": ep["action"],
                    "step": ep.get("action_step"),
                    "detector": ep.get("detector"),
                    "metric": ep.get("metric"),
                    "severity": ep.get("severity"),
                    "reason": ep.get("action_reason") or ep.get("message"),
                }
            )
    return out


def build_report(store: Store, thresholds=None, run_id: str | None = None, anomalies: list | None = None) -> dict:
    """The whole report for one run (default: the current one) as plain JSON-able data."""
    run = store.runs.get(run_id) if run_id else store.current_run
    transport = dict(store.transport)
    if run is None:
        return {
            "run": {"run_id": None, "trainer": None, "kind": RL, "units": {}},
            "steps": 0,
            "last_step": None,
            "metrics": {},
            "anomalies": [],
            "checkpoints": [],
            "rewards": {"reliability_metrics": {}},
            "reward_components": {},
            "groups": {"word": None, "steps": 0},
            "completions": [],
            "rollout": {},
            "eval_pairs": {},
            "summary": {},
            "actions": [],
            "transport": transport,
            "source": store.source,
            "connection": store.connection,
        }
    if anomalies is None:
        anomalies = run_anomalies(run, thresholds)
    rewards = run_reward_episodes(run, thresholds)
    if rewards:  # reward-function episodes are anomalies like any other (feed, reports, --fail-on)
        anomalies = sorted([*anomalies, *rewards], key=EPISODE_ORDER)
    meta = run.meta
    kind = run_kind(run)
    metrics = metric_table(run, kind)
    reward_block = rewards_section(run, rewards)
    return {
        "run": {
            "run_id": run.run_id,
            "trainer": run.trainer,
            "kind": kind,
            "units": run_units(run),
            "model": meta.get("model"),
            "started": meta.get("started"),
            "args": meta.get("args") or {},
            "ended": run.ended is not None,
            "status": run_status(run),
            "error": (run.ended or {}).get("error") if isinstance(run.ended, dict) else None,
            "versions": meta.get("versions") or {},
        },
        "steps": int(run.rows),
        "last_step": run.last_step,
        "metrics": metrics,
        "anomalies": anomalies,
        "checkpoints": _checkpoints(run),
        "rewards": reward_block,
        "reward_components": reward_components(run.reward_streams, reward_block.get("functions") or {}),
        "groups": groups_section(run),
        "completions": completions_section(run),
        "rollout": rollout_section(run, thresholds),
        "system": _system(run),
        "eval_pairs": eval_section(run, metrics),
        "summary": run_summary(run),
        "actions": run_actions(run),
        "transport": transport,
        "rejected_fields": {"count": run.rejected_fields, "recent": list(run.field_rejections)},
        "log_errors": log_errors(run),
        "source": store.source,
        "connection": store.connection,
        "runs": list(store.runs),
        "generated": time.time(),
        "history_thinned_rows": run.thinned,
    }


def worst_severity(anomalies: list[dict]) -> str | None:
    worst = Severity.worst(a.get("severity") for a in anomalies)
    return None if worst is None else str(worst)
