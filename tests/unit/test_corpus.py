"""The committed second corpus (benchmarks/corpus/runs): labels.json shape and every run readable as a source.

No training here: benchmarks/corpus/generate.py made the runs; this checks what it wrote and what the
detector benchmark reads.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

RUNS = Path(__file__).resolve().parents[2] / "benchmarks" / "corpus" / "runs"
TRAINERS = {"GRPOTrainer", "RLOOTrainer", "DPOTrainer"}
SUDDEN = {"lr_spike", "grad_explosion", "reward_nan", "reward_scale", "dead_reward", "label_flip"}
GRADUAL = {"reward_drift", "length_exploit", "entropy_collapse", "kl_runaway"}
FIELDS = {"trainer", "fault", "kind", "onset_step", "config", "fault_params", "crashed", "crash_error", "steps_logged"}


def _labels() -> dict:
    return json.loads((RUNS / "labels.json").read_text())


def _history(name: str) -> list[dict]:
    state = json.loads((RUNS / name / "trainer_state.json").read_text())
    return [e for e in state["log_history"] if "train_runtime" not in e]


def test_labels_cover_exactly_the_run_folders_and_the_grid_mix():
    labels = _labels()
    dirs = {p.name for p in RUNS.iterdir() if p.is_dir()}
    assert set(labels) == dirs
    assert all((RUNS / n / "trainer_state.json").is_file() for n in labels)
    assert len(labels) >= 30
    faults = [lab["fault"] for lab in labels.values()]
    assert faults.count("none") >= 10
    assert {f for f in faults if f != "none"} == SUDDEN | GRADUAL  # every fault kind is there
    assert {lab["trainer"] for lab in labels.values()} == TRAINERS


@pytest.mark.parametrize("name", sorted(_labels()) if (RUNS / "labels.json").is_file() else [])
def test_label_shape_and_consistency_with_its_log(name):
    lab = _labels()[name]
    assert FIELDS <= set(lab)
    assert lab["trainer"] in TRAINERS
    assert name.split("_")[0] == {"GRPOTrainer": "grpo", "RLOOTrainer": "rloo", "DPOTrainer": "dpo"}[lab["trainer"]]
    cfg = lab["config"]
    assert isinstance(cfg["seed"], int) and cfg["max_steps"] >= 300 and cfg["logging_steps"] in (1, 2)
    hist = _history(name)
    steps = [e["step"] for e in hist]
    assert steps == sorted(steps) and len(set(steps)) == len(steps)
    assert lab["steps_logged"] == steps[-1] and isinstance(lab["crashed"], bool)
    if not lab["crashed"]:
        assert lab["steps_logged"] == cfg["max_steps"] and lab["crash_error"] is None
    assert all(s % cfg["logging_steps"] == 0 for s in steps)
    if lab["fault"] == "none":
        assert lab["kind"] is None and lab["onset_step"] is None and lab["fault_params"] == {}
        assert lab.get("effect") is None
        return
    assert lab["kind"] == ("sudden" if lab["fault"] in SUDDEN else "gradual")
    onset = lab["onset_step"]
    assert isinstance(onset, int) and 0.3 * cfg["max_steps"] <= onset <= 0.7 * cfg["max_steps"]
    assert any(s <= onset for s in steps) and any(s > onset for s in steps)
    if lab["kind"] == "gradual":
        assert 30 <= lab["fault_params"]["ramp_steps"] <= 80
    eff = lab["effect"]
    assert eff["visible_metrics"] and eff["expected_visible"] is True  # the fault shows in what was logged
    assert eff["attempt"] >= 1
    for m in eff["metrics"].values():
        assert all(v is None or math.isfinite(v) for v in m.values())


@pytest.mark.parametrize("name", sorted(_labels()) if (RUNS / "labels.json").is_file() else [])
def test_each_run_parses_as_a_file_source(name):
    from rlhf_tui.bridge.monitor.sources import load_file_source

    lab = _labels()[name]
    run = load_file_source(str(RUNS / name)).current_run
    assert run is not None
    steps = list(run.steps)
    assert steps and steps[-1] == lab["steps_logged"]
    names = set(run.metric_names())
    assert {"loss", "grad_norm", "learning_rate"} <= names
    if lab["trainer"] == "DPOTrainer":
        assert "rewards/margins" in names
    else:
        assert {"reward", "rewards/correctness/mean", "rewards/format_ok/mean", "rewards/length_ok/mean"} <= names
