"""Durability of the JSONL log: flushed per event; after kill -9 of a real training every complete line parses,
and `rlhf-tui report` still works on a log whose last line was cut off."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import free_address, wait_for

from rlhf_tui.bridge.training.jsonl_log import JsonlLog


def test_every_event_is_on_disk_as_soon_as_it_is_written(tmp_path):
    log = JsonlLog(tmp_path, "r1")
    for step in range(1, 4):
        log.write({"event": "step_end", "step": step, "ppo_metrics": {"loss": float("nan")}})
        with open(log.path, "rb") as other:  # another reader sees the line at once (no buffering left)
            lines = other.read().splitlines()
        assert len(lines) == step and json.loads(lines[-1])["ppo_metrics"]["loss"] == "NaN"
    log.close()


def _step_lines(path) -> tuple[list[dict], bytes]:
    data = open(path, "rb").read()
    complete, _, tail = data.rpartition(b"\n")
    events = [json.loads(line) for line in complete.split(b"\n") if line]  # every complete line parses
    return events, tail


@pytest.mark.slow
def test_kill_9_mid_run_leaves_a_parseable_log_and_report_works(tiny_model, tmp_path, capsys):
    from rlhf_tui.tui.cli import main

    log_dir = tmp_path / "logs"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rlhf_tui.bridge.demo.train",
            "--address",
            free_address(),
            "--steps",
            "400",
            "--output-dir",
            str(tmp_path / "out"),
            "--log-dir",
            str(log_dir),
            "--model",
            tiny_model,
            "--run-id",
            "killed",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    path = log_dir / "run-killed.jsonl"
    try:
        wait_for(
            lambda: path.exists() and path.read_bytes().count(b'"step_end"') >= 12,
            timeout=120,
            interval=0.05,
            message="training under way",
        )
        os.kill(proc.pid, signal.SIGKILL)  # no atexit, no flush, no run_end
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        proc.kill()
    events, tail = _step_lines(path)
    steps = [e["step"] for e in events if e["event"] == "step_end"]
    assert len(steps) >= 12 and steps == list(range(1, len(steps) + 1))  # flushed per event: none missing
    assert events[0]["event"] == "run_start" and not any(e["event"] == "run_end" for e in events)
    # Cut the last line in half, as a kill in the middle of a write would.
    with open(path, "ab") as fh:
        fh.write(
            tail
            + b'{"event":"step_end","step":%d,"timestamp":"2026-01-01T00:00:00","ppo_metrics":{"lo' % (len(steps) + 1)
        )
    assert main(["report", str(path), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == len(steps) and report["last_step"] == steps[-1]
    assert report["transport"]["rejected"] == 0  # a cut-off last line is expected, not an error
    assert "loss" in report["metrics"]


def test_the_log_and_the_folder_made_for_it_are_private(tmp_path):
    # The log holds prompts and completions; it was created world-readable (0644) in a 0755 folder.
    old_umask = os.umask(0o022)
    try:
        log = JsonlLog(tmp_path / "made" / "rlhf-tui", "r1")
        log.write({"event": "step_end", "step": 1})
        log.close()
        shared = JsonlLog(tmp_path / "shared", "r2", mode=0o640)  # configured otherwise
        shared.write({"event": "step_end", "step": 1})
        shared.close()
    finally:
        os.umask(old_umask)
    assert os.stat(log.path).st_mode & 0o777 == 0o600
    assert os.stat(log.path.parent).st_mode & 0o777 == 0o700
    assert os.stat(shared.path).st_mode & 0o777 == 0o640 and os.stat(shared.path.parent).st_mode & 0o777 == 0o750
    assert log.errors == 0


def test_a_log_that_cannot_be_written_is_warned_once_and_shown_by_the_monitor(tmp_path):
    # JsonlLog.errors was counted and never read: a log_dir under a file (or a full disk) failed silently.
    from rlhf_tui.analysis.report import build_report
    from rlhf_tui.bridge.monitor.subscriber import Subscriber
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
    from rlhf_tui.tui.render import header_text, transport_text

    (tmp_path / "a-file").write_text("not a folder")
    address = free_address()
    cb = RLHFMonitorCallback(address=address, log_dir=str(tmp_path / "a-file" / "logs"), analyze_checkpoints=False)
    sub = Subscriber(address).start()
    try:
        with pytest.warns(RuntimeWarning, match="cannot write the run log") as caught:
            for step in range(1, 6):
                cb.log_step(step, {"loss": 1.0})
            cb._publisher.flush(5.0)
            wait_for(
                lambda: (
                    sub.store.current_run is not None and sub.store.current_run.server_status.get("log_errors", 0) > 0
                ),
                timeout=15,
                message="a heartbeat with the log's errors",
            )
        assert len([w for w in caught if "run log" in str(w.message)]) == 1  # once, not per write
        with sub.store.lock:
            report = build_report(sub.store)
        assert report["log_errors"]["count"] >= 1 and "a-file" in report["log_errors"]["first"]
        assert "run log: " in header_text(report).plain and "failed write" in transport_text(report).plain
    finally:
        sub.stop()
        cb.close()
