"""A live tiny GRPO run with monitor_rewards and checkpoints: `rlhf-tui report` on the live address and on
the JSONL log shows reward reliability and checkpoint health (issue: checkpoint & reward analysis, live)."""

import json

import pytest

from rlhf_tui.tui.cli import main

pytestmark = pytest.mark.slow


def test_report_shows_reward_reliability_and_checkpoint_health(tiny_model, tmp_path, address, capsys):
    from rlhf_tui.bridge.demo.train import make_grpo_trainer
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

    cb = RLHFMonitorCallback(address=address, log_dir=str(tmp_path / "logs"))
    trainer = make_grpo_trainer(tiny_model, str(tmp_path / "out"), cb, steps=8, save_steps=4)
    try:
        trainer.train()
        cb.wait_for_checkpoints(60)
        capsys.readouterr()  # drop the trainer's own printed logs
        assert main(["report", address, "--format", "json", "--timeout", "15"]) == 0
    finally:
        cb.close()
    live = json.loads(capsys.readouterr().out)
    for report in (live, _report_from_log(cb.log_path, capsys)):
        assert report["steps"] == 8
        ckpts = {c["step"]: c for c in report["checkpoints"]}
        assert set(ckpts) == {4, 8}
        assert all(c["health_score"] is not None and c["health_score"] >= 0.9 for c in ckpts.values())
        assert ckpts[8]["drift"] is not None and ckpts[8]["drift"] > 0  # vs the previous checkpoint
        assert ckpts[8]["path"].endswith("checkpoint-8")
        rel = report["rewards"]["reliability_metrics"]
        assert 0.0 <= rel["stability"] <= 1.0 and 0.0 <= rel["consistency"] <= 1.0
        assert rel["mean_reward"] is not None and rel["variance"] >= 0
        assert report["rewards"]["batches"] >= 8 and report["rewards"]["samples"]


def _report_from_log(path, capsys):
    assert main(["report", path, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)
