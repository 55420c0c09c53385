"""The publisher thread's loop (no socket): how often it wakes, which is most of what it costs a fast run."""

from __future__ import annotations

import time

import zmq
from conftest import wait_for

from rlhf_tui.bridge.training.publisher import Publisher
from rlhf_tui.bridge.wire import events, protocol


def test_the_thread_sleeps_until_the_next_drain_instead_of_spinning_on_a_rounded_down_timeout(monkeypatch):
    # pyzmq truncates a poll timeout to whole milliseconds, so with 0.9 ms left before the drain was due the
    # loop polled with 0 and spun (dozens of turns, each a poll and a tick) whenever the poll woke on time.
    # Here every poll wakes exactly on time (the fast case: a quiet machine), after the whole ms it was given.
    real_poll = zmq.Poller.poll

    def punctual_poll(self, timeout=None):
        ms = int(timeout) if timeout is not None else 1000  # what pyzmq passes to libzmq
        deadline = time.monotonic() + ms / 1000
        while True:
            ready = real_poll(self, 0)
            left = deadline - time.monotonic()
            if ready or left <= 0:
                return ready
            time.sleep(min(left, 0.005))

    monkeypatch.setattr(zmq.Poller, "poll", punctual_poll)
    turns = []
    pub = Publisher(False, "loop-run", handler=lambda item: [item], idle=lambda: turns.append(1) or [])
    pub.start()
    try:
        for step in range(4):
            pub.put(events.Message(protocol.STEP, {"step": step, "metrics": {"loss": 0.5}}))
            wait_for(lambda n=step: pub.stats["published"] > n, timeout=10, message=f"step {step} published")
    finally:
        pub.stop()
    # One turn to drain each item (it waits out BATCH_S since the previous drain) and at most a few idle looks.
    assert pub.stats["published"] == 4 and pub.stats["handler_errors"] == 0
    assert len(turns) <= 4 * 3 + 2, f"{len(turns)} loop turns for 4 drains"


def test_an_idle_thread_backs_off_to_one_look_a_second_and_an_item_brings_it_back():
    looks = []
    pub = Publisher(False, "idle-run", handler=lambda item: [item], idle=lambda: looks.append(time.monotonic()) or [])
    pub.start()
    try:
        wait_for(lambda: len(looks) >= 5, timeout=15, message="five idle looks")
        gaps = [b - a for a, b in zip(looks, looks[1:5])]
        assert gaps[0] <= 0.6 and gaps[-1] >= 0.9, gaps  # 0.25 s or 0.5 s apart at first, then 1 s
        put_at = time.monotonic()
        pub.put(events.Message(protocol.STEP, {"step": 1, "metrics": {"loss": 0.5}}))
        wait_for(lambda: pub.stats["published"] == 1, timeout=5, message="the item published")
        assert time.monotonic() - put_at <= 1.5  # at most one backed-off look late
        seen = len(looks)
        wait_for(lambda: len(looks) >= seen + 2, timeout=5, message="two looks after the drain")
        assert looks[seen + 1] - looks[seen] < 0.9  # back to IDLE_POLL_S after finding something
        wait_for(lambda: looks[-1] - looks[-2] >= 0.9, timeout=10, message="backed off again")
        pub.put(events.Message(protocol.STEP, {"step": 2, "metrics": {"loss": 0.5}}))
        started = time.monotonic()
        assert pub.flush(5) and pub.stats["published"] == 2
        assert time.monotonic() - started < 0.6  # flush() wakes a backed-off thread: train end is not delayed
    finally:
        pub.stop()


def test_stop_gives_what_zeromq_still_holds_time_to_leave(monkeypatch):
    # The socket was closed with linger 0: run_end handed to ZeroMQ but not yet written by its I/O thread was
    # dropped, and on a busy machine a monitor never saw its run end (it went stale instead).
    from conftest import free_address

    lingers = []
    real_close = zmq.Socket.close

    def spy_close(self, linger=None):
        if self.type == zmq.ROUTER:
            lingers.append(linger)
        return real_close(self, linger)

    monkeypatch.setattr(zmq.Socket, "close", spy_close)
    pub = Publisher(free_address(), "linger-run", handler=lambda item: [item])
    pub.start()
    assert pub.bound
    pub.stop()
    assert lingers and 250 <= lingers[-1] <= 1000, lingers


def test_the_handlers_warm_up_runs_once_on_the_thread_before_its_first_drain_and_a_failing_one_is_harmless():
    """`warm` (the recorder imports the detector engine there): on the publisher thread as it starts, not on
    the training thread and not at the first step; if it raises, the thread still publishes."""
    import threading

    for fails in (False, True):
        seen: list = []
        box: dict = {}

        def warm(fails=fails, seen=seen, box=box):
            seen.append((threading.current_thread().name, box["pub"].stats["published"]))
            if fails:
                raise RuntimeError("no engine here")

        pub = box["pub"] = Publisher(False, "warm-run", handler=lambda item: [item], warm=warm)
        pub.start()
        try:
            pub.put(events.Message(protocol.STEP, {"step": 1, "metrics": {"loss": 0.5}}))
            wait_for(lambda pub=pub: pub.stats["published"] == 1, timeout=10, message="the step published")
        finally:
            pub.stop()
        assert seen == [("rlhf-tui-publisher", 0)]


def test_the_recorders_warm_up_imports_the_engine_only_where_it_will_judge(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from rlhf_tui.bridge.training.callback import RLHFMonitorCallback\n"
        "from rlhf_tui.bridge.training.recorder import Recorder\n"
        "for detect in (False, True):\n"
        f"    cb = RLHFMonitorCallback(address=False, log_dir={str(tmp_path)!r}, detect_anomalies=detect)\n"
        "    Recorder(cb).warm()\n"
        "    print(detect, 'rlhf_tui.bridge.training.anomalies' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["False", "False", "True", "True"]
