"""The text report's "reward components" section: each reward function as a part of the total (mean, spread,
share of the total's variance, `dead` / `dominating`), the prompt groups' word ("too easy", "too hard") and
the completions the report carries (`completions`, analysis/reward_components.py). Plain `Text`: names come
from the wire and are clipped and shown literally."""

from __future__ import annotations

from rich.text import Text

from rlhf_tui.tui.cells import clean, percent, short


def components_text(report: dict) -> Text | None:
    """None when the run has neither reward components nor prompt groups."""
    components = report.get("reward_components") or {}
    groups = report.get("groups") or {}
    if not components and not groups.get("word"):
        return None
    out = Text()
    if components:
        out.append("Reward components", style="bold")
        out.append(" (share of the total's variance; dead: no spread in its newest batches)", style="dim")
        width = max(8, min(30, max(len(clean(n, 30)) for n in components)))
        for name, c in components.items():
            out.append(f"\n  {clean(name, 30):<{width}}  mean {short(c.get('mean')):>7}  std {short(c.get('std')):>7}")
            out.append(f"  share {percent(c.get('share')):>4}")
            tags = [t for t in ("dead", "dominating") if c.get(t)]
            if tags:
                out.append("  " + " ".join(tags), style="bold yellow")
    if groups.get("word"):
        out.append("\n" if components else "")
        out.append("Prompt groups: ", style="bold")
        out.append(groups["word"], style="bold yellow" if groups["word"] != "ok" else "green")
        parts = [
            f"{label} {percent((groups.get(key) or {}).get('recent'))}"
            for label, key in (("too easy", "too_easy"), ("too hard", "too_hard"), ("other equal", "zero_std_other"))
        ]
        out.append(f"  ({' · '.join(parts)}, mean of the newest 5 steps)", style="dim")
    completions = report.get("completions") or []
    if completions:
        newest = completions[0]
        out.append(
            f"\nCompletions: {len(newest.get('samples') or [])} kept at step {newest.get('step')} "
            f"({len(completions)} newest steps in `report --format json`; the monitor's browser: c)",
            style="dim",
        )
    return out
