"""The one renderer of a report: Rich renderables, exported as plain text or Markdown.

Used by `rlhf-tui report --format text|markdown`, by the monitor's snapshot key and (piece by piece) by the
monitor's panes, so all of them show the same things: header, metrics with sparklines, trends and threshold
bands, anomalies, GPU/system, checkpoints, rewards, transport. Strings from the wire were made display-safe at
ingest (bridge/monitor/schema.py); here they pass through `clean()` once more (one line, clipped) and are shown
as `Text`: every table is a `PlainTable`, whose str cells and titles are plain text, never parsed as markup
(the cell primitives live in tui/cells.py). A section that fails to build shows one error line in its place
(`report_sections`), never a traceback.
"""

from __future__ import annotations

import io
from datetime import datetime
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from rlhf_tui.analysis.severity import Severity
from rlhf_tui.tui.cells import PlainTable, band_text, clean, compact, fit, fmt, gauge, percent, range_text, short, when
from rlhf_tui.tui.components import components_text
from rlhf_tui.tui.rollout import rollout_text
from rlhf_tui.tui.view import SPARK_CHARS, newest_first, severity_counts, spark_lines, unit_suffix

TREND_ARROWS = {"increasing": "↑", "decreasing": "↓", "stable": "→"}
SEVERITY_STYLE = {"low": "cyan", "medium": "yellow", "high": "bold red", "critical": "bold white on red"}
SEVERITY_SHORT = {"low": "low", "medium": "med", "high": "HIGH", "critical": "CRIT"}
WORST_FIRST = tuple(str(s) for s in sorted(Severity, reverse=True))
CONNECTION = {  # state → (glyph, words, style)
    "live": ("●", "live", "green"),
    "connecting": ("◌", "connecting…", "yellow"),
    "stalled": ("◐", "alive but stalled", "yellow"),
    "stale": ("✖", "stale", "bold red"),
    "unreachable": ("✖", "unreachable", "bold red"),
    "ended": ("■", "run ended", "cyan"),
    "crashed": ("✖", "run crashed", "bold red"),
    "full": ("✖", "refused: the run's monitor slots are full (retrying)", "bold red"),
    "offline": ("▣", "recorded", "cyan"),
}


def connection_text(report: dict) -> Text:
    state = report.get("connection") or "offline"
    glyph, words, style = CONNECTION.get(state, ("?", state, ""))
    text = Text(f"{glyph} {words}", style=style)
    run = report.get("run") or {}
    if state == "offline" and run.get("status") in ("crashed", "interrupted"):  # a recorded run that raised
        glyph, words, style = CONNECTION["crashed"]
        text = Text(f"{glyph} recorded, run {run.get('status')}", style=style)
    if run.get("status") in ("crashed", "interrupted") and run.get("error"):
        text.append(f": {clean(run.get('error'), 80)}", style=style)
    if state in ("stale", "unreachable") and report.get("stale_since"):
        text.append(f" since {when(report['stale_since'])}", style=style)
    elif state == "stalled":
        text.append(": heartbeats, no new step", style=style)
        if report.get("last_step_wall"):
            text.append(f" since {when(report['last_step_wall'])}", style=style)
    return text


def run_title(run: dict, id_width: int, trainer_width: int) -> Text:
    """The start of every header: the tool, the run id and the trainer (untrusted text, made safe)."""
    return Text.assemble(
        ("rlhf-tui", "bold"),
        "  run ",
        (clean(run.get("run_id"), id_width), "bold cyan"),
        f"  {clean(run.get('trainer'), trainer_width)}",
    )


def header_text(report: dict, width: int = 200) -> Text:
    """Run, trainer, step and connection first; the model and the logged-row count only when there is room."""
    run = report.get("run") or {}
    text = run_title(run, 40, 24)
    steps = f"  step {clean(fmt(report.get('last_step')), 20)}"
    if run.get("max_steps"):
        steps += f"/{clean(fmt(run.get('max_steps')), 20)}"
    text.append(steps + "  ")
    text.append_text(connection_text(report))
    rejected = (report.get("rejected_fields") or {}).get("count")
    if rejected:
        text.append(f"  ⚠ {rejected} rejected field{'s' if rejected != 1 else ''}", style="bold yellow")
    log_failed = (report.get("log_errors") or {}).get("count")
    if log_failed:  # the training's own record is incomplete: said where it is always seen
        text.append(f"  ✖ run log: {log_failed} failed write{'s' if log_failed != 1 else ''}", style="bold red")
    extra = f"  ({report.get('steps', 0)} logged)"
    if run.get("model"):
        extra += f"  model {clean(run.get('model'), 40)}"
    if len(text) + len(extra) <= width - 30:
        text.append(extra, style="dim")
    actions = report.get("actions") or []
    if actions:  # the training side saved or stopped the run on an alarm: said where it is always seen
        last = actions[-1]
        what = "STOPPED" if last.get("action") == "stop" else "SAVED"
        text.append(f"  {what} by on_alarm at step {clean(last.get('step'), 12)}", style="bold white on red")
    return text


