"""The callback's lifecycle: every run is run_start ... run_end whatever the order of callbacks, trainers, train()
and close() calls in one process, and nothing waits without a bound. Processes that could hang run in a
subprocess with a timeout, so a hang fails the test instead of stalling the suite."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import wait_for

from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
from rlhf_tui.bridge.training.recorder import Recorder
from rlhf_tui.bridge.wire import events, protocol
from rlhf_tui.tui.cli import main


def _events(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _run_script(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script), *args], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"the training process did not finish within {timeout} s (hung); stderr ends: {err[-1500:]}")


def _subscriber(address: str):
    from rlhf_tui.bridge.monitor.subscriber import Subscriber

    return Subscriber(address).start()


# -- values of the recorder and the callback (no training) --------------------------------------------------
def test_step_time_leaves_out_evaluation_and_saving():
    cb = RLHFMonitorCallback(address=False, log_dir=None, analyze_checkpoints=False, detect_anomalies=False)
    recorder = Recorder(cb)

    def step_s(step: int, wall: float) -> float | None:
        out = recorder(events.LoggedStep(step, wall, {"loss": 0.5}))
        row = next(m for m in out if m.kind == protocol.STEP)
        return row.data["metrics"].get("time/step_s")

    assert step_s(1, 100.0) is None
    assert step_s(2, 101.0) == 1.0
    recorder(events.LoggedStep(2, 101.5, {"eval_loss": 0.4}))  # the evaluation's own log, same step
    recorder(events.Evaluated(2, 105.0))  # evaluation ended at 105
    recorder(events.CheckpointSaved(2, "/out/checkpoint-2", 111.0))  # then the save, ended at 111
    assert step_s(3, 112.0) == 1.0  # training only: 10 s of evaluation and saving left out
    assert step_s(5, 114.0) == 1.0
    recorder(events.CheckpointSaved(5, "/out/checkpoint-5", 120.0))
    assert step_s(7, 122.0) == 1.0


def test_reward_batches_get_the_step_trl_logs_them_under():
    cb = RLHFMonitorCallback(address=False, log_dir=None)
    state = SimpleNamespace(global_step=0, logging_steps=1, max_steps=10)
    cb.on_train_begin(SimpleNamespace(output_dir=None, logging_first_step=False, process_index=0), state)
    cb.on_step_begin(None, state)  # generation inside optimizer step 1 (global_step is still 0)
    assert cb.reward_step(state) == 1
    cb.on_step_end(None, SimpleNamespace(global_step=1))
    state.global_step = 1
    assert cb.reward_step(state) == 1  # between steps: an evaluation, logged at the current step
    state.logging_steps = 4  # logged every 4 steps: the batches of steps 2..4 appear in the row of step 4
    cb.on_step_begin(None, state)
    assert cb.reward_step(state) == 4
    state.global_step = 9
    assert cb.reward_step(state) == 10  # never past max_steps (the tail lands in the final entry)
    cb._logging_first_step, state.global_step = True, 0
    assert cb.reward_step(state) == 1  # logging_first_step logs step 1 on its own
    cb.close()


# -- lifecycle in this process (no sockets) ------------------------------------------------------------------
def test_context_manager_ends_the_run_and_a_later_log_step_is_a_new_run(tmp_path):
    with RLHFMonitorCallback(address=False, log_dir=str(tmp_path), analyze_checkpoints=False) as cb:
        for step in (1, 2, 3):
            cb.log_step(step, {"loss": 1.0 / step})
        first_id, first_log = cb.run_id, cb.log_path
    kinds = [e["event"] for e in _events(first_log)]
    assert kinds[0] == "run_start" and kinds[-1] == "run_end" and kinds.count("run_end") == 1
    assert _events(first_log)[-1]["global_step"] == 3  # the last step logged, not None
    cb.close()  # twice: nothing more happens
    assert [e["event"] for e in _events(first_log)].count("run_end") == 1

    cb.log_step(1, {"loss": 0.9})  # after close(): a new run, with its own id and log
    cb.close()
    assert cb.run_id != first_id and cb.log_path != first_log
    second = _events(cb.log_path)
    assert second[0]["event"] == "run_start" and second[0]["run_id"] == cb.run_id
    assert second[-1]["event"] == "run_end" and [e["step"] for e in second if e["event"] == "step_end"] == [1]


def test_a_fixed_run_id_gets_a_suffix_for_each_later_run(tmp_path):
    cb = RLHFMonitorCallback(address=False, log_dir=str(tmp_path), analyze_checkpoints=False, run_id="sweep")
    ids = []
    for _ in range(3):
        cb.log_step(1, {"loss": 1.0})
        ids.append(cb.run_id)
        cb.close()
    assert ids == ["sweep", "sweep-2", "sweep-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-sweep-2.jsonl", "run-sweep-3.jsonl", "run-sweep.jsonl"]


def test_the_run_summary_is_in_the_json_and_text_report(tmp_path, capsys):
    with RLHFMonitorCallback(address=False, log_dir=str(tmp_path), analyze_checkpoints=False) as cb:
        for step in range(1, 6):
            cb.log_step(step, {"loss": 0.5, "reward": 0.1 * step})
        cb.log_step(5, {"train_runtime": 12.5, "train_loss": 0.4321, "train_samples_per_second": 3.2, "epoch": 1.0})
    assert main(["report", cb.log_path, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["summary"] == {
        "train_runtime": 12.5,
        "train_loss": 0.4321,
        "train_samples_per_second": 3.2,
        "epoch": 1.0,
    }
    assert report["steps"] == 5  # the summary entry is not a step
    assert main(["report", cb.log_path]) == 0
    text = capsys.readouterr().out
    assert "Run summary: train_runtime 12.5 · train_loss 0.4321 · train_samples_per_second 3.2" in text


def test_default_log_dir_is_inside_the_trainers_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cb = RLHFMonitorCallback(address=False, analyze_checkpoints=False)
    args = SimpleNamespace(output_dir=str(tmp_path / "out"), process_index=0)
    cb.on_train_begin(args, SimpleNamespace(global_step=0, max_steps=1, is_world_process_zero=True))
    cb.on_log(args, SimpleNamespace(global_step=1), logs={"loss": 1.0})
    cb.on_train_end(args, SimpleNamespace(global_step=1))
    cb.close()
    assert Path(cb.log_path).parent == tmp_path / "out" / "rlhf-tui"
    cb.log_step(1, {"loss": 1.0})  # a custom loop without a trainer: ./logs/rlhf-tui
    cb.close()
    assert Path(cb.log_path).resolve().parent == tmp_path / "logs" / "rlhf-tui"
    explicit = RLHFMonitorCallback(address=False, log_dir=str(tmp_path / "mine"), analyze_checkpoints=False)
    explicit.on_train_begin(args, SimpleNamespace(global_step=0, max_steps=1, is_world_process_zero=True))
    explicit.close()
    assert Path(explicit.log_path).parent == tmp_path / "mine"


# -- processes that must end, with their monitors told so ---------------------------------------------------
MANUAL_LOOP = """
import sys, time
from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
cb = RLHFMonitorCallback(address=sys.argv[1], log_dir=sys.argv[2], analyze_checkpoints=False)
for step in range(1, 6):
    cb.log_step(step, {"loss": 1.0 / step})
