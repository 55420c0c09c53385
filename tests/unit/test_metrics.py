"""Metric-name normalisation for every trainer family of CONTRACT.md."""

import math
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest

from rlhf_tui.bridge.wire.metrics import CANONICAL, is_summary, normalise, summary_values, to_float


def test_grpo_keys_get_canonical_names_and_keep_their_own():
    out = normalise(
        {
            "kl": 0.01,
            "entropy": 2.0,
            "reward": 1.5,
            "reward_std": 0.3,
            "loss": 0.1,
            "clip_ratio/region_mean": 0.0,
            "completions/mean_length": 12.0,
            "grad_norm": 1.2,
            "learning_rate": 1e-5,
            "rewards/my_func/mean": 1.5,
        }
    )
    assert out["clip_ratio"] == 0.0 and out["clip_ratio/region_mean"] == 0.0
    assert out["completion_length"] == 12.0 and out["rewards/my_func/mean"] == 1.5
    assert out["kl"] == 0.01 and out["learning_rate"] == 1e-5


def test_ppo_trl_012_keys():
    out = normalise(
        {
            "objective/kl": 3.0,
            "policy/entropy_avg": 1.1,
            "objective/scores": 0.7,
            "loss/policy_avg": -0.02,
            "loss/value_avg": 0.5,
            "policy/clipfrac_avg": 0.03,
            "lr": 3e-6,
        }
    )
    assert (out["kl"], out["entropy"], out["reward"]) == (3.0, 1.1, 0.7)
    assert (out["policy_loss"], out["value_loss"], out["clip_ratio"], out["learning_rate"]) == (-0.02, 0.5, 0.03, 3e-6)


def test_legacy_ppo_keys():
    out = normalise(
        {
            "objective/kl": 2.0,
            "ppo/loss/policy": 0.1,
            "ppo/loss/value": 0.4,
            "ppo/policy/clipfrac": 0.05,
            "ppo/mean_scores": 1.0,
            "env/reward_mean": 9.0,
            "env/reward_std": 0.2,
            "ppo/policy/entropy": 1.5,
            "ppo/learning_rate": 1e-5,
            "ppo/loss/total": 0.5,
        }
    )
    assert out["reward"] == 1.0  # ppo/mean_scores wins over env/reward_mean
    assert out["value_loss"] == 0.4 and out["clip_ratio"] == 0.05 and out["reward_std"] == 0.2
    assert out["loss"] == 0.5 and out["entropy"] == 1.5 and out["learning_rate"] == 1e-5


def test_dpo_reward_and_online_dpo_keys():
    dpo = normalise({"loss": 0.69, "rewards/margins": 0.2, "rewards/accuracies": 0.6, "entropy": 1.0})
    assert dpo["reward"] == 0.2 and dpo["loss"] == 0.69
    online = normalise({"objective/kl": 1.0, "objective/entropy": 5.0, "objective/scores": 0.3, "rewards/margins": 0.1})
    assert online["kl"] == 1.0 and online["entropy"] == 5.0 and online["reward"] == 0.3
    reward_trainer = normalise({"mean_reward": 0.4, "accuracy": 0.7})
    assert reward_trainer["reward"] == 0.4


def test_none_nan_and_non_numeric_values():
    out = normalise(
        {
            "reward": None,
            "loss": float("nan"),
            "grad_norm": float("inf"),
            "note": "x",
            "kl": "NaN",
            "flag": True,
            "list": [1, 2],
        }
    )
    assert out["reward"] is None and math.isnan(out["loss"]) and out["grad_norm"] == math.inf
    assert math.isnan(out["kl"]) and "note" not in out and "list" not in out
    assert to_float("-Infinity") == -math.inf and to_float("abc") is None


def test_summary_entry_detected():
    assert is_summary({"train_runtime": 3.0, "train_loss": 0.1})
    assert not is_summary({"loss": 0.1})
    assert len(CANONICAL) == 11


def test_numpy_scalars_and_one_element_arrays_are_numbers():
    assert to_float(np.array([1.5])) == 1.5 and to_float(np.array([[2.5]], dtype=np.float32)) == 2.5
    assert to_float(np.array(3.0)) == 3.0 and to_float(np.float32(0.25)) == 0.25 and to_float(np.int64(7)) == 7.0
    assert type(to_float(np.float64(1.0))) is float  # a plain float, not the numpy subclass
    assert math.isnan(to_float(np.array([np.nan]))) and to_float(np.bool_(True)) == 1.0
    assert to_float(np.array([1.0, 2.0])) is None and to_float(np.array([])) is None
    assert to_float(np.array(["a"])) is None and to_float([1.5]) is None


def test_tensors_decimals_fractions_and_huge_ints():
    torch = pytest.importorskip("torch")
    assert to_float(torch.tensor(1.5)) == 1.5 and to_float(torch.tensor([0.5])) == 0.5
    assert to_float(torch.tensor([1.0, 2.0])) is None
    assert to_float(Decimal("1.25")) == 1.25 and to_float(Fraction(1, 4)) == 0.25
    assert to_float(Decimal("sNaN")) is None and to_float(10**400) is None and to_float(3) == 3.0
    out = normalise({"loss": torch.tensor(0.5), "kl": np.array([0.1]), "reward": Decimal("2"), "x": np.ones(3)})
    assert out == {"loss": 0.5, "kl": 0.1, "reward": 2.0}


def test_legacy_response_length_is_the_completion_length():
    out = normalise({"tokens/responses_len_mean": 17.0, "tokens/queries_len_mean": 9.0})
    assert out["completion_length"] == 17.0 and out["tokens/responses_len_mean"] == 17.0
    assert normalise({"completions/mean_length": 3.0, "tokens/responses_len_mean": 17.0})["completion_length"] == 3.0


def test_summary_values_keep_numbers_of_any_kind():
    torch = pytest.importorskip("torch")
    logs = {
        "train_runtime": np.float64(3.5),
        "train_loss": torch.tensor(0.25),
        "total_flos": 123,
        "step": 4,
        "bad": float("nan"),
        "note": "x" * 300,
        "epoch": 1.0,
    }
    out = summary_values(logs)
    assert out == {"train_runtime": 3.5, "train_loss": 0.25, "total_flos": 123, "note": "x" * 200, "epoch": 1.0}
    assert type(out["train_runtime"]) is float and len(summary_values({f"k{i}": i for i in range(100)})) == 64
