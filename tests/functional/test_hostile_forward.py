"""Forwarded samples from strangers (issue 16, item 1): any local process can connect to the run's port and
send well-formed `forward` envelopes. Before, ~1,500 fake system samples took the history from 0.35 to 76 MB
and a late joiner saw 1,024 fake GPUs. Now the main process takes a forward only with the run token and only
for a rank of this job (1 .. world_size-1, 10 a second, 16 devices), while a real non-main rank's `Forwarder`
with the token still gets its samples through."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import zmq
from conftest import free_address, wait_for

from rlhf_tui.bridge.monitor.subscriber import Subscriber
from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
from rlhf_tui.bridge.wire import protocol

FAKE_RANKS = range(1, 1025)
STEPS = 40


@pytest.fixture
def token_home(tmp_path, monkeypatch):
    """The run token folder's parent, private to this test (never the machine's own runtime folder)."""
    home = tmp_path / "runtime"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(home))
    monkeypatch.delenv("RLHF_TUI_RUN_TOKEN", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    return home


def _fake_sample(rank: int) -> dict:
    gpus = [{"index": i, "name": "FAKE GPU", "util": 99.0, "used_mb": 1.0, "total_mb": 2.0} for i in range(64)]
    return {"rss_mb": 1.0, "gpus": gpus, "gpu_available": True, "rank": rank, "hostname": "fake"}


def _forward_frame(rank: int, data: dict, token=None) -> bytes:
    """A well-formed forward envelope as any process could write it (no helper of ours needed)."""
    body = {"kind": "system", "data": data}
    if token is not None:
        body["token"] = token
    return protocol.encode(protocol.FORWARD, "stranger", -1, 0.0, body, rank)


def _rank_callback(address: str, tmp_path, rank: int, world: int, run_id: str):
    args = SimpleNamespace(
        process_index=rank,
        local_process_index=rank,
        world_size=world,
        output_dir=str(tmp_path / f"out{rank}"),
        logging_steps=1,
    )
    state = SimpleNamespace(is_world_process_zero=rank == 0, global_step=0, max_steps=STEPS, logging_steps=1)
    cb = RLHFMonitorCallback(address=address, log_dir=str(tmp_path / "logs"), run_id=run_id, analyze_checkpoints=False)
    cb.on_train_begin(args, state, None)
    return cb, args, state


@pytest.mark.parametrize("shared", ["file", "env"])
def test_a_strangers_forwards_never_reach_the_history_and_a_real_rank_still_does(
    tmp_path, token_home, monkeypatch, shared
):
    from rlhf_tui.bridge.training import peers as peers_module
    from rlhf_tui.bridge.training import publisher as publisher_module

    # The publisher's thread reads peers for 1 ms a turn and pauses longer while a flood goes on (up to 250 ms):
    # a flood is read as a trickle (the ROUTER fair-queues, so real peers are not behind it). Turning every 5 ms
    # lets the test see all 3 072 fakes handled in seconds, not minutes.
    monkeypatch.setattr(publisher_module, "IDLE_POLL_S", 0.005)
    monkeypatch.setattr(publisher_module, "IDLE_POLL_MAX_S", 0.005)
    monkeypatch.setattr(peers_module, "RX_BACKOFF_MAX_S", peers_module.RX_BACKOFF_S)
    if shared == "env":
        monkeypatch.setenv("RLHF_TUI_RUN_TOKEN", "launcher-given-token-0123456789")
    address = free_address()
    main_cb, main_args, main_state = _rank_callback(address, tmp_path, 0, 2, "real-run")
    pub = main_cb.publisher
    rank_cb, rank_args, rank_state = _rank_callback(address, tmp_path, 1, 2, "rank1-run")
    ctx = zmq.Context()
    stranger = ctx.socket(zmq.DEALER)
    stranger.linger = 0
    stranger.connect(address)
    sub = None
    try:
        for step in range(1, STEPS + 1):
            main_state.global_step = step
            main_cb.on_log(main_args, main_state, None, logs={"loss": 1.0 / step, "reward": 0.5})
        sent = 0
        for rank in FAKE_RANKS:  # no token, a wrong one, one of the wrong type
            for token in (None, "0" * 32, 12345):
                stranger.send(_forward_frame(rank, _fake_sample(rank), token))
                sent += 1
        wait_for(
            lambda: pub.stats["rejected"] + pub.stats["forwarded"] >= sent,
            timeout=60,
            interval=0.05,
            message="every fake handled",
        )

        def rank_1_through():
            rank_cb.on_log(rank_args, rank_state, None, logs={})  # a cue to sample (at most 1 Hz)
            return pub.stats["forwarded"] >= 1

        wait_for(rank_1_through, timeout=20, interval=0.1, message="the real rank's sample")
        # A late joiner: every real step, the real ranks only, no fake device.
        sub = Subscriber(address).start()

        def caught_up():
            run = sub.store.current_run
            return run is not None and run.rows == STEPS and 1 in run.system

        wait_for(caught_up, timeout=20, interval=0.05, message="the late joiner caught up")
        run = sub.store.current_run
        assert run.run_id == "real-run"
        np.testing.assert_array_equal(run.steps, np.arange(1, STEPS + 1))
        assert set(run.system) == {0, 1}
        assert run.system[1]["rank"] == 1 and run.system[1]["rss_mb"] > 0
        names = [g.get("name") for sample in run.system.values() for g in sample.get("gpus") or []]
        assert "FAKE GPU" not in names
        assert pub.stats["forwarded"] < 40  # the real rank's samples only (the fakes were 3 072)
        assert pub._history_bytes < 1 << 20
        token_files = list((token_home / "rlhf-tui").glob("*.token")) if shared == "file" else []
        if shared == "file":  # written for the ranks on this node, private
            assert len(token_files) == 1 and token_files[0].stat().st_mode & 0o777 == 0o600
            assert (token_home / "rlhf-tui").stat().st_mode & 0o777 == 0o700
            token = token_files[0].read_text().strip()
        else:  # the launcher gave it: no file
            assert not (token_home / "rlhf-tui").exists()
            token = os.environ["RLHF_TUI_RUN_TOKEN"]
        assert token not in repr(run.system) and token not in (tmp_path / "logs" / "run-real-run.jsonl").read_text()
    finally:
        stranger.close(0)
        ctx.term()
        if sub is not None:
            sub.stop()
        rank_cb.close()
        main_cb.close()
    assert not list(token_home.glob("rlhf-tui/*.token"))  # removed at the run's end


def _publisher(address, **kw):
    from rlhf_tui.bridge.training.publisher import Publisher

    pub = Publisher(address, "bounded-run", handler=lambda item: [item], **kw)
    pub.start()
    return pub


@pytest.mark.parametrize(("world_size", "allowed"), [(4, {1, 3}), (None, {1, 3, 4, 63})])
def test_forwards_are_bounded_to_the_jobs_ranks_and_16_devices(address, world_size, allowed):
    pub = _publisher(address, forward_token="t0k3n", world_size=world_size)
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)
    peer.linger = 0
    peer.connect(address)
    sub = Subscriber(address).start()
    try:
        ranks = [1, 3, 4, 63, 64, 1024, 0]
        for rank in ranks:
            peer.send(_forward_frame(rank, {"rss_mb": float(rank), "gpus": _fake_sample(rank)["gpus"]}, "t0k3n"))
        peer.send(_forward_frame(2, {"rss_mb": 2.0}, "t0k3n-but-longer"))  # a token with the right prefix
        wait_for(lambda: pub.stats["forwarded"] + pub.stats["rejected"] >= len(ranks) + 1, message="all handled")
        assert pub.stats["forwarded"] == len(allowed)
        wait_for(lambda: sub.store.current_run is not None and set(sub.store.current_run.system) == allowed)
        for rank in allowed:
            assert len(sub.store.current_run.system[rank]["gpus"]) == 16
    finally:
        peer.close(0)
        ctx.term()
        sub.stop()
        pub.stop()


def test_a_single_process_job_takes_no_forward_and_writes_no_token(tmp_path, token_home):
    address = free_address()
    cb, args, state = _rank_callback(address, tmp_path, 0, 1, "single-run")
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)
    peer.linger = 0
    peer.connect(address)
    try:
        peer.send(_forward_frame(1, {"rss_mb": 1.0}, ""))
        peer.send(_forward_frame(1, {"rss_mb": 1.0}))
        wait_for(lambda: cb.publisher.stats["rejected"] >= 2, message="refused")
        assert cb.publisher.stats["forwarded"] == 0
        assert not (token_home / "rlhf-tui").exists()
    finally:
        peer.close(0)
        ctx.term()
        cb.close()


def test_a_rank_without_a_token_drops_its_samples_and_says_so_once(tmp_path, token_home, monkeypatch, caplog):
    from rlhf_tui.bridge.training import forwarder as forwarder_module
    from rlhf_tui.bridge.training.forwarder import Forwarder

    monkeypatch.setattr(forwarder_module, "NO_TOKEN_WARN_S", 0.0)
    fwd = Forwarder(free_address(), "lonely", lambda item: [("system", {"rss_mb": 1.0}, 2)], rank=2)
    fwd.start()
    try:
        with caplog.at_level(logging.WARNING, logger="rlhf_tui.bridge"):
            for _ in range(3):
                fwd.put(("cue",))
            wait_for(lambda: fwd.stats["no_token"] >= 3, message="samples without a token dropped")
        assert fwd.stats["sent"] == 0
        warned = [r.getMessage() for r in caplog.records if "no run token" in r.getMessage()]
        assert len(warned) == 1 and "rank 2" in warned[0] and "RLHF_TUI_RUN_TOKEN" in warned[0]
    finally:
        fwd.stop()


def test_a_bad_launcher_token_disables_forwarding_with_one_warning(tmp_path, token_home, monkeypatch):
    monkeypatch.setenv("RLHF_TUI_RUN_TOKEN", "has spaces in it")
    with pytest.warns(RuntimeWarning, match="RLHF_TUI_RUN_TOKEN must be"):
        cb, _, _ = _rank_callback(free_address(), tmp_path, 0, 2, "bad-token-run")
    try:
        assert cb.publisher is not None and cb.publisher._forward_token is None  # the run is still published
    finally:
        cb.close()


def _reward_frame(rank: int, token=None, data: dict | None = None) -> bytes:
    """A well-formed reward forward as any process could write it; its data claims rank 0."""
    fake = {"label": "best", "index": 0, "score": 9.0, "completion": "FAKE COMPLETION", "step": 3}
    body: dict = {
        "kind": "reward",
        "data": data or {"step": 3, "reward_func": "evil", "scores": [9.0] * 4, "samples": [fake], "rank": 0},
    }
    if token is not None:
        body["token"] = token
    return protocol.encode(protocol.FORWARD, "stranger", -1, 0.0, body, rank)


def test_a_strangers_reward_forwards_never_reach_the_history(address):
    import time

    from rlhf_tui.bridge.training import forwards

    pub = _publisher(address, forward_token="t0k3n", world_size=2)
    ctx = zmq.Context()
    peer = ctx.socket(zmq.DEALER)
    peer.linger = 0
    peer.connect(address)
    sub = Subscriber(address).start()
    try:
        refused = [_reward_frame(1, token) for token in (None, "wrong", 12345, "t0k3n-but-longer")]
        refused += [_reward_frame(rank, "t0k3n") for rank in (0, 2, 5, 1023)]  # not a rank of this job
        refused += [
            _reward_frame(1, "t0k3n", bad)  # the token, but not a reward batch
            for bad in (
                {"step": 3, "scores": [1.0]},
                {"step": -1, "reward_func": "r", "scores": []},
                {"step": 3, "reward_func": "r", "scores": "1.0"},
                {"step": 3, "reward_func": "r", "scores": [{}]},
            )
        ]
        for frame in refused:
            peer.send(frame)
        wait_for(lambda: pub.stats["rejected"] >= len(refused), message="every stranger's forward refused")
        assert pub.stats["forwarded"] == 0
        real = {
            "step": 4,
            "reward_func": "real",
            "scores": [0.5, 1.0],
            "rank": 0,  # a claim the main process does not take: the envelope's checked rank is what counts
            "analysis": {"injected": True},
            "samples": [{"label": "best", "index": 1, "score": 1.0, "completion": "ok", "step": 4, "evil": "x" * 99}],
        }
        peer.send(_reward_frame(1, "t0k3n", real))
        wait_for(lambda: sub.store.current_run is not None and len(sub.store.current_run.rewards) == 1)
        (batch,) = sub.store.current_run.rewards
        assert batch["rank"] == 1 and batch["reward_func"] == "real" and batch["scores"] == [0.5, 1.0]
        assert "analysis" not in batch and "evil" not in repr(sub.store.current_run.samples.rows(4))
        assert "FAKE" not in repr(list(sub.store.current_run.rewards))
        # A rank with the token is bounded too: a burst of 100 gets REWARD_BURST through, then REWARD_RATE a second.
        before, start = pub.stats["forwarded_rewards"], time.monotonic()
        for _ in range(100):
            peer.send(_reward_frame(1, "t0k3n", real))
        wait_for(lambda: pub.stats["forwarded_rewards"] + pub.stats["rejected"] >= before + len(refused) + 100)
        taken = pub.stats["forwarded_rewards"] - before
        assert (
            forwards.REWARD_BURST - 2
            <= taken
            <= forwards.REWARD_BURST + forwards.REWARD_RATE * (time.monotonic() - start)
        ), taken
    finally:
        peer.close(0)
        ctx.term()
        sub.stop()
        pub.stop()


def test_a_ranks_reward_batch_waits_for_the_main_process_and_fits_one_forward(tmp_path, token_home, monkeypatch):
    """A rank that starts first keeps its reward batch (retry queue) until the main process is up, and a batch too
    big for one forward (16 KiB) arrives cut: the newest step's samples first, the cut counted."""
    from rlhf_tui.bridge.training.forwarder import Forwarder
    from rlhf_tui.bridge.training.forwards import MAX_FORWARD_BYTES

    monkeypatch.setenv("RLHF_TUI_RUN_TOKEN", "launcher-given-token-0123456789")
    address = free_address()
    steps = list(range(1, 9))
    samples = [
        {
            "label": "all",
            "index": i,
            "score": float(i),
            "prompt": "p" * 500,
            "completion": f"s{step} " + "y" * 1500,
            "step": step,
        }
        for step in steps
        for i in range(4)
    ]
    data = {
        "step": 8,
        "reward_func": "long",
        "steps": steps,
        "sizes": [4] * 8,
        "scores": [1.0] * 32,
        "num_scores": 32,
        "num_invalid": 0,
        "samples": samples,
    }
    assert len(protocol.dumps(data)) > 4 * MAX_FORWARD_BYTES
    fwd = Forwarder(address, "real-run", lambda item: [item], rank=1)
    fwd.start()
    pub = sub = None
    try:
        fwd.put(("reward", data, 1))
        wait_for(lambda: len(fwd._retry) == 1, message="the batch waits for the main process")
        pub = _publisher(address, forward_token="launcher-given-token-0123456789", world_size=2)
        sub = Subscriber(address).start()
        wait_for(lambda: sub.store.current_run is not None and len(sub.store.current_run.rewards) == 8, timeout=20)
        assert fwd.stats["sent"] == 1 and not fwd._retry
        run = sub.store.current_run
        assert [(b["rank"], b["step"]) for b in run.rewards] == [(1, s) for s in steps]  # each batch its own record
        newest = run.samples.rows(8)
        assert [r["index"] for r in newest] == [0, 1, 2, 3] and all(r["rank"] == 1 for r in newest)
        kept = sum(len(run.samples.rows(s)) for s in steps)
        # left out, and at most one clipped to the room that was left
        assert 4 <= kept < 32 and 32 - kept <= fwd.stats["samples_cut"] <= 33 - kept, (kept, fwd.stats)
    finally:
        fwd.stop()
        if sub is not None:
            sub.stop()
        if pub is not None:
            pub.stop()
