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
