"""Many ranks, one address: under torchrun (gloo, CPU) every rank's system samples and reward batches reach the
monitor through the main process's port and its JSONL log, with their rank (and the samples with an int step);
metrics come from rank 0 only; only rank 0 writes the JSONL log, with publish_all_ranks=True too (warned, ignored).
Before (issue 12, item 3): the Rewards pane saw rank 0's completions only (4 of 8 per batch), rank 1's system
samples were live only with `step: None`, and publish_all_ranks=True made rank 1 bind the same address, raise a
TypeError and write a second, empty JSONL."""

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
    from rlhf_tui.bridge.training.rewards import monitor_rewards

    address, log_dir, steps, go_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    all_ranks = sys.argv[5] == "1"
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ["LOCAL_RANK"])
    args = SimpleNamespace(process_index=rank, local_process_index=local, world_size=world,
                           output_dir=log_dir, logging_steps=1)
    state = TrainerState(is_world_process_zero=rank == 0, is_local_process_zero=local == 0, max_steps=steps)
    cb = RLHFMonitorCallback(address=address, log_dir=log_dir, run_id="ranks-run", analyze_checkpoints=False,
                             publish_all_ranks=all_ranks)

    def length_reward(prompts, completions, **kwargs):
        return [float(len(c)) for c in completions]

    reward = monitor_rewards([length_reward], cb)[0]
    cb.on_train_begin(args, state, None)
    for step in range(1, steps + 1):
        grad = torch.full((4,), float(rank))
        dist.all_reduce(grad)                      # the ranks really train together
        # each rank scores its own 4 completions of the step (GRPO's per-process batch)
        reward(prompts=[f"p{i}" for i in range(4)], completions=[f"rank {rank} step {step} c{i}" + "x" * i
               for i in range(4)], trainer_state=state)
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
@pytest.mark.parametrize(("nproc", "all_ranks"), [(2, False), (3, True)])
def test_every_rank_reaches_the_monitor_through_one_address(tmp_path, nproc, all_ranks):
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
            "1" if all_ranks else "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    try:

        def all_in():
            run = sub.store.current_run
            return (
                run is not None
                and run.rows == steps
                and set(run.system) == set(range(nproc))
                and all(len(run.samples.rows(step)) == 4 * nproc for step in range(steps))
            )

        wait_for(all_in, timeout=120, interval=0.05, message=f"steps, samples and rewards from {nproc} ranks")
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
    # Every rank's 4 completions of every step (the reward wrapper scores at global_step, 0 .. steps-1), each
    # rank's batch its own record with its scores.
    for step in range(steps):
        rows = run.samples.rows(step)
        assert sorted((r["rank"], r["index"]) for r in rows) == [(k, i) for k in range(nproc) for i in range(4)]
        for r in rows:
            assert r["completion"].startswith(f"rank {r['rank']} step {step + 1} c{r['index']}")
            assert r["scores"] == {"length_reward": float(len(r["completion"]))}
    batches = {(b["rank"], b["step"]): b for b in run.rewards}
    assert set(batches) == {(k, step) for k in range(nproc) for step in range(steps)}
    assert all(b["num_scores"] == 4 and b["reward_func"] == "length_reward" for b in batches.values())
    assert sub.store.transport["gaps"] == 0 and sub.store.transport["rejected"] == 0
    logs = sorted(p.name for p in (tmp_path / "logs").glob("*.jsonl"))
    assert logs == ["run-ranks-run.jsonl"]  # one log, written by rank 0 (publish_all_ranks=True too)
    events = [json.loads(line) for line in open(tmp_path / "logs" / logs[0])]
    assert [e["step"] for e in events if e["event"] == "step_end"] == list(range(1, steps + 1))
    system = [e for e in events if e["event"] == "system"]
    for rank in range(nproc):  # every rank's system samples, each with an int step
        mine = [e["step"] for e in system if e["rank"] == rank]
        assert mine and all(type(s) is int and 0 <= s <= steps for s in mine), (rank, mine)
    assert max(e["step"] for e in system if e["rank"] == 1) == steps  # the rank's own step
    logged = {}
    for e in events:
        if e["event"] == "reward_batch":
            for step, size in zip(e.get("steps", [e["step"]]), e.get("sizes", [e["num_scores"]])):
                logged[(e.get("rank"), step)] = logged.get((e.get("rank"), step), 0) + size
    assert logged == {(k, step): 4 for k in range(nproc) for step in range(steps)}
    warned = output.count("publish_all_ranks is ignored")
    assert warned == (nproc if all_ranks else 0), output[-3000:]  # once per process
    assert "TypeError" not in output and "Traceback" not in output, output[-3000:]


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
