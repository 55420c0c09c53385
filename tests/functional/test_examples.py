"""The four examples of the TRL integration guide, run as a user runs them (`python examples/X.py --fast`):
offline on the tiny model they build themselves, exit code 0, and they print what the guide says they show."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, free_address

pytestmark = pytest.mark.slow
EXAMPLES = REPO / "examples"


@pytest.fixture(scope="module")
def example_env(tmp_path_factory):
    """Offline, the tiny model cached in a temp dir (built by the first example, reused by the others), one
    torch thread (the tiny model is overhead-bound)."""
    cache = tmp_path_factory.mktemp("xdg-cache")
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        XDG_CACHE_HOME=str(cache),
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONWARNINGS="ignore",
    )
    return env


def run_example(name: str, env: dict, tmp_path, *args: str) -> str:
    env = dict(env, RLHF_TUI_ADDRESS=free_address())
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--fast", "--workdir", str(tmp_path), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_trl_integration_example(example_env, tmp_path):
    out = run_example("trl_integration_example.py", example_env, tmp_path)
    assert "cliprange" in out and "-> epsilon = 0.2" in out  # the mapping it prints
    assert "steps completed: 8" in out
    assert re.search(r"final metrics: reward=\S+, reward_std=\S+, kl=\S+, entropy=", out)
    assert re.search(r"step 4: health_score=[01]", out) and re.search(r"step 8: health_score=[01]", out)
    assert re.search(r"reward reliability: stability=[\d.]+, consistency=[\d.]+", out)
    for phase in ("generation", "reward", "scoring", "optimisation"):
        assert re.search(rf"^  {phase}\s+[\d.]+ms", out, re.M), phase
    assert "time/generation_s=" in out and "rlhf-tui report" in out
    log = re.search(r"^log: (\S+)$", out, re.M).group(1)
    assert os.path.isfile(log)


def test_trl_integration_example_rloo_with_a_given_model(example_env, tmp_path, tiny_model):
    out = run_example(
        "trl_integration_example.py",
        example_env,
        tmp_path,
        "--algorithm",
        "rloo",
        "--model",
        tiny_model,
        "--steps",
        "4",
    )
    assert "training RLOOTrainer for 4 steps" in out and "steps completed: 4" in out


def test_ppo_monitoring_demo(example_env, tmp_path):
    out = run_example("ppo_monitoring_demo.py", example_env, tmp_path)
    assert out.count("ppo/loss/policy=") == 8
    for name in (
        "kl_div",
        "policy_loss",
        "value_loss",
        "reward",
        "clip_ratio",
        "entropy",
        "kl_policy_ratio",
        "value_policy_ratio",
    ):
        assert re.search(rf"^  {name}\s+-?[\d.e+-]+$", out, re.M), name
    assert "== trend analysis ==" in out
    assert re.search(r"^  kl_div\s+(increasing|decreasing|stable)$", out, re.M)
    assert "epoch 0 (steps 1-4)" in out and "epoch 1 (steps 5-8)" in out
    assert re.search(r"kl_div\s+mean=\S+ std=\S+ min=\S+ max=\S+ trend=", out)


def test_checkpoint_analysis_demo(example_env, tmp_path):
    out = run_example("checkpoint_analysis_demo.py", example_env, tmp_path)
    assert "Health Score:" in out and "Issues:" in out and "Recommendations:" in out
    assert "Drift from reference:" in out and "Training state: learning_rate=" in out
    assert "NaN values" in out and "exploding weights" in out
    scores = json.loads(re.search(r"^health scores: (\{.*\})$", out, re.M).group(1))
    assert scores["healthy"] > 0.9 and scores["damaged"] < 0.5


def test_reward_model_demo(example_env, tmp_path):
    out = run_example("reward_model_demo.py", example_env, tmp_path)
    assert "Stability: 1.00" in out and "Consistency: 1.00" in out  # the guide's own batch
    hacked = [line for line in out.splitlines() if re.match(r"^\s*\d+ hacked ", line)]
    assert len(hacked) == 3
    assert any("reward_zscore" in line for line in hacked)  # the jump is flagged
    healthy = [line for line in out.splitlines() if re.match(r"^\s*\d+ healthy ", line)]
    assert healthy and not any(sev in line for line in healthy for sev in ("high", "critical"))  # healthy: no alarm
    assert "Recommendations (during the run):" in out and "reward hacking" in out
