"""The seed's TRL integration on today's TRL: `TRLIntegrationConfig` (the guide's fields, mapped onto GRPO/RLOO
config fields) and `TRLIntegrationManager` (sets up a trainer with our callback attached and really trains).

The mapping table, the batch-size rule and the default reward are documented in docs/trl-integration.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import threading
import time
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:  # the manager needs transformers; the config (and its mapping) does not
    from transformers import TrainerCallback as _CallbackBase
except Exception:  # pragma: no cover - exercised only without transformers
    _CallbackBase = object

log = logging.getLogger("rlhf_tui.bridge.training.integration")

__all__ = [
    "TRLIntegrationConfig",
    "TRLIntegrationManager",
    "PhaseProfiler",
    "IntegrationError",
    "AlgorithmUnavailableError",
    "DatasetSourceError",
    "TRLMappingWarning",
    "default_reward",
    "load_prompt_dataset",
    "format_profile",
    "format_results",
    "ppo_support",
    "available_reporters",
    "MAPPING",
    "PROFILE_KEYS",
    # the seed's single import place (`rlhf_core.trl_integration`) had these too
    "PPOMonitoringCallback",
    "RLHFMonitorCallback",
    "CheckpointAnalyzer",
    "RewardModelIntegrator",
]

ALGORITHMS = ("grpo", "rloo", "ppo")
DEVICES = ("auto", "cpu", "cuda")
# log_with value -> importable packages (any one is enough)
REPORTERS: dict[str, tuple[str, ...]] = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "trackio": ("trackio",),
    "mlflow": ("mlflow",),
    "comet_ml": ("comet_ml",),
    "clearml": ("clearml",),
    "swanlab": ("swanlab",),
    "dvclive": ("dvclive",),
    "neptune": ("neptune",),
    "codecarbon": ("codecarbon",),
    "azure_ml": ("azureml",),
}
DATA_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# Columns turned into prompts when a dataset has no `prompt` column: prompt-like ones are used whole,
# documents (e.g. IMDb reviews) are cut to their first words, as TRL's old IMDb PPO example did.
PROMPT_LIKE_COLUMNS = ("query", "question", "instruction", "input")
DOCUMENT_COLUMNS = ("text", "content", "review", "sentence", "document")
TEXT_PROMPT_WORDS = 8


class IntegrationError(RuntimeError):
    """Something the user asked for cannot be set up; the message says what and what to do instead."""


class AlgorithmUnavailableError(IntegrationError):
    """The requested algorithm does not exist in the installed TRL (e.g. PPO on TRL >= 1.13)."""


class DatasetSourceError(IntegrationError):
    """A dataset that cannot be loaded or has no column that can be turned into prompts."""


class TRLMappingWarning(UserWarning):
    """A seed setting that today's TRL cannot honour (ignored or changed); one warning per cause."""


# -- the seed's names, importable from here as from `rlhf_core.trl_integration` --------------------------------
_REEXPORTS = {
    "PPOMonitoringCallback": "rlhf_tui.bridge.training.callback",
    "RLHFMonitorCallback": "rlhf_tui.bridge.training.callback",
    "CheckpointAnalyzer": "rlhf_tui.analysis.checkpoint",
    "RewardModelIntegrator": "rlhf_tui.analysis.rewards",
}


def __getattr__(name: str) -> Any:
    module = _REEXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


# -- TRL version facts ---------------------------------------------------------------------------------------
def _trl_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("trl")
    except metadata.PackageNotFoundError:
        return None


def ppo_support(version: str | None = None) -> str:
    """Which PPOTrainer the installed TRL has: 'trainer' (0.12–1.12, a transformers Trainer), 'legacy' (≤ 0.11,
    `trainer.step(queries, responses, scores)`), 'removed' (≥ 1.13) or 'missing' (TRL not installed)."""
    version = version if version is not None else _trl_version()
    if version is None:
        return "missing"
    try:
        from packaging.version import Version

        v = Version(version)
        major_minor = (v.major, v.minor)
    except Exception:
        parts = (version.split(".") + ["0"])[:2]
        major_minor = tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)
    if major_minor < (0, 12):
        return "legacy"
    if major_minor < (1, 13):
        return "trainer"
    return "removed"


PPO_VERSIONS = (
    "TRL 0.12–1.12 have a PPOTrainer that is a transformers Trainer (`from trl import PPOTrainer` "
    "in 0.12–0.28, `from trl.experimental.ppo import PPOTrainer` in 0.26–1.12); TRL ≤ 0.11 has the "
    "legacy one (`trainer.step(queries, responses, scores)`, no callbacks)"
)


def _ppo_unavailable_message(version: str | None) -> str:
    return (
        f"algorithm='ppo' is not available: the installed TRL {version} has no PPOTrainer (removed in 1.13). "
        f"{PPO_VERSIONS}. Use algorithm='grpo' or 'rloo' (same clipped objective, no value model), or "
        "install 'trl>=0.12,<1.13' for PPO."
    )