deadline = time.monotonic() + 30
while cb.publisher.stats["clients"] < 1 and time.monotonic() < deadline:
    time.sleep(0.05)  # the test's monitor is connected: it must be told the run ended
print(cb.log_path)
# no close(): the exit hook ends the run
"""


def test_a_custom_loop_without_close_ends_its_run_at_exit(address, tmp_path):
    sub = _subscriber(address)
    try:
        proc = _run_script(MANUAL_LOOP, address, str(tmp_path), timeout=60)
        assert proc.returncode == 0, proc.stderr
        wait_for(
            lambda: sub.store.current_run is not None and sub.store.current_run.ended is not None,
            timeout=10,
            message="run_end",
        )
        run = sub.store.current_run
        assert run.ended["global_step"] == 5 and list(run.steps) == [1, 2, 3, 4, 5]
        wait_for(lambda: sub.store.connection == "ended", timeout=10, message="the monitor to say ended")
    finally:
        sub.stop()
    log = _events(proc.stdout.strip())
    assert log[-1]["event"] == "run_end" and log[-1]["global_step"] == 5


TAKEOVERS = """
import sys, warnings
from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
address, logs = sys.argv[1], sys.argv[2]
warnings.simplefilter("always")
def callback(run_id):
    return RLHFMonitorCallback(address=address, log_dir=logs, analyze_checkpoints=False, run_id=run_id)
a = callback("a")
a.log_step(1, {"loss": 1.0})
b = callback("b")             # takes the address over while run a is open: a goes on in its log only
b.log_step(1, {"loss": 2.0})
a.log_step(2, {"loss": 1.0})
a.close()
c = callback("c")             # takes it over from the open run b
c.log_step(1, {"loss": 3.0})
c.close()                     # ended and closed
d = callback("d")             # the address is free again
d.log_step(1, {"loss": 4.0})
b.close()                     # b after d started: d keeps the address
d.log_step(2, {"loss": 4.0})
a.log_step(1, {"loss": 5.0})  # a's next run (a-2) takes it over from d, which never closes
print("bound", d.publisher.bound, a.publisher.bound)
"""


def test_callbacks_on_one_address_take_it_over_in_any_order(address, tmp_path):
    proc = _run_script(TAKEOVERS, address, str(tmp_path), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "bound False True" in proc.stdout
    assert proc.stderr.count("takes " + address + " over from run") == 3  # a, b and d were taken over open
    for name, steps in {"a": [1, 2], "b": [1], "c": [1], "d": [1, 2], "a-2": [1]}.items():
        log = _events(tmp_path / f"run-{name}.jsonl")
        assert log[0]["event"] == "run_start" and log[-1]["event"] == "run_end", name  # every run ended
        assert [e["step"] for e in log if e["event"] == "step_end"] == steps, name


# -- real TRL: several train() calls and trainers in one process ------------------------------------------
TRAININGS = """
import json, os, sys, time
from rlhf_tui.bridge.demo.train import make_grpo_trainer
from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
model, address, work = sys.argv[1], sys.argv[2], sys.argv[3]

