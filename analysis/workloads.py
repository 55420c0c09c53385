"""What kind of run a history is (RL, preference, reward model, language model), the metric order each kind
shows first and the metrics of its "reward" block; `eval_` metrics paired with their training twins. Pure
standard library.

The kind comes from the trainer class (the run's meta), else from the metric names it logs, so a custom loop
or a trainer_state.json gets the right view too.
"""

from __future__ import annotations

from collections.abc import Iterable

RL = "rl"  # GRPO, RLOO, OnlineDPO, PPO, custom loops with PPO keys: rewards, KL, entropy, clipping
PREFERENCE = "preference"  # DPO, KTO, CPO, ORPO: implicit rewards of chosen vs rejected completions
REWARD_MODEL = "reward_model"  # RewardTrainer: accuracy and margin of the pairwise ranking
LANGUAGE_MODEL = "language_model"  # SFT and plain Trainer: loss, eval loss, token accuracy, tokens/s
KINDS = (RL, PREFERENCE, REWARD_MODEL, LANGUAGE_MODEL)

TRAINER_KINDS = {
    "GRPOTrainer": RL,
    "RLOOTrainer": RL,
    "OnlineDPOTrainer": RL,
    "PPOTrainer": RL,
    "PPOv2Trainer": RL,
    "GRPOTrainer/RLOOTrainer": RL,
    "XPOTrainer": RL,
    "NashMDTrainer": RL,
    "DPOTrainer": PREFERENCE,
    "KTOTrainer": PREFERENCE,
    "CPOTrainer": PREFERENCE,
    "ORPOTrainer": PREFERENCE,
    "BCOTrainer": PREFERENCE,
    "RewardTrainer": REWARD_MODEL,
    "PRMTrainer": REWARD_MODEL,
    "SFTTrainer": LANGUAGE_MODEL,
    "Trainer": LANGUAGE_MODEL,
    "Seq2SeqTrainer": LANGUAGE_MODEL,
    "GKDTrainer": LANGUAGE_MODEL,
}

# The canonical names (CONTRACT.md) in the order an RL run shows them.
RL_ORDER = (
    "reward",
    "reward_std",
    "kl",
    "entropy",
    "loss",
    "policy_loss",
    "value_loss",
    "clip_ratio",
    "grad_norm",
    "learning_rate",
    "completion_length",
)
# The "reward" block of each other kind (its Rewards pane and the top of its Metrics pane), then the rest of the
# head of its Metrics pane.
BLOCKS: dict[str, tuple[str, ...]] = {
    PREFERENCE: (
        "rewards/accuracies",
        "rewards/margins",
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
    ),
    REWARD_MODEL: ("accuracy", "margin", "mean_reward", "min_reward", "max_reward"),
    LANGUAGE_MODEL: ("loss", "mean_token_accuracy", "entropy", "tokens/s", "num_tokens"),
}
HEADS: dict[str, tuple[str, ...]] = {
    RL: RL_ORDER,
    PREFERENCE: (*BLOCKS[PREFERENCE], "loss", "kl", "entropy", "reward", "grad_norm", "learning_rate"),
    REWARD_MODEL: (*BLOCKS[REWARD_MODEL], "loss", "reward", "grad_norm", "learning_rate"),
    LANGUAGE_MODEL: (*BLOCKS[LANGUAGE_MODEL], "grad_norm", "learning_rate"),
}
EVAL_PREFIX = "eval_"
# Keys of an evaluation that are bookkeeping, not a measurement with a training twin.
EVAL_BOOKKEEPING = frozenset({"runtime", "samples_per_second", "steps_per_second", "num_tokens"})

_RL_KEYS = ("objective/scores", "objective/rlhf_reward", "ppo/mean_scores", "frac_reward_zero_std", "reward_std")
_RL_PREFIXES = ("ppo/", "completions/", "clip_ratio/", "policy/", "env/")


def workload_kind(trainer: str | None, names: Iterable[str]) -> str:
    """The kind of a run: from its trainer class when known (a suffix such as `MyGRPOTrainer` counts), else
    from the keys it logs; a run with nothing to tell is RL (the view this monitor has always shown)."""
    name = str(trainer or "")
    if name in TRAINER_KINDS:
        return TRAINER_KINDS[name]
    for known in sorted(TRAINER_KINDS, key=len, reverse=True):  # a subclass named after its base
        if known != "Trainer" and name.endswith(known):
            return TRAINER_KINDS[known]
    present = set(names)
    if any(k in present for k in _RL_KEYS) or any(n.startswith(_RL_PREFIXES) for n in present):
        return RL
    if {"rewards/chosen", "rewards/rejected"} <= present or "rewards/accuracies" in present:
        return PREFERENCE
    if {"accuracy", "margin"} <= present:
        return REWARD_MODEL
    if name in ("custom", "unknown", "") and not ({"kl", "reward", "entropy"} & present) and "loss" in present:
        return LANGUAGE_MODEL
    return RL


def eval_twin(name: str, names: Iterable[str]) -> str | None:
    """The training metric an `eval_` metric pairs with (`eval_loss` → `loss`), or None."""
    if not name.startswith(EVAL_PREFIX):
        return None
    base = name[len(EVAL_PREFIX) :]
    if not base or base in EVAL_BOOKKEEPING:
        return None
    return base if base in set(names) else None


def eval_pairs(names: Iterable[str]) -> list[tuple[str, str]]:
    """(training metric, eval metric) for every eval metric with a training twin, in name order."""
    names = list(names)
    present = set(names)
    return sorted((twin, n) for n in present if (twin := eval_twin(n, present)) is not None)


def ordered_metrics(names: Iterable[str], kind: str = RL) -> list[str]:
    """Display order: the kind's head (its reward block first), then every other name alphabetically; each
    `eval_` metric right after its training twin."""
    names = list(dict.fromkeys(names))
    present = set(names)
    twins = {n: t for n in names if (t := eval_twin(n, present)) is not None}
    after: dict[str, list[str]] = {}
    for eval_name, twin in sorted(twins.items()):
        after.setdefault(twin, []).append(eval_name)
    head = [n for n in HEADS.get(kind, RL_ORDER) if n in present]
    rest = sorted(n for n in names if n not in set(head) and n not in twins)
    out: list[str] = []
    for name in head + rest:
        out.append(name)
        out.extend(after.get(name, ()))
    return out
