"""The workload matrix: a few steps of each real trainer on the tiny local model, with the real callback publishing
on a real ZeroMQ socket to a live monitor in this process. For each: every (step, key) of
`trainer.state.log_history` arrives exactly, the canonical names are filled, the run has its kind and its units,
and the panes show what the kind needs (no DPO/SFT run told to wrap reward functions). Module-scoped: each
workload trains once; the last test opens them all as tabs of the real app."""

from __future__ import annotations

import importlib.util
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import REPO, free_address, pilot_wait_for, wait_for

pytestmark = pytest.mark.slow
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def _common(output_dir, **kw) -> dict:
    defaults = dict(
        output_dir=str(output_dir),
        logging_steps=1,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    return {**defaults, **kw}


def _preference_data():
    from datasets import Dataset

    return Dataset.from_dict(
        {
            "prompt": ["the movie was", "my dog likes to"] * 4,
            "chosen": [" great and wonderful", " run in the park"] * 4,
            "rejected": [" bad", " sad"] * 4,
        }
    )


def _text_data():
    from datasets import Dataset

    from rlhf_tui.bridge.demo.tiny import CORPUS

    return Dataset.from_dict({"text": CORPUS[:8]})


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    tok.padding_side = "left"
    return tok


def format_reward(completions, **kwargs):
    return [
        1.0 if str(c).strip().endswith(("good", "great", "happy")) else -0.5 + 0.1 * len(str(c)) for c in completions
    ]


def watch(build, tmp, *, trainer_attr: bool = True):
    """Train `build(callback, output_dir)`'s trainer with a monitor subscribed to the callback's address from
    the start; returns the trainer, the monitor's store and run, and its view of the run."""
    from rlhf_tui.analysis.thresholds import Thresholds
    from rlhf_tui.bridge.monitor.subscriber import Subscriber
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback
    from rlhf_tui.tui.widgets.model import view_report

    address = free_address()
    sub = Subscriber(address).start()
    cb = RLHFMonitorCallback(address=address, log_dir=str(tmp / "logs"))
    try:
        trainer = build(cb, tmp / "out")
        if trainer_attr:
            cb.trainer = trainer
        trainer.train()
        wait_for(
            lambda: sub.store.current_run is not None and sub.store.current_run.ended is not None,
            timeout=30,
            message="the run's end at the monitor",
        )
        cb.wait_for_checkpoints(30)
        cb.close()
        wait_for(  # the analyses' results reach the monitor after the training side has them
            lambda: all(c.get("status") != "saved" for c in sub.store.current_run.checkpoints),
            timeout=30,
            message="the checkpoint analyses at the monitor",
        )
        with sub.store.lock:
            report = view_report(sub.store, Thresholds(), spark_width=24)
        return SimpleNamespace(
            trainer=trainer,
            history=trainer.state.log_history,
            store=sub.store,
            run=sub.store.current_run,
            report=report,
        )
    finally:
        cb.close()
        sub.stop()


def assert_every_value_arrived(watched) -> None:
    """Each (step, key) of log_history, as the monitor holds it: the same steps, the same numbers."""
    from rlhf_tui.bridge.wire.metrics import is_summary, to_float

    run, history = watched.run, watched.history
    rows = [e for e in history if not is_summary(e)]
    assert list(run.steps) == sorted({int(e["step"]) for e in rows})
    assert run.out_of_order == 0
    checked = 0
    for entry in rows:
        row = int(np.searchsorted(run.steps, entry["step"]))
        for key, value in entry.items():
            number = to_float(value)
            if key == "step" or number is None:
                continue
            got = float(run.values(key)[row])
            assert got == number or (math.isnan(got) and math.isnan(number)), (entry["step"], key, got, number)
            checked += 1
    assert checked >= 3 * len(rows)
    summary = next((e for e in history if is_summary(e)), None)
    if summary is not None:  # a custom loop has none
        assert run.summary["train_loss"] == pytest.approx(summary["train_loss"])
    t = watched.store.transport
    assert t["rejected"] == 0 and t["gaps"] == 0 and t["dropped"] == 0


def assert_canonical(watched, names, rows=None) -> None:
    run = watched.run
    for name in names:
        values = run.values(name) if rows is None else run.values(name)[rows]
        assert np.isfinite(values).all(), name


def train_rows(run, key: str = "grad_norm") -> np.ndarray:
    """The rows holding a training log (an evaluation-only row has no grad_norm)."""
    return np.flatnonzero(np.isfinite(run.values(key)))


def rewards_body(report: dict, width: int = 70) -> str:
    from rlhf_tui.tui.widgets.rewards import rewards_lines
    from rlhf_tui.tui.workload import pane_title, workload_lines

    if (report.get("rewards") or {}).get("batches"):
        return rewards_lines(report, width=width).plain
    assert pane_title(report) is not None, "an RL run without reward batches"
    return workload_lines(report, width=width).plain


# -- the workloads ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grpo_lora(tiny_model, tmp_path_factory):
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_tui.bridge.demo.tiny import length_reward, prompt_dataset
    from rlhf_tui.bridge.training.rewards import monitor_rewards

    def build(cb, out):
        args = GRPOConfig(
            **_common(out, save_strategy="steps", save_steps=2),
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=8,
            max_steps=4,
            beta=0.04,
            learning_rate=1e-3,
        )
        return GRPOTrainer(
            model=tiny_model,
            reward_funcs=monitor_rewards([length_reward], cb),
            args=args,
            train_dataset=prompt_dataset(32),
            processing_class=_tokenizer(tiny_model),
            callbacks=[cb],
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], task_type="CAUSAL_LM"),
        )

    return watch(build, tmp_path_factory.mktemp("grpo-lora"))


