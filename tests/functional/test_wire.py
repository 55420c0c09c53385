"""Publisher ↔ subscriber over real ZeroMQ sockets on free loopback ports (manual log_step API)."""

import json
import os
import warnings

import numpy as np
import pytest
from conftest import free_address, wait_for

from rlhf_tui.bridge.monitor.subscriber import Subscriber
from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
from rlhf_tui.bridge.training.publisher import is_loopback_address
from rlhf_tui.bridge.wire import events


def _cb(address, tmp_path, **kw):
    return RLHFMonitorCallback(address=address, log_dir=str(tmp_path / "logs"), analyze_checkpoints=False, **kw)


def test_late_joiner_gets_history_then_live(address, tmp_path):
    cb = _cb(address, tmp_path)
    for step in range(1, 501):
        cb.log_step(step, {"objective/kl": 0.01 * step, "ppo/loss/value": 1.0})
    sub = Subscriber(address).start()
    try:
        wait_for(lambda sub=sub: sub.store.current_run and sub.store.current_run.rows == 500, message="history")
        for step in range(501, 601):
            cb.log_step(step, {"objective/kl": 0.01 * step})
        wait_for(lambda sub=sub: sub.store.current_run.rows == 600, message="live steps")
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
            wait_for(lambda sub=sub: sub.store.current_run and sub.store.current_run.rows == 100)
            assert sub.store.transport["gaps"] == 0
    finally:
        second.stop(), third.stop(), cb.close()


def test_training_restart_is_a_new_run_and_the_old_one_is_kept(address, tmp_path):
    sub = Subscriber(address).start()
    try:
        cb1 = _cb(address, tmp_path, run_id="run-one")
        for step in range(1, 11):
            cb1.log_step(step, {"loss": 1.0})
        wait_for(lambda sub=sub: sub.store.current_run and sub.store.current_run.rows == 10)
        cb1.close()
        cb2 = _cb(address, tmp_path, run_id="run-two")
        for step in range(1, 6):
            cb2.log_step(step, {"loss": 2.0})
        wait_for(lambda sub=sub: sub.store.current == "run-two" and sub.store.current_run.rows == 5, timeout=15)
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
    steps = [json.loads(line) for line in open(cb.log_path) if '"step_end"' in line]
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
    assert sum('"step_end"' in line for line in open(blocked.log_path)) == 5
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
        ok = cb.publisher.put(events.LoggedStep(2, 0.0, {"loss": 2.0}))
        os._exit(0 if ok is False else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    cb.close()
    steps = [json.loads(line)["step"] for line in open(cb.log_path) if '"step_end"' in line]
    assert steps == [1]


def test_full_queue_drops_and_counts_without_blocking(tmp_path):
    cb = RLHFMonitorCallback(address=False, log_dir=None, analyze_checkpoints=False, queue_size=10)
    cb.log_step(0, {"loss": 1.0})
    pub = cb.publisher
    pub._stop.set()  # freeze the consumer side so the queue fills
    pub._thread.join(2)
    pub._stop.clear()
    accepted = sum(pub.put(events.LoggedStep(i, 0.0, {})) for i in range(100))
    assert accepted <= 10 and pub.stats["dropped"] >= 90


# -- history blocks, thinning, bounds on what peers may do ------------------------------------------------
def _publisher(address, **kw):
    from rlhf_tui.bridge.training.publisher import Publisher

    pub = Publisher(address, "block-run", handler=lambda item: [item], **kw)
    pub.start()
    return pub


def test_late_joiner_through_blocks_sees_exactly_what_a_live_monitor_saw(address):
    pub = _publisher(address)
    live = Subscriber(address).start()
    try:
        wait_for(lambda: live.store.connection == "live" or live.store.current_run is not None)
        rng = np.random.default_rng(0)
        for step in range(1, 1301):
            metrics = {"loss": float(rng.standard_normal()), "kl": None if step % 7 == 0 else 0.01}
            if step % 3 == 0:
                metrics["eval/reward"] = float("nan") if step % 9 == 0 else 1.5  # sparse column
            if step % 11 == 0:
                metrics["grad_norm"] = float("inf")
            pub.put(("step", {"step": step, "metrics": metrics, "wall": 0.0}, 0))
            if step % 100 == 0:
                pub.put(("system", {"rss_mb": float(step), "gpus": []}, 0))
        pub.flush()
        assert len(pub._blocks) >= 2  # most of the history is sealed into column blocks
        late = Subscriber(address).start()
        try:
            for sub in (live, late):
                wait_for(
                    lambda sub=sub: sub.store.current_run is not None and sub.store.current_run.rows == 1300,
                    message="all rows",
                )
            a, b = live.store.current_run, late.store.current_run
            np.testing.assert_array_equal(a.steps, b.steps)
            assert set(a.columns) == set(b.columns) == {"loss", "kl", "eval/reward", "grad_norm"}
            for name in a.columns:
                np.testing.assert_array_equal(a.values(name), b.values(name))  # NaN == NaN here
                np.testing.assert_array_equal(a.logged(name), b.logged(name))
            assert b.logged("eval/reward").sum() == 1300 // 3 and np.isnan(b.values("kl")[6])
            assert b.system[0]["rss_mb"] == 1300.0
            for sub in (live, late):
                t = sub.store.transport
                assert t["gaps"] == 0 and t["rejected"] == 0 and t["received"] == 1313
        finally:
            late.stop()
    finally:
        live.stop()
        pub.stop()


def test_history_is_bounded_by_thinning_blocks_and_late_joiners_see_the_whole_run(address):
    pub = _publisher(address, history_bytes=150_000)
    for step in range(1, 6001):
        pub.put(("step", {"step": step, "metrics": {"loss": 1.0 / step, "kl": 0.01 * step}, "wall": 0.0}, 0))
    pub.put(("run_end", {"global_step": 6000}, 0))
    pub.flush()
    wait_for(lambda: pub._history_bytes <= 150_000, message="thinning caught up")
    sub = Subscriber(address).start()
    try:
        wait_for(lambda sub=sub: sub.store.current_run is not None and sub.store.current_run.ended is not None)
        run = sub.store.current_run
        assert 500 < run.rows < 6000 and run.steps[0] == 1 and run.steps[-1] == 6000  # whole run, lower resolution
        assert (np.diff(run.steps) > 0).all()
        np.testing.assert_allclose(run.values("loss"), 1.0 / run.steps)
        assert sub.store.transport["gaps"] == 0 and sub.store.transport["rejected"] == 0
    finally:
        sub.stop()
        pub.stop()


def test_forwarded_samples_are_rate_limited_and_never_for_rank_0(address):
    import zmq

    from rlhf_tui.bridge.wire import protocol

    pub = _publisher(address, forward_token="run-token", world_size=4)
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)
    peer.linger = 0
    peer.connect(address)
    try:
        for i in range(50):
            peer.send(protocol.forward("other", 3, "system", {"rss_mb": float(i)}, 0.0, "run-token"))
        peer.send(protocol.forward("other", 0, "system", {"rss_mb": 1.0}, 0.0, "run-token"))  # not for rank 0
        peer.send(protocol.forward("other", 2, "step", {"step": 1, "metrics": {}}, 0.0, "run-token"))  # main only
        wait_for(lambda: pub.stats["forwarded"] + pub.stats["rejected"] >= 52, message="all handled")
        assert 1 <= pub.stats["forwarded"] <= 5 and pub.stats["rejected"] >= 47
    finally:
        peer.close(0)
        ctx.term()
        pub.stop()


