"""The results of `train_with_monitoring` (metric summaries, anomalies, checkpoints, reward reliability,
profile), built from what the manager collected in memory while training, and `format_results`, the few
readable lines the examples print."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from rlhf_tui.analysis.store import RunHistory
from rlhf_tui.bridge.training.integration.profiling import format_profile
from rlhf_tui.bridge.training.system import SystemSampler, memory_metrics
from rlhf_tui.bridge.wire.metrics import is_summary, normalise

try:  # the collector is a TrainerCallback; importing this module does not need transformers
    from transformers import TrainerCallback as _CallbackBase
except Exception:  # pragma: no cover - exercised only without transformers
    _CallbackBase = object

log = logging.getLogger("rlhf_tui.bridge.training.integration")

MEMORY_PERIOD_S = 0.5  # memory sampled at most twice a second, as the monitor callback does


class RunCollector(_CallbackBase):
    """Keeps what the manager reports, in memory, while training: the normalised logged metrics (with the
    time/* timings the profiler added and memory at most twice a second) in a `RunHistory`, the saved
    checkpoints, and the reward batches the wrapped reward functions saw (`log_rewards`, then forwarded to
    the monitor callback). Add it after the profiler; like the monitor callback, it never raises into training.
    """

    def __init__(self, monitor):
        self.monitor = monitor  # the RLHFMonitorCallback reward batches are forwarded to
        self.run = RunHistory(monitor.run_id)
        self.saved: list[dict] = []
        self.failed = False
        self._sampler = None
        self._memory: dict[str, float] = {}
        self._sampled_at = -1e9
        self._last: tuple[int, float] | None = None  # (step, wall time) of the previous logged step

    def on_log(self, args=None, state=None, control=None, logs=None, **kwargs):
        if logs is None or self.failed or is_summary(logs):
            return
        try:
            step, wall = int(state.global_step), time.time()
            metrics = normalise(logs)
            if self._last is not None and step > self._last[0]:
                metrics["time/step_s"] = (wall - self._last[1]) / (step - self._last[0])
            self._last = (step, wall)
            metrics.update(self._sample_memory())
            self.run.add_step(step, metrics, wall)
        except Exception as exc:
            self.failed = True
            log.warning("rlhf-tui: in-memory results disabled after an error: %s", exc)

    def on_save(self, args=None, state=None, control=None, **kwargs):
        step = int(state.global_step)
        self.saved.append(
            {"step": step, "path": os.path.join(args.output_dir, f"checkpoint-{step}"), "status": "saved"}
        )

    def log_rewards(
        self, step: int, scores: list, samples: list | None = None, name: str = "reward", **batch: Any
    ) -> None:
        """`RLHFMonitorCallback.log_rewards`: kept here, then forwarded to the monitor callback (`batch`: its
        keyword-only prompts, completions and completion_ids)."""
        self.monitor.log_rewards(step, scores, samples, name=name, **batch)
        meta = getattr(self.monitor, "meta", None)
        if "args" not in self.run.meta and isinstance(meta, dict):  # num_generations, for the zero-spread check
            self.run.meta.update(meta)
        self.run.add_reward({"step": int(step), "reward_func": name, "scores": list(scores), "samples": samples})

    def _sample_memory(self) -> dict[str, float]:
        now = time.monotonic()
        if now - self._sampled_at >= MEMORY_PERIOD_S:
            self._sampled_at = now
            if self._sampler is None:
                self._sampler = SystemSampler()
            self._memory = memory_metrics(self._sampler.sample())
        return self._memory


def build_results(manager, checkpoint_results: list[dict]) -> dict:
    """The results dict of `train_with_monitoring`, from what the manager's RunCollector kept and the
    checkpoint analyses the monitor callback returned."""
    from rlhf_tui.analysis.report import build_report
    from rlhf_tui.analysis.store import Store
    from rlhf_tui.analysis.thresholds import Thresholds

    cb, cfg, trainer, collector = manager.callback, manager.config, manager.trainer, manager.collector
    thresholds = Thresholds(anomaly_threshold=cfg.anomaly_detection_threshold)
    store = Store()
    store.source = cb.log_path or "memory"
    run = store.runs[collector.run.run_id] = collector.run
    store.current = run.run_id
    run.meta = dict(cb.meta)
    if trainer is not None and "trainer" not in run.meta:
        run.meta["trainer"] = type(trainer).__name__
    analysed = {c.get("step"): c for c in checkpoint_results}
    run.checkpoints = [analysed.get(c["step"], c) for c in collector.saved]
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
        "log_path": cb.log_path,
        "output_dir": cfg.output_dir,
        "report": report,
    }
    if manager.profiler is not None:
        profile = manager.profiler.summary()
        step_time = metrics.get("step_time") or {}
        profile["trl_step_time_mean_s"] = step_time.get("mean")
        results["profiling"] = profile
    return results


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
