"""Set-up that holds on any machine: bad option values refused in one line, the live monitor's address from
$RLHF_TUI_ADDRESS, unknown muted detectors refused, and `rlhf-tui demo` saying in one line (exit 2) why it
cannot run here (no training extras, no terminal) or that its training crashed."""

import io
import os
import subprocess
import sys
import textwrap
import threading

import pytest
from conftest import wait_for
from test_cli import run_cli

from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
from rlhf_tui.tui import cli, demo
from rlhf_tui.tui.cli import DEFAULT_SOURCE, main


@pytest.fixture
def log(tmp_path):
    cb = RLHFMonitorCallback(address=False, log_dir=str(tmp_path / "logs"), analyze_checkpoints=False)
    for step in range(1, 11):
        cb.log_step(step, {"kl": 0.01, "reward": 0.1 * step})
    cb.close()
    return cb.log_path


def one_line_error(capsys, code: int) -> str:
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


# --------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize(
    "args, fragment",
    [
        (["report", "{log}", "--width", "0"], "--width: must be between 40 and 1000 (got 0)"),
        (["report", "{log}", "--width", "-3"], "--width: must be between 40"),
        (["report", "{log}", "--width", "100000"], "--width: must be between 40 and 1000"),
        (["report", "{log}", "--width", "wide"], "--width: expected an integer"),
        (["report", "{log}", "--wait-steps", "-3"], "--wait-steps: must be positive (got -3)"),
        (["report", "{log}", "--wait-steps", "0"], "--wait-steps: must be positive"),
        (["report", "{log}", "--timeout", "0"], "--timeout: must be a finite number > 0"),
        (["report", "{log}", "--timeout", "-1"], "--timeout: must be a finite number > 0"),
        (["report", "{log}", "--timeout", "nan"], "--timeout: must be a finite number > 0"),
        (["report", "{log}", "--timeout", "inf"], "--timeout: must be a finite number > 0"),
        (["demo", "--steps", "0"], "--steps: must be between 1 and 100000 (got 0)"),
        (["demo", "--steps", "-5"], "--steps: must be between 1"),
        (["demo", "--steps", "1000000000"], "--steps: must be between 1 and 100000"),
        (["demo", "--save-steps", "0"], "--save-steps: must be positive (got 0)"),
        (["demo", "--save-steps", "-2"], "--save-steps: must be positive"),
        (["demo", "--step-delay", "-1"], "--step-delay: must be a finite number >= 0"),
        (["demo", "--step-delay", "nan"], "--step-delay: must be a finite number >= 0"),
        (["analyze-checkpoint", "x.safetensors", "--step", "-1"], "--step: must be >= 0 (got -1)"),
        (["--ssh-timeout", "0", "tcp://127.0.0.1:5555"], "--ssh-timeout: must be a finite number > 0"),
    ],
)
def test_bad_option_values_are_refused_in_one_line(args, fragment, log, capsys):
    line = one_line_error(capsys, main([a.format(log=log) for a in args]))
    assert fragment in line


def test_good_option_values_still_work(log, capsys):
    assert main(["report", log, "--width", "40", "--timeout", "0.5", "--wait-steps", "1"]) == 0
    assert max(len(line) for line in capsys.readouterr().out.splitlines()) <= 40


@pytest.mark.parametrize("where", ["thresholds", "config"])
def test_unknown_muted_detector_is_refused(where, tmp_path, log, capsys):
    toml = 'muted = ["kl_spkie"]\n'
    if where == "thresholds":
        (tmp_path / "th.toml").write_text(toml)
        code = main(["report", log, "--thresholds", str(tmp_path / "th.toml")])
        expected = f"thresholds file {tmp_path / 'th.toml'}: muted: unknown detector 'kl_spkie'"
    else:  # the monitor's config file (saved by its mute key, or edited by hand)
        (tmp_path / "config.toml").write_text("[thresholds]\n" + toml)
        code = main([log, "--config", str(tmp_path / "config.toml")])
        expected = "[thresholds] muted: unknown detector 'kl_spkie'"
    line = one_line_error(capsys, code)
    assert expected in line and "did you mean 'kl_spike'?" in line


def test_known_muted_detectors_are_accepted(tmp_path, log, capsys):
    (tmp_path / "th.toml").write_text('muted = ["kl_spike", "reward_drift", "zscore"]\n')
    assert main(["report", log, "--thresholds", str(tmp_path / "th.toml")]) == 0


# ------------------------------------------------------------------------------------- RLHF_TUI_ADDRESS
class _TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def fake_app(monkeypatch):
    """The live monitor with a terminal, its app replaced by one that records the sources it was given."""
    import rlhf_tui.tui.app as app_module

    seen: list[list[str]] = []

    class App:
        return_code = 0

        def __init__(self, sources, **kwargs):
            seen.append(list(sources))

        def run(self):
            pass

        def cancel_hangup_timer(self):
            pass

    monkeypatch.setattr(app_module, "MonitorApp", App)
    monkeypatch.delenv("RLHF_TUI_ADDRESS", raising=False)
    return seen


