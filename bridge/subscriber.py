"""The monitor's side of the wire: a thread that owns one DEALER socket, keeps a Store up to date.

It says hello on connect and every second (so a restarted training, a dropped forward or a killed monitor
all heal by themselves), validates every frame, de-duplicates by sequence number, counts what was
received, rejected, lost (gaps) and dropped by the training side, and judges the connection:
`connecting`, `live`, `stalled` (heartbeats but no new steps), `stale` (no heartbeat), `unreachable`.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from rlhf_tui.analysis.store import Store
from rlhf_tui.bridge import protocol
from rlhf_tui.bridge.ingest import apply_envelope

HELLO_S = 1.0
STALE_S = 3.5            # no heartbeat this long: stale
UNREACHABLE_S = 5.0      # nothing at all this long after starting: unreachable
STALLED_MIN_S = 30.0     # heartbeats but no step this long (or 10x the usual step interval): stalled


@dataclass
class _RunSeq:
    next_expected: int = 0
    ahead: set = field(default_factory=set)
    thinned_upto: int = -1


class Subscriber:
    """Connects to a training run's address and mirrors it into `store`. `start()` / `stop()`."""

    def __init__(self, address: str, store: Store | None = None, *, curve=None, on_change=None):
        self.address = address
        self.store = store or Store()
        self.store.source = address
        self.store.connection = "connecting"
        self._curve = curve
        self._on_change = on_change
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq: dict[str, _RunSeq] = {}
        self._started = time.monotonic()
        self._last_message: float | None = None
        self._current_run: str | None = None
        self._resync_pending = True
        self.stale_since: float | None = None   # wall time
        self.error: str | None = None

    def start(self) -> "Subscriber":
        self._thread = threading.Thread(target=self._run, name=f"rlhf-tui-sub {self.address}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- thread ----------------------------------------------------------------------------------
    def _run(self) -> None:
        import zmq

        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 200)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)   # exponential backoff up to 5 s
        sock.setsockopt(zmq.IMMEDIATE, 1)               # hellos wait for a live connection
        if self.address.startswith("tcp://"):
            sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        try:
            if self._curve is not None:
                self._curve.apply_client(sock)
            sock.connect(self.address)
        except zmq.ZMQError as exc:
            self.error = f"cannot connect to {self.address}: {exc}"
            self.store.connection = "unreachable"
            sock.close(0)
            ctx.term()
            return
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        last_hello = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                # Hello fast until the first answer (the connection may not be up yet), then every second.
                if now - last_hello >= (HELLO_S if self._last_message is not None else 0.05):
                    last_hello = now
                    self._send_hello(sock)
                if dict(poller.poll(100)):
                    self._receive(sock)
                self._judge_connection(time.monotonic())
        finally:
            sock.close(0)
            ctx.term()

    def _send_hello(self, sock) -> None:
        import zmq

        run = self._current_run
        state = self._seq.get(run) if run else None
        since = state.next_expected if state else 0
        frame = protocol.hello(run, since, resync=self._resync_pending)
        try:
            sock.send(frame, zmq.NOBLOCK)
            self._resync_pending = False
        except zmq.ZMQError:
            pass  # not connected yet (IMMEDIATE): retried next second

    def _receive(self, sock) -> None:
        import zmq

        changed = False
        for _ in range(1000):
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError:
                break
            changed |= self.feed(frame)
        if changed and self._on_change is not None:
            self._on_change()

    def feed(self, frame: bytes) -> bool:
        """Decode one frame and apply it; returns whether the store changed. Never raises."""
        store = self.store
        self._last_message = time.monotonic()
        try:
            envelopes = protocol.decode_frame(frame)
        except protocol.ProtocolError as exc:
            with store.lock:
                store.reject(str(exc))
            return False
        except Exception as exc:  # defensive: nothing received may crash the monitor
            with store.lock:
                store.reject(f"decoder error {type(exc).__name__}")
            return False
        changed = False
        with store.lock:
            for env in envelopes:
                try:
                    changed |= self._apply(env)
                except Exception as exc:
                    store.reject(f"bad {env.get('kind')} message: {type(exc).__name__}")
            if changed:
                store.touch()
        return changed

    def _apply(self, env: dict) -> bool:
        store = self.store
        kind, run_id, seq = env["kind"], env["run"], env["seq"]
        if kind == protocol.HELLO or kind == protocol.FORWARD:
            store.reject(f"unexpected {kind} from server")
            return False
        state = self._seq.setdefault(run_id, _RunSeq())
        if run_id != self._current_run:
            self._current_run = run_id   # a new run id: training restarted; the old run stays in the store
        if kind == protocol.HEARTBEAT:
            data = env["data"]
            thinned = data.get("thinned_upto")
            if isinstance(thinned, int) and not isinstance(thinned, bool):
                state.thinned_upto = max(state.thinned_upto, thinned)
            dropped = data.get("dropped")
            if isinstance(dropped, int) and not isinstance(dropped, bool) and dropped >= 0:
                store.transport["dropped"] = dropped
            apply_envelope(store, env)
            return True
        if seq < state.next_expected or seq in state.ahead:
            store.transport["duplicates"] += 1
            return False
        if seq > state.next_expected:
            missing_from = max(state.next_expected, state.thinned_upto + 1)
            if seq > missing_from and not state.ahead:
                store.transport["gaps"] += seq - missing_from
                self._resync_pending = True
            state.ahead.add(seq)
        else:
            state.next_expected = seq + 1
            while state.next_expected in state.ahead:
                state.ahead.discard(state.next_expected)
                state.next_expected += 1
        if state.ahead and min(state.ahead) <= state.thinned_upto + 1:
            # history thinned by the server: the missing seqs will never come; move on
            state.next_expected = max(state.ahead) + 1
            state.ahead.clear()
        store.transport["received"] += 1
        apply_envelope(store, env)
        return True

    def _judge_connection(self, now: float) -> None:
        store = self.store
        previous = store.connection
        run = store.current_run
        if self._last_message is None:
            state = "unreachable" if now - self._started > UNREACHABLE_S else "connecting"
        elif now - self._last_message > STALE_S:
            state = "stale"
        else:
            state = "live"
            if run is not None and run.ended is None and run.rows:
                last = run.last_step_time or self._last_message
                interval = _typical_interval(run)
                if now - last > max(STALLED_MIN_S, 10 * interval):
                    state = "stalled"
            if run is not None and run.ended is not None:
                state = "ended"
        if state in ("stale", "unreachable") and previous not in ("stale", "unreachable"):
            self.stale_since = time.time()
        elif state not in ("stale", "unreachable"):
            self.stale_since = None
        if state != previous:
            with store.lock:
                store.connection = state
                store.stale_since = self.stale_since
                store.touch()
            if self._on_change is not None:
                self._on_change()


def _typical_interval(run) -> float:
    times = run.times
    if times.size < 3:
        return 0.0
    import numpy as np

    diffs = np.diff(times[-50:])
    diffs = diffs[np.isfinite(diffs) & (diffs > 0)]
    return float(np.median(diffs)) if diffs.size else 0.0
