"""forwards.py without sockets: a rank's reward batch cut to one forward (16 KiB), what the main process keeps of
a forwarded one, and the Rewards pane's samples from several ranks (labelled r0, r1)."""

from __future__ import annotations

from rlhf_tui.analysis.reward_report import newest_samples
from rlhf_tui.bridge.training.forwards import ForwardIntake, fit_reward, reward_batch
from rlhf_tui.bridge.wire import protocol
from rlhf_tui.tui.render import reward_samples_table


def _batch(steps: int, per_step: int = 4, chars: int = 1500, text: str = "y") -> dict:
    samples = [
        {
            "label": "all",
            "index": i,
            "score": 1.0,
            "prompt": "p",
            "completion": f"s{step} " + text * chars,
            "step": step,
        }
        for step in range(1, steps + 1)
        for i in range(per_step)
    ]
    return {
        "step": steps,
        "reward_func": "r",
        "steps": list(range(1, steps + 1)),
        "sizes": [per_step] * steps,
        "scores": [1.0] * (steps * per_step),
        "num_scores": steps * per_step,
        "num_invalid": 0,
        "samples": samples,
    }


def test_a_batch_that_fits_is_sent_as_it_is():
    data = _batch(2, chars=10)
    assert fit_reward(data, 16_000) == (data, 0, 0)


def test_a_big_batch_keeps_the_newest_steps_samples_within_the_budget():
    data = _batch(8)
    fitted, cut, left_out = fit_reward(data, 8_000)
    assert len(protocol.dumps(fitted)) <= 8_000 and left_out == 0
    assert fitted["scores"] == data["scores"] and fitted["steps"] == data["steps"]  # scores are never cut here
    steps = [s["step"] for s in fitted["samples"]]
    assert steps[-4:] == [8] * 4 or steps.count(8) == 4  # the newest step's samples first
    assert cut == 32 - len(fitted["samples"]) + sum(1 for s in fitted["samples"] if s.get("clipped"))


def test_non_ascii_text_is_measured_as_encoded():
    data = _batch(4, chars=900, text="\U0001f600")  # 12 bytes each once escaped
    fitted, cut, _ = fit_reward(data, 6_000)
    assert len(protocol.dumps(fitted)) <= 6_000 and cut > 0


def test_too_many_scores_leave_the_oldest_batches_out_then_give_up():
    data = _batch(50, per_step=16, chars=1)
    fitted, _, left_out = fit_reward(data, 2_000)
    assert len(protocol.dumps(fitted)) <= 2_000 and left_out > 0 and fitted["steps"][-1] == 50
    assert sum(fitted["sizes"]) == len(fitted["scores"]) == fitted["num_scores"]
    assert all(s["step"] >= fitted["steps"][0] for s in fitted["samples"])
    assert fit_reward({"step": 1, "reward_func": "r", "scores": [1.0] * 5000}, 1_000)[0] is None


def test_the_main_process_keeps_known_fields_and_the_envelopes_rank():
    kept = reward_batch(
        {
            "step": 2,
            "reward_func": "r",
            "scores": [1.0, "NaN", None],
            "rank": 0,
            "num_invalid": 0,
            "analysis": {"x": 1},
            "samples": [{"label": "best", "index": 0, "completion": "c", "score": 1.0, "html": "<b>"}, "junk"],
        },
        3,
    )
    assert kept == {
        "step": 2,
        "reward_func": "r",
        "scores": [1.0, "NaN", None],
        "rank": 3,
        "num_scores": 3,
        "num_invalid": 2,
        "samples": [{"label": "best", "index": 0, "completion": "c", "score": 1.0}],
    }
    assert reward_batch({"step": 2, "reward_func": "", "scores": []}, 1) is None
    assert reward_batch({"step": True, "reward_func": "r", "scores": []}, 1) is None


def test_a_forwarded_system_sample_carries_the_envelopes_rank_and_goes_to_the_sink():
    stats: dict = {}
    logged = []
    intake = ForwardIntake("tok", 4, stats, lambda kind, data, rank: logged.append((kind, data, rank)) or [])
    env = {"rank": 2, "data": {"kind": "system", "data": {"rss_mb": 1.0, "rank": 0}, "token": "tok"}}
    assert intake.take(env, 0.0) == [] and logged == [("system", {"rss_mb": 1.0, "rank": 2}, 2)]
    assert intake.take(env, 0.05) == [] and stats["rejected"] == 1  # 10 a second per rank
    assert intake.take({**env, "rank": 4}, 1.0) == [] and stats["rejected"] == 2  # not a rank of a 4-process job
    assert stats["forwarded"] == 1


def test_the_rewards_pane_shows_every_ranks_samples_labelled():
    def batch(rank, step, n=3):
        samples = [{"label": "best", "index": i, "score": float(i), "completion": f"rank{rank}-{i}"} for i in range(n)]
        return {"step": step, "reward_func": "r", "rank": rank, "samples": samples}

    samples, step = newest_samples([batch(0, 1), batch(1, 1), batch(0, 2)])
    assert step == 2 and [(s["rank"], s["completion"]) for s in samples] == [
        (0, "rank0-0"),
        (0, "rank0-1"),
        (0, "rank0-2"),
        (1, "rank1-0"),
        (1, "rank1-1"),
        (1, "rank1-2"),
    ]
    table = reward_samples_table({"rewards": {"samples": samples, "last_step": step}})
    labels = [str(c) for c in table.columns[0]._cells]
    assert labels == ["r0 best"] * 3 + ["r1 best"] * 3
    # One process (no rank): the newest batch's samples, unlabelled, as before.
    single = [{"step": 1, "reward_func": "r", "samples": [{"label": "best", "index": 0, "completion": "c"}]}]
    assert newest_samples(single) == ([{"label": "best", "index": 0, "completion": "c"}], 1)
    assert [str(c) for c in reward_samples_table({"rewards": {"samples": single[0]["samples"]}}).columns[0]._cells] == [
        "best"
    ]
