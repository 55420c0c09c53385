"""A non-main rank's side of the run: its system samples (GPU memory per device) and reward batches go to the
main process, which publishes and logs them with the rank (forwards.py).

`Forwarder` keeps the Publisher's queue and thread discipline but owns a DEALER connected to the main process,
with no history and no port of its own; `forward_address` says where that is.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from rlhf_tui.bridge.training.forwards import MAX_FORWARD_BYTES, fit_reward
from rlhf_tui.bridge.training.publisher import Publisher
from rlhf_tui.bridge.training.run_token import MAX_TOKEN_CHARS, TOKEN_ENV, TokenSource
from rlhf_tui.bridge.wire import protocol

log = logging.getLogger("rlhf_tui.bridge")

FORWARD_POLL_S = 0.2  # a non-main rank's thread looks for samples this often
NO_TOKEN_WARN_S = 30.0  # a rank that has found no run token this long after its start says so, once
RETRY_S = 10.0  # a reward batch the main process cannot take yet (not up, no token yet) is retried this long ...
RETRY_MAX = 32  # ... and at most this many wait (~16 s of one reward function's messages, 2 a second)


def forward_address(address: str) -> str:
    """Where a non-main rank sends its samples: the main process's address. A wildcard bind host means
    "this node": ranks on the main node connect over loopback, ranks on other nodes to MASTER_ADDR."""
    if not address.startswith("tcp://"):
        return address
    host, _, port = address[len("tcp://") :].rpartition(":")
    if host.strip("[]") in ("*", "0.0.0.0", "::"):
        same_node = (
            os.environ.get("RANK", "0") == os.environ.get("LOCAL_RANK", "0") if "LOCAL_RANK" in os.environ else True
        )
        master = os.environ.get("MASTER_ADDR")
        host = "127.0.0.1" if same_node or not master else master
        return f"tcp://{host}:{port}"
    return address


class Forwarder(Publisher):
    """A non-main rank's side: the same queue and thread discipline as Publisher, but the thread owns a
    DEALER connected to the main process and sends each sample as a `forward` envelope (no history, no
    port of its own). A system sample that cannot be sent at once (main not up yet, pipe full) or before the run's
    token is found (`run_token.TokenSource`: the main process may not have written it yet) is dropped, counted; a
    reward batch (cut to one forward's 16 KiB, `forwards.fit_reward`) waits up to RETRY_S in a bounded queue."""

    def __init__(
        self,
        address: str | None,
        run_id: str,
        handler: Callable[[Any], Iterable[tuple]],
        *,
        rank: int,
        queue_size: int = 1000,
        curve: Any = None,
        insecure: bool = False,
        token: TokenSource | None = None,
        idle: Callable[[], Iterable[tuple]] | None = None,
    ):
        super().__init__(address, run_id, handler, queue_size=queue_size, curve=curve, insecure=insecure, idle=idle)
        self.address = forward_address(self.address) if self.address else ""
        self.rank = rank
        self.stats["sent"] = 0
        self.stats["no_token"] = 0
        self.stats["samples_cut"] = 0  # reward samples left out or clipped to fit a forward
        self.stats["batches_cut"] = 0  # reward batches left out of a forward (too many scores for 16 KiB)
        self._retry: deque[tuple[float, dict]] = deque()  # (when queued, reward data) not sent yet
        # Bytes a reward batch's data may take: one forward frame less the envelope around it (with the longest
        # token; a later timestamp may be a few characters longer). The same for every batch of this rank.
        envelope = protocol.forward(run_id, rank, protocol.REWARD, {}, time.time(), "t" * MAX_TOKEN_CHARS)
        self._reward_budget = MAX_FORWARD_BYTES - len(envelope) - 64
        self._token = token if token is not None else TokenSource(self.address, curve)
        self._started_at = time.monotonic()
        self._warned_no_token = False

    def start(self) -> None:
        if self._thread is None:
            self._start_thread("rlhf-tui-forwarder")

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None or os.getpid() != self._pid:
            return
        self._stop.set()
        self._wake()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _bind(self):
        ctx, sock = self._new_socket("DEALER", "forward to", "forwarding")
        if sock is None:
            return None, None
        import zmq

        try:
            sock.setsockopt(zmq.SNDHWM, 100)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # no queueing towards a main process that is not up
            sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_INBOUND_BYTES)
            sock.setsockopt(zmq.RECONNECT_IVL, 200)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
            if protocol.ipv6_address(self.address):
                sock.setsockopt(zmq.IPV6, 1)
            if self._curve is not None:
                client = self._curve.rank_client() if hasattr(self._curve, "rank_client") else self._curve
                client.apply_client(sock)
            sock.connect(self.address)
        except Exception as exc:
            sock.close(0)
            ctx.term()
            return self._refuse(f"cannot forward to {self.address} ({exc})")
        self.bound = True
        self.bound_address = self.address
        return ctx, sock

    def _loop(self, sock) -> None:
        import select

        while True:
            stopping = self._stop.is_set()
            if not stopping:  # samples are at most 1 Hz: look a few times a second (stop() wakes it at once)
                select.select([self._wake_recv], [], [], FORWARD_POLL_S)
                try:
                    self._wake_recv.recv(4096)
                except OSError:
                    pass
            self._drain_to(sock)
            if self._idle is not None:  # the recorder's gathered reward batches, at most every 0.5 s
                self._send_all(sock, self._idle())
            self._send_rewards(sock)
            if stopping and not self._queue:
                return

    def _drain_to(self, sock) -> None:
        self._busy = True
        try:
            for _ in range(len(self._queue)):
                item = self._queue.popleft()
                try:
                    messages = self._handler(item) or []
                except Exception as exc:
                    self.stats["handler_errors"] += 1
                    self._note_error(exc)
                    continue
                self._send_all(sock, messages)
        finally:
            self._busy = False

    def _send_all(self, sock, messages: Iterable[tuple] | None) -> None:
        for kind, data, _rank in messages or []:
            self._send(sock, kind, data)

    def _send(self, sock, kind: str, data: dict) -> None:
        if sock is None:
            return
        if kind == protocol.REWARD:
            fitted, cut, left_out = fit_reward(protocol.to_json_safe(data), self._reward_budget)
            self.stats["samples_cut"] += cut
            self.stats["batches_cut"] += left_out
            if fitted is None:
                self.stats["dropped"] += 1
                return
            if len(self._retry) >= RETRY_MAX:
                self._retry.popleft()
                self.stats["dropped"] += 1
            self._retry.append((time.monotonic(), fitted))
            self._send_rewards(sock)
            return
        if kind != protocol.SYSTEM:
            return  # metrics come from the main process only
        token = self._token.get()
        if token is None:
            self.stats["no_token"] += 1
            self._warn_no_token()
            return
        if not self._try_send(sock, kind, data, token):
            self.stats["dropped"] += 1

    def _try_send(self, sock, kind: str, data: dict, token: str) -> bool:
        """Send one forward; False when it cannot go now (to be retried or dropped by the caller)."""
        import zmq

        frame = protocol.forward(self.run_id, self.rank, kind, data, time.time(), token)
        if len(frame) > MAX_FORWARD_BYTES:  # the main process's socket would drop the connection: done with it
            self.stats["dropped"] += 1
            return True
        try:
            sock.send(frame, zmq.NOBLOCK)
        except zmq.ZMQError:  # the main process is not up (IMMEDIATE) or its pipe is full
            return False
        self.stats["sent"] += 1
        return True

    def _send_rewards(self, sock) -> None:
        """Send the waiting reward batches, oldest first, until one cannot go; those older than RETRY_S are
        dropped (counted)."""
        now = time.monotonic()
        while self._retry and now - self._retry[0][0] > RETRY_S:
            self._retry.popleft()
            self.stats["dropped"] += 1
        if not self._retry or sock is None:
            return
        token = self._token.get()
        if token is None:
            self._warn_no_token()
            return
        while self._retry and self._try_send(sock, protocol.REWARD, self._retry[0][1], token):
            self._retry.popleft()

    def _warn_no_token(self) -> None:
        if self._warned_no_token or time.monotonic() - self._started_at < NO_TOKEN_WARN_S:
            return
        self._warned_no_token = True
        path = self._token.path
        where = self._token.error or (f"none in {path}" if path else "none found")
        log.warning(
            "rlhf-tui: rank %d has no run token (%s): its system samples and reward batches are not forwarded. On "
            "another node, or "
            "with another address than the main process, give every rank the same %s.",
            self.rank,
            where,
            TOKEN_ENV,
        )
