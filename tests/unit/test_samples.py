"""The completions kept per batch (stratified pick, byte bounds), the monitor's buffer joining every reward
function's scores to them, and the prompt groups' zero-spread split."""

from __future__ import annotations

import math

from rlhf_tui.analysis.groups import group_split
from rlhf_tui.analysis.samples import LIVE_STEPS, SampleBuffer, visible
from rlhf_tui.analysis.store import RunHistory
from rlhf_tui.bridge.training.rewards import SampleSetting, _samples, batch_samples, stratified_indices
from rlhf_tui.bridge.wire.events import RewardBatch


def test_small_batches_keep_every_completion_best_worst_median_first():
    picks = stratified_indices([0.2, 0.9, 0.1, 0.5], 4, per_step=8)
    assert [label for label, _ in picks[:3]] == ["best", "worst", "median"]
    assert [i for _, i in picks[:3]] == [1, 2, 3]
    assert sorted(i for _, i in picks) == [0, 1, 2, 3]


def test_large_batches_get_a_stratified_pick_with_the_truncated_and_non_finite():
    scores = [float(i) for i in range(64)]
    scores[10] = math.nan
    truncated = [i == 40 for i in range(64)]
    picks = dict((i, label) for label, i in stratified_indices(scores, 64, per_step=8, truncated=truncated))
    assert len(picks) == 8
    assert picks[63] == "best" and picks[0] == "worst" and picks[32] == "median"
    assert picks[40] == "truncated" and picks[10] == "nonfinite"


def test_the_samples_of_a_step_stay_within_their_byte_bound():
    setting = SampleSetting(per_step=64, max_bytes=10_000, chars=2000)
    prompts, completions = ["p" * 100] * 64, ["é" * 1500] * 64  # 3000 bytes of UTF-8 each
    out = _samples(prompts, completions, list(range(64)), setting, [9] * 64, max_length=9, step=3)
    size = sum(64 + len(s["prompt"].encode()) + len(s["completion"].encode()) for s in out)
    assert size <= 10_000 and len(out) == 4 and out[-1]["clipped"]
    assert all(s["truncated"] and s["length"] == 9 and s["step"] == 3 for s in out)
    # two batches of one step (gradient accumulation) share the step's bound
    batches = [RewardBatch(5, "r", list(range(64)), None, prompts, completions) for _ in range(2)]
    both = batch_samples(batches, setting)
    assert sum(64 + len(s["prompt"].encode()) + len(s["completion"].encode()) for s in both) <= 10_000


def test_group_split_tells_too_easy_from_too_hard():
    batch = [1, 1, 1, 1] + [0, 0, 0, 0] * 2 + [0.5] * 4 + [0, 1, 0, 1]
    split = group_split(batch, 4, 0.0, 1.0)
    assert split == {"groups/too_easy": 0.2, "groups/too_hard": 0.4, "groups/zero_std_other": 0.2}
    assert group_split(batch, 3, 0.0, 1.0) is None  # not whole groups
    # no range seen yet: an equal group is neither
    assert group_split([1.0] * 4, 2, 1.0, 1.0) == {
        "groups/too_easy": 0.0,
        "groups/too_hard": 0.0,
        "groups/zero_std_other": 1.0,
    }


def _batch(name, step, scores, samples=None):
    return {"reward_func": name, "step": step, "scores": scores, "samples": samples or [], "rank": 0}


def test_the_buffer_joins_every_functions_score_total_and_advantage():
    buf = SampleBuffer()
    texts = [
        {"index": i, "label": "all", "prompt": f"p{i}", "completion": f"c{i}\x1b[31m", "truncated": i == 3}
        for i in range(4)
    ]
    buf.add(_batch("a", 7, [1.0, 0.0, 1.0, 1.0], texts), num_generations=2)
    split = buf.add(_batch("b", 7, [0.5, 0.5, 0.0, 0.0]), num_generations=2)
    rows = buf.rows(7, num_generations=2)
    assert [r["scores"] for r in rows][0] == {"a": 1.0, "b": 0.5}
    assert [r["total"] for r in rows] == [1.5, 0.5, 1.0, 1.0]
    assert rows[0]["advantage"] > 0 > rows[1]["advantage"] and rows[2]["advantage"] == 0.0
    assert rows[0]["completion"] == "c0\\x1b[31m" and rows[3]["truncated"]
    assert split == {7: {"groups/too_easy": 0.0, "groups/too_hard": 0.0, "groups/zero_std_other": 0.5}}
    assert buf.sample_steps() == [7]


