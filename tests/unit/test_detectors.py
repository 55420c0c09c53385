"""Anomaly detectors: hand-built series that must fire and must not fire, alarm hygiene, unit invariance,
a growing history re-evaluated through one cache == a cold pass, and the labelled real TRL traces."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import re

import numpy as np
import pytest
from conftest import TRACES, grpo_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf_tui.analysis.detectors import (
    DETECTORS,
    REGISTRY,
    SEVERITIES,
    DetectionCache,
    detect,
    evaluate,
    rules,
    severity_at_least,
)
from rlhf_tui.analysis.store import steps_from_records
from rlhf_tui.analysis.thresholds import Thresholds

TH = Thresholds()


# -- helpers ------------------------------------------------------------------------------------------------
def dpo_run(n: int = 300, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    t = np.arange(n)
    acc = np.clip(np.round((0.5 + t / 40) * 8) / 8, 0, 1)
    margins = 0.3 * (1 - np.exp(-t / 80)) + 0.05 * rng.standard_normal(n)
    chosen = -5.5 + 0.8 * rng.standard_normal(n)
    return {
        "loss": 0.693 - 0.15 * (1 - np.exp(-t / 80)) + 0.02 * rng.standard_normal(n),
        "rewards/accuracies": acc,
        "rewards/margins": margins,
        "reward": margins,
        "rewards/chosen": 0.1 * margins,
        "rewards/rejected": -0.9 * margins,
        "logps/chosen": chosen,
        "logps/rejected": chosen - 1 - 0.1 * t / n,
        "grad_norm": 0.7 + 0.05 * rng.standard_normal(n),
        "entropy": 1 + 0.15 * rng.standard_normal(n),
        "learning_rate": np.full(n, 5e-5),
    }


def run(
    metrics: dict,
    meta: dict | None = None,
    th: Thresholds = TH,
    logged: dict | None = None,
    steps: np.ndarray | None = None,
) -> list[dict]:
    n = len(next(iter(metrics.values())))
    steps = np.arange(1, n + 1) if steps is None else steps
    return detect((steps, metrics, logged, meta or {}), th)


def alarms(episodes: list[dict], level: str = "medium") -> list[dict]:
    return [e for e in episodes if severity_at_least(e["severity"], level)]


def first_alarm(episodes: list[dict], detector: str | None = None) -> dict | None:
    eps = [e for e in alarms(episodes) if detector is None or e["detector"] == detector]
    return min(eps, key=lambda e: e["step"]) if eps else None


def grown(metrics: dict, meta: dict | None = None, th: Thresholds = TH, steps=None, chunk: int = 1) -> list[dict]:
    """The episodes of the whole history, evaluated as it grows `chunk` rows at a time through one cache; every
    pass must equal a cold pass over the same rows."""
    n = len(next(iter(metrics.values())))
    steps = np.arange(1, n + 1) if steps is None else np.asarray(steps)
    cache, got = DetectionCache(), []
    for end in [*range(chunk, n, chunk), n]:
        part = (steps[:end], {k: np.asarray(v)[:end] for k, v in metrics.items()}, None, meta or {})
        got = evaluate(part, th, cache=cache)[0]
        if end % (7 * chunk) == 0 or end == n:  # a cold pass now and then (each costs a whole pass)
            assert got == detect(part, th), f"after {end} rows"
    return got


# -- registry and severities --------------------------------------------------------------------------------
def test_severities_and_registry():
    assert SEVERITIES == ("low", "medium", "high", "critical")
    assert severity_at_least("critical", "medium") and severity_at_least("medium", "medium")
    assert not severity_at_least("low", "medium") and not severity_at_least(None, "low")
    assert all(isinstance(v, str) and v for v in DETECTORS.values())
    fields = {f.name for f in dataclasses.fields(Thresholds)}
    for record in REGISTRY.values():
        assert set(record.settings) <= fields and record.severities == tuple(sorted(record.severities))
        assert DETECTORS[record.name] == record.means
        message, recommendation = record.words("kl", 1.5, 2.0)
        assert message and recommendation


def test_the_series_wanted_are_those_some_record_reads():
    """series_wanted matches every record's patterns at once; it must agree with the records one by one."""
    from rlhf_tui.analysis.detectors.registry import series_wanted

    names = [p.replace("*", "x") for r in REGISTRY.values() for p in r.series]
    names += ["rewards/acc/mean", "rewards/acc/std", "reward", "Reward", "kl_extra", "x/kl", "memory/gpu_mb2", ""]
    assert series_wanted(names) == {n for n in names if any(r.reads(n) for r in REGISTRY.values())}
    assert "rewards/acc/mean" in series_wanted(names) and "Reward" not in series_wanted(names)


def test_every_detector_a_rule_raises_has_a_record():
    src = inspect.getsource(rules)
    raised = set(re.findall(r'yield "([a-z_]+)"', src))
    from rlhf_tui.analysis.reward_episodes import DETECTORS as REWARD_BATCH_DETECTORS  # raised per reward batch

    assert (
        raised
        and raised <= set(REGISTRY)
        and set(REGISTRY) - raised - set(REWARD_BATCH_DETECTORS)
        <= {
            "nonfinite",
            "zscore",
        }
    )
    assert set(REWARD_BATCH_DETECTORS) <= set(REGISTRY)


