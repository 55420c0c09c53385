"""`RLHFMonitorCallback`: the TrainerCallback that publishes a run to rlhf-tui monitors and a JSONL log.

The training thread does almost nothing: each hook copies what it was given into the publisher's bounded
queue. Everything else (metric names, system samples, anomaly detection, checkpoint and reward analysis,
the JSONL log, the sockets) happens on the publisher thread or a worker thread, so a slow disk, a stalled
monitor or a bug of ours can never slow down or break training.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
import time
from datetime import datetime, timezone
from typing import Any

from rlhf_tui.bridge.training.jsonl_log import JsonlLog
from rlhf_tui.bridge.training.publisher import Forwarder, Publisher
from rlhf_tui.bridge.training.system import SystemSampler, memory_metrics
from rlhf_tui.bridge.wire import protocol
from rlhf_tui.bridge.wire.metrics import is_summary, normalise

try:  # the callback works without transformers for custom loops (log_step)
    from transformers import TrainerCallback as _Base
except Exception:  # pragma: no cover - exercised only without transformers
    _Base = object

log = logging.getLogger("rlhf_tui.bridge")

SYSTEM_PERIOD_S = 0.5  # at most 2 Hz
REWARD_ANALYSIS_S = 1.0  # reward reliability analysis: at most once a second per reward function
KEY_ARGS = (
    "learning_rate",
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_generations",
    "beta",
    "num_iterations",
    "epsilon",
    "temperature",
    "max_completion_length",
    "max_prompt_length",
    "max_length",
    "lr_scheduler_type",
    "warmup_steps",
    "seed",
    "output_dir",
    "logging_steps",
    "save_steps",
    "loss_type",
    "bf16",
    "fp16",
    "gradient_checkpointing",
    "use_vllm",
    "scale_rewards",
)


def new_run_id() -> str:
    return f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for name in ("trl", "transformers", "torch", "rlhf-tui"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


class _Recorder:
    """Runs on the publisher thread: turns queued items into published messages and JSONL events."""

    def __init__(self, cb: RLHFMonitorCallback, forwarding: bool = False):
        self.cb = cb
        self.forwarding = forwarding  # a non-main rank: only its system samples leave the process
        self.jsonl = JsonlLog(cb.log_dir, cb.run_id) if cb.log_dir and not forwarding else None
        self.sampler: SystemSampler | None = None
        self.last_sample_t = 0.0
        self.memory: dict[str, float] = {}
        self.last_log_t: float | None = None
        self.last_log_step: int | None = None
        self.detector = None
        self.steps_since_sample = 0
        self.summary: dict = {}
        self.ended = False
        self.reward_monitor = None
        self.reward_pending: dict[str, list] = {}
        self.reward_analysed: dict[str, float] = {}
        self._detector_failed = False

    # Items are tuples: (kind, ...). Return [(kind, data, rank), ...] to publish.
    def __call__(self, item: tuple) -> list[tuple]:
        kind = item[0]
        if self.forwarding:
            return self.sample_system(force=kind in ("run_start", "run_end"))
        if kind == "log":
            return self._on_log(*item[1:])
        if kind == "run_start":
            return self._on_run_start(item[1])
        if kind == "checkpoint":
            return self._on_checkpoint(*item[1:])
        if kind == "checkpoint_result":
            return self._on_checkpoint_result(item[1])
        if kind == "rewards":
            return self._on_rewards(*item[1:])
        if kind == "run_end":
            return self._on_run_end(item[1])
        return []

    def _event(self, event: dict, clean: bool = False) -> None:
        if self.jsonl is not None:
            self.jsonl.write(event, clean)

    def _on_run_start(self, meta: dict) -> list[tuple]:
        self._event({"event": "run_start", "timestamp": _iso(time.time()), **meta})
        return [(protocol.RUN_START, meta, self.cb.rank)] + self.sample_system(force=True)

    def _detect(self, step: int, metrics: dict) -> list[dict]:
        if self._detector_failed or not self.cb.detect_anomalies:
            return []
        try:
            if self.detector is None:
                from rlhf_tui.analysis.detectors import StreamingDetector

                self.detector = StreamingDetector(self.cb.thresholds, meta=self.cb.meta)
            return list(self.detector.update(step, metrics))
        except Exception as exc:  # the analysis is optional on the training side; counted, logged once
            self._detector_failed = True
            log.warning("rlhf-tui: anomaly detection disabled on the training side: %s", exc)
            return []

    def _on_log(self, step: int, wall: float, logs: dict) -> list[tuple]:
        if is_summary(logs):
            self.summary = {k: v for k, v in logs.items() if isinstance(v, (int, float, str))}
            return []
        metrics = normalise(logs)
        if self.last_log_t is not None and self.last_log_step is not None and step > self.last_log_step:
            metrics["time/step_s"] = (wall - self.last_log_t) / (step - self.last_log_step)
        self.last_log_t, self.last_log_step = wall, step
        out = self.sample_system()
        metrics.update(self.memory)
        anomalies = self._detect(step, metrics)
        # Cleaned (non-finite floats as strings) and encoded once, for both the JSONL log and the wire:
        # turning floats into text is most of what a step costs this thread.
        clean = protocol.Clean(protocol.clean_metrics(metrics))
        clean.encoded = protocol.dumps(clean)
        if self.jsonl is not None:
            head = protocol.dumps({"event": "step_end", "step": step, "timestamp": _iso(wall)})
            tail = protocol.dumps(
                {
                    "anomalies": protocol.to_json_safe(anomalies) if anomalies else [],
                    "memory_usage": protocol.to_json_safe(self._seed_memory()),
                }
            )
            self.jsonl.write_raw(head[:-1] + b',"ppo_metrics":' + clean.encoded + b"," + tail[1:])
        out.append((protocol.STEP, {"step": step, "metrics": clean, "wall": wall}, self.cb.rank))
        return out

    def _seed_memory(self) -> dict:
        return {"rss_mb": self.memory.get("memory/rss_mb"), "gpu_memory_mb": self.memory.get("memory/gpu_mb")}

    def sample_system(self, force: bool = False) -> list[tuple]:
        now = time.monotonic()
        if not force and now - self.last_sample_t < SYSTEM_PERIOD_S:
            return []
        self.last_sample_t = now
        if self.sampler is None:
            self.sampler = SystemSampler()
        sample = self.sampler.sample()
        sample["step"] = self.last_log_step
        sample.update(self.cb.rank_info)
        self.memory = memory_metrics(sample)
        self._event({"event": "system", "timestamp": _iso(time.time()), **sample})
        return [(protocol.SYSTEM, sample, self.cb.rank)]

    def _on_checkpoint(self, step: int, path: str) -> list[tuple]:
        data = {"step": step, "path": path, "status": "saved"}
        self._event({"event": "checkpoint", "timestamp": _iso(time.time()), **data})
        if self.cb.analyze_checkpoints:
            self.cb._analyze_checkpoint_async(step, path)
        return [(protocol.CHECKPOINT, data, self.cb.rank)]

    def _on_checkpoint_result(self, result: dict) -> list[tuple]:
        self._event({"event": "checkpoint_analysis", "timestamp": _iso(time.time()), **result})
        return [(protocol.CHECKPOINT, result, self.cb.rank)]

    def _on_rewards(self, step: int, name: str, scores: list, samples: list) -> list[tuple]:
        data: dict[str, Any] = {"step": step, "reward_func": name, "samples": samples}
        finite = [s for s in scores if s is not None and isinstance(s, (int, float)) and math.isfinite(s)]
        data["scores"] = [None if s is None else float(s) for s in scores[:4096]]
        data["num_scores"] = len(scores)
        data["num_invalid"] = len(scores) - len(finite)
        # The reliability analysis costs ~0.5 ms: it runs on the batches gathered since the last one, at most
        # every REWARD_ANALYSIS_S per reward function (so a fast run pays it a few times a second, not per step).
        pending = self.reward_pending.setdefault(name, [])
        pending.extend(scores[:4096])
        now = time.monotonic()
        if now - self.reward_analysed.get(name, -1e9) >= REWARD_ANALYSIS_S or self.ended:
            self.reward_analysed[name] = now
            batch, self.reward_pending[name] = pending, []
            try:
                if self.reward_monitor is None:
                    from rlhf_tui.analysis.rewards import RewardModelIntegrator

                    self.reward_monitor = RewardModelIntegrator(anomaly_threshold=self.cb.thresholds_z())
                context = {"num_generations": self.cb.meta.get("args", {}).get("num_generations"), "reward_func": name}
                data["analysis"] = self.reward_monitor.monitor_reward_model(batch, step, context=context)
            except Exception as exc:
                log.debug("reward analysis unavailable: %s", exc)
        data = protocol.Clean(protocol.to_json_safe(data))  # cleaned once for the log and the wire
        self._event({"event": "reward_batch", "timestamp": _iso(time.time()), **data}, clean=True)
        return [(protocol.REWARD, data, self.cb.rank)]

    def _on_run_end(self, data: dict) -> list[tuple]:
        if self.ended:
            return []
        self.ended = True
        data = {**data, "summary": self.summary}
        out = self.sample_system(force=True)
        self._event({"event": "run_end", "timestamp": _iso(time.time()), **data})
        return out + [(protocol.RUN_END, data, self.cb.rank)]


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds")


class RLHFMonitorCallback(_Base):
    """Publishes a TRL/transformers training run live (ZeroMQ) and to a JSONL log.

    Args:
        address: where monitors connect (`tcp://127.0.0.1:5555`, env RLHF_TUI_ADDRESS). False: no socket.
        log_dir: folder of the JSONL log (`run-<run_id>.jsonl`); None: no log.
        anomaly_threshold: the z-score threshold of the anomaly detectors (the seed's argument).
        enable_detailed_logging: accepted for the seed's API; the JSONL log always has every step.
        insecure: allow a non-loopback address without CURVE keys.
        analyze_checkpoints: analyse each saved checkpoint on a worker thread (health, drift).
        publish_all_ranks: also publish from non-main processes (each binds its own address).
        forward_ranks: non-main processes (torchrun/accelerate ranks) send their system samples (GPU memory
            per device) to the main process, which publishes them on the run's one address (default True).
        forward_address: where non-main ranks send (default: `address`; a wildcard host means loopback on
            the main node and MASTER_ADDR on other nodes).
        curve: a `security.ServerCurve` (CURVE encryption + authorised monitor keys; allows non-loopback).
        keys_dir: the same from a keys folder (`rlhf-tui keygen DIR`): DIR/server.key_secret and the monitor
            public keys in DIR/authorized/. A key problem disables monitoring (fail closed), never training.
        detect_anomalies: run the streaming anomaly detectors on the training side too (the JSONL log's
            per-step `anomalies`); the monitor runs them anyway. False saves ~75 µs of background CPU per step.
        run_id: fixed run id (default: time + random).
    """

    def __init__(
        self,
        address: str | None | bool = None,
        log_dir: str | None = "./logs/rlhf-tui",
        anomaly_threshold: float = 3.0,
        enable_detailed_logging: bool = True,
        *,
        insecure: bool = False,
        analyze_checkpoints: bool = True,
        publish_all_ranks: bool = False,
        run_id: str | None = None,
        thresholds: Any = None,
        queue_size: int = 10_000,
        curve: Any = None,
        keys_dir: str | None = None,
        trainer: Any = None,
        forward_ranks: bool = True,
        forward_address: str | None = None,
        detect_anomalies: bool = True,
    ):
        self.address = address
        self.log_dir = log_dir
        self.anomaly_threshold = anomaly_threshold
        self.enable_detailed_logging = enable_detailed_logging
        self.insecure = insecure
        self.analyze_checkpoints = analyze_checkpoints
        self.publish_all_ranks = publish_all_ranks
        self.run_id = run_id or new_run_id()
        self.thresholds = thresholds
        self.queue_size = queue_size
        self.curve = curve
        self.keys_dir = keys_dir
        self.forward_ranks = forward_ranks
        self.forward_address = forward_address
        self.detect_anomalies = detect_anomalies
        self.trainer = trainer
        self.rank = 0
        self.is_main = True
        self.rank_info: dict[str, Any] = {"rank": 0}
        self.meta: dict[str, Any] = {}
        self._active = True
        self._publisher: Publisher | None = None
        self._recorder: _Recorder | None = None
        self._start_lock = threading.Lock()
        self._ckpt_lock = threading.Lock()
        self._last_checkpoint: str | None = None
        self._ckpt_thread: threading.Thread | None = None
        if self.thresholds is None:
            self.thresholds = self._default_thresholds()

    def _default_thresholds(self):
        try:
            from rlhf_tui.analysis.thresholds import Thresholds

            return Thresholds(anomaly_threshold=self.anomaly_threshold)
        except Exception:
            return None

    def thresholds_z(self) -> float:
        return float(getattr(self.thresholds, "anomaly_threshold", self.anomaly_threshold))

    # -- plumbing ------------------------------------------------------------------------------
    @property
    def publisher(self) -> Publisher | None:
        return self._publisher

    @property
    def log_path(self) -> str | None:
        return str(self._recorder.jsonl.path) if self._recorder and self._recorder.jsonl else None

    def _ensure_started(self) -> Publisher | None:
        if self._publisher is not None or not self._active:
            return self._publisher
        with self._start_lock:
            if self._publisher is None and self._active:
                try:
                    address = False if self.address is False else self.address
                    try:
                        curve = self._server_curve()
                    except Exception as exc:  # fail closed: no socket at all, the JSONL log goes on
                        import warnings

                        warnings.warn(
                            f"rlhf-tui: CURVE keys unusable ({exc}); publishing disabled (fail "
                            "closed). Training continues unmonitored.",
                            RuntimeWarning,
                            stacklevel=3,
                        )
                        curve, address = None, False
                    forwarding = not self.is_main and not self.publish_all_ranks
                    self._recorder = _Recorder(self, forwarding=forwarding)
                    if forwarding:
                        pub = Forwarder(
                            False if address is False else (self.forward_address or address),
                            self.run_id,
                            self._recorder,
                            rank=self.rank,
                            curve=curve,
                            insecure=self.insecure,
                        )
                    else:
                        pub = Publisher(
                            address,
                            self.run_id,
                            self._recorder,
                            queue_size=self.queue_size,
                            insecure=self.insecure,
                            curve=curve,
                        )
                    pub.start()
                    self._publisher = pub
                except Exception as exc:
                    self._active = False
                    log.warning("rlhf-tui: monitoring disabled: %s", exc)
                    import warnings

                    warnings.warn(
                        f"rlhf-tui: monitoring disabled: {exc}. Training continues unmonitored.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return self._publisher

    def _server_curve(self):
        if self.curve is None and not self.keys_dir:
            return None
        from rlhf_tui.bridge.wire.security import server_from_options

        return server_from_options(self.curve, self.keys_dir)  # SecurityError: fail closed, caller warns

    def _put(self, item: tuple) -> None:
        pub = self._publisher
        if pub is not None:
            pub.put(item)

    # -- TrainerCallback hooks -----------------------------------------------------------------
    def on_train_begin(self, args=None, state=None, control=None, **kwargs):
        try:
            self.is_main = bool(getattr(state, "is_world_process_zero", True))
            self.rank = int(getattr(args, "process_index", 0) or 0)
            if self.rank > 0:
                self.is_main = False
            self.rank_info = {
                "rank": self.rank,
                "local_rank": int(getattr(args, "local_process_index", 0) or 0),
                "hostname": os.uname().nodename if hasattr(os, "uname") else "",
            }
            self._active = self.is_main or self.publish_all_ranks or self.forward_ranks
            if not self._active:
                return
            if self.is_main or self.publish_all_ranks:
                self.meta = self._run_meta(args, state, kwargs)
            if self._ensure_started():
                self._put(("run_start", self.meta))
        except Exception as exc:
            log.warning("rlhf-tui: on_train_begin failed: %s", exc)

    def on_log(self, args=None, state=None, control=None, logs=None, **kwargs):
        pub = self._publisher
        if logs is not None and pub is not None:
            if self.is_main:
                pub.put(("log", state.global_step, time.time(), dict(logs)))
            else:
                pub.put(("log",))  # a non-main rank: a cue to sample (and forward) its system state

    def on_step_begin(self, args=None, state=None, control=None, **kwargs):
        return None  # nothing to do per step; kept so the seed's manual `on_step_begin(step, {})` works

    def on_step_end(self, args=None, state=None, control=None, **kwargs):
        # The seed's manual loop calls on_step_end(step, logs).
        if isinstance(args, int) and not isinstance(args, bool) and isinstance(state, dict):
            self.log_step(args, state)
        return None

    def on_save(self, args=None, state=None, control=None, **kwargs):
        if self._publisher is None:
            return
        try:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self._put(("checkpoint", int(state.global_step), path))
        except Exception as exc:
            log.warning("rlhf-tui: on_save failed: %s", exc)

    def on_train_end(self, args=None, state=None, control=None, **kwargs):
        if self._publisher is None:
            return
        step = int(getattr(state, "global_step", 0) or 0)
        self._put(("run_end", {"global_step": step}))
        self._publisher.flush(2.0)

    # -- manual API for custom loops -----------------------------------------------------------
    def log_step(self, step: int, metrics: dict) -> None:
        """Publish one step of a custom loop (e.g. legacy PPO `stats`); never raises."""
        try:
            if self._ensure_started() is not None:
                if not self.meta:
                    self.meta = {
                        "run_id": self.run_id,
                        "trainer": "custom",
                        "pid": os.getpid(),
                        "started": time.time(),
                        "versions": _versions(),
                    }
                    self._put(("run_start", self.meta))
                self._put(("log", int(step), time.time(), dict(metrics)))
        except Exception as exc:
            log.warning("rlhf-tui: log_step failed: %s", exc)

    def log_rewards(self, step: int, scores: list, samples: list | None = None, name: str = "reward") -> None:
        """Publish one batch of reward scores (and a few sample completions)."""
        if self._publisher is not None or self._ensure_started() is not None:
            self._put(("rewards", int(step), name, list(scores), list(samples or [])))

    def log_checkpoint(self, step: int, path: str) -> None:
        if self._ensure_started() is not None:
            self._put(("checkpoint", int(step), str(path)))

    def close(self) -> None:
        """Send run_end (if not yet), drain and close the socket."""
        if self._publisher is not None:
            self._put(("run_end", {"global_step": None}))
            self._publisher.flush(2.0)
            self._publisher.stop()

    # -- helpers -------------------------------------------------------------------------------
    def _run_meta(self, args, state, kwargs) -> dict:
        meta: dict[str, Any] = {
            "run_id": self.run_id,
            "pid": os.getpid(),
            "started": time.time(),
            "versions": _versions(),
        }
        trainer = self.trainer
        if trainer is not None:
            meta["trainer"] = type(trainer).__name__
        elif args is not None:
            name = type(args).__name__
            meta["trainer"] = name[:-6] + "Trainer" if name.endswith("Config") else "Trainer"
        model = kwargs.get("model")
        cfg = getattr(model, "config", None)
        meta["model"] = (
            getattr(cfg, "_name_or_path", None)
            or getattr(model, "name_or_path", None)
            or (type(model).__name__ if model is not None else None)
        )
        if args is not None:
            meta["args"] = {k: getattr(args, k) for k in KEY_ARGS if hasattr(args, k)}
            meta["world_size"] = int(getattr(args, "world_size", 1) or 1)
        if state is not None:
            meta["max_steps"] = getattr(state, "max_steps", None)
        meta["hostname"] = os.uname().nodename if hasattr(os, "uname") else ""
        return protocol.to_json_safe(meta)

    def _analyze_checkpoint_async(self, step: int, path: str) -> None:
        """Analyse on a worker thread with the previous checkpoint as reference; the result goes back through
        the publisher queue and into a bounded in-memory list (newest last), then `wait_for_checkpoints` is
        woken. One analysis at a time; never on the training thread."""
        from collections import deque

        reference = self._last_checkpoint
        self._last_checkpoint = path
        # Made on the first checkpoint rather than in __init__: setdefault is atomic, so a waiter racing us
        # gets the same condition. The list keeps the newest 256 analyses (a long run saves many).
        done = self.__dict__.setdefault("_ckpt_done", threading.Condition())
        with done:
            self._ckpt_pending = getattr(self, "_ckpt_pending", 0) + 1
            results = self.__dict__.setdefault("_ckpt_results", deque(maxlen=256))

        def work():
            with self._ckpt_lock:
                result = {"step": step, "path": path, "status": "failed", "issues": [], "health_score": None}
                try:
                    from rlhf_tui.analysis.checkpoint import CheckpointAnalyzer

                    ref = reference if reference and os.path.isdir(reference) else None
                    result = CheckpointAnalyzer().analyze_checkpoint(path, step, reference_checkpoint=ref)
                    result = {k: v for k, v in result.items() if k != "weight_stats"}
                    result.update({"step": step, "path": path, "status": "analysed", "reference": ref})
                except Exception as exc:
                    result["issues"] = [str(exc)]
                try:
                    self._put(("checkpoint_result", result))
                finally:
                    with done:  # published (queued for the log and the wire) and kept: the waiter may go on
                        results.append(result)
                        self._ckpt_pending -= 1
                        done.notify_all()

        thread = threading.Thread(target=work, name="rlhf-tui-checkpoint", daemon=True)
        self._ckpt_thread = thread
        thread.start()

    def wait_for_checkpoints(self, timeout: float = 30.0) -> list[dict]:
        """Block (at most `timeout` seconds) until the checkpoint analyses started so far are done and written;
        returns the analysed results kept in memory (the newest 256), oldest first."""
        deadline = time.monotonic() + timeout
        done = self.__dict__.setdefault("_ckpt_done", threading.Condition())
        with done:
            done.wait_for(lambda: getattr(self, "_ckpt_pending", 0) == 0, timeout)
            results = list(self.__dict__.get("_ckpt_results", ()))
        if self._publisher is not None:
            self._publisher.flush(max(0.0, deadline - time.monotonic()))
        return results


PPOMonitoringCallback = RLHFMonitorCallback
