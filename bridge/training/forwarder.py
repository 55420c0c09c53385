"""A non-main rank's side of the run: its system samples (GPU memory per device) go to the main process.

`Forwarder` keeps the Publisher's queue and thread discipline but owns a DEALER connected to the main process,
with no history and no port of its own; `forward_address` says where that is.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from rlhf_tui.bridge.training.publisher import Publisher
from rlhf_tui.bridge.training.run_token import TOKEN_ENV, TokenSource
from rlhf_tui.bridge.wire import protocol

log = logging.getLogger("rlhf_tui.bridge")

FORWARD_POLL_S = 0.2  # a non-main rank's thread looks for samples this often
NO_TOKEN_WARN_S = 30.0  # a rank that has found no run token this long after its start says so, once


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
    port of its own). A sample that cannot be sent at once (main not up yet, pipe full) or before the run's token
    is found (`run_token.TokenSource`: the main process may not have written it yet) is dropped, counted."""

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
    ):
        super().__init__(address, run_id, handler, queue_size=queue_size, curve=curve, insecure=insecure)
        self.address = forward_address(self.address) if self.address else ""
        self.rank = rank
        self.stats["sent"] = 0
        self.stats["no_token"] = 0
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
        if not self.address:
            return None, None
        refusal = self._refusal("forward to", "forwarding")
        if refusal:
            return self._refuse(refusal)
        import zmq

        ctx = zmq.Context()
        ctx.linger = 0
        sock = ctx.socket(zmq.DEALER)
        try:
            sock.linger = 0
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
                for kind, data, _rank in messages:
                    self._send(sock, kind, data)
        finally:
            self._busy = False

    def _send(self, sock, kind: str, data: dict) -> None:
        if sock is None or kind != protocol.SYSTEM:
            return  # metrics come from the main process only
        import zmq

        token = self._token.get()
        if token is None:
            self.stats["no_token"] += 1
            self._warn_no_token()
            return
        try:
            sock.send(protocol.forward(self.run_id, self.rank, kind, data, time.time(), token), zmq.NOBLOCK)
            self.stats["sent"] += 1
        except zmq.ZMQError:
            self.stats["dropped"] += 1

    def _warn_no_token(self) -> None:
        if self._warned_no_token or time.monotonic() - self._started_at < NO_TOKEN_WARN_S:
            return
        self._warned_no_token = True
        path = self._token.path
        where = self._token.error or (f"none in {path}" if path else "none found")
        log.warning(
            "rlhf-tui: rank %d has no run token (%s): its system samples are not forwarded. On another node, or "
            "with another address than the main process, give every rank the same %s.",
            self.rank,
            where,
            TOKEN_ENV,
        )
