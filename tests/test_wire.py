"""Publisher ↔ subscriber over real ZeroMQ sockets on free loopback ports (manual log_step API)."""
import json
import os
import warnings

import numpy as np
import pytest

from conftest import free_address, wait_for
from rlhf_tui.bridge.callback import RLHFMonitorCallback
from rlhf_tui.bridge.publisher import is_loopback_address
from rlhf_tui.bridge.subscriber import Subscriber


def _cb(address, tmp_path, **kw):
    return RLHFMonitorCallback(address=address, log_dir=str(tmp_path / "logs"), analyze_checkpoints=False, **kw)


def test_late_joiner_gets_history_then_live(address, tmp_path):
    cb = _cb(address, tmp_path)
    for step in range(1, 501):
        cb.log_step(step, {"objective/kl": 0.01 * step, "ppo/loss/value": 1.0})
    sub = Subscriber(address).start()
    try:
        wait_for(lambda: sub.store.current_run and sub.store.current_run.rows == 500, message="history")
        for step in range(501, 601):
            cb.log_step(step, {"objective/kl": 0.01 * step})
        wait_for(lambda: sub.store.current_run.rows == 600, message="live steps")
        run = sub.store.current_run
        assert run.run_id == cb.run_id
        np.testing.assert_array_equal(run.steps, np.arange(1, 601))
        np.testing.assert_allclose(run.values("kl"), 0.01 * np.arange(1, 601))  # canonical name added
        assert run.meta["trainer"] == "custom"
        t = sub.store.transport
        assert t["rejected"] == 0 and t["gaps"] == 0 and t["dropped"] == 0
    finally:
        sub.stop()
        cb.close()


def test_two_monitors_and_a_restarted_monitor_each_get_everything(address, tmp_path):
    cb = _cb(address, tmp_path)
    for step in range(1, 51):
        cb.log_step(step, {"loss": 1.0 / step})
    first = Subscriber(address).start()
    wait_for(lambda: first.store.current_run and first.store.current_run.rows == 50)
    first.stop()  # the monitor goes away ...
    for step in range(51, 101):
        cb.log_step(step, {"loss": 1.0 / step})
    second, third = Subscriber(address).start(), Subscriber(address).start()  # ... and comes back
    try:
        for sub in (second, third):
            wait_for(lambda: sub.store.current_run and sub.store.current_run.rows == 100)
            assert sub.store.transport["gaps"] == 0
    finally:
        second.stop(), third.stop(), cb.close()


def test_training_restart_is_a_new_run_and_the_old_one_is_kept(address, tmp_path):
    sub = Subscriber(address).start()
    try:
        cb1 = _cb(address, tmp_path, run_id="run-one")
        for step in range(1, 11):
            cb1.log_step(step, {"loss": 1.0})
        wait_for(lambda: sub.store.current_run and sub.store.current_run.rows == 10)
        cb1.close()
        cb2 = _cb(address, tmp_path, run_id="run-two")
        for step in range(1, 6):
            cb2.log_step(step, {"loss": 2.0})
        wait_for(lambda: sub.store.current == "run-two" and sub.store.current_run.rows == 5, timeout=15)
        assert sub.store.runs["run-one"].rows == 10
        cb2.close()
    finally:
        sub.stop()


def test_jsonl_log_has_every_step_in_the_seed_format(address, tmp_path):
    cb = _cb(address, tmp_path)
    for step in range(1, 21):
        cb.log_step(step, {"kl_div": 0.1, "policy_loss": 0.4, "loss": float("nan") if step == 5 else 0.3})
    cb.close()
    lines = open(cb.log_path).read().splitlines()
    events = [json.loads(line) for line in lines]
    steps = [e for e in events if e["event"] == "step_end"]
    assert [e["step"] for e in steps] == list(range(1, 21))
    first = steps[0]
    assert set(first) >= {"event", "step", "timestamp", "ppo_metrics", "anomalies", "memory_usage"}
    assert first["ppo_metrics"]["kl"] == 0.1 and first["memory_usage"]["rss_mb"] > 0
    assert steps[4]["ppo_metrics"]["loss"] == "NaN"
    assert events[0]["event"] == "run_start" and events[-1]["event"] == "run_end"


