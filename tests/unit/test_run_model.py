"""RunModel without Textual: when detection passes and redraws are due (a fake clock), and which results are
discarded as stale."""

from __future__ import annotations

import subprocess
import sys

from rlhf_tui.analysis.thresholds import Thresholds
from rlhf_tui.tui.run_model import DETECT_MIN_INTERVAL, RunModel


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _model(tui_store) -> tuple[RunModel, FakeClock]:
    clock = FakeClock()
    return RunModel(tui_store, "demo", Thresholds(), clock=clock), clock


def test_the_model_imports_no_textual():
    code = "import sys, rlhf_tui.tui.run_model; sys.exit('textual' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def test_first_pass_at_once_then_throttled_until_new_data_and_the_interval(tui_store):
    model, clock = _model(tui_store)
    job = model.detection_due()
    assert job is not None and model.detecting
    assert model.detection_due() is None  # one pass at a time
    result = model.run_detection(job)
    assert result.error is None and result.run_id == tui_store.current_run.run_id
    assert model.finish_detection(result) and model.detect_count == 1 and not model.detecting
    assert {a["detector"] for a in model.current_anomalies()} and sum(model.anomaly_counts.values()) >= 1
    assert model.detection_due() is None  # nothing new
    tui_store.touch()
    assert model.detection_due() is None  # new data, but within the interval
    clock.now += max(DETECT_MIN_INTERVAL, model.detect_interval)
    assert model.detection_due() is not None


def test_a_pass_started_before_a_threshold_change_is_discarded(tui_store):
    model, clock = _model(tui_store)
    job = model.detection_due()
    result = model.run_detection(job)
    model.set_thresholds(Thresholds(anomaly_threshold=5.0), note="z 3 → 5")
    assert not model.finish_detection(result)  # stale: judged with the old thresholds
    assert model.detect_count == 0 and model.detecting
    again = model.detection_due()  # due at once, whatever the interval
    assert again is not None and again.thresholds.anomaly_threshold == 5.0
    assert model.finish_detection(model.run_detection(again))
    assert model.take_note() == "z 3 → 5" and model.take_note() is None


def _new_data_redrawn_only_after(model: RunModel, clock: FakeClock, seconds: float) -> None:
    model.store.touch()
    assert model.build_due(lambda: 20) is None
    clock.now += seconds
    assert model.build_due(lambda: 20) is not None


def test_redraws_follow_the_store_version_and_the_throttle(tui_store):
    model, clock = _model(tui_store)
    job = model.build_due(lambda: 20)
    assert job is not None and model.busy
    assert model.build_due(lambda: 20) is None  # one build at a time
    result = model.build(job)
    report = model.finish_build(result)
    assert report is model.report and report["last_step"] == 200
    assert len(report["metrics"]["kl"]["buckets"]) == 20
    model.drawn(0.5)  # an expensive draw: the next one waits 3x its cost
    assert not model.busy and model.build_count == 1
    _new_data_redrawn_only_after(model, clock, 1.6)


def test_invalidate_and_navigation_ask_for_a_redraw(tui_store):
    model, clock = _model(tui_store)
    model.finish_build(model.build(model.build_due(lambda: 20)))
    model.drawn(10.0)
    assert model.build_due(lambda: 20) is None
    model.invalidate()  # layout or settings changed: the throttle does not hold it back
    job = model.build_due(lambda: 20)
    assert job is not None
    model.finish_build(model.build(job))
    model.drawn(0.0)
    model.go_to_step(120)
    job = model.build_due(lambda: 20)
    assert job is not None and job.at_step == 120
    assert model.finish_build(model.build(job))["at_step"] == 120


def test_a_failed_build_is_retried_a_second_later(tui_store, monkeypatch):
    from rlhf_tui.tui import run_model

    def broken(*args, **kwargs):
        raise ValueError("a bug of ours")

    model, clock = _model(tui_store)
    job = model.build_due(lambda: 20)
    monkeypatch.setattr(run_model, "view_report", broken)
    result = model.build(job)
    assert result.error == "view failed: ValueError: a bug of ours"
    assert model.finish_build(result) is None and not model.busy
    _new_data_redrawn_only_after(model, clock, 1.0)


def test_paused_header_follows_the_store_once_per_version(tui_store):
    model, _ = _model(tui_store)
    version = model.header_due()
    assert version == tui_store.version
    model.header_drawn(version)
    assert model.header_due() is None
    tui_store.touch()
    assert model.header_due() == tui_store.version


def test_a_new_spark_width_after_a_draw_asks_for_another_redraw(tui_store):
    model, _ = _model(tui_store)
    model.finish_build(model.build(model.build_due(lambda: 23)))  # built before the pane knew its names
    model.drawn(10.0, spark_width=12)
    job = model.build_due(lambda: 12)
    assert job is not None and job.spark_width == 12
    model.finish_build(model.build(job))
    model.drawn(0.0, spark_width=12)
    assert not model.busy and model.build_due(lambda: 12) is None