# -- the configuration ---------------------------------------------------------------------------------------
# (seed field, TRL field it becomes, note). One row per field of the dataclass; docs/trl-integration.md has the
# same table and the tests check that both list every field.
MAPPING: tuple[tuple[str, str, str], ...] = (
    ("model_name", "model", "hub id or local folder; default for setup_trl_trainer(model_name=...)"),
    ("learning_rate", "learning_rate", ""),
    ("batch_size", "per_device_train_batch_size", "completions per device per micro-step"),
    (
        "mini_batch_size",
        "—",
        "no equivalent in GRPO/RLOO: every optimizer step uses the whole batch "
        "(PPO 0.12–1.12: num_mini_batches = batch_size / mini_batch_size)",
    ),
    ("gradient_accumulation_steps", "gradient_accumulation_steps", ""),
    ("ppo_epochs", "num_iterations", "updates per generated batch (PPO 0.12–1.12: num_ppo_epochs)"),
    ("max_grad_norm", "max_grad_norm", ""),
    ("cliprange", "epsilon", "PPO 0.12–1.12: cliprange"),
    ("cliprange_value", "—", "no value model in GRPO/RLOO (PPO 0.12–1.12: cliprange_value)"),
    ("vf_coef", "—", "no value model in GRPO/RLOO (PPO 0.12–1.12: vf_coef)"),
    ("gamma", "—", "no GAE: group-relative / leave-one-out advantages (PPO 0.12–1.12: gamma)"),
    ("lam", "—", "no GAE (PPO 0.12–1.12: lam)"),
    ("kl_penalty", "—", "GRPO/RLOO use a fixed KL estimator (PPO 0.12–1.12: kl_estimator 'k1' for 'kl')"),
    ("target", "—", "no adaptive KL controller in TRL ≥ 0.12"),
    ("horizon", "—", "no adaptive KL controller in TRL ≥ 0.12"),
    ("init_kl_coef", "beta", "fixed KL coefficient; 0 loads no reference model (PPO 0.12–1.12: kl_coef)"),
    ("adap_kl_ctrl", "—", "no adaptive KL controller in TRL ≥ 0.12: beta stays fixed"),
    ("log_with", "report_to", "tensorboard | wandb | trackio | none …; a missing package falls back to none"),
    (
        "logging_dir",
        "TENSORBOARD_LOGGING_DIR",
        "transformers 5 dropped logging_dir: TensorBoard writes to "
        "<logging_dir>/tensorboard/<run_id>, our JSONL to <logging_dir>/rlhf-tui",
    ),
    ("save_freq", "save_steps", "plus a final checkpoint at the last step"),
    ("eval_freq", "eval_steps", "used when setup_trl_trainer gets an eval_dataset"),
    ("project_name", "project / WANDB_PROJECT", "trackio project; W&B project (env) when log_with has wandb"),
    ("enable_profiling", "—", "rlhf-tui: per-phase timings (time/* metrics, results['profiling'])"),
    ("enable_checkpoint_analysis", "—", "rlhf-tui: health analysis of every saved checkpoint"),
    ("enable_reward_monitoring", "—", "rlhf-tui: reward functions wrapped by monitor_rewards"),
    ("anomaly_detection_threshold", "—", "rlhf-tui: anomaly_threshold of the callback and the report"),
    ("device", "use_cpu", "auto: CPU when CUDA is unavailable; cpu: use_cpu=True; cuda: error if unavailable"),
    ("fp16", "fp16", "ignored with a warning on CPU"),
    ("bf16", "bf16", ""),
    ("gradient_checkpointing", "activation_checkpointing", "transformers 5's name (gradient_checkpointing before)"),
    ("algorithm", "trainer class", "grpo → GRPOTrainer, rloo → RLOOTrainer, ppo → PPOTrainer (TRL 0.12–1.12)"),
    (
        "num_generations",
        "num_generations",
        "None: the largest of 8..2 dividing batch_size × gradient_accumulation_steps",
    ),
    ("max_completion_length", "max_completion_length", ""),
    ("temperature", "temperature", ""),
    ("logging_steps", "logging_steps", ""),
    ("output_dir", "output_dir", "checkpoints go to <output_dir>/checkpoint-<step>"),
    ("seed", "seed", ""),
    (
        "monitor_address",
        "—",
        "rlhf-tui: where live monitors connect (None: tcp://127.0.0.1:5555 or $RLHF_TUI_ADDRESS; False: no socket)",
    ),
    ("run_id", "run_name", "rlhf-tui run id (default: time + random)"),
    ("trl_args", "any", "extra GRPOConfig/RLOOConfig keyword arguments; they win over the mapping"),
)

# Seed fields that GRPO/RLOO cannot honour, with the reason given in the warning.
UNMAPPED_REASONS = {
    "mini_batch_size": "every optimizer step uses the whole batch_size × gradient_accumulation_steps completions",
    "cliprange_value": "there is no value model",
    "vf_coef": "there is no value model",
    "gamma": "advantages are group-relative (GRPO) or leave-one-out (RLOO), not GAE",
    "lam": "advantages are group-relative (GRPO) or leave-one-out (RLOO), not GAE",
    "kl_penalty": "the KL estimator is fixed",
    "target": "there is no adaptive KL controller; beta stays at init_kl_coef",
    "horizon": "there is no adaptive KL controller; beta stays at init_kl_coef",
    "adap_kl_ctrl": "there is no adaptive KL controller; beta stays at init_kl_coef",
}
UNMAPPED_FOR_PPO = ("target", "horizon", "adap_kl_ctrl")


