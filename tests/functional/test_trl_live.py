"""A real tiny TRL GRPO run with the callback, watched by a subscriber on a free loopback port."""

import json
import os
import threading

import numpy as np
import pytest
from conftest import wait_for

pytestmark = pytest.mark.slow
STEPS = 16


@pytest.fixture
def grpo_run(tiny_model, tmp_path, address):
    """Train in a thread; a gate holds training at step 8 until the test has attached its monitor."""
    from transformers import TrainerCallback

    from rlhf_tui.bridge.demo.train import make_grpo_trainer
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

    gate = threading.Event()

    class Gate(TrainerCallback):  # added after ours, so step 8 is already queued when it blocks
        def on_log(self, args, state, control, logs=None, **kw):
            if state.global_step == 8:
                gate.wait(30)

    cb = RLHFMonitorCallback(address=address, log_dir=str(tmp_path / "logs"))
    trainer = make_grpo_trainer(tiny_model, str(tmp_path / "out"), cb, steps=STEPS, save_steps=8)
    trainer.add_callback(Gate())
    errors = []

    def train():
        try:
            trainer.train()
        except Exception as exc:  # surfaced by the test
            errors.append(exc)
        finally:
            gate.set()

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    yield cb, gate, thread, errors
    gate.set()
    thread.join(120)
    cb.close()


def test_grpo_run_streams_every_step_to_a_monitor_that_joined_mid_run(grpo_run, address):
    from rlhf_tui.bridge.monitor.subscriber import Subscriber

    cb, gate, thread, errors = grpo_run

    def logged_steps():
        if cb.log_path is None or not os.path.exists(cb.log_path):
            return 0
        with open(cb.log_path) as fh:
            return sum('"step_end"' in line for line in fh)

    wait_for(lambda: logged_steps() >= 8, timeout=120, message="8 steps logged")
    sub = Subscriber(address).start()  # joins while training is held at step 8
    try:
        wait_for(
            lambda: sub.store.current_run is not None and sub.store.current_run.rows >= 8,
            timeout=20,
            message="history of the first 8 steps",
        )
        gate.set()
        thread.join(120)
        assert not errors, errors
        wait_for(lambda: sub.store.current_run.ended is not None, timeout=20, message="run end")
        run = sub.store.current_run
        np.testing.assert_array_equal(run.steps, np.arange(1, STEPS + 1))
        for name in (
            "kl",
            "entropy",
            "reward",
            "reward_std",
            "loss",
            "grad_norm",
            "learning_rate",
            "clip_ratio",
            "completion_length",
        ):
            assert np.isfinite(run.values(name)).all(), name
        assert run.meta["trainer"] == "GRPOTrainer" and run.meta["args"]["num_generations"] == 4
        assert run.meta["model"].endswith("tiny-gpt2")
        assert len(run.rewards) >= STEPS and run.rewards[-1]["samples"]
        wait_for(lambda: any(c.get("step") == 8 for c in sub.store.current_run.checkpoints), timeout=30)
        assert run.system[0]["gpu_available"] is False and run.system[0]["rss_mb"] > 0
        t = sub.store.transport
        assert t["rejected"] == 0 and t["gaps"] == 0 and t["dropped"] == 0
    finally:
        sub.stop()
    events = [json.loads(line) for line in open(cb.log_path)]
    steps = [e["step"] for e in events if e["event"] == "step_end"]
    assert steps == list(range(1, STEPS + 1))
    assert any(e["event"] == "reward_batch" for e in events)
    assert any(e["event"] == "checkpoint" and e["step"] == 8 for e in events)