def test_episode_fields_and_contract_keys():
    m = grpo_run(200)
    m["reward"] = m["reward"].copy()
    m["reward"][150:] *= 400
    eps = run(m)
    assert eps == sorted(eps, key=lambda e: (e["step"], e["detector"], e["metric"]))
    for e in eps:
        assert e["detector"] in DETECTORS and e["severity"] in SEVERITIES
        assert e["step"] == e["first_step"] <= e["peak_step"] <= e["last_step"]
        assert e["count"] >= 1 and isinstance(e["ongoing"], bool)
        assert e["value"] is None or math.isfinite(e["value"])
        assert isinstance(e["message"], str) and e["message"] and e["recommendation"]
        # an episode's first step is the step it first reached its lowest recorded severity
        assert min(e["severity_steps"].values()) == e["step"]
        if severity_at_least(e["severity"], "medium"):
            assert e["severity_steps"]["medium"] == e["step"]
    json.dumps(eps)


# -- healthy series must stay quiet ---------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_healthy_grpo_run_raises_no_medium_alarm(seed):
    eps = run(grpo_run(400, seed), {"trainer": "GRPOTrainer"})
    assert alarms(eps) == []
    assert any(e["detector"] == "kl_spike" for e in eps)  # isolated x100 KL spikes: low only


def test_healthy_dpo_run_raises_no_medium_alarm():
    eps = run(dpo_run(300), {"trainer": "DPOTrainer"})
    assert alarms(eps) == []
    assert any(e["detector"] == "dpo_accuracy_pinned" and e["severity"] == "low" for e in eps)


def test_constant_series_never_fire():
    n = 200
    m = {
        name: np.full(n, 1.0)
        for name in (
            "kl",
            "entropy",
            "reward",
            "reward_std",
            "loss",
            "grad_norm",
            "completion_length",
            "rewards/a/mean",
            "step_time",
        )
    }
    m["reward"] = np.full(n, 1.0)
    m["clip_ratio"] = np.zeros(n)
    m["frac_reward_zero_std"] = np.zeros(n)
    assert run(m) == []


@pytest.mark.parametrize("n", [0, 1, 2, 5, 15, 20])
def test_very_short_runs_do_not_alarm(n):
    m = {k: v[:n] for k, v in grpo_run(400, 3).items()}
    if n:
        m["reward"] = m["reward"].copy()
        m["reward"][-1] *= 1000  # a huge value, but no baseline yet (warm-up)
    eps = run(m) if n else detect((np.arange(0), {}, None, None), TH)
    assert alarms(eps) == []


# -- non-finite values ------------------------------------------------------------------------------------------
def test_nan_none_inf_where_logged_are_critical_even_in_grace():
    hist = steps_from_records([(s, {"loss": 0.1, "reward": 1.0}) for s in range(1, 40)])
    hist.add_step(40, {"loss": float("nan"), "reward": None})
    hist.add_step(41, {"loss": float("inf"), "reward": 1.0})
    hist.add_step(42, {"loss": 0.1})  # reward absent: not an alarm
    eps = detect(hist, TH)
    crit = [e for e in eps if e["severity"] == "critical"]
    assert {(e["metric"], e["step"]) for e in crit} == {("loss", 40), ("reward", 40)}
    loss = next(e for e in crit if e["metric"] == "loss")
    assert loss["count"] == 2 and loss["last_step"] == 41 and loss["value"] is None

    early = steps_from_records([(1, {"loss": None})])
    assert [e["detector"] for e in detect(early, TH)] == ["nonfinite"]


def test_without_logged_masks_only_infinities_are_non_finite():
    m = {"loss": np.r_[np.full(30, 0.1), np.nan, np.inf, np.full(5, 0.1)]}
    crit = [e for e in run(m) if e["detector"] == "nonfinite"]
    assert [(e["step"], e["metric"]) for e in crit] == [(32, "loss")]


# -- generic z-score -------------------------------------------------------------------------------------------
def test_zscore_excludes_current_point_and_is_low():
    rng = np.random.default_rng(1)
    x = 5 + rng.standard_normal(200) * 0.1
    x[150] = 6.0  # 10 spreads: the seed's window would dilute it
    eps = [e for e in run({"my_metric": x}) if e["step"] == 151]
    assert eps and eps[0]["detector"] == "zscore" and eps[0]["severity"] == "low"
    assert eps[0]["value"] == pytest.approx(6.0) and "above" in eps[0]["message"]


def test_zscore_threshold_is_the_seeds_anomaly_threshold():
    rng = np.random.default_rng(2)
    m = {"my_metric": rng.standard_normal(2000)}
    loose = run(m, th=TH.replace(anomaly_threshold=3.0))
    strict = run(m, th=TH.replace(anomaly_threshold=5.0))
    assert len(loose) > len(run(m)) > len(strict)


def test_mute_a_detector():
    m = grpo_run(300)
    assert not [
        e for e in run(m, th=TH.replace(muted=["kl_spike", "zscore"])) if e["detector"] in ("kl_spike", "zscore")
    ]


# -- KL -----------------------------------------------------------------------------------------------------------
def test_isolated_kl_spikes_are_low_a_level_shift_is_runaway():
    m = grpo_run(300, 4)
    kl = np.abs(m["kl"]).copy()
    kl[200:] = kl[200:] * 60
    m["kl"] = kl
    eps = run(m)
    first = first_alarm(eps, "kl_runaway")
    assert first is not None and 201 < first["step"] <= 201 + TH.persist_n + 2
    assert first_alarm(eps)["step"] > 200


def test_kl_per_sequence_and_per_token_scales_give_the_same_episodes():
    m = grpo_run(300, 5)
    m["kl"] = m["kl"].copy()
    m["kl"][180:] *= 40
    per_token = run(m)
    m30 = dict(m, kl=m["kl"] * 30.0, entropy=m["entropy"] * 30.0)
    per_seq = run(m30)

    def key(eps):
        return [(e["detector"], e["metric"], e["step"], e["severity"]) for e in eps]

    assert key(per_token) == key(per_seq)
    assert first_alarm(per_seq, "kl_runaway") is not None


