"""The training side against hostile local peers (issue 16): whatever connects to the run's port, the training
process's file descriptors and memory stay bounded, and real monitors still get every step afterwards."""

from __future__ import annotations

import socket
import time

import pytest
from conftest import wait_for

from rlhf_tui.bridge.monitor.subscriber import Subscriber
from rlhf_tui.bridge.training import connections
from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
from rlhf_tui.bridge.wire import protocol


def _server_side_connections(port: int) -> int:
    """Established TCP connections whose local port is `port` (the publisher's end of each), from /proc."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                count += 1
    return count


def _open(host: str, port: int, n: int) -> list[socket.socket]:
    out = []
    for _ in range(n):
        try:
            out.append(socket.create_connection((host, port), timeout=1))
        except OSError:
            pass  # refused while the endpoint is shed: what a flood gets
    return out


def test_a_flood_of_idle_connections_holds_at_most_the_cap_and_monitors_get_every_step(address, tmp_path, monkeypatch):
    # libzmq had no cap: 1,100 idle connections took the process's last descriptors under `ulimit -n 1024` and
    # training died at its next checkpoint save ("Too many open files").
    pytest.importorskip("zmq")
    if not open("/proc/net/tcp").read():
        pytest.skip("no /proc/net/tcp")
    cap = 16
    monkeypatch.setattr(connections, "MAX_CONNECTIONS", cap)
    host, port = address[len("tcp://") :].rsplit(":", 1)
    cb = RLHFMonitorCallback(address=address, log_dir=str(tmp_path / "logs"), analyze_checkpoints=False)
    early = Subscriber(address).start()  # a monitor watching before the flood
    attackers: list[socket.socket] = []
    try:
        cb.log_step(1, {"loss": 1.0})
        wait_for(lambda: early.store.current_run is not None and early.store.current_run.rows == 1, message="step 1")
        pub = cb._publisher
        held = []
        for wave in range(5):  # five waves of 40: 200 connections in all, 12x the cap
            attackers += _open(host, int(port), 40)
            cb.log_step(2 + wave, {"loss": 1.0 / (2 + wave)})
            time.sleep(0.05)  # the publisher thread reads the accept events between waves
            held.append(_server_side_connections(int(port)))
        assert max(held) <= cap + 40, held  # at most one wave past the cap before it sheds
        wait_for(lambda: pub.stats["shed"] >= 1, message="the connections shed")
        assert len(attackers) < 200 or pub.stats["shed"] >= 2
        for s in attackers:
            s.close()
        cb.log_step(7, {"loss": 0.1})
        # The monitor that was cut off reconnects and resumes; a late one gets the whole run.
        late = Subscriber(address).start()
        try:
            for sub in (early, late):
                wait_for(
                    lambda sub=sub: sub.store.current_run is not None and sub.store.current_run.rows == 7,
                    timeout=20,
                    message="every step after the flood",
                )
                assert sub.store.current_run.steps.tolist() == list(range(1, 8))
        finally:
            late.stop()
        assert _server_side_connections(int(port)) <= 4  # the two monitors (and nothing left of the flood)
    finally:
        for s in attackers:
            s.close()
        early.stop()
        cb.close()


def test_the_cap_leaves_training_most_of_its_descriptor_limit(monkeypatch):
    monkeypatch.setattr(connections.resource, "getrlimit", lambda what: (1024, 4096))
    assert connections.connection_cap(256) == 256
    monkeypatch.setattr(connections.resource, "getrlimit", lambda what: (256, 4096))
    assert connections.connection_cap(256) == 64  # a quarter of a small limit


def test_a_peer_frame_or_backlog_is_small(address):
    # 32 connections pushing ~60 KB frames grew training by 1.8 GB: libzmq kept RCVHWM (1000) frames of up to
    # 64 KiB for each. Now a frame over 16 KiB closes that connection, and at most 32 frames queue per peer.
    import zmq

    from rlhf_tui.bridge.training import publisher as publisher_module

    pub = publisher_module.Publisher(address, "rx-run", handler=lambda item: [item])
    pub.start()
    ctx = zmq.Context()
    big, small = ctx.socket(zmq.DEALER), ctx.socket(zmq.DEALER)
    hello = protocol.encode(protocol.HELLO, "", 0, time.time(), {"run": None, "since": 0})
    try:
        for peer in (big, small):
            peer.linger = 0
            peer.setsockopt(zmq.RECONNECT_IVL, -1)  # a dropped connection stays dropped
            peer.connect(address)
        big.send(b"x" * (60 << 10))  # too big: libzmq drops the connection before allocating it ...
        big.send(hello)  # ... and this hello goes with it
        small.send(hello)
        wait_for(lambda: pub.stats["clients"] >= 1, message="the well-behaved peer served")
        time.sleep(0.3)  # what the other peer would have got by now
        assert pub.stats["clients"] == 1
        assert protocol.MAX_INBOUND_BYTES <= 16 << 10 and connections.INBOUND_FRAMES <= 32
    finally:
        big.close(0)
        small.close(0)
        ctx.term()
        pub.stop()


def test_monitors_that_ask_for_the_same_history_share_its_bytes():
    # 64 monitors that resync to 0 every 0.55 s and never read grew training 477 -> 3,380 MB: each resync
    # re-encoded the unsealed tail, and pyzmq copied every frame under 64 KiB into each monitor's queue.
    from rlhf_tui.bridge.training.history import History

    history = History("share-run")
    for step in range(40):  # a tail of 40 messages (not a sealed block yet)
        history.publish(protocol.STEP, {"step": step, "metrics": {"loss": 1.0 / (step + 1)}})
    first, cursor = history._next_payload(0)
    again, cursor_again = history._next_payload(0)
    assert first is again and cursor == cursor_again == 40  # one encoding, shared by every monitor
    assert len(protocol.decode_frame(first)) == 40


def test_the_run_socket_shares_frames_with_monitor_queues(address, monkeypatch):
    import zmq

    from rlhf_tui.bridge.training import publisher as publisher_module

    sockets = []
    real_bind = publisher_module.Publisher._bind

    def spy_bind(self):
        ctx, sock = real_bind(self)
        sockets.append(sock)
        return ctx, sock

    monkeypatch.setattr(publisher_module.Publisher, "_bind", spy_bind)
    pub = publisher_module.Publisher(address, "zero-copy-run", handler=lambda item: [item])
    pub.start()
    try:
        [sock] = sockets  # each monitor's queue: at most 256 references to the history's own bytes
        assert sock.copy_threshold <= 1024 and sock.getsockopt(zmq.SNDHWM) <= 256
    finally:
        pub.stop()


def _publisher_on_a_fake_clock(monkeypatch, run: str, steps: int):
    """A Publisher (no socket, no thread) whose peer handling reads `clock[0]` as its time, with `steps` steps of
    history: what the peer tests below drive by hand, one loop turn at a time."""
    from rlhf_tui.bridge.training import peers
    from rlhf_tui.bridge.training.publisher import Publisher

    clock = [1000.0]
    monkeypatch.setattr(peers.time, "monotonic", lambda: clock[0])
    pub = Publisher(False, run, handler=lambda item: [item])
    for step in range(steps):
        pub.publish(protocol.STEP, {"step": step, "metrics": {"loss": 1.0}})
    return pub, clock


def test_a_monitor_whose_pipe_stays_full_is_tried_ever_less_often(monkeypatch):
    # 64 monitors that never read were tried every 10 ms loop turn each (the resync and hello floods' cost):
    # a full pipe is now tried again after 10 ms, doubling to 160 ms while it stays full.
    import zmq

    from rlhf_tui.bridge.training import peers

    pub, clock = _publisher_on_a_fake_clock(monkeypatch, "full-pipe-run", 20)

    class FullPipe:
        sends = 0

        def send_multipart(self, parts, flags=0, copy=True):
            FullPipe.sends += 1
            raise zmq.Again()

    pub._clients[b"slow"] = peers._Client(cursor=0, run="full-pipe-run", last_seen=clock[0], greeted=True)
    for _turn in range(200):  # two seconds of 10 ms loop turns
        pub._clients[b"slow"].last_seen = clock[0]  # it keeps saying hello
        pub._pump(FullPipe())
        clock[0] += 0.01
    assert 10 <= FullPipe.sends <= 20  # 10, 20, 40, 80, then every 160 ms (every turn: 200)
    assert pub._next_pump_s(clock[0]) <= peers.PUMP_RETRY_MAX_S
    client = pub._clients[b"slow"]
    client.retry_at, client.retry_s = 0.0, 0.0
    pub._pump(type("Reads", (), {"send_multipart": lambda self, parts, flags=0, copy=True: None})())
    assert client.cursor == pub._next_seq and client.retry_s == 0.0  # a monitor that reads again is caught up


def test_a_flood_of_cheap_frames_is_throttled_like_a_slow_one(monkeypatch):
    # 100 garbage frames read well within the 1 ms budget used to pause reading for only 1 ms, never doubling:
    # a flood of cheap frames was read almost continuously (the hello flood's step time: +66 %).
    pub, clock = _publisher_on_a_fake_clock(monkeypatch, "cheap-flood-run", 0)

    class Flood:
        def recv_multipart(self, flags=0):
            return [b"peer", b"{"]  # never runs dry

    pauses = []
    for _ in range(5):
        pub._receive(Flood())
        pauses.append(round(pub._rx_backoff_until - clock[0], 6))
        clock[0] = pub._rx_backoff_until
    assert pauses == [0.01, 0.02, 0.04, 0.08, 0.16] and pub.stats["rejected"] == 500


def test_a_peer_that_keeps_asking_for_the_whole_history_gets_it_ever_less_often(monkeypatch):
    # Each resync sends the whole history again; 8 peers asking twice a second made training's libzmq thread
    # send ~10 MB/s (+4.5 s of CPU over a 600-step run). The pause doubles while a monitor keeps asking.
    from rlhf_tui.bridge.training import peers

    pub, clock = _publisher_on_a_fake_clock(monkeypatch, "resync-run", 50)
    hello = {"kind": protocol.HELLO, "data": {"run": "other", "since": 0, "resync": True}}
    pub._on_peer_message(None, b"peer", hello)  # its first hello: served from 0
    client = pub._clients[b"peer"]
    resyncs = []
    for _tick in range(1200):  # 60 s of hellos every 50 ms, each asking to start over
        clock[0] += 0.05
        client.cursor = pub._next_seq  # it read everything it was sent
        pub._on_peer_message(None, b"peer", hello)
        if client.cursor == 0:
            resyncs.append(round(clock[0] - 1000.0, 2))
    assert 6 <= len(resyncs) <= 9, resyncs  # 0.5, 1, 2, 4, 8, 16, 30 s apart (was every 0.5 s: 120)
    assert client.resync_s == peers.RESYNC_MAX_S
    clock[0] += 100.0  # quiet for a while, then one resync (a restarted run): honoured, the pause short again
    client.cursor = pub._next_seq
    pub._on_peer_message(None, b"peer", hello)
    assert client.cursor == 0 and client.resync_s == peers.RESYNC_MIN_S