def metrics_table(report: dict, names: list[str] | None = None) -> Table:
    """One row per metric: last value (or the value at the picked step), min…max, trend, the z-score band
    (when known) and a unicode sparkline of the whole history."""
    table = PlainTable(title="Metrics", box=box.SIMPLE_HEAD, title_justify="left", expand=False, pad_edge=False)
    metrics = report.get("metrics") or {}
    has_band = any("band" in row for row in metrics.values())
    at_step = report.get("at_step")
    table.add_column("metric", no_wrap=True, max_width=30)
    table.add_column("last" if at_step is None else f"@{at_step}", justify="right", no_wrap=True)
    table.add_column("min…max", no_wrap=True)
    table.add_column("↕", justify="center", no_wrap=True)
    if has_band:
        z = (report.get("thresholds") or {}).get("anomaly_threshold")
        table.add_column(f"band z±{short(z)}" if z is not None else "band", no_wrap=True)
    table.add_column("history", no_wrap=True)
    anomalous = {a.get("metric") for a in report.get("anomalies", []) if a.get("ongoing")}
    for name in names if names is not None else metrics:
        row = metrics.get(name)
        if row is None:
            continue
        active = row.get("active", name in anomalous)
        value = row.get("at") if at_step is not None else row.get("last")
        suffix = unit_suffix(row)
        label = ("● " if active else "") + fit(clean(name, 80), (28 if active else 30) - len(suffix)) + suffix
        cells = [label, short(value), range_text(row), TREND_ARROWS.get(row.get("trend"), "?")]
        if has_band:
            cells.append(band_text(row.get("band")))
        cells.append(spark_lines(row.get("buckets") or [])[0])
        table.add_row(*cells, style="bold red" if active else None)
    if not metrics:
        table.add_row("—", "", "", "", *([""] if has_band else []), "no steps yet")
    return table


def _counts(anomalies: list[dict], counts: dict | None = None) -> dict[str, int]:
    return counts if counts is not None else severity_counts(anomalies)


def severity_summary(anomalies: list[dict], counts: dict | None = None) -> str:
    """ "1 critical, 2 high" (severities with none left out)."""
    counts = _counts(anomalies, counts)
    return ", ".join(f"{counts[s]} {s}" for s in WORST_FIRST if counts.get(s))


def severity_title(anomalies: list[dict], counts: dict | None = None) -> Text:
    """ "Anomalies  1 critical · 2 high …" with each count in its severity's colour (`counts`: totals when
    the list was trimmed)."""
    text = Text("Anomalies", style="bold")
    counts = _counts(anomalies, counts)
    parts = [(s, counts[s]) for s in WORST_FIRST if counts.get(s)]
    if not parts:
        text.append("  none", style="dim")
    for i, (sev, count) in enumerate(parts):
        text.append("  " if i == 0 else " · ")
        text.append(f"{count} {sev}", style=SEVERITY_STYLE[sev])
    return text


def anomalies_table(report: dict, limit: int = 50) -> Table:
    anomalies = newest_first(report.get("anomalies") or [])
    totals = report.get("anomaly_counts")
    total = sum(totals.values()) if totals else len(anomalies)
    counts = severity_summary(anomalies, totals)
    table = PlainTable(
        title=f"Anomalies ({total}{': ' + counts if counts else ''})",
        box=box.SIMPLE_HEAD,
        title_justify="left",
        pad_edge=False,
    )
    table.add_column("step", no_wrap=True)
    table.add_column("severity", no_wrap=True)
    table.add_column("detector", overflow="fold", max_width=20)
    table.add_column("metric", overflow="fold", max_width=26)
    table.add_column("message / recommendation", overflow="fold", ratio=1)
    if not anomalies:
        table.add_row("—", "", "", "", "no anomalies")
    for a in anomalies[:limit]:
        sev = a.get("severity", "")
        msg = Text(clean(a.get("message"), 160))
        if a.get("recommendation"):
            msg.append("\n→ " + clean(a.get("recommendation"), 160), style="dim")
        step = fmt(a.get("step"))
        if isinstance(a.get("last_step"), int) and a.get("last_step") != a.get("step"):
            step += f"–{a['last_step']}"
        table.add_row(
            step,
            Text(sev, style=SEVERITY_STYLE.get(sev, "")),
            clean(a.get("detector"), 30),
            clean(a.get("metric"), 40),
            msg,
        )
    if total > limit:
        table.add_row("…", "", "", "", f"{total - limit} older anomalies not shown")
    return table


