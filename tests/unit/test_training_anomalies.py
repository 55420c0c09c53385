"""Training-side anomalies: a bounded history judged by the same engine at most once a period, new and changed
episodes reported once, and the monitor's ingest folding updates into the episode it already has."""

from __future__ import annotations

import numpy as np
from conftest import grpo_run

from rlhf_tui.analysis.detectors import detect
from rlhf_tui.analysis.store import Store
from rlhf_tui.analysis.thresholds import Thresholds
from rlhf_tui.bridge.monitor.ingest import apply_envelope
from rlhf_tui.bridge.training.anomalies import TrainingAnomalies
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
    assert ta.n == 1 and ta.values["loss"][0] == 0.1 and ta.values["kl"][0] == 0.2


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
