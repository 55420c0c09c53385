"""Every detector as one record: what it means, the series it reads, its settings, severities and its words.

The rule that raises a detector's flags lives in `rules.py`; everything else about a detector is here, so the
engine, the report and the monitor's threshold keys all read the same record.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from rlhf_tui.analysis.severity import Severity

LOW, MEDIUM, HIGH, CRITICAL = Severity.LOW, Severity.MEDIUM, Severity.HIGH, Severity.CRITICAL
Words = tuple[str, str]  # (message, recommendation)


def fmt(v: float | None) -> str:
    return "n/a" if v is None or v != v else f"{v:.4g}"


@dataclass(frozen=True)
class Detector:
    """One detector. `settings[0]` is the threshold the monitor's +/- keys move for its anomalies; `series` are
    metric names (or glob patterns) whose row-level values its rule reads; `words(metric, value, score)` gives
    the message and the recommendation of an episode at its final severity."""

    name: str
    means: str
    series: tuple[str, ...]
    settings: tuple[str, ...]
    severities: tuple[Severity, ...]
    words: Callable[[str, float | None, float], Words]
    block_medians: bool = False  # the rule reads the series' block medians (not only its rows)

    def reads(self, metric: str) -> bool:
        return any(fnmatch.fnmatchcase(metric, pattern) for pattern in self.series)


def _fixed(message: str, recommendation: str) -> Callable[[str, float | None, float], Words]:
    """Words that say the same whatever the values: `message` may name {metric} and {v} (the value)."""
    return lambda metric, value, score: (message.format(metric=metric, v=fmt(value)), recommendation)


ZSCORE_ADVICE = "usually noise; look at the metric's chart if it repeats"
SPIKE_ADVICE = "isolated spikes are common; watch whether they repeat"


def zscore_message(metric: str, value: float | None, score: float) -> str:
    # Past ~1000 spreads the number says nothing more (the recent spread was ~0); keep the line readable.
    size = f"{abs(score):.1f}" if abs(score) < 1000 else "over 1000"
    return f"{metric} = {value:.4g} is {size} spreads {'above' if score >= 0 else 'below'} its recent level"


def _reward_shift(metric: str, value: float | None, score: float) -> Words:
    if score >= 0:
        return (
            f"{metric} is climbing abnormally fast ({fmt(value)})",
            "inspect sample completions for reward hacking; check the reward function and KL beta",
        )
    return (
        f"{metric} dropped abruptly ({fmt(value)})",
        "check the reward function/model for errors, NaN or noise; check the learning rate",
    )


def _no_signal(metric: str, value: float | None, score: float) -> Words:
    if metric == "frac_reward_zero_std":
        return (
            f"no learning signal: {fmt(value)} of prompt groups have identical rewards",
            "raise temperature / num_generations, check the reward function is not constant or NaN",
        )
    return (
        f"no learning signal: {metric} collapsed to {fmt(value)}",
        "rewards no longer differ within groups: check the reward function, temperature and data",
    )


_RECORDS = (
    Detector(
        "nonfinite",
        "NaN/Inf/None where a value was logged (critical)",
        (),
        (),
        (CRITICAL,),
        _fixed(
            "{metric} is NaN/Inf/None where a value was expected",
            "check the reward functions and the loss for NaN (division by zero, log of 0, empty groups); "
            "lower the learning rate or enable gradient clipping if the loss diverged",
        ),
    ),
    Detector(
        "zscore",
        "robust rolling z-score against the trailing baseline, any metric (low)",
        (),
        ("anomaly_threshold", "fraction_floor"),
        (LOW,),
        lambda metric, value, score: (zscore_message(metric, value, score), ZSCORE_ADVICE),
    ),
    Detector(
        "kl_spike",
        "isolated KL spike far above its typical level (low)",
        ("kl",),
        ("kl_spike_factor", "kl_floor"),
        (LOW,),
        lambda metric, value, score: (
            f"isolated KL spike: kl = {fmt(value)}, {score:.0f}x its typical level",
            "single spikes are common on small models; watch whether it persists",
        ),
    ),
    Detector(
        "kl_runaway",
        "KL held far above its baseline for k of the last n steps (medium/high)",
        ("kl",),
        ("kl_runaway_factor", "kl_runaway_high", "kl_floor", "persist_k", "persist_n"),
        (MEDIUM, HIGH),
        lambda metric, value, score: (
            f"KL is running away: kl = {fmt(value)}, held {score:.0f}x above its baseline",
            "lower the learning rate, raise the KL coefficient (beta) or check the reference model; "
            "roll back to the last good checkpoint if it keeps rising",
        ),
    ),
    Detector(
        "entropy_collapse",
        "entropy fallen by most of its early level (medium/high)",
        ("entropy",),
        ("entropy_collapse_frac", "entropy_collapse_high", "early_steps", "recent_steps"),
        (MEDIUM, HIGH),
        lambda metric, value, score: (
            f"entropy collapsed: {fmt(value)}, {100 * score:.0f}% below its early level",
            "the policy became (near) deterministic: raise the temperature or an entropy bonus, lower the "
            "learning rate, check for reward hacking",
        ),
    ),
    Detector(
        "reward_shift",
        "reward level dropping, climbing far faster than learning goes, or its spread jumping (medium)",
        ("reward", "reward_std", "rewards/*/mean"),
        ("shift_h", "climb_h", "shift_kref", "rise_kref", "rise_h", "shift_clip"),
        (MEDIUM,),
        _reward_shift,
    ),
    Detector(
        "reward_scale",
        "reward or reward_std scale jump, held 2 of 3 steps (high)",
        ("reward", "reward_std"),
        ("reward_scale_factor", "reward_scale_z"),
        (HIGH,),
        lambda metric, value, score: (
            f"reward scale jumped: {metric} = {fmt(value)} ({fmt(score)}x / spreads from its baseline)",
            "check reward normalisation and the reward model output scale",
        ),
    ),
    Detector(
        "reward_dead",
        "a reward function's per-batch spread exactly 0 for k of the last n steps after it varied (high)",
        ("rewards/*/std",),
        ("persist_k", "persist_n", "early_steps"),
        (HIGH,),
        _fixed(
            "{metric} is exactly 0: the reward function returns one value for every completion",
            "check the reward function (a crashed reward model, a parser that always fails, a constant "
            "fallback); its signal is gone",
        ),
    ),
    Detector(
        "reward_mismatch",
        "reward no longer equals the sum of per-function means: NaN rewards dropped (high)",
        ("reward", "rewards/*/mean"),
        ("reward_mismatch_tol", "early_steps"),
        (HIGH,),
        lambda metric, value, score: (
            f"reward no longer equals the sum of the per-function rewards (difference {fmt(score)})",
            "a reward function returned NaN/None for part of the batch and TRL dropped it: fix the reward function",
        ),
    ),
    Detector(
        "reward_hacking",
        "reward climbing fast while lengths hit the limit, entropy falls or KL runs away (high)",
        ("reward", "kl", "entropy", "completions/clipped_ratio", "completion_length"),
        ("hack_clipped_ratio", "hack_window", "hack_entropy_drop", "hack_length_frac", "rise_h"),
        (HIGH,),
        lambda metric, value, score: (
            f"reward hacking signature: reward climbing fast ({fmt(value)}) with lengths at the limit, entropy "
            f"falling or KL rising",
            "read sample completions; add length penalties, raise KL beta, fix the exploitable reward",
        ),
    ),
    # Per reward function, batch by batch: raised by analysis/reward_episodes.py from the reward streams (not by a
    # rule of rules.py); `metric` is the function's TRL key, rewards/<name>/mean or /std.
    Detector(
        "reward_zscore",
        "one reward function's batch mean far from its recent batches (medium/high/critical)",
        (),
        ("reward_batch_z",),
        (MEDIUM, HIGH, CRITICAL),
        lambda metric, value, score: (
            f"{metric} {'jumped' if score >= 0 else 'dropped'} to {fmt(value)}, {abs(score):.1f} spreads from "
            f"its recent batches",
            "read this batch's sample completions: a sudden change of one reward function often means reward "
            "hacking or a bug in that function",
        ),
    ),
    Detector(
        "reward_level_shift",
        "one reward function settled at a new level after a jump (low)",
        (),
        ("reward_batch_z",),
        (LOW,),
        _fixed("{metric} stays at its new level {v}: new baseline", "check the samples if the change was not expected"),
    ),
    Detector(
        "reward_scale_jump",
        "one reward function's spread or magnitude jumped by an order of magnitude (high)",
        (),
        ("reward_scale_factor",),
        (HIGH,),
        lambda metric, value, score: (
            f"{metric} scale jumped x{score:.0f} ({fmt(value)})",
            "normalise or clip this reward; check the function for a unit or parsing bug",
        ),
    ),
    Detector(
        "reward_constant",
        "one reward function returns the same score for every completion (medium)",
        (),
        ("reward_std_collapse", "persist_k", "persist_n"),
        (MEDIUM,),
        _fixed(
            "{metric}: every completion gets the same score ({v}): this function gives no learning signal",
            "check the function is not stuck (a caught exception returning a default, a parse that always fails) "
            "or grade it more finely",
        ),
    ),
    Detector(
        "reward_invalid",
        "None/NaN/Inf scores from one reward function (medium/high/critical)",
        (),
        ("reward_invalid_high",),
        (MEDIUM, HIGH, CRITICAL),
        lambda metric, value, score: (
            f"{metric}: {100 * (value or 0):.0f}% of the batch's scores are None, NaN or Inf",
            "make the function return a finite float for every completion: None/NaN scores are dropped from the "
            "update and bias the advantage",
        ),
    ),
    Detector(
        "reward_empty",
        "a reward function returned no scores for a batch (medium)",
        (),
        ("reward_invalid_high",),
        (MEDIUM,),
        _fixed("{metric}: the function returned no scores for a batch", "return one float per completion"),
    ),
    Detector(
        "reward_saturation",
        "one reward function's scores pile up at a bound (medium/high)",
        (),
        ("reward_saturation_share", "persist_n"),
        (MEDIUM, HIGH),
        lambda metric, value, score: (
            f"{metric}: {100 * (value or 0):.0f}% of the scores sit at a bound seen so far",
            "the task may be too easy or the reward clipped: check samples for reward hacking, grade the reward",
        ),
    ),
    Detector(
        "reward_drift",
        "one reward function's score distribution moved away from its early run (low/medium)",
        (),
        ("reward_drift_psi",),
        (LOW, MEDIUM),
        lambda metric, value, score: (
            f"{metric}: score distribution shifted from the early run (PSI {fmt(value)})",
            "expected while the policy improves; check samples for reward hacking if the shift is sudden",
        ),
    ),
    Detector(
        "reward_zero_spread",
        "one reward function ties every completion of most GRPO groups (medium)",
        (),
        ("no_signal_frac", "persist_n"),
        (MEDIUM,),
        lambda metric, value, score: (
            f"{metric}: {100 * (value or 0):.0f}% of GRPO groups got one score for every completion",
            "this function gives (almost) no signal within groups: raise num_generations or the temperature, "
            "or grade it more finely",
        ),
    ),
    Detector(
        "no_learning_signal",
        "frac_reward_zero_std jumping or near 1 / reward_std collapsing (medium/high); defers to groups_too_easy / "
        "groups_too_hard where most groups are solved or hopeless",
        ("frac_reward_zero_std", "reward_std", "groups/too_easy", "groups/too_hard"),
        ("no_signal_frac", "no_signal_jump", "reward_std_collapse", "recent_steps"),
        (MEDIUM, HIGH),
        _no_signal,
    ),
    # From the prompt-group split of the reward batches (analysis/groups.py); where it explains a
    # no_learning_signal alarm it takes it over, at its severity (rules.learning_signal).
    Detector(
        "groups_too_easy",
        "most prompt groups all at the run's best reward: solved, no gradient from them (medium; high where "
        "no_learning_signal would be)",
        ("groups/too_easy",),
        ("groups_flat_frac", "recent_steps"),
        (MEDIUM, HIGH),
        lambda metric, value, score: (
            f"{100 * score:.0f}% of prompt groups are all-correct: the task is solved at this difficulty, GRPO gets "
            "no gradient from them",
            "raise the difficulty or filter out solved prompts (or grade the reward more finely)",
        ),
    ),
    Detector(
        "groups_too_hard",
        "most prompt groups all at the run's worst reward: hopeless, no gradient from them (medium; high where "
        "no_learning_signal would be)",
        ("groups/too_hard",),
        ("groups_flat_frac", "recent_steps"),
        (MEDIUM, HIGH),
        lambda metric, value, score: (
            f"{100 * score:.0f}% of prompt groups are all-wrong: too hard, GRPO gets no gradient from them",
            "use a curriculum or easier prompts, or a denser (partial-credit) reward",
        ),
    ),
    Detector(
        "reward_noise",
        "prompt groups that often had identical rewards no longer ever do: the rewards turned noisy (medium)",
        ("frac_reward_zero_std",),
        ("no_signal_jump", "recent_steps"),
        (MEDIUM,),
        lambda metric, value, score: (
            f"rewards turned noisy: no prompt group has identical rewards any more (before: {fmt(score)} did)",
            "a reward model or function drifting to noise: check its scores on fixed completions, its inputs "
            "and any randomness in it",
        ),
    ),
    Detector(
        "policy_shift",
        "abrupt rise of entropy (medium)",
        ("entropy", "completion_length"),
        ("rise_h", "rise_kref", "shift_clip"),
        (MEDIUM,),
        _fixed(
            "{metric} rose abruptly ({v}): the policy changed suddenly",
            "check the learning rate and the last update; compare sample completions",
        ),
    ),
    Detector(
        "grad_norm_spike",
        "isolated grad_norm spike (low)",
        ("grad_norm",),
        ("spike_z",),
        (LOW,),
        _fixed("grad_norm spike ({v})", SPIKE_ADVICE),
    ),
    Detector(
        "grad_norm_shift",
        "grad_norm held far above its baseline for k of the last n steps (medium)",
        ("grad_norm",),
        ("grad_norm_factor", "persist_k", "persist_n"),
        (MEDIUM,),
        lambda metric, value, score: (
            f"grad_norm held far above its baseline ({fmt(value)}, {score:.1f}x)",
            "lower the learning rate or tighten max_grad_norm; check for bad batches",
        ),
    ),
    Detector(
        "loss_spike",
        "isolated loss spike (low)",
        ("loss", "policy_loss"),
        ("spike_z",),
        (LOW,),
        _fixed("{metric} spike ({v})", SPIKE_ADVICE),
    ),
    Detector(
        "loss_shift",
        "loss held far from its baseline for k of the last n steps (medium)",
        ("loss", "policy_loss"),
        ("loss_persist_z", "persist_k", "persist_n"),
        (MEDIUM,),
        _fixed(
            "{metric} held far from its baseline ({v})",
            "check the learning rate, the data and the reward/preference labels",
        ),
    ),
    Detector(
        "value_loss_blowup",
        "PPO value loss many times its level (high)",
        ("value_loss",),
        ("value_loss_factor", "persist_k", "persist_n"),
        (HIGH,),
        lambda metric, value, score: (
            f"value loss blew up ({fmt(value)}, {score:.0f}x its level)",
            "lower the value learning rate / vf_coef, clip values, check reward scale",
        ),
    ),
    Detector(
        "clip_ratio",
        "clip fraction too high while training off-policy (medium)",
        ("clip_ratio",),
        ("clip_ratio_high", "recent_steps"),
        (MEDIUM,),
        _fixed(
            "clip fraction too high ({v}) while training off-policy",
            "updates are too large: lower the learning rate or num_iterations / ppo_epochs",
        ),
    ),
    Detector(
        "lr_jump",
        "learning rate jumped up in one step above its earlier peak (medium; a scheduler restart is not)",
        ("learning_rate",),
        ("lr_jump_factor",),
        (MEDIUM,),
        lambda metric, value, score: (
            f"learning rate jumped {score:.0f}x in one step ({fmt(value)})",
            "check the scheduler and any manual learning-rate changes",
        ),
    ),
    Detector(
        "dpo_accuracy_drop",
        "DPO preference accuracy fell from its plateau (medium/high)",
        ("rewards/accuracies",),
        ("dpo_accuracy_drop",),
        (MEDIUM, HIGH),
        _fixed(
            "DPO accuracy fell from its plateau ({v})",
            "check the preference labels (chosen/rejected swapped?) and the data pipeline",
        ),
    ),
    Detector(
        "dpo_accuracy_pinned",
        "DPO accuracy pinned at 1.0 early (low)",
        ("rewards/accuracies",),
        ("dpo_pinned_steps",),
        (LOW,),
        _fixed("DPO accuracy pinned at 1.0 early", "pairs may be too easy or leaked; check the dataset and beta"),
    ),
    Detector(
        "dpo_margin_explosion",
        "DPO reward margins exploding (medium)",
        ("rewards/margins",),
        ("dpo_margin_factor", "persist_k", "persist_n"),
        (MEDIUM,),
        _fixed("DPO margins exploding ({v})", "raise beta or lower the learning rate; check for degenerate pairs"),
    ),
    Detector(
        "dpo_logps_falling",
        "DPO chosen and rejected log-probs both falling (low: common in healthy DPO too)",
        ("logps/chosen", "logps/rejected"),
        ("shift_h", "shift_kref", "shift_clip"),
        (LOW,),
        _fixed(
            "chosen and rejected log-probs are both falling",
            "likelihood displacement: lower the learning rate, add an SFT term (rpo_alpha) or raise beta",
        ),
    ),
    Detector(
        "dpo_loss",
        "DPO loss back above ln 2: the policy prefers rejected answers (medium)",
        ("loss",),
        ("dpo_loss_margin", "recent_steps"),
        (MEDIUM,),
        _fixed(
            "DPO loss back above ln 2 ({v}): the policy now prefers rejected answers",
            "check the preference labels and the learning rate",
        ),
    ),
    Detector(
        "memory_leak",
        "steady growth of RSS or GPU memory (medium/high)",
        ("memory/rss_mb", "memory/gpu_mb"),
        ("memory_leak_frac", "memory_leak_blocks"),
        (MEDIUM, HIGH),
        lambda metric, value, score: (
            f"{metric} is growing steadily (+{100 * score:.0f}% over the leak window)",
            "look for tensors kept across steps (logging, lists of losses), caches, or growing batches",
        ),
        block_medians=True,
    ),
    Detector(
        "sampling_mismatch",
        "the sampler's (vLLM) token log-probs drift from the trainer's: sampling/sampling_logp_difference above its "
        "reference level (0.01; high at 10x), or the importance-sampling ratio's mean off 1",
        (
            "sampling/sampling_logp_difference/mean",
            "training/rollout_probs_diff_mean",
            "sampling/importance_sampling_ratio/mean",
        ),
        ("sampling_difference", "sampling_is_band"),
        (MEDIUM, HIGH),
        lambda metric, value, score: (
            (
                f"sampling and training disagree: {metric} = {fmt(value)}"
                if metric.endswith("ratio/mean")
                else f"sampling and training disagree: {metric} = {fmt(value)} ({score:.1f}x the 0.01 reference)"
            ),
            "an inference-precision problem: match vLLM's dtype to training's, check the weight sync to vLLM each "
            "step; keep vllm_importance_sampling_correction on",
        ),
    ),
    Detector(
        "truncation",
        "most completions hit max_completion_length (completions/clipped_ratio held at or above 0.9; low: a note)",
        ("completions/clipped_ratio",),
        ("truncation_ratio", "persist_n", "persist_k"),
        (LOW,),
        lambda metric, value, score: (
            f"{100 * (value or 0):.0f}% of completions are cut at max_completion_length: the length limit shapes "
            "the reward",
            "raise max_completion_length, or penalise length in the reward; check completions for padding or loops",
        ),
    ),
    Detector(
        "memory_near_oom",
        "device memory above 90% (high/critical)",
        ("memory/gpu_frac",),
        ("gpu_frac_high", "gpu_frac_critical"),
        (HIGH, CRITICAL),
        lambda metric, value, score: (
            f"device memory at {100 * (value or 0):.0f}% of capacity: close to out-of-memory",
            "lower batch size / max_completion_length, enable gradient checkpointing",
        ),
    ),
    Detector(
        "step_time_regression",
        "step time regressed against its baseline, eval rows left out (low: a system finding)",
        ("step_time", "time/step_s"),
        ("step_time_factor", "recent_steps"),
        (LOW,),
        lambda metric, value, score: (
            f"step time regressed ({fmt(value)}s, {score:.1f}x its baseline)",
            "check for longer completions, throttling, memory pressure or other jobs on the machine",
        ),
    ),
)

REGISTRY: dict[str, Detector] = {d.name: d for d in _RECORDS}
DETECTORS: dict[str, str] = {d.name: d.means for d in _RECORDS}  # name -> what it means (kept for callers)


def describe(detector: str, metric: str, value: float | None, score: float) -> Words:
    """(message, recommendation) in plain words for one episode."""
    record = REGISTRY.get(detector)
    if record is None:
        return (f"{detector} on {metric} ({fmt(value)})", "inspect the metric")
    return record.words(metric, value, score)


@functools.lru_cache(maxsize=1)
def _any_series() -> re.Pattern[str]:
    """Every record's series patterns as one expression (one match a name, not one per pattern and record:
    a run's first pass with new metric names asked fnmatch ~3,000 times)."""
    patterns = sorted({p for d in _RECORDS for p in d.series})
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


def series_wanted(names: Iterable[str]) -> set[str]:
    """Metrics some detector's rule reads row by row (the others stay block-level in the engine)."""
    match = _any_series().match
    return {n for n in names if match(n)}


def block_median_series() -> frozenset[str]:
    """Series whose block medians a rule reads (kept in the cache with the baselines)."""
    return frozenset(s for d in _RECORDS if d.block_medians for s in d.series)


def setting_of(detector: str | None) -> str:
    """The threshold the +/- keys move for an anomaly of `detector` (the z-score threshold when it has none)."""
    record = REGISTRY.get(detector or "")
    return record.settings[0] if record is not None and record.settings else "anomaly_threshold"
