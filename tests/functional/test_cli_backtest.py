"""`rlhf-tui backtest` on the labelled traces (tests/data/traces/labels.json): no alarm on the healthy runs, every
faulty run alarmed after its onset, the same verdict as `report --fail-on`, text and JSON, thresholds and level
honoured, bad input one line and exit 2."""

import json

import pytest
from conftest import TRACES
from test_cli import run_cli

from rlhf_tui.tui.cli import EXIT_ANOMALY, main

LABELS = json.loads((TRACES / "labels.json").read_text())
HEALTHY = sorted(name for name, label in LABELS.items() if label["fault"] == "none")
FAULTY = sorted(name for name, label in LABELS.items() if label["fault"] != "none")


def _backtest(capsys, *args) -> dict:
    assert main(["backtest", *args, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_healthy_runs_raise_no_medium_alarm(capsys):
    result = _backtest(capsys, *(str(TRACES / name) for name in HEALTHY))
    assert len(HEALTHY) >= 3 and result["total_runs"] == len(HEALTHY)
    assert result["runs_alarmed"] == 0 and result["rate"] == 0.0
    assert all(d["runs_alarmed"] == 0 and d["alarms"] == [] for d in result["detectors"])
    assert [r["first_alarm"] for r in result["runs"]] == [None] * len(HEALTHY)


def test_every_faulty_run_is_alarmed_after_its_onset_and_where_is_reported(capsys):
    result = _backtest(capsys, *(str(TRACES / name) for name in FAULTY))
    assert result["runs_alarmed"] == len(FAULTY) == result["total_runs"]
    for run in result["runs"]:
        name = run["run"].rsplit("/", 1)[-1]
        first = run["first_alarm"]
        assert first is not None and first["first_step"] > LABELS[name]["onset_step"], (name, first)
        assert run["steps"] == LABELS[name]["steps_logged"]
    # every alarm listed under its detector, and each detector's count is its number of runs
    for d in result["detectors"]:
        assert d["runs_alarmed"] == len({a["run"] for a in d["alarms"]})
        for a in d["alarms"]:
            assert a["first_step"] > LABELS[a["run"].rsplit("/", 1)[-1]]["onset_step"]


@pytest.mark.parametrize("name", ["grpo_p01", "grpo_p04", "dpo_p05"])
def test_a_runs_verdict_is_the_report_commands_verdict(capsys, name):
    source = str(TRACES / name)
    alarmed = _backtest(capsys, source)["runs_alarmed"] == 1
    assert main(["report", source, "--format", "json", "--fail-on", "medium"]) == (EXIT_ANOMALY if alarmed else 0)
    capsys.readouterr()
    assert alarmed == (LABELS[name]["fault"] != "none")


def test_level_and_a_thresholds_file_change_the_count(capsys, tmp_path):
    healthy = [str(TRACES / name) for name in HEALTHY]
    lows = _backtest(capsys, *healthy, "--level", "low")
    zscore = next(d for d in lows["detectors"] if d["detector"] == "zscore")
    assert lows["level"] == "low" and zscore["runs_alarmed"] >= len(HEALTHY) - 1  # lows almost everywhere
    muted = tmp_path / "muted.toml"
    muted.write_text('[thresholds]\nmuted = ["zscore"]\n')
    quiet = _backtest(capsys, *healthy, "--level", "low", "--thresholds", str(muted))
    row = next(d for d in quiet["detectors"] if d["detector"] == "zscore")
    assert row["muted"] and row["runs_alarmed"] == 0 and quiet["thresholds"] == {"muted": ["zscore"]}
    faulty = [str(TRACES / name) for name in FAULTY]
    assert _backtest(capsys, *faulty, "--level", "critical")["runs_alarmed"] < len(FAULTY)


def test_text_output_says_how_many_runs_each_detector_alarmed_and_where(capsys, tmp_path):
    sources = [str(TRACES / "grpo_p01"), str(TRACES / "grpo_p04")]
    out = tmp_path / "backtest.txt"
    assert main(["backtest", *sources, "-o", str(out)]) == 0
    text = out.read_text()
    assert "Back-test: 2 runs, alarm = medium or worse, thresholds: defaults" in text
    assert "runs alarmed: 1 of 2 (50%)" in text
    nonfinite = next(line for line in text.splitlines() if line.startswith("nonfinite"))
    assert "1/2" in nonfinite and "50%" in nonfinite
    where = [line for line in text.splitlines() if line.startswith("    ") and "grpo_p04" in line]
    assert where and all("step" in line for line in where)
    assert any(line.startswith(sources[0]) and line.endswith("none") for line in text.splitlines())
    assert "no alarm on any run:" in text


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["backtest"], "the following arguments are required: RUN"),
        (["backtest", "/no/such/run"], "no such file or directory: /no/such/run"),
        (["backtest", "tcp://127.0.0.1:5555"], "backtest reads recorded runs"),
        (["backtest", str(TRACES / "grpo_p01"), "--level", "severe"], "invalid choice: 'severe'"),
        (["backtest", str(TRACES / "grpo_p01"), "--thresholds", "/no/such.toml"], "thresholds file not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, fragment):
    result = run_cli(*args)
    assert result.returncode == 2 and result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and fragment in result.stderr, result.stderr


def test_a_source_without_steps_is_one_line_and_exit_2(tmp_path):
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": [{"train_runtime": 1.0}]}))
    result = run_cli("backtest", str(tmp_path))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"{tmp_path}: no logged steps" in result.stderr, result.stderr