def trained(cb, trainer, name):
    deadline = time.monotonic() + 30
    while cb.publisher.stats["clients"] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)  # the test's monitor has joined this run before the next one starts
    cb.wait_for_checkpoints(60)
    with open(os.path.join(work, name + ".json"), "w") as fh:
        json.dump({"run_id": cb.run_id, "log": cb.log_path, "history": trainer.state.log_history}, fh)

first = RLHFMonitorCallback(address=address)  # default log dir: OUTPUT_DIR/rlhf-tui
trainer = make_grpo_trainer(model, os.path.join(work, "out1"), first, steps=4, save_steps=2)
trainer.train()
trained(first, trainer, "run1")
trainer.train()  # the same callback again: a new run
trained(first, trainer, "run2")
second = RLHFMonitorCallback(address=address)  # a second callback on the same address
other = make_grpo_trainer(model, os.path.join(work, "out2"), second, steps=4, save_steps=4)
other.args.logging_steps = 2
other.train()
trained(second, other, "run3")
"""


@pytest.fixture(scope="module")
def three_runs(tiny_model, tmp_path_factory):
    """Two train() calls with one callback, then a second callback and trainer on the same address, in one
    process; a monitor in this process watches the address throughout."""
    from conftest import free_address

    address = free_address()
    work = tmp_path_factory.mktemp("lifecycle")
    sub = _subscriber(address)
    try:
        proc = _run_script(TRAININGS, tiny_model, address, str(work), timeout=180)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs = [json.loads((work / f"run{i}.json").read_text()) for i in (1, 2, 3)]
        wait_for(
            lambda: all((r := sub.store.runs.get(run["run_id"])) is not None and r.ended is not None for run in runs),
            timeout=20,
            message="run_end of the three runs",
        )
        yield SimpleNamespace(store=sub.store, runs=runs, work=work, stderr=proc.stderr)
    finally:
        sub.stop()


@pytest.mark.slow
def test_each_train_call_is_its_own_complete_run(three_runs):
    store, runs = three_runs.store, three_runs.runs
    assert len({r["run_id"] for r in runs}) == 3 and runs[1]["run_id"] != runs[0]["run_id"]
    for info, steps in zip(runs, ([1, 2, 3, 4], [1, 2, 3, 4], [2, 4])):
        run = store.runs[info["run_id"]]
        assert list(run.steps) == steps and run.out_of_order == 0, info["run_id"]
        assert run.meta["run_id"] == info["run_id"] and run.meta["trainer"] == "GRPOTrainer"
        assert run.ended["global_step"] == 4
        assert {"train_runtime", "train_loss"} <= set(run.summary)  # the run summary of each run is kept
        assert sorted({e["step"] for e in info["history"] if "train_runtime" not in e}) == steps
    assert store.current == runs[2]["run_id"]
    assert "Traceback" not in three_runs.stderr


@pytest.mark.slow
def test_reward_batches_carry_the_step_of_their_log_history_row(three_runs):
    for info in three_runs.runs:
        history_steps = [e["step"] for e in info["history"] if "rewards/length_reward/mean" in e]
        batches = [e for e in _events(info["log"]) if e["event"] == "reward_batch"]
        batch_steps = sorted({s for e in batches for s in e.get("steps", [e["step"]])})
        assert batch_steps == history_steps, info["run_id"]  # e.g. [1, 2, 3, 4], or [2, 4] with logging_steps=2


@pytest.mark.slow
def test_report_on_the_output_dir_finds_the_log_and_its_checkpoints(three_runs, capsys):
    run2 = three_runs.runs[1]
    assert Path(run2["log"]).parent == three_runs.work / "out1" / "rlhf-tui"
    assert main(["report", str(three_runs.work / "out1"), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["run"]["run_id"] == run2["run_id"]  # the newest log of that output_dir: the second train()
    assert report["source"] == run2["log"] and report["steps"] == 4
    assert [c["step"] for c in report["checkpoints"]] == [2, 4]
    assert all(c["status"] == "analysed" for c in report["checkpoints"])
    assert report["summary"]["train_loss"] == pytest.approx(run2["history"][-1]["train_loss"])
    assert main(["report", str(three_runs.work / "out2")]) == 0
    assert "Run summary: train_runtime" in capsys.readouterr().out
