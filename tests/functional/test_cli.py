"""The command line: report on every source kind, JSON per the contract, bad input → one line, exit 2."""

import json
import os
import struct
import subprocess
import sys

import pytest
from conftest import TRACES, free_address

from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
from rlhf_tui.tui.cli import main

DEEP = 100_000  # nesting levels: far past the JSON parser's recursion limit
CONTRACT_KEYS = {"run", "steps", "last_step", "metrics", "anomalies", "checkpoints", "rewards", "transport"}


def run_cli(*args, timeout=60):
    """The installed console script in a subprocess: what a user sees (stderr, exit code)."""
    exe = os.path.join(os.path.dirname(sys.executable), "rlhf-tui")
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, "RLHF_TUI_DEBUG": ""}
    )


@pytest.fixture
def jsonl_log(tmp_path):
    cb = RLHFMonitorCallback(address=False, log_dir=str(tmp_path / "logs"), analyze_checkpoints=False)
    for step in range(1, 41):
        cb.log_step(step, {"kl": 0.01, "reward": 0.1 * step, "loss": 0.5, "entropy": 2.0 - 0.01 * step})
    cb.close()
    return cb.log_path


def test_report_json_from_jsonl_matches_the_contract(jsonl_log, capsys):
    assert main(["report", jsonl_log, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert CONTRACT_KEYS <= set(report)
    assert report["steps"] == 40 and report["last_step"] == 40
    assert report["run"]["trainer"] == "custom" and report["run"]["run_id"]
    kl = report["metrics"]["kl"]
    assert set(kl) >= {"last", "mean", "std", "min", "max", "trend"} and kl["last"] == 0.01
    assert report["metrics"]["reward"]["trend"] == "increasing"
    assert report["metrics"]["entropy"]["trend"] == "decreasing"
    assert set(report["transport"]) >= {"received", "rejected", "gaps", "dropped"}
    assert report["rewards"]["reliability_metrics"].keys() >= {"stability", "consistency", "variance", "mean_reward"}


def test_report_text_and_markdown(jsonl_log, tmp_path, capsys):
    assert main(["report", jsonl_log]) == 0
    text = capsys.readouterr().out
    for section in ("Metrics", "Anomalies", "GPU / system", "Checkpoints", "Rewards", "Transport"):
        assert section in text
    assert "no GPU" in text and "▁" in text
    out = tmp_path / "r.md"
    assert main(["report", jsonl_log, "--format", "markdown", "-o", str(out)]) == 0
    assert out.read_text().startswith("# rlhf-tui report")


def test_report_on_a_trainer_state_and_an_output_dir(traces_dir, tmp_path, capsys):
    state = traces_dir / "grpo_p01" / "trainer_state.json"
    assert main(["report", str(state), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 289 and "kl" not in report["metrics"]  # beta=0: no kl key
    assert report["metrics"]["clip_ratio"]["max"] == 0.0
    out_dir = tmp_path / "output" / "checkpoint-7"
    out_dir.mkdir(parents=True)
    out_dir.joinpath("trainer_state.json").write_text(state.read_text())
    assert main(["report", str(tmp_path / "output"), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 289


def test_report_on_a_live_source(tmp_path, capsys):
    address = free_address()
    cb = RLHFMonitorCallback(address=address, log_dir=None, analyze_checkpoints=False)
    for step in range(1, 26):
        cb.log_step(step, {"kl": 0.02, "reward": 1.0})
    try:
        assert main(["report", address, "--format", "json", "--wait-steps", "25", "--timeout", "10"]) == 0
    finally:
        cb.close()
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 25 and report["transport"]["received"] >= 25 and report["transport"]["gaps"] == 0


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["report", "/no/such/file.jsonl"], "no such file"),
        (["report", "tcp://127.0.0.1:notaport"], "bad address"),
        (["report", "--format", "yaml", "x"], "invalid choice"),
        (["report", "tcp://127.0.0.1:1", "--timeout", "0.5"], "no data from"),
        (["nonexistent-source-file"], "no such file"),
        (["analyze-checkpoint", "/no/such/ckpt"], ""),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, fragment):
    result = run_cli(*args)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert fragment in result.stderr


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("", "empty"),
        ("{not json", "not valid JSON"),
        ('{"log_history": 3}', "not a trainer_state.json"),
        ("[1, 2, 3]", "not a trainer_state.json"),
        ('{"event": "mystery"}\n', "no rlhf-tui events"),
        ('{"log_history": ' + "[" * DEEP + "]" * DEEP + "}", "JSON nested too deeply to read"),
        ('{"log_history": [{"step": 1, "loss": ' + "[" * DEEP + "]" * DEEP + "}]}", "JSON nested too deeply"),
        (
            '{"event": "mystery"}\n{"event": "step", "step": 1, "metrics": '
            + '{"a":' * DEEP
            + "1"
            + "}" * DEEP
            + "}\n",
            "1 unreadable line",
        ),
    ],
    ids=["empty", "bad-json", "log-history-int", "list", "mystery-event", "deep-state", "deep-value", "deep-jsonl"],
)
def test_malformed_files_are_one_line_and_exit_2(tmp_path, content, fragment):
    path = tmp_path / "input.json"
    path.write_text(content)
    result = run_cli("report", str(path))
    assert result.returncode == 2 and fragment in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "internal error" not in result.stderr


def _safetensors(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize(
    "name, data, fragment",
    [
        ("pytorch_model.bin", b"hello world" * 10, "not a checkpoint: "),
        ("text.pt", b"hello, not a pickle\n" * 20, "not a checkpoint: "),
        ("deep.safetensors", _safetensors(b'{"a":' * DEEP + b"1" + b"}" * DEEP), "nested too deeply to parse"),
    ],
    ids=["text-bin", "text-pt", "deep-header"],
)
def test_non_checkpoint_files_are_one_line_and_exit_2(tmp_path, name, data, fragment):
    path = tmp_path / name
    path.write_bytes(data)
    result = run_cli("analyze-checkpoint", str(path))
    assert result.returncode == 2 and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "internal error" not in result.stderr


def test_a_checkpoint_with_a_deep_trainer_state_is_still_analysed(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(_safetensors(header) + struct.pack("<2f", 0.5, -0.25))
    (tmp_path / "trainer_state.json").write_text('{"log_history": ' + "[" * DEEP + "]" * DEEP + "}")
    result = run_cli("analyze-checkpoint", str(tmp_path), "--format", "json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["num_parameters"] == 2


def test_report_on_a_checkpoint_file_points_to_analyze_checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(_safetensors(b"{}"))
    result = run_cli("report", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().endswith(
        f"looks like a checkpoint, not a run log (use `rlhf-tui analyze-checkpoint {path}`)"
    )


def test_monitor_without_a_terminal_says_so():
    result = run_cli(str(TRACES / "grpo_p01" / "trainer_state.json"))
    assert result.returncode == 2 and "needs a terminal" in result.stderr


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("demo", "report", "analyze-checkpoint", "keygen", "--thresholds", "--snapshot-dir", "--keys-dir"):
        assert command in result.stdout


def test_keygen_then_report_over_curve(tmp_path, capsys):
    """`rlhf-tui keygen DIR`, training with keys_dir, `report --keys-dir`: authorised monitors get the run,
    a monitor without keys gets nothing (one line, exit 2)."""
    keys = tmp_path / "keys"
    assert main(["keygen", str(keys)]) == 0
    assert (keys / "server.key").is_file() and (keys / "client.key_secret").is_file()
    capsys.readouterr()
    address = free_address()
    cb = RLHFMonitorCallback(address=address, log_dir=None, analyze_checkpoints=False, keys_dir=str(keys))
    for step in range(1, 11):
        cb.log_step(step, {"kl": 0.02, "reward": 1.0})
    try:
        assert main(["report", address, "--format", "json", "--wait-steps", "10", "--keys-dir", str(keys)]) == 0
        assert json.loads(capsys.readouterr().out)["steps"] == 10
        assert main(["report", address, "--timeout", "1.5"]) == 2
        assert "no data from" in capsys.readouterr().err
    finally:
        cb.close()
    assert main(["report", address, "--keys-dir", str(keys), "--server-key", "x"]) == 2
    assert "either --keys-dir" in capsys.readouterr().err
