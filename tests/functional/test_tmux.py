"""The real `rlhf-tui` console script in a real terminal (tmux, 120x40) on a recorded run: read the screen,
press keys, quit; and kill the terminal under it (what an SSH drop does) and check the process is gone."""

import json
import os
import shutil
import sys
import time
from pathlib import Path

import pytest
from conftest import TRACES, wait_for

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
EXE = os.path.join(os.path.dirname(sys.executable), "rlhf-tui")
RUN_ID = "tmux-recorded-run"


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory) -> str:
    """A JSONL log written by the callback from a real GRPO trace, plus a checkpoint and a reward batch."""
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

    trace = TRACES / "grpo_p01" / "trainer_state.json"
    if not trace.is_file():
        pytest.skip(f"trace not found: {trace}")
    history = [e for e in json.loads(trace.read_text())["log_history"] if "loss" in e and "step" in e]
    log_dir = tmp_path_factory.mktemp("recorded")
    cb = RLHFMonitorCallback(address=False, log_dir=str(log_dir), analyze_checkpoints=False, run_id=RUN_ID)
    for entry in history:
        cb.log_step(entry["step"], {k: v for k, v in entry.items() if k != "step"})
    last = history[-1]["step"]
    cb.log_rewards(
        last,
        [0.1, 0.8, -0.2, 0.5],
        [{"label": "best", "score": 0.8, "prompt": "Say something", "completion": "a lovely \x1b[31mday"}],
    )
    cb.log_checkpoint(last, str(log_dir / f"checkpoint-{last}"))
    cb.close()
    return cb.log_path


def _command(tmp_path: Path, *args: str, env: str = "") -> str:
    env = f"XDG_CONFIG_HOME={tmp_path / 'xdg'} TERM=xterm-256color {env}"
    return f"cd {tmp_path} && exec env -u COLUMNS -u LINES {env} {EXE} " + " ".join(args)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] == "Z"
    except OSError:
        return True


def test_real_app_in_tmux_shows_the_recorded_run_snapshots_and_quits(tmux, tmp_path, recorded_run, title):
    tmux.start(_command(tmp_path, recorded_run))
    screen = wait_for(
        lambda: (lambda s: s if RUN_ID in s and "entropy" in s and "Rewards" in s else "")(tmux.screen()),
        timeout=30,
        interval=0.2,
        message="the monitor's first screen",
    )
    for title in ("Anomalies", "GPU / system", "Checkpoints", "Rewards", "recorded", "reward", "entropy"):
        assert title in screen, (title, screen)
    assert any(ch in screen for ch in "▁▂▃▄▅▆▇█")
    assert "\x1b" not in screen and "a lovely day" in screen
    tmux.keys("s")
    snap = wait_for(
        lambda: next(iter(tmp_path.glob(f"rlhf-tui-snapshot-{RUN_ID}-*.txt")), None),
        timeout=10,
        interval=0.1,
        message="snapshot file in the working directory",
    )
    text = snap.read_text()
    assert "Metrics" in text and "Transport" in text and RUN_ID in text
    wait_for(lambda: "snapshot written to" in tmux.screen(), timeout=10, interval=0.1, message="where it went")
    tmux.keys("q")
    wait_for(lambda: not tmux.alive(), timeout=10, interval=0.1, message="the app to exit on q")


def test_app_exits_when_its_terminal_goes_away(tmux, tmp_path, recorded_run):
    tmux.start(_command(tmp_path, recorded_run))
    wait_for(lambda: RUN_ID in tmux.screen(), timeout=30, interval=0.2, message="the monitor running")
    pid = tmux.pane_pid()
    assert not _gone(pid)
    started = time.monotonic()
    tmux.run("kill-session", "-t", tmux.session)
    wait_for(lambda: _gone(pid), timeout=10, interval=0.05, message="the monitor process to exit")
    assert time.monotonic() - started < 10


def test_terminal_gone_with_ssh_forward_closes_the_forward_too(tmux, tmp_path, install_fake_ssh):
    """`--ssh` through a stand-in ssh that ignores SIGHUP: only the monitor's hangup handler can stop it."""
    from conftest import free_port

    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

    bindir = tmp_path / "bin"
    install_fake_ssh(bindir)
    log = tmp_path / "ssh.log"
    address = f"tcp://127.0.0.1:{free_port()}"
    cb = RLHFMonitorCallback(address=address, log_dir=None, analyze_checkpoints=False, run_id="ssh-run")
    for step in range(1, 31):
        cb.log_step(step, {"kl": 0.01, "reward": 0.1 * step})
    try:
        env = f"PATH={bindir}:{os.environ['PATH']} FAKE_SSH_LOG={log} FAKE_SSH_IGNORE_HUP=1"
        tmux.start(_command(tmp_path, "--ssh", "me@gpu-host", address, env=env))
        wait_for(lambda: "ssh-run" in tmux.screen(), timeout=30, interval=0.2, message="the run through the forward")
        ssh_pid = json.loads(log.read_text().splitlines()[0])["pid"]
        app_pid = tmux.pane_pid()
        tmux.run("kill-session", "-t", tmux.session)
        wait_for(lambda: _gone(app_pid), timeout=10, interval=0.05, message="the monitor to exit")
        wait_for(lambda: _gone(ssh_pid), timeout=10, interval=0.05, message="the ssh forward to be closed")
    finally:
        cb.close()


