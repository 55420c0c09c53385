"""What a run that is not RL shows where an RL run shows its reward batches: the "reward" block of its kind (DPO/KTO
implicit rewards, a reward model's accuracy and margin, a language model's loss, token accuracy and throughput)
with each metric's eval twin, and eval metrics against their training twins (the train/eval gap and its trend,
the overfitting signal). Rich Text for the Rewards pane, Rich tables for the text report. Every name from the
wire passes through `clean()`.
"""

from __future__ import annotations

import numpy as np
from rich import box
from rich.table import Table
from rich.text import Text

from rlhf_tui.analysis.workloads import BLOCKS, LANGUAGE_MODEL, PREFERENCE, REWARD_MODEL, RL
from rlhf_tui.tui.cells import PlainTable, clean, compact, short
from rlhf_tui.tui.render import TREND_ARROWS
from rlhf_tui.tui.view import bucket_means, spark_lines

TITLES = {
    PREFERENCE: "Preferences",
    REWARD_MODEL: "Reward model",
    LANGUAGE_MODEL: "Language model",
}
SHORT_INTROS = {
    PREFERENCE: "implicit rewards",
    REWARD_MODEL: "pairwise ranking",
    LANGUAGE_MODEL: "loss, token accuracy, throughput",
}
INTROS = {
    PREFERENCE: "implicit rewards (β·log-ratio to the reference)",
    REWARD_MODEL: "pairwise ranking: chosen above rejected",
    LANGUAGE_MODEL: "no rewards in this run: loss, accuracy, speed",
}
LABELS = {
    "rewards/accuracies": "accuracy",
    "rewards/margins": "margin",
    "rewards/chosen": "chosen",
    "rewards/rejected": "rejected",
    "logps/chosen": "logp chosen",
    "logps/rejected": "logp rejected",
    "mean_reward": "mean score",
    "min_reward": "min score",
    "max_reward": "max score",
    "mean_token_accuracy": "token accuracy",
    "num_tokens": "tokens seen",
}


def kind_of(report: dict) -> str:
    return str((report.get("run") or {}).get("kind") or RL)


def pane_title(report: dict) -> str | None:
    """The Rewards pane's title for a run that is not RL (None for RL: the reward batches' own title)."""
    return TITLES.get(kind_of(report))


def block_rows(report: dict) -> list[tuple[str, str, dict, dict | None]]:
    """(name, label, row, eval row or None) of the kind's block metrics the run logs."""
    metrics = report.get("metrics") or {}
    out = []
    for name in BLOCKS.get(kind_of(report), ()):
        row = metrics.get(name)
        if row is not None:
            out.append((name, LABELS.get(name, name), row, metrics.get("eval_" + name)))
    return out


def _spark(row: dict, width: int) -> str:
    buckets = np.asarray(row.get("buckets") or [], dtype=np.float64)
    return spark_lines(bucket_means(buckets, width))[0] if buckets.size and width > 0 else ""


def signed(value) -> str:
    """A gap with its sign (+0.12, -3.4e-05)."""
    text = short(value)
    return "+" + text if isinstance(value, (int, float)) and value > 0 else text


def gap_text(name: str, pair: dict) -> Text:
    """One eval pair in a line: `loss gap +0.12 ↑ 5 evals · overfitting` (the gap is eval − train)."""
    out = Text()
    out.append(f"{clean(name, 24)} gap ", style="dim")
    out.append(signed(pair.get("gap")), style="bold")
    out.append(f" {TREND_ARROWS.get(pair.get('gap_trend'), '?')} {pair.get('points', 0)} evals", style="dim")
    if pair.get("overfitting"):
        out.append(" · overfitting", style="bold yellow")
    return out


def workload_lines(report: dict, width: int = 60) -> Text:
    """The Rewards pane's body for a run that is not RL: one line per block metric (train, eval, trend, history),
    then the eval gaps of the block and of the loss."""
    kind = kind_of(report)
    rows = block_rows(report)
    out = Text(INTROS.get(kind, ""), style="dim")
    if not rows:
        out.append("\nno steps with these metrics yet", style="dim")
        return out
    label_w = max(8, min(14, max(len(r[1]) for r in rows)))
    spark_w = max(0, width - label_w - 22)
    out.append("\n")
    out.append(f"{'':<{label_w}} {'train':>8} {'eval':>8} ↕ " + ("history" if spark_w >= 7 else ""), style="dim")
    for _name, label, row, evaluated in rows:
        out.append("\n")
        out.append(f"{clean(label, label_w):<{label_w}} ", style="bold")
        out.append(f"{short(row.get('last')):>8} ")
        out.append(f"{short(evaluated.get('last')) if evaluated else '—':>8} ", style="" if evaluated else "dim")
        out.append(TREND_ARROWS.get(row.get("trend"), "?") + " ")
        out.append(_spark(row, spark_w), style="magenta")
    pairs = report.get("eval_pairs") or {}
    shown = [n for n in dict.fromkeys(("loss", *BLOCKS.get(kind, ()))) if n in pairs][:3]
    for name in shown:
        out.append("\n")
        out.append_text(gap_text(LABELS.get(name, name), pairs[name]))
    return out


def workload_table(report: dict) -> Table:
    """The text report's block for a run that is not RL (in place of the empty reward-batch table)."""
    kind = kind_of(report)
    table = PlainTable(
        title=f"{TITLES.get(kind, 'Rewards')}: {SHORT_INTROS.get(kind, '')}",
        box=box.SIMPLE_HEAD,
        title_justify="left",
        pad_edge=False,
    )
    for col, justify in (("metric", "left"), ("train", "right"), ("eval", "right"), ("↕", "center")):
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    table.add_column("min…max", no_wrap=True)
    for name, label, row, evaluated in block_rows(report):
        table.add_row(
            Text(f"{clean(label, 20)} ({clean(name, 24)})" if label != name else clean(name, 40)),
            short(row.get("last")),
            short(evaluated.get("last")) if evaluated else "—",
            TREND_ARROWS.get(row.get("trend"), "?"),
            f"{compact(row.get('min'))}…{compact(row.get('max'))}",
        )
    return table


def eval_pairs_table(report: dict) -> Table | None:
    """Every eval metric against its training twin: newest values, gap (eval − train) and its trend, evals, and
    the overfitting verdict where the metric has a direction (losses: lower is better; accuracies, margins:
    higher). None when the run has no eval metrics."""
    pairs = report.get("eval_pairs") or {}
    if not pairs:
        return None
    table = PlainTable(title="Eval vs train", box=box.SIMPLE_HEAD, title_justify="left", pad_edge=False)
    for col in ("metric", "train", "eval", "gap", "gap ↕", "evals", "verdict"):
        table.add_column(col, no_wrap=True, justify="left" if col in ("metric", "verdict") else "right")
    for name, pair in pairs.items():
        verdict = {True: "overfitting", False: "ok", None: "—"}[pair.get("overfitting")]
        table.add_row(
            Text(clean(name, 40)),
            short(pair.get("train_last")),
            short(pair.get("eval_last")),
            signed(pair.get("gap")),
            TREND_ARROWS.get(pair.get("gap_trend"), "?"),
            str(pair.get("points", 0)),
            verdict,
        )
    return table
