"""The rollout block (analysis/rollout.py): verl's keys under our names, the mismatch and truncation words,
derived tokens/s and where a step's time goes."""

import json
import math

import numpy as np
import pytest

from rlhf_tui.analysis.detectors.plan import generic_metrics
from rlhf_tui.analysis.report import build_report
from rlhf_tui.analysis.rollout import rollout_section, time_split, tokens_per_second
from rlhf_tui.analysis.store import Store
from rlhf_tui.analysis.thresholds import Thresholds
from rlhf_tui.bridge.wire.metrics import CANONICAL, normalise

VERL = {
    "critic/score/mean": 0.5,
    "training/rollout_probs_diff_mean": 0.004,
    "training/rollout_probs_diff_max": 0.05,
    "response_length/clip_ratio": 0.05,
    "timing_s/gen": 6.0,
    "timing_s/reward": 0.5,
    "timing_s/update_actor": 3.0,
    "timing_s/step": 10.0,
    "perf/total_num_tokens": 80000.0,
    "perf/throughput": 1000.0,
}


def _run(rows, meta=None):
    store = Store()
    run = store.run("r")
    run.meta.update(meta or {})
    for step, logs in rows:
        run.add_step(step, normalise(logs))
    return store, run


def test_verl_keys_are_mapped_onto_our_names_and_judged_once():
    out = normalise(VERL)
    assert out["time/generation_s"] == 6.0 and out["time/optimisation_s"] == 3.0 and out["time/reward_s"] == 0.5
    assert out["time/step_total_s"] == 10.0 and out["tokens/step"] == 80000.0 and out["tokens/s/gpu"] == 1000.0
    assert out["completions/clipped_ratio"] == 0.05 and out["timing_s/gen"] == 6.0  # the key is kept too
    # A name the trainer logs itself wins over the verl alias; the contract's canonical names are unchanged.
    assert normalise({"completions/clipped_ratio": 0.2, "response_length/clip_ratio": 0.7})[
        "completions/clipped_ratio"
    ] == pytest.approx(0.2)
    assert normalise({"perf/time_per_step": 4.0})["time/step_total_s"] == 4.0
    assert len(CANONICAL) == 11 and "tokens/step" not in CANONICAL
    judged = generic_metrics(out)  # the verl aliases are not z-scored a second time beside their copies
    assert not judged & {"timing_s/gen", "perf/throughput", "perf/total_num_tokens", "response_length/clip_ratio"}


def test_tokens_per_second_from_cumulative_counts_and_from_one_steps_count():
    _, run = _run([(s, {"loss": 1.0, "num_tokens": 300.0 * s, "time/step_s": 0.5}) for s in range(1, 6)])
    rate = tokens_per_second(run)
    assert np.isnan(rate[0]) and rate[1:] == pytest.approx([600.0] * 4)  # 300 tokens a step in 0.5 s
    _, verl = _run([(s, {**VERL, "perf/total_num_tokens": 1000.0 * s}) for s in range(1, 4)])
    assert tokens_per_second(verl) == pytest.approx([100.0, 200.0, 300.0])  # the step's tokens over timing_s/step
    _, logged = _run([(1, {"tokens/s": 5.0, "num_tokens": 10.0})])
    assert tokens_per_second(logged) is None  # logged itself: nothing derived
    assert tokens_per_second(_run([(1, {"loss": 1.0})])[1]) is None


@pytest.mark.parametrize(
    ("diffs", "level"),
    [
        ([0.004, 0.005, 0.006], "ok"),
        ([0.004, 0.5, 0.006], "ok"),  # one odd batch neither raises nor clears the word
        ([0.02, 0.03, 0.004], "elevated"),  # at the 0.01 reference for two of the last three
        ([0.2, 0.3, 0.05], "high"),  # at 10x
    ],
)
def test_mismatch_word_against_the_reference_level(diffs, level):
    rows = [(i + 1, {"sampling/sampling_logp_difference/mean": d}) for i, d in enumerate(diffs)]
    rows[-1][1]["sampling/sampling_logp_difference/max"] = 0.9
    _, run = _run(rows)
    m = rollout_section(run, Thresholds())["mismatch"]
    assert m["level"] == m["difference_level"] == level
    assert m["mean"] == diffs[-1] and m["max"] == 0.9 and m["reference"] == 0.01 and m["high_at"] == 0.1
    assert "is_ratio" not in m


def test_mismatch_follows_the_thresholds_and_the_is_ratio_band():
    rows = [
        (s, {"training/rollout_probs_diff_mean": 0.03, "sampling/importance_sampling_ratio/mean": 1.1}) for s in (1, 2)
    ]
    _, run = _run(rows)
    assert rollout_section(run, Thresholds())["mismatch"]["level"] == "elevated"
    m = rollout_section(run, Thresholds(sampling_difference=0.05))["mismatch"]
    assert m["difference_level"] == "ok" and m["is_ratio_level"] == "ok" and m["level"] == "ok"
    for s in (3, 4, 5):
        run.add_step(s, {"sampling/importance_sampling_ratio/mean": 0.75})  # |log 0.75| > log 1.2
    m = rollout_section(run, Thresholds(sampling_difference=0.05))["mismatch"]
    assert m["is_ratio_level"] == "elevated" and m["level"] == "elevated" and m["is_band"] == 0.2


