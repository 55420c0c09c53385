"""`rlhf-tui backtest RUN...`: which detectors would have alarmed on which recorded runs, and where.

The runs are read with the `report` command's loader (JSONL logs, trainer_state.json files, output dirs); the
numbers come from `analysis/backtest.py`; this module parses the options and draws the text.
"""

from __future__ import annotations

import json
import textwrap
from typing import Any

from rlhf_tui.analysis.backtest import DEFAULT_LEVEL, backtest
from rlhf_tui.tui.cells import clean, fmt
from rlhf_tui.tui.cli import _write, load_store
from rlhf_tui.tui.cli_options import EXIT_OK, CliError, Parser, add_level_option, thresholds_option

DESCRIPTION = """\
Back-test a threshold set on recorded runs: per detector, how many of the runs it would have alarmed on
(LEVEL or worse) and where (run, first step, severity). Run it on past healthy runs to estimate the
false-alarm rate of a setting before trusting it, and on runs with a known fault to see when it is caught."""


WIDTH = 110  # the lists of detector names are wrapped to this width


def _parser() -> Parser:
    import argparse

    p = Parser(prog="rlhf-tui backtest", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN", help="a JSONL log, a trainer_state.json or a training output_dir")
    p.add_argument("--thresholds", metavar="FILE", help="detector thresholds (TOML; default: the built-in defaults)")
    add_level_option(
        p,
        "--level",
        "what counts as an alarm: LEVEL (low|medium|high|critical) or worse (default %(default)s)",
        DEFAULT_LEVEL,
    )
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    return p


def load_runs(sources: list[str]) -> list[tuple[str, Any]]:
    """(name, RunHistory) for every run with logged steps in the sources; a bad source raises CliError."""
    from rlhf_tui.bridge.monitor.sources import is_live

    runs = []
    for source in sources:
        if is_live(source):
            raise CliError(f"{source}: backtest reads recorded runs (a JSONL log, trainer_state.json or output_dir)")
        store = load_store(source)
        found = [run for run in store.runs.values() if run.rows]
        if not found:
            raise CliError(f"{source}: no logged steps")
        for run in found:
            runs.append((source if len(found) == 1 else f"{source}#{run.run_id}", run))
    return runs


def _pct(rate: float) -> str:
    return f"{100 * rate:.0f}%"


def format_text(result: dict) -> str:
    """The back-test as plain text: the summary, each detector that alarmed with where, the quiet ones, per run."""
    total = result["total_runs"]
    changed = result.get("thresholds") or {}
    setting = ", ".join(f"{clean(k, 40)}={clean(v, 60)}" for k, v in changed.items()) or "defaults"
    lines = [
        f"Back-test: {total} run{'s' if total != 1 else ''}, alarm = {result['level']} or worse, thresholds: {setting}",
        f"runs alarmed: {result['runs_alarmed']} of {total} ({_pct(result['rate'])})",
        "",
    ]
    names = [r["run"] for r in result["runs"]]
    run_w = min(48, max([len(clean(n, 60)) for n in names] + [3]))
    fired = [d for d in result["detectors"] if d["runs_alarmed"]]
    if fired:
        lines.append(f"{'detector':<24} {'runs':<7} {'rate':>4}   where: run, first step, severity (worst, episodes)")
    for d in fired:
        lines.append(f"{clean(d['detector'], 24):<24} {d['runs_alarmed']:>3}/{total:<3} {_pct(d['rate']):>4}")
        for a in d["alarms"]:
            worst = f"worst {a['worst']}, " if a["worst"] != a["severity"] else ""
            lines.append(
                f"    {clean(a['run'], 60):<{run_w}}  step {fmt(a['first_step']):>6}  {a['severity']:<8}"
                f" {clean(a['metric'], 40)}  ({worst}{a['episodes']} episode{'s' if a['episodes'] != 1 else ''})"
            )
    quiet = [d["detector"] for d in result["detectors"] if not d["runs_alarmed"] and not d["muted"]]
    muted = [d["detector"] for d in result["detectors"] if d["muted"]]
    if quiet:
        lines += [""] + textwrap.wrap("no alarm on any run: " + ", ".join(clean(q, 40) for q in quiet), WIDTH)
    if muted:
        lines += textwrap.wrap("muted: " + ", ".join(clean(m, 40) for m in muted), WIDTH)
    lines += ["", f"{'run':<{run_w}}  {'steps':>6}  first alarm"]
    for r in result["runs"]:
        first = r["first_alarm"]
        where = (
            f"step {fmt(first['first_step'])}  {clean(first['detector'], 30)} on {clean(first['metric'], 40)}"
            f" ({first['severity']})"
            if first
            else "none"
        )
        lines.append(f"{clean(r['run'], 60):<{run_w}}  {r['steps']:>6}  {where}")
    return "\n".join(lines) + "\n"


def cmd_backtest(argv: list[str]) -> int:
    ns = _parser().parse_args(argv)
    thresholds = thresholds_option(ns.thresholds)
    result = backtest(load_runs(ns.runs), thresholds, ns.level)
    if ns.format == "json":
        from rlhf_tui.bridge.wire.protocol import to_json_safe

        out = json.dumps(to_json_safe(result), indent=2, allow_nan=False) + "\n"
    else:
        out = format_text(result)
    _write(out, ns.output)
    return EXIT_OK