def _gb(mb: Any) -> str:
    return "—" if mb is None else f"{float(mb) / 1024:.1f}"


def _gpu_used(g: dict) -> Any:
    return g.get("used_mb", g.get("reserved_mb"))


def _gpu_fraction(g: dict) -> float | None:
    frac = g.get("used_frac")
    if isinstance(frac, (int, float)):
        return float(frac)
    used, total = _gpu_used(g), g.get("total_mb")
    if isinstance(used, (int, float)) and isinstance(total, (int, float)) and total > 0:
        return float(used) / float(total)
    return None


def system_lines(report: dict, gauge_width: int = 16) -> Text:
    """The GPU / system pane: one gauge per device (grouped per rank when several report), RSS, "no GPU"."""
    system = report.get("system") or {}
    ranks = system.get("ranks") or []
    out = Text()
    if not ranks:
        out.append("no system samples yet", style="dim")
        return out
    several = len(ranks) > 1
    for i, r in enumerate(ranks):
        if i:
            out.append("\n")
        gpus = r.get("gpus") or []
        prefix = f"rank {r.get('rank')}  " if several else ""
        if not gpus:
            out.append(prefix)
            out.append("no GPU", style="bold")
            out.append(f" (CPU-only run) · process RSS {fmt(r.get('rss_mb'))} MB")
            continue
        out.append(f"{prefix}process RSS {fmt(r.get('rss_mb'))} MB", style="dim")
        for g in gpus:
            out.append("\n")
            out.append(f"GPU{clean(g.get('index'), 4)} ")
            out.append_text(gauge(_gpu_fraction(g), gauge_width))
            out.append(f" {_gb(_gpu_used(g))}/{_gb(g.get('total_mb'))} GB")
            peak = g.get("peak_used_mb", g.get("peak_mb"))
            if peak is not None:
                out.append(f" peak {_gb(peak)}")
            if g.get("util") is not None:
                out.append(f" util {fmt(g.get('util'))}%")
            if g.get("name"):
                out.append(f"  {clean(g.get('name'), 24)}", style="dim")
    return out


