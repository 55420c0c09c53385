"""DetectionCache and evaluate(): reused baselines must give exactly what a fresh pass gives, and the monitor's
bounded episode list must be the newest ones with exact counts."""

from __future__ import annotations

import inspect
import re

import numpy as np
import pytest
from conftest import grpo_run

from rlhf_tui.analysis.detectors import DetectionCache, detect, engine, evaluate, records, rules
from rlhf_tui.analysis.detectors.registry import series_wanted
from rlhf_tui.analysis.store import RunHistory
from rlhf_tui.analysis.thresholds import Thresholds

META = {"trainer": "GRPOTrainer"}


def faulty_run(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    m = grpo_run(n, seed)
    m = {k: v.copy() for k, v in m.items()}
    m["kl"][n // 2 :] *= 60  # runaway half way
    m["reward"][n // 3] = np.nan  # a NaN reward
    m["memory/rss_mb"] = 2000 + np.arange(n) * 3.0
    m["memory/gpu_frac"] = np.r_[np.full(n - 5, 0.5), np.full(5, 0.95)]
    return m


def grow(history: RunHistory, metrics: dict, start: int, stop: int) -> None:
    for i in range(start, stop):
        history.add_step(i + 1, {k: (None if np.isnan(v[i]) else float(v[i])) for k, v in metrics.items()})


def fresh(history: RunHistory, th: Thresholds | None = None) -> list[dict]:
    th = th or Thresholds()
    return detect(history, th)


def test_cached_passes_equal_fresh_passes_while_a_history_grows_and_thresholds_change():
    m = faulty_run(640, seed=3)
    hist = RunHistory("r")
    hist.meta.update(META)
    cache = DetectionCache()
    th = Thresholds()
    reused = []
    for stop in (37, 120, 121, 333, 500, 640):
        grow(hist, m, hist.rows, stop)
        assert detect(hist, th, cache=cache) == fresh(hist, th)
        reused.append(cache.reused_blocks)
        th2 = th.replace(anomaly_threshold=2.5, kl_runaway_factor=30.0)
        assert detect(hist, th2, cache=cache) == fresh(hist, th2)
    # every pass after the first reuses all but the newest blocks
    assert reused[0] == 0 and all(r > 0 for r in reused[1:])
    assert reused[-1] == (500 - 1) // 10 + 1
    assert any(e["severity"] in ("high", "critical") for e in fresh(hist))


def test_cache_notices_a_merged_last_row_a_rewritten_early_row_and_thinning():
    m = faulty_run(400, seed=1)
    hist = RunHistory("r", capacity=256)
    cache = DetectionCache()
    grow(hist, m, 0, 200)
    detect(hist, cache=cache)
    hist.add_step(200, {"kl": 50.0, "entropy": 0.0})  # same step again: merged into the last row
    assert detect(hist, cache=cache) == fresh(hist)
    hist.columns["grad_norm"].values[100:140] *= 50.0  # early rows changed behind the cache's back
    assert detect(hist, cache=cache) == fresh(hist)
    assert any(e["metric"] == "grad_norm" and e["detector"] == "grad_norm_shift" for e in fresh(hist))
    grow(hist, m, 200, 400)  # past capacity: the older half is thinned
    assert hist.thinned > 0
    assert detect(hist, cache=cache) == fresh(hist)


def test_cache_follows_new_metrics_other_runs_and_block_settings():
    a, b = faulty_run(300, seed=4), faulty_run(300, seed=5)
    cache = DetectionCache()
    steps = np.arange(1, 301)
    first = {k: v for k, v in a.items() if k != "grad_norm"}
    detect((steps, first, None, META), cache=cache)
    assert detect((steps, a, None, META), cache=cache) == detect((steps, a, None, META))  # a metric appeared
    assert detect((steps, b, None, META), cache=cache) == detect((steps, b, None, META))  # same steps, other run
    th = Thresholds().replace(block_steps=7, baseline_blocks=3, min_history=12)
    assert detect((steps, b, None, META), th, cache=cache) == detect((steps, b, None, META), th)
    assert cache.reused_blocks == 0


def test_the_zscore_keys_and_muting_rerun_the_domain_rules_on_the_newest_rows_only_and_other_settings_on_all():
    m = faulty_run(500, seed=6)
    hist = RunHistory("r")
    hist.meta.update(META)
    grow(hist, m, 0, 500)
    cache = DetectionCache()
    th = Thresholds()
    detect(hist, th, cache=cache)
    assert cache.rows_read == 500
    for changed in (
        th.replace(anomaly_threshold=2.5),
        th.replace(anomaly_threshold=4.5),
        th.replace(muted=["kl_runaway", "zscore"]),
    ):
        assert detect(hist, changed, cache=cache) == fresh(hist, changed)
        assert cache.rows_read < 100  # the +/- keys and muting: the domain rules' flags are kept
    assert not any(e["detector"] == "kl_runaway" for e in detect(hist, th.replace(muted=["kl_runaway"]), cache=cache))
    for changed in (th.replace(kl_runaway_factor=40.0), th.replace(grace_steps=100), th):
        assert detect(hist, changed, cache=cache) == fresh(hist, changed)
        assert cache.rows_read == 500  # another setting: every row again
    hist.add_step(500, {"memory/gpu_frac": 0.2})  # only the newest row changed
    assert detect(hist, th, cache=cache) == fresh(hist, th)
    assert cache.rows_read < 100


def test_same_values_at_other_steps_are_not_served_from_the_cache():
    m = faulty_run(300, seed=8)
    m["memory/gpu_frac"][7] = 0.97  # near-OOM at row 7: step 8 is in the grace period, step 15 is not
    cache = DetectionCache()
    dense_steps, sparse_steps = np.arange(1, 301), 1 + 2 * np.arange(300)
    detect((dense_steps, m, None, META), cache=cache)
    fresh_sparse = detect((sparse_steps, m, None, META))
    assert detect((sparse_steps, m, None, META), cache=cache) == fresh_sparse
    assert any(e["detector"] == "memory_near_oom" and e["step"] == 15 for e in fresh_sparse)


def test_large_histories_are_processed_in_chunks_with_the_same_result(monkeypatch):
    m = faulty_run(900, seed=2)
    steps = np.arange(1, 901)
    whole = detect((steps, m, None, META))
    monkeypatch.setattr(engine, "_CHUNK_VALUES", 2000)  # one metric per chunk
    assert detect((steps, m, None, META)) == whole
    cache = DetectionCache()
    detect((steps[:700], {k: v[:700] for k, v in m.items()}, None, META), cache=cache)
    assert detect((steps, m, None, META), cache=cache) == whole


def reference_selection(episodes: list[dict], keep_low: int, keep_other: int) -> set[tuple]:
    """What the monitor keeps: the newest keep_low low and keep_other other episodes, plus ongoing ones."""

    def newest(eps):
        return sorted(eps, key=lambda e: (e["step"], e["last_step"]), reverse=True)

    low = newest([e for e in episodes if e["severity"] == "low"])[:keep_low]
    other = newest([e for e in episodes if e["severity"] != "low"])[:keep_other]
    keys = {(e["detector"], e["metric"], e["step"]) for e in low + other}
    return keys | {(e["detector"], e["metric"], e["step"]) for e in episodes if e["ongoing"]}


@pytest.mark.parametrize("keep_low,keep_other", [(5, 3), (0, 0), (40, 1000), (100000, 100000)])
def test_evaluate_keeps_the_newest_episodes_and_counts_all_of_them(keep_low, keep_other):
    rng = np.random.default_rng(7)
    n = 1500
    m = faulty_run(n, seed=7)
    m["other"] = rng.standard_cauchy(n)  # heavy tails: many low z-score episodes
    steps = np.arange(1, n + 1)
    everything = detect((steps, m, None, META))
    kept, counts = evaluate((steps, m, None, META), keep_low=keep_low, keep_other=keep_other)
    full_counts: dict[str, int] = {}
    for e in everything:
        full_counts[e["severity"]] = full_counts.get(e["severity"], 0) + 1
    assert counts == full_counts and counts["low"] > 40
    assert {(e["detector"], e["metric"], e["step"]) for e in kept} == reference_selection(
        everything, keep_low, keep_other
    )
    by_key = {(e["detector"], e["metric"], e["step"]): e for e in everything}
    assert all(by_key[(e["detector"], e["metric"], e["step"])] == e for e in kept)  # the same dicts
    assert kept == sorted(kept, key=lambda e: (e["step"], e["detector"], e["metric"]))


def test_every_series_a_domain_detector_reads_is_built():
    src = inspect.getsource(rules)
    read = set(re.findall(r'\bs\("([^"]+)"\)', src))
    read |= {"policy_loss", "step_time", "time/step_s", "memory/rss_mb", "memory/gpu_mb", "rewards/x/mean"}
    assert series_wanted(sorted(read)) == read


def mixed_run(n: int, seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """Every kind of rule at once: faults, a learning rate logged every 7th row with a restart, a clip ratio
    that turns non-zero late (arming the off-policy rule), a DPO-style loss dipping below ln 2 and back, NaN gaps."""
    rng = np.random.default_rng(seed)
    m = faulty_run(n, seed)
    lr = np.full(n, np.nan)
    lr[::7] = 1e-5 * (1 + 0.001 * np.arange(0, n, 7))
    lr[7 * (n // 14)] *= 8  # a restart
    m["learning_rate"] = lr
    clip = np.zeros(n)
    clip[n // 2 :] = np.clip(0.1 + 0.2 * rng.standard_normal(n - n // 2), 0, 1)
    m["clip_ratio"] = clip
    m["completions/clipped_ratio"] = np.where(np.arange(n) > 0.8 * n, 0.7, 0.05)
    m["reward"] = m["reward"].copy()
    m["reward"][int(0.7 * n) :] += np.linspace(0, 40, n - int(0.7 * n))  # a climb while lengths run out
    m["entropy"] = m["entropy"].copy()
    m["entropy"][int(0.6 * n) :] *= 0.02
    m["grad_norm"] = m["grad_norm"].copy()
    m["grad_norm"][rng.random(n) < 0.05] = np.nan
    m["loss"] = m["loss"].copy()
    m["loss"][n // 4] = np.inf
    return m, {"trainer": "GRPOTrainer", "args": {"num_iterations": 1, "max_completion_length": 64}}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_history_grown_in_random_chunks_with_merged_rows_equals_a_pass_over_all_of_it(seed):
    """The incremental engine against cold passes: random chunk sizes across the chunk grid, repeated steps
    merged into the newest row, with and without a revision token, and a bounded episode list."""
    rng = np.random.default_rng(100 + seed)
    n = 900
    m, meta = mixed_run(n, seed)
    steps = np.arange(1, n + 1) * (1 + seed)
    th = Thresholds().replace(cooldown_steps=3 + seed)
    caches = {"revision": DetectionCache(), "checksums": DetectionCache()}
    end, passes = 0, 0
    while end < n:
        end = min(n, end + int(rng.choice([1, 1, 2, 5, 13, 70, 151])))
        part_m = {k: v[:end].copy() for k, v in m.items()}
        if rng.random() < 0.3 and end > 1:  # the newest row changes later (a repeated step merged into it)
            part_m["kl"][-1] = 0.0 if rng.random() < 0.5 else 1e3
            part_m["entropy"][-1] = np.nan
        part = (steps[:end], part_m, None, meta)
        want = evaluate(part, th, keep_low=7, keep_other=50)
        got_rev = evaluate(part, th, cache=caches["revision"], keep_low=7, keep_other=50, revision=("run", 0))
        got_sum = evaluate(part, th, cache=caches["checksums"], keep_low=7, keep_other=50)
        assert got_rev == want and got_sum == want, f"after {end} rows"
        passes += 1
    assert passes >= 12
    everything = detect((steps, m, None, meta), th)
    kinds = {e["detector"] for e in everything}
    assert {
        "kl_runaway",
        "nonfinite",
        "lr_jump",
        "entropy_collapse",
        "memory_leak",
        "memory_near_oom",
        "reward_hacking",
    } <= kinds
    assert caches["revision"].rows_read < 400  # the last passes read the newest rows, not the history


def test_a_detector_setting_reruns_over_the_history_only_the_rules_that_read_it():
    """The kl runaway's factor: the KL rule and reward hacking (which reads the KL rule's held runaway) run over
    every row; every other rule resumes at the newest rows and keeps its flags."""
    m, meta = mixed_run(600, 4)
    steps = np.arange(1, 601)
    cache, th = DetectionCache(), Thresholds()
    evaluate((steps, m, None, meta), th, cache=cache, revision=REV)
    assert set(cache.rerun) == set(rules.rule_names())  # the first pass: every rule, every row
    th2 = th.replace(kl_runaway_factor=40.0)
    assert evaluate((steps, m, None, meta), th2, cache=cache, revision=REV) == evaluate((steps, m, None, meta), th2)
    assert cache.rerun == ("kl", "reward_hacking")
    th3 = th2.replace(memory_leak_frac=0.5)
    assert evaluate((steps, m, None, meta), th3, cache=cache, revision=REV) == evaluate((steps, m, None, meta), th3)
    assert cache.rerun == ("system",)
    assert evaluate((steps, m, None, meta), th3, cache=cache, revision=REV)[0] and cache.rerun == ()


def test_a_rule_reading_a_new_value_in_a_pass_that_runs_only_some_rules_makes_every_rule_run():
    """A key press while the run grows: the KL rule reruns over the history, the others resume at the newest
    rows, where the reward now climbs, so reward hacking reads the KL rule's held runaway for the first time —
    a value no rule of that pass writes. It must not raise (KeyError) or read nothing: every rule runs."""
    n = 900
    m = {k: v.copy() for k, v in grpo_run(n, 3).items()}
    m["reward"][630:] += np.linspace(0, 40, n - 630)
    steps, th = np.arange(1, n + 1), Thresholds()
    cache = DetectionCache()
    evaluate((steps[:600], {k: v[:600] for k, v in m.items()}, None, META), th, cache=cache)
    assert cache.uses["reward_hacking"] == {"reward_up"}  # no climb yet: the signs were never read
    moved = th.replace(kl_runaway_factor=40.0)
    assert evaluate((steps, m, None, META), moved, cache=cache) == evaluate((steps, m, None, META), moved)
    assert set(cache.rerun) == set(rules.rule_names())
    assert {"kl_held", "entropy_drop"} <= cache.uses["reward_hacking"]


REV = ("run", 0)


def test_a_setting_a_rule_read_only_on_the_newest_rows_still_reruns_it():
    """Reward hacking reads its clipped-ratio sign only where the reward climbed: a climb that came after the
    first pass, judged by passes over the newest rows, makes the setting matter, and moving it must rerun it."""
    from rlhf_tui.tui.config import step_setting

    n = 900
    m = {k: v.copy() for k, v in grpo_run(n, 3).items()}
    m["reward"][630:] += np.linspace(0, 40, n - 630)
    m["completions/clipped_ratio"][630:] = 0.52  # the only sign: hacking at the default 0.5, not at 0.55
    steps, th = np.arange(1, n + 1), Thresholds()
    cache = DetectionCache()
    for end in (600, 650, 700, 800, 900):
        evaluate((steps[:end], {k: v[:end] for k, v in m.items()}, None, META), th, cache=cache)
    moved = step_setting(th, "hack_clipped_ratio", +1)
    want = evaluate((steps, m, None, META), moved)
    assert want != evaluate((steps, m, None, META), th)  # the setting decides this run's reward hacking
    assert evaluate((steps, m, None, META), moved, cache=cache) == want
    assert cache.rerun == ("reward_hacking",)


def test_every_setting_moved_by_its_key_while_the_history_grows_equals_a_fresh_pass():
    """Which rules a setting reruns is learnt from what each rule read; a rule may read a setting only on some
    rows (reward hacking reads its entropy drop only where the reward climbed), so the record must cover the
    passes over the newest rows too. Every field of the editor, moved up and down, between growing passes."""
    from rlhf_tui.analysis.thresholds import THRESHOLD_FIELDS
    from rlhf_tui.tui.config import step_setting

    n = 900
    m, meta = mixed_run(n, 5)
    steps = np.arange(1, n + 1)
    cache, th = DetectionCache(), Thresholds()
    names = [spec["name"] for spec in THRESHOLD_FIELDS if spec["name"] != "muted"]
    ends = np.linspace(300, n, len(names) + 1).astype(int)
    evaluate((steps[: ends[0]], {k: v[: ends[0]] for k, v in m.items()}, None, meta), th, cache=cache)
    for name, end in zip(names, ends[1:]):
        part = (steps[:end], {k: v[:end] for k, v in m.items()}, None, meta)
        evaluate(part, th, cache=cache)  # grown: a pass over the newest rows
        for moved in (step_setting(th, name, +1), step_setting(th, name, -1), th):
            assert evaluate(part, moved, cache=cache) == evaluate(part, moved), f"{name} at {end} rows"


def test_a_new_revision_token_or_a_thinned_store_starts_over():
    m = faulty_run(600, seed=9)
    hist = RunHistory("r", capacity=512)
    hist.meta.update(META)
    cache = DetectionCache()
    grow(hist, m, 0, 500)
    evaluate(hist, cache=cache, revision=hist.revision)
    grow(hist, m, 500, 600)  # past capacity: thinned, so the token changes
    assert hist.thinned > 0
    assert evaluate(hist, cache=cache, revision=hist.revision) == evaluate(hist)
    assert cache.reused_blocks == 0 and cache.rows_read == hist.rows


def _reward(step: int, scores: list[float]) -> dict:
    return {"reward_func": "acc", "step": step, "scores": scores, "samples": [], "rank": 0}


def test_a_trailing_reward_batch_filled_into_an_older_row_is_judged_by_the_next_cached_pass():
    """Reward messages trail their step rows: the prompt-group split of a step can land in its row after a
    pass judged that row without it. The store's revision changes then, so the cache starts over."""
    m = grpo_run(220, 6)  # long enough that the late rows lie before the chunk a cached pass redoes
    solved = [1.0] * 8  # 4 groups of 2, every completion right
    mixed = [0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]  # one group of four solved, none hopeless
    hist = RunHistory("r")
    hist.meta.update({"trainer": "GRPOTrainer", "args": {"num_generations": 2}})
    late = range(100, 110)  # these steps' reward batches arrive only after step 220
    for i in range(220):
        step = i + 1
        hist.add_step(
            step, {k: float(v[i]) for k, v in m.items()} | {"frac_reward_zero_std": 1.0 if step >= 100 else 0.25}
        )
        if step not in late:
            hist.add_reward(_reward(step, solved if step >= 100 else mixed))
    assert np.isnan(hist.values("groups/too_easy")[99:109]).all() and hist.latest("groups/too_easy") == 1.0
    cache, stale = DetectionCache(), DetectionCache()
    before = hist.revision
    first = evaluate(hist, cache=cache, revision=hist.revision)[0]
    evaluate(hist, cache=stale, revision=before)
    easy = [e for e in first if e["detector"] == "groups_too_easy"]
    assert [e["step"] for e in easy] == [112]  # rows 100..109 had no split yet: no_learning_signal there
    assert [e["step"] for e in first if e["detector"] == "no_learning_signal"] == [102]
    for step in late:  # now they arrive, into rows older than the newest
        hist.add_reward(_reward(step, solved))
    assert (hist.values("groups/too_easy")[99:109] == 1.0).all()
    assert hist.revision != before and hist.rows == 220
    got = evaluate(hist, cache=cache, revision=hist.revision)[0]
    assert got == detect(hist)
    assert [e["step"] for e in got if e["detector"] == "groups_too_easy"] == [102]
    assert not [e for e in got if e["detector"] == "no_learning_signal"]  # the split explains it from the start
    # a cache that kept trusting the old token would keep the stale answer (why the store bumps it)
    assert evaluate(hist, cache=stale, revision=before)[0] != got
    # filling the newest row, or a value already there, changes nothing a pass relied on
    now = hist.revision
    hist.add_reward(_reward(220, solved))
    hist.add_reward(_reward(105, solved))
    assert hist.revision == now


def test_older_rows_filled_again_and_again_move_the_revision_at_most_every_rejudge_s(monkeypatch):
    """On a live GRPO run every reward batch trails its step: a revision that moved at each fill would make every
    pass start over (~76 ms at 10^5 rows instead of 1.6 ms). Fills move it at most once per REJUDGE_S."""
    from rlhf_tui.analysis import store as store_module

    clock = [50.0]
    monkeypatch.setattr(store_module.time, "monotonic", lambda: clock[0])
    hist = RunHistory("r")
    hist.meta.update({"trainer": "GRPOTrainer", "args": {"num_generations": 2}})
    for step in range(1, 41):
        hist.add_step(step, {"reward": 0.5})
    revisions = set()
    for step in range(1, 40):  # each batch lands in its own (older) row, one a second
        hist.add_reward(_reward(step, [0.0, 1.0, 1.0, 1.0]))
        revisions.add(hist.revision)
        clock[0] += 1.0
    assert len(revisions) == 4  # the first fill at once, then at 10, 20 and 30 s (was 39: one per fill)
    clock[0] += store_module.REJUDGE_S
    assert hist.revision not in revisions  # the last fills are judged within REJUDGE_S


def test_the_rules_records_note_every_setting_read_and_who_passed_which_value_to_whom():
    seen: set[str] = set()
    th = records.Reads(Thresholds(kl_floor=0.02), seen)
    assert th.kl_floor == 0.02 and th.kl_floor == 0.02 and th.persist_n == Thresholds().persist_n
    assert seen == {"kl_floor", "persist_n"}
    shared = records.Shared()
    shared.rule = "kl"
    shared["kl_held"] = np.zeros(3, dtype=bool)
    for reader, read in (("hacking", lambda: shared["kl_held"]), ("a", lambda: shared.get("kl_held"))):
        shared.rule = reader
        read()
    shared.rule = "b"
    assert "kl_held" in shared and "other" not in shared
    assert shared.writers == {"kl_held": {"kl"}}
    assert shared.readers == {"hacking": {"kl_held"}, "a": {"kl_held"}, "b": {"kl_held", "other"}}


@pytest.mark.parametrize("seed", [0, 2, 3])  # 2 and 3 met a rule reading a new shared value (a KeyError once)
def test_settings_moved_while_the_history_grows_in_the_same_pass_equal_fresh_passes(seed):
    """Key presses on a live run: each pass both adds rows and moves a random setting (or two), so the rules
    rerun over the history and those resuming at the newest rows meet data their records have not seen."""
    from rlhf_tui.analysis.thresholds import THRESHOLD_FIELDS
    from rlhf_tui.tui.config import step_setting

    rng = np.random.default_rng(200 + seed)
    n = 900
    m, meta = mixed_run(n, seed + 7)
    steps = np.arange(1, n + 1)
    names = [spec["name"] for spec in THRESHOLD_FIELDS if spec["name"] != "muted"]
    cache, th, end = DetectionCache(), Thresholds(), 200
    evaluate((steps[:end], {k: v[:end] for k, v in m.items()}, None, meta), th, cache=cache)
    while end < n:
        end = min(n, end + int(rng.choice([1, 3, 17, 40, 90])))
        for name in rng.choice(names, size=int(rng.integers(1, 3)), replace=False):
            th = step_setting(th, str(name), int(rng.choice([-1, 1])))
        part = (steps[:end], {k: v[:end] for k, v in m.items()}, None, meta)
        assert evaluate(part, th, cache=cache) == evaluate(part, th), f"at {end} rows"
