"""Real tiny TRL GRPO runs without the rlhf-tui callback, watched live through what they write themselves:
report_to="tensorboard" (its OUTPUT_DIR) and report_to="trackio" (`trackio:PROJECT`), each followed at once by
`rlhf-tui report SOURCE --follow` (a child process) and the monitor app (Pilot), the TensorBoard run also by the
monitor in a real terminal (tmux); then `rlhf-tui report` on each source and on the trackio run's rewritten
trainer_state.json. A reward function that returns NaN from step FAULT on is the injected fault; the training is
held at step 1 and at step HOLD, so what the followers show is checked while the run is live."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import threading

import pytest
from conftest import pilot_wait_for, wait_for

from rlhf_tui.analysis.store import Store
from rlhf_tui.bridge.monitor.followed_source import source_path
from rlhf_tui.tui.app import MonitorApp
from rlhf_tui.tui.cli import main

pytestmark = pytest.mark.slow
STEPS = 16
FAULT = 10  # the reward function returns NaN from this generation on (logged at step FAULT + 1)
HOLD = FAULT + 2  # the training is held in its log of this step until the followers have shown the fault


def grpo_without_callback(model_path: str, output_dir: str, report_to: str, **extra):
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_tui.bridge.demo.tiny import length_reward, prompt_dataset

    def length_then_nan(completions, trainer_state=None, **kw):
        scores = length_reward(completions, **kw)
        return [math.nan] * len(scores) if trainer_state is not None and trainer_state.global_step >= FAULT else scores

    tok = AutoTokenizer.from_pretrained(model_path)
    tok.padding_side = "left"
    args = GRPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        max_steps=STEPS,
        logging_steps=1,
        use_cpu=True,
        bf16=False,
        report_to=report_to,
        learning_rate=1e-3,
        beta=0.04,  # a KL term, so `kl` is logged
        save_strategy="steps",
        save_steps=4,
        disable_dropout=True,
        disable_tqdm=True,
        seed=0,
        log_completions=True,
        num_completions_to_print=0,
        **extra,
    )
    return GRPOTrainer(
        model=model_path,
        reward_funcs=[length_then_nan],
        args=args,
        train_dataset=prompt_dataset(64),
        processing_class=tok,
    )


def _assert_fault_found(report: dict) -> None:
    assert {"reward", "kl", "entropy", "loss", "grad_norm", "learning_rate", "completion_length"} <= set(
        report["metrics"]
    )
    assert not any(name.startswith(("train/", "eval/")) for name in report["metrics"])
    found = [(a["detector"], a["metric"], a["step"]) for a in report["anomalies"]]
    assert ("nonfinite", "reward", FAULT + 1) in found, found


class _Holds:
    """A TrainerCallback (duck-typed) that holds the training in its log of step 1 and of step HOLD until the
    test lets it go: what the followers show is checked while the run is live, with no guess at timing."""

    POINTS = {1: "first", HOLD: "fault"}

    def __init__(self):
        self.reached = {name: threading.Event() for name in self.POINTS.values()}
        self.go = {name: threading.Event() for name in self.POINTS.values()}

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)

    def on_log(self, args, state, control, logs=None, **kwargs):
        point = self.POINTS.get(state.global_step)
        if point is not None and logs and "loss" in logs:  # added after report_to's callback: written by then
            self.reached[point].set()
            self.go[point].wait(120)  # bounded: a failed test's training still ends

    def release(self, point: str | None = None) -> None:
        for name, event in self.go.items():
            if point in (None, name):
                event.set()


class _Training:
    """trainer.train() on a daemon thread; an exception is kept for the test."""

    def __init__(self, trainer):
        self.errors: list[Exception] = []
        self.thread = threading.Thread(target=self._train, args=(trainer,), daemon=True)
        self.thread.start()

    def _train(self, trainer) -> None:
        try:
            trainer.train()
        except Exception as exc:  # surfaced by the test
            self.errors.append(exc)

    def alive(self) -> bool:
        assert not self.errors, self.errors
        return self.thread.is_alive()


class _ReportFollow:
    """`rlhf-tui report SOURCE --follow` as a child process; its stdout and stderr lines gathered by threads."""

    def __init__(self, source: str):
        cmd = [sys.executable, "-m", "rlhf_tui.tui.cli", "report", source, "--follow", "--timeout", "240"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=self._gather, args=(stream, lines), daemon=True).start()

    @staticmethod
    def _gather(stream, lines: list[str]) -> None:
        for line in stream:  # until the child exits
            lines.append(line)

    def following(self, run_prefix: str) -> bool:
        """The child has read the run (its first note: `following run RUN, at step N`)."""
        return any(f"rlhf-tui: following run {run_prefix}" in line for line in list(self.err))

    def alarm(self, step: int, metric: str) -> str | None:
        return next((line for line in list(self.out) if f"step {step}  " in line and f"  {metric}: " in line), None)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def _rows(store: Store) -> int:
    with store.lock:
        run = store.current_run
        return run.rows if run is not None else 0


async def _watch_live(trainer, source: str, run_prefix: str) -> Store:
    """Train with holds at step 1 and at step HOLD; follow SOURCE from the first hold to the run's end with
    `report --follow` (a child process) and the monitor app (Pilot). Both show the fault while the training is
    held at HOLD, and both see the run end. Returns the app's store."""
    holds = _Holds()
    trainer.add_callback(holds)
    training = _Training(trainer)
    child = None
    try:
        wait_for(lambda: holds.reached["first"].is_set() or not training.alive(), timeout=120, message="step 1")
        assert training.alive(), "the training ended before its first hold"
        # trackio writes its database from a thread of its own: it appears while the training is held.
        wait_for(lambda: source_path(source).exists(), timeout=30, message=f"{source} written")
        child = _ReportFollow(source)  # started while torch is idle (a vfork next to busy threads can fail)
        app = MonitorApp([source])
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot_wait_for(pilot, lambda: _rows(app.store) >= 1, timeout=30, message="step 1 in the app")
            await pilot_wait_for(pilot, lambda: child.following(run_prefix), 60, "the CLI following the run")
            seen = [_rows(app.store)]
            holds.release("first")  # from here on, both read the run as it is written
            await pilot_wait_for(pilot, lambda: holds.reached["fault"].is_set() or not training.alive(), 120)
            feed = app.view.pane("anomalies")
            fault = ("nonfinite", "reward", FAULT + 1)
            await pilot_wait_for(
                pilot, lambda: any((a["detector"], a["metric"], a["step"]) == fault for a in feed.anomalies), 30
            )
            await pilot_wait_for(pilot, lambda: child.alarm(FAULT + 1, "reward"), 30, "the alarm line of the CLI")
            assert training.alive() and child.proc.poll() is None  # both while the run is live, held at HOLD
            seen.append(_rows(app.store))
            line = child.alarm(FAULT + 1, "reward")
            assert f"  {run_prefix}" in line and "CRITICAL  nonfinite  reward: reward is NaN/Inf/None" in line
            names = app.view.pane("metrics").names
            assert {"reward", "kl", "entropy", "loss", "grad_norm", "learning_rate"} <= set(names), names
            assert not any(n.startswith(("train/", "eval/")) for n in names), names
            holds.release()
            await pilot_wait_for(pilot, lambda: not training.alive(), 120, "the training's end")
            await pilot_wait_for(pilot, lambda: child.proc.poll() is not None, 60, "the CLI's exit at the run's end")
            await pilot_wait_for(pilot, lambda: app.store.connection == "ended", 30, "the app seeing the end")
            seen.append(_rows(app.store))
            assert FAULT + 1 <= seen[1] <= HOLD and seen[0] < seen[1] < seen[2] == STEPS, seen
            assert app.store.current_run.run_id.startswith(run_prefix)
        assert child.proc.returncode == 0, child.err
        assert any(f"ended at step {STEPS}: " in line for line in child.err), child.err
        return app.store
    finally:
        holds.release()
        training.thread.join(60)
        if child is not None:
            child.close()