def test_negative_kl_estimates_runaway_both_ways():
    rng = np.random.default_rng(6)
    kl = 0.005 * rng.standard_normal(300)
    kl[150:] -= 0.5 + 0.1 * rng.standard_normal(150)
    first = first_alarm(run({"kl": kl}), "kl_runaway")
    assert first is not None and first["step"] <= 160


# -- entropy ------------------------------------------------------------------------------------------------------
def test_entropy_collapse_fires_on_fraction_lost_not_on_normal_decline():
    n = 300
    t = np.arange(n)
    normal = 2.0 * (0.3 + 0.7 * np.exp(-t / 60))  # -70 % early: documented as normal
    assert not [e for e in run({"entropy": normal}) if e["detector"] == "entropy_collapse"]
    collapse = 2.0 * np.exp(-t / 30)
    eps = [e for e in run({"entropy": collapse}) if e["detector"] == "entropy_collapse"]
    assert (
        eps and eps[0]["severity"] == "high" and eps[0]["severity_steps"]["medium"] < eps[0]["severity_steps"]["high"]
    )
    # per-sequence sums (x 30) collapse the same way
    assert [e["step"] for e in run({"entropy": collapse * 30}) if e["detector"] == "entropy_collapse"] == [
        e["step"] for e in eps
    ]


# -- rewards ------------------------------------------------------------------------------------------------------
def test_reward_scale_jump_fires_on_its_second_step():
    m = grpo_run(300, 7)
    for k in ("reward", "reward_std", "rewards/sentiment/mean", "rewards/format/mean"):
        m[k] = m[k].copy()
        m[k][200:] *= 400
    first = first_alarm(run(m))
    assert first["step"] == 202 and first["detector"] == "reward_scale" and first["severity"] == "high"
    once = grpo_run(300, 7)  # one odd batch (a completion that stopped early) is not a scale change
    once["reward_std"] = once["reward_std"].copy()
    once["reward_std"][200] *= 400
    assert not [e for e in run(once) if e["detector"] == "reward_scale"]


def test_reward_dropping_is_a_level_shift():
    m = grpo_run(300, 8)
    for k in ("reward", "rewards/sentiment/mean"):
        m[k] = m[k].copy()
        m[k][200:] -= 0.9
    first = first_alarm(run(m))
    assert first["detector"] == "reward_shift" and 201 <= first["step"] <= 206 and "dropped" in first["message"]


def test_nan_rewards_break_the_reward_identity():
    m = grpo_run(300, 9)
    m["reward"] = m["reward"].copy()
    m["reward"][200:] -= 0.3 * m["rewards/sentiment/mean"][200:]  # 30 % of one function's rewards NaN -> 0
    first = first_alarm(run(m))
    assert (first["detector"], first["step"], first["severity"]) == ("reward_mismatch", 201, "high")


def test_weighted_rewards_never_arm_the_identity_check():
    m = grpo_run(300, 10)
    m["reward"] = m["rewards/sentiment/mean"] * 0.5 + m["rewards/format/mean"]
    assert not [e for e in run(m) if e["detector"] == "reward_mismatch"]


def test_reward_hacking_needs_a_climb_and_a_hacking_sign():
    base = grpo_run(300, 11)
    climb = np.clip(np.arange(300) - 200, 0, None) * 0.15
    m = dict(base, reward=base["reward"] + climb, **{"rewards/sentiment/mean": base["rewards/sentiment/mean"] + climb})
    eps = run(m)
    assert first_alarm(eps)["detector"] == "reward_shift" and not first_alarm(eps, "reward_hacking")
    clipped = np.where(np.arange(300) > 205, 1.0, 0.0)
    hack = first_alarm(run(dict(m, **{"completions/clipped_ratio": clipped})), "reward_hacking")
    assert hack is not None and hack["severity"] == "high" and 206 < hack["step"] <= 215
    # with args, completion length at the limit is a sign too
    length = np.where(np.arange(300) > 205, 20.0, base["completion_length"])
    hack2 = first_alarm(
        run(dict(m, completion_length=length), {"args": {"max_completion_length": 20}}), "reward_hacking"
    )
    assert hack2 is not None


def test_no_learning_signal():
    m = grpo_run(300, 12)
    frac = m["frac_reward_zero_std"].copy()
    frac[200:] = 1.0
    first = first_alarm(run(dict(m, frac_reward_zero_std=frac)), "no_learning_signal")
    assert first is not None and first["metric"] == "frac_reward_zero_std" and first["step"] <= 204
    std = m["reward_std"].copy()
    std[200:] = 0.01
    eps = [e for e in run(dict(m, reward_std=std)) if e["detector"] == "no_learning_signal"]
    assert eps and eps[0]["metric"] == "reward_std" and eps[0]["severity"] == "high"


def test_tied_groups_vanishing_is_reward_noise():
    rng = np.random.default_rng(21)
    m = grpo_run(300, 21)
    tied = rng.choice([0.25, 0.375, 0.5, 0.625], 300)  # a rule-based reward: many groups tie
    noisy = np.where(np.arange(300) >= 200, 0.0, tied)  # from row 200 the reward is continuous: no group ties
    eps = [e for e in run(dict(m, frac_reward_zero_std=noisy)) if e["detector"] == "reward_noise"]
    assert len(eps) == 1 and eps[0]["severity"] == "medium" and 201 <= eps[0]["step"] <= 210
    # always 0 (a reward model, or scale_rewards="batch"), or fewer ties but some left: nothing
    for frac in (
        np.zeros(300),
        np.where(np.arange(300) >= 200, rng.choice([0.0, 0.125, 0.25], 300, p=[0.2, 0.4, 0.4]), tied),
    ):
        assert not [e for e in run(dict(m, frac_reward_zero_std=frac)) if e["detector"] == "reward_noise"]