@pytest.fixture(scope="module")
def grpo_two_rewards(tiny_model, tmp_path_factory):
    from trl import GRPOConfig, GRPOTrainer

    from rlhf_tui.bridge.demo.tiny import length_reward, prompt_dataset
    from rlhf_tui.bridge.training.rewards import monitor_rewards

    def build(cb, out):
        args = GRPOConfig(
            **_common(out, logging_steps=3),
            per_device_train_batch_size=4,
            num_generations=4,
            gradient_accumulation_steps=2,
            num_iterations=2,
            max_completion_length=8,
            max_steps=6,
            beta=0.04,
        )
        return GRPOTrainer(
            model=tiny_model,
            reward_funcs=monitor_rewards([length_reward, format_reward], cb),
            args=args,
            train_dataset=prompt_dataset(64),
            processing_class=_tokenizer(tiny_model),
            callbacks=[cb],
        )

    return watch(build, tmp_path_factory.mktemp("grpo-two"), trainer_attr=False)


@pytest.fixture(scope="module")
def rloo(tiny_model, tmp_path_factory):
    from trl import RLOOConfig, RLOOTrainer

    from rlhf_tui.bridge.demo.tiny import length_reward, prompt_dataset
    from rlhf_tui.bridge.training.rewards import monitor_rewards

    def build(cb, out):
        args = RLOOConfig(
            **_common(out), per_device_train_batch_size=4, num_generations=2, max_completion_length=8, max_steps=3
        )
        return RLOOTrainer(
            model=tiny_model,
            reward_funcs=monitor_rewards([length_reward], cb),
            args=args,
            train_dataset=prompt_dataset(32),
            processing_class=_tokenizer(tiny_model),
            callbacks=[cb],
        )

    return watch(build, tmp_path_factory.mktemp("rloo"))


@pytest.fixture(scope="module")
def online_dpo(tiny_model, tmp_path_factory):
    try:
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer
    except ImportError as exc:
        pytest.skip(f"the installed TRL has no trl.experimental.online_dpo ({exc})")
    from rlhf_tui.bridge.demo.tiny import length_reward, prompt_dataset
    from rlhf_tui.bridge.training.rewards import monitor_rewards

    def build(cb, out):
        args = OnlineDPOConfig(**_common(out), per_device_train_batch_size=2, max_new_tokens=8, max_steps=3)
        return OnlineDPOTrainer(
            model=tiny_model,
            reward_funcs=monitor_rewards([length_reward], cb),
            args=args,
            train_dataset=prompt_dataset(32),
            processing_class=_tokenizer(tiny_model),
            callbacks=[cb],
        )

    return watch(build, tmp_path_factory.mktemp("online-dpo"))


