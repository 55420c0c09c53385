"""TRLIntegrationConfig (the seed's fields, the mapping onto GRPO/RLOO, the warnings) and TRLIntegrationManager
end to end: a real GRPO and RLOO training on the tiny local model with a local data file."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import warnings

import pytest

from rlhf_tui.bridge import TRLIntegrationConfig, TRLIntegrationManager
from rlhf_tui.bridge.training import integration
from rlhf_tui.bridge.training.integration import (
    AlgorithmUnavailableError,
    DatasetSourceError,
    IntegrationError,
    TRLMappingWarning,
    load_prompt_dataset,
    ppo_support,
)

# The guide's dataclass, verbatim: names, defaults, order.
SEED_FIELDS = [
    ("model_name", "gpt2"),
    ("learning_rate", 1e-5),
    ("batch_size", 4),
    ("mini_batch_size", 1),
    ("gradient_accumulation_steps", 1),
    ("ppo_epochs", 4),
    ("max_grad_norm", 1.0),
    ("cliprange", 0.2),
    ("cliprange_value", 0.2),
    ("vf_coef", 0.1),
    ("gamma", 1.0),
    ("lam", 0.95),
    ("kl_penalty", "kl"),
    ("target", 6.0),
    ("horizon", 10000.0),
    ("init_kl_coef", 0.2),
    ("adap_kl_ctrl", True),
    ("log_with", "tensorboard"),
    ("logging_dir", "./logs"),
    ("save_freq", 100),
    ("eval_freq", 50),
    ("project_name", "rlhf-trl-integration"),
    ("enable_profiling", True),
    ("enable_checkpoint_analysis", True),
    ("enable_reward_monitoring", True),
    ("anomaly_detection_threshold", 3.0),
    ("device", "auto"),
    ("fp16", False),
    ("bf16", False),
    ("gradient_checkpointing", False),
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model is overhead-bound: one torch thread is several times faster on a busy 2-core machine."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def prompts_file(tmp_path):
    from rlhf_tui.bridge.demo.tiny import PROMPTS

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS * 2))
    return str(path)


def _config(tmp_path, **kw):
    base = dict(
        log_with="none",
        logging_dir=str(tmp_path / "logs"),
        output_dir=str(tmp_path / "out"),
        monitor_address=False,
        max_completion_length=8,
        device="cpu",
    )
    base.update(kw)
    return TRLIntegrationConfig(**base)


# -- configuration ---------------------------------------------------------------------------------------------
def test_config_has_the_seed_fields_and_defaults_in_order():
    fields = [(f.name, f.default) for f in dataclasses.fields(TRLIntegrationConfig)][: len(SEED_FIELDS)]
    assert fields == SEED_FIELDS
    assert TRLIntegrationConfig().algorithm == "grpo"


def test_every_config_field_has_a_mapping_row():
    names = [f.name for f in dataclasses.fields(TRLIntegrationConfig)]
    assert [row[0] for row in integration.MAPPING] == names


def test_seed_fields_map_onto_grpo_config(tmp_path):
    from trl import GRPOConfig

    cfg = _config(
        tmp_path,
        learning_rate=3e-6,
        batch_size=6,
        gradient_accumulation_steps=2,
        ppo_epochs=3,
        cliprange=0.15,
        init_kl_coef=0.07,
        max_grad_norm=0.5,
        save_freq=7,
        eval_freq=9,
        bf16=True,
        gradient_checkpointing=True,
        project_name="p",
    )
    kwargs = cfg.to_trl_kwargs()
    assert kwargs["epsilon"] == 0.15 and kwargs["beta"] == 0.07 and kwargs["num_iterations"] == 3
    assert kwargs["per_device_train_batch_size"] == 6 and kwargs["gradient_accumulation_steps"] == 2
    assert kwargs["learning_rate"] == 3e-6 and kwargs["max_grad_norm"] == 0.5
    assert kwargs["save_steps"] == 7 and kwargs["eval_steps"] == 9 and kwargs["project"] == "p"
    assert kwargs["use_cpu"] is True and kwargs["bf16"] is True and kwargs["gradient_checkpointing"] is True
    assert kwargs["report_to"] == "none"
    assert kwargs["num_generations"] == 6  # largest of 8..2 dividing 6 × 2 = 12
    args = cfg.to_trl_config(run_id="run")
    assert isinstance(args, GRPOConfig)
    assert (args.epsilon, args.beta, args.num_iterations, args.per_device_train_batch_size) == (0.15, 0.07, 3, 6)
    assert args.use_cpu and args.activation_checkpointing and args.report_to == []
    assert args.generation_batch_size == 12 and args.run_name == "run"


def test_rloo_gets_the_same_mapping(tmp_path):
    from trl import RLOOConfig

    args = _config(tmp_path, algorithm="rloo", cliprange=0.3, init_kl_coef=0.01).to_trl_config(has_eval=True)
    assert isinstance(args, RLOOConfig)
    assert (args.epsilon, args.beta, args.num_iterations, args.num_generations) == (0.3, 0.01, 4, 4)
    assert args.eval_strategy == "steps" and args.eval_steps == 50 and args.per_device_eval_batch_size % 4 == 0


@pytest.mark.parametrize(
    "batch, accumulation, expected",
    [
        (4, 1, (4, None)),
        (6, 1, (6, None)),
        (12, 1, (6, None)),
        (16, 1, (8, None)),
        (11, 1, (11, None)),
        (1, 1, (2, 2)),
        (1, 3, (3, None)),
        (3, 2, (6, None)),
    ],
)
def test_num_generations_rule_always_gives_a_valid_grpo_config(tmp_path, batch, accumulation, expected):
    from trl import GRPOConfig

    cfg = _config(tmp_path, batch_size=batch, gradient_accumulation_steps=accumulation)
    assert cfg.generation_layout() == expected
    kwargs = {k: v for k, v in cfg.to_trl_kwargs().items() if k != "gradient_checkpointing"}
    GRPOConfig(**kwargs)  # raises if the generation batch does not hold whole groups


def test_explicit_num_generations_must_divide_the_batch(tmp_path):
    with pytest.raises(ValueError, match="must divide"):
        _config(tmp_path, batch_size=4, num_generations=3).to_trl_kwargs()
    assert _config(tmp_path, batch_size=4, num_generations=2).generation_layout() == (2, None)


def test_unmapped_fields_give_one_warning_naming_each(tmp_path):
    with pytest.warns(TRLMappingWarning) as record:
        TRLIntegrationManager(_config(tmp_path, vf_coef=0.5, gamma=0.99, adap_kl_ctrl=False))
    assert len(record) == 1
    message = str(record[0].message)
    for name in ("vf_coef=0.5", "gamma=0.99", "adap_kl_ctrl=False", "GRPOTrainer"):
        assert name in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TRLIntegrationManager(_config(tmp_path))  # the seed's defaults are documented as ignored: no warning
    assert set(TRLIntegrationConfig().unmapped_fields(only_changed=False)) == {
        "mini_batch_size",
        "cliprange_value",
        "vf_coef",
        "gamma",
        "lam",
        "kl_penalty",
        "target",
        "horizon",
        "adap_kl_ctrl",
    }


def test_fp16_on_cpu_warns_and_trains_in_fp32(tmp_path):
    with pytest.warns(TRLMappingWarning, match="fp16"):
        kwargs = _config(tmp_path, fp16=True).to_trl_kwargs()
    assert kwargs["fp16"] is False


def test_device_auto_uses_cpu_without_cuda_and_cuda_without_it_is_an_error(tmp_path):
    import torch

    assert _config(tmp_path, device="auto").use_cpu() is (not torch.cuda.is_available())
    if not torch.cuda.is_available():
        with pytest.raises(IntegrationError, match="cuda"):
            _config(tmp_path, device="cuda").to_trl_kwargs()
    with pytest.raises(ValueError, match="device"):
        _config(tmp_path, device="tpu")


def test_log_with_maps_to_report_to_and_a_missing_package_falls_back_to_none(tmp_path, monkeypatch):
    assert _config(tmp_path, log_with="none").reporters() == []
    assert _config(tmp_path, log_with=None).reporters() == []
    assert _config(tmp_path, log_with="tensorboard,wandb").reporters() == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match="unknown integration"):
        _config(tmp_path, log_with="tensorbored")
    monkeypatch.setitem(integration.REPORTERS, "tensorboard", ("surely_not_installed_tb",))
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    with pytest.warns(TRLMappingWarning, match="tensorboard"):
        args = _config(tmp_path, log_with="tensorboard").to_trl_config()
    assert args.report_to == []


def test_logging_dir_and_project_name_reach_tensorboard_and_wandb(tmp_path, monkeypatch):
    for name in ("tensorboard", "wandb"):  # pretend both are installed
        monkeypatch.setitem(integration.REPORTERS, name, ("json",))
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", "unset")  # restored after the test
    monkeypatch.setenv("WANDB_PROJECT", "unset")
    cfg = _config(
        tmp_path,
        log_with=["tensorboard", "wandb"],
        logging_dir=str(tmp_path / "tb"),
        run_id="r1",
        project_name="my-rlhf-project",
    )
    args = cfg.to_trl_config(max_steps=3)
    assert args.report_to == ["tensorboard", "wandb"] and args.run_name == "r1" and args.max_steps == 3
    assert os.environ["TENSORBOARD_LOGGING_DIR"] == str(tmp_path / "tb" / "tensorboard" / "r1")
    assert os.environ["WANDB_PROJECT"] == "my-rlhf-project"


def test_ppo_is_a_clear_error_on_trl_without_a_ppo_trainer():
    assert ppo_support("0.11.4") == "legacy"
    assert ppo_support("0.12.0") == "trainer" and ppo_support("1.12.2") == "trainer"
    assert ppo_support("1.13.0") == "removed" and ppo_support("2.0.0") == "removed"
    if ppo_support() != "removed":
        pytest.skip("the installed TRL still has a PPOTrainer")
    with pytest.raises(AlgorithmUnavailableError) as err:
        TRLIntegrationConfig(algorithm="ppo")
    for text in ("0.12", "1.12", "0.11", "1.13", "grpo"):
        assert text in str(err.value)


def test_unknown_algorithm_is_rejected():
    with pytest.raises(ValueError, match="grpo, rloo, ppo"):
        TRLIntegrationConfig(algorithm="a2c")


# -- datasets --------------------------------------------------------------------------------------------------
def test_datasets_from_files_folders_objects_and_lists(tmp_path):
    import datasets

    rows = [
        {"text": "one two three four five six seven eight nine ten", "label": 1},
        {"text": "short review", "label": 0},
    ]
    datasets.Dataset.from_list(rows).to_csv(str(tmp_path / "d.csv"))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for source in ("d.csv", "d.parquet", "saved", "d.jsonl"):
        ds = load_prompt_dataset(str(tmp_path / source))
        assert ds["prompt"] == ["one two three four five six seven eight", "short review"], source
    assert load_prompt_dataset(["a prompt"])["prompt"] == ["a prompt"]
    question = datasets.Dataset.from_dict({"question": ["what is one plus one, in words please?"]})
    assert load_prompt_dataset(question)["prompt"] == ["what is one plus one, in words please?"]
    assert load_prompt_dataset(datasets.DatasetDict({"train": question}))["prompt"][0].startswith("what")


def test_dataset_errors_are_clear(tmp_path, monkeypatch):
    with pytest.raises(DatasetSourceError, match="not found"):
        load_prompt_dataset(str(tmp_path / "missing.jsonl"))
    (tmp_path / "numbers.jsonl").write_text('{"x": 1}\n')
    with pytest.raises(DatasetSourceError, match="no 'prompt' column"):
        load_prompt_dataset(str(tmp_path / "numbers.jsonl"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetSourceError, match="Hub"):
        load_prompt_dataset("no-such-org/no-such-dataset-rlhf-tui")


def test_model_that_cannot_be_loaded_is_a_clear_error(tmp_path, prompts_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager = TRLIntegrationManager(_config(tmp_path))
    with pytest.raises(IntegrationError, match="no-such-org/no-such-model"):
        manager.setup_trl_trainer("no-such-org/no-such-model", prompts_file, reward_funcs=[len])


def test_training_before_setup_is_an_error(tmp_path):
    with pytest.raises(IntegrationError, match="setup_trl_trainer"):
        TRLIntegrationManager(_config(tmp_path)).train_with_monitoring(5)


# -- end to end ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_grpo_end_to_end_with_checkpoints_rewards_and_profiling(tiny_model, tmp_path, prompts_file):
    from trl import GRPOTrainer

    from rlhf_tui.tui.cli import main as cli_main

    manager = TRLIntegrationManager(
        _config(tmp_path, model_name=tiny_model, batch_size=4, ppo_epochs=2, init_kl_coef=0.05, save_freq=3)
    )
    with pytest.warns(TRLMappingWarning, match="default_reward"):
        trainer = manager.setup_trl_trainer(dataset_name=prompts_file)
    assert isinstance(trainer, GRPOTrainer) and trainer is manager.trainer
    assert manager.callback in trainer.callback_handler.callbacks
    results = manager.train_with_monitoring(num_steps=7, save_checkpoints=True)

    assert results["steps_completed"] == 7
    assert [c["step"] for c in results["checkpoints"]] == [3, 6, 7]  # every save_freq steps and the last one
    for ckpt in results["checkpoints"]:
        assert ckpt["status"] == "analysed" and 0.0 <= ckpt["health_score"] <= 1.0
        assert ckpt["path"].endswith(f"checkpoint-{ckpt['step']}")
    final = results["final_metrics"]
    for name in ("kl", "reward", "entropy", "loss", "grad_norm", "completion_length"):
        assert final[name] is not None, name
    rel = results["reward_reliability"]
    assert rel["batches"] >= 4 and {"stability", "consistency", "variance", "mean_reward"} <= set(rel)
    assert isinstance(results["anomalies"], list)
    assert results["log_path"].startswith(results["log_dir"])

    profile = results["profiling"]
    assert profile["steps"] == 7
    for phase in ("generation", "reward", "optimisation"):
        assert profile["phases"][phase]["total_s"] > 0, phase
    assert any(name.endswith("_calculate_rewards") for name in profile["trl_timings"])
    assert profile["trl_step_time_mean_s"] > 0
    metrics = results["report"]["metrics"]  # the phases are in the report, step by step
    for key in ("time/generation_s", "time/reward_s", "time/optimisation_s", "time/step_total_s", "step_time"):
        assert metrics[key]["count"] == 7, key

    # The numbers are those of `rlhf-tui report` on the same log. The results are built from memory, so what
    # each side measures itself (memory, the wall time between logs) is close but not identical.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["report", results["log_path"], "--format", "json"]) == 0
    report = json.loads(out.getvalue())

    def measured(name):
        return name.startswith("memory/") or name == "time/step_s"

    # groups/* come from per-sample scores, which the in-memory results and the log join differently
    assert {k for k in report["metrics"] if not k.startswith("groups/")} == {
        k for k in final if not k.startswith("groups/")
    }
    assert {k: v["last"] for k, v in report["metrics"].items() if not measured(k) and not k.startswith("groups/")} == {
        k: v for k, v in final.items() if not measured(k) and not k.startswith("groups/")
    }
    assert [a for a in report["anomalies"] if not measured(a["metric"])] == [
        a for a in results["anomalies"] if not measured(a["metric"])
    ]
    assert [c["health_score"] for c in report["checkpoints"]] == [c["health_score"] for c in results["checkpoints"]]

    with pytest.raises(IntegrationError, match="already been trained"):
        manager.train_with_monitoring(2)


@pytest.mark.slow
def test_rloo_end_to_end_from_a_text_column_without_checkpoints(tiny_model, tmp_path):
    from trl import RLOOTrainer

    from rlhf_tui.bridge.demo.tiny import CORPUS, length_reward

    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": 1}) + "\n" for t in CORPUS))
    manager = TRLIntegrationManager(
        _config(tmp_path, model_name=tiny_model, algorithm="rloo", batch_size=4, ppo_epochs=1, enable_profiling=False)
    )
    trainer = manager.setup_trl_trainer(dataset_name=str(data), reward_funcs=length_reward)
    assert isinstance(trainer, RLOOTrainer)
    assert trainer.train_dataset[0]["prompt"] == " ".join(CORPUS[0].split()[:8])
    results = manager.train_with_monitoring(num_steps=6, save_checkpoints=False)
    assert results["steps_completed"] == 6 and results["checkpoints"] == []
    assert results["final_metrics"]["kl"] is not None and results["final_metrics"]["reward"] is not None
    assert "profiling" not in results
    assert results["report"]["run"]["trainer"] == "RLOOTrainer"


@pytest.mark.slow
def test_training_errors_reach_the_caller(tiny_model, tmp_path, prompts_file):
    def broken_reward(completions, **kwargs):
        raise RuntimeError("reward service down")

    manager = TRLIntegrationManager(_config(tmp_path, model_name=tiny_model, ppo_epochs=1, init_kl_coef=0.0))
    manager.setup_trl_trainer(dataset_name=prompts_file, reward_funcs=[broken_reward])
    with pytest.raises(RuntimeError, match="reward service down"):
        manager.train_with_monitoring(3)
    # the log is still complete, so `rlhf-tui report` can show what happened
    events = [json.loads(line)["event"] for line in open(manager.callback.log_path)]
    assert events[0] == "run_start" and events[-1] == "run_end"


def test_the_integration_does_not_import_the_monitor_side():
    import subprocess
    import sys

    code = (
        "import sys, rlhf_tui.bridge.training.integration as i\n"
        "from rlhf_tui.bridge.training.integration import manager, results, ppo\n"
        "bad = [m for m in sys.modules if m.startswith(('rlhf_tui.bridge.monitor', 'rlhf_tui.tui'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_tensorboard_folder_is_set_for_the_managers_trainer_only(tiny_model, tmp_path, monkeypatch):
    # setup_trl_trainer left TENSORBOARD_LOGGING_DIR set for the process: a later trainer (a notebook cell)
    # wrote its TensorBoard events into this run's folder, and `rlhf-tui report OUTPUT_DIR` found none.
    pytest.importorskip("tensorboard")
    from transformers.integrations import TensorBoardCallback

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    cfg = _config(tmp_path, model_name=tiny_model, log_with="tensorboard", run_id="r1", batch_size=2, ppo_epochs=1)
    trainer = TRLIntegrationManager(cfg).setup_trl_trainer(dataset_name=["a b c", "d e f"], reward_funcs=[len])
    [tb] = [c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)]
    assert tb.logging_dir == str(tmp_path / "logs" / "tensorboard" / "r1")
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ
