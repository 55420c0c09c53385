"""The Rewards pane: the rollout gauge when the run logs its keys (tui/rollout.py), the combined reliability
(stability, consistency, variance, mean), one row per reward function (mean, spread, stability, share of the
total's variance, strongest correlation, its reward alarms), a score distribution (sparkline histogram), drift
and the latest sample completions with their scores (escaped: no markup or control sequences). A run that is
not RL (DPO/KTO, reward model, SFT / plain Trainer) and has no reward batches shows its own "reward" block
instead (tui/workload.py). Under the functions: "dead" / "dominating" components and the prompt groups' split
("too easy", "too hard"; analysis/reward_components.py)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import Static

from rlhf_tui.tui.cells import clean, compact, percent, short
from rlhf_tui.tui.render import (
    SEVERITY_STYLE,
    WORST_FIRST,
    alarm_text,
    drift_text,
    histogram_spark,
    strongest_correlation,
)
from rlhf_tui.tui.rollout import LEVEL_STYLE, rollout_lines, worst_level
from rlhf_tui.tui.widgets.common import Pane
from rlhf_tui.tui.workload import pane_title, workload_lines


def _reliability_line(out: Text, rel: dict, width: int) -> None:
    for i, (label, key) in enumerate(
        (("stability", "stability"), ("consistency", "consistency"), ("variance", "variance"), ("mean", "mean_reward"))
    ):
        out.append(("\n" if i == 2 and width < 70 else "  " if i else "") + label + " ", style="dim")
        out.append(compact(rel.get(key)))


COMPONENT_STYLE = {"dead": "bold yellow", "dominating": "bold magenta"}
GROUP_STYLE = {"ok": "green", "too easy": "bold yellow", "too hard": "bold red", "no signal": "bold yellow"}


def component_tags(component: dict | None) -> list[str]:
    """ "dead" (no spread in its newest batches) and "dominating" (most of the total's variance)."""
    return [tag for tag in ("dead", "dominating") if (component or {}).get(tag)]


def groups_line(groups: dict | None) -> Text:
    """The prompt groups' zero-spread split over the newest steps, with its word ("too easy", "too hard")."""
    out = Text()
    groups = groups or {}
    if not groups.get("word"):
        return out
    out.append("groups ", style="dim")
    out.append(groups["word"], style=GROUP_STYLE.get(groups["word"], ""))
    for label, key in (("easy", "too_easy"), ("hard", "too_hard"), ("other", "zero_std_other")):
        out.append(f"  {label} ", style="dim")
        out.append(percent((groups.get(key) or {}).get("recent")))
    return out


def function_rows(functions: dict, width: int, components: dict | None = None) -> Text:
    """One row per reward function: name, mean, std (not in narrow panes), stability, share of the total's
    variance, strongest correlation (wide panes only), its reward alarms, then "dead" / "dominating"."""
    wide, narrow = width >= 70, width < 50
    name_w = max(8, min(24, width - (58 if wide else 28 if narrow else 35)))
    out = Text()
    head = f"{'function':<{name_w}} {'mean':>6}" + ("" if narrow else f" {'std':>6}") + f" {'stab':>5} {'share':>5}"
    out.append(head + (f" {'corr':<13}" if wide else "") + " alarms", style="dim")
    for name, f in functions.items():
        rel = f.get("reliability_metrics") or {}
        out.append("\n")
        out.append(f"{clean(name, name_w):<{name_w}} ", style="bold")
        out.append(f"{compact(f.get('mean')):>6} " + ("" if narrow else f"{compact(f.get('std')):>6} "))
        out.append(f"{compact(rel.get('stability')):>5} {percent(f.get('share')):>5}")
        if wide:
            out.append(f" {strongest_correlation(f.get('correlation'))[:13]:<13}", style="dim")
        counts = f.get("anomaly_counts") or {}
        alarms = alarm_text(counts)
        worst = next((s for s in WORST_FIRST if counts.get(s)), None)
        out.append(" " + (alarms or "—"), style=SEVERITY_STYLE.get(worst, "dim") if alarms else "dim")
        for tag in component_tags((components or {}).get(name)):
            out.append(f" {tag}", style=COMPONENT_STYLE[tag])
    return out


def rewards_lines(report: dict, width: int = 100, samples: int = 3) -> Text:
    """The pane's body."""
    rewards = report.get("rewards") or {}
    out = Text()
    functions = rewards.get("functions") or {}
    if len(functions) > 1:
        out.append("all ", style="dim")
    _reliability_line(out, rewards.get("reliability_metrics") or {}, width)
    if functions:
        out.append("\n")
        out.append_text(function_rows(functions, width, report.get("reward_components")))
    groups = groups_line(report.get("groups"))
    if groups.plain:
        out.append("\n")
        out.append_text(groups)
    hist = rewards.get("histogram")
    spark = histogram_spark(hist)
    out.append("\ndist ", style="dim")
    if spark:
        edges = hist.get("edges") or []
        out.append(spark, style="magenta")
        if len(edges) >= 2:
            out.append(f" [{short(edges[0])}…{short(edges[-1])}]", style="dim")
    else:
        out.append("—")
    if rewards.get("drift"):
        out.append("\ndrift " if width < 70 else "  drift ", style="dim")
        out.append(drift_text(rewards.get("drift")))
    out.append(f"  batches {rewards.get('batches', 0)}", style="dim")
    shown = (rewards.get("samples") or [])[:samples]
    if shown and rewards.get("last_step") is not None:
        out.append(f"\nsamples @ step {rewards.get('last_step')}:", style="dim")
    for sample in shown:
        out.append("\n")
        out.append(f"{clean(sample.get('label'), 8):<6}", style="dim")
        out.append(f"{short(sample.get('score')):>8} ", style="bold")
        out.append(clean(sample.get("completion"), max(20, width - 16)))
    return out


class RewardsPane(Pane):
    pane_name = "rewards"
    DEFAULT_CSS = """
    RewardsPane VerticalScroll { height: 1fr; scrollbar-size-vertical: 1; }
    RewardsPane .body { height: auto; }
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.border_title = "Rewards"
        self._last: str | None = None

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static("no reward batches yet", classes="body", id="rewards-body")

    def show(self, report: dict) -> None:
        rewards = report.get("rewards") or {}
        width = self.size.width or 60
        other = None if rewards.get("batches") else pane_title(report)
        if rewards.get("batches"):
            body = rewards_lines(report, width=width - 2, samples=3)
        elif other is not None:
            body = workload_lines(report, width=width - 2)
        else:
            body = Text("no reward batches yet (wrap reward functions with monitor_rewards)", style="dim")
        rollout = report.get("rollout") or {}
        gauge = rollout_lines(rollout, width - 2)  # the rollout gauge first: it says whether the rewards can be trusted
        if gauge.plain:
            body = gauge + Text("\n") + body
        if body.plain != self._last:
            self._last = body.plain
            self.query_one("#rewards-body", Static).update(body)
        word = worst_level(rollout)
        flag = Text(f" · rollout {word}", style=LEVEL_STYLE[word]) if word and word != "ok" else Text()
        if other is not None:
            trainer = (report.get("run") or {}).get("trainer")
            self.border_title = Text(other, style="bold") + Text(f" · {clean(trainer, 30)}", style="dim") + flag
            return
        title = Text("Rewards", style="bold")
        mean = (rewards.get("reliability_metrics") or {}).get("mean_reward")
        functions = rewards.get("functions") or {}
        if len(functions) > 1:
            title.append(f" · {len(functions)} functions", style="dim")
        if rewards.get("batches"):
            title.append(f" · {rewards.get('batches')} batches", style="dim")
        if mean is not None:
            title.append(f" · mean {mean:.3g}", style="dim")
        self.border_title = title + flag
