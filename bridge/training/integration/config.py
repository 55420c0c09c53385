"""`TRLIntegrationConfig`: the guide's configuration fields and their mapping onto GRPOConfig/RLOOConfig
arguments (the table in docs/trl-integration.md), with the `log_with` reporters it can honour."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from rlhf_tui.bridge.training.integration.errors import AlgorithmUnavailableError, IntegrationError, TRLMappingWarning
from rlhf_tui.bridge.training.integration.ppo import ppo_support, ppo_unavailable_message, trl_version

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
            raise AlgorithmUnavailableError(ppo_unavailable_message(trl_version()))

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


def _config_class(algorithm: str):
    import trl

    return {"grpo": trl.GRPOConfig, "rloo": trl.RLOOConfig}[algorithm]