@dataclass
class TRLIntegrationConfig:
    """The guide's configuration (same fields and defaults) plus rlhf-tui's additions (`algorithm` …).

    Seed fields that today's TRL cannot honour are listed by `unmapped_fields()`; the manager warns once about
    those you changed. `to_trl_kwargs()` gives the GRPOConfig/RLOOConfig keyword arguments.
    """

    # Training configuration
    model_name: str = "gpt2"
    learning_rate: float = 1e-5
    batch_size: int = 4
    mini_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    ppo_epochs: int = 4
    max_grad_norm: float = 1.0

    # PPO specific
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    kl_penalty: str = "kl"
    target: float = 6.0
    horizon: float = 10000.0
    init_kl_coef: float = 0.2
    adap_kl_ctrl: bool = True

    # Monitoring and logging
    log_with: str | list[str] | None = "tensorboard"
    logging_dir: str = "./logs"
    save_freq: int = 100
    eval_freq: int = 50
    project_name: str = "rlhf-trl-integration"

    # Advanced monitoring
    enable_profiling: bool = True
    enable_checkpoint_analysis: bool = True
    enable_reward_monitoring: bool = True
    anomaly_detection_threshold: float = 3.0

    # Device and optimization
    device: str = "auto"
    fp16: bool = False
    bf16: bool = False
    gradient_checkpointing: bool = False

    # rlhf-tui additions
    algorithm: str = "grpo"
    num_generations: int | None = None
    max_completion_length: int = 64
    temperature: float = 1.0
    logging_steps: int = 1
    output_dir: str = "./checkpoints"
    seed: int = 42
    monitor_address: str | bool | None = None
    run_id: str | None = None
    trl_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.algorithm = str(self.algorithm).lower()
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {', '.join(ALGORITHMS)}, not {self.algorithm!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, not {self.device!r}")
        for name in (
            "batch_size",
            "mini_batch_size",
            "gradient_accumulation_steps",
            "ppo_epochs",
            "save_freq",
            "eval_freq",
            "logging_steps",
            "max_completion_length",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value!r}")
        if self.num_generations is not None and (not isinstance(self.num_generations, int) or self.num_generations < 2):
            raise ValueError(f"num_generations must be None or an integer >= 2, not {self.num_generations!r}")
        unknown = [r for r in self.reporters() if r not in REPORTERS and r != "all"]
        if unknown:
            raise ValueError(
                f"log_with: unknown integration {unknown[0]!r}; use one of "
                f"{', '.join(sorted(REPORTERS))}, 'all' or 'none'"
            )
        if self.algorithm == "ppo" and ppo_support() == "removed":
            raise AlgorithmUnavailableError(_ppo_unavailable_message(_trl_version()))

    # -- what maps where ----------------------------------------------------------------------------
    def reporters(self) -> list[str]:
        """`log_with` as a list of integration names ([] for none)."""
        value = self.log_with
        if value is None:
            return []
        names = value.split(",") if isinstance(value, str) else list(value)
        names = [str(n).strip().lower() for n in names if str(n).strip()]
        return [] if names in ([], ["none"]) else [n for n in names if n != "none"]

    def unmapped_fields(self, only_changed: bool = True) -> list[str]:
        """Seed fields the chosen algorithm cannot honour (by default only those changed from the seed's
        defaults: the defaults are documented as ignored)."""
        names = UNMAPPED_FOR_PPO if self.algorithm == "ppo" else tuple(UNMAPPED_REASONS)
        if not only_changed:
            return list(names)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [n for n in names if getattr(self, n) != defaults[n]]

    def mapping(self) -> list[dict]:
        """The mapping table with this config's values: {field, value, trl_field, trl_value, note}."""
        kwargs = self.to_trl_kwargs(warn=False)
        rows = []
        for name, trl_field, note in MAPPING:
            trl_value = kwargs.get(trl_field, kwargs.get(name))
            if name in UNMAPPED_REASONS and name in self.unmapped_fields(only_changed=False):
                trl_field, trl_value = "—", None
            rows.append(
                {
                    "field": name,
                    "value": getattr(self, name),
                    "trl_field": trl_field,
                    "trl_value": trl_value,
                    "note": note,
                }
            )
        return rows

    def use_cpu(self) -> bool:
        if self.device == "cpu":
            return True
        try:
            import torch

            cuda = bool(torch.cuda.is_available())
        except Exception:
            cuda = False
        if self.device == "cuda" and not cuda:
            raise IntegrationError(
                "device='cuda' but torch.cuda.is_available() is False: use device='auto' "
                "or 'cpu', or install a CUDA build of torch"
            )
        return not cuda

    def generation_layout(self) -> tuple[int, int | None]:
        """(num_generations, steps_per_generation or None) for GRPO/RLOO.

        Rule: the generation batch is batch_size × gradient_accumulation_steps (× processes) completions and
        must hold whole groups of num_generations (≥ 2). Unset, num_generations is the largest of 8..2 that
        divides batch_size × gradient_accumulation_steps, or that product itself; when it is 1 (batch_size=1,
        no accumulation) completions are generated two steps' worth at a time (steps_per_generation=2).
        """
        per_round = self.batch_size * self.gradient_accumulation_steps
        if self.num_generations is not None:
            if per_round % self.num_generations:
                raise ValueError(
                    f"num_generations={self.num_generations} must divide batch_size × gradient_accumulation_steps "
                    f"= {per_round} (GRPO/RLOO generate whole groups per batch); pick a divisor, or leave "
                    "num_generations=None to choose one"
                )
            return self.num_generations, None
        if per_round == 1:
            return 2, 2
        for candidate in range(min(8, per_round), 1, -1):
            if per_round % candidate == 0:
                return candidate, None
        return per_round, None  # a prime above 8: one prompt per batch, all completions in one group

    def to_trl_kwargs(self, *, warn: bool = True) -> dict:
        """Keyword arguments for GRPOConfig/RLOOConfig (without max_steps and the save schedule, which
        `train_with_monitoring` sets). `warn`: emit the fp16-on-CPU warning."""
        use_cpu = self.use_cpu()
        fp16 = self.fp16
        if fp16 and use_cpu:
            if warn:
                warnings.warn(
                    "fp16=True needs a GPU; training on CPU in fp32 instead (bf16=True works on CPU)",
                    TRLMappingWarning,
                    stacklevel=3,
                )
            fp16 = False
        num_generations, steps_per_generation = self.generation_layout()
        kwargs: dict[str, Any] = {
            "output_dir": self.output_dir,
            "learning_rate": self.learning_rate,
            "per_device_train_batch_size": self.batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "num_iterations": self.ppo_epochs,
            "max_grad_norm": self.max_grad_norm,
            "epsilon": self.cliprange,
            "beta": self.init_kl_coef,
            "num_generations": num_generations,
            "max_completion_length": self.max_completion_length,
            "temperature": self.temperature,
            "logging_steps": self.logging_steps,
            "save_steps": self.save_freq,
            "eval_steps": self.eval_freq,
            "report_to": self.reporters() or "none",
            "project": self.project_name,
            "use_cpu": use_cpu,
            "fp16": fp16,
            "bf16": self.bf16,
            "gradient_checkpointing": self.gradient_checkpointing,
            "seed": self.seed,
        }
        if self.run_id:
            kwargs["run_name"] = self.run_id
        if steps_per_generation is not None:
            kwargs["steps_per_generation"] = steps_per_generation
        kwargs.update(self.trl_args)
        return kwargs

    def to_trl_config(self, max_steps: int = -1, *, run_id: str | None = None, has_eval: bool = False):
        """The GRPOConfig/RLOOConfig the manager uses, for a trainer of your own: checkpoints every save_freq
        steps, `log_with` integrations that are not installed dropped (one warning each), and for TensorBoard
        and W&B the environment variables that take logging_dir and project_name."""
        if self.algorithm == "ppo":
            raise IntegrationError("to_trl_config covers GRPO and RLOO; PPO is set up by TRLIntegrationManager")
        kwargs = self.to_trl_kwargs()
        report_to = available_reporters(self.reporters())
        kwargs["report_to"] = report_to or "none"
        run_id = run_id or self.run_id
        if run_id:
            kwargs.setdefault("run_name", run_id)
        if "tensorboard" in report_to:
            # transformers 5 has no logging_dir argument: TensorBoardCallback reads this variable.
            os.environ["TENSORBOARD_LOGGING_DIR"] = os.path.join(self.logging_dir, "tensorboard", run_id or "run")
        if "wandb" in report_to:
            os.environ["WANDB_PROJECT"] = self.project_name
        kwargs.setdefault("max_steps", max_steps)
        kwargs.setdefault("save_strategy", "steps")
        if has_eval:
            num_generations = kwargs["num_generations"]
            kwargs.setdefault("eval_strategy", "steps")
            kwargs.setdefault(
                "per_device_eval_batch_size", num_generations * math.ceil(self.batch_size / num_generations)
            )
        config_cls = _config_class(self.algorithm)
        names = {f.name for f in dataclasses.fields(config_cls)}
        if "activation_checkpointing" in names and "activation_checkpointing" not in kwargs:
            # transformers 5 renamed it (the old name still works, with a FutureWarning)
            kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
        for key in ("project", "steps_per_generation"):  # fields older TRL/transformers do not have
            if key in kwargs and key not in names:
                kwargs.pop(key)
        return config_cls(**kwargs)


def available_reporters(names: list[str]) -> list[str]:
    """The `log_with` integrations whose package is installed; one warning for each one that is not."""
    import importlib.util

    out = []
    for name in names:
        modules = REPORTERS.get(name)
        if modules is None or any(importlib.util.find_spec(m) for m in modules):
            out.append(name)
            continue
        warnings.warn(
            f"log_with={name!r} needs the {modules[0]} package (pip install {modules[0]}); "
            f"reporting to {name} is off for this run (rlhf-tui monitoring is unaffected)",
            TRLMappingWarning,
            stacklevel=4,
        )
    return out


# -- the default reward --------------------------------------------------------------------------------------
def default_reward(completions, **kwargs) -> list[float]:
    """rlhf-tui's default reward (format and length), used when no reward function is given. For smoke tests
    and demos only: it knows nothing about your task.

    score = share of distinct words (repetition loops score low)
            − |words − 20| / 20, clipped to at most 1 (about 20 words is best)
            + 0.5 when the completion ends a sentence (. ! ?)
    """
    from rlhf_tui.bridge.training.rewards import _text

    out = []
    for completion in completions:
        words = _text(completion).split()
        if not words:
            out.append(-1.0)
            continue
        distinct = len({w.lower() for w in words}) / len(words)
        length = min(1.0, abs(len(words) - 20) / 20.0)
        ends = 0.5 if words[-1].endswith((".", "!", "?")) else 0.0
        out.append(float(distinct - length + ends))
    return out


# -- datasets ------------------------------------------------------------------------------------------------
def load_prompt_dataset(source: Any, split: str = "train", text_prompt_words: int | None = TEXT_PROMPT_WORDS):
    """A `datasets.Dataset` with a `prompt` column from: a Dataset/DatasetDict, a list of strings or dicts, a
    local .json/.jsonl/.csv/.parquet file, a `save_to_disk` folder, a folder of data files, or a hub id.

    Without a `prompt` column, the first of query/question/instruction/input is used whole, or the first of
    text/content/review/sentence/document is cut to its first `text_prompt_words` words.
    """
    import datasets

    dataset = source
    if isinstance(source, (str, os.PathLike)):
        dataset = _load_dataset_source(os.fspath(source), split)
    elif isinstance(source, (list, tuple)):
        if not source:
            raise DatasetSourceError("the dataset list is empty")
        rows = [{"prompt": s} if isinstance(s, str) else dict(s) for s in source]
        dataset = datasets.Dataset.from_list(rows)
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if split not in dataset:
            raise DatasetSourceError(f"the dataset has no split {split!r} (it has {', '.join(dataset)})")
        dataset = dataset[split]
    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        raise DatasetSourceError(
            f"cannot use {type(source).__name__} as a dataset: pass a hub id, a local "
            ".json/.jsonl/.csv/.parquet file, a save_to_disk folder or a datasets.Dataset"
        )
    return _with_prompts(dataset, text_prompt_words)


def _load_dataset_source(name: str, split: str):
    import datasets

    path = Path(name).expanduser()
    if path.is_file():
        kind = DATA_SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DatasetSourceError(f"{name}: unsupported data file (use .json, .jsonl, .csv or .parquet)")
        try:
            return datasets.load_dataset(kind, data_files=str(path), split="train")
        except Exception as exc:
            raise DatasetSourceError(f"{name}: cannot read as {kind}: {_first_line(exc)}") from exc
    if path.is_dir():
        if (
            (path / "dataset_info.json").is_file()
            or (path / "dataset_dict.json").is_file()
            or (path / "state.json").is_file()
        ):
            try:
                return datasets.load_from_disk(str(path))
            except Exception as exc:
                raise DatasetSourceError(f"{name}: not a readable save_to_disk folder: {_first_line(exc)}") from exc
        try:
            return datasets.load_dataset(str(path), split=split)
        except Exception as exc:
            raise DatasetSourceError(f"{name}: no data files datasets can read: {_first_line(exc)}") from exc
    if name.startswith((".", "/", "~")) or Path(name).suffix.lower() in DATA_SUFFIXES:
        raise DatasetSourceError(f"dataset file or folder not found: {name}")
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as exc:
        offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        raise DatasetSourceError(
            f"cannot load dataset {name!r} from the Hugging Face Hub{hint}: {_first_line(exc)}. Offline, pass a "
            "local .json/.jsonl/.csv/.parquet file, a save_to_disk folder or a datasets.Dataset"
        ) from exc


def _with_prompts(dataset, words: int | None):
    columns = list(dataset.column_names or [])
    if "prompt" in columns:
        return dataset
    features = getattr(dataset, "features", None) or {}

    def is_text(col: str) -> bool:
        feature = features.get(col)
        return getattr(feature, "dtype", None) in ("string", "large_string")

    column = next((c for c in PROMPT_LIKE_COLUMNS if c in columns and is_text(c)), None)
    cut = None
    if column is None:
        column = next((c for c in DOCUMENT_COLUMNS if c in columns and is_text(c)), None)
        if column is None:
            column = next((c for c in columns if is_text(c)), None)
        cut = words
    if column is None:
        raise DatasetSourceError(
            f"the dataset has no 'prompt' column and no text column to make prompts from "
            f"(columns: {', '.join(columns) or 'none'})"
        )

    def to_prompt(row):
        text = row[column] or ""
        return {"prompt": " ".join(text.split()[:cut]) if cut else text}

    return dataset.map(to_prompt)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# -- profiling -----------------------------------------------------------------------------------------------
# TRL times its own phases with `trl.extras.profiling.ProfilingContext` but sends the numbers only to
# wandb/mlflow/trackio. One hook (installed once, forwarding to the profilers of running trainers) lets us
# use the same timings whatever `report_to` is.
_profiling_listeners: weakref.WeakSet[PhaseProfiler] = weakref.WeakSet()
_hook_lock = threading.Lock()


def _install_trl_profiling_hook() -> bool:
    with _hook_lock:
        try:
            from trl.extras.profiling import ProfilingContext
        except Exception:
            return False
        if getattr(ProfilingContext, "_rlhf_tui_hooked", False):
            return True
        original = getattr(ProfilingContext, "_log_metrics", None)
        if original is None:
            return False

        def _log_metrics(self, duration):
            for listener in list(_profiling_listeners):
                try:
                    listener.record_trl(self.name, duration)
                except Exception:
                    pass
            return original(self, duration)

        ProfilingContext._log_metrics = _log_metrics
        ProfilingContext._rlhf_tui_hooked = True
        return True


def _never_raise(hook: Callable) -> Callable:
    """Profiling runs inside training: a bug of ours is logged once and switches profiling off, never raised."""

    @functools.wraps(hook)
    def guarded(self, *args, **kwargs):
        if self.failed:
            return None
        try:
            return hook(self, *args, **kwargs)
        except Exception as exc:
            self.failed = True
            log.warning("rlhf-tui: profiling disabled after an error in %s: %s", hook.__name__, exc)
            return None

    return guarded


PHASES = ("generation", "reward", "scoring", "optimisation")
# The metric each timing is logged under. "time/" like the callback's own time/step_s: the monitor plots them but
# the generic z-score detector leaves them alone (timings are noisy by nature; step_time_regression covers them).
PROFILE_KEYS = {
    "generation": "time/generation_s",
    "reward": "time/reward_s",
    "scoring": "time/scoring_s",
    "optimisation": "time/optimisation_s",
    "optimizer_step": "time/optimizer_step_s",
    "step": "time/step_total_s",
}


class PhaseProfiler(_CallbackBase):
    """Per-step phase timings: generation and reward from TRL's own profiling contexts (reward falls back to our
    reward-function wrapper), optimisation (forward, backward, optimizer) from our step hooks.

    Each logged step gets `time/<phase>_s` (mean per optimizer step since the last log) so the live
    monitor and `rlhf-tui report` show them; `summary()` gives totals and shares. Add it before the monitor
    callback: it writes into the same `logs` dict the monitor then reads.
    """

    def __init__(self):
        self._thread: int | None = None
        self._step_start: float | None = None
        self._opt_start: float | None = None
        self._current: dict[str, float] = defaultdict(float)
        self._window: dict[str, float] = defaultdict(float)
        self._window_steps = 0
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0
        self.trl_timings: dict[str, list[float]] = {}
        self.trl_hooked = False
        self.failed = False

    # -- inputs ----------------------------------------------------------------------------------
    def record_trl(self, name: str, seconds: float) -> None:
        if self._thread is not None and threading.get_ident() != self._thread:
            return  # another trainer in another thread
        entry = self.trl_timings.setdefault(name, [0.0, 0])
        entry[0] += seconds
        entry[1] += 1
        short = name.split(".", 1)[1] if "." in name else name
        if short.endswith(("generate", "generate_batch")):
            self._current["generation"] += seconds
        elif short == "_calculate_rewards":
            self._current["reward_trl"] += seconds
        elif short == "_prepare_inputs":
            self._current["prepare"] += seconds

    def record_reward_funcs(self, seconds: float) -> None:
        self._current["reward_funcs"] += seconds

    def wrap_reward(self, fn: Callable) -> Callable:
        """Time a reward function (name kept, so TRL's rewards/<name>/* keys do not change)."""
        if isinstance(fn, str) or not callable(fn) or (hasattr(fn, "config") and hasattr(fn, "forward")):
            return fn
        name = getattr(fn, "__name__", None) or type(fn).__name__

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.record_reward_funcs(time.perf_counter() - start)

        timed.__name__ = name
        return timed

    # -- TrainerCallback hooks ---------------------------------------------------------------------
    @_never_raise
    def on_train_begin(self, args=None, state=None, control=None, **kwargs):
        self._thread = threading.get_ident()
        self.trl_hooked = _install_trl_profiling_hook()
        _profiling_listeners.add(self)

    def on_train_end(self, args=None, state=None, control=None, **kwargs):
        _profiling_listeners.discard(self)

    @_never_raise
    def on_step_begin(self, args=None, state=None, control=None, **kwargs):
        self._current.clear()
        self._step_start = time.perf_counter()

    @_never_raise
    def on_pre_optimizer_step(self, args=None, state=None, control=None, **kwargs):
        self._opt_start = time.perf_counter()

    @_never_raise
    def on_optimizer_step(self, args=None, state=None, control=None, **kwargs):
        if self._opt_start is not None:
            self._current["optimizer_step"] += time.perf_counter() - self._opt_start
            self._opt_start = None

    @_never_raise
    def on_step_end(self, args=None, state=None, control=None, **kwargs):
        if self._step_start is None:
            return
        step = time.perf_counter() - self._step_start
        self._step_start = None
        cur = self._current
        generation = cur.get("generation", 0.0)
        reward = cur.get("reward_trl") or cur.get("reward_funcs", 0.0)
        prepare = cur.get("prepare")
        if prepare:  # _prepare_inputs = generation + reward + tokenising, old/ref log-probs, advantages
            scoring = max(0.0, prepare - generation - reward)
            optimisation = max(0.0, step - prepare)
        else:
            scoring = 0.0
            optimisation = max(0.0, step - generation - reward)
        phases = {
            "generation": generation,
            "reward": reward,
            "scoring": scoring,
            "optimisation": optimisation,
            "optimizer_step": cur.get("optimizer_step", 0.0),
            "step": step,
        }
        for key, value in phases.items():
            self._window[key] += value
            self.totals[key] += value
        self._window_steps += 1
        self.steps += 1

    @_never_raise
    def on_log(self, args=None, state=None, control=None, logs=None, **kwargs):
        if logs is None or not self._window_steps:
            return
        from rlhf_tui.bridge.wire.metrics import is_summary

        if is_summary(logs):
            return
        for key, value in self._window.items():
            logs[PROFILE_KEYS[key]] = value / self._window_steps
        self._window.clear()
        self._window_steps = 0

    # -- output ------------------------------------------------------------------------------------
    def summary(self) -> dict:
        """{steps, step_s {total_s, mean_s}, phases {name: {total_s, mean_s, share}}, optimizer_step,
        trl_timings {TRL context name: {total_s, calls, mean_s}}, sources}."""
        steps = max(1, self.steps)
        total = self.totals.get("step", 0.0)
        phases = {
            p: {
                "total_s": self.totals.get(p, 0.0),
                "mean_s": self.totals.get(p, 0.0) / steps,
                "share": (self.totals.get(p, 0.0) / total) if total > 0 else None,
            }
            for p in PHASES
        }
        return {
            "steps": self.steps,
            "step_s": {"total_s": total, "mean_s": total / steps},
            "phases": phases,
            "optimizer_step": {
                "total_s": self.totals.get("optimizer_step", 0.0),
                "mean_s": self.totals.get("optimizer_step", 0.0) / steps,
            },
            "trl_timings": {
                name: {"total_s": t, "calls": int(n), "mean_s": t / n if n else None}
                for name, (t, n) in sorted(self.trl_timings.items())
            },
            "sources": {
                "generation": "TRL profiling: *.generate" if self.trl_hooked else "unavailable",
                "reward": "TRL profiling: _calculate_rewards"
                if self.trl_hooked
                else "rlhf-tui reward-function wrapper",
                "optimisation": "rlhf-tui step hooks (step − _prepare_inputs)",
                "scoring": "TRL profiling: _prepare_inputs − generation − reward",
            },
        }


def format_profile(profile: dict) -> str:
    """A small text table of `PhaseProfiler.summary()` (what the examples print)."""
    if not profile or not profile.get("steps"):
        return "profiling: no steps timed"
    lines = [f"{'phase':<14}{'mean/step':>12}{'total':>10}{'share':>8}"]
    for name, row in profile["phases"].items():
        share = row.get("share")
        lines.append(
            f"{name:<14}{row['mean_s'] * 1000:>10.1f}ms{row['total_s']:>9.2f}s"
            f"{'' if share is None else f'{share:>7.0%}':>8}"
        )
    step = profile["step_s"]
    lines.append(f"{'step (total)':<14}{step['mean_s'] * 1000:>10.1f}ms{step['total_s']:>9.2f}s")
    if profile.get("trl_step_time_mean_s") is not None:
        lines.append(f"TRL step_time (training_step only): {profile['trl_step_time_mean_s'] * 1000:.1f} ms/step")
    return "\n".join(lines)


class _FinalCheckpoint(_CallbackBase):
    """Makes the Trainer save a checkpoint at the last step too (the schedule saves only every save_steps)."""

    def __init__(self):
        self.enabled = False

    def on_step_end(self, args=None, state=None, control=None, **kwargs):
        if self.enabled and state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_save = True
        return control


# -- the manager ---------------------------------------------------------------------------------------------
class TRLIntegrationManager:
    """Sets up a TRL trainer with rlhf-tui monitoring attached and trains it (the guide's manager).

    `setup_trl_trainer(model_name, dataset_name, reward_funcs)` returns the trainer (also `self.trainer`);
    `train_with_monitoring(num_steps, save_checkpoints)` trains and returns the results dict, whose numbers are
    those of `rlhf-tui report <log>` for the same run.
    """

    def __init__(self, config: TRLIntegrationConfig | None = None):
        self.config = config if config is not None else TRLIntegrationConfig()
        self.trainer = None
        self.callback = None
        self.profiler: PhaseProfiler | None = None
        self.results: dict | None = None
        self._final_checkpoint: _FinalCheckpoint | None = None
        self._trained = False
        self._warn_unmapped()

    def _warn_unmapped(self) -> None:
        changed = self.config.unmapped_fields()
        trainer = {"grpo": "GRPOTrainer", "rloo": "RLOOTrainer", "ppo": "PPOTrainer"}[self.config.algorithm]
        kept = [n for n in self.config.unmapped_fields(only_changed=False) if n not in changed]
        if kept:
            log.info("TRLIntegrationConfig: %s keep the guide's defaults, which %s ignores", ", ".join(kept), trainer)
        if not changed:
            return
        parts = [f"{n}={getattr(self.config, n)!r} ({UNMAPPED_REASONS[n]})" for n in changed]
        warnings.warn(
            f"TRLIntegrationConfig: {trainer} in TRL {_trl_version()} has no equivalent for "
            f"{'; '.join(parts)}; these settings are ignored. See the configuration table in "
            "docs/trl-integration.md.",
            TRLMappingWarning,
            stacklevel=3,
        )

    # -- setup ---------------------------------------------------------------------------------------
    def setup_trl_trainer(
        self,
        model_name: Any = None,
        dataset_name: Any = None,
        reward_funcs: Callable | str | Sequence | None = None,
        *,
        eval_dataset: Any = None,
        dataset_split: str = "train",
        processing_class: Any = None,
        peft_config: Any = None,
        callbacks: Sequence | None = None,
        text_prompt_words: int | None = TEXT_PROMPT_WORDS,
    ):
        """Build the trainer for `config.algorithm` with the monitor callback (and, per the config, checkpoint
        analysis, reward monitoring and profiling) attached.

        model_name: hub id, local folder or a loaded model (default: config.model_name).
        dataset_name: hub id, local .json/.jsonl/.csv/.parquet file, save_to_disk folder, Dataset or list.
        reward_funcs: function(s) or reward model id(s), as GRPOTrainer takes them; None: `default_reward`
        (with a warning).
        """
        cfg = self.config
        model = model_name if model_name is not None else cfg.model_name
        if dataset_name is None:
            raise ValueError(
                "setup_trl_trainer needs dataset_name: a hub id, a local .json/.jsonl/.csv/.parquet "
                "file, a save_to_disk folder or a datasets.Dataset"
            )
        if cfg.algorithm == "ppo":
            return self._setup_ppo(
                model,
                dataset_name,
                reward_funcs,
                eval_dataset=eval_dataset,
                dataset_split=dataset_split,
                processing_class=processing_class,
                peft_config=peft_config,
                callbacks=callbacks,
                text_prompt_words=text_prompt_words,
            )
        train_dataset = load_prompt_dataset(dataset_name, dataset_split, text_prompt_words)
        eval_data = (
            load_prompt_dataset(eval_dataset, dataset_split, text_prompt_words) if eval_dataset is not None else None
        )
        if processing_class is None:
            processing_class = _load_tokenizer(model)
        reward_funcs = self._reward_funcs(reward_funcs)

        from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

        cb = RLHFMonitorCallback(
            address=cfg.monitor_address,
            log_dir=os.path.join(cfg.logging_dir, "rlhf-tui"),
            anomaly_threshold=cfg.anomaly_detection_threshold,
            analyze_checkpoints=cfg.enable_checkpoint_analysis,
            run_id=cfg.run_id,
        )
        funcs = reward_funcs
        self.profiler = PhaseProfiler() if cfg.enable_profiling else None
        if self.profiler is not None:
            funcs = [self.profiler.wrap_reward(f) for f in funcs]
        if cfg.enable_reward_monitoring:
            from rlhf_tui.bridge.training.rewards import monitor_rewards

            funcs = monitor_rewards(funcs, cb)

        args = cfg.to_trl_config(run_id=cb.run_id, has_eval=eval_data is not None)
        self._final_checkpoint = _FinalCheckpoint()
        # The profiler writes time/* timings into the logs before our callback copies them.
        ours = ([self.profiler] if self.profiler else []) + [cb, self._final_checkpoint]
        trainer_cls = _trainer_class(cfg.algorithm)
        extra = {"peft_config": peft_config} if peft_config is not None else {}
        trainer = trainer_cls(
            model=model,
            reward_funcs=funcs,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_data,
            processing_class=processing_class,
            callbacks=ours + list(callbacks or []),
            **extra,
        )
        cb.trainer = trainer
        self.trainer, self.callback, self._trained, self.results = trainer, cb, False, None
        return trainer

    def _reward_funcs(self, reward_funcs) -> list:
        if reward_funcs is None:
            warnings.warn(
                "setup_trl_trainer: no reward_funcs given, using rlhf-tui's default_reward (distinct "
                "words, about 20 words, ends a sentence): a smoke-test reward that knows nothing about "
                "your task. Pass reward_funcs=[...] to train on yours.",
                TRLMappingWarning,
                stacklevel=3,
            )
            return [default_reward]
        if callable(reward_funcs) or isinstance(reward_funcs, str):
            return [reward_funcs]
        funcs = list(reward_funcs)
        if not funcs:
            raise ValueError("reward_funcs is empty: pass at least one reward function or reward model id")
        return funcs

    def _setup_ppo(
        self,
        model,
        dataset_name,
        reward_funcs,
        *,
        eval_dataset,
        dataset_split,
        processing_class,
        peft_config,
        callbacks,
        text_prompt_words,
    ):
        """TRL 0.12–1.12: PPOTrainer with a reward model and a value model (not exercised on TRL ≥ 1.13)."""
        support = ppo_support()
        if support == "removed":
            raise AlgorithmUnavailableError(_ppo_unavailable_message(_trl_version()))
        if support == "legacy":
            raise AlgorithmUnavailableError(
                f"TRL {_trl_version()}'s PPOTrainer (≤ 0.11) is not a transformers Trainer, so the manager cannot "
                "drive it: in your own loop call RLHFMonitorCallback.log_step(step, stats) after each "
                "ppo_trainer.step(...) (see examples/ppo_monitoring_demo.py), or use TRL 0.12–1.12."
            )
        if support == "missing":
            raise AlgorithmUnavailableError("algorithm='ppo' needs TRL: pip install 'trl>=0.12,<1.13'")
        if not isinstance(reward_funcs, (str, os.PathLike)) and not _is_model(reward_funcs):
            raise IntegrationError(
                "PPO (TRL 0.12–1.12) needs a reward model (a sequence-classification model or "
                "its id/path) as reward_funcs, not reward functions; use algorithm='grpo' or "
                "'rloo' for reward functions"
            )
        try:
            from trl.experimental.ppo import PPOConfig, PPOTrainer
        except ImportError:
            from trl import PPOConfig, PPOTrainer
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

        cfg = self.config
        tok = processing_class if processing_class is not None else _load_tokenizer(model)
        dataset = load_prompt_dataset(dataset_name, dataset_split, text_prompt_words)
        dataset = dataset.map(
            lambda row: {"input_ids": tok(row["prompt"])["input_ids"]}, remove_columns=dataset.column_names
        )
        policy = AutoModelForCausalLM.from_pretrained(model) if isinstance(model, (str, os.PathLike)) else model
        ref = (
            None
            if peft_config is not None
            else (AutoModelForCausalLM.from_pretrained(model) if isinstance(model, (str, os.PathLike)) else None)
        )
        reward = (
            AutoModelForSequenceClassification.from_pretrained(reward_funcs, num_labels=1)
            if isinstance(reward_funcs, (str, os.PathLike))
            else reward_funcs
        )
        value = AutoModelForSequenceClassification.from_pretrained(
            reward_funcs if isinstance(reward_funcs, (str, os.PathLike)) else reward.config._name_or_path, num_labels=1
        )
        cb = RLHFMonitorCallback(
            address=cfg.monitor_address,
            log_dir=os.path.join(cfg.logging_dir, "rlhf-tui"),
            anomaly_threshold=cfg.anomaly_detection_threshold,
            analyze_checkpoints=cfg.enable_checkpoint_analysis,
            run_id=cfg.run_id,
        )
        wanted = {
            "output_dir": cfg.output_dir,
            "learning_rate": cfg.learning_rate,
            "per_device_train_batch_size": cfg.batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "num_mini_batches": max(1, cfg.batch_size // cfg.mini_batch_size),
            "num_ppo_epochs": cfg.ppo_epochs,
            "max_grad_norm": cfg.max_grad_norm,
            "cliprange": cfg.cliprange,
            "cliprange_value": cfg.cliprange_value,
            "vf_coef": cfg.vf_coef,
            "gamma": cfg.gamma,
            "lam": cfg.lam,
            "kl_coef": cfg.init_kl_coef,
            "kl_estimator": "k1" if cfg.kl_penalty == "kl" else "k3",
            "response_length": cfg.max_completion_length,
            "temperature": cfg.temperature,
            "logging_steps": cfg.logging_steps,
            "save_steps": cfg.save_freq,
            "save_strategy": "no",
            "report_to": available_reporters(cfg.reporters()) or "none",
            "use_cpu": cfg.use_cpu(),
            "fp16": cfg.fp16 and not cfg.use_cpu(),
            "bf16": cfg.bf16,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "seed": cfg.seed,
            "run_name": cb.run_id,
        }
        wanted.update(cfg.trl_args)
        names = {f.name for f in dataclasses.fields(PPOConfig)}
        args = PPOConfig(**{k: v for k, v in wanted.items() if k in names})
        self._final_checkpoint = _FinalCheckpoint()
        trainer = PPOTrainer(
            args=args,
            processing_class=tok,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            value_model=value,
            train_dataset=dataset,
            callbacks=[cb, self._final_checkpoint] + list(callbacks or []),
            **({"peft_config": peft_config} if peft_config is not None else {}),
        )
        cb.trainer = trainer
        self.trainer, self.callback, self.profiler, self._trained, self.results = trainer, cb, None, False, None
        return trainer

    # -- training ------------------------------------------------------------------------------------
    def train_with_monitoring(
        self, num_steps: int, save_checkpoints: bool = True, *, analysis_timeout: float = 120.0
    ) -> dict:
        """Train for `num_steps` optimizer steps (checkpoint every save_freq steps and at the end when
        `save_checkpoints`), then return {steps_completed, final_metrics, anomalies, checkpoints,
        reward_reliability, log_dir, log_path, output_dir, profiling, report}. Training errors are raised."""
        if self.trainer is None or self.callback is None:
            raise IntegrationError("call setup_trl_trainer(model_name, dataset_name) before train_with_monitoring")
        if self._trained:
            raise IntegrationError(
                "this trainer has already been trained and its monitor closed; call "
                "setup_trl_trainer again for another run"
            )
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, not {num_steps!r}")
        trainer, cfg = self.trainer, self.config
        args = trainer.args
        from transformers.trainer_utils import SaveStrategy

        if self.config.algorithm == "ppo" and hasattr(args, "num_total_batches"):
            # PPOTrainer (0.12–1.12) loops over num_total_batches PPO batches (one rollout each)
            args.num_total_batches = num_steps
            args.total_episodes = num_steps * int(getattr(args, "batch_size", 1) or 1)
        args.max_steps = num_steps
        args.save_strategy = SaveStrategy.STEPS if save_checkpoints else SaveStrategy.NO
        args.save_steps = cfg.save_freq
        if self._final_checkpoint is not None:
            self._final_checkpoint.enabled = bool(save_checkpoints)
        self._trained = True
        try:
            trainer.train()
        finally:
            # Even when training fails, finish the log so `rlhf-tui report` can show what happened.
            self._finish_monitoring(analysis_timeout)
        self.results = self._results()
        return self.results

    def _finish_monitoring(self, timeout: float) -> None:
        cb = self.callback
        try:
            publisher = cb.publisher
            if publisher is not None:
                publisher.flush(timeout)  # checkpoint events become analysis threads on the publisher thread
            cb.wait_for_checkpoints(timeout)
            if cb.analyze_checkpoints and cb.log_path:
                _wait_for_analyses(cb, cb.log_path, timeout)
        finally:
            cb.close()

    def _results(self) -> dict:
        from rlhf_tui.analysis.report import build_report
        from rlhf_tui.analysis.thresholds import Thresholds
        from rlhf_tui.bridge.monitor.sources import load_file_source

        cb, cfg, trainer = self.callback, self.config, self.trainer
        thresholds = Thresholds(anomaly_threshold=cfg.anomaly_detection_threshold)
        log_path = cb.log_path
        if log_path and os.path.isfile(log_path):
            store = load_file_source(log_path)
        else:  # monitoring failed to start: fall back on what the Trainer itself recorded
            state_path = os.path.join(cfg.output_dir, "trainer_state.json")
            os.makedirs(cfg.output_dir, exist_ok=True)
            trainer.state.save_to_json(state_path)
            store = load_file_source(state_path)
            warnings.warn(f"rlhf-tui log not found ({log_path}); results come from {state_path}", RuntimeWarning)
        report = build_report(store, thresholds)
        metrics = report.get("metrics", {})
        rewards = report.get("rewards") or {}
        reliability = dict(rewards.get("reliability_metrics") or {})
        reliability["batches"] = rewards.get("batches", 0)
        for key in ("anomalies", "recommendations"):
            if key in rewards:
                reliability[key] = rewards[key]
        results = {
            "steps_completed": int(trainer.state.global_step),
            "final_metrics": {name: row.get("last") for name, row in metrics.items()},
            "anomalies": report.get("anomalies", []),
            "checkpoints": report.get("checkpoints", []),
            "reward_reliability": reliability,
            "log_dir": cb.log_dir,
            "log_path": log_path,
            "output_dir": cfg.output_dir,
            "report": report,
        }
        if self.profiler is not None:
            profile = self.profiler.summary()
            step_time = metrics.get("step_time") or {}
            profile["trl_step_time_mean_s"] = step_time.get("mean")
            results["profiling"] = profile
        return results


def _wait_for_analyses(cb, log_path: str, timeout: float) -> None:
    """Until every checkpoint event in the log has its analysis (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        saved, analysed = set(), set()
        try:
            with open(log_path, "rb") as fh:
                for line in fh:
                    if b'"checkpoint' not in line:
                        continue
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if event.get("event") == "checkpoint":
                        saved.add(event.get("step"))
                    elif event.get("event") == "checkpoint_analysis":
                        analysed.add(event.get("step"))
        except OSError:
            return
        if saved <= analysed or time.monotonic() > deadline:
            return
        cb.wait_for_checkpoints(max(0.1, deadline - time.monotonic()))
        time.sleep(0.05)


def _is_model(obj: Any) -> bool:
    return hasattr(obj, "config") and hasattr(obj, "forward")


def _trainer_class(algorithm: str):
    import trl

    return {"grpo": trl.GRPOTrainer, "rloo": trl.RLOOTrainer}[algorithm]


def _config_class(algorithm: str):
    import trl

    return {"grpo": trl.GRPOConfig, "rloo": trl.RLOOConfig}[algorithm]


def _load_tokenizer(model: Any):
    """The model's tokenizer, left-padded for generation, with a pad token."""
    from transformers import AutoTokenizer

    name = (
        model
        if isinstance(model, (str, os.PathLike))
        else getattr(getattr(model, "config", None), "_name_or_path", None)
    )
    if not name:
        raise IntegrationError("cannot find the tokenizer of an in-memory model: pass processing_class=...")
    try:
        tok = AutoTokenizer.from_pretrained(os.fspath(name))
    except Exception as exc:
        where = "local folder" if os.path.isdir(os.fspath(name)) else "local folder or reachable hub id"
        raise IntegrationError(
            f"cannot load the tokenizer of {os.fspath(name)!r}: {_first_line(exc)}. Pass a "
            f"{where} (offline: HF_HUB_OFFLINE=1 uses only the local cache)"
        ) from exc
    tok.padding_side = "left"
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


# -- printing ------------------------------------------------------------------------------------------------
SUMMARY_METRICS = ("reward", "reward_std", "kl", "entropy", "loss", "clip_ratio", "grad_norm", "completion_length")


def format_results(results: dict) -> str:
    """The results of `train_with_monitoring` as a few readable lines (what the examples print)."""

    def num(value):
        return "—" if value is None else (f"{value:.4g}" if isinstance(value, (int, float)) else str(value))

    lines = [f"steps completed: {results.get('steps_completed')}"]
    final = results.get("final_metrics") or {}
    shown = [f"{name}={num(final[name])}" for name in SUMMARY_METRICS if name in final]
    lines.append("final metrics: " + (", ".join(shown) or "none"))
    anomalies = results.get("anomalies") or []
    lines.append(f"anomalies: {len(anomalies)}")
    for a in anomalies[:5]:
        lines.append(f"  step {a.get('step')} {a.get('severity')} {a.get('metric')}: {a.get('message')}")
    checkpoints = results.get("checkpoints") or []
    lines.append(f"checkpoints: {len(checkpoints)}")
    for c in checkpoints:
        issues = c.get("issues") or []
        lines.append(
            f"  step {c.get('step')}: health_score={num(c.get('health_score'))} issues={len(issues)} {c.get('path')}"
        )
    rel = results.get("reward_reliability") or {}
    lines.append(
        "reward reliability: "
        + ", ".join(f"{k}={num(rel.get(k))}" for k in ("stability", "consistency", "variance", "mean_reward"))
    )
    if results.get("profiling"):
        lines.append("profiling:")
        lines.extend("  " + line for line in format_profile(results["profiling"]).splitlines())
    lines.append(f"log: {results.get('log_path')}")
    return "\n".join(lines)
