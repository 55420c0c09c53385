"""`TRLIntegrationManager`: sets up a TRL trainer (GRPO, RLOO, or PPO on TRL 0.12–1.12) with rlhf-tui's callback,
reward monitoring and profiling attached, trains it, and returns the results it collected."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from rlhf_tui.bridge.training.integration.config import UNMAPPED_REASONS, TRLIntegrationConfig
from rlhf_tui.bridge.training.integration.context import fitted_completion_length
from rlhf_tui.bridge.training.integration.datasets import TEXT_PROMPT_WORDS, load_prompt_dataset
from rlhf_tui.bridge.training.integration.errors import IntegrationError, TRLMappingWarning, first_line
from rlhf_tui.bridge.training.integration.ppo import setup_ppo_trainer, trl_version
from rlhf_tui.bridge.training.integration.profiling import PhaseProfiler
from rlhf_tui.bridge.training.integration.results import RunCollector, build_results

try:  # the manager needs transformers; importing this module does not
    from transformers import TrainerCallback as _CallbackBase
except Exception:  # pragma: no cover - exercised only without transformers
    _CallbackBase = object

log = logging.getLogger("rlhf_tui.bridge.training.integration")


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


class _FinalCheckpoint(_CallbackBase):
    """Makes the Trainer save a checkpoint at the last step too (the schedule saves only every save_steps)."""

    def __init__(self):
        self.enabled = False

    def on_step_end(self, args=None, state=None, control=None, **kwargs):
        if self.enabled and state.max_steps > 0 and state.global_step >= state.max_steps:
            control.should_save = True
        return control


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
        self.collector: RunCollector | None = None  # what the results are built from
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
            f"TRLIntegrationConfig: {trainer} in TRL {trl_version()} has no equivalent for "
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
            self._final_checkpoint = _FinalCheckpoint()
            cb, collector = self._monitor()
            trainer = setup_ppo_trainer(
                cfg,
                model,
                dataset_name,
                reward_funcs,
                eval_dataset=eval_dataset,
                dataset_split=dataset_split,
                processing_class=processing_class,
                peft_config=peft_config,
                callbacks=callbacks,
                text_prompt_words=text_prompt_words,
                monitor=(cb, collector),
                final_checkpoint=self._final_checkpoint,
                load_tokenizer=_load_tokenizer,
            )
            self.profiler = None
            self.trainer, self.callback, self.collector, self._trained, self.results = (
                trainer,
                cb,
                collector,
                False,
                None,
            )
            return trainer
        train_dataset = load_prompt_dataset(dataset_name, dataset_split, text_prompt_words)
        eval_data = (
            load_prompt_dataset(eval_dataset, dataset_split, text_prompt_words) if eval_dataset is not None else None
        )
        if processing_class is None:
            processing_class = _load_tokenizer(model)
        reward_funcs = self._reward_funcs(reward_funcs)
        # Before the monitor opens: a refusal leaves nothing behind.
        fitted = fitted_completion_length(
            cfg.to_trl_kwargs(warn=False)["max_completion_length"],
            model,
            processing_class,
            {"train": train_dataset, "eval": eval_data},
        )
        cb, collector = self._monitor()
        funcs = reward_funcs
        self.profiler = PhaseProfiler() if cfg.enable_profiling else None
        if self.profiler is not None:
            funcs = [self.profiler.wrap_reward(f) for f in funcs]
        if cfg.enable_reward_monitoring:
            from rlhf_tui.bridge.training.rewards import monitor_rewards

            funcs = monitor_rewards(funcs, collector)  # kept for the results, forwarded to cb

        self._final_checkpoint = _FinalCheckpoint()
        # The profiler writes time/* timings into the logs before our callback copies them.
        ours = ([self.profiler] if self.profiler else []) + [cb, collector, self._final_checkpoint]
        trainer_cls = _trainer_class(cfg.algorithm)
        extra = {"peft_config": peft_config} if peft_config is not None else {}
        # TensorBoardCallback reads TENSORBOARD_LOGGING_DIR when the trainer is built: set for this trainer
        # only, so a later trainer in the same process (a notebook) does not write into this run's folder.
        with _environment_kept("TENSORBOARD_LOGGING_DIR"):
            args = cfg.to_trl_config(run_id=cb.run_id, has_eval=eval_data is not None)
            if fitted is not None:
                args.max_completion_length = fitted
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
        self.trainer, self.callback, self.collector, self._trained, self.results = trainer, cb, collector, False, None
        return trainer

    def _monitor(self) -> tuple:
        """The monitor callback (live socket + JSONL log) and the RunCollector the results come from."""
        from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

        cfg = self.config
        cb = RLHFMonitorCallback(
            address=cfg.monitor_address,
            log_dir=os.path.join(cfg.logging_dir, "rlhf-tui"),
            anomaly_threshold=cfg.anomaly_detection_threshold,
            analyze_checkpoints=cfg.enable_checkpoint_analysis,
            run_id=cfg.run_id,
        )
        return cb, RunCollector(cb)

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
        checkpoints: list[dict] = []
        try:
            trainer.train()
        finally:
            # Even when training fails, finish the log so `rlhf-tui report` can show what happened.
            checkpoints = self._finish_monitoring(analysis_timeout)
        self.results = build_results(self, checkpoints)
        return self.results

    def _finish_monitoring(self, timeout: float) -> list[dict]:
        """Wait (bounded) for the checkpoint analyses and close the monitor; returns the analyses."""
        cb = self.callback
        try:
            publisher = cb.publisher
            if publisher is not None:
                publisher.flush(timeout)  # checkpoint events become analysis threads on the publisher thread
            return cb.wait_for_checkpoints(timeout)
        finally:
            cb.close()


@contextlib.contextmanager
def _environment_kept(name: str):
    """Restores environment variable `name` (or its absence) on the way out."""
    before = os.environ.get(name)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _trainer_class(algorithm: str):
    import trl

    return {"grpo": trl.GRPOTrainer, "rloo": trl.RLOOTrainer}[algorithm]


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
            f"cannot load the tokenizer of {os.fspath(name)!r}: {first_line(exc)}. Pass a "
            f"{where} (offline: HF_HUB_OFFLINE=1 uses only the local cache)"
        ) from exc
    tok.padding_side = "left"
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok
