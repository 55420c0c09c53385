"""`RLHFMonitorCallback`: the TrainerCallback that publishes a run to rlhf-tui monitors and a JSONL log.

The training thread does almost nothing: each hook copies what it was given into the publisher's bounded
queue. Everything else (metric names, system samples, anomaly detection, checkpoint and reward analysis,
the JSONL log, the sockets) happens on the publisher thread or a worker thread, so a slow disk, a stalled
monitor or a bug of ours can never slow down or break training.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

from rlhf_tui.bridge.training import ranks, run_token
from rlhf_tui.bridge.training.actions import AlarmActions, parse_policy
from rlhf_tui.bridge.training.checkpoints import CheckpointAnalyses
from rlhf_tui.bridge.training.forwarder import Forwarder
from rlhf_tui.bridge.training.open_runs import exception_text, open_runs
from rlhf_tui.bridge.training.publisher import Publisher
from rlhf_tui.bridge.training.recorder import Recorder
from rlhf_tui.bridge.training.run_meta import custom_meta, new_run_id, trainer_meta
from rlhf_tui.bridge.wire import events

try:  # the callback works without transformers for custom loops (log_step)
    from transformers import TrainerCallback as _Base
except Exception:  # pragma: no cover - exercised only without transformers
    _Base = object

log = logging.getLogger("rlhf_tui.bridge")

AUTO_LOG_DIR = "auto"  # the default log_dir: OUTPUT_DIR/rlhf-tui when the trainer has an output_dir
FALLBACK_LOG_DIR = "./logs/rlhf-tui"  # ... and this without one (a custom loop)
CHECKPOINT_WAIT_S = 10.0  # close() / the next train() wait this long at most for checkpoint analyses running


class RLHFMonitorCallback(_Base):
    """Publishes a TRL/transformers training run live (ZeroMQ) and to a JSONL log.

    Args:
        address: where monitors connect (`tcp://127.0.0.1:5555`, env RLHF_TUI_ADDRESS). False: no socket.
            Another callback of this process already publishing there hands the address over to this one.
        log_dir: folder of the JSONL log (`run-<run_id>.jsonl`); None: no log. Default "auto":
            OUTPUT_DIR/rlhf-tui inside the trainer's output_dir (so `rlhf-tui report OUTPUT_DIR` finds the log
            beside the checkpoints), ./logs/rlhf-tui without one.
        anomaly_threshold: the z-score threshold of the anomaly detectors (the seed's argument).
        enable_detailed_logging: accepted for the seed's API; the JSONL log always has every step.
        insecure: allow a non-loopback address without CURVE keys.
        analyze_checkpoints: analyse each saved checkpoint on a worker thread (health, drift).
        publish_all_ranks: accepted and ignored (warned once): every rank reaches the monitor through the main
            process's one address (`forward_ranks`); non-main processes never bind an address or write a log.
        forward_ranks: non-main processes (torchrun/accelerate ranks) send their system samples (GPU memory
            per device) and reward batches (`monitor_rewards`) to the main process, which publishes them on the
            run's one address and writes them to its JSONL log with their rank (default True).
            The main process takes them only with the run token (env RLHF_TUI_RUN_TOKEN, which the launcher
            passes to every rank: needed across nodes; else derived from the CURVE keys, else a private file on
            the main node) and only for ranks 1 .. world_size-1; see docs/security.md, "Forwarded samples".
        forward_address: where non-main ranks send (default: `address`; a wildcard host means loopback on
            the main node and MASTER_ADDR on other nodes).
        curve: a `security.ServerCurve` (CURVE encryption + authorised monitor keys; allows non-loopback).
        keys_dir: the same from a keys folder (`rlhf-tui keygen DIR`): DIR/server.key_secret and the monitor
            public keys in DIR/authorized/. A key problem disables monitoring (fail closed), never training.
        detect_anomalies: run the anomaly engine on the training side too, on its recent history at most once a
            second (the JSONL log's per-step `anomalies` and live `anomaly` messages); the monitor runs it anyway.
        on_alarm: actions on the training side's alarms, e.g. `{"critical": "stop", "high": "save"}`: at the next
            step boundary "save" asks the trainer for a checkpoint (`control.should_save`), "stop" for a
            checkpoint and a clean stop (`control.should_training_stop` too). The strongest action configured
            at or below an episode's severity is taken, once per episode, never during the run's grace period
            (except for non-finite values). Needs `detect_anomalies`. Off by default.
        log_mode: the JSONL log's file mode (default 0o600: it holds prompts and completions); folders made
            for it get the matching mode (0o700), existing ones are left as they are.
        run_id: fixed run id (default: time + random). Each `train()` is its own run: a second one with the
            same callback gets a new id (`<run_id>-2`, ... for a fixed one).

    Each `train()` sends run_start ... run_end. A custom loop (`log_step`) ends its run with `close()`, by
    using the callback as a context manager (`with RLHFMonitorCallback(...) as cb:`), or at the latest when
    the interpreter exits.
    """

    def __init__(
        self,
        address: str | None | bool = None,
        log_dir: str | None = AUTO_LOG_DIR,
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
        on_alarm: dict[str, str] | None = None,
        log_mode: int = 0o600,
    ):
        self.address = address
        self.log_dir_option = log_dir
        self.log_dir = FALLBACK_LOG_DIR if log_dir == AUTO_LOG_DIR else log_dir  # resolved at each run start
        self.log_mode = log_mode
        self.anomaly_threshold = anomaly_threshold
        self.enable_detailed_logging = enable_detailed_logging
        self.insecure = insecure
        self.analyze_checkpoints = analyze_checkpoints
        self.publish_all_ranks = publish_all_ranks
        if publish_all_ranks:
            ranks.warn_all_ranks()
        self.run_id_option = run_id
        self.run_id = run_id or new_run_id()
        self.runs = 0  # runs started by this callback (each train(), or a custom loop's log_step after close())
        self._run_open = False  # run_start sent, run_end not yet
        self._in_step = False  # between on_step_begin and on_step_end (a reward batch scored now is that step's)
        self._train_running = False  # on_train_begin seen, on_train_end not yet
        self._logging_first_step = False
        self.thresholds = thresholds
        self.queue_size = queue_size
        self.curve = curve
        self.keys_dir = keys_dir
        self.forward_ranks = forward_ranks
        self.forward_address = forward_address
        self.detect_anomalies = detect_anomalies
        self.on_alarm = parse_policy(on_alarm)  # a bad policy is a configuration error: raised here, at once
        self.trainer = trainer
        self.rank = 0
        self.is_main = True
        self.rank_info: dict[str, Any] = {"rank": 0}
        self.world_size: int | None = None  # the job's, from TrainingArguments (None: not known)
        self._token_file: tuple[Any, str] | None = None  # the run token file this process wrote, and its token
        self.meta: dict[str, Any] = {}
        self._active = True
        self._publisher: Publisher | None = None
        self._recorder: Recorder | None = None
        self._log_path: str | None = None
        self._start_lock = threading.Lock()
        self.checkpoints = CheckpointAnalyses()
        if self.thresholds is None:
            self.thresholds = self._default_thresholds()
        self.actions = AlarmActions(self.on_alarm, int(getattr(self.thresholds, "grace_steps", 10)))

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
        """The JSONL log of the current run, or of the last one after close()."""
        return self._log_path

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
                    forwarding = not self.is_main
                    self._recorder = Recorder(self, forwarding=forwarding)
                    self._log_path = str(self._recorder.jsonl.path) if self._recorder.jsonl else None
                    if forwarding:
                        pub = Forwarder(
                            False if address is False else (self.forward_address or address),
                            self.run_id,
                            self._recorder,
                            rank=self.rank,
                            curve=curve,
                            insecure=self.insecure,
                            idle=self._recorder.tick,
                        )
                    else:
                        world_size = self.world_size or ranks.env_world_size()
                        token, self._token_file = ranks.share_run_token(address, curve, world_size)
                        pub = Publisher(
                            address,
                            self.run_id,
                            self._recorder,
                            queue_size=self.queue_size,
                            insecure=self.insecure,
                            curve=curve,
                            idle=self._recorder.tick,
                            status=self._recorder.status,
                            forward_token=token,
                            world_size=world_size,
                            forwarded=self._recorder.forwarded,
                            warm=self._recorder.warm,
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

    def _begin_run(self, meta) -> Publisher | None:
        """Start this callback's next run: a previous one (open or ended) is finished first and this one gets a
        new run id; then the publisher and JSONL log start under it and run_start is queued. `meta()` gives
        the run_start data (it reads the run id)."""
        if self.runs:
            self._finish_run(aborted=self._train_running)
            self.run_id = f"{self.run_id_option}-{self.runs + 1}" if self.run_id_option else new_run_id()
        self.runs += 1
        self._active = True
        self.meta = meta()
        pub = self._ensure_started()
        if pub is not None:
            self.actions.reset()
            pub.put(events.RunStarted(self.meta))
            self._run_open = pub.run_open = True
            open_runs.add(pub)
        return pub

    def _end_run(self, global_step: int | None, status: str = "finished", error: str | None = None) -> None:
        """Queue run_end for the open run (once) and flush it out (bounded); the socket stays up for late
        joiners until the next run, close() or exit."""
        self._train_running = False
        pub = self._publisher
        if pub is not None and self._run_open:
            self._run_open = pub.run_open = False
            open_runs.discard(pub)
            pub.put(events.RunEnded(global_step, status, error))
            pub.flush(2.0)

    def _finish_run(self, aborted: bool = False) -> None:
        """End the run (if open), let checkpoint analyses still running finish into its log (at most
        CHECKPOINT_WAIT_S), stop its publisher (bounded) and close its JSONL log. `aborted`: its train() never
        reached on_train_end (it raised, e.g. in a notebook cell): the run ends as "crashed", with the
        interpreter's last uncaught exception when there is one."""
        if aborted and self._run_open:
            self._end_run(None, "crashed", exception_text(getattr(sys, "last_value", None)) or "train() raised")
        self._end_run(None)
        if self.checkpoints.pending and self._publisher is not None:
            self.wait_for_checkpoints(CHECKPOINT_WAIT_S)
        pub, recorder = self._publisher, self._recorder
        self._publisher = self._recorder = None
        self.meta = {}
        self.checkpoints.last = None
        token_file, self._token_file = self._token_file, None
        if pub is not None:
            try:
                pub.stop()
            finally:
                if recorder is not None and recorder.jsonl is not None:
                    recorder.jsonl.close()
        if token_file is not None:
            run_token.remove_token(*token_file)

    def _ensure_run(self, start: bool = True) -> Publisher | None:
        """The open (or ended) run's publisher; without one, a custom loop's call starts a run (`start`)."""
        if self._publisher is None and self._active and start:
            self._resolve_log_dir(getattr(self.trainer, "args", None))
            return self._begin_run(lambda: custom_meta(self.run_id))
        return self._publisher

    def _resolve_log_dir(self, args: Any) -> None:
        option = self.log_dir_option
        if option != AUTO_LOG_DIR:
            self.log_dir = option
            return
        output_dir = getattr(args, "output_dir", None)
        self.log_dir = os.path.join(str(output_dir), "rlhf-tui") if output_dir else FALLBACK_LOG_DIR

    def reward_step(self, state: Any) -> int:
        """The step TRL logs a reward batch under (the `monitor_rewards` wrapper asks): a batch scored inside a
        training step is logged with that step's metrics (global_step + 1, or the next logged step when
        logging_steps > 1, at most max_steps); one scored between steps (evaluation) at the current step."""
        step = int(getattr(state, "global_step", 0) or 0)
        if not self._in_step:
            return step
        step += 1
        every = getattr(state, "logging_steps", 0)
        every = int(every) if isinstance(every, (int, float)) and every >= 1 else 1
        if step % every and not (step == 1 and self._logging_first_step):
            step = -(-step // every) * every
            max_steps = getattr(state, "max_steps", 0)
            if isinstance(max_steps, int) and max_steps > 0:
                step = min(step, max_steps)
        return step

    def __enter__(self) -> RLHFMonitorCallback:
        return self

    def __exit__(self, tp: Any, value: Any, tb: Any) -> None:
        if value is not None and self._run_open:  # the loop raised: its run ends as crashed, with why
            status = "interrupted" if isinstance(value, KeyboardInterrupt) else "crashed"
            self._end_run(None, status, exception_text(value))
        self.close()

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
            self.is_main, self.rank, self.rank_info = ranks.process_rank(args, state)
            self.world_size = ranks.arg_world_size(args)
            self._logging_first_step = bool(getattr(args, "logging_first_step", False))
            self._in_step = False
            if not (self.is_main or self.forward_ranks):
                self._active = False
                return
            self._resolve_log_dir(args)
            self._begin_run(
                lambda: trainer_meta(self.run_id, self.trainer, args, state, kwargs) if self.is_main else {}
            )
            self._train_running = True  # until on_train_end: a train() that raises never gets there
        except Exception as exc:
            log.warning("rlhf-tui: on_train_begin failed: %s", exc)

    def on_log(self, args=None, state=None, control=None, logs=None, **kwargs):
        pub = self._publisher
        if logs is not None and pub is not None:
            if self.is_main:
                pub.put(events.LoggedStep(state.global_step, time.time(), dict(logs)))
            else:
                # A non-main rank: a cue to sample (and forward) its system state, at its own step.
                pub.put(events.SystemCue(int(getattr(state, "global_step", 0) or 0)))

    def on_step_begin(self, args=None, state=None, control=None, **kwargs):
        self._in_step = True  # (the seed's manual `on_step_begin(step, {})` works too)
        return None

    def on_step_end(self, args=None, state=None, control=None, **kwargs):
        self._in_step = False
        # The seed's manual loop calls on_step_end(step, logs).
        if isinstance(args, int) and not isinstance(args, bool) and isinstance(state, dict):
            self.log_step(args, state)
            return None
        if self.on_alarm and control is not None:
            return self._act(state, control)
        return None

    def _act(self, state, control):
        """Take an action the training-side engine asked for (training thread): through TrainerControl only."""
        try:
            decision = self.actions.take()
            if decision is None:
                return None
            control.should_save = True
            if decision.action == "stop":
                control.should_training_stop = True
            step = int(getattr(state, "global_step", 0) or 0)
            log.warning(
                "rlhf-tui: %s at step %d: %s %s on %s",
                "saving a checkpoint and stopping" if decision.action == "stop" else "saving a checkpoint",
                step,
                decision.episode.get("severity"),
                decision.episode.get("detector"),
                decision.episode.get("metric"),
            )
            pub = self._publisher
            if pub is not None:
                pub.put(events.ActionTaken(step, decision.action, decision.episode))
            return control
        except Exception as exc:  # never into training
            log.warning("rlhf-tui: on_alarm action failed: %s", exc)
            return None

    def on_evaluate(self, args=None, state=None, control=None, **kwargs):
        if self._publisher is not None:  # marks the step: its time/step_s leaves the evaluation out
            self._put(events.Evaluated(int(getattr(state, "global_step", 0) or 0), time.time()))

    def on_save(self, args=None, state=None, control=None, **kwargs):
        if self._publisher is None:
            return
        try:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
            self._put(events.CheckpointSaved(int(state.global_step), path, time.time()))
        except Exception as exc:
            log.warning("rlhf-tui: on_save failed: %s", exc)

    def on_train_end(self, args=None, state=None, control=None, **kwargs):
        self._in_step = False
        self._end_run(int(getattr(state, "global_step", 0) or 0))

    # -- manual API for custom loops -----------------------------------------------------------
    def log_step(self, step: int, metrics: dict) -> None:
        """Publish one step of a custom loop (e.g. legacy PPO `stats`); never raises."""
        try:
            pub = self._ensure_run()
            if pub is not None:
                pub.put(events.LoggedStep(int(step), time.time(), dict(metrics)))
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
        completion_ids: Any = None,
    ) -> None:
        """Publish one batch of reward scores, and sample completions: `samples` as given, or picked from
        `prompts`/`completions` on the publisher thread (all, or a stratified pick: `monitor_rewards`' setting;
        `completion_ids` give lengths and truncation)."""
        if self._ensure_run(start=not self.runs) is not None:  # a batch after close() starts no run
            if samples is not None or completions is None:
                samples = list(samples or [])
            self._put(events.RewardBatch(int(step), name, list(scores), samples, prompts, completions, completion_ids))

    def log_checkpoint(self, step: int, path: str) -> None:
        if self._ensure_run(start=not self.runs) is not None:
            self._put(events.CheckpointSaved(int(step), str(path), time.time()))

    def close(self) -> None:
        """Send run_end (if not yet), drain and close the socket and the JSONL log (bounded). Safe to call
        twice; a later `log_step` starts a new run."""
        self._finish_run(aborted=self._train_running)

    # -- helpers -------------------------------------------------------------------------------
    def _analyze_checkpoint_async(self, step: int, path: str) -> None:
        """Analyse a saved checkpoint on a worker thread (the recorder asks, on the publisher thread)."""
        self.checkpoints.start(step, path, self._publisher)

    def wait_for_checkpoints(self, timeout: float = 30.0) -> list[dict]:
        """Block (at most `timeout` seconds) until the checkpoint analyses started so far are done and written;
        returns the analysed results kept in memory (the newest 256), oldest first."""
        deadline = time.monotonic() + timeout
        results = self.checkpoints.wait(timeout)
        if self._publisher is not None:
            self._publisher.flush(max(0.0, deadline - time.monotonic()))
        return results


PPOMonitoringCallback = RLHFMonitorCallback
