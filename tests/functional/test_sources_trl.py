"""Real tiny TRL GRPO runs without the rlhf-tui callback, watched through what they write themselves:
report_to="tensorboard" (followed live while training, then `rlhf-tui report DIR`) and report_to="trackio"
(its local store, and the same output_dir through its rewritten trainer_state.json). A reward function that
returns NaN from step FAULT on is the injected fault."""

from __future__ import annotations

import json
import math
import sys
import threading
import time

import pytest
from conftest import wait_for

from rlhf_tui.bridge.monitor.followed_source import follow_file_source
from rlhf_tui.bridge.monitor.tensorboard_source import find_runs
from rlhf_tui.tui.cli import main

pytestmark = pytest.mark.slow
STEPS = 16
FAULT = 10  # the reward function returns NaN from this generation on (logged at step FAULT + 1)


def grpo_without_callback(model_path: str, output_dir: str, report_to: str, **extra):
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_tui.bridge.demo.tiny import length_reward, prompt_dataset

    def length_then_nan(completions, trainer_state=None, **kw):
        scores = length_reward(completions, **kw)
        return [math.nan] * len(scores) if trainer_state is not None and trainer_state.global_step >= FAULT else scores

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    args = GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        max_steps=STEPS,
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        report_to=report_to,
        learning_rate=1e-3,
        beta=0.04,  # a KL term, so `kl` is logged
        save_strategy="steps",
        save_steps=4,
        disable_dropout=True,
        disable_tqdm=True,
        seed=0,
        log_completions=True,
        num_completions_to_print=0,
        **extra,
    )
    return GRPOTrainer(
        model=model_path,
        reward_funcs=[length_then_nan],
        args=args,
        train_dataset=prompt_dataset(64),
        processing_class=tok,
    )


class _Paced:
    """A TrainerCallback that sleeps 0.1 s after each step (duck-typed: only the hook the trainer calls)."""

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_step_end(self, *args, **kwargs):
        time.sleep(0.1)


def _assert_fault_found(report: dict) -> None:
    assert {"reward", "kl", "entropy", "loss", "grad_norm", "learning_rate", "completion_length"} <= set(
        report["metrics"]
    )
    assert not any(name.startswith(("train/", "eval/")) for name in report["metrics"])
    found = [(a["detector"], a["metric"], a["step"]) for a in report["anomalies"]]
    assert ("nonfinite", "reward", FAULT + 1) in found, found


def test_a_tensorboard_run_without_callback_is_followed_live_and_reported(tiny_model, tmp_path, monkeypatch, capsys):
    pytest.importorskip("tensorboard")
    # Set, TensorBoardCallback writes there and OUTPUT_DIR holds no event files (a test that leaked it once did).
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "out"
    trainer = grpo_without_callback(tiny_model, str(out), "tensorboard")
    trainer.add_callback(_Paced())  # a pace the follower can watch (a fast machine does the run in ~1 s)
    errors: list[Exception] = []

    def train():
        try:
            trainer.train()
        except Exception as exc:  # surfaced by the test
            errors.append(exc)

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    wait_for(lambda: bool(find_runs(out)) or not thread.is_alive(), timeout=120, message="an event file")
    follower = follow_file_source(str(out))
    assert follower is not None
    follower.poll_s = 0.05
    follower.start()
    deadline = time.monotonic() + 240  # the test fails, never hangs
    try:
        seen = set()
        ended_by = None  # once the training is over, the follower gets 30 s to see the run end
        while (thread.is_alive() or not follower.ended) and time.monotonic() < deadline:
            if not thread.is_alive():
                ended_by = ended_by or time.monotonic() + 30
                if time.monotonic() > ended_by:
                    break
            follower.wait_polls(1, timeout=5)
            run = follower.store.current_run
            if run is not None:
                seen.add(run.rows)
            assert not errors, errors
            thread.join(0)
            if not thread.is_alive() and follower.wait_polls(3, 5) and follower.ended:
                break
    finally:
        follower.stop()
        thread.join(60)
    assert not errors, errors
    assert not thread.is_alive(), "the training did not finish"
    run = follower.store.current_run
    assert run.steps.tolist() == list(range(1, STEPS + 1)) and run.run_id.startswith("tb:runs/")
    assert follower.ended, "the live follower did not see the run end"
    # Read while the training ran (torch's SummaryWriter may flush its events only every few steps, so how often
    # the follower saw the run grow depends on the machine).
    assert seen
    assert [b["step"] for b in run.rewards][:3] == [1, 2, 3] and run.rewards[0]["samples"]  # completions parquet
    capsys.readouterr()  # what the training printed
    assert main(["report", str(out), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # The event files, not a checkpoint's trainer_state.json (which has no end of run): the report ends the run.
    assert report["steps"] == STEPS and report["run"]["run_id"].startswith("tb:runs/") and report["run"]["ended"]
    assert report["summary"].get("train_runtime") is not None
    _assert_fault_found(report)
    assert any(a["detector"] == "reward_invalid" for a in report["rewards"]["anomalies"])  # from the parquet


def test_a_trackio_run_and_its_trainer_state_are_each_a_source(tiny_model, tmp_path, monkeypatch, capsys):
    pytest.importorskip("trackio", reason="trackio is not installed (pip install trackio) in this environment")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read by trackio when first imported ...
    for name, module in list(sys.modules.items()):  # ... and by its modules imported before this test
        if name.startswith("trackio") and hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")
    out = tmp_path / "out"
    trainer = grpo_without_callback(
        tiny_model, str(out), "trackio", project="rlhf-tui-test", run_name="run-a", trackio_static_space_id=False
    )
    trainer.train()
    capsys.readouterr()  # what the training printed
    assert main(["report", "trackio:rlhf-tui-test", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == STEPS and report["run"]["run_id"] == "trackio:rlhf-tui-test/run-a"
    _assert_fault_found(report)
    assert main(["report", str(out), "--format", "json"]) == 0  # no event files: the trainer_state.json
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == STEPS and report["run"]["run_id"] == "file:out"
    _assert_fault_found(report)