# -- losses, gradients, clip ratio, learning rate -----------------------------------------------------------------
def test_grad_norm_spike_is_low_a_held_rise_is_medium():
    m = grpo_run(300, 13)
    g = m["grad_norm"].copy()
    g[150] *= 50
    eps = run(dict(m, grad_norm=g))
    assert [e["severity"] for e in eps if e["detector"] == "grad_norm_spike"] == ["low"]
    assert not alarms(eps)
    g[200:] *= 15
    first = first_alarm(run(dict(m, grad_norm=g)), "grad_norm_shift")
    assert first is not None and 201 < first["step"] <= 206


def test_value_loss_blowup_ppo():
    rng = np.random.default_rng(14)
    vl = 0.5 + 0.05 * rng.standard_normal(300)
    vl[220:] *= 30
    first = first_alarm(
        run({"value_loss": vl, "policy_loss": 0.01 * rng.standard_normal(300)}, {"trainer": "PPOTrainer"}),
        "value_loss_blowup",
    )
    assert first is not None and first["severity"] == "high" and first["step"] <= 225


def test_clip_ratio_only_when_off_policy():
    m = grpo_run(300, 15)
    assert not [e for e in run(m) if e["detector"] == "clip_ratio"]  # GRPO, num_iterations=1: all 0
    rng = np.random.default_rng(15)
    clip = np.clip(0.05 + 0.01 * rng.standard_normal(300), 0, 1)
    clip[200:] = 0.6
    off = first_alarm(run(dict(m, clip_ratio=clip), {"args": {"num_iterations": 2}}), "clip_ratio")
    assert off is not None and off["step"] <= 205
    armed_by_history = first_alarm(run(dict(m, clip_ratio=clip)), "clip_ratio")  # no args: nonzero seen
    assert armed_by_history is not None


def test_learning_rate_schedules_are_fine_jumps_are_not():
    n = 300
    warm_cos = np.where(
        np.arange(n) < 20, np.arange(n) / 20 * 5e-5, 5e-5 * 0.5 * (1 + np.cos(np.pi * np.arange(n) / n))
    )
    assert not [e for e in run({"learning_rate": warm_cos}) if e["detector"] == "lr_jump"]
    jumped = warm_cos.copy()
    jumped[150:] *= 50
    assert [e["step"] for e in run({"learning_rate": jumped}) if e["detector"] == "lr_jump"] == [151]


# -- DPO ------------------------------------------------------------------------------------------------------------
def test_dpo_label_flip_and_loss_above_ln2():
    m = dpo_run(300, 16)
    acc, loss, mg = m["rewards/accuracies"].copy(), m["loss"].copy(), m["rewards/margins"].copy()
    acc[200:] = 0.25
    loss[200:] = 0.9
    mg[200:] = -0.3
    eps = run(
        dict(m, **{"rewards/accuracies": acc, "loss": loss, "rewards/margins": mg, "reward": mg}),
        {"trainer": "DPOTrainer"},
    )
    first = first_alarm(eps)
    assert first["step"] == 201 and first["detector"] == "dpo_accuracy_drop"
    assert first_alarm(eps, "dpo_loss") is not None


def test_dpo_margins_exploding_and_logps_falling():
    m = dpo_run(300, 17)
    mg = m["rewards/margins"].copy()
    mg[200:] = 20.0
    assert (
        first_alarm(run(dict(m, **{"rewards/margins": mg}), {"trainer": "DPOTrainer"}), "dpo_margin_explosion")
        is not None
    )
    fall = np.clip(np.arange(300) - 200, 0, None) * 0.5
    both = dict(m, **{"logps/chosen": m["logps/chosen"] - fall, "logps/rejected": m["logps/rejected"] - fall})
    falling = [e for e in run(both, {"trainer": "DPOTrainer"}) if e["detector"] == "dpo_logps_falling"]
    assert falling and falling[0]["step"] <= 215 and falling[0]["severity"] == "low"  # a note: common when healthy


# -- memory and step time --------------------------------------------------------------------------------------------
def test_memory_leak_near_oom_and_step_time():
    rng = np.random.default_rng(18)
    n = 400
    flat = 2000 + 5 * rng.standard_normal(n)
    assert not alarms(run({"memory/rss_mb": flat, "memory/gpu_frac": 0.5 + 0.01 * rng.standard_normal(n)}))
    leak = flat + np.clip(np.arange(n) - 100, 0, None) * 3.0  # +0.15 % per step after step 100
    eps = [e for e in run({"memory/rss_mb": leak}) if e["detector"] == "memory_leak"]
    assert eps and eps[0]["severity"] in ("medium", "high")
    frac = np.r_[np.full(300, 0.5), np.full(50, 0.93), np.full(50, 0.99)]
    oom = [e for e in run({"memory/gpu_frac": frac}) if e["detector"] == "memory_near_oom"]
    assert oom[0]["step"] == 301 and oom[0]["severity"] == "critical" and oom[0]["severity_steps"]["high"] == 301
    st = 0.1 * np.exp(0.05 * rng.standard_normal(n))
    st[300:] *= 2.5
    slow = [e for e in run({"time/step_s": st}) if e["detector"] == "step_time_regression"]
    assert slow and 301 <= slow[0]["step"] <= 305 and slow[0]["severity"] == "low"  # a system finding
    evals = np.full(n, np.nan)
    evals[300::2] = 1.0  # from step 301 every other step also ran an evaluation, three times slower
    st2 = 0.1 * np.exp(0.05 * rng.standard_normal(n))
    st2[300::2] *= 3
    timed = run({"step_time": st2, "time/step_s": st2.copy(), "eval_loss": evals})
    assert not [e for e in timed if e["detector"] == "step_time_regression"]  # eval rows left out
    both = run({"step_time": st, "time/step_s": st.copy()})
    assert [e["metric"] for e in both if e["detector"] == "step_time_regression"] == ["step_time"]  # one signal