def system_table(report: dict) -> Table:
    table = PlainTable(title="GPU / system", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for col in ("rank", "device", "memory", "used / total", "peak", "util", "RSS"):
        table.add_column(col, no_wrap=True)
    system = report.get("system") or {}
    ranks = system.get("ranks") or []
    if not ranks:
        table.add_row("—", "no system samples yet", "", "", "", "", "")
    for r in ranks:
        rss = f"{fmt(r.get('rss_mb'))} MB"
        gpus = r.get("gpus") or []
        if not gpus:
            table.add_row(str(r.get("rank")), "no GPU (CPU-only run)", "", "", "", "", rss)
        for g in gpus:
            peak = g.get("peak_used_mb", g.get("peak_mb"))
            table.add_row(
                str(r.get("rank")),
                f"{clean(g.get('index'), 4)}: {clean(g.get('name', 'GPU'), 30)}",
                gauge(_gpu_fraction(g), 12),
                f"{_gb(_gpu_used(g))} / {_gb(g.get('total_mb'))} GB",
                f"{_gb(peak)} GB",
                f"{fmt(g.get('util'))} %",
                rss,
            )
    return table


def health_style(health: float | None) -> str:
    if health is None:
        return "dim"
    return "green" if health >= 0.8 else "yellow" if health >= 0.5 else "bold red"


def health_text(c: dict) -> Text:
    health = c.get("health_score")
    label = fmt(round(health, 2)) if isinstance(health, float) else (clean(c.get("status"), 12) or "pending")
    return Text(label, style=health_style(health))


def checkpoints_table(report: dict) -> Table:
    table = PlainTable(title="Checkpoints", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for col in ("step", "health", "issues", "drift", "size", "path"):
        table.add_column(col, overflow="fold")
    ckpts = report.get("checkpoints") or []
    if not ckpts:
        table.add_row("—", "", "", "", "", "no checkpoints yet")
    for c in ckpts:
        table.add_row(
            fmt(c.get("step")),
            health_text(c),
            str(len(c.get("issues") or [])),
            fmt(c.get("drift")),
            f"{fmt(c.get('file_size_mb'))} MB",
            clean(c.get("path"), 80),
        )
        for issue in (c.get("issues") or [])[:3]:
            table.add_row("", "", "", "", "", Text("• " + clean(issue, 100), style="dim"))
    return table


def histogram_spark(histogram: Any) -> str:
    counts = histogram.get("counts") if isinstance(histogram, dict) else None
    if not counts:
        return ""
    top = max(counts) or 1
    return "".join(
        SPARK_CHARS[min(len(SPARK_CHARS) - 1, int(round(c / top * (len(SPARK_CHARS) - 1))))] if c else " "
        for c in counts
    )


def drift_text(drift: Any) -> str:
    if isinstance(drift, dict):
        level = drift.get("level") or "—"
        psi = drift.get("psi")
        return f"{level}" + (f" (PSI {compact(psi)})" if psi is not None and level != "warming_up" else "")
    return fmt(drift)


def rewards_table(report: dict) -> Table:
    """The combined reliability in the title, then one row per reward function (mean, spread, stability, share
    of the total's variance, strongest correlation, drift, distribution, reward anomalies)."""
    rewards = report.get("rewards") or {}
    rel = rewards.get("reliability_metrics") or {}
    title = "Rewards: " + " · ".join(
        f"{label} {short(rel.get(key))}"
        for label, key in (
            ("stability", "stability"),
            ("consistency", "consistency"),
            ("variance", "variance"),
            ("mean", "mean_reward"),
        )
    )
    title += f" · {rewards.get('batches', 0)} batches"
    table = PlainTable(title=title, box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for col in ("function", "mean", "std", "stab", "share", "corr", "drift", "distribution", "batches", "alarms"):
        table.add_column(col, no_wrap=True)
    functions = rewards.get("functions") or {}
    for name, f in functions.items():
        table.add_row(
            Text(clean(name, 40)),
            short(f.get("mean")),
            short(f.get("std")),
            short((f.get("reliability_metrics") or {}).get("stability")),
            percent(f.get("share")),
            strongest_correlation(f.get("correlation")),
            str((f.get("drift") or {}).get("level") or "—"),
            histogram_spark(f.get("histogram")) or "—",
            str(f.get("batches", 0)),
            alarm_text(f.get("anomaly_counts")) or "—",
        )
    return table


def strongest_correlation(corr: Any) -> str:
    """The correlation with the most correlated other function, e.g. "-0.26 length_reward"."""
    pairs = [(k, v) for k, v in (corr or {}).items() if isinstance(v, (int, float))] if isinstance(corr, dict) else []
    if not pairs:
        return "—"
    name, r = max(pairs, key=lambda kv: abs(kv[1]))
    return f"{r:+.2f} {clean(name, 16)}" if len(pairs) > 1 else f"{r:+.2f}"


def alarm_text(counts: Any) -> str:
    """Reward anomaly counts, worst first ("1 HIGH 2 med"); empty when none."""
    if not isinstance(counts, dict):
        return ""
    return " ".join(f"{counts[s]} {SEVERITY_SHORT[s]}" for s in WORST_FIRST if counts.get(s))


def reward_samples_table(report: dict) -> Table | None:
    rewards = report.get("rewards") or {}
    samples = rewards.get("samples") or []
    if not samples:
        return None
    table = PlainTable(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        title_justify="left",
        title=f"Reward samples @ step {fmt(rewards.get('last_step'))}",
    )
    table.add_column("sample", style="dim", no_wrap=True)
    table.add_column("score", justify="right", no_wrap=True)
    table.add_column("completion", overflow="fold")
    ranked = any(type(s.get("rank")) is int for s in samples)  # several processes: r0, r1 ... say whose
    for sample in samples[: 8 if ranked else 3]:
        label = clean(sample.get("label"), 10)
        if type(sample.get("rank")) is int:
            label = f"r{sample['rank']} {label}"
        table.add_row(label, fmt(sample.get("score")), Text(clean(sample.get("completion"), 160)))
    return table


def transport_text(report: dict) -> Text:
    t = report.get("transport") or {}
    text = Text(
        f"Transport: received {t.get('received', 0)} · rejected {t.get('rejected', 0)} · "
        f"gaps {t.get('gaps', 0)} · dropped {t.get('dropped', 0)}  ·  source {clean(report.get('source'), 80)}",
        style="dim",
    )
    fields = report.get("rejected_fields") or {}
    if fields.get("count"):
        recent = "; ".join(clean(why, 80) for why in (fields.get("recent") or [])[-5:])
        text.append(f"\nRejected fields: {fields['count']} (type or range; dropped at ingest): {recent}")
    failed = report.get("log_errors") or {}
    if failed.get("count"):
        text.append(
            f"\nRun log: {failed['count']} failed write(s) on the training side: {clean(failed.get('first'), 160)}"
        )
    return text


def actions_text(report: dict) -> Text | None:
    """What the training side did on its alarms (on_alarm), newest last, or None."""
    actions = report.get("actions") or []
    if not actions:
        return None
    text = Text()
    for a in actions[-3:]:
        what = "stopped the run" if a.get("action") == "stop" else "saved a checkpoint"
        text.append(f"on_alarm: {what} at step {clean(a.get('step'), 12)}", style="bold red")
        text.append(
            f" ({clean(a.get('severity'), 10)} {clean(a.get('detector'), 40)} on {clean(a.get('metric'), 60)})  "
        )
    return text


def summary_text(report: dict) -> Text | None:
    """The trainer's end-of-run summary in one line (train_loss, train_runtime ...), or None before the end."""
    summary = report.get("summary") or {}
    if not summary:
        return None
    parts = [f"{clean(k, 40)} {fmt(v) if not isinstance(v, str) else clean(v, 40)}" for k, v in summary.items()]
    return Text("Run summary: " + " · ".join(parts))


def eval_pairs_section(report: dict) -> Table | None:
    from rlhf_tui.tui.workload import eval_pairs_table  # local: tui.workload imports this module

    return eval_pairs_table(report)


def rewards_section(report: dict) -> Table:
    """The reward functions, or for a run that is not RL (DPO, reward model, SFT) its own block."""
    from rlhf_tui.tui.workload import pane_title, workload_table

    rewards = report.get("rewards") or {}
    other = not rewards.get("batches") and pane_title(report) is not None
    return workload_table(report) if other else rewards_table(report)


SECTIONS = (
    ("header", header_text),
    ("actions", actions_text),
    ("summary", summary_text),
    ("metrics", metrics_table),
    ("eval vs train", eval_pairs_section),
    ("anomalies", anomalies_table),
    ("GPU / system", system_table),
    ("checkpoints", checkpoints_table),
    ("rewards", rewards_section),
    ("reward components", components_text),
    ("rollout", rollout_text),
    ("reward samples", reward_samples_table),
    ("transport", transport_text),
)


def section_error(name: str, exc: BaseException) -> Text:
    """The line shown where a section could not be drawn (a bug of ours, or data no check foresaw)."""
    return Text(f"⚠ {name}: could not be shown ({type(exc).__name__}: {clean(exc, 160)})", style="bold red")


def report_sections(report: dict) -> list:
    """Each section's renderable (None ones left out); one that raises is its error line instead."""
    out = []
    for name, build in SECTIONS:
        try:
            section = build(report)
        except Exception as exc:
            section = section_error(name, exc)
        if section is not None:
            out.append((name, section))
    return out


def report_renderable(report: dict) -> Group:
    return Group(*(section for _, section in report_sections(report)))


def spark_width_for(text_width: int) -> int:
    """Sparkline width of the text report at a given width (the snapshot key and `rlhf-tui report` agree)."""
    return max(12, min(60, text_width - 88))


def _plain_text(section: Any, name: str, width: int) -> str:
    """One section as plain text, drawn on its own: one that fails to draw is its error line."""
    console = Console(record=True, width=width, file=io.StringIO(), color_system=None, force_terminal=False)
    try:
        console.print(section)
    except Exception as exc:
        console = Console(record=True, width=width, file=io.StringIO(), color_system=None, force_terminal=False)
        console.print(section_error(name, exc))
    return console.export_text(styles=False)


def render_text(report: dict, width: int = 110, stamp: bool = True) -> str:
    parts = [_plain_text(section, name, width) for name, section in report_sections(report)]
    text = "".join(parts).rstrip() + "\n"
    if stamp:
        text += f"(snapshot {datetime.now().strftime('%Y-%m-%d %H:%M:%S')})\n"
    return text


def render_markdown(report: dict) -> str:
    """The same sections as Markdown: tables in code blocks keep the sparklines aligned anywhere."""
    text = render_text(report)
    title = escape(clean((report.get("run") or {}).get("run_id")))
    return f"# rlhf-tui report: {title}\n\n```text\n{text}```\n"
