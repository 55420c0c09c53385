"""The runs of this process still open, and how they end when the interpreter does.

Process-wide, installed at import: an uncaught exception is remembered (excepthook) so that the exit hook can
send each open run its run_end with status "crashed" (or "interrupted") and why; a run that no one closed ends
as "finished". Both hooks wrap what was there before and never raise.
"""

from __future__ import annotations

import atexit
import sys
import time
import weakref

# Imported first on purpose: publisher.py registers its own exit hook (stop every publisher) at import, so the
# one below is registered after it and runs before it (atexit is last-in first-out): run_end goes out first.
from rlhf_tui.bridge.training.publisher import Publisher
from rlhf_tui.bridge.wire import events

EXIT_FLUSH_S = 3.0  # at interpreter exit, open runs get this long in all to send run_end

# Publishers whose run is open (run_start sent, no run_end yet). A publisher is kept alive by its thread, so
# this holds even when the callback itself is gone (a custom loop in a function that returned).
open_runs: weakref.WeakSet[Publisher] = weakref.WeakSet()

crashes: list[tuple[str, str]] = []  # (status, "Type: first line") of an exception that ended the interpreter


def exception_text(exc: BaseException | None) -> str | None:
    """`Type: first line of the message` (bounded), or None."""
    if exc is None:
        return None
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:300] if first else type(exc).__name__


def _record_crash(hook):
    def excepthook(tp, value, tb):
        if open_runs:  # what ended the run goes into its run_end (the exit hook below sends it)
            status = "interrupted" if issubclass(tp, KeyboardInterrupt) else "crashed"
            crashes.append((status, exception_text(value) or tp.__name__))
        hook(tp, value, tb)

    return excepthook


sys.excepthook = _record_crash(sys.excepthook)


def end_open_runs() -> None:
    """At interpreter exit: run_end for every run still open (a custom loop without close(), or a training that
    raised: then with status "crashed"), flushed (bounded)."""
    pubs = list(open_runs)
    status, error = crashes[-1] if crashes else ("finished", None)
    for pub in pubs:
        pub.put(events.RunEnded(None, status, error))
    deadline = time.monotonic() + EXIT_FLUSH_S
    for pub in pubs:
        pub.flush(max(0.0, deadline - time.monotonic()))
    open_runs.clear()


atexit.register(end_open_runs)