def test_seed_manual_step_api(address, tmp_path):
    cb = _cb(address, tmp_path)
    for step in range(3):
        cb.on_step_begin(step, {})
        cb.on_step_end(step, {"kl_div": 0.1 * step, "reward": 1.0})
    cb.close()
    steps = [json.loads(l) for l in open(cb.log_path) if '"step_end"' in l]
    assert [s["step"] for s in steps] == [0, 1, 2]


def test_bind_failure_warns_once_and_training_goes_on(address, tmp_path):
    holder = _cb(address, tmp_path)
    holder.log_step(1, {"loss": 1.0})
    other = RLHFMonitorCallback(address=address, log_dir=str(tmp_path / "other"), analyze_checkpoints=False)
    # The registry closes the holder's socket for a new callback in the same process; a foreign process's
    # port is simulated with a plain socket.
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    busy = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    blocked = RLHFMonitorCallback(address=busy, log_dir=str(tmp_path / "b"), analyze_checkpoints=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 6):
            blocked.log_step(step, {"loss": 1.0})
    assert sum("cannot bind" in str(w.message) for w in caught) == 1
    assert not blocked.publisher.bound
    blocked.close()  # the JSONL log still has every step
    assert sum('"step_end"' in l for l in open(blocked.log_path)) == 5
    s.close(), holder.close(), other.close()


def test_non_loopback_bind_refused_without_insecure(tmp_path):
    assert is_loopback_address("tcp://127.0.0.1:5555") and is_loopback_address("tcp://localhost:1")
    assert is_loopback_address("tcp://[::1]:5") and is_loopback_address("ipc:///tmp/x")
    assert not is_loopback_address("tcp://0.0.0.0:5555") and not is_loopback_address("tcp://*:5555")
    cb = RLHFMonitorCallback(address="tcp://0.0.0.0:0", log_dir=str(tmp_path), analyze_checkpoints=False)
    with pytest.warns(RuntimeWarning, match="refusing to publish"):
        cb.log_step(1, {"loss": 1.0})
    assert not cb.publisher.bound
    cb.close()


def test_env_address_is_the_default(monkeypatch, tmp_path):
    address = free_address()
    monkeypatch.setenv("RLHF_TUI_ADDRESS", address)
    cb = RLHFMonitorCallback(log_dir=None, analyze_checkpoints=False)
    cb.log_step(1, {"loss": 1.0})
    assert cb.publisher.bound_address == address
    cb.close()


def test_forked_child_publishes_nothing(address, tmp_path):
    cb = _cb(address, tmp_path)
    cb.log_step(1, {"loss": 1.0})
    pid = os.fork()
    if pid == 0:  # child: enqueue must be a no-op and must not touch the parent's socket
        ok = cb.publisher.put(("log", 2, 0.0, {"loss": 2.0}))
        os._exit(0 if ok is False else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    cb.close()
    steps = [json.loads(l)["step"] for l in open(cb.log_path) if '"step_end"' in l]
    assert steps == [1]


def test_full_queue_drops_and_counts_without_blocking(tmp_path):
    cb = RLHFMonitorCallback(address=False, log_dir=None, analyze_checkpoints=False, queue_size=10)
    cb.log_step(0, {"loss": 1.0})
    pub = cb.publisher
    pub._stop.set()  # freeze the consumer side so the queue fills
    pub._thread.join(2)
    pub._stop.clear()
    accepted = sum(pub.put(("log", i, 0.0, {})) for i in range(100))
    assert accepted <= 10 and pub.stats["dropped"] >= 90