async def test_a_tensorboard_run_without_callback_is_followed_live_by_report_and_the_app(
    tiny_model, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("tensorboard")
    # Set, TensorBoardCallback writes there and OUTPUT_DIR holds no event files (a test that leaked it once did).
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "out"
    trainer = grpo_without_callback(tiny_model, str(out), "tensorboard")
    store = await _watch_live(trainer, str(out), "tb:runs/")
    run = store.current_run
    assert run.steps.tolist() == list(range(1, STEPS + 1))
    assert [b["step"] for b in run.rewards][:3] == [1, 2, 3] and run.rewards[0]["samples"]  # completions parquet
    capsys.readouterr()  # what the training printed
    assert main(["report", str(out), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # The event files (their end-of-training summary), not a checkpoint's trainer_state.json, end the run.
    assert report["steps"] == STEPS and report["run"]["run_id"].startswith("tb:runs/") and report["run"]["ended"]
    assert report["summary"].get("train_runtime") is not None
    _assert_fault_found(report)
    assert any(a["detector"] == "reward_invalid" for a in report["rewards"]["anomalies"])  # from the parquet


async def test_a_trackio_run_is_followed_live_and_it_and_its_trainer_state_are_each_a_source(
    tiny_model, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("trackio", reason="trackio is not installed (pip install trackio) in this environment")
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read by trackio when first imported ...
    for name, module in list(sys.modules.items()):  # ... and by its modules imported before this test
        if name.startswith("trackio") and hasattr(module, "TRACKIO_DIR"):
            monkeypatch.setattr(module, "TRACKIO_DIR", tmp_path / "trackio")
    out = tmp_path / "out"
    trainer = grpo_without_callback(
        tiny_model, str(out), "trackio", project="rlhf-tui-test", run_name="run-a", trackio_static_space_id=False
    )
    await _watch_live(trainer, "trackio:rlhf-tui-test", "trackio:rlhf-tui-test/run-a")
    capsys.readouterr()  # what the training printed
    assert main(["report", "trackio:rlhf-tui-test", "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == STEPS and report["run"]["run_id"] == "trackio:rlhf-tui-test/run-a"
    _assert_fault_found(report)
    assert main(["report", str(out), "--format", "json"]) == 0  # no event files: the trainer_state.json
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == STEPS and report["run"]["run_id"] == "file:out"
    _assert_fault_found(report)
    # Followed, the last checkpoint's state (global_step == max_steps: it holds no end-of-training entry) ends it.
    assert main(["report", str(out), "--follow", "--timeout", "30", "--fail-on", "critical"]) == 1
    captured = capsys.readouterr()
    assert f"rlhf-tui: run file:out ended at step {STEPS}: " in captured.err, captured.err
    assert f"step {FAULT + 1}  CRITICAL  nonfinite  reward: " in captured.out, captured.out


def test_a_tensorboard_run_without_callback_in_a_real_terminal(tiny_model, tmp_path, monkeypatch, tmux):
    """The monitor on OUTPUT_DIR in tmux: the steps and the fault's alarm on screen while the training is held
    at HOLD, `run ended` at the end, and q quits."""
    pytest.importorskip("tensorboard")
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "out"
    trainer = grpo_without_callback(tiny_model, str(out), "tensorboard")
    holds = _Holds()
    trainer.add_callback(holds)
    training = _Training(trainer)
    env = f"XDG_CONFIG_HOME={tmp_path / 'xdg'} TERM=xterm-256color"
    try:
        wait_for(lambda: holds.reached["first"].is_set() or not training.alive(), timeout=120, message="step 1")
        tmux.start(f"exec env -u COLUMNS -u LINES {env} {sys.executable} -m rlhf_tui.tui.cli {out}")
        wait_for(lambda: f"step 1/{STEPS}" in tmux.screen(), timeout=60, interval=0.2, message="step 1 on screen")
        holds.release("first")
        wait_for(lambda: holds.reached["fault"].is_set() or not training.alive(), timeout=120, message="the hold")
        alarm = re.compile(rf"^ +{FAULT + 1} +CRIT +reward +reward is NaN/Inf/None", re.M)  # the feed's row
        screen = wait_for(
            lambda: (lambda s: s if alarm.search(s) else "")(tmux.screen()),
            timeout=30,
            interval=0.2,
            message="the fault's alarm on screen",
        )
        assert training.alive() and "● live" in screen and "tb:runs/" in screen, screen
        assert re.search(rf"step ({FAULT + 1}|{HOLD})/{STEPS} ", screen), screen
        for name in ("reward", "kl", "entropy", "loss", "grad_norm", "learning_rate"):  # the metrics pane's rows
            assert re.search(rf"^ (● )?{name} ", screen, re.M), (name, screen)
        assert "train/" not in screen, screen
        holds.release()
        # No tmux call while torch trains: a fork next to busy torch threads can fail (EFAULT).
        wait_for(lambda: not training.alive(), timeout=120, interval=0.05, message="the training's end")
        screen = wait_for(
            lambda: (lambda s: s if "run ended" in s else "")(tmux.screen()), 60, 0.2, "the run's end on screen"
        )
        assert f"step {STEPS}/{STEPS}  ■ run ended" in screen, screen
        tmux.keys("q")
        wait_for(lambda: not tmux.alive(), timeout=10, interval=0.1, message="the app to exit on q")
    finally:
        holds.release()
        training.thread.join(60)
