"""The one renderer of a report: Rich renderables, exported as plain text or Markdown.

Used by `rlhf-tui report --format text|markdown` and by the monitor's snapshot key, so both show the same
things: header, metrics with sparklines and trends, anomalies, GPU/system, checkpoints, rewards, transport.
Every string that came from the wire is escaped (no Rich markup, no control sequences).
"""
from __future__ import annotations

import io
import math
import re
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

TREND_ARROWS = {"increasing": "↑", "decreasing": "↓", "stable": "→"}
SEVERITY_STYLE = {"low": "cyan", "medium": "yellow", "high": "bold red", "critical": "bold white on red"}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]|\x1b\[[0-9;?]*[A-Za-z]")


def clean(value: Any, limit: int = 200) -> str:
    """Untrusted text made safe to show: control/escape sequences removed, one line, clipped."""
    text = _CONTROL.sub("", str(value if value is not None else "")).replace("\n", " ").replace("\r", " ")
    return text[:limit] + ("…" if len(text) > limit else "")


def fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Inf" if value > 0 else "-Inf"
        magnitude = abs(value)
        if magnitude != 0 and (magnitude < 1e-3 or magnitude >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def header_text(report: dict) -> Text:
    run = report.get("run") or {}
    parts = [("rlhf-tui", "bold"), "  run ", (clean(run.get("run_id")), "bold cyan"),
             f"  {clean(run.get('trainer'))}"]
    if run.get("model"):
        parts.append(f"  model {clean(run.get('model'), 60)}")
    parts.append(f"  step {fmt(report.get('last_step'))}  ({report.get('steps', 0)} logged)")
    conn = report.get("connection") or ""
    parts.append(f"  [{conn}]")
    return Text.assemble(*parts)


def metrics_table(report: dict, names: list[str] | None = None) -> Table:
    table = Table(title="Metrics", box=box.SIMPLE_HEAD, title_justify="left", expand=False, pad_edge=False)
    for col, justify in (("metric", "left"), ("last", "right"), ("min", "right"), ("max", "right"),
                         ("trend", "center"), ("history", "left")):
        table.add_column(col, justify=justify, no_wrap=True)
    anomalous = {a.get("metric") for a in report.get("anomalies", []) if a.get("ongoing")}
    metrics = report.get("metrics") or {}
    for name in names if names is not None else metrics:
        row = metrics.get(name)
        if row is None:
            continue
        style = "bold red" if name in anomalous else None
        table.add_row(clean(name, 40), fmt(row.get("last")), fmt(row.get("min")), fmt(row.get("max")),
                      TREND_ARROWS.get(row.get("trend"), "?"), row.get("spark") or "", style=style)
    return table


def severity_counts(anomalies: list[dict]) -> str:
    counts: dict[str, int] = {}
    for a in anomalies:
        counts[a.get("severity", "?")] = counts.get(a.get("severity", "?"), 0) + 1
    order = ["critical", "high", "medium", "low"]
    return ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))


def anomalies_table(report: dict, limit: int = 50) -> Table:
    anomalies = list(reversed(report.get("anomalies") or []))  # newest first
    counts = severity_counts(anomalies)
    table = Table(title=f"Anomalies ({len(anomalies)}{': ' + counts if counts else ''})", box=box.SIMPLE_HEAD,
                  title_justify="left", pad_edge=False)
    for col in ("step", "severity", "detector", "metric", "message / recommendation"):
        table.add_column(col, overflow="fold")
    if not anomalies:
        table.add_row("—", "", "", "", "no anomalies")
    for a in anomalies[:limit]:
        sev = a.get("severity", "")
        msg = Text(clean(a.get("message"), 160))
        if a.get("recommendation"):
            msg.append("\n→ " + clean(a.get("recommendation"), 160), style="dim")
        table.add_row(fmt(a.get("step")), Text(sev, style=SEVERITY_STYLE.get(sev, "")), clean(a.get("detector"), 30),
                      clean(a.get("metric"), 40), msg)
    return table


