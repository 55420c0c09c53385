"""Alerts out, for real: `report --follow` on a JSONL log a writer thread is appending (the NaN-reward alarm line
while the run goes on, exit at run_end), `--on-alert` receiving the episode JSON, a hanging command killed after
its timeout and counted, the webhook against a local HTTP server (and an unreachable one reported once), and
the monitor running the alert command when a new alarm arrives (Pilot)."""

import http.server
import io
import json
import math
import os
import sys
import threading
import time

import pytest
from conftest import free_port, pilot_wait_for, wait_for

from rlhf_tui.analysis.thresholds import Thresholds
from rlhf_tui.bridge.training.jsonl_log import JsonlLog
from rlhf_tui.tui import alerts as alerts_mod
from rlhf_tui.tui.alerts import Alert, AlertDispatcher, AlertOptions, AlertTracker
from rlhf_tui.tui.cli import main
from rlhf_tui.tui.follow import follow_source

NAN_AT = 40
ALARM = f"step {NAN_AT}  CRITICAL  nonfinite  reward: reward is NaN/Inf/None where a value was expected"

# The --on-alert command of these tests: writes its stdin and RLHF_TUI_* environment to the file it is given.
RECORDER = """
import json, os, sys
episode = json.load(sys.stdin)
env = {k: v for k, v in os.environ.items() if k.startswith("RLHF_TUI_")}
with open(sys.argv[1], "a") as fh:
    fh.write(json.dumps({"episode": episode, "env": env}) + "\\n")
"""


def _step(s: int) -> dict:
    reward = math.nan if s == NAN_AT else 0.5 + 0.01 * math.sin(1.7 * s)
    return {"reward": reward, "kl": 0.01 + 0.001 * math.sin(s / 5), "loss": 0.1 + 0.01 * math.cos(s / 4)}


def _write_run(log: JsonlLog, first: int, last: int, start=False, end=False) -> None:
    if start:
        log.write({"event": "run_start", "run_id": "follow-1", "trainer": "GRPOTrainer", "max_steps": 60})
    for s in range(first, last + 1):
        log.write({"event": "step_end", "step": s, "ppo_metrics": _step(s)})
    if end:
        log.write({"event": "run_end", "global_step": last})


def _finished_log(tmp_path) -> str:
    log = JsonlLog(tmp_path, "follow-1")
    _write_run(log, 1, 60, start=True, end=True)
    log.close()
    return str(log.path)