def test_monitor_address_precedence_argument_then_env_then_default(fake_app, monkeypatch, log):
    monkeypatch.setattr(sys, "stdin", _TTY())  # here, not in the fixture: pytest resets sys.stdout after setup
    monkeypatch.setattr(sys, "stdout", _TTY())
    assert main([]) == 0
    monkeypatch.setenv("RLHF_TUI_ADDRESS", "tcp://127.0.0.1:6123")
    assert main([]) == 0
    assert main(["monitor"]) == 0
    assert main(["tcp://127.0.0.1:7001", log]) == 0
    assert main(["monitor", "ipc:///tmp/x.sock"]) == 0
    assert fake_app == [
        [DEFAULT_SOURCE],
        ["tcp://127.0.0.1:6123"],
        ["tcp://127.0.0.1:6123"],
        ["tcp://127.0.0.1:7001", log],
        ["ipc:///tmp/x.sock"],
    ]


def test_the_training_side_reads_the_same_variable():
    from rlhf_tui.bridge.training import publisher

    assert cli.ADDRESS_ENV == publisher.ADDRESS_ENV and cli.DEFAULT_SOURCE == publisher.DEFAULT_ADDRESS


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("tcp://127.0.0.1:notaport", "RLHF_TUI_ADDRESS: bad address 'tcp://127.0.0.1:notaport'"),
        ("/var/log/run.jsonl", "RLHF_TUI_ADDRESS='/var/log/run.jsonl' is not an address"),
        ("tcp://x:1\x1b[2J", "RLHF_TUI_ADDRESS: bad address"),
    ],
)
def test_a_bad_env_address_is_one_line(value, fragment):
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "rlhf-tui")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "RLHF_TUI_ADDRESS": value, "RLHF_TUI_DEBUG": ""},
    )
    assert result.returncode == 2 and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------------- demo
BLOCKER = """
import os, sys

_BLOCKED = set(os.environ.get("RLHF_TUI_TEST_BLOCK", "").split(","))


class _Blocker:  # a monitor-only install: these packages are not there
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, _Blocker())
"""


@pytest.fixture
def monitor_only_env(tmp_path):
    """Environment of a process (and its children) in which torch, transformers and trl cannot be imported."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
        "RLHF_TUI_TEST_BLOCK": "torch,transformers,trl",
        "RLHF_TUI_DEBUG": "",
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
    }


@pytest.mark.parametrize("mode", [["--headless"], []])
def test_demo_without_the_training_extras_is_one_line(monitor_only_env, mode):
    exe = os.path.join(os.path.dirname(sys.executable), "rlhf-tui")
    check = subprocess.run([sys.executable, "-c", "import trl"], capture_output=True, env=monitor_only_env)
    assert check.returncode != 0  # the simulation holds
    result = subprocess.run(
        [exe, "demo", *mode, "--steps", "2"], capture_output=True, text=True, timeout=120, env=monitor_only_env
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "needs the training extras (torch, transformers, trl not installed)" in lines[0]
    assert "pip install -e '.[train]'" in lines[0] and "rlhf-tui[train] @ git+" in lines[0]


def test_demo_without_a_terminal_is_one_line():
    result = run_cli("demo", "--steps", "2")  # stdout is a pipe
    assert result.returncode == 2, result
    assert result.stderr.strip() == (
        "rlhf-tui demo: the live view needs a terminal; use `rlhf-tui demo --headless` for a report"
    )


CRASH_BEFORE_DATA = "print('loading the model'); raise RuntimeError('boom: the model would not load')"
CRASH_AFTER_DATA = textwrap.dedent(
    """
    import os, sys
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

    cb = RLHFMonitorCallback(address=sys.argv[1], log_dir=None, analyze_checkpoints=False)
    for step in range(1, 6):
        cb.log_step(step, {"kl": 0.01, "reward": 0.1 * step})
    sys.stdin.readline()  # the test says when the demo's monitor has every step
    print("Traceback (most recent call last):\\nRuntimeError: CUDA error: out of memory", flush=True)
    os._exit(3)  # crashed: no run_end
    """
)


@pytest.mark.parametrize(
    "script, code, shows_report",
    [(CRASH_BEFORE_DATA, 1, False), (CRASH_AFTER_DATA, 3, True)],
    ids=["before-any-data", "after-five-steps"],
)
def test_demo_whose_training_crashes_exits_2_with_one_line(script, code, shows_report, monkeypatch, capsys):
    import rlhf_tui.bridge.monitor.subscriber as subscriber_module

    subscribers, children = [], []

    class Recording(subscriber_module.Subscriber):
        def start(self):
            subscribers.append(self)
            return super().start()

    def fake_training(address, steps, output_dir, *, log_path, **kwargs):
        out = open(log_path, "wb")
        child = subprocess.Popen(
            [sys.executable, "-c", script, address], stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT
        )
        children.append(child)
        return child

    def crash_when_the_monitor_has_five_steps():
        def rows():
            run = subscribers[0].store.current_run if subscribers else None
            return run.rows if run is not None else 0

        try:
            wait_for(lambda: rows() >= 5, timeout=60, message="the demo's monitor has 5 steps")
        finally:
            children[0].stdin.close()  # the child crashes now (or already has)

    monkeypatch.setattr(subscriber_module, "Subscriber", Recording)
    monkeypatch.setattr(demo, "start_training", fake_training)
    watcher = threading.Thread(target=crash_when_the_monitor_has_five_steps, daemon=True)
    if shows_report:
        watcher.start()
    assert main(["demo", "--headless", "--steps", "5", "--format", "json"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    last = "RuntimeError: CUDA error: out of memory" if shows_report else "RuntimeError: boom: the model would not"
    assert f"(exit code {code}: {last}" in lines[0] and "training.log" in lines[0]
    assert ('"steps": 5' in captured.out) is shows_report  # what arrived is still reported
