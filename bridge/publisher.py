"""The training-side server: a background thread that owns the run's one ZeroMQ socket.

The training thread only calls `put()` (a bounded deque append: never blocks, drops are counted). The thread
turns queued items into envelopes (through a `handler`, see callback.py), keeps them as the run's history,
and serves every connected monitor from that history with non-blocking sends: a monitor that joins late,
falls behind or reconnects simply has an older cursor. See docs/protocol.md.
"""
from __future__ import annotations

import atexit
import bisect
import ipaddress
import logging
import os
import threading
import time
import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from rlhf_tui.bridge import protocol

log = logging.getLogger("rlhf_tui.bridge")

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
ADDRESS_ENV = "RLHF_TUI_ADDRESS"
CLIENT_TIMEOUT_S = 15.0     # a monitor silent this long is forgotten (killed without closing)
HEARTBEAT_S = 1.0
POLL_MS = 5                 # upper bound on the latency the thread adds to a queued item

_active_by_address: dict[str, "Publisher"] = {}
_fork_generation = 0  # bumped in a forked child: publishers made before the fork go quiet there


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)
_registry_lock = threading.Lock()


def resolve_address(address: str | None) -> str:
    return address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS


def is_loopback_address(address: str) -> bool:
    """True for ipc:// and inproc:// and for tcp:// on a loopback host."""
    if address.startswith(("ipc://", "inproc://")):
        return True
    if not address.startswith("tcp://"):
        return False
    host = address[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', interface names and host names may reach other machines


@dataclass
class _Client:
    cursor: int              # next seq this monitor needs
    run: str | None
    last_seen: float
    greeted: bool = False    # got a heartbeat (with thinned_upto) before any history


class Publisher:
    """Queue + thread + socket. `handler(item) -> iterable of (kind, data, rank)` runs on the thread."""

    def __init__(self, address: str | None, run_id: str, handler: Callable[[Any], Iterable[tuple]],
                 *, queue_size: int = 10_000, history_bytes: int = 256 << 20, insecure: bool = False,
                 curve: Any = None, idle: Callable[[], Iterable[tuple]] | None = None):
        self.address = resolve_address(address) if address is not False else ""
        self.run_id = run_id
        self._handler = handler
        self._idle = idle
        self._queue: deque = deque()
        self._queue_size = queue_size
        self._history_bytes_max = history_bytes
        self._insecure = insecure
        self._curve = curve
        self._pid = os.getpid()
        self._generation = _fork_generation
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._frames: list[bytes] = []
        self._seqs: list[int] = []
        self._history_bytes = 0
        self._thinned_upto = -1
        self._next_seq = 0
        self._clients: dict[bytes, _Client] = {}
        self.bound = False
        self.bound_address: str | None = None
        self.stats = {"queued": 0, "dropped": 0, "published": 0, "handler_errors": 0, "rejected": 0,
                      "send_again": 0, "clients": 0}
        self._last_error: str | None = None

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

    # -- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        if self.address:
            with _registry_lock:
                previous = _active_by_address.get(self.address)
                if previous is not None and previous is not self:
                    previous.stop()  # a second trainer in the same process reuses the address
                _active_by_address[self.address] = self
        self._bound_event = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rlhf-tui-publisher", daemon=True)
        self._thread.start()
        self._bound_event.wait(5.0)  # bind result is known before training goes on (bounded)
        atexit.register(self.stop)

    def stop(self, timeout: float = 5.0) -> None:
        """Drain the queue, close the socket. Safe to call twice, from atexit, after fork."""
        if self._thread is None or os.getpid() != self._pid:
            return
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        with _registry_lock:
            if _active_by_address.get(self.address) is self:
                del _active_by_address[self.address]

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait (bounded) until the queue is empty; for tests and train end, never for the hot path."""
        deadline = time.monotonic() + timeout
        while (self._queue or self._busy) and time.monotonic() < deadline:
            time.sleep(0.002)
        return not self._queue

    _busy = False

    # -- background thread ----------------------------------------------------------------------
    def _bind(self):
        if not self.address:
            return None, None
        if not is_loopback_address(self.address) and not self._insecure and self._curve is None:
            warnings.warn(f"rlhf-tui: refusing to publish on non-loopback address {self.address} without "
                          "CURVE keys; pass insecure=True to allow it. Training continues unmonitored.",
                          RuntimeWarning, stacklevel=2)
            return None, None
        try:
            import zmq
        except ImportError:
            warnings.warn("rlhf-tui: pyzmq is not installed; publishing disabled", RuntimeWarning)
            return None, None
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)   # unknown/full peer -> error instead of silent loss
        sock.setsockopt(zmq.SNDHWM, 2000)
        sock.setsockopt(zmq.RCVHWM, 2000)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        if self.address.startswith("tcp://"):
            sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
            sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
        if self._curve is not None:
            self._curve.apply_server(sock)
        try:
            sock.bind(self.address)
            self.bound_address = sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        except zmq.ZMQError as exc:
            warnings.warn(f"rlhf-tui: cannot bind {self.address} ({exc}); publishing disabled, "
                          "training continues", RuntimeWarning, stacklevel=2)
            sock.close(0)
            ctx.term()
            return None, None
        self.bound = True
        return ctx, sock

    def _run(self) -> None:
        try:
            ctx, sock = self._bind()
        except Exception as exc:  # never let a monitoring problem reach training
            self._note_error(exc)
            ctx = sock = None
        self._bound_event.set()
        try:
            self._loop(sock)
        except Exception as exc:
            self._note_error(exc)
        finally:
            if sock is not None:
                sock.close(0)
            if ctx is not None:
                ctx.term()

    def _loop(self, sock) -> None:
        import zmq  # noqa: F401 - present when sock is not None

        poller = None
        if sock is not None:
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
        last_heartbeat = 0.0
        while True:
            stopping = self._stop.is_set()
            if poller is not None:
                if dict(poller.poll(0 if self._queue else POLL_MS)):
                    self._receive(sock)
            elif not self._queue and not stopping:
                self._stop.wait(POLL_MS / 1000)
            self._drain()
            if self._idle is not None:
                self._publish_all(self._idle())
            if sock is not None:
                now = time.monotonic()
                self._pump(sock)
                if now - last_heartbeat >= HEARTBEAT_S:
                    last_heartbeat = now
                    self._heartbeat(sock, now)
            if stopping and not self._queue:
                if sock is not None:
                    self._pump(sock)
                return

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

    def publish(self, kind: str, data: dict, rank: int = 0) -> int:
        """Number, encode and keep a message in history (background thread only)."""
        seq = self._next_seq
        frame = protocol.encode(kind, self.run_id, seq, time.time(), data, rank)
        self._next_seq += 1
        self._frames.append(frame)
        self._seqs.append(seq)
        self._history_bytes += len(frame)
        self.stats["published"] += 1
        if self._history_bytes > self._history_bytes_max:
            self._thin_history()
        return seq

    def _thin_history(self) -> None:
        """Keep every other step/system message of the older half: late joiners still see the whole run."""
        half = len(self._frames) // 2
        keep_f, keep_s = [], []
        for i, (frame, seq) in enumerate(zip(self._frames, self._seqs)):
            thinnable = i < half and (b'"kind":"step"' in frame[:40] or b'"kind":"system"' in frame[:40])
            if thinnable and i % 2:
                self._history_bytes -= len(frame)
                self._thinned_upto = seq
                continue
            keep_f.append(frame)
            keep_s.append(seq)
        self._frames, self._seqs = keep_f, keep_s

    def _receive(self, sock) -> None:
        import zmq

        for _ in range(100):  # bounded per loop so hostile traffic cannot starve publishing
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                self.stats["rejected"] += 1
                return
            if len(parts) != 2:
                self.stats["rejected"] += 1
                continue
            peer, frame = parts
            try:
                envelopes = protocol.decode_frame(frame)
            except protocol.ProtocolError:
                self.stats["rejected"] += 1
                continue
            for env in envelopes:
                self._on_peer_message(peer, env)

    def _on_peer_message(self, peer: bytes, env: dict) -> None:
        now = time.monotonic()
        kind, data = env["kind"], env["data"]
        if kind == protocol.HELLO:
            run = data.get("run") if isinstance(data.get("run"), str) else None
            since = data.get("since")
            since = since if isinstance(since, int) and not isinstance(since, bool) and since >= 0 else 0
            client = self._clients.get(peer)
            if client is None or run != self.run_id or data.get("resync"):
                cursor = since if run == self.run_id else 0
                self._clients[peer] = _Client(cursor=min(cursor, self._next_seq), run=run, last_seen=now)
                self.stats["clients"] = len(self._clients)
            else:
                client.last_seen = now
        elif kind == protocol.FORWARD:
            # Another rank's sample (system memory etc.), re-published under this run's numbering.
            inner = data.get("kind")
            if inner == protocol.SYSTEM and isinstance(data.get("data"), dict):
                self.publish(protocol.SYSTEM, data["data"], env.get("rank", 0))
            else:
                self.stats["rejected"] += 1
        else:
            self.stats["rejected"] += 1

    def _pump(self, sock) -> None:
        """Send each client what it lacks, in batches, until it is caught up or its pipe is full."""
        import zmq

        if not self._clients:
            return
        now = time.monotonic()
        for peer, client in list(self._clients.items()):
            if now - client.last_seen > CLIENT_TIMEOUT_S:
                del self._clients[peer]
                continue
            if not client.greeted:
                client.greeted = self._send_heartbeat(sock, peer)
                if not client.greeted:
                    continue
            for _ in range(64):  # bounded work per client per loop
                if client.cursor >= self._next_seq:
                    break
                start = bisect.bisect_left(self._seqs, client.cursor)
                if start >= len(self._seqs):
                    client.cursor = self._next_seq
                    break
                end, size = start, 0
                while end < len(self._frames) and end - start < protocol.MAX_BATCH and size < protocol.MAX_BATCH_BYTES:
                    size += len(self._frames[end])
                    end += 1
                chunk = self._frames[start:end]
                payload = chunk[0] if len(chunk) == 1 else protocol.encode_batch(chunk)
                try:
                    sock.send_multipart([peer, payload], zmq.NOBLOCK)
                except zmq.Again:
                    self.stats["send_again"] += 1
                    break
                except zmq.ZMQError:  # peer gone (EHOSTUNREACH)
                    self._clients.pop(peer, None)
                    break
                client.cursor = self._seqs[end - 1] + 1
        self.stats["clients"] = len(self._clients)

    def _heartbeat_frame(self) -> bytes:
        data = {"last_seq": self._next_seq - 1, "dropped": self.stats["dropped"],
                "thinned_upto": self._thinned_upto, "queued": len(self._queue), "pid": self._pid,
                "rejected": self.stats["rejected"]}
        return protocol.encode(protocol.HEARTBEAT, self.run_id, self._next_seq - 1, time.time(), data)

    def _send_heartbeat(self, sock, peer: bytes, frame: bytes | None = None) -> bool:
        import zmq

        try:
            sock.send_multipart([peer, frame or self._heartbeat_frame()], zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False
        except zmq.ZMQError:
            self._clients.pop(peer, None)
            return False

    def _heartbeat(self, sock, now: float) -> None:
        frame = self._heartbeat_frame()
        for peer in list(self._clients):
            self._send_heartbeat(sock, peer, frame)

    def _note_error(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if message != self._last_error:  # logged once per distinct error, never raised into training
            self._last_error = message
            log.warning("rlhf-tui publisher: %s", message)