# -- hygiene -----------------------------------------------------------------------------------------------------------
def test_grace_period_and_cooldown_episodes():
    m = grpo_run(300, 19)
    m["reward"] = m["reward"].copy()
    m["reward"][3:6] = 50  # in the grace period (and before any baseline)
    assert not alarms(run(m))
    g = m["grad_norm"].copy()
    g[100] *= 80
    g[106] *= 80  # within the cooldown: one episode, two flags
    eps = [e for e in run(dict(m, grad_norm=g)) if e["detector"] == "grad_norm_spike"]
    assert len(eps) == 1 and eps[0]["count"] == 2 and (eps[0]["first_step"], eps[0]["last_step"]) == (101, 107)
    assert eps[0]["peak_step"] in (101, 107) and not eps[0]["ongoing"]


def test_ongoing_episode_and_runhistory_input():
    m = grpo_run(250, 20)
    m["reward"] = m["reward"].copy()
    m["reward"][240:] *= 400
    hist = steps_from_records([(i + 1, {k: float(v[i]) for k, v in m.items()}) for i in range(250)])
    a = detect(hist, TH)
    b = run(m, logged={k: np.ones(250, bool) for k in m})
    assert a == b
    assert any(e["ongoing"] and e["detector"] == "reward_scale" for e in a)


def test_threshold_change_reevaluates():
    m = grpo_run(300, 21)
    m["kl"] = m["kl"].copy()
    m["kl"][200:] *= 12
    assert first_alarm(run(m, th=TH.replace(kl_runaway_factor=5.0)), "kl_runaway") is not None
    assert first_alarm(run(m, th=TH.replace(kl_runaway_factor=500.0)), "kl_runaway") is None


# -- a growing history == a cold pass -----------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1])
def test_growing_history_equals_cold_pass_with_faults(seed):
    m = grpo_run(260, seed)
    for k in ("kl", "reward", "reward_std"):
        m[k] = m[k].copy()
    m["kl"][150:] *= 80
    m["reward"][200:] *= 300
    m["reward_std"][230:] = np.nan  # absent rows
    m["memory/rss_mb"] = 2000 + np.arange(260) * 4.0
    m["memory/gpu_frac"] = np.r_[np.full(250, 0.5), np.full(10, 0.95)]
    steps = np.arange(1, 261) * 2  # steps need not be consecutive
    batch = run(m, {"trainer": "GRPOTrainer"}, steps=steps)
    assert alarms(batch)
    assert grown(m, {"trainer": "GRPOTrainer"}, steps=steps, chunk=1 + seed * 12) == batch


def test_growing_history_equals_cold_pass_dpo_muted_and_threshold_changes():
    m = dpo_run(220, 3)
    m["rewards/accuracies"] = m["rewards/accuracies"].copy()
    m["rewards/accuracies"][150:] = 0.25
    meta = {"trainer": "DPOTrainer"}
    assert grown(m, meta, chunk=5) == run(m, meta)
    muted = TH.replace(muted=["dpo_accuracy_drop"], anomaly_threshold=2.5)
    assert grown(m, meta, th=muted, chunk=9) == run(m, meta, th=muted)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10_000), st.integers(30, 160), st.floats(0.0, 0.3), st.integers(1, 40))