def system_table(report: dict) -> Table:
    table = Table(title="GPU / system", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for col in ("rank", "device", "used / total", "peak", "util", "RSS"):
        table.add_column(col)
    system = report.get("system") or {}
    ranks = system.get("ranks") or []
    if not ranks:
        table.add_row("—", "no system samples yet", "", "", "", "")
    for r in ranks:
        rss = f"{fmt(r.get('rss_mb'))} MB"
        gpus = r.get("gpus") or []
        if not gpus:
            table.add_row(str(r.get("rank")), "no GPU (CPU-only run)", "", "", "", rss)
        for g in gpus:
            used = g.get("used_mb", g.get("reserved_mb"))
            table.add_row(str(r.get("rank")), f"{g.get('index')}: {clean(g.get('name', 'GPU'), 30)}",
                          f"{fmt(used)} / {fmt(g.get('total_mb'))} MB", f"{fmt(g.get('peak_used_mb', g.get('peak_mb')))} MB",
                          f"{fmt(g.get('util'))} %", rss)
    return table


def checkpoints_table(report: dict) -> Table:
    table = Table(title="Checkpoints", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for col in ("step", "health", "issues", "drift", "size", "path"):
        table.add_column(col, overflow="fold")
    ckpts = report.get("checkpoints") or []
    if not ckpts:
        table.add_row("—", "", "", "", "", "no checkpoints yet")
    for c in ckpts:
        health = c.get("health_score")
        style = "" if health is None else ("green" if health >= 0.8 else "yellow" if health >= 0.5 else "bold red")
        health_text = fmt(health) if health is not None else (c.get("status") or "pending")
        table.add_row(fmt(c.get("step")), Text(health_text, style=style), str(len(c.get("issues") or [])),
                      fmt(c.get("drift")), f"{fmt(c.get('file_size_mb'))} MB", clean(c.get("path"), 80))
        for issue in (c.get("issues") or [])[:3]:
            table.add_row("", "", "", "", "", Text("• " + clean(issue, 100), style="dim"))
    return table


def rewards_table(report: dict) -> Table:
    rewards = report.get("rewards") or {}
    rel = rewards.get("reliability_metrics") or {}
    table = Table(title="Rewards", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for col in ("stability", "consistency", "variance", "mean", "drift", "batches"):
        table.add_column(col)
    drift = rewards.get("drift")
    drift_text = fmt(drift.get("psi")) if isinstance(drift, dict) else fmt(drift)
    table.add_row(fmt(rel.get("stability")), fmt(rel.get("consistency")), fmt(rel.get("variance")),
                  fmt(rel.get("mean_reward")), drift_text, str(rewards.get("batches", 0)))
    for sample in (rewards.get("samples") or [])[:3]:
        table.add_row(Text(clean(sample.get("label"), 10), style="dim"), fmt(sample.get("score")),
                      Text(clean(sample.get("completion"), 120)), "", "", "")
    return table


def transport_text(report: dict) -> Text:
    t = report.get("transport") or {}
    return Text(f"Transport: received {t.get('received', 0)} · rejected {t.get('rejected', 0)} · "
                f"gaps {t.get('gaps', 0)} · dropped {t.get('dropped', 0)}  ·  source {clean(report.get('source'), 80)}",
                style="dim")


def report_renderable(report: dict) -> Group:
    return Group(header_text(report), metrics_table(report), anomalies_table(report), system_table(report),
                 checkpoints_table(report), rewards_table(report), transport_text(report))


def render_text(report: dict, width: int = 110) -> str:
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None, force_terminal=False)
    console.print(report_renderable(report))
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return console.export_text(styles=False).rstrip() + f"\n(snapshot {stamp})\n"


def render_markdown(report: dict) -> str:
    """The same sections as Markdown: tables in code blocks keep the sparklines aligned anywhere."""
    text = render_text(report)
    title = escape(clean((report.get("run") or {}).get("run_id")))
    return f"# rlhf-tui report: {title}\n\n```text\n{text}```\n"
