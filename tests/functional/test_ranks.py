"""Many ranks, one address: under torchrun (gloo, CPU) every rank's system sample reaches the monitor through
the main process's port; metrics come from rank 0 only; only rank 0 writes the JSONL log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import free_port, wait_for

from rlhf_tui.bridge.monitor.subscriber import Subscriber
from rlhf_tui.bridge.training.forwarder import forward_address

WORKER = textwrap.dedent("""
    import os, sys, time
    from types import SimpleNamespace
    import torch
    import torch.distributed as dist
    from transformers import TrainerState
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

    address, log_dir, steps, go_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ["LOCAL_RANK"])
    args = SimpleNamespace(process_index=rank, local_process_index=local, world_size=world,
                           output_dir=log_dir, logging_steps=1)
    state = TrainerState(is_world_process_zero=rank == 0, is_local_process_zero=local == 0, max_steps=steps)
    cb = RLHFMonitorCallback(address=address, log_dir=log_dir, run_id="ranks-run", analyze_checkpoints=False)
    cb.on_train_begin(args, state, None)
    for step in range(1, steps + 1):
        grad = torch.full((4,), float(rank))
        dist.all_reduce(grad)                      # the ranks really train together
        state.global_step = step
        # every rank calls on_log (as transformers does); each logs its own values
        cb.on_log(args, state, None, logs={"loss": float(rank), "grad_norm": float(grad[0]), "reward": 1.0})
        time.sleep(0.05)
    cb.on_train_end(args, state, None)
    # Keep serving until the test has seen everything (bounded).
    deadline = time.monotonic() + 60
    while not os.path.exists(go_file) and time.monotonic() < deadline:
        if rank:
            cb.on_log(args, state, None, logs={})  # non-main ranks keep sampling
        time.sleep(0.1)
    dist.barrier()
    cb.close()
    dist.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [3])
def test_every_rank_reaches_the_monitor_through_one_address(tmp_path, nproc):
    steps = 20
    address = f"tcp://127.0.0.1:{free_port()}"
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    go = tmp_path / "go"
    sub = Subscriber(address).start()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(free_port()),
            str(worker),
            address,
            str(tmp_path / "logs"),
            str(steps),
            str(go),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    try:

        def all_in():
            run = sub.store.current_run
            return run is not None and run.rows == steps and set(run.system) == set(range(nproc))

        wait_for(all_in, timeout=120, interval=0.05, message=f"steps from rank 0 and samples from {nproc} ranks")
        go.touch()
        output = proc.communicate(timeout=60)[0]
        assert proc.returncode == 0, output[-3000:]
    finally:
        go.touch()
        proc.kill()
        sub.stop()
    run = sub.store.current_run
    assert run.run_id == "ranks-run" and run.meta["world_size"] == nproc
    np.testing.assert_array_equal(run.steps, np.arange(1, steps + 1))
    assert (run.values("loss") == 0.0).all()  # rank 0's metrics only
    assert (run.values("grad_norm") == sum(range(nproc))).all()
    for rank in range(nproc):
        sample = run.system[rank]
        assert sample["rank"] == rank and sample["rss_mb"] > 0 and isinstance(sample["gpus"], list)
        assert sample["local_rank"] == rank
    assert sub.store.transport["gaps"] == 0 and sub.store.transport["rejected"] == 0
    logs = sorted(p.name for p in (tmp_path / "logs").glob("*.jsonl"))
    assert logs == ["run-ranks-run.jsonl"]  # one log, written by rank 0
    events = [json.loads(line) for line in open(tmp_path / "logs" / logs[0])]
    assert [e["step"] for e in events if e["event"] == "step_end"] == list(range(1, steps + 1))


def test_forward_address_for_other_ranks(monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert forward_address("tcp://127.0.0.1:5555") == "tcp://127.0.0.1:5555"
    assert forward_address("tcp://*:5555") == "tcp://127.0.0.1:5555"
    assert forward_address("ipc:///tmp/run.sock") == "ipc:///tmp/run.sock"
    monkeypatch.setenv("MASTER_ADDR", "node0")
    monkeypatch.setenv("RANK", "9")
    monkeypatch.setenv("LOCAL_RANK", "1")  # another node: forward to the main node
    assert forward_address("tcp://0.0.0.0:5555") == "tcp://node0:5555"
    monkeypatch.setenv("RANK", "1")  # same node as rank 0: loopback
    assert forward_address("tcp://0.0.0.0:5555") == "tcp://127.0.0.1:5555"
