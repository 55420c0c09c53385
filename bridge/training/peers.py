"""The run socket's peers: monitors that say hello (served from their cursor, resynced, refused when full),
other ranks' forwards (handed to forwards.py), and what every monitor is sent: the history it lacks, zero-copy,
and heartbeats. All on the publisher thread; what a peer sends is bounded per loop, never raised.

`Peers` is a part of `Publisher` (publisher.py), which owns the queue, the thread and the socket: it reads the
history (`History`), `stats`, `_forwards`, `_queue`, `_stop`, `_status` and `_pid` from there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rlhf_tui.bridge.training.connections import ZERO_COPY_MIN
from rlhf_tui.bridge.wire import protocol

CLIENT_TIMEOUT_S = 15.0  # a monitor silent this long is forgotten (killed without closing)
MAX_CLIENTS = 64  # monitors served at once; more hellos are refused (counted, answered "full")
FULL_REPLIES_PER_S = 20  # "full" answers sent a second, whatever the number of refused hellos
RX_BUDGET_S = 0.001  # time per loop spent on what peers send; a flood is throttled, never served first
RX_BACKOFF_S = 0.01  # ... and then the socket is not read for this long (doubling while the flood goes on ...)
RX_BACKOFF_MAX_S = 0.25  # ... up to this: a real hello or sample waits at most this long behind a flood
RESYNC_MIN_S = 0.5  # a monitor may move its cursor back at most this often ...
RESYNC_MAX_S = 30.0  # ... doubling up to this while it keeps asking (each resync sends it the whole history again:
# 8 peers asking twice a second cost training's libzmq thread +4.5 s of CPU over a 600-step run)
PUMP_RETRY_S = 0.01  # a monitor whose pipe was full is tried again after this (doubling while it stays full ...)
PUMP_RETRY_MAX_S = 0.16  # ... up to this: 64 monitors that never read cost a few pump turns a second, not 100


@dataclass
class _Client:
    cursor: int  # next seq this monitor needs
    run: str | None
    last_seen: float
    greeted: bool = False  # got a heartbeat (with thinned_upto) before any history
    reset_at: float = 0.0  # last time a hello moved the cursor (resyncs are rate-limited)
    resync_s: float = RESYNC_MIN_S  # the pause before its next resync is honoured
    retry_at: float = 0.0  # its pipe was full: not tried again before this
    retry_s: float = 0.0  # the current retry pause (0 while its sends go through)


class Peers:
    """What the run socket does with its peers (see the module docstring for what it reads of Publisher's)."""

    def _init_peers(self) -> None:
        self._clients: dict[bytes, _Client] = {}
        self._rx_backoff_until = 0.0  # what peers send is not read before this (a flood was throttled)
        self._rx_backoff_s = RX_BACKOFF_S

    def _clients_behind(self) -> bool:
        return any(c.cursor < self._next_seq for c in self._clients.values())

    def _next_pump_s(self, now: float) -> float | None:
        """How long until a monitor that lacks history may be tried again (None: every monitor is caught up)."""
        due = [c.retry_at for c in self._clients.values() if c.cursor < self._next_seq]
        return max(0.0, min(due) - now) if due else None

    def _receive(self, sock) -> None:
        import zmq

        deadline = time.monotonic() + RX_BUDGET_S
        for _ in range(100):  # bounded per loop so hostile traffic cannot starve publishing or training
            if time.monotonic() > deadline:
                self._throttle()
                return
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                self._rx_backoff_s = RX_BACKOFF_S
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
                for env in envelopes:
                    self._on_peer_message(sock, peer, env)
            except protocol.ProtocolError:
                self.stats["rejected"] += 1
            except Exception as exc:  # a message we did not foresee: counted, never raised
                self.stats["rejected"] += 1
                self._note_error(exc)
        else:  # 100 frames and more still queued: a flood of cheap frames is a flood too (it once read on at 1 ms)
            self._throttle()

    def _throttle(self) -> None:
        """A flood: each throttle doubles the pause (up to RX_BACKOFF_MAX_S), so it costs this process at most
        one read turn (RX_BUDGET_S or 100 frames) per pause however long it lasts; the pause is back to
        RX_BACKOFF_S once the socket is drained."""
        self.stats["rx_throttled"] += 1
        self._rx_backoff_until = time.monotonic() + self._rx_backoff_s
        self._rx_backoff_s = min(2 * self._rx_backoff_s, RX_BACKOFF_MAX_S)

    def _say_full(self, sock, peer: bytes, now: float) -> None:
        """Tell a refused monitor why (it would wait forever otherwise): at most FULL_REPLIES_PER_S answers a
        second in all, so a flood of hellos costs no more than that in sends."""
        import zmq

        if now - self._full_window >= 1.0:
            self._full_window, self._full_replies = now, 0
        if self._full_replies >= FULL_REPLIES_PER_S:
            return
        self._full_replies += 1
        frame = protocol.encode(protocol.FULL, self.run_id, 0, time.time(), {"slots": MAX_CLIENTS})
        try:
            sock.send_multipart([peer, frame], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass  # gone or not reading: nothing owed

    _full_window = 0.0
    _full_replies = 0

    def _on_peer_message(self, sock, peer: bytes, env: dict) -> None:
        now = time.monotonic()
        kind, data = env["kind"], env["data"]
        if kind == protocol.HELLO:
            run = data.get("run") if isinstance(data.get("run"), str) else None
            since = data.get("since")
            since = since if type(since) is int and since >= 0 else 0
            client = self._clients.get(peer)
            if client is None:
                if len(self._clients) >= MAX_CLIENTS:
                    self.stats["refused_clients"] += 1
                    self._say_full(sock, peer, now)
                    return
                cursor = since if run == self.run_id else 0
                self._clients[peer] = _Client(cursor=min(cursor, self._next_seq), run=run, last_seen=now, reset_at=now)
                self.stats["clients"] = len(self._clients)
                return
            client.last_seen = now
            if (run != self.run_id or data.get("resync") is True) and now - client.reset_at >= client.resync_s:
                client.cursor = min(since if run == self.run_id else 0, self._next_seq)
                # Asked again soon after the last one: the pause doubles; a monitor that resyncs now and then
                # (a restarted run, a gap) keeps the shortest pause.
                soon = now - client.reset_at < 2 * client.resync_s
                client.resync_s = min(2 * client.resync_s, RESYNC_MAX_S) if soon else RESYNC_MIN_S
                client.run, client.reset_at = run, now
        elif kind == protocol.FORWARD:  # another rank's system sample or reward batch (forwards.py)
            self._publish_all(self._forwards.take(env, now))
        else:
            self.stats["rejected"] += 1

    def _pump(self, sock) -> None:
        """Send each client what it lacks (blocks, then row batches) until it is caught up or its pipe is full."""
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
            if now < client.retry_at:
                continue
            for _ in range(64):  # bounded work per client per loop
                if client.cursor >= self._next_seq:
                    break
                payload, next_cursor = self._next_payload(client.cursor)
                if payload is None:
                    client.cursor = self._next_seq
                    break
                try:
                    self._send_shared(sock, peer, payload)
                except zmq.Again:  # its pipe is full: tried again later, each time later while it stays full
                    self.stats["send_again"] += 1
                    client.retry_s = min(max(2 * client.retry_s, PUMP_RETRY_S), PUMP_RETRY_MAX_S)
                    client.retry_at = now + client.retry_s
                    break
                except zmq.ZMQError:  # peer gone (EHOSTUNREACH)
                    self._clients.pop(peer, None)
                    break
                client.cursor = next_cursor
                client.retry_s = 0.0
        self.stats["clients"] = len(self._clients)

    def _send_shared(self, sock, peer: bytes, payload: bytes) -> None:
        """Zero-copy: every monitor's queue holds a reference to the history's own bytes (shared), not a copy;
        SNDHWM frames per monitor at most, whether it reads or not. At interpreter exit pyzmq's zero-copy helper
        thread is already down (its atexit runs before ours) and refuses: then the frame is copied."""
        import zmq

        if len(payload) >= ZERO_COPY_MIN and not self._stop.is_set():
            try:
                sock.send_multipart([peer, payload], zmq.NOBLOCK, copy=False)
                return
            except RuntimeError:  # "zmq gc socket requested during shutdown"
                pass
        sock.send_multipart([peer, payload], zmq.NOBLOCK)

    def _heartbeat_frame(self) -> bytes:
        data = {
            "last_seq": self._next_seq - 1,
            "dropped": self.stats["dropped"],
            "thinned_upto": self._thinned_upto,
            "queued": len(self._queue),
            "pid": self._pid,
            "rejected": self.stats["rejected"],
            "clients": len(self._clients),
            "cpu_s": round(self.stats["cpu_s"], 3),
            "history_mb": round(self._history_bytes / (1 << 20), 2),
        }
        if self._status is not None:
            try:
                data.update(self._status())
            except Exception as exc:  # never let a monitoring problem reach training
                self._note_error(exc)
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
        if not self._clients:
            return
        frame = self._heartbeat_frame()
        for peer in list(self._clients):
            self._send_heartbeat(sock, peer, frame)