def test_truncation_high_says_the_length_limit_shapes_the_reward():
    _, run = _run(
        [(s, {"completions/clipped_ratio": 0.95}) for s in range(1, 4)], {"args": {"max_completion_length": 64}}
    )
    t = rollout_section(run, Thresholds())["truncation"]
    assert t["level"] == "high" and t["note"] == "the length limit shapes the reward"
    assert t["clipped_ratio"] == 0.95 and t["max_completion_length"] == 64 and t["limit"] == 0.9
    _, run = _run([(s, {"completions/clipped_ratio": v}) for s, v in ((1, 0.6), (2, 0.7), (3, 0.1))])
    t = rollout_section(run, Thresholds())["truncation"]
    assert t["level"] == "elevated" and "note" not in t  # at hack_clipped_ratio (0.5), below 0.9
    _, run = _run([(1, {"completions/clipped_ratio": 0.1})])
    assert rollout_section(run, Thresholds())["truncation"]["level"] == "ok"


def test_where_the_time_goes():
    _, run = _run([(1, VERL), (2, {**VERL, "timing_s/gen": 8.0, "timing_s/step": 12.0})])
    split = rollout_section(run)["time"]
    assert split["step"] == 2 and split["of"] == "step" and split["step_s"] == 12.0
    assert split["step_metric"] == "time/step_total_s"
    assert split["shares"] == pytest.approx(
        {"generation": 8 / 12, "reward": 0.5 / 12, "update": 3 / 12, "other": 0.5 / 12}
    )
    # Phases without a step total (or one that does not cover them): shares of the phases' sum, no "other".
    _, run = _run([(1, {"timing_s/gen": 3.0, "timing_s/update_actor": 1.0})])
    split = time_split(run)
    assert split["of"] == "phases" and split["shares"] == pytest.approx({"generation": 0.75, "update": 0.25})
    # TRL 1.x logs its step time only: no split, the step's seconds.
    _, run = _run([(1, {"step_time": 2.5, "loss": 0.1})])
    assert time_split(run) == {"step_s": 2.5, "step_metric": "step_time"}


def test_report_block_only_with_what_is_known_and_json_safe():
    store, _ = _run([(s, VERL) for s in range(1, 4)])
    block = build_report(store, Thresholds())["rollout"]
    assert set(block) == {"mismatch", "truncation", "throughput", "time"}
    assert block["throughput"] == {
        "tokens_per_s": 8000.0,
        "source": "derived from tokens/step",
        "tokens_per_s_per_gpu": 1000.0,
    }
    assert block["mismatch"]["metric"] == "training/rollout_probs_diff_mean" and block["mismatch"]["level"] == "ok"
    json.dumps(block, allow_nan=False)
    plain, _ = _run([(s, {"loss": 1.0 / s}) for s in range(1, 4)])
    assert build_report(plain)["rollout"] == {} and build_report(Store())["rollout"] == {}
    sft, _ = _run([(s, {"loss": 1.0, "num_tokens": 10.0 * s, "time/step_s": 0.5, "step_time": 0.4}) for s in (1, 2)])
    assert build_report(sft)["rollout"] == {}  # throughput and step time alone are no rollout
    assert not math.isnan(block["time"]["shares"]["other"])


def test_the_documented_json_block_has_the_fields_of_a_real_one():
    from conftest import REPO

    doc = (REPO / "docs" / "monitor.md").read_text()
    start = doc.index('"rollout": {', doc.index("### Rollout"))
    documented = json.loads("{" + doc[start : doc.index("```", start)] + "}")["rollout"]
    every = {
        "sampling/sampling_logp_difference/mean": 0.15,
        "sampling/sampling_logp_difference/max": 1.2,
        "sampling/importance_sampling_ratio/mean": 0.97,
        "sampling/importance_sampling_ratio/min": 0.5,
        "sampling/importance_sampling_ratio/max": 1.6,
        "completions/clipped_ratio": 0.95,
        "perf/throughput": 250.0,
        "timing_s/gen": 6.0,
        "timing_s/update_actor": 3.0,
        "timing_s/step": 10.0,
    }
    rows = [(s, {**every, "num_tokens": 1000.0 * s, "time/step_s": 1.0}) for s in (1, 2)]
    _, run = _run(rows, {"args": {"max_completion_length": 256}})
    real = rollout_section(run, Thresholds())
    assert set(real) == set(documented)
    for part, fields in documented.items():
        assert set(real[part]) == set(fields), part
