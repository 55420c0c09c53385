"""Training-side anomalies: a bounded history judged by the same engine at most once a period, new and changed
episodes reported once, and the monitor's ingest folding updates into the episode it already has."""

from __future__ import annotations

import math

import numpy as np
from conftest import grpo_run

from rlhf_tui.analysis.detectors import detect
from rlhf_tui.analysis.store import Store
from rlhf_tui.analysis.thresholds import Thresholds
from rlhf_tui.bridge.monitor.ingest import apply_envelope
from rlhf_tui.bridge.training.anomalies import BUDGET_S, TrainingAnomalies
from rlhf_tui.bridge.wire import events, protocol


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def faulty(n: int) -> dict[str, np.ndarray]:
    m = grpo_run(n, 4)
    m["kl"] = m["kl"].copy()
    m["kl"][n // 2 :] *= 80
    m["loss"] = np.where(np.arange(n) == 40, np.nan, 0.1 + 0.01 * np.random.default_rng(1).standard_normal(n))
    return m


def feed(ta: TrainingAnomalies, m: dict, clock: Clock, dt: float) -> tuple[list, list]:
    n = len(next(iter(m.values())))
    new, changed = [], []
    for i in range(n):
        ta.add(i + 1, {k: (None if np.isnan(v[i]) else float(v[i])) for k, v in m.items()})
        clock.t += dt
        a, b = ta.poll()
        new += a
        changed += b
    a, b = ta.poll(force=True)
    return new + a, changed + b


def test_passes_are_rate_limited_and_find_what_detect_finds():
    m, clock = faulty(300), Clock()
    ta = TrainingAnomalies(Thresholds(), {"trainer": "GRPOTrainer"}, clock=clock)
    passes = []
    real = ta.poll

    def counting(force: bool = False):
        before = ta.last_pass
        out = real(force)
        passes.append(ta.last_pass != before)
        return out

    ta.poll = counting  # type: ignore[method-assign]
    new, changed = feed(ta, m, clock, 0.25)
    assert 70 <= sum(passes) <= 80  # one pass a second at four steps a second
    steps = np.arange(1, 301)
    logged = {k: np.ones(300, dtype=bool) for k in m}
    full = detect((steps, m, logged, {"trainer": "GRPOTrainer"}))
    assert {(e["detector"], e["metric"], e["step"]) for e in new} == {
        (e["detector"], e["metric"], e["step"]) for e in full
    }
    assert any(e["detector"] == "nonfinite" for e in new) and any(e["detector"] == "kl_runaway" for e in new)
    assert len(changed) > len(new)  # the runaway grew after it was first reported


def test_history_stays_bounded_and_nothing_is_reported_twice():
    m, clock = faulty(600), Clock()
    ta = TrainingAnomalies(Thresholds(), {"trainer": "GRPOTrainer"}, rows=128, clock=clock)
    new, _ = feed(ta, m, clock, 1.0)
    assert ta.n <= 128 and ta.steps.shape == (128,)
    by_key: dict = {}
    for e in new:
        by_key.setdefault((e["detector"], e["metric"]), []).append(e)
    for eps in by_key.values():  # episodes of one detector+metric reported as new never overlap
        eps.sort(key=lambda e: e["first_step"])
        for a, b in zip(eps, eps[1:]):
            assert b["first_step"] > a["last_step"]
    assert any(e["detector"] == "kl_runaway" for e in new)
    assert not any(e["step"] < 11 and e["detector"] != "nonfinite" for e in new)  # the run's grace period


def test_same_step_merges_older_is_ignored():
    ta = TrainingAnomalies(Thresholds(), clock=Clock())
    ta.add(1, {"loss": 0.1})
    ta.add(1, {"kl": 0.2})
    ta.add(0, {"loss": 5.0})
    ta.add(1, {"kl": 0.3, "entropy": "1.5", "bad": "x", "none": None, "huge": 10**400})
    ta.flush()
    assert ta.n == 1 and ta.values["loss"][0] == 0.1 and ta.values["kl"][0] == 0.3  # the newest merge wins
    assert ta.values["entropy"][0] == 1.5 and np.isnan(ta.values["bad"][0]) and np.isnan(ta.values["none"][0])
    assert np.isnan(ta.values["huge"][0]) and ta.logged["huge"][0]
    ta.add(2, {"loss": 0.2})
    ta.add(2, {"kl": 0.4})
    ta.flush()
    assert ta.n == 2 and list(ta.steps[:2]) == [1, 2] and np.isnan(ta.values["entropy"][1])
    assert ta.values["kl"][1] == 0.4 and ta.logged["loss"][1] and not ta.logged["entropy"][1]
    ta.add(2, {"entropy": 2.0})  # into a row already written
    ta.flush()
    assert ta.n == 2 and ta.values["entropy"][1] == 2.0 and ta.values["loss"][1] == 0.2


def test_monitor_folds_an_updated_episode_into_the_one_it_has():
    store = Store()
    ep = {"detector": "kl_runaway", "metric": "kl", "step": 150, "first_step": 150, "last_step": 152}
    env = {"kind": protocol.ANOMALY, "run": "r", "seq": 1, "data": ep}
    apply_envelope(store, env)
    apply_envelope(store, {**env, "seq": 2, "data": {**ep, "last_step": 170, "severity": "high"}})
    apply_envelope(store, {**env, "seq": 3, "data": {**ep, "step": 400, "first_step": 400, "last_step": 400}})
    run = store.runs["r"]
    assert [(a["step"], a["last_step"]) for a in run.training_anomalies] == [(150, 170), (400, 400)]


def test_the_callbacks_recorder_sends_each_new_or_changed_episode_once(tmp_path):
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
    from rlhf_tui.bridge.training.recorder import Recorder

    cb = RLHFMonitorCallback(address=False, log_dir=str(tmp_path))
    rec, clock = Recorder(cb), Clock()
    rec.detector = TrainingAnomalies(cb.thresholds, cb.meta, clock=clock)
    sent = []
    for step in range(1, 61):
        clock.t += 1.0
        out = rec(events.LoggedStep(step, float(step), {"loss": float("nan") if step == 51 else 0.1, "kl": 0.01}))
        sent += [data for kind, data, _rank in out if kind == protocol.ANOMALY]
    opened = [a for a in sent if a["detector"] == "nonfinite" and a["metric"] == "loss"]
    assert opened and opened[0]["step"] == 51 and opened[0]["severity"] == "critical"
    assert len(opened) <= 3  # new, then only when it changed (it ends after the cooldown)


def costly(monkeypatch, clock: Clock, seconds: float) -> None:
    """Every engine pass takes `seconds` on the fake clock (the adaptive period reads its cost there)."""
    from rlhf_tui.bridge.training import anomalies as module

    real = module.evaluate

    def slow(*args, **kwargs):
        out = real(*args, **kwargs)
        clock.t += seconds
        return out

    monkeypatch.setattr(module, "evaluate", slow)


def pass_rows(ta: TrainingAnomalies, m: dict, clock: Clock, dt: float) -> tuple[list[int], list]:
    """Feed `m` a row every `dt` seconds, polling after each: the rows at which a pass ran, and what it found."""
    n = len(next(iter(m.values())))
    rows, new = [], []
    for i in range(n):
        ta.add(i + 1, {k: (None if np.isnan(v[i]) else float(v[i])) for k, v in m.items()})
        clock.t += dt
        before = ta.last_pass
        found, _changed = ta.poll()
        new += found
        if ta.last_pass != before:
            rows.append(i + 1)
    return rows, new + ta.poll(force=True)[0]


def test_a_costly_pass_waits_for_rows_on_a_fast_run(monkeypatch):
    clock = Clock()
    # (binary fractions of a second, so that the fake clock adds up exactly)
    costly(monkeypatch, clock, 2**-9)  # ~2 ms a pass / ~0.06 ms a row: a pass every 32 rows
    ta = TrainingAnomalies(Thresholds(), {"trainer": "GRPOTrainer"}, clock=clock, budget_s=2**-14)
    rows, _ = pass_rows(ta, faulty(400), clock, 2**-4)  # 16 steps a second
    assert ta.every() == 32 and rows[0] == 1
    assert set(np.diff(rows).tolist()) == {32}  # (2 s apart: at most once a second holds too)


def test_a_slow_run_is_judged_once_the_ceiling_is_reached(monkeypatch):
    clock = Clock()
    costly(monkeypatch, clock, 2**-9)
    ta = TrainingAnomalies(Thresholds(), {"trainer": "GRPOTrainer"}, clock=clock, budget_s=2**-14, ceiling_s=5.0)
    rows, _ = pass_rows(ta, faulty(100), clock, 1.0)  # a step a second: 32 rows would take 32 s
    gaps = set(np.diff(rows).tolist())
    assert gaps == {5}  # the first step boundary 5 s after the last pass


def test_cheap_passes_run_once_a_second_and_rarer_passes_find_the_same_episodes(monkeypatch):
    m = faulty(400)
    clock = Clock()
    ta = TrainingAnomalies(Thresholds(), {"trainer": "GRPOTrainer"}, clock=clock)
    rows, every_second = pass_rows(ta, m, clock, 2**-4)
    assert ta.every() == 1 and set(np.diff(rows).tolist()) == {16}  # free passes (fake clock): as before
    costly(monkeypatch, clock, 2**-8)
    ta = TrainingAnomalies(Thresholds(), {"trainer": "GRPOTrainer"}, clock=clock, budget_s=2**-14)
    rows, rarer = pass_rows(ta, m, clock, 2**-4)
    assert set(np.diff(rows).tolist()) == {64}
    key = lambda e: (e["detector"], e["metric"], e["step"])  # noqa: E731
    assert sorted(map(key, rarer)) == sorted(map(key, every_second))
    assert any(e["detector"] == "kl_runaway" for e in rarer)


def test_on_alarm_is_decided_by_the_pass_that_finds_the_episode(monkeypatch, tmp_path):
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
    from rlhf_tui.bridge.training.recorder import Recorder

    cb = RLHFMonitorCallback(address=False, log_dir=str(tmp_path), on_alarm={"critical": "stop"})
    rec, clock = Recorder(cb), Clock()
    costly(monkeypatch, clock, 0.002)
    rec.detector = TrainingAnomalies(cb.thresholds, cb.meta, clock=clock)
    found_at = decided_at = None
    for step in range(1, 201):
        clock.t += 0.05
        out = rec(events.LoggedStep(step, float(step), {"loss": float("nan") if step == 51 else 0.1, "kl": 0.01}))
        if found_at is None and any(kind == protocol.ANOMALY and d["detector"] == "nonfinite" for kind, d, _ in out):
            found_at = step
        if decided_at is None and cb.actions.take() is not None:
            decided_at = step  # the training thread takes it at this step's boundary
    wait = math.ceil(round(0.002 / BUDGET_S, 6))  # rows a pass of 2 ms waits for (100 at 0.02 ms a row)
    assert found_at is not None and 51 <= found_at <= 51 + wait  # the first pass after the NaN
    assert decided_at == found_at


def test_with_on_alarm_the_run_is_judged_every_second_whatever_a_pass_costs(tmp_path):
    from rlhf_tui.bridge.training.anomalies import CEILING_S, PERIOD_S
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
    from rlhf_tui.bridge.training.recorder import Recorder

    ceilings = {}
    for name, policy in (("acting", {"high": "stop"}), ("watching", None)):
        cb = RLHFMonitorCallback(address=False, log_dir=str(tmp_path / name), on_alarm=policy)
        rec = Recorder(cb)
        rec(events.LoggedStep(1, 1.0, {"loss": 0.1}))
        ceilings[name] = rec.detector.ceiling_s
    assert ceilings == {"acting": PERIOD_S, "watching": CEILING_S} and PERIOD_S < CEILING_S
