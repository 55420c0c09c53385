"""Fault injection with a real tiny GRPO training (CPU, in a thread): no monitor; a monitor killed with -9; a
stalled monitor (connected, never reads, tiny receive buffer); a monitor restarted mid-run; the training
restarted on the same address; the SSH-style forward dropped and restored. Every time the training finishes
cleanly and its JSONL log has every step; live monitors end with every step and no gaps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import zmq
from conftest import free_port, wait_for
from tcp_proxy import TcpProxy

from rlhf_tui.bridge.monitor.subscriber import Subscriber
from rlhf_tui.bridge.wire import protocol

pytestmark = pytest.mark.slow
STEPS = 30


class Training:
    """A real tiny GRPO run with our callback, trained in a thread (one model load per session; the
    subprocess variant with kill -9 is in test_durability.py)."""

    def __init__(self, tiny_model, tmp_path, address, run_id, *, steps=STEPS, delay=0.03):
        from rlhf_tui.bridge.demo.train import make_grpo_trainer
        from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

        self.steps = steps
        self.cb = RLHFMonitorCallback(address=address, log_dir=str(tmp_path / run_id / "logs"), run_id=run_id)
        self.trainer = make_grpo_trainer(tiny_model, str(tmp_path / run_id), self.cb, steps=steps, step_delay=delay)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._train, daemon=True)
        self.thread.start()

    def _train(self):
        try:
            self.trainer.train()
        except BaseException as exc:  # surfaced by finish()
            self.errors.append(exc)

    def logged(self) -> list[int]:
        path = self.cb.log_path
        return logged_steps(path) if path else []

    def finish(self, timeout=120):
        """Training ended by itself without an exception, and its JSONL log has every step."""
        self.thread.join(timeout)
        assert not self.thread.is_alive() and not self.errors, self.errors
        self.cb.wait_for_checkpoints(10)
        assert self.logged() == list(range(1, self.steps + 1))

    def close(self):
        self.thread.join(120)
        self.cb.close()


def logged_steps(path) -> list[int]:
    if not os.path.exists(path):
        return []
    steps = []
    with open(path, "rb") as fh:
        for line in fh:
            if line.endswith(b"\n"):
                event = json.loads(line)
                if event.get("event") == "step_end":
                    steps.append(event["step"])
    return steps


def complete(sub, run_id, steps=STEPS):
    run = sub.store.runs.get(run_id)
    return run is not None and run.rows == steps and run.ended is not None


def test_no_monitor_then_training_restarted_is_a_new_run(tiny_model, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    first = Training(tiny_model, tmp_path, address, "run-one")
    first.finish()  # nobody watched it
    sub = Subscriber(address).start()  # attaches while the finished run still serves its history
    try:
        wait_for(lambda: complete(sub, "run-one"), timeout=20, message="first run's history")
        first.close()  # the training process goes away ...
        second = Training(tiny_model, tmp_path, address, "run-two")  # ... and is started again
        try:
            wait_for(lambda: complete(sub, "run-two"), timeout=120, message="the restarted run, live")
            second.finish()
        finally:
            second.close()
        store = sub.store
        assert store.current == "run-two" and store.runs["run-one"].rows == STEPS  # old run kept apart
        np.testing.assert_array_equal(store.runs["run-two"].steps, np.arange(1, STEPS + 1))
        assert store.transport["gaps"] == 0 and store.transport["rejected"] == 0
    finally:
        sub.stop()


MONITOR = textwrap.dedent("""
    import sys, time
    from rlhf_tui.bridge.monitor.subscriber import Subscriber
    sub = Subscriber(sys.argv[1]).start()
    while not (sub.store.current_run and sub.store.current_run.rows >= 3):
        time.sleep(0.01)
    print("attached", flush=True)
    time.sleep(600)
""")


def test_killed_stalled_and_restarted_monitors(tiny_model, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    # Started before training's threads: a vfork-based Popen next to busy torch threads can fail (EFAULT).
    monitor = subprocess.Popen([sys.executable, "-c", MONITOR, address], stdout=subprocess.PIPE, text=True)
    training = Training(tiny_model, tmp_path, address, "run-faults", delay=0.05)
    ctx = zmq.Context()
    stalled = ctx.socket(zmq.DEALER)  # says hello, then never reads: the server's pipe to it fills
    stalled.setsockopt(zmq.RCVBUF, 1024)
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.linger = 0
    stalled.connect(address)
    stalled.send(protocol.hello(None, 0, resync=True))
    try:
        assert monitor.stdout.readline().strip() == "attached"
        os.kill(monitor.pid, signal.SIGKILL)  # the monitor dies without closing anything
        monitor.wait(10)
        wait_for(lambda: len(training.logged()) >= 8, timeout=120, message="training goes on")
        restarted = Subscriber(address).start()  # a monitor started again mid-run
        try:
            wait_for(
                lambda: restarted.store.current_run is not None and restarted.store.current_run.rows >= 8,
                timeout=20,
                message="full history for the restarted monitor",
            )
            assert restarted.store.current_run.steps[0] == 1
            wait_for(lambda: complete(restarted, "run-faults"), timeout=120, message="every step live")
            t = restarted.store.transport
            assert t["gaps"] == 0 and t["rejected"] == 0 and t["dropped"] == 0
            np.testing.assert_array_equal(restarted.store.current_run.steps, np.arange(1, STEPS + 1))
        finally:
            restarted.stop()
        training.finish()
        assert training.cb.publisher.stats["dropped"] == 0
    finally:
        training.close()
        monitor.kill()
        stalled.close(0)
        ctx.term()


def test_ssh_forward_drop_reconnects_with_every_step(tiny_model, tmp_path):
    train_port, forward_port = free_port(), free_port()
    training = Training(tiny_model, tmp_path, f"tcp://127.0.0.1:{train_port}", "run-ssh", delay=0.08)
    proxy = TcpProxy(forward_port, train_port).start()  # ssh -L forward_port:127.0.0.1:train_port
    sub = Subscriber(f"tcp://127.0.0.1:{forward_port}").start()
    try:
        wait_for(
            lambda: sub.store.current_run is not None and sub.store.current_run.rows >= 5,
            timeout=120,
            message="steps through the forward",
        )
        proxy.stop()  # the SSH session dies
        seen = sub.store.current_run.rows
        wait_for(
            lambda: len(training.logged()) >= seen + 5, timeout=60, message="training goes on while the forward is down"
        )
        assert sub.store.current_run.rows < STEPS
        proxy = TcpProxy(forward_port, train_port).start()  # ... and is opened again on the same port
        wait_for(lambda: complete(sub, "run-ssh"), timeout=60, message="every step after reconnecting")
        assert proxy.connections >= 1
        t = sub.store.transport
        assert t["gaps"] == 0 and t["rejected"] == 0
        np.testing.assert_array_equal(sub.store.current_run.steps, np.arange(1, STEPS + 1))
        training.finish()
    finally:
        sub.stop()
        proxy.stop()
        training.close()
