"""The rollout gauge under Pilot: a verl-style custom loop that is fine and a TRL 1.x GRPO run whose sampler
drifts and whose completions run into the length limit; the text report carries the same block."""

import pytest
from conftest import pilot_wait_for

from rlhf_tui.analysis.report import build_report
from rlhf_tui.analysis.store import Store
from rlhf_tui.analysis.thresholds import Thresholds
from rlhf_tui.bridge.wire.metrics import normalise
from rlhf_tui.tui.app import MonitorApp
from rlhf_tui.tui.render import render_text
from rlhf_tui.tui.rollout import rollout_lines


def _store(run_id: str, trainer: str, logs_of) -> Store:
    store = Store()
    store.source = f"{run_id}.jsonl"
    with store.lock:
        run = store.run(run_id)
        run.meta.update({"run_id": run_id, "trainer": trainer, "args": {"max_completion_length": 256}})
        for s in range(1, 41):
            run.add_step(s, normalise(logs_of(s)), timestamp=100.0 + 2 * s)
        store.touch()
    return store


def verl_store() -> Store:
    def logs(s):
        return {
            "critic/score/mean": 0.2 + 0.01 * s,
            "actor/pg_loss": 0.1,
            "training/rollout_probs_diff_mean": 0.004,
            "training/rollout_probs_diff_max": 0.04,
            "response_length/clip_ratio": 0.02,
            "timing_s/gen": 6.0,
            "timing_s/update_actor": 3.0,
            "timing_s/step": 10.0,
            "perf/total_num_tokens": 80000.0,
            "perf/throughput": 1000.0,
        }

    return _store("verl-loop", "custom", logs)


def trl_store() -> Store:
    def logs(s):
        return {
            "reward": 0.5 + 0.005 * s,
            "kl": 0.01,
            "loss": 0.02,
            "sampling/sampling_logp_difference/mean": 0.15,
            "sampling/sampling_logp_difference/max": 1.2,
            "sampling/importance_sampling_ratio/mean": 0.97,
            "sampling/importance_sampling_ratio/min": 0.5,
            "sampling/importance_sampling_ratio/max": 1.6,
            "completions/clipped_ratio": 0.95,
            "num_tokens": 2000.0 * s,
            "step_time": 1.5,
        }

    return _store("grpo-trl", "GRPOTrainer", logs)


def _body(app) -> str:
    return str(app.view.query_one("#rewards-body").render())


async def test_rollout_gauge_ok_for_a_verl_loop_and_high_for_a_drifting_trl_run(settle, title):
    app = MonitorApp([], stores=[verl_store(), trl_store()], labels=["verl", "trl"])
    async with app.run_test(size=(160, 48)) as pilot:
        await settle(pilot, app)
        text = _body(app)
        assert "mismatch   ok       probs diff 0.004 (max 0.04) · ref 0.01, high 0.1" in text
        assert "truncation ok       2% clipped at 256 tokens · limit 90%" in text
        assert "throughput          8k tokens/s · derived from tokens/step · 1k tokens/s per GPU" in text
        assert "time                generation 60% · update 30% · other 10% of 10 s a step" in text
        assert "rollout" not in title(app.view.pane("rewards"))  # all fine: nothing in the title
        await pilot.press("right_square_bracket")
        await pilot_wait_for(pilot, lambda: "logp diff" in _body(app), message="the TRL tab's gauge")
        text = _body(app)
        assert "mismatch   high     logp diff 0.15 (max 1.2) · ref 0.01, high 0.1" in text
        assert "IS ratio   ok       0.97 (0.5…1.6) · band 1 ± 0.2" in text
        assert "truncation high     95% clipped at 256 tokens: the length limit shapes the reward" in text
        assert "throughput          1k tokens/s · derived from num_tokens" in text  # 2000 tokens in 2 s a step
        assert "time                1.5 s a step (step_time; no phase timings)" in text
        assert "rollout high" in title(app.view.pane("rewards"))


def test_text_report_has_the_rollout_section_only_when_the_run_logs_its_keys():
    text = render_text(build_report(trl_store(), Thresholds()), stamp=False)
    section = text[text.index("Rollout · high") :]
    assert "mismatch   high     logp diff 0.15" in section and "the length limit shapes the reward" in section
    narrow = rollout_lines(build_report(trl_store(), Thresholds())["rollout"], width=38).plain.splitlines()
    assert narrow[0] == "mismatch high logp diff 0.15 (max 1.2)"  # a 40-column pane: words unaligned, no levels
    assert narrow[2] == "truncation high 95% clipped: the length limit shapes the reward"
    plain = Store()
    with plain.lock:
        run = plain.run("sft")
        for s in range(1, 5):
            run.add_step(s, {"loss": 1.0 / s})
    assert "Rollout" not in render_text(build_report(plain, Thresholds()), stamp=False)


def test_report_json_carries_the_rollout_block_of_a_verl_loop(tmp_path, capsys):
    import json

    from rlhf_tui.tui.cli import main

    history = [
        {
            "step": s,
            "critic/score/mean": 0.3,
            "training/rollout_probs_diff_mean": 0.02 + 0.001 * s,
            "response_length/clip_ratio": 0.92,
            "timing_s/gen": 4.0,
            "timing_s/update_actor": 4.0,
            "timing_s/step": 10.0,
            "perf/total_num_tokens": 5000.0,
            "perf/throughput": 250.0,
        }
        for s in range(1, 11)
    ]
    state = tmp_path / "trainer_state.json"
    state.write_text(json.dumps({"log_history": history, "global_step": 10}))
    assert main(["report", str(state), "--format", "json"]) == 0
    rollout = json.loads(capsys.readouterr().out)["rollout"]
    assert rollout["mismatch"]["level"] == "elevated" and rollout["mismatch"]["mean"] == 0.03
    assert rollout["truncation"]["level"] == "high" and rollout["truncation"]["clipped_ratio"] == 0.92
    assert rollout["throughput"] == {
        "tokens_per_s": 500.0,
        "source": "derived from tokens/step",
        "tokens_per_s_per_gpu": 250.0,
    }
    assert rollout["time"]["shares"] == pytest.approx({"generation": 0.4, "update": 0.4, "other": 0.2})
