"""The run's listening socket kept within bounds whatever connects to it.

libzmq accepts every TCP connection it is offered and has no cap of its own: 1,100 idle connections under the
common `ulimit -n 1024` took the training process's last file descriptors, and TRL's next checkpoint save died
with "Too many open files". `ConnectionGuard` counts the open connections from the socket's monitor events
(ZMQ_EVENT_ACCEPTED / ZMQ_EVENT_DISCONNECTED) and, at the cap (or past MAX_ACCEPTS_PER_S), sheds them all: it unbinds the endpoint (which
closes every connection accepted on it) and binds it again SHED_S later. Real monitors reconnect by themselves
(within a second) and resume from their cursor; a flood only ever holds `cap` descriptors, never training's.
An attack that comes straight back is shed for longer each time (1 s doubling to 8 s), so a reconnect churn
costs a few handshakes every few seconds.
Connections that never finish the ZMTP handshake are closed by libzmq after HANDSHAKE_MS.
"""

from __future__ import annotations

try:
    import resource
except ImportError:  # not POSIX: no descriptor limit to read
    resource = None  # type: ignore[assignment]

MAX_CONNECTIONS = 256  # open connections at most, monitors and strangers together ...
FD_SHARE = 4  # ... and at most a quarter of the process's file-descriptor limit: the rest is training's
MAX_ACCEPTS_PER_S = 100  # more new connections than this in a second (a reconnect churn) also sheds
SHED_S = 1.0  # after shedding, the endpoint is bound again this much later ...
SHED_MAX_S = 8.0  # ... doubling, up to this, while each rebind is shed again within SHED_STREAK_S
SHED_STREAK_S = 5.0
HANDSHAKE_MS = 5000  # a connection that has not finished its handshake by then is closed (libzmq: 30 s)
EVENTS_PER_DRAIN = 4096  # monitor events read per loop turn (bounded work)
INBOUND_FRAMES = 32  # frames libzmq queues per connection towards this process
OUTBOUND_FRAMES = 256  # ... and towards each monitor (a pump that finds the pipe full tries at its next turn)
ZERO_COPY_MIN = 1024  # frames this big or bigger are shared with monitors' queues, smaller ones copied


def bound_router(sock, address: str) -> None:
    """The run's ROUTER options that bound what a peer can make this process hold or do: peers only send
    hellos and forwarded samples of a few hundred bytes, so RCVHWM frames of at most MAX_INBOUND_BYTES (was
    1000 x 64 KiB = 64 MiB a connection); SNDHWM frames towards each monitor, shared zero-copy from the history
    (pyzmq copies frames under its copy_threshold, 64 KiB by default, even with copy=False); the handshake
    timeout; TCP keep-alive; IPv6 for an IPv6 literal."""
    import zmq

    from rlhf_tui.bridge.wire import protocol

    sock.setsockopt(zmq.SNDHWM, OUTBOUND_FRAMES)
    sock.copy_threshold = ZERO_COPY_MIN
    sock.setsockopt(zmq.RCVHWM, INBOUND_FRAMES)
    sock.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_INBOUND_BYTES)
    sock.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_MS)
    if address.startswith("tcp://"):
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 30)
    if protocol.ipv6_address(address):
        sock.setsockopt(zmq.IPV6, 1)


def connection_cap(limit: int = MAX_CONNECTIONS) -> int:
    """The most connections the run's socket may hold: `limit`, and no more than 1/FD_SHARE of the soft
    RLIMIT_NOFILE (training keeps the rest for its data loaders, checkpoints and logs)."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE) if resource is not None else (1024, 1024)
    except (ValueError, OSError):
        soft = 1024
    if resource is not None and soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 20
    return max(8, min(limit, soft // FD_SHARE))


class ConnectionGuard:
    """Counts a bound socket's open connections and sheds them all at the cap (see the module docstring).
    Runs on the publisher thread: `events` goes into its poller, `drain()` when it is readable, `tick()` every
    turn. `stats` (the publisher's counters) gets `connections`, `shed` and `rebind_failed`."""

    def __init__(self, sock, address: str, stats: dict, cap: int | None = None):
        import zmq

        self.sock = sock
        self.address = address  # the endpoint as bound (LAST_ENDPOINT: the real port)
        self.stats = stats
        self.cap = cap if cap is not None else connection_cap(MAX_CONNECTIONS)
        self.open: set[int] = set()
        self.unbound_until: float | None = None
        self.window, self.accepts = 0.0, 0  # connections accepted in the current second
        self.rebound_at: float | None = None
        self.pause = SHED_S  # the next shedding pause (longer while an attack keeps coming back)
        self.events = sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        for key in ("connections", "shed", "rebind_failed"):
            stats.setdefault(key, 0)

    def drain(self, now: float) -> None:
        """Read the monitor's events (bounded) and shed when the open connections reach the cap."""
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        for _ in range(EVENTS_PER_DRAIN):
            try:
                event = recv_monitor_message(self.events, zmq.NOBLOCK)
            except zmq.Again:
                break
            except (zmq.ZMQError, ValueError, KeyError):
                continue  # a malformed event (never seen): skipped
            if event.get("event") == zmq.EVENT_ACCEPTED:
                self.open.add(event.get("value"))
                if now - self.window >= 1.0:
                    self.window, self.accepts = now, 0
                self.accepts += 1
            elif event.get("event") == zmq.EVENT_DISCONNECTED:
                self.open.discard(event.get("value"))
            # Too many open, or too many opened this second: peers that connect, get dropped (an oversized
            # frame) and reconnect at once cost libzmq's I/O thread a handshake each, in training's process.
            if (len(self.open) >= self.cap or self.accepts > MAX_ACCEPTS_PER_S) and self.unbound_until is None:
                self.shed(now)
        self.stats["connections"] = len(self.open)

    def shed(self, now: float) -> None:
        """Close every connection (unbind) and stop accepting until SHED_S from now."""
        import zmq

        try:
            self.sock.unbind(self.address)
        except zmq.ZMQError:
            return
        self.open.clear()  # unbinding closes every connection accepted on the endpoint
        self.accepts = 0
        again = self.rebound_at is not None and now - self.rebound_at < SHED_STREAK_S
        self.pause = min(2 * self.pause, SHED_MAX_S) if again else SHED_S
        self.unbound_until = now + self.pause
        self.stats["shed"] += 1
        self.stats["connections"] = 0

    def tick(self, now: float) -> None:
        """Bind again once the shedding pause is over (retried every SHED_S while the port is taken)."""
        import zmq

        if self.unbound_until is None or now < self.unbound_until:
            return
        try:
            self.sock.bind(self.address)
            self.unbound_until, self.rebound_at = None, now
        except zmq.ZMQError:
            self.unbound_until = now + SHED_S
            self.stats["rebind_failed"] += 1

    def wait_s(self, now: float) -> float | None:
        """How long the publisher may sleep before `tick()` is due (None: nothing due)."""
        return None if self.unbound_until is None else max(0.0, self.unbound_until - now)

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except Exception:
            pass
        self.events.close(0)
