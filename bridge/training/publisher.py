"""The training-side server: a background thread that owns the run's one ZeroMQ socket.

The training thread only calls `put()` (a bounded deque append: never blocks, drops are counted). The thread
turns queued items into envelopes (through a `handler`: the callback's recorder.py), keeps them as the run's
history (history.py), and serves every connected monitor from that history with non-blocking sends (peers.py):
a monitor that joins late, falls behind or reconnects simply has an older cursor. See docs/protocol.md.
"""

from __future__ import annotations

import atexit
import ipaddress
import logging
import math
import os
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from rlhf_tui.bridge.training.connections import ConnectionGuard, bound_router
from rlhf_tui.bridge.training.forwards import ForwardIntake
from rlhf_tui.bridge.training.history import History
from rlhf_tui.bridge.training.peers import Peers

log = logging.getLogger("rlhf_tui.bridge")

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
ADDRESS_ENV = "RLHF_TUI_ADDRESS"
HEARTBEAT_S = 1.0
POLL_MS = 10  # loop turn while a monitor lacks history (a full pipe backs off per monitor: peers.PUMP_RETRY_S)
BATCH_S = 0.25  # the thread handles queued items at most this often, in one go. Every wake-up of a thread
# costs ~0.1-0.2 ms of CPU on this VM whatever it does (measured: a bare 50 ms sleep loop, 0.1 ms a turn), so
# the thread wakes ~4 times a second: 0.1 s batches cost 1.0 ms per step of a tiny GRPO run, see performance.md
IDLE_POLL_S = 0.25  # with nothing queued the thread looks this often (put() never wakes it) ...
IDLE_POLL_MAX_S = 1.0  # ... backing off to this while it keeps finding nothing (slow steps: fewer wake-ups)

STOP_GRACE_S = 1.0  # on stop, connected monitors get at most this long to receive the rest of the history
CLOSE_LINGER_MIN_S = 0.25  # ... and what ZeroMQ still holds at the close at least this long to leave

# The publisher that owns each address in this process. The lock only guards the dict: nothing that waits
# (stopping a thread, binding) ever runs while it is held, so no order of starts and stops can deadlock.
_active_by_address: dict[str, Publisher] = {}
_registry_lock = threading.RLock()
_live: weakref.WeakSet[Publisher] = weakref.WeakSet()  # started, not stopped: stopped by one exit hook
_fork_generation = 0  # bumped in a forked child: publishers made before the fork go quiet there


def _after_fork_in_child() -> None:
    global _fork_generation, _registry_lock
    _fork_generation += 1
    _registry_lock = threading.RLock()  # another thread may have held it at the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


def _stop_all() -> None:
    """At interpreter exit: stop every publisher still running (each bounded). Registered at import, so it runs
    after the callback's own exit hook (atexit is last-in first-out), which sends run_end first."""
    for pub in list(_live):
        try:
            pub.stop(2.0)
        except Exception:  # exiting: nothing to report to
            pass


atexit.register(_stop_all)