@pytest.fixture(scope="module")
def dpo(tiny_model, tmp_path_factory):
    from trl import DPOConfig, DPOTrainer

    def build(cb, out):
        data = _preference_data()
        args = DPOConfig(
            **_common(out),
            per_device_train_batch_size=2,
            per_device_eval_batch_size=2,
            eval_strategy="steps",
            eval_steps=1,
            max_steps=4,
            learning_rate=5e-3,
        )
        return DPOTrainer(
            model=tiny_model,
            args=args,
            train_dataset=data,
            eval_dataset=data.select(range(2)),
            processing_class=_tokenizer(tiny_model),
            callbacks=[cb],
        )

    return watch(build, tmp_path_factory.mktemp("dpo"), trainer_attr=False)


@pytest.fixture(scope="module")
def reward_model(tiny_model, tmp_path_factory):
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    def build(cb, out):
        tok = _tokenizer(tiny_model)
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        data = _preference_data().remove_columns("prompt")
        args = RewardConfig(
            **_common(out), per_device_train_batch_size=2, eval_strategy="steps", eval_steps=2, max_steps=4
        )
        return RewardTrainer(
            model=model,
            args=args,
            train_dataset=data,
            eval_dataset=data.select(range(2)),
            processing_class=tok,
            callbacks=[cb],
        )

    return watch(build, tmp_path_factory.mktemp("reward"))


@pytest.fixture(scope="module")
def sft(tiny_model, tmp_path_factory):
    from trl import SFTConfig, SFTTrainer

    def build(cb, out):
        data = _text_data()
        args = SFTConfig(
            **_common(out),
            per_device_train_batch_size=2,
            eval_strategy="steps",
            eval_steps=1,
            max_steps=4,
            learning_rate=5e-3,
        )
        return SFTTrainer(
            model=tiny_model,
            args=args,
            train_dataset=data,
            eval_dataset=data.select(range(2)),
            processing_class=_tokenizer(tiny_model),
            callbacks=[cb],
        )

    return watch(build, tmp_path_factory.mktemp("sft"), trainer_attr=False)


@pytest.fixture(scope="module")
def plain(tiny_model, tmp_path_factory):
    from transformers import AutoModelForCausalLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    def build(cb, out):
        tok = _tokenizer(tiny_model)
        data = _text_data().map(lambda b: tok(b["text"]), batched=True, remove_columns=["text"])
        args = TrainingArguments(
            **_common(out),
            per_device_train_batch_size=2,
            eval_strategy="steps",
            eval_steps=2,
            max_steps=4,
            include_num_input_tokens_seen=True,
        )
        return Trainer(
            model=AutoModelForCausalLM.from_pretrained(tiny_model),
            args=args,
            train_dataset=data,
            eval_dataset=data.select(range(2)),
            data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
            callbacks=[cb],
        )

    return watch(build, tmp_path_factory.mktemp("plain"), trainer_attr=False)