def test_quit_closes_the_ssh_forward(tmux, tmp_path, install_fake_ssh):
    from conftest import free_port

    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

    bindir = tmp_path / "bin"
    install_fake_ssh(bindir)
    log = tmp_path / "ssh.log"
    address = f"tcp://127.0.0.1:{free_port()}"
    cb = RLHFMonitorCallback(address=address, log_dir=None, analyze_checkpoints=False, run_id="ssh-run-q")
    cb.log_step(1, {"kl": 0.01})
    try:
        env = f"PATH={bindir}:{os.environ['PATH']} FAKE_SSH_LOG={log} FAKE_SSH_IGNORE_HUP=1"
        tmux.start(_command(tmp_path, "--ssh", "me@gpu-host", address, env=env))
        # the header says where the run comes from
        wait_for(
            lambda: "ssh-run-q" in tmux.screen() and "via me@gpu-host" in tmux.screen(),
            timeout=30,
            interval=0.2,
            message="the run, via the forward",
        )
        ssh_pid = json.loads(log.read_text().splitlines()[0])["pid"]
        tmux.keys("q")
        wait_for(lambda: not tmux.alive(), timeout=10, interval=0.1, message="the app to exit")
        wait_for(lambda: _gone(ssh_pid), timeout=10, interval=0.05, message="the ssh forward to be closed")
    finally:
        cb.close()


def _feed_rows(screen: str) -> list[str]:
    """The Anomaly feed's rows on a 120-column screen (its left column, below its title and column headers)."""
    lines = screen.splitlines()
    top = next((i for i, line in enumerate(lines) if line.startswith("─Anomalies")), None)
    if top is None:
        return []
    rows = []
    for line in lines[top + 1 :]:
        if line.startswith("─"):
            break
        rows.append(line[:60])
    return [r for r in rows if r.strip() and not r.lstrip().startswith("step ")]


def test_a_new_alarm_after_300_steps_is_visible_at_the_top_of_the_feed(tmux, tmp_path):
    """A live run with 300 steps of history (a real healthy trace, a NaN reward at step 150): a NaN loss arrives
    and its alarm is the top row of the feed, above the old one, on screen, without a key pressed."""
    from conftest import free_port

    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

    trace = TRACES / "grpo_p01" / "trainer_state.json"
    history = [e for e in json.loads(trace.read_text())["log_history"] if "loss" in e and "step" in e]
    address = f"tcp://127.0.0.1:{free_port()}"
    cb = RLHFMonitorCallback(address=address, log_dir=None, analyze_checkpoints=False, run_id="follow-run")
    steps = 0
    for entry in (history * 2)[:300]:  # 300 steps: the trace twice over, renumbered
        steps += 1
        metrics = {k: v for k, v in entry.items() if k not in ("step", "epoch")}
        cb.log_step(steps, {**metrics, "reward": float("nan")} if steps == 150 else metrics)
    try:
        tmux.start(_command(tmp_path, address))
        wait_for(
            lambda: (
                f"step {steps}" in tmux.screen() and (_feed_rows(tmux.screen()) or [""])[0].lstrip().startswith("150")
            ),
            timeout=30,
            interval=0.2,
            message="the monitor showing the 300 steps and the old alarm",
        )
        last = dict(history[-1])
        cb.log_step(steps + 1, {**{k: v for k, v in last.items() if k not in ("step", "epoch")}, "loss": float("nan")})
        screen = wait_for(
            lambda: (lambda s: s if (_feed_rows(s) or [""])[0].lstrip().startswith(str(steps + 1)) else "")(
                tmux.screen()
            ),
            timeout=20,
            interval=0.2,
            message="the new alarm at the top of the feed",
        )
        top, below = _feed_rows(screen)[:2]
        assert "CRIT" in top and "loss" in top, top
        assert below.lstrip().startswith("150") and "reward" in below, below
        assert "loss is NaN/Inf/None where a value was expected" in screen  # its whole message below the rows
        assert "new ↑" not in screen  # the feed followed: nothing waits above the cursor
    finally:
        cb.close()
