"""`RLHFMonitorCallback`: the TrainerCallback that publishes a run to rlhf-tui monitors and a JSONL log.

The training thread does almost nothing: each hook copies what it was given into the publisher's bounded
queue. Everything else (metric names, system samples, anomaly detection, checkpoint and reward analysis,
the JSONL log, the sockets) happens on the publisher thread or a worker thread, so a slow disk, a stalled
monitor or a bug of ours can never slow down or break training.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import deque
from datetime import datetime
from typing import Any

from rlhf_tui.bridge.training.forwarder import Forwarder
from rlhf_tui.bridge.training.publisher import Publisher
from rlhf_tui.bridge.training.recorder import Recorder
from rlhf_tui.bridge.wire import events, protocol

try:  # the callback works without transformers for custom loops (log_step)
    from transformers import TrainerCallback as _Base
except Exception:  # pragma: no cover - exercised only without transformers
    _Base = object

log = logging.getLogger("rlhf_tui.bridge")

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


_SYSTEM_CUE = events.SystemCue()


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
        detect_anomalies: run the anomaly engine on the training side too, on its recent history at most once a
            second (the JSONL log's per-step `anomalies` and live `anomaly` messages); the monitor runs it anyway.
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
        self._recorder: Recorder | None = None
        self._start_lock = threading.Lock()
        self._ckpt_lock = threading.Lock()
        self._last_checkpoint: str | None = None
        self._ckpt_thread: threading.Thread | None = None
        # Analyses in flight and the newest 256 results (a long run saves many); `wait_for_checkpoints` waits on
        # the condition instead of polling.
        self._ckpt_done = threading.Condition()
        self._ckpt_pending = 0
        self._ckpt_results: deque[dict] = deque(maxlen=256)
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
                    self._recorder = Recorder(self, forwarding=forwarding)
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
                            idle=self._recorder.tick,
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

    def _put(self, event: Any) -> None:
        pub = self._publisher
        if pub is not None:
            pub.put(event)

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
                self._put(events.RunStarted(self.meta))
        except Exception as exc:
            log.warning("rlhf-tui: on_train_begin failed: %s", exc)

    def on_log(self, args=None, state=None, control=None, logs=None, **kwargs):
        pub = self._publisher
        if logs is not None and pub is not None:
            if self.is_main:
                pub.put(events.LoggedStep(state.global_step, time.time(), dict(logs)))
            else:
                pub.put(_SYSTEM_CUE)  # a non-main rank: a cue to sample (and forward) its system state

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
            self._put(events.CheckpointSaved(int(state.global_step), path))
        except Exception as exc:
            log.warning("rlhf-tui: on_save failed: %s", exc)

    def on_train_end(self, args=None, state=None, control=None, **kwargs):
        if self._publisher is None:
            return
        step = int(getattr(state, "global_step", 0) or 0)
        self._put(events.RunEnded(step))
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
                    self._put(events.RunStarted(self.meta))
                self._put(events.LoggedStep(int(step), time.time(), dict(metrics)))
        except Exception as exc:
            log.warning("rlhf-tui: log_step failed: %s", exc)

    def log_rewards(
        self,
        step: int,
        scores: list,
        samples: list | None = None,
        name: str = "reward",
        *,
        prompts: Any = None,
        completions: Any = None,
    ) -> None:
        """Publish one batch of reward scores, and a few sample completions: `samples` as given, or picked
        from `prompts`/`completions` (best, worst, one at random) on the publisher thread."""
        if self._publisher is not None or self._ensure_started() is not None:
            if samples is not None or completions is None:
                samples = list(samples or [])
            self._put(events.RewardBatch(int(step), name, list(scores), samples, prompts, completions))

    def log_checkpoint(self, step: int, path: str) -> None:
        if self._ensure_started() is not None:
            self._put(events.CheckpointSaved(int(step), str(path)))

    def close(self) -> None:
        """Send run_end (if not yet), drain and close the socket."""
        if self._publisher is not None:
            self._put(events.RunEnded(None))
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
        reference = self._last_checkpoint
        self._last_checkpoint = path
        done, results = self._ckpt_done, self._ckpt_results
        with done:
            self._ckpt_pending += 1

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
                    self._put(events.CheckpointAnalysed(result))
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
        with self._ckpt_done:
            self._ckpt_done.wait_for(lambda: self._ckpt_pending == 0, timeout)
            results = list(self._ckpt_results)
        if self._publisher is not None:
            self._publisher.flush(max(0.0, deadline - time.monotonic()))
        return results


PPOMonitoringCallback = RLHFMonitorCallback