class _Lines(io.StringIO):
    """An output stream that says when a line holding `marker` was written."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker, self.seen = marker, threading.Event()

    def write(self, text: str) -> int:
        if self.marker in text:
            self.seen.set()
        return super().write(text)


def test_follow_prints_the_nan_alarm_while_the_log_grows_and_exits_at_run_end(tmp_path):
    log = JsonlLog(tmp_path, "follow-1")
    _write_run(log, 1, 20, start=True)
    out, err = _Lines(ALARM), io.StringIO()
    seen_before_the_end: list[bool] = []

    def writer():  # the training: steps up to and past the NaN, then it waits for the alarm line, then ends
        try:
            for s in range(21, 46):
                _write_run(log, s, s)
            seen_before_the_end.append(out.seen.wait(30))
            _write_run(log, 46, 60, end=True)
        finally:
            log.close()

    thread = threading.Thread(target=writer)
    thread.start()
    started = time.monotonic()
    try:
        store, worst = follow_source(str(log.path), Thresholds(), None, timeout=60, out=out, err=err)
    finally:
        thread.join(30)
    assert seen_before_the_end == [True]  # printed while the run was still going
    assert time.monotonic() - started < 30
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].endswith(ALARM) and "  follow-1  " in lines[0]
    assert worst == "critical"
    with store.lock:
        assert store.current_run.rows == 60 and store.current_run.ended is not None
    notes = err.getvalue().splitlines()  # the run followed, said once its first data is read; the end
    assert notes[0].startswith("rlhf-tui: following run follow-1, at step "), notes
    assert notes[-1] == "rlhf-tui: run follow-1 ended at step 60: 1 alarm at medium or above", notes


def test_follow_started_before_the_training_waits_for_its_log_to_appear(tmp_path):
    """`report logs/ --follow` started before the training (a Slurm script, a cron line): the folder does not
    exist yet; the follow says once that it waits, then follows the log the run creates, to its end."""
    log_dir = tmp_path / "logs" / "rlhf-tui"
    out, err = _Lines(ALARM), _Lines("waiting for it to appear")

    def training():
        assert err.seen.wait(30)  # the follow is waiting: now the run starts and writes its log
        log = JsonlLog(log_dir, "follow-1")
        try:
            _write_run(log, 1, 60, start=True, end=True)
        finally:
            log.close()

    thread = threading.Thread(target=training)
    thread.start()
    try:
        store, worst = follow_source(str(log_dir), Thresholds(), None, timeout=60, out=out, err=err)
    finally:
        thread.join(30)
    assert out.getvalue().strip().endswith(ALARM) and worst == "critical"
    with store.lock:
        assert store.current_run.rows == 60 and store.current_run.ended is not None
    notes = err.getvalue().splitlines()
    assert (
        notes[0]
        == f"rlhf-tui: no such file or directory: {log_dir}; waiting for it to appear (--timeout S gives up after S seconds)"
    )
    assert notes[-1] == "rlhf-tui: run follow-1 ended at step 60: 1 alarm at medium or above"


def test_a_follow_whose_source_never_appears_gives_up_at_its_timeout(tmp_path, capsys):
    started = time.monotonic()
    assert main(["report", str(tmp_path / "never"), "--follow", "--timeout", "1"]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "waiting for it to appear" in err and f"no data from {tmp_path / 'never'} within 1 s" in err
    assert main(["report", str(tmp_path / "never")]) == 2  # without --follow: at once, as before
    assert "no such file or directory" in capsys.readouterr().err


def test_follow_exit_code_timeout_and_report(tmp_path, capsys):
    path = _finished_log(tmp_path)
    report = tmp_path / "report.json"
    assert main(["report", path, "--follow", "--fail-on", "critical", "-o", str(report), "--format", "json"]) == 1
    captured = capsys.readouterr()
    assert captured.out.strip().endswith(ALARM)
    assert json.loads(report.read_text())["steps"] == 60
    assert main(["report", path, "--follow", "--alert-level", "critical", "--fail-on", "critical"]) == 1
    assert capsys.readouterr().out.strip().endswith(ALARM)
    assert main(["report", path, "--follow", "--fail-on", "critical", "--thresholds", str(_mute(tmp_path))]) == 0
    assert ALARM not in capsys.readouterr().out  # muted: no alarm, exit 0

    log = JsonlLog(tmp_path / "open", "open-1")  # a run that does not end: --timeout stops the follow
    _write_run(log, 1, 10, start=True)
    log.close()
    started = time.monotonic()
    assert main(["report", str(log.path), "--follow", "--timeout", "1.5"]) == 0
    assert 1.4 < time.monotonic() - started < 10
    assert "stopped after 1.5 s (--timeout) at step 10" in capsys.readouterr().err


def _mute(tmp_path):
    path = tmp_path / "mute.toml"
    path.write_text('[thresholds]\nmuted = ["nonfinite"]\n')
    return path


def test_on_alert_receives_the_episode_json_for_a_nan_reward(tmp_path, capsys):
    path = _finished_log(tmp_path)
    script, received = tmp_path / "recorder.py", tmp_path / "received.jsonl"
    script.write_text(RECORDER)
    command = f"{sys.executable} {script} {received}"
    assert main(["report", path, "--follow", "--on-alert", command]) == 0
    (got,) = [json.loads(line) for line in received.read_text().splitlines()]
    episode, env = got["episode"], got["env"]
    assert (episode["detector"], episode["metric"], episode["step"]) == ("nonfinite", "reward", NAN_AT)
    assert episode["severity"] == "critical" and episode["run_id"] == "follow-1" and episode["value"] is None
    assert episode["source"] == path and episode["recommendation"]
    assert env == {
        "RLHF_TUI_RUN_ID": "follow-1",
        "RLHF_TUI_SEVERITY": "critical",
        "RLHF_TUI_DETECTOR": "nonfinite",
        "RLHF_TUI_METRIC": "reward",
        "RLHF_TUI_STEP": str(NAN_AT),
        "RLHF_TUI_MESSAGE": "reward is NaN/Inf/None where a value was expected",
    }
    assert "alerts: 1 sent; on-alert: 1 ok, 0 failed" in capsys.readouterr().err


def _alert(step: int = NAN_AT) -> Alert:
    return AlertTracker("low").new_alerts(
        "r1",
        [
            {
                "detector": "nonfinite",
                "metric": "reward",
                "severity": "critical",
                "step": step,
                "first_step": step,
                "message": "reward is NaN",
            }
        ],
    )[0]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_hanging_command_is_killed_after_its_timeout_and_counted_once(tmp_path):
    pids = tmp_path / "pids"
    script = tmp_path / "hang.py"
    script.write_text(  # the command and a child of its own, both hanging
        "import os, subprocess, sys, time\n"
        f"child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pids)!r}, 'a').write(f'{{os.getpid()}} {{child.pid}}\\n')\n"
        "time.sleep(120)\n"
    )
    notes: list[str] = []
    options = AlertOptions(command=f"{sys.executable} {script}", command_timeout=1.0)
    dispatcher = AlertDispatcher(options, note=notes.append)
    started = time.monotonic()
    assert dispatcher.submit(_alert(1)) and dispatcher.submit(_alert(2))
    assert time.monotonic() - started < 0.5  # never blocks the caller
    sink = dispatcher.sink("on-alert")
    wait_for(lambda: sink.failed == 2, timeout=20, message="both commands killed")
    dispatcher.close(timeout=5)
    assert sink.killed == 2 and sink.sent == 0
    assert notes == [f"--on-alert {sys.executable[:60]}: killed after 1 s (it hung) (further failures are counted)"]
    assert dispatcher.status() == "alerts: on-alert 2 failed"
    started_pids = [int(p) for line in pids.read_text().splitlines() for p in line.split()]
    assert len(started_pids) == 4
    wait_for(lambda: all(_gone(p) for p in started_pids), timeout=5, message="the commands and their children gone")


class _Hook(http.server.BaseHTTPRequestHandler):
    bodies: list = []
    statuses: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        status = self.statuses.pop(0) if self.statuses else 200
        self.bodies.append((status, self.headers["Content-Type"], json.loads(body)))
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def hook_server():
    _Hook.bodies, _Hook.statuses = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hooks/T000/B000/secret", _Hook
    server.shutdown()
    server.server_close()


def test_webhook_posts_slack_and_discord_json_and_retries_a_5xx(hook_server, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(alerts_mod, "WEBHOOK_BACKOFF", 0.01)
    url, hook = hook_server
    hook.statuses[:] = [503]  # the first attempt fails: retried
    assert main(["report", _finished_log(tmp_path), "--follow", "--webhook", url]) == 0
    assert [(status, ctype) for status, ctype, _ in hook.bodies] == [
        (503, "application/json"),
        (200, "application/json"),
    ]
    body = hook.bodies[-1][2]
    assert set(body) == {"text", "content"} and body["text"] == body["content"]
    assert body["text"].startswith(f"rlhf-tui: CRITICAL nonfinite on reward at step {NAN_AT} (run follow-1)")
    err = capsys.readouterr().err
    assert "webhook: 1 ok, 0 failed" in err and "secret" not in err


def test_an_unreachable_webhook_is_retried_a_bounded_number_of_times_and_reported_once(monkeypatch):
    monkeypatch.setattr(alerts_mod, "WEBHOOK_BACKOFF", 0.01)
    port = free_port()  # nothing listens there
    notes: list[str] = []
    dispatcher = AlertDispatcher(AlertOptions(webhook=f"http://127.0.0.1:{port}/hook/secret"), note=notes.append)
    for step in (1, 2, 3):
        dispatcher.submit(_alert(step))
    sink = dispatcher.sink("webhook")
    wait_for(lambda: sink.failed == 3, timeout=30, message="three failed deliveries")
    dispatcher.close(timeout=2)
    assert sink.tries == 3 * alerts_mod.WEBHOOK_ATTEMPTS and sink.sent == 0
    assert len(notes) == 1 and "secret" not in notes[0]
    assert notes[0].startswith(f"webhook http://127.0.0.1:{port}/… unreachable after 3 attempts: ")
    assert "refused" in notes[0].lower()


def test_notify_send_is_used_when_it_exists(tmp_path, monkeypatch):
    bindir, calls = tmp_path / "bin", tmp_path / "calls"
    bindir.mkdir()
    fake = bindir / "notify-send"
    fake.write_text(f"#!{sys.executable}\nimport sys\nopen({str(calls)!r}, 'a').write(repr(sys.argv[1:]) + '\\n')\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    dispatcher = AlertDispatcher(AlertOptions(notify=True))
    dispatcher.submit(_alert())
    dispatcher.close(timeout=10)
    (args,) = [eval(line) for line in calls.read_text().splitlines()]
    assert args[:3] == ["--app-name=rlhf-tui", "-u", "critical"] and args[3] == "rlhf-tui: CRITICAL nonfinite"
    assert f"at step {NAN_AT}" in args[4]
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    notes: list[str] = []
    AlertDispatcher(AlertOptions(notify=True), note=notes.append)
    assert notes == ["--notify: notify-send not found (install libnotify-bin); no desktop notifications"]


async def test_the_monitor_runs_the_alert_command_when_a_new_alarm_arrives(make_store, settle, tmp_path):
    from rlhf_tui.tui.app import MonitorApp

    script, received = tmp_path / "recorder.py", tmp_path / "received.jsonl"
    script.write_text(RECORDER)
    store = make_store(steps=300)
    options = AlertOptions(level="critical", command=f"{sys.executable} {script} {received}")
    app = MonitorApp([], stores=[store], labels=["demo"], alerts=options)
    async with app.run_test(size=(120, 40)) as pilot:
        await settle(pilot, app)
        assert not received.exists()  # no critical episode in the history
        with store.lock:
            run = store.current_run
            for s in range(301, 311):
                run.add_step(s, {"reward": math.nan if s == 305 else 1.1, "kl": 0.01, "loss": 0.0})
            store.touch()
        await pilot_wait_for(pilot, lambda: received.exists(), timeout=20, message="the alert command ran")
        await pilot_wait_for(pilot, lambda: app.alerts.sink("on-alert").sent == 1, message="counted as sent")
        (got,) = [json.loads(line) for line in received.read_text().splitlines()]
        assert (got["episode"]["detector"], got["episode"]["metric"], got["episode"]["step"]) == (
            "nonfinite",
            "reward",
            305,
        )
        assert got["env"]["RLHF_TUI_RUN_ID"] == store.current_run.run_id


def test_follow_a_live_address_until_the_run_ends(tmp_path, address):
    from types import SimpleNamespace

    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

    cb = RLHFMonitorCallback(address=address, log_dir=str(tmp_path), analyze_checkpoints=False)
    out, err = _Lines(ALARM), io.StringIO()
    seen: list[bool] = []

    def training():
        try:
            for s in range(1, 46):
                cb.log_step(s, _step(s))
            seen.append(out.seen.wait(30))
            for s in range(46, 61):
                cb.log_step(s, _step(s))
            cb.on_train_end(state=SimpleNamespace(global_step=60))
        except BaseException:
            seen.append(False)
            raise

    thread = threading.Thread(target=training)
    thread.start()
    try:
        store, worst = follow_source(address, Thresholds(), None, timeout=60, out=out, err=err)
    finally:
        thread.join(30)
        cb.close()
    assert seen == [True] and worst == "critical"
    (line,) = out.getvalue().splitlines()
    assert line.endswith(ALARM)
    with store.lock:
        run = store.current_run
        assert run.rows == 60 and run.ended is not None
    assert f"run {run.run_id} ended at step 60: 1 alarm" in err.getvalue()


async def test_the_monitor_header_says_once_that_the_alert_command_failed(make_store, settle, tmp_path):
    from rlhf_tui.tui.app import MonitorApp
    from rlhf_tui.tui.widgets.runview import RunHeader

    script = tmp_path / "fail.py"
    script.write_text("import sys\nsys.stdin.read()\nprint('no route to pager', file=sys.stderr)\nsys.exit(3)\n")
    store = make_store(steps=300)
    app = MonitorApp([], stores=[store], labels=["demo"], alerts=AlertOptions(command=f"{sys.executable} {script}"))
    shown: list[str] = []
    notify = app.notify

    def spy(message, **kw):
        shown.append(message)
        notify(message, **kw)

    app.notify = spy
    async with app.run_test(size=(160, 40)) as pilot:
        await settle(pilot, app)
        sink = app.alerts.sink("on-alert")
        await pilot_wait_for(pilot, lambda: sink.failed >= 2, timeout=20, message="the command failed")
        header = app.view.query_one(RunHeader)
        await pilot_wait_for(
            pilot, lambda: f"alerts: on-alert {sink.failed} failed" in str(header.render()), message="header"
        )
        failures = [m for m in shown if "--on-alert" in m]
        assert failures == [
            f"--on-alert {sys.executable[:60]}: exited with 3: no route to pager (further failures are counted)"
        ]


def test_follow_a_tensorboard_log_directory_while_its_event_file_grows(tmp_path):
    """An event file's appends change neither its directory's size nor its modification time: the follow reads
    the new records (reading the directory again whole only when it changed, it saw no step past the first look
    and never the run's end)."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    from rlhf_tui.tui.alerts import AlertTracker
    from rlhf_tui.tui.follow import Follower

    log_dir = tmp_path / "runs" / "Jan01_12-00-00_host"
    writer = SummaryWriter(log_dir=str(log_dir))
    writer.add_text("args", json.dumps({"max_steps": 60, "logging_steps": 1}))

    def write(first: int, last: int) -> None:  # as transformers' TensorBoardCallback: `train/<key>`, a flush a log
        for s in range(first, last + 1):
            for key, value in _step(s).items():
                writer.add_scalar(f"train/{key}", value, s)
            writer.flush()

    write(1, 20)
    out = _Lines(ALARM)
    follower = Follower(str(log_dir), Thresholds(), AlertTracker("medium"), out=out)
    results: list = []
    thread = threading.Thread(target=lambda: results.append(follower.run(timeout=30)))
    thread.start()
    try:
        rows = lambda: (lambda run: run.rows if run is not None else 0)(follower.model.store.current_run)  # noqa: E731
        wait_for(lambda: rows() == 20, timeout=30, message="the first 20 steps followed")
        directory = log_dir.stat()
        write(21, 60)
        writer.add_scalar("train/train_runtime", 9.0, 60)  # the end-of-training summary: the run's end
        writer.close()
        assert (log_dir.stat().st_size, log_dir.stat().st_mtime_ns) == (directory.st_size, directory.st_mtime_ns)
        thread.join(60)
    finally:
        follower.stop()
        thread.join(10)
    (result,) = results
    assert result.reason == "ended" and result.alarms == 1
    (line,) = out.getvalue().splitlines()
    assert line.endswith(ALARM) and "  tb:Jan01_12-00-00_host  " in line
    with result.store.lock:
        assert result.store.current_run.rows == 60 and result.store.current_run.summary["train_runtime"] == 9.0


def test_follow_a_trainer_state_rewritten_at_each_checkpoint(tmp_path):
    """A file without an append-only format is read again whole when it changes; a rewrite caught half-written
    is retried at the next look, never a crash or a partial history."""
    path = tmp_path / "trainer_state.json"
    out, err = _Lines(ALARM), _Lines("not valid JSON")
    seen: list[bool] = []

    def state(last: int, end: bool = False) -> str:
        history = [{"step": s, **_step(s)} for s in range(1, last + 1)]
        if end:
            history.append({"step": last, "train_runtime": 12.5, "train_loss": 0.1})
        return json.dumps({"global_step": last, "max_steps": 60, "log_history": history})  # NaN as NaN (json)

    def rewrite(text: str) -> None:  # as transformers does: whole, then renamed
        partial = path.with_suffix(".tmp")
        partial.write_text(text)
        os.replace(partial, path)

    def trainer():
        rewrite(state(45))
        seen.append(out.seen.wait(30))
        path.write_text(state(60)[:100])  # a writer caught mid-rewrite
        seen.append(err.seen.wait(30))  # the follower saw it (and keeps the last good history)
        rewrite(state(60, end=True))

    rewrite(state(20))
    thread = threading.Thread(target=trainer)
    thread.start()
    try:
        store, worst = follow_source(str(path), Thresholds(), None, timeout=60, out=out, err=err)
    finally:
        thread.join(30)
    assert seen == [True, True] and worst == "critical"
    (line,) = out.getvalue().splitlines()
    assert line.endswith(ALARM)
    with store.lock:
        assert store.current_run.rows == 60 and store.current_run.ended is not None
    assert err.getvalue().count("not valid JSON") == 1  # the half-written file, said once