@pytest.fixture(scope="module")
def legacy_ppo(tiny_model, tmp_path_factory):
    """The PPO example's own loop (TRL ≤ 0.11 `stats` keys through `on_step_end(step, stats)`), live."""
    import rlhf_tui.bridge as bridge
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

    tmp = tmp_path_factory.mktemp("legacy-ppo")
    logged: list[dict] = []

    class Recording(RLHFMonitorCallback):
        def log_step(self, step, metrics):
            logged.append({**metrics, "step": step})
            super().log_step(step, metrics)

    spec = importlib.util.spec_from_file_location("ppo_demo", REPO / "examples" / "ppo_monitoring_demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    address = free_address()
    from rlhf_tui.analysis.thresholds import Thresholds
    from rlhf_tui.bridge.monitor.subscriber import Subscriber
    from rlhf_tui.tui.widgets.model import view_report

    sub = Subscriber(address).start()
    mp = pytest.MonkeyPatch()
    mp.setattr(bridge, "PPOMonitoringCallback", Recording, raising=False)
    try:
        assert (
            demo.main(["--fast", "--model", tiny_model, "--steps", "4", "--workdir", str(tmp), "--address", address])
            == 0
        )
        wait_for(lambda: sub.store.current_run is not None and sub.store.current_run.ended is not None, timeout=30)
        with sub.store.lock:
            report = view_report(sub.store, Thresholds(), spark_width=24)
        return SimpleNamespace(history=logged, store=sub.store, run=sub.store.current_run, report=report)
    finally:
        mp.undo()
        sub.stop()


# -- RL ---------------------------------------------------------------------------------------------------
RL_CANONICAL = ("reward", "reward_std", "entropy", "loss", "grad_norm", "learning_rate", "completion_length")


def assert_rl_panes_rewards(report: dict, functions: int = 1) -> None:
    assert len(report["rewards"]["functions"]) == functions and report["rewards"]["batches"] > 0
    body = rewards_body(report)
    assert "stability" in body and "monitor_rewards" not in body


def assert_rl_panes(watched, functions: int = 1) -> None:
    report = watched.report
    assert report["run"]["kind"] == "rl"
    assert list(report["metrics"])[:2] == ["reward", "reward_std"]
    assert report["metrics"]["entropy"]["unit"] == "per token"
    assert_rl_panes_rewards(report, functions)


def test_grpo_with_a_lora_adapter_and_checkpoints(grpo_lora):
    w = grpo_lora
    assert_every_value_arrived(w)
    assert_canonical(w, (*RL_CANONICAL, "kl", "clip_ratio"))
    assert_rl_panes(w)
    assert w.run.meta["trainer"] == "GRPOTrainer" and w.run.meta["units"] == {"kl": "per token", "entropy": "per token"}
    assert w.report["run"]["units"] == {"kl": "per token", "entropy": "per token"}
    saved = {c["step"]: c for c in w.run.checkpoints}
    assert set(saved) == {2, 4} and all(c.get("status") == "analysed" for c in saved.values()), saved
    assert os.path.isfile(saved[2]["path"] + "/adapter_model.safetensors")


def test_grpo_two_reward_functions_two_iterations_accumulation_and_sparse_logging(grpo_two_rewards):
    w = grpo_two_rewards
    assert_every_value_arrived(w)
    assert list(w.run.steps) == [3, 6]
    assert_canonical(w, RL_CANONICAL)
    assert_rl_panes(w, functions=2)
    assert set(w.report["rewards"]["functions"]) == {"length_reward", "format_reward"}
    for name in ("length_reward", "format_reward"):  # TRL's per-function means arrive next to the batches
        assert np.isfinite(w.run.values(f"rewards/{name}/mean")).all()
    steps = {s for b in w.run.rewards for s in b.get("steps", [b["step"]])}
    assert steps <= {3, 6} and 6 in steps  # reward batches carry the step of their log_history row
    # the completions browser's buffer: every batch's 4 completions, both functions' scores joined to them
    buf = w.run.samples
    assert set(buf.sample_steps()) <= {3, 6} and 6 in buf.sample_steps()
    rows = buf.rows(6, num_generations=4, weights=w.run.meta["args"].get("reward_weights"))
    assert rows and len(rows) % 4 == 0 and all(set(r["scores"]) == {"length_reward", "format_reward"} for r in rows)
    for r in rows:
        assert r["total"] == pytest.approx(sum(r["scores"].values()))
        assert r["truncated"] == (r["length"] >= 8) and r["advantage"] is not None
    assert {"groups/too_easy", "groups/too_hard", "groups/zero_std_other"} <= set(w.run.metric_names())
    assert w.report["rewards"]["samples"] and w.report["rewards"]["last_step"] == 6  # the Rewards pane's few
    assert w.run.meta["trainer"] == "GRPOTrainer" and w.run.meta["units"]["entropy"] == "per token"  # from the args


def test_rloo(rloo):
    assert_every_value_arrived(rloo)
    assert_canonical(rloo, (*RL_CANONICAL, "kl", "clip_ratio"))
    assert_rl_panes(rloo)
    assert rloo.report["metrics"]["kl"]["unit"] == "per token"


def test_online_dpo_entropy_and_kl_are_per_sequence(online_dpo):
    w = online_dpo
    assert_every_value_arrived(w)
    assert_canonical(w, ("reward", "kl", "entropy", "loss", "grad_norm", "learning_rate"))
    np.testing.assert_array_equal(w.run.values("reward"), w.run.values("objective/scores"))
    np.testing.assert_array_equal(w.run.values("entropy"), w.run.values("objective/entropy"))
    assert w.report["run"]["kind"] == "rl" and w.run.meta["units"] == {"kl": "per sequence", "entropy": "per sequence"}
    metrics = w.report["metrics"]
    assert metrics["entropy"]["unit"] == metrics["objective/entropy"]["unit"] == "per sequence"
    assert metrics["kl"]["unit"] == "per sequence"
    assert_rl_panes_rewards(w.report)


# -- preference, reward model, language model ---------------------------------------------------------------
def test_dpo_with_an_eval_set(dpo):
    w = dpo
    assert_every_value_arrived(w)
    rows = train_rows(w.run)
    assert_canonical(w, ("reward", "loss", "grad_norm", "learning_rate", "entropy"), rows)
    np.testing.assert_array_equal(w.run.values("reward")[rows], w.run.values("rewards/margins")[rows])
    report = w.report
    assert report["run"]["kind"] == "preference" and report["run"]["trainer"] == "DPOTrainer"
    names = list(report["metrics"])
    assert names[:3] == ["rewards/accuracies", "eval_rewards/accuracies", "rewards/margins"]  # the block on top
    assert names.index("eval_loss") == names.index("loss") + 1 and names[names.index("loss") + 2] == "loss: eval−train"
    assert report["eval_pairs"]["loss"]["points"] == 4 and report["eval_pairs"]["loss"]["eval"] == "eval_loss"
    body = rewards_body(report)
    assert "monitor_rewards" not in body and "implicit rewards" in body
    for label in ("accuracy", "margin", "chosen", "rejected", "logp chosen", "logp rejected", "loss gap"):
        assert label in body, label
    gap = w.run.values("eval_loss")[-1] - w.run.values("loss")[-1]  # eval each step: the gap of the last step
    assert report["eval_pairs"]["loss"]["gap"] == pytest.approx(gap)


def test_reward_trainer(reward_model):
    w = reward_model
    assert_every_value_arrived(w)
    assert_canonical(w, ("reward", "loss", "grad_norm", "learning_rate"), train_rows(w.run))
    report = w.report
    assert report["run"]["kind"] == "reward_model"
    assert list(report["metrics"])[:4] == ["accuracy", "eval_accuracy", "margin", "eval_margin"]
    body = rewards_body(report)
    assert "pairwise ranking" in body and "accuracy" in body and "margin" in body and "monitor_rewards" not in body
    assert set(report["eval_pairs"]) >= {"loss", "accuracy", "margin"}


def test_sft_trainer(sft):
    w = sft
    assert_every_value_arrived(w)
    assert_canonical(w, ("loss", "grad_norm", "learning_rate", "entropy"), train_rows(w.run))
    report = w.report
    assert report["run"]["kind"] == "language_model" and report["metrics"]["entropy"]["unit"] == "per token"
    names = list(report["metrics"])
    assert names[:4] == ["loss", "eval_loss", "loss: eval−train", "mean_token_accuracy"]
    rate = report["metrics"]["tokens/s"]
    assert rate["derived"] and rate["last"] > 0 and rate["count"] == 3  # from the 2nd logged step on
    body = rewards_body(report)
    assert "no rewards in this run" in body and "tokens/s" in body and "token accuracy" in body
    assert "monitor_rewards" not in body and "loss gap" in body


def test_plain_trainer(plain):
    w = plain
    assert_every_value_arrived(w)
    assert_canonical(w, ("loss", "grad_norm", "learning_rate"), train_rows(w.run))
    report = w.report
    assert report["run"]["trainer"] == "Trainer" and report["run"]["kind"] == "language_model"
    assert list(report["metrics"])[:2] == ["loss", "eval_loss"]
    assert report["metrics"]["tokens/s"]["last"] > 0  # from num_input_tokens_seen
    assert report["eval_pairs"]["loss"]["points"] == 2
    assert "loss gap" in rewards_body(report)


def test_custom_loop_with_legacy_ppo_keys(legacy_ppo):
    w = legacy_ppo
    assert_every_value_arrived(w)
    assert_canonical(w, ("kl", "entropy", "reward", "reward_std", "policy_loss", "value_loss", "clip_ratio", "loss"))
    np.testing.assert_array_equal(w.run.values("kl"), w.run.values("objective/kl"))
    np.testing.assert_array_equal(w.run.values("entropy"), w.run.values("ppo/policy/entropy"))
    report = w.report
    assert report["run"]["trainer"] == "custom" and report["run"]["kind"] == "rl"
    units = {n: report["metrics"][n]["unit"] for n in ("kl", "entropy", "objective/kl", "objective/entropy")}
    assert units == {
        "kl": "per sequence",
        "entropy": "per token",
        "objective/kl": "per sequence",
        "objective/entropy": "per sequence",
    }
    assert "stability" in rewards_body(report)


# -- the panes of the real app, every workload a tab ---------------------------------------------------------
async def test_the_app_shows_each_workload_its_own_panes_and_never_overlays_two_units(
    grpo_two_rewards, online_dpo, dpo, sft, title
):
    from rlhf_tui.tui.app import MonitorApp
    from rlhf_tui.tui.widgets.chart import ChartScreen

    watched = [grpo_two_rewards, online_dpo, dpo, sft]
    app = MonitorApp([], stores=[w.store for w in watched], labels=["grpo", "odpo", "dpo", "sft"])
    async with app.run_test(size=(160, 48)) as pilot:
        expect = {
            "grpo": ("Rewards", "stability", "reward"),
            "odpo": ("Rewards", "stability", "reward"),
            "dpo": ("Preferences", "implicit rewards", "rewards/accuracies"),
            "sft": ("Language model", "no rewards in this run", "loss"),
        }
        for index, view in enumerate(app.views):
            if index:
                await pilot.press("right_square_bracket")
            await pilot_wait_for(pilot, lambda v=view: app.view is v and bool(v.report), message=view.label)
            await pilot.pause()
            pane_title, body, first = expect[view.label]
            rewards = view.pane("rewards")
            await pilot_wait_for(
                pilot, lambda r=rewards, t=pane_title: title(r).startswith(t), message=f"{view.label} title"
            )
            text = str(rewards.query_one("#rewards-body").render())
            assert body in text and "monitor_rewards" not in text, (view.label, text)
            assert view.pane("metrics").names[0] == first
        entropy = {v.label: v.report["metrics"]["entropy"] for v in app.views}
        assert entropy["grpo"]["unit"] == "per token" and entropy["odpo"]["unit"] == "per sequence"
        # the overlay of entropy from the GRPO tab: OnlineDPO's per-sequence entropy is left out, and it says so
        while app.view.label != "grpo":
            await pilot.press("right_square_bracket")
        metrics = app.view.pane("metrics")
        metrics.table.focus()
        metrics.table.move_cursor(row=metrics.names.index("entropy"))
        await pilot.press("o")
        await pilot_wait_for(pilot, lambda: isinstance(app.screen, ChartScreen), message="overlay")
        screen = app.screen
        labels = [s["label"] for s in screen._data["series"]]
        assert any("grpo" in x for x in labels) and not any("odpo" in x for x in labels), labels
        assert [s["unit"] for s in screen._data["left_out"]] == ["per sequence"]
        assert "left out: other unit" in str(screen.query_one("#chart-title").render())
        # Enter on the SFT tab's derived gap row charts the gap at each evaluation
        await pilot.press("escape")
        await pilot_wait_for(pilot, lambda: not isinstance(app.screen, ChartScreen), message="overlay closed")
        while app.view.label != "sft":
            await pilot.press("right_square_bracket")
        await pilot_wait_for(pilot, lambda: "loss: eval−train" in app.view.pane("metrics").names, message="gap row")
        metrics = app.view.pane("metrics")
        metrics.table.focus()
        metrics.table.move_cursor(row=metrics.names.index("loss: eval−train"))
        await pilot.press("enter")
        await pilot_wait_for(pilot, lambda: isinstance(app.screen, ChartScreen), message="chart of the gap")
        (gap,) = app.screen._data["series"]
        assert list(gap["steps"]) == [1, 2, 3, 4] and app.screen._data["band"] is None
        expected = sft.run.values("eval_loss") - sft.run.values("loss")  # an evaluation after every step
        np.testing.assert_allclose(gap["values"], expected)