def test_the_buffer_is_bounded_in_bytes_dropping_the_oldest_steps():
    buf = SampleBuffer(total_bytes=1 << 16)
    for step in range(100):
        buf.add(_batch("a", step, [0.0], [{"index": 0, "prompt": "", "completion": "x" * 4000}]))
    assert buf.bytes <= 1 << 16 and buf.dropped_steps > 80 and buf.sample_steps()[-1] == 99


def test_a_run_gets_groups_metrics_and_every_steps_samples():
    run = RunHistory("r")
    run.meta["args"] = {"num_generations": 2}
    for step in (1, 2):
        run.add_reward(_batch("a", step, [0.0, 1.0, 1.0, 1.0], [{"index": 0, "prompt": "q", "completion": "a"}]))
    assert run.latest("groups/too_easy") == 0.5 and run.latest("groups/too_hard") == 0.0
    assert run.samples.sample_steps() == [1, 2]


def test_visible_spells_out_control_characters():
    assert visible("a\x1b]0;x\x07b\nc\x9b") == "a\\x1b]0;x\\x07b\nc\\x9b"


def test_older_steps_keep_their_rows_but_not_the_whole_batches_scores():
    buf = SampleBuffer()
    texts = [{"index": i, "prompt": "q", "completion": f"c{i}"} for i in (1, 6)]
    before = None
    for step in range(LIVE_STEPS + 100):
        buf.add(_batch("a", step, [float(i % 3) for i in range(8)], texts if step % 2 == 0 else []), num_generations=4)
        buf.add(_batch("b", step, [0.5] * 8), num_generations=4)
        if step == 0:
            before = buf.rows(0, num_generations=4)
    assert buf.rows(0, num_generations=4) == before
    assert [r["total"] for r in before] == [1.5, 0.5] and before[0]["advantage"] > 0 > before[1]["advantage"]
    old = buf.steps[0][0]
    assert old.frozen is not None and all(v.size == 2 for v in old.scores.values())
    assert 1 not in buf.steps and len(buf.steps) < LIVE_STEPS + 100  # old steps without samples are gone


def test_a_jsonl_log_fills_the_browser_every_step_of_a_coalesced_message(tmp_path):
    import json

    from rlhf_tui.bridge.monitor.sources import load_jsonl

    def sample(step, i):
        return {"label": "all", "index": i, "step": step, "prompt": f"q{step}", "completion": f"[b]c{i}[/b]"}

    start = {"event": "run_start", "run_id": "r1", "trainer": "GRPOTrainer", "args": {"num_generations": 2}}
    first = {
        "event": "reward_batch",
        "run_id": "r1",
        "step": 2,
        "reward_func": "acc",
        "steps": [1, 2],
        "sizes": [2, 2],
        "scores": [1.0, 1.0, 0.0, 1.0],
        "samples": [sample(1, 0), sample(1, 1), sample(2, 0), sample(2, 1)],
    }
    second = {**first, "reward_func": "fmt", "scores": [0.5, 0.5, 0.0, 0.0], "samples": []}
    path = tmp_path / "run.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in (start, first, second)))
    run = load_jsonl(path).current_run
    assert run.samples.sample_steps() == [1, 2]
    step1 = run.samples.rows(1, num_generations=2)
    assert [r["total"] for r in step1] == [1.5, 1.5] and step1[0]["completion"] == "[b]c0[/b]"
    assert [r["scores"] for r in run.samples.rows(2, num_generations=2)] == [
        {"acc": 0.0, "fmt": 0.0},
        {"acc": 1.0, "fmt": 0.0},
    ]
    assert [len(b["samples"]) for b in run.rewards] == [0, 2, 0, 0]  # the Rewards pane keeps the newest step's


def test_a_batch_older_than_the_live_steps_is_ignored_not_kept():
    buf = SampleBuffer()
    for step in range(LIVE_STEPS + 100):
        buf.add(_batch("a", step, [0.0] * 8))
    kept = len(buf.steps)
    buf.add(_batch("a", 3, [0.0] * 4096, [{"index": 0, "prompt": "", "completion": "x"}]))
    assert len(buf.steps) == kept and buf.stale == 1 and 3 not in buf.steps