def test_growing_history_equals_cold_pass_random(seed, n, missing, chunk):
    rng = np.random.default_rng(seed)
    m = {
        "kl": np.abs(rng.standard_cauchy(n)) * 0.01,
        "reward": rng.standard_normal(n).cumsum() * 0.1,
        "entropy": 1 + 0.3 * rng.standard_normal(n),
        "grad_norm": np.exp(rng.standard_normal(n)),
        "frac_reward_zero_std": rng.choice([0.0, 0.5, 1.0], n),
        "other": rng.standard_normal(n),
    }
    for v in m.values():
        v[rng.random(n) < missing] = np.nan
    m["reward"][n // 2 :] += 5 * rng.random()
    m["other"][rng.random(n) < 0.02] = np.inf
    assert grown(m, chunk=chunk) == run(m)


# -- labelled real traces ----------------------------------------------------------------------------------------------
def _traces():
    if not (TRACES / "labels.json").is_file():
        return []
    labels = json.loads((TRACES / "labels.json").read_text())
    return [(name, lab) for name, lab in sorted(labels.items()) if (TRACES / name / "trainer_state.json").is_file()]


@pytest.mark.skipif(not _traces(), reason=f"no labelled traces in {TRACES}")
@pytest.mark.parametrize("name,label", _traces(), ids=[n for n, _ in _traces()])
def test_real_traces_no_false_alarm_and_detected_within_25_steps(name, label):
    from rlhf_tui.bridge.monitor.sources import load_file_source

    hist = load_file_source(str(TRACES / name / "trainer_state.json")).current_run
    eps = detect(hist, TH)
    onset = label["onset_step"]
    raised = sorted(
        min(s for sev, s in e["severity_steps"].items() if severity_at_least(sev, "medium")) for e in alarms(eps)
    )
    before = [s for s in raised if onset is None or s <= onset]
    assert before == [], f"medium+ alarm before onset / on a healthy run at steps {before}"
    if onset is not None:
        assert raised and raised[0] - onset <= 25, f"first alarm {raised[:1]} vs onset {onset}"
    # the same run re-evaluated as it grows, through one cache, gives the same episodes
    steps, metrics = np.asarray(hist.steps), hist.metrics()
    assert grown(metrics, hist.meta, steps=steps, chunk=17) == detect((steps, metrics, None, hist.meta), TH)


def test_zscore_band_is_the_detectors_own_limit_including_the_fraction_floor():
    """The monitor's band column must show where the generic z-score really fires: for a 0..1 fraction that
    sat still, the floor (not the ~0 spread) sets the width."""
    from rlhf_tui.analysis.detectors import generic_metrics, zscore_band

    th = Thresholds()
    still = np.full(80, 0.1)
    lo, hi = zscore_band(still, th, "completions/clipped_ratio")
    assert hi - lo == pytest.approx(2 * th.anomaly_threshold * th.fraction_floor)
    narrow = zscore_band(still, th)  # without a name only the 0.1 % floor of the level applies
    assert narrow[1] - narrow[0] == pytest.approx(2 * th.anomaly_threshold * 1e-3 * 0.1)
    assert zscore_band(np.arange(5.0), th) is None  # warming up
    assert "learning_rate" not in generic_metrics(["learning_rate", "reward"])


# -- direction and context (issue 13: natural events of healthy runs are not alarms) ---------------------------------
GRPO = {"trainer": "GRPOTrainer"}


def test_a_healthy_run_that_learns_fast_raises_no_alarm_but_a_climb_with_a_tell_is_hacking():
    m = grpo_run(400, 11)
    m = {k: v.copy() for k, v in m.items()}
    t = np.arange(400)
    learn = 1.5 / (1 + np.exp(-(t - 120) / 15))  # accuracy rising fast between steps ~80 and ~160
    for k in ("reward", "rewards/sentiment/mean"):
        m[k] = m[k] + learn
    m["reward_std"] = m["reward_std"] * np.where(t > 160, 0.4, 1.0)  # most groups all-correct afterwards
    m["frac_reward_zero_std"] = np.clip(0.05 + 0.6 * learn / 1.5 + 0.05 * np.sin(t), 0, 1)  # slowly to ~0.65
    assert not alarms(run(m, GRPO)), alarms(run(m, GRPO))
    hacked = {k: v.copy() for k, v in m.items()}
    hacked["completions/clipped_ratio"] = np.where(t > 300, 0.9, 0.0)  # lengths run to the limit ...
    for k in ("reward", "rewards/sentiment/mean"):
        hacked[k][300:] += np.linspace(0, 6, 100)  # ... while the reward climbs
    first = first_alarm(run(hacked, GRPO))
    assert first is not None and first["detector"] == "reward_hacking" and 300 < first["step"] <= 320


def test_a_scheduler_restart_is_not_an_lr_jump_but_a_jump_above_the_peak_is():
    m = grpo_run(400, 12)
    t = np.arange(400)
    restarts = 5e-5 * 0.5 * (1 + np.cos(np.pi * (t % 100) / 100))  # cosine_with_restarts, 4 cycles
    restarts[restarts < 1e-8] = 1e-8
    m["learning_rate"] = restarts
    assert not [e for e in run(m, GRPO) if e["detector"] == "lr_jump"]
    spiked = restarts.copy()
    spiked[250:] = np.maximum(spiked[250:], 5e-4)  # ten times the peak
    m["learning_rate"] = spiked
    jumps = [e for e in run(m, GRPO) if e["detector"] == "lr_jump"]
    assert [e["step"] for e in jumps] == [251]


def test_zero_spread_groups_alarm_near_one_or_on_a_jump_not_while_rising_slowly():
    m = grpo_run(400, 13)
    t = np.arange(400)
    m["frac_reward_zero_std"] = np.clip(0.1 + 0.6 * t / 400 + 0.1 * np.sin(t / 3), 0, 1)  # to ~0.7 slowly
    assert not [e for e in run(m, GRPO) if e["detector"] == "no_learning_signal"]
    jumped = m["frac_reward_zero_std"].copy()
    jumped[250:] = np.minimum(jumped[250:] + 0.45, 0.85)
    m["frac_reward_zero_std"] = jumped
    eps = [e for e in run(m, GRPO) if e["detector"] == "no_learning_signal"]
    assert eps and eps[0]["severity"] == "medium" and 251 <= eps[0]["step"] <= 262
    m["frac_reward_zero_std"] = np.where(t >= 250, 1.0, jumped)
    eps = [e for e in run(m, GRPO) if e["detector"] == "no_learning_signal"]
    assert eps and eps[0]["severity"] == "high"


def test_group_relative_loss_noise_and_dpo_trends_are_not_judged():
    m = grpo_run(300, 14)
    m["loss"] = 1e-4 * np.random.default_rng(1).standard_cauchy(300)  # GRPO: ~0 by construction, heavy noise
    assert not [e for e in run(m, GRPO) if e["metric"] == "loss"]
    d = dpo_run(300, 4)
    d["rewards/rejected"] = -0.01 * np.arange(300) ** 1.5  # falling: what DPO is for
    assert not [e for e in run(d, {"trainer": "DPOTrainer"}) if e["metric"] == "rewards/rejected"]


def test_every_alias_of_a_canonical_name_is_left_to_its_canonical():
    from rlhf_tui.analysis.detectors import generic_metrics

    names = ["entropy", "objective/entropy", "policy/entropy_avg", "step_time", "time/step_s", "my_metric"]
    names += ["completions/min_length", "completions/min_terminated_length"]
    assert generic_metrics(names) == {"my_metric", "completions/min_length"}


def test_a_reward_that_saturates_is_not_dead_or_dropping_but_one_that_turns_constant_below_its_best_is():
    rng = np.random.default_rng(15)
    n, t = 400, np.arange(400)
    m = grpo_run(n, 15)
    p = np.clip(0.6 + 0.4 * t / 150, 0, 1)  # a format reward learned to 1.0, then a dip of one sample now and then
    fmt = rng.binomial(32, p) / 32
    m["rewards/format_ok/mean"] = fmt
    m["rewards/format_ok/std"] = np.sqrt(fmt * (1 - fmt))
    quiet = run(m, GRPO)
    assert not [e for e in alarms(quiet) if e["metric"].startswith("rewards/format_ok")], alarms(quiet)
    dead = {k: v.copy() for k, v in m.items()}
    corr = np.clip(0.4 + 0.1 * rng.standard_normal(n), 0, 1)
    corr[250:] = 0.0  # the correctness function starts returning 0 for everything
    dead["rewards/correctness/mean"] = corr
    dead["rewards/correctness/std"] = np.where(t >= 250, 0.0, 0.45 + 0.02 * rng.standard_normal(n))
    found = [e for e in run(dead, GRPO) if e["detector"] == "reward_dead"]
    assert found and found[0]["metric"] == "rewards/correctness/std" and 251 <= found[0]["step"] <= 256
    assert found[0]["severity"] == "high"


def test_a_saturated_reward_seen_from_the_middle_of_a_run_dips_without_alarm_but_a_drop_alarms():
    # A resumed run (or the training side's window): the format reward is already at ~1.0 from the first row
    # seen, so there is no learning phase to take a range from; one or two of 32 completions failing is no drop.
    rng = np.random.default_rng(16)
    n = 300
    m = grpo_run(n, 16)
    fmt = rng.binomial(32, 0.97 + 0.02 * rng.random(n)) / 32
    m["rewards/format_ok/mean"] = fmt
    m["rewards/format_ok/std"] = np.sqrt(fmt * (1 - fmt)) + 0.15 * (np.arange(n) < 20)  # a wider early spread
    steps = np.arange(81, 81 + n)
    quiet = run(m, GRPO, steps=steps)
    assert not [e for e in alarms(quiet) if e["metric"].startswith("rewards/format_ok")], alarms(quiet)
    m["rewards/format_ok/mean"] = np.where(np.arange(n) >= 200, fmt - 0.2, fmt)  # a fifth of the batch now fails
    drop = [e for e in alarms(run(m, GRPO, steps=steps)) if e["metric"] == "rewards/format_ok/mean"]
    assert drop and drop[0]["detector"] == "reward_shift" and 281 <= drop[0]["step"] <= 290


def test_kl_growing_from_zero_as_the_policy_leaves_its_reference_is_not_a_runaway():
    m = grpo_run(300, 16)
    t = np.arange(300)
    m["kl"] = 1e-6 * np.exp(t / 6.0).clip(max=5e4) * np.exp(0.2 * np.random.default_rng(3).standard_normal(300))
    m["kl"] = np.minimum(m["kl"], 0.08)  # from 1e-6 to a healthy ~0.08 in 60 steps, then flat
    assert not [e for e in alarms(run(m, GRPO)) if e["detector"] == "kl_runaway"]
    m["kl"][200:] *= 40  # then a real runaway
    first = first_alarm(run(m, GRPO), "kl_runaway")
    assert first is not None and 201 <= first["step"] <= 206


# -- TRL 1.x signals: sampling vs training, truncation ------------------------------------------------------
def test_sampling_mismatch_rises_above_its_reference_level():
    base = grpo_run(300, 3)
    t = np.arange(300)
    diff = np.where(t < 150, 0.002, np.where(t < 220, 0.03, 0.2))  # fine, 3x the reference, then 20x
    eps = [
        e
        for e in run(dict(base, **{"sampling/sampling_logp_difference/mean": diff}))
        if e["detector"] == "sampling_mismatch"
    ]
    assert eps and eps[0]["metric"] == "sampling/sampling_logp_difference/mean"
    assert 150 < eps[0]["step"] <= 155 and eps[0]["severity"] == "high"  # the episode reached 20x the reference
    three_x = np.where(t < 150, 0.002, 0.03)
    mild = [
        e
        for e in run(dict(base, **{"sampling/sampling_logp_difference/mean": three_x}))
        if e["detector"] == "sampling_mismatch"
    ]
    assert [e["severity"] for e in mild] == ["medium"]
    assert "disagree" in eps[0]["message"] and "vLLM" in eps[0]["recommendation"]
    quiet = run(dict(base, **{"sampling/sampling_logp_difference/mean": np.full(300, 0.002)}))
    assert not [e for e in quiet if e["detector"] == "sampling_mismatch"]
    # verl's key in a custom loop, and the importance-sampling ratio drifting off 1
    verl = run(dict(base, **{"training/rollout_probs_diff_mean": diff}))
    assert [e for e in verl if e["detector"] == "sampling_mismatch"]
    ratio = np.where(t < 200, 1.0, 0.6)
    off = [
        e
        for e in run(dict(base, **{"sampling/importance_sampling_ratio/mean": ratio}))
        if e["detector"] == "sampling_mismatch"
    ]
    assert off and 200 < off[0]["step"] <= 205 and off[0]["metric"] == "sampling/importance_sampling_ratio/mean"


def test_truncation_is_a_note_when_most_completions_hit_the_limit():
    base = grpo_run(300, 4)
    t = np.arange(300)
    clipped = np.where(t < 180, 0.1, 0.95)
    eps = [e for e in run(dict(base, **{"completions/clipped_ratio": clipped})) if e["detector"] == "truncation"]
    assert eps and eps[0]["severity"] == "low" and 180 < eps[0]["step"] <= 190
    assert "max_completion_length" in eps[0]["message"]
    assert not [
        e for e in run(dict(base, **{"completions/clipped_ratio": np.full(300, 0.5)})) if e["detector"] == "truncation"
    ]


def _groups(n: int, easy: np.ndarray, hard: np.ndarray, seed: int = 15) -> dict[str, np.ndarray]:
    """A healthy GRPO history with the prompt-group split and a frac_reward_zero_std that agrees with it."""
    rng = np.random.default_rng(seed)
    other = rng.choice([0.0, 0.125], n, p=[0.8, 0.2])
    m = grpo_run(n, seed)
    m.update({"groups/too_easy": easy, "groups/too_hard": hard, "groups/zero_std_other": other})
    m["frac_reward_zero_std"] = np.minimum(1.0, easy + hard + other)
    return m


def _by(episodes: list[dict], detector: str) -> list[dict]:
    return [e for e in episodes if e["detector"] == detector]


def test_most_groups_solved_is_groups_too_easy_and_no_learning_signal_defers_to_it():
    n, t = 300, np.arange(300)
    rng = np.random.default_rng(3)
    base = rng.choice([0.0, 0.125, 0.25], n)
    hard = rng.choice([0.0, 0.125], n, p=[0.9, 0.1])
    # held at 0.95 from row 200: frac_reward_zero_std near 1 (no_learning_signal's high) explained by the split
    m = _groups(n, np.where(t >= 200, 0.95, base), np.where(t >= 200, 0.0, hard))
    eps = run(m, GRPO)
    easy = _by(eps, "groups_too_easy")
    assert len(easy) == 1 and easy[0]["severity"] == "high" and 201 <= easy[0]["step"] <= 204
    assert easy[0]["metric"] == "groups/too_easy" and "all-correct" in easy[0]["message"]
    assert "difficulty" in easy[0]["recommendation"] and "95%" in easy[0]["message"]
    assert not _by(eps, "no_learning_signal") and not _by(eps, "groups_too_hard")
    # the same run without the split (a trainer_state.json): no_learning_signal, as before
    plain = run({k: v for k, v in m.items() if not k.startswith("groups/")}, GRPO)
    nls = _by(plain, "no_learning_signal")
    assert nls and nls[0]["severity"] == "high" and not _by(plain, "groups_too_easy")
    assert [e["step"] for e in nls] == [e["step"] for e in easy]  # the same alarm, taken over on the same rows
    # 0.76 solved: a jump of the zero-spread fraction (medium, below no_signal_frac), taken over at medium
    m = _groups(n, np.where(t >= 200, 0.76, base), np.where(t >= 200, 0.0, hard))
    eps = run(m, GRPO)
    assert [e["severity"] for e in _by(eps, "groups_too_easy")] == ["medium"] and not _by(eps, "no_learning_signal")
    assert grown(m, GRPO, chunk=37) == eps  # incremental passes agree with a cold one


def test_a_brief_run_of_solved_groups_is_no_alarm_but_a_held_one_with_a_dip_is_one():
    n, t = 300, np.arange(300)
    rng = np.random.default_rng(4)
    base = rng.choice([0.0, 0.125, 0.25], n)
    hard = np.zeros(n)
    brief = base.copy()
    brief[200:202] = 1.0  # two logs of every group solved, then back
    brief[250:253:2] = 1.0  # and two more, apart
    eps = run(_groups(n, brief, hard), GRPO)
    assert not _by(eps, "groups_too_easy") and not _by(eps, "no_learning_signal")
    held = np.where(t >= 200, 0.9, base)
    held[230] = 0.3  # one batch of harder prompts
    eps = _by(run(_groups(n, held, hard), GRPO), "groups_too_easy")
    assert len(eps) == 1 and 201 <= eps[0]["step"] <= 204 and eps[0]["last_step"] == n
    # the threshold: 0.7 solved stays below groups_flat_frac = 0.75
    assert not _by(run(_groups(n, np.where(t >= 200, 0.7, base), hard), GRPO), "groups_too_easy")
    lower = TH.replace(groups_flat_frac=0.6)
    assert _by(run(_groups(n, np.where(t >= 200, 0.7, base), hard), GRPO, lower), "groups_too_easy")


def test_most_groups_hopeless_is_groups_too_hard_and_a_mix_stays_no_learning_signal():
    n, t = 300, np.arange(300)
    rng = np.random.default_rng(5)
    easy = rng.choice([0.0, 0.125, 0.25], n)
    hard = np.where(t >= 150, 0.875, rng.choice([0.0, 0.125], n))
    eps = run(_groups(n, np.where(t >= 150, 0.0, easy), hard), GRPO)
    too_hard = _by(eps, "groups_too_hard")
    assert len(too_hard) == 1 and too_hard[0]["metric"] == "groups/too_hard" and 151 <= too_hard[0]["step"] <= 154
    assert "all-wrong" in too_hard[0]["message"] and "easier prompts" in too_hard[0]["recommendation"]
    assert not _by(eps, "no_learning_signal") and not _by(eps, "groups_too_easy")
    # half solved and half hopeless: no one kind explains it, so the zero-spread alarm stays no_learning_signal's
    mix = _groups(n, np.where(t >= 150, 0.5, easy), np.where(t >= 150, 0.45, 0.0))
    eps = run(mix, GRPO)
    assert _by(eps, "no_learning_signal")[0]["severity"] == "high"
    assert not _by(eps, "groups_too_easy") and not _by(eps, "groups_too_hard")
