"""The rollout gauge, drawn from the report's `rollout` block (analysis/rollout.py): the sampler-vs-trainer
mismatch against its reference level, truncation, throughput and where a step's time goes, each with a plain
word (ok / elevated / high). The Rewards pane shows it above the reward functions, the text report as its own
section; neither shows it when the run logs none of these keys. Rich Text only (never markup)."""

from __future__ import annotations

import math
from typing import Any

from rich.text import Text

LEVEL_STYLE = {"ok": "green", "elevated": "yellow", "high": "bold red"}
LABEL_W = 11  # "truncation " / "throughput "
WORD_W = 9  # "elevated "
PHASE_ORDER = ("generation", "reward", "scoring", "update", "other")
DIFF_LABEL = {  # what each mismatch key measures
    "sampling/sampling_logp_difference/mean": "logp diff",
    "training/rollout_probs_diff_mean": "probs diff",
}


def _num(value: Any) -> str:
    """3 significant digits; tiny values in exponent form; — for none."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return "—"
    magnitude = abs(value)
    if magnitude != 0 and magnitude < 1e-3:
        return f"{value:.1e}".replace("e-0", "e-")
    if magnitude >= 1e4:
        return f"{value:.3g}".replace("e+0", "e").replace("e+", "e")
    return f"{value:.3g}" if magnitude < 1000 else f"{value:.0f}"


def _rate(value: Any) -> str:
    """A throughput: 950, 12.3k, 1.2M."""
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        return "—"
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _pct(value: Any) -> str:
    return f"{100 * value:.0f}%" if isinstance(value, (int, float)) and math.isfinite(value) else "—"


def _line(out: Text, label: str, level: str | None, first: bool, narrow: bool) -> None:
    if not first:
        out.append("\n")
    out.append(f"{label} " if narrow else f"{label:<{LABEL_W}}", style="dim")
    if level:
        out.append(f"{level} " if narrow else f"{level:<{WORD_W}}", style=LEVEL_STYLE.get(level, ""))
    elif not narrow:
        out.append(" " * WORD_W)


def worst_level(rollout: dict) -> str | None:
    """The worst word of the gauge (mismatch, truncation), None when neither is known."""
    levels = [(rollout.get(k) or {}).get("level") for k in ("mismatch", "truncation")]
    known = [lv for lv in levels if lv in LEVEL_STYLE]
    return max(known, key=list(LEVEL_STYLE).index) if known else None


def rollout_lines(rollout: dict, width: int = 100) -> Text:
    """One line per known part; empty Text when nothing is known. Below 60 columns the words are not aligned and
    the reference levels, limits and sources are left out (one line each still)."""
    out = Text()
    first, narrow = True, width < 60
    m = rollout.get("mismatch") or {}
    if m.get("metric"):
        _line(out, "mismatch", m.get("difference_level"), first, narrow)
        first = False
        out.append(f"{DIFF_LABEL.get(m['metric'], 'diff')} {_num(m.get('mean'))}")
        if m.get("max") is not None:
            out.append(f" (max {_num(m.get('max'))})", style="dim")
        if not narrow:
            out.append(f" · ref {_num(m.get('reference'))}, high {_num(m.get('high_at'))}", style="dim")
    if m.get("is_ratio") is not None:
        _line(out, "IS ratio", m.get("is_ratio_level"), first, narrow)
        first = False
        out.append(_num(m.get("is_ratio")))
        if m.get("is_ratio_min") is not None and m.get("is_ratio_max") is not None:
            out.append(f" ({_num(m['is_ratio_min'])}…{_num(m['is_ratio_max'])})", style="dim")
        if not narrow:
            out.append(f" · band 1 ± {_num(m.get('is_band'))}", style="dim")
    t = rollout.get("truncation") or {}
    if t:
        _line(out, "truncation", t.get("level"), first, narrow)
        first = False
        known = t.get("max_completion_length") is not None and not narrow
        out.append(
            f"{_pct(t.get('clipped_ratio'))} clipped" + (f" at {t['max_completion_length']} tokens" if known else "")
        )
        if t.get("note"):
            out.append(f": {t['note']}", style=LEVEL_STYLE["high"])
        elif not narrow:
            out.append(f" · limit {_pct(t.get('limit'))}", style="dim")
    p = rollout.get("throughput") or {}
    if p:
        _line(out, "throughput", None, first, narrow)
        first = False
        parts = []
        if p.get("tokens_per_s") is not None:
            out.append(f"{_rate(p['tokens_per_s'])} tokens/s")
            if str(p.get("source") or "").startswith("derived") and not narrow:
                parts.append(str(p["source"]))
        if p.get("tokens_per_s_per_gpu") is not None:
            parts.append(f"{_rate(p['tokens_per_s_per_gpu'])} tokens/s per GPU")
        if parts:
            out.append((" · " if p.get("tokens_per_s") is not None else "") + " · ".join(parts), style="dim")
    s = rollout.get("time") or {}
    if s:
        _line(out, "time", None, first, narrow)
        shares = s.get("shares") or {}
        if shares:
            out.append(" · ".join(f"{k} {_pct(shares[k])}" for k in PHASE_ORDER if k in shares))
            tail = f" of {_num(s.get('step_s'))} s a step" if s.get("of") == "step" else " of the timed phases"
            out.append("" if narrow else tail, style="dim")
        elif s.get("step_s") is not None:
            out.append(f"{_num(s['step_s'])} s a step")
            if not narrow:
                out.append(f" ({s.get('step_metric')}; no phase timings)", style="dim")
    return out


def rollout_text(report: dict) -> Text | None:
    """The text report's Rollout section (None when the run logs none of its keys)."""
    rollout = report.get("rollout") or {}
    body = rollout_lines(rollout)
    if not body.plain:
        return None
    out = Text("Rollout", style="bold")
    word = worst_level(rollout)
    if word:
        out.append(f" · {word}", style=LEVEL_STYLE[word])
    out.append("\n")
    out.append_text(body)
    out.append("\n")
    return out