def resolve_address(address: str | None) -> str:
    return address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def is_loopback_address(address: str) -> bool:
    """True for ipc:// and inproc:// and for tcp:// on a loopback host."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', interface names and host names may reach other machines


class Publisher(History, Peers):
    """Queue + thread + socket. `handler(item) -> iterable of (kind, data, rank)` runs on the thread."""

    def __init__(
        self,
        address: str | None,
        run_id: str,
        handler: Callable[[Any], Iterable[tuple]],
        *,
        queue_size: int = 10_000,
        history_bytes: int = 256 << 20,
        insecure: bool = False,
        curve: Any = None,
        idle: Callable[[], Iterable[tuple]] | None = None,
        status: Callable[[], dict] | None = None,
        forward_token: str | None = None,
        world_size: int | None = None,
        forwarded: Callable[[str, dict, int], Iterable[tuple]] | None = None,
        warm: Callable[[], None] | None = None,
    ):
        super().__init__(run_id, history_bytes)
        self._warm = warm  # run once on the thread after the bind (the handler's imports, while training starts)
        self.address = resolve_address(address) if address is not False else ""
        self._handler = handler
        self._idle = idle
        self._status = status  # more heartbeat fields (the JSONL log's errors), called on this thread
        self._queue: deque = deque()
        self._queue_size = queue_size
        self._insecure = insecure
        self._curve = curve
        self._pid = os.getpid()
        self._generation = _fork_generation
        self._stop = threading.Event()
        self._release = threading.Event()  # another publisher of this process takes the address over
        self._released = threading.Event()  # ... and the socket is closed
        self.run_open = False  # set by the callback: run_start sent, run_end not yet
        self._thread: threading.Thread | None = None
        self._wake_send = self._wake_recv = None
        self._auth = None
        self._init_peers()
        self.bound = False
        self.bound_address: str | None = None
        self.stats = {
            "queued": 0,
            "dropped": 0,
            "published": 0,
            "handler_errors": 0,
            "rejected": 0,
            "send_again": 0,
            "clients": 0,
            "refused_clients": 0,
            "forwarded": 0,
            "rx_throttled": 0,
            "cpu_s": 0.0,
        }
        self._last_error: str | None = None
        # Other ranks' forwards: taken only with this token (None: from nobody), for ranks 1 .. world_size-1;
        # `forwarded` (the recorder) logs each and gives the messages to publish (forwards.py).
        self._forwards = ForwardIntake(forward_token, world_size, self.stats, forwarded)

    @property
    def _forward_token(self) -> str | None:
        return self._forwards.token

    # -- training thread ------------------------------------------------------------------------
    def put(self, item: Any) -> bool:
        """Enqueue for the background thread. Never blocks; returns False (and counts) when dropped."""
        if self._generation != _fork_generation or self._stop.is_set():
            return False  # a forked child (DataLoader worker) or a stopped publisher publishes nothing
        if len(self._queue) >= self._queue_size:
            self.stats["dropped"] += 1
            return False
        self._queue.append(item)
        return True

    def _wake(self) -> None:
        try:
            self._wake_send.send(b"\0")
        except (OSError, AttributeError):
            pass

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the thread and bind. A publisher of this process already on the address (a second trainer,
        a notebook cell run again) is stopped first: the newest one takes the address over."""
        if self._thread is not None:
            return
        previous = None
        if self.address:
            with _registry_lock:  # only the dict under the lock; the previous one is stopped outside it
                previous = _active_by_address.get(self.address)
                _active_by_address[self.address] = self
        if previous is not None and previous is not self:
            if previous.run_open and not previous._stop.is_set():
                warnings.warn(
                    f"rlhf-tui: run {self.run_id} takes {self.address} over from run {previous.run_id}, which has "
                    "not ended: that one goes on in its JSONL log only (give each concurrent trainer its own "
                    "address= to watch both).",
                    RuntimeWarning,
                    stacklevel=4,
                )
                previous.release_address()
            else:
                previous.stop()
        self._start_thread("rlhf-tui-publisher")

    def release_address(self, timeout: float = 2.0) -> bool:
        """Close the socket (bounded wait) but keep the thread: the run goes on in its JSONL log, and another
        publisher may bind the address."""
        if self._thread is None or not self._thread.is_alive() or os.getpid() != self._pid:
            return True
        self._release.set()
        self._wake()
        return self._released.wait(timeout)

    def _start_thread(self, name: str) -> None:
        import socket

        self._bound_event = threading.Event()
        self._wake_send, self._wake_recv = socket.socketpair()
        self._wake_send.setblocking(False)
        self._wake_recv.setblocking(False)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._bound_event.wait(5.0)  # bind result is known before training goes on (bounded)
        _live.add(self)

    def stop(self, timeout: float = 5.0) -> None:
        """Drain the queue, give connected monitors up to STOP_GRACE_S to catch up, close the socket. Bounded
        by `timeout`; safe to call twice, from any thread, from atexit, after fork."""
        if self._thread is None or os.getpid() != self._pid:
            return
        self._stop_deadline = time.monotonic() + min(STOP_GRACE_S, timeout / 2)
        self._stop.set()
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        _live.discard(self)
        with _registry_lock:
            if _active_by_address.get(self.address) is self:
                del _active_by_address[self.address]

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait (bounded) until the queue is empty; for tests and train end, never for the hot path."""
        deadline = time.monotonic() + timeout
        self._wake()  # an idle thread may be backed off to IDLE_POLL_MAX_S: look now
        while (self._queue or self._busy) and time.monotonic() < deadline:
            time.sleep(0.002)
        return not self._queue

    _busy = False

    # -- background thread ----------------------------------------------------------------------
    def _refusal(self, verb: str, activity: str) -> str | None:
        """Why this socket must not be opened (one line), or None: a non-loopback address needs CURVE keys (or
        insecure=True); keys without CURVE in libzmq fail closed."""
        import zmq

        if not is_loopback_address(self.address) and not self._insecure and self._curve is None:
            return (
                f"refusing to {verb} non-loopback address {self.address} without CURVE keys; "
                "pass keys_dir=/curve= (or insecure=True to allow it)"
            )
        if self._curve is not None and not zmq.has("curve"):
            return f"CURVE keys were given but this libzmq has no CURVE support; {activity} disabled (fail closed)"
        return None

    def _refuse(self, message: str) -> tuple[None, None]:
        warnings.warn(f"rlhf-tui: {message}. Training continues unmonitored.", RuntimeWarning, stacklevel=3)
        return None, None

    def _new_socket(self, kind: str, verb: str, activity: str):
        """A context and a socket of `kind` (a zmq name, linger 0) for this address, or (None, None): no address,
        or one that must not be opened (warned: `_refusal`)."""
        if not self.address:
            return None, None
        try:
            import zmq
        except ImportError:
            return self._refuse(f"pyzmq is not installed; {activity} disabled")
        refusal = self._refusal(verb, activity)
        if refusal:
            return self._refuse(refusal)
        ctx = zmq.Context()
        ctx.linger = 0
        sock = ctx.socket(getattr(zmq, kind))
        sock.linger = 0
        return ctx, sock

    def _bind(self):
        ctx, sock = self._new_socket("ROUTER", "publish on", "publishing")
        if sock is None:
            return None, None
        import zmq

        try:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # unknown/full peer -> error instead of silent loss
            bound_router(sock, self.address)
            if self._curve is not None:
                self._auth = self._curve.authenticator(ctx)  # ZAP handler on this context, before the bind
                self._curve.apply_server(sock)
            sock.bind(self.address)
            self.bound_address = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        except Exception as exc:
            sock.close(0)
            self._stop_auth()
            ctx.term()
            what = "cannot bind" if isinstance(exc, zmq.ZMQError) else "cannot set up CURVE on"
            return self._refuse(f"{what} {self.address} ({exc}); publishing disabled")
        self.bound = True
        return ctx, sock

    def _stop_auth(self) -> None:
        if self._auth is not None:
            try:
                self._auth.stop()
            except Exception as exc:
                self._note_error(exc)
            self._auth = None

    def _run(self) -> None:
        try:
            ctx, sock = self._bind()
        except Exception as exc:  # never let a monitoring problem reach training
            self._note_error(exc)
            ctx = sock = None
        self._bound_event.set()
        if self._warm is not None:
            try:
                self._warm()
            except Exception as exc:  # a failed warm-up only costs the first step its imports
                self._note_error(exc)
        try:
            self._loop(sock)
        except Exception as exc:
            self._note_error(exc)
        finally:
            if sock is not None:
                # What was handed to ZeroMQ but not yet written (run_end, the last rows) gets what is left of the
                # stop grace (at least CLOSE_LINGER_MIN_S) to go out: linger 0 would drop it on a busy machine,
                # and ctx.term() below waits at most this long.
                left = self._stop_deadline - time.monotonic() if self._stop.is_set() else 0.0
                sock.close(linger=int(1000 * min(STOP_GRACE_S, max(CLOSE_LINGER_MIN_S, left))))
            self._stop_auth()
            if ctx is not None:
                ctx.term()
            for end in (self._wake_recv, self._wake_send):
                try:
                    end.close()  # a closed Python socket refuses send(): no stray writes to a reused fd
                except OSError:
                    pass

    def _loop(self, sock) -> None:
        import zmq

        poller = zmq.Poller()
        guard = None
        if sock is not None:
            poller.register(sock, zmq.POLLIN)
            if self.bound_address.startswith(("tcp://", "ipc://")):
                guard = ConnectionGuard(sock, self.bound_address, self.stats)
                poller.register(guard.events, zmq.POLLIN)
        try:
            self._turns(poller, sock, guard)
        finally:
            if guard is not None:
                guard.close()

    def _turns(self, poller, sock, guard) -> None:
        import zmq

        wake = self._wake_recv
        last_heartbeat = last_drain = 0.0
        idle_s = IDLE_POLL_S
        while True:
            if self._release.is_set() and not self._released.is_set():
                if sock is not None:  # taken over: no socket from now on (the owner closes it again: a no-op)
                    if guard is not None:
                        poller.unregister(guard.events)
                        guard.close()
                        guard = None
                    poller.unregister(sock)
                    sock.close(0)
                    sock = None
                    self._clients.clear()
                    self.bound = False
                self._released.set()
            idle_turn = False
            stopping = self._stop.is_set()
            now = time.monotonic()
            since_drain = now - last_drain
            if stopping:
                timeout = POLL_MS / 1000 if not self._queue and self._clients_behind() else 0.0
            elif self._queue or since_drain < BATCH_S:
                # Items that come within BATCH_S of the last drain wait for the next one (no wake-up per
                # step on a fast run; no syscall in put()) ...
                timeout = max(0.0, BATCH_S - since_drain)
            elif self._history_bytes > self._history_bytes_max and self._thinnable():
                timeout = POLL_MS / 1000
            elif (pump_s := self._next_pump_s(now)) is not None:  # a monitor lacks history: its retry is due then
                timeout = max(POLL_MS / 1000, pump_s)
            else:
                # ... after that it looks every IDLE_POLL_S, doubling to IDLE_POLL_MAX_S while it finds nothing:
                # put() never makes a system call or wakes a thread (which cost a step ~45 µs when measured),
                # and every wake-up costs this thread ~0.1-0.2 ms, so a slow step is not looked for 4 times a second.
                timeout, idle_turn = idle_s, True
                if self._clients:  # monitors get their heartbeat on time
                    timeout = min(timeout, max(0.0, last_heartbeat + HEARTBEAT_S - now))
            if sock is not None:  # what peers send is not read while throttled
                poller.register(sock, zmq.POLLIN if now >= self._rx_backoff_until else 0)
            rebind_s = guard.wait_s(now) if guard is not None else None
            if rebind_s is not None:  # bind again on time after shedding
                timeout = min(timeout, rebind_s)
            if sock is not None and now < self._rx_backoff_until:
                # Throttled: look again when the back-off ends, not after a backed-off idle poll (up to 1 s,
                # which read a flood at ~8 messages a second and left real hellos and samples behind it).
                timeout = min(timeout, self._rx_backoff_until - now)
            poller.register(wake, zmq.POLLIN)  # stop() wakes the thread at once
            # Rounded up: pyzmq truncates a float timeout to whole ms, so 0.7 ms left would poll with 0 and the
            # thread would spin (a loop turn each) until the drain is due.
            ready = dict(poller.poll(math.ceil(timeout * 1000)))
            if wake.fileno() in ready:
                try:
                    wake.recv(4096)
                except OSError:
                    pass
            if sock is not None and sock in ready:
                self._receive(sock)
            now = time.monotonic()
            if guard is not None:
                if guard.events in ready:
                    guard.drain(now)
                guard.tick(now)
            if self._queue and (stopping or now - last_drain >= BATCH_S):
                last_drain, idle_s = now, IDLE_POLL_S
                self._drain()
            elif idle_turn and not self._queue:
                idle_s = min(2 * idle_s, IDLE_POLL_MAX_S)
            if self._idle is not None:
                self._publish_all(self._idle())
            if sock is not None:
                self._pump(sock)
                if now - last_heartbeat >= HEARTBEAT_S:
                    last_heartbeat = now
                    self._heartbeat(sock, now)
            if self._history_bytes > self._history_bytes_max:
                deadline = time.monotonic() + 0.002  # a few blocks per loop: never a long pause
                while self._history_bytes > self._history_bytes_max and time.monotonic() < deadline:
                    if not self._thin_history():
                        break
            self.stats["cpu_s"] = time.thread_time()  # this thread's CPU time: what monitoring costs
            if stopping and not self._queue:
                if sock is not None:
                    self._pump(sock)
                if not self._clients_behind() or time.monotonic() >= self._stop_deadline:
                    return

    _stop_deadline = 0.0

    def _drain(self) -> None:
        self._busy = True
        try:
            for _ in range(len(self._queue)):
                item = self._queue.popleft()
                try:
                    self._publish_all(self._handler(item))
                except Exception as exc:
                    self.stats["handler_errors"] += 1
                    self._note_error(exc)
        finally:
            self._busy = False

    def _publish_all(self, messages: Iterable[tuple] | None) -> None:
        if not messages:
            return
        for kind, data, rank in messages:
            self.publish(kind, data, rank)

    def _note_error(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if message != self._last_error:  # logged once per distinct error, never raised into training
            self._last_error = message
            log.warning("rlhf-tui publisher: %s", message)
