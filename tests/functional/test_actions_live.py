"""on_alarm in a real GRPO run: an injected learning-rate spike makes the run save a rescue checkpoint and stop
cleanly, and says so in the JSONL log and the report."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

SPIKE_AT, STEPS = 20, 60


def test_on_alarm_stop_saves_a_checkpoint_and_stops_the_run_after_an_lr_spike(tiny_model, tmp_path):
    from transformers import TrainerCallback

    from rlhf_tui.analysis.report import build_report
    from rlhf_tui.bridge.demo.train import make_grpo_trainer
    from rlhf_tui.bridge.monitor.sources import load_file_source
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

    class LrSpike(TrainerCallback):
        """The scheduler's base learning rate x20 after step SPIKE_AT (what a bad manual change does)."""

        def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
            if state.global_step == SPIKE_AT:
                lr_scheduler.base_lrs = [b * 20 for b in lr_scheduler.base_lrs]

    out = tmp_path / "out"
    cb = RLHFMonitorCallback(address=False, log_dir=str(tmp_path / "logs"), on_alarm={"medium": "stop"})
    # step_delay: the training-side engine judges at most once a second; a fast machine would finish first
    trainer = make_grpo_trainer(tiny_model, str(out), cb, steps=STEPS, learning_rate=1e-4, step_delay=0.1)
    trainer.add_callback(LrSpike())
    trainer.train()
    stopped = trainer.state.global_step
    assert SPIKE_AT < stopped < STEPS  # stopped by the action, after the spike
    assert (out / f"checkpoint-{stopped}").is_dir()  # the rescue checkpoint
    lines = [json.loads(line) for line in open(cb.log_path)]
    acts = [e for e in lines if e.get("event") == "action"]
    assert len(acts) == 1 and acts[0]["action"] == "stop" and acts[0]["detector"] == "lr_jump"
    kinds = [e.get("event") for e in lines]
    # run_end goes out when train() ends; the rescue checkpoint's analysis may land in the log after it (close()
    # waits for analyses still running), nothing else does.
    after_end = kinds[kinds.index("run_end") + 1 :] if "run_end" in kinds else ["no run_end"]
    assert acts[0]["action_step"] == stopped and set(after_end) <= {"checkpoint_analysis"}, after_end
    report = build_report(load_file_source(cb.log_path))
    assert report["actions"] and report["actions"][0]["action"] == "stop" and report["actions"][0]["step"] == stopped