def test_monitors_beyond_the_cap_are_refused_and_served_ones_unaffected(address, monkeypatch):
    from rlhf_tui.bridge.training import peers as peers_module

    monkeypatch.setattr(peers_module, "MAX_CLIENTS", 2)
    pub = _publisher(address)
    pub.put(("step", {"step": 1, "metrics": {"loss": 1.0}}, 0))
    subs = [Subscriber(address).start() for _ in range(4)]
    try:
        wait_for(lambda: sum(s.store.current_run is not None for s in subs) == 2, message="two served")
        wait_for(lambda: pub.stats["refused_clients"] >= 2, message="the others refused")
        assert pub.stats["clients"] == 2
        # The refused ones are told why (they waited with "is the training running?") and say so.
        refused = [s for s in subs if s.store.current_run is None]
        wait_for(lambda: all(s.store.connection == "full" for s in refused), message="told they are refused")
        assert all(s.error == "the run's monitor slots are full (2); retrying" for s in refused)
        from rlhf_tui.tui.render import connection_text

        assert "monitor slots are full" in connection_text({"connection": refused[0].store.connection}).plain
    finally:
        for s in subs:
            s.stop()
        pub.stop()


def test_a_finished_run_stays_ended_after_its_process_goes(address, tmp_path, monkeypatch):
    import time as _time

    from rlhf_tui.bridge.monitor import subscriber as subscriber_module

    monkeypatch.setattr(subscriber_module, "STALE_S", 0.3)
    cb = _cb(address, tmp_path)
    cb.log_step(1, {"loss": 1.0})
    sub = Subscriber(address).start()
    try:
        wait_for(lambda sub=sub: sub.store.current_run and sub.store.current_run.rows == 1)
        cb.close()  # run_end, then the socket closes: no more heartbeats
        wait_for(lambda sub=sub: sub.store.connection == "ended", timeout=30, message="ended")
        gone = _time.monotonic()
        wait_for(lambda: _time.monotonic() - gone > 1.0, message="well past the stale limit")
        assert sub.store.connection == "ended" and sub.stale_since is None
    finally:
        sub.stop()


def test_an_ipv6_loopback_address_carries_a_run(tmp_path):
    # tcp://[::1]:P failed with "No such device": ZeroMQ sockets are IPv4-only until their IPV6 option is set.
    import socket

    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    address = f"tcp://[::1]:{port}"
    cb = _cb(address, tmp_path)
    try:
        assert cb._ensure_run() is not None and cb._publisher.bound
        for step in range(1, 4):
            cb.log_step(step, {"loss": 1.0 / step})
        sub = Subscriber(address).start()
        try:
            wait_for(lambda: sub.store.current_run and sub.store.current_run.rows == 3, message="three steps")
            assert sub.store.current_run.values("loss").tolist()[-1] == pytest.approx(1 / 3)
        finally:
            sub.stop()
    finally:
        cb.close()
