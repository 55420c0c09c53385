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

from rlhf_tui.analysis import store as store_module
from rlhf_tui.analysis.store import Store, run_status
from rlhf_tui.bridge.monitor.ingest import (
    _metrics,
    _select,
    add_rows,
    apply_block,
    apply_envelope,
    rows_to_columns,
    safe_envelopes,
)
from rlhf_tui.bridge.wire import protocol

HELLO_S = 1.0
STALE_S = 3.5  # no heartbeat this long: stale
UNREACHABLE_S = 5.0  # nothing at all this long after starting: unreachable
STALLED_MIN_S = 30.0  # heartbeats but no step this long (or 10x the usual step interval): stalled
HANDSHAKE_FAILED = 0x800 | 0x2000 | 0x4000  # EVENT_HANDSHAKE_FAILED_{NO_DETAIL,PROTOCOL,AUTH} (libzmq 4.3)
MAX_RUNS = store_module.MAX_RUNS  # runs kept per monitor (a restarted training is a new run; the oldest go first)
MAX_COLUMNS = store_module.MAX_COLUMNS  # metric names per run (protocol.MAX_METRICS)
COLUMN_BUDGET_BYTES = 512 << 20  # all runs' metric columns together (older runs are dropped first)
MAX_AHEAD = 100_000  # messages held past a gap while the resync comes


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
        self.stale_since: float | None = None  # wall time
        self.error: str | None = None
        self.full = False  # the run answered "full" and has served this monitor nothing since

    def start(self) -> Subscriber:
        self._thread = threading.Thread(target=self._run, name=f"rlhf-tui-sub {self.address}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- thread ----------------------------------------------------------------------------------
    def _open(self, ctx):
        """A DEALER connected to the run (CURVE client when configured), and a monitor of its handshakes."""
        import zmq

        sock = ctx.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.setsockopt(zmq.RECONNECT_IVL, 200)
        # Exponential backoff up to 1 s: a monitor started before its training (imports take seconds) must
        # not sleep through a short run.
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # hellos wait for a live connection
        if self.address.startswith("tcp://"):
            sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        if protocol.ipv6_address(self.address):
            sock.setsockopt(zmq.IPV6, 1)
        try:
            if self._curve is not None:
                self._curve.apply_client(sock)  # fails closed (raises) without CURVE support
            sock.connect(self.address)
            events = sock.get_monitor_socket(HANDSHAKE_FAILED)
        except Exception:
            sock.close(0)
            raise
        return sock, events

    def _run(self) -> None:
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        ctx = zmq.Context()
        ctx.linger = 0
        try:
            sock, events = self._open(ctx)
        except Exception as exc:
            self.error = f"cannot connect to {self.address}: {exc}"
            self.store.connection = "unreachable"
            ctx.term()
            return
        last_hello = 0.0
        refused_at: float | None = None
        retry_s = 1.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                # Hello fast until the first answer (the connection may not be up yet), then every second.
                if now - last_hello >= (HELLO_S if self._last_message is not None else 0.05):
                    last_hello = now
                    self._send_hello(sock)
                poller = zmq.Poller()
                poller.register(sock, zmq.POLLIN)
                poller.register(events, zmq.POLLIN)
                ready = dict(poller.poll(100))
                if sock in ready:
                    self._receive(sock)
                if events in ready:
                    try:
                        event = recv_monitor_message(events, zmq.NOBLOCK)
                    except zmq.ZMQError:
                        event = {}
                    if event.get("event") == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                        self.error = (
                            f"{self.address} refused this monitor's key (is its public key in the run's "
                            "authorized/ folder?)"
                        )
                        refused_at = refused_at or time.monotonic()
                    elif self._last_message is None:  # libzmq retries these by itself
                        self.error = f"handshake with {self.address} failed (wrong server key or not rlhf-tui?)"
                if refused_at is not None and time.monotonic() - refused_at >= retry_s:
                    # libzmq does not reconnect after a refused handshake: start over with a fresh socket
                    # (the key may have been authorised since), backing off up to 10 s.
                    events.close(0)
                    sock.close(0)
                    sock, events = self._open(ctx)
                    refused_at, retry_s, last_hello = None, min(retry_s * 2, 10.0), 0.0
                self._judge_connection(time.monotonic())
        except Exception as exc:  # the monitor's thread never dies with a traceback
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            sock.close(0)
            events.close(0)
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

        frames = []
        for _ in range(1000):
            try:
                frames.append(sock.recv(zmq.NOBLOCK))
            except zmq.ZMQError:  # Again: nothing more for now
                break
        changed = self.feed_many(frames) if frames else False
        if changed and self._on_change is not None:
            self._on_change()

    def feed(self, frame: bytes) -> bool:
        """Decode one frame and apply it; returns whether the store changed. Never raises."""
        return self.feed_many((frame,))

    def feed_many(self, frames) -> bool:
        """Decode frames (each rejected on its own) and apply them under one lock: a backlog of step
        messages is stored column-wise in one go. Returns whether the store changed. Never raises."""
        store = self.store
        envelopes: list[dict] = []
        rejected: list[str] = []
        for frame in frames:
            try:
                envelopes.extend(protocol.decode_frame(frame))
            except protocol.ProtocolError as exc:
                rejected.append(str(exc))
            except Exception as exc:  # defensive: nothing received may crash the monitor
                rejected.append(f"decoder error {type(exc).__name__}")
        if rejected:
            with store.lock:
                for reason in rejected:
                    store.reject(reason)
        full = [e for e in envelopes if e["kind"] == protocol.FULL]
        if full:  # refused (its monitor slots are taken): said, and the hellos go on until a slot frees
            slots = full[-1]["data"].get("slots")
            count = f" ({slots})" if type(slots) is int and 0 < slots < 1 << 20 else ""
            self.error = f"the run's monitor slots are full{count}; retrying"
            self.full = True
            envelopes = [e for e in envelopes if e["kind"] != protocol.FULL]
        if not envelopes:
            return False
        self._last_message = time.monotonic()
        self.error, self.full = None, False
        safe_envelopes(envelopes)
        changed = False
        with store.lock:
            pending: list[dict] = []  # consecutive new step messages of one run, stored in one go
            names: set[str] = set()  # their metric names: the column cap counts them before they are stored
            for env in envelopes:
                try:
                    if env["kind"] == protocol.STEP and (not pending or pending[0]["run"] == env["run"]):
                        if self._admit(env, names):
                            pending.append(env)
                        continue
                    if pending:
                        changed |= self._store_steps(pending)
                        pending, names = [], set()
                        if env["kind"] == protocol.STEP:
                            if self._admit(env, names):
                                pending.append(env)
                            continue
                    changed |= self._apply(env)
                except Exception as exc:
                    store.reject(f"bad {str(env.get('kind'))[:20]} message: {type(exc).__name__}")
            if pending:
                try:
                    changed |= self._store_steps(pending)
                except Exception as exc:
                    store.reject(f"bad step messages: {type(exc).__name__}")
            if changed:
                store.touch()
        return changed

    # -- applying (store.lock held) -----------------------------------------------------------------
    def _run_state(self, run_id: str) -> _RunSeq | None:
        """Sequence state of a run; a new run id (training restarted) becomes current. Old runs are kept,
        at most MAX_RUNS of them (the oldest go first): a stream of bogus run ids cannot exhaust memory."""
        state = self._seq.get(run_id)
        if state is None:
            runs = self.store.runs
            while len(runs) >= min(MAX_RUNS, self.store.max_runs):
                oldest = next((r for r in runs if r != self._current_run), None)
                if oldest is None:
                    break
                self.store.drop_run(oldest)
            for gone in [r for r in self._seq if r not in runs]:  # dropped by the store (its own run cap)
                del self._seq[gone]
            state = self._seq[run_id] = _RunSeq()
        if run_id != self._current_run:
            self._current_run = run_id  # a new run id: training restarted; the old run stays in the store
        return state

    def _columns_ok(self, run_id: str, names, pending: set | frozenset = frozenset()) -> bool:
        """Room for these metric names? A run keeps at most MAX_COLUMNS names, and all runs together at most
        COLUMN_BUDGET_BYTES of columns (a column may grow to the store's capacity): older runs are dropped
        first. `pending`: new names of messages admitted in this batch but not stored yet (they count too)."""
        runs = self.store.runs
        run = runs.get(run_id)
        columns = run.columns if run is not None else {}
        if columns.keys() >= names:
            return True
        new = len(pending) + sum(1 for name in names if name not in columns and name not in pending)
        if len(columns) + new > MAX_COLUMNS:
            return False
        per_column = 9 * max(16, int(getattr(self.store, "capacity", 1 << 17)))
        limit = max(MAX_COLUMNS, COLUMN_BUDGET_BYTES // per_column)
        total = sum(len(r.columns) for r in runs.values())
        while total + new > limit:
            oldest = next((r for r in runs if r not in (run_id, self._current_run)), None)
            if oldest is None:
                return False
            total -= len(runs[oldest].columns)
            self.store.drop_run(oldest)
            self._seq.pop(oldest, None)
        return True

    def _sequence(self, state: _RunSeq, seq: int) -> bool:
        """Whether `seq` is new for this run (counting duplicates and gaps)."""
        transport = self.store.transport
        if seq < state.next_expected or seq in state.ahead:
            transport["duplicates"] += 1
            return False
        if seq > state.next_expected:
            missing_from = max(state.next_expected, state.thinned_upto + 1)
            if seq > missing_from and not state.ahead:
                transport["gaps"] += seq - missing_from
                self._resync_pending = True
            if len(state.ahead) >= MAX_AHEAD:  # a hostile stream of far-future seqs: start over from here
                state.ahead.clear()
                state.next_expected = seq + 1
            else:
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
        return True

    def _admit(self, env: dict, pending: set) -> bool:
        """A step message: new (by seq) and within the column bound, counting the new names of the messages of
        this batch admitted before it (`pending`, updated)."""
        state = self._run_state(env["run"])
        names = env["data"]["metrics"].keys()
        run = self.store.runs.get(env["run"])
        if run is not None and run.columns.keys() >= names:  # the common case: every name known
            return self._sequence(state, env["seq"])
        if not self._columns_ok(env["run"], names, pending):
            self.store.reject("too many metric names")
            return False
        if not self._sequence(state, env["seq"]):
            return False
        pending.update(names - run.columns.keys() if run is not None else names)
        return True

    def _store_steps(self, envs: list[dict]) -> bool:
        store = self.store
        run = store.run(envs[0]["run"])
        for env in envs:
            if env["seq"] > run.last_seq:
                run.last_seq = env["seq"]
        run.last_heartbeat = time.monotonic()
        if len(envs) == 1:
            apply_envelope(store, envs[0])
        else:
            import numpy as np

            steps = np.array([e["data"]["step"] for e in envs], dtype=np.int64)
            stamps = np.array([e["ts"] for e in envs], dtype=np.float64)
            add_rows(
                run, steps, stamps, rows_to_columns([_metrics(e["data"]["metrics"], safe_names=True) for e in envs])
            )
        store.transport["received"] += len(envs)
        return True

    def _apply(self, env: dict) -> bool:
        store = self.store
        kind, run_id, seq = env["kind"], env["run"], env["seq"]
        if kind == protocol.HELLO or kind == protocol.FORWARD:
            store.reject(f"unexpected {kind} from server")
            return False
        state = self._run_state(run_id)
        if kind == protocol.HEARTBEAT:
            data = env["data"]
            thinned = data.get("thinned_upto")
            if type(thinned) is int:
                state.thinned_upto = max(state.thinned_upto, thinned)
            dropped = data.get("dropped")
            if type(dropped) is int and dropped >= 0:
                store.transport["dropped"] = dropped
            apply_envelope(store, env)
            return True
        if kind == protocol.BLOCK:
            return self._apply_block(state, env)
        if not self._sequence(state, seq):
            return False
        store.transport["received"] += 1
        apply_envelope(store, env)
        return True

    def _apply_block(self, state: _RunSeq, env: dict) -> bool:
        import numpy as np

        store = self.store
        data = env["data"]
        first, last = env["seq"], data["last"]
        count = int(data["seq"].size) + len(data["other"])
        if last < state.next_expected:
            store.transport["duplicates"] += count
            return False
        if not self._columns_ok(env["run"], data["cols"].keys()):
            store.reject("too many metric names")
            return False
        min_seq, behind_gap = state.next_expected, first > state.next_expected
        if behind_gap:  # lost messages before this block: keep it, ask for the rest again
            missing_from = max(state.next_expected, state.thinned_upto + 1)
            if first > missing_from and not state.ahead:
                store.transport["gaps"] += first - missing_from
                self._resync_pending = True
            min_seq = first
        skip = state.ahead
        if skip:  # already received past an earlier gap: do not apply those twice
            ahead = np.fromiter(skip, dtype=np.int64)
            keep = ~np.isin(data["seq"], ahead)
            if not keep.all():
                rows = np.flatnonzero(keep)
                data["cols"] = {n: _select(i, v, rows) for n, (i, v) in data["cols"].items()}
                data["seq"], data["step"], data["ts"] = data["seq"][rows], data["step"][rows], data["ts"][rows]
            data["other"] = [e for e in data["other"] if e["seq"] not in skip]
        applied = apply_block(store, env, min_seq=min_seq)
        store.transport["duplicates"] += count - applied
        store.transport["received"] += applied
        if behind_gap:
            state.ahead.update(range(first, last + 1))
        else:
            state.next_expected = max(state.next_expected, last + 1)
            state.ahead = {s for s in state.ahead if s > last}
            while state.next_expected in state.ahead:
                state.ahead.discard(state.next_expected)
                state.next_expected += 1
        if run := store.runs.get(env["run"]):
            run.last_heartbeat = time.monotonic()
        return applied > 0

    def _judge_connection(self, now: float) -> None:
        store = self.store
        previous = store.connection
        run = store.current_run
        if self.full:
            state = "full"
        elif self._last_message is None:
            state = "unreachable" if now - self._started > UNREACHABLE_S else "connecting"
        elif run is not None and run.ended is not None:
            # a finished run whose process has gone is not "stale"; one that raised says so
            state = "crashed" if run_status(run) in ("crashed", "interrupted") else "ended"
        elif now - self._last_message > STALE_S:
            state = "stale"
        else:
            state = "live"
            if run is not None and run.ended is None and run.rows:
                last = run.last_step_time or self._last_message
                interval = _typical_interval(run)
                if now - last > max(STALLED_MIN_S, 10 * interval):
                    state = "stalled"
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
