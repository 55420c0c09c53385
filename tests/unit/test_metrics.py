"""Metric-name normalisation for every trainer family of CONTRACT.md."""

import math

from rlhf_tui.bridge.wire.metrics import CANONICAL, is_summary, normalise, to_float


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
