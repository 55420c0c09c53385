"""Trainer-aware views without training: the kind of a run, its metric order, KL/entropy units, eval metrics
against their training twins (the gap and the overfitting verdict), the derived rows, the overlay's unit rule
and the text report's blocks."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rlhf_tui.analysis.report import build_report
from rlhf_tui.analysis.store import Store
from rlhf_tui.analysis.thresholds import Thresholds
from rlhf_tui.analysis.trends import eval_gap_series, eval_pair
from rlhf_tui.analysis.workloads import eval_pairs, ordered_metrics, workload_kind
from rlhf_tui.bridge.wire.metrics import is_summary, metric_units, normalise, trainer_units
from rlhf_tui.tui.render import render_text
from rlhf_tui.tui.widgets.model import series, split_units, view_report
from rlhf_tui.tui.workload import workload_lines

NAN = math.nan
DPO_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen")


def sft_store(steps: int = 12, overfit: bool = True, trainer: str = "SFTTrainer") -> Store:
    """An SFT-like run: training loss falls, the eval loss (every 2nd step) rises when `overfit`."""
    store = Store()
    run = store.run("sft")
    run.meta["trainer"] = trainer
    for s in range(1, steps + 1):
        logs = {"loss": 2.0 - 0.1 * s, "entropy": 4.5, "mean_token_accuracy": 0.05 * s, "num_tokens": 20.0 * s}
        run.add_step(s, {**normalise(logs), "time/step_s": 0.5})
        if s % 2 == 0:
            run.add_step(s, normalise({"eval_loss": 1.5 + (0.02 if overfit else -0.05) * s, "eval_runtime": 0.1}))
    return store


def dpo_store(steps: int = 8) -> Store:
    store = Store()
    run = store.run("dpo")
    run.meta["trainer"] = "DPOTrainer"
    for s in range(1, steps + 1):
        logs = {k: 0.01 * s for k in DPO_KEYS} | {"loss": 0.69 - 0.01 * s, "logps/rejected": -9.0, "grad_norm": 1.0}
        run.add_step(s, normalise(logs))
        run.add_step(s, normalise({"eval_loss": 0.7, "eval_rewards/accuracies": 0.5, "eval_runtime": 0.01}))
    return store


# -- kinds and order --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("trainer", "names", "kind"),
    [
        ("GRPOTrainer", ["loss"], "rl"),
        ("OnlineDPOTrainer", list(DPO_KEYS), "rl"),  # preference keys, but an RL trainer
        ("MyGRPOTrainer", [], "rl"),  # a subclass named after its base
        ("DPOTrainer", [], "preference"),
        ("KTOTrainer", [], "preference"),
        ("RewardTrainer", [], "reward_model"),
        ("SFTTrainer", [], "language_model"),
        ("Trainer", ["loss"], "language_model"),
        ("unknown", ["rewards/chosen", "rewards/rejected", "loss"], "preference"),  # a trainer_state.json
        ("unknown", ["accuracy", "margin", "loss"], "reward_model"),
        ("custom", ["ppo/loss/policy", "objective/kl"], "rl"),  # a legacy PPO loop
        ("custom", ["loss", "grad_norm"], "language_model"),
        ("custom", ["reward", "kl", "loss"], "rl"),
        (None, [], "rl"),
    ],
)
def test_the_kind_of_a_run_from_its_trainer_else_its_keys(trainer, names, kind):
    assert workload_kind(trainer, names) == kind


def test_each_kind_shows_its_block_first_and_eval_metrics_next_to_their_twins():
    names = [*DPO_KEYS, "logps/rejected", "loss", "eval_loss", "eval_rewards/accuracies", "eval_runtime", "reward"]
    names += ["grad_norm", "eval_logps/chosen", "zzz", "eval_num_tokens", "num_tokens"]
    order = ordered_metrics(names, "preference")
    assert order[:4] == ["rewards/accuracies", "eval_rewards/accuracies", "rewards/margins", "rewards/chosen"]
    assert order.index("eval_logps/chosen") == order.index("logps/chosen") + 1
    assert order.index("eval_loss") == order.index("loss") + 1
    assert order[-4:] == ["eval_num_tokens", "eval_runtime", "num_tokens", "zzz"]  # bookkeeping: no twin
    rl = ordered_metrics(["zzz", "kl", "reward", "loss", "eval_loss"])  # RL: the canonical order, as before
    assert rl == ["reward", "kl", "loss", "eval_loss", "zzz"]
    assert eval_pairs(names) == [
        ("logps/chosen", "eval_logps/chosen"),
        ("loss", "eval_loss"),
        ("rewards/accuracies", "eval_rewards/accuracies"),
    ]


# -- units ------------------------------------------------------------------------------------------------
def test_units_of_kl_and_entropy_follow_the_key_they_came_from_and_the_trainer():
    grpo = metric_units("GRPOTrainer", ["kl", "entropy", "eval_entropy"])
    assert grpo == {"kl": "per token", "entropy": "per token", "eval_entropy": "per token"}
    odpo = metric_units("OnlineDPOTrainer", ["objective/kl", "kl", "objective/entropy", "entropy"])
    assert set(odpo.values()) == {"per sequence"} and len(odpo) == 4
    legacy = metric_units("custom", ["objective/kl", "kl", "ppo/policy/entropy", "objective/entropy", "entropy"])
    assert legacy["kl"] == "per sequence" and legacy["entropy"] == "per token"  # ppo/policy/entropy comes first
    assert metric_units("custom", ["kl", "entropy"]) == {}  # nothing says: no unit shown
    # a custom loop that logs its own `entropy` beside objective/entropy: the values tell the alias from the key
    same = metric_units("custom", ["entropy", "objective/entropy"], same=lambda a, b: True)
    own = metric_units("custom", ["entropy", "objective/entropy"], same=lambda a, b: False)
    assert same["entropy"] == "per sequence" and "entropy" not in own
    recorded = metric_units("custom", ["kl"], recorded={"kl": "per token", "entropy": "[bold]x", "x": "per token"})
    assert recorded == {"kl": "per token"}  # meta from the wire: only known units of known names


def test_units_of_a_trainer_class_through_its_mro():
    class GRPOTrainer:  # stands in for trl's (only the name matters)
        pass

    class MyTrainer(GRPOTrainer):
        pass

    assert trainer_units(MyTrainer()) == {"kl": "per token", "entropy": "per token"}
    assert trainer_units("OnlineDPOTrainer") == {"kl": "per sequence", "entropy": "per sequence"}
    assert trainer_units("GRPOTrainer/RLOOTrainer")["kl"] == "per token"
    assert trainer_units(object()) == {} and trainer_units("Trainer") == {}


def test_a_step_log_with_running_throughput_is_not_the_summary():
    # transformers with include_num_input_tokens_seen: every step's log carries train_runtime
    assert not is_summary({"loss": 4.3, "train_runtime": 0.04, "train_tokens_per_second": 566.1})
    assert is_summary({"train_runtime": 0.1, "train_samples_per_second": 73.8, "train_loss": 4.3})


# -- eval against train -----------------------------------------------------------------------------------
def test_the_gap_compares_each_eval_with_the_training_mean_since_the_previous_eval():
    train = [1.0, 0.8, NAN, 0.6, NAN, NAN, 0.2]
    evaluated = [NAN, 1.0, NAN, NAN, 1.1, NAN, 1.3]
    gap = eval_gap_series(train, evaluated)
    assert np.isnan(gap[[0, 2, 3, 5]]).all()
    assert gap[1] == pytest.approx(1.0 - 0.9)  # mean of rows 0-1
    assert gap[4] == pytest.approx(1.1 - 0.6)  # only row 3 in between
    assert gap[6] == pytest.approx(1.3 - 0.2)
    assert np.isnan(eval_gap_series([NAN, NAN], [1.0, NAN])[0])  # no training value yet: no gap
    assert eval_gap_series([0.5, NAN, NAN], [NAN, NAN, 0.9])[2] == pytest.approx(0.4)  # the newest earlier one


def test_overfitting_when_the_gap_widens_and_the_eval_metric_does_not_improve():
    n = 12
    falling = 2.0 - 0.1 * np.arange(n)
    rising_eval = np.where(np.arange(n) % 2 == 1, 1.5 + 0.02 * np.arange(n), NAN)
    pair = eval_pair("loss", falling, rising_eval)
    assert pair["overfitting"] is True and pair["gap_trend"] == "increasing" and pair["better"] == "lower"
    assert pair["points"] == 6 and pair["eval_last"] == pytest.approx(1.72)
    both_fall = eval_pair("loss", falling, np.where(np.arange(n) % 2 == 1, 1.9 - 0.05 * np.arange(n), NAN))
    assert both_fall["overfitting"] is False  # the eval loss still improves
    accuracy = eval_pair("eval_accuracy", 0.05 * np.arange(n), np.where(np.arange(n) % 2 == 1, 0.3, NAN))
    assert accuracy["overfitting"] is True and accuracy["better"] == "higher"  # training 0.55 pulled ahead of 0.3
    catching_up = eval_pair("accuracy", 0.02 * np.arange(n), np.where(np.arange(n) % 2 == 1, 0.5, NAN))
    assert catching_up["gap_trend"] == "decreasing" and catching_up["overfitting"] is False  # still below eval
    assert eval_pair("loss", falling, [NAN] * 10 + [1.0, 1.0])["overfitting"] is None  # 2 evals: too few
    assert eval_pair("logps/chosen", falling, rising_eval)["overfitting"] is None  # no direction


def test_the_report_has_kind_eval_pairs_and_the_recorded_units():
    store = sft_store()
    store.current_run.meta["units"] = {"entropy": "per token", "kl": "per minute"}
    report = build_report(store, Thresholds())
    assert report["run"]["kind"] == "language_model" and report["run"]["units"] == {"entropy": "per token"}
    loss = report["eval_pairs"]["loss"]
    assert loss["eval"] == "eval_loss" and loss["points"] == 6 and loss["overfitting"] is True
    assert loss["gap"] == pytest.approx(1.74 - 0.85)
    documented = {"eval", "train_last", "eval_last", "gap", "gap_mean", "points", "gap_trend", "train_trend"}
    assert set(loss) == documented | {"eval_trend", "better", "overfitting"}  # docs/monitor.md, Eval against train
    assert list(report["metrics"])[:3] == ["loss", "eval_loss", "mean_token_accuracy"]
    assert build_report(Store())["eval_pairs"] == {}


# -- the monitor's view -----------------------------------------------------------------------------------
def test_derived_rows_the_gap_after_eval_loss_and_tokens_per_second():
    store = sft_store()
    report = view_report(store, Thresholds(), spark_width=10)
    names = list(report["metrics"])
    assert names[:4] == ["loss", "eval_loss", "loss: eval−train", "mean_token_accuracy"]
    gap = report["metrics"]["loss: eval−train"]
    assert gap["derived"] and gap["count"] == 6 and gap["band"] is None and gap["trend"] == "increasing"
    rate = report["metrics"]["tokens/s"]
    assert rate["last"] == pytest.approx(40.0) and rate["count"] == 11  # 20 tokens a step, 0.5 s a step
    assert names.index("tokens/s") == names.index("num_tokens") - 1
    steps, values = series(store.current_run, "loss: eval−train")  # Enter on the row charts it
    assert list(steps) == [2, 4, 6, 8, 10, 12] and values[-1] == pytest.approx(gap["last"])
    assert report["metrics"]["entropy"]["unit"] == "per token" and report["metrics"]["loss"]["unit"] is None
    assert "tokens/s" not in build_report(store)["metrics"]  # the JSON's metrics are what was logged


def test_tokens_per_second_from_wall_clocks_without_step_time():
    store = Store()
    run = store.run("plain")
    run.meta["trainer"] = "Trainer"
    for s in range(1, 5):
        run.add_step(s, {"loss": 1.0, "num_input_tokens_seen": 100.0 * s}, timestamp=10.0 + 2 * s)
    rate = view_report(store, Thresholds())["metrics"]["tokens/s"]
    assert rate["last"] == pytest.approx(50.0) and rate["count"] == 3


def test_the_overlay_keeps_one_unit():
    series_ = [
        {"label": "a", "unit": "per token"},
        {"label": "b", "unit": "per sequence", "active": True},
        {"label": "c", "unit": None},
        {"label": "d", "unit": "per token"},
    ]
    kept, left_out = split_units(series_)
    assert [s["label"] for s in kept] == ["b", "c"] and [s["label"] for s in left_out] == ["a", "d"]
    kept, left_out = split_units([{"label": "a", "unit": None}, {"label": "b", "unit": "per token"}])
    assert len(kept) == 2 and not left_out


def test_panes_and_text_of_a_dpo_run_show_its_block_not_reward_batches():
    report = view_report(dpo_store(), Thresholds(), spark_width=12)
    assert list(report["metrics"])[:3] == ["rewards/accuracies", "eval_rewards/accuracies", "rewards/margins"]
    body = workload_lines(report, width=70).plain
    assert "implicit rewards" in body and "monitor_rewards" not in body
    line = next(x for x in body.splitlines() if x.startswith("accuracy"))
    assert "0.08" in line and "0.5" in line  # train and eval
    assert "loss gap" in body
    text = render_text(report, width=120, stamp=False)
    assert "Preferences: implicit rewards" in text and "Eval vs train" in text
    assert "Rewards: stability" not in text  # no empty reward-batch table
    pairs = text[text.index("Eval vs train") :].splitlines()
    assert any(x.split()[:4] == ["loss", "0.61", "0.7", "+0.09"] and "overfitting" in x for x in pairs)
    accuracy = next(x for x in pairs if x.strip().startswith("rewards/accuracies"))
    assert accuracy.split()[1:4] == ["0.08", "0.5", "+0.42"] and "ok" in accuracy  # training is behind eval


def test_text_report_of_an_rl_run_is_unchanged_but_for_the_units(make_store):
    text = render_text(view_report(make_store(), Thresholds(), spark_width=24), width=120, stamp=False)
    assert "Rewards: stability" in text and "Eval vs train" not in text
    assert any(x.strip().startswith("entropy /tok") for x in text.splitlines())
