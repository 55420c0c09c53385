"""The recorder: runs on the publisher thread and turns the callback's queued events into published messages and
JSONL events (metric names, system samples, training-side anomalies, reward batches gathered and analysed).
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from rlhf_tui.bridge.training.actions import Decision, record
from rlhf_tui.bridge.training.jsonl_log import JsonlLog
from rlhf_tui.bridge.training.rewards import DEFAULT_SETTING, batch_samples
from rlhf_tui.bridge.training.system import SystemSampler, memory_metrics
from rlhf_tui.bridge.wire import events, protocol
from rlhf_tui.bridge.wire.metrics import CANONICAL_SOURCES, is_summary, normalise, summary_values

if TYPE_CHECKING:
    from rlhf_tui.bridge.training.callback import RLHFMonitorCallback

log = logging.getLogger("rlhf_tui.bridge")

SYSTEM_PERIOD_S = 1.0  # at most 1 Hz: RSS and GPU memory move slowly; each sample is a JSONL line and a message
REWARD_PUBLISH_S = 0.5  # reward batches are gathered and published together at most this often


class Recorder:
    """Runs on the publisher thread: turns queued events into published messages and JSONL events."""

    def __init__(self, cb: RLHFMonitorCallback, forwarding: bool = False):
        self.cb = cb
        self.forwarding = forwarding  # a non-main rank: only its system samples and reward batches leave it
        self.jsonl = (
            JsonlLog(cb.log_dir, cb.run_id, autoflush=False, mode=cb.log_mode)
            if cb.log_dir and not forwarding
            else None
        )
        self.sampler: SystemSampler | None = None
        self.last_sample_t = 0.0
        self.memory: dict[str, float] = {}
        self.memory_json = protocol.dumps(self._seed_memory())
        self.last_log_t: float | None = None
        self.last_log_step: int | None = None
        self.detector = None
        self.summary: dict = {}
        self.ended = False
        self.reward_pending: dict[str, list[events.RewardBatch]] = {}  # batches not published yet, per function
        self.reward_published = 0.0
        self._detector_failed = False
        self._plans: dict[tuple, tuple] = {}
        self._templates: dict[tuple, str] = {}
        self._handlers = {
            events.LoggedStep: self._on_log,
            events.RunStarted: self._on_run_start,
            events.CheckpointSaved: self._on_checkpoint,
            events.Evaluated: self._on_pause,
            events.CheckpointAnalysed: self._on_checkpoint_result,
            events.RewardBatch: self._on_rewards,
            events.RunEnded: self._on_run_end,
            events.ActionTaken: self._on_action,
        }

    def __call__(self, event: Any) -> list[events.Message]:
        if self.forwarding:
            return self._on_rank_event(event)
        handler = self._handlers.get(type(event))
        return handler(event) if handler is not None else []

    def _on_rank_event(self, event: Any) -> list[events.Message]:
        """A non-main rank: reward batches are gathered (tick() sends them), anything else is a cue to sample."""
        if isinstance(event, events.RewardBatch):
            return self._on_rewards(event)
        if isinstance(event, events.SystemCue) and type(event.step) is int:
            self.last_log_step = event.step  # the rank's own global step, for its samples
        ending = isinstance(event, events.RunEnded)
        out = self.sample_system(force=ending or isinstance(event, events.RunStarted))
        return out + (self._publish_rewards() if ending and self.reward_pending else [])

    def forwarded(self, kind: str, data: dict, rank: int) -> list[events.Message]:
        """The main process: another rank's system sample or reward batch, checked (forwards.py), into the JSONL
        log and the stream with its rank. A sample without a step of its own gets this process's newest step."""
        if kind == protocol.SYSTEM:
            if type(data.get("step")) is not int:
                data["step"] = self._step_now()
            return [events.Message(kind, self._logged("system", data), rank)]
        return [events.Message(kind, self._logged("reward_batch", data), rank)]

    def _step_now(self) -> int:
        """The step a system sample is logged under: the newest logged step (0 before the first)."""
        return self.last_log_step if self.last_log_step is not None else 0

    def warm(self) -> None:
        """On the publisher thread as it starts: import the detector engine (~25 ms, numpy and the rules) while
        the trainer sets up, so the first logged step's pass does not pay for it."""
        if self.cb.detect_anomalies and not self.forwarding:
            import rlhf_tui.bridge.training.anomalies  # noqa: F401

    def status(self) -> dict:
        """What the heartbeats add to the publisher's counters: the JSONL log's failed writes, when any."""
        if self.jsonl is None or not self.jsonl.errors:
            return {}
        return {"log_errors": self.jsonl.errors, "log_error": self.jsonl.first_error}

    def tick(self) -> list[events.Message]:
        """After each drain of the queue: publish the reward batches gathered (at most every REWARD_PUBLISH_S)
        and flush the JSONL log once for everything written since the last tick."""
        out = []
        if self.reward_pending and (self.ended or time.monotonic() - self.reward_published >= REWARD_PUBLISH_S):
            out = self._publish_rewards()
        if self.jsonl is not None:
            self.jsonl.flush()
        return out

    def _logged(self, name: str, data: dict) -> protocol.Clean:
        """`data` cleaned and encoded once for both ends: the JSONL line `{"event": name, "timestamp": now,
        **data}` is written around the encoded data, and the wire envelope (`protocol.encode_clean`) reuses it."""
        clean = data if type(data) is protocol.Clean else protocol.Clean(protocol.to_json_safe(data))
        clean.encoded = protocol.dumps(clean)
        if self.jsonl is not None:
            stamp = _iso(time.time())
            if clean and "event" not in clean and "timestamp" not in clean:
                self.jsonl.write_raw(
                    b'{"event":"%s","timestamp":"%s",%s' % (name.encode(), stamp.encode(), clean.encoded[1:])
                )
            else:  # the seed's shape, where the data's own keys would clash with it (or there are none)
                self.jsonl.write({"event": name, "timestamp": stamp, **clean}, clean=True)
        return clean

    def _on_run_start(self, event: events.RunStarted) -> list[events.Message]:
        meta = self._logged("run_start", event.meta)
        return [events.Message(protocol.RUN_START, meta, self.cb.rank)] + self.sample_system(force=True)

    def _detect(self, step: int, metrics: dict) -> tuple[list[dict], list[events.Message]]:
        """(episodes new since the last pass, for the JSONL log; one ANOMALY message per new or changed one)."""
        if self._detector_failed or not self.cb.detect_anomalies:
            return [], []
        actions = getattr(self.cb, "actions", None)  # on_alarm: decided here, taken on the training thread
        try:
            if self.detector is None:
                from rlhf_tui.bridge.training.anomalies import CEILING_S, PERIOD_S, TrainingAnomalies

                # With on_alarm the user asked the engine to act: judge every second (the pass's CPU is worth a
                # saved run), not only once enough rows have come to make a pass cheap per row.
                acting = bool(getattr(actions, "policy", None))
                self.detector = TrainingAnomalies(
                    self.cb.thresholds, meta=self.cb.meta, ceiling_s=PERIOD_S if acting else CEILING_S
                )
            self.detector.add(step, metrics)
            new, changed = self.detector.poll()
            if actions is not None:
                actions.consider(changed, self.detector.first_step)
            return new, [events.Message(protocol.ANOMALY, protocol.to_json_safe(ep), self.cb.rank) for ep in changed]
        except Exception as exc:  # the analysis is optional on the training side; counted, logged once
            self._detector_failed = True
            log.warning("rlhf-tui: anomaly detection disabled on the training side: %s", exc)
            return [], []

    def _on_log(self, event: events.LoggedStep) -> list[events.Message]:
        step, wall, logs = event.step, event.wall, event.logs
        if is_summary(logs):
            self.summary = summary_values(logs)
            return []
        metrics, floats = self._normalise(logs)
        if self.last_log_t is not None and self.last_log_step is not None and step > self.last_log_step:
            metrics["time/step_s"] = per_step = (wall - self.last_log_t) / (step - self.last_log_step)
            floats = floats and type(per_step) is float
        self.last_log_t, self.last_log_step = wall, step
        out = self.sample_system()
        metrics.update(self.memory)
        anomalies, messages = self._detect(step, metrics)
        out.extend(messages)
        # Cleaned (non-finite floats as strings) and encoded once, for both the JSONL log and the wire:
        # turning floats into text is most of what a step costs this thread. Floats whose sum is finite are
        # all finite: nothing to clean (a NaN or an infinity makes the sum non-finite, as does an overflow).
        if floats and math.isfinite(sum(metrics.values())):  # memory columns are floats too
            clean = protocol.Clean(metrics)
            clean.encoded = self._encode_floats(clean)
        else:
            clean = protocol.Clean(protocol.clean_metrics(metrics))
            clean.encoded = protocol.dumps(clean)
        if self.jsonl is not None:
            self.jsonl.write_raw(
                b'{"event":"step_end","step":%d,"timestamp":"%s","ppo_metrics":%s,"anomalies":%s,"memory_usage":%s}'
                % (
                    step,
                    _iso(wall).encode(),
                    clean.encoded,
                    protocol.dumps(protocol.to_json_safe(anomalies)) if anomalies else b"[]",
                    self.memory_json,
                )
            )
        out.append(events.Message(protocol.STEP, {"step": step, "metrics": clean, "wall": wall}, self.cb.rank))
        return out

    def _encode_floats(self, metrics: dict) -> bytes:
        """`protocol.dumps(metrics)` for finite floats, through a template per key set (a third cheaper): json
        writes a finite float as its repr, and the keys' text is the same every step."""
        keys = tuple(metrics)
        template = self._templates.get(keys)
        if template is None:
            if not all(type(k) is str for k in keys):
                return protocol.dumps(metrics)
            if len(self._templates) >= 64:
                self._templates.clear()
            names = (protocol.dumps(k).decode().replace("%", "%%") for k in keys)
            template = self._templates[keys] = "{" + ",".join(f"{name}:%r" for name in names) + "}"
        return (template % tuple(metrics.values())).encode()

    def _normalise(self, logs: dict) -> tuple[dict, bool]:
        """`normalise(logs)` through a plan per set of keys (a trainer logs the same keys every step): which keys
        to keep and which canonical names to copy. Values that are not all floats take the general path.
        Returns (metrics, whether every value is a float)."""
        keys = tuple(logs)
        plan = self._plans.get(keys)
        if plan is None:
            if len(self._plans) >= 64:
                self._plans.clear()
            out = normalise(logs)
            kept = [k for k in keys if k in out]
            present, aliases = set(kept), []
            for name, sources in CANONICAL_SOURCES.items():  # normalise()'s own rule, in its order
                source = next((k for k in sources if k in present), None) if name not in present else None
                if source is not None:
                    aliases.append((name, source))
                    present.add(name)
            plan = self._plans[keys] = (kept, aliases)
            return out, False
        values = logs.values()
        if not all(type(v) is float for v in values):
            return normalise(logs), False
        kept, aliases = plan
        out = {k: logs[k] for k in kept}
        for name, source in aliases:
            out[name] = out[source]
        return out, True

    def _seed_memory(self) -> dict:
        return {"rss_mb": self.memory.get("memory/rss_mb"), "gpu_memory_mb": self.memory.get("memory/gpu_mb")}

    def sample_system(self, force: bool = False) -> list[events.Message]:
        now = time.monotonic()
        if not force and now - self.last_sample_t < SYSTEM_PERIOD_S:
            return []
        self.last_sample_t = now
        if self.sampler is None:
            self.sampler = SystemSampler()
        sample = self.sampler.sample()
        sample["step"] = self._step_now()
        sample.update(self.cb.rank_info)
        self.memory = memory_metrics(sample)
        self.memory_json = protocol.dumps(self._seed_memory())  # encoded once per sample, not per step
        return [events.Message(protocol.SYSTEM, self._logged("system", sample), self.cb.rank)]

    def _on_pause(self, event: events.Evaluated | events.CheckpointSaved) -> list[events.Message]:
        """An evaluation or a save after the newest logged step: the next step's time/step_s starts when it
        ended, so it counts training only."""
        if event.wall is not None and event.step == self.last_log_step:
            self.last_log_t = max(self.last_log_t or event.wall, event.wall)
        return []

    def _on_checkpoint(self, event: events.CheckpointSaved) -> list[events.Message]:
        self._on_pause(event)
        data = self._logged("checkpoint", {"step": event.step, "path": event.path, "status": "saved"})
        if self.cb.analyze_checkpoints:
            self.cb._analyze_checkpoint_async(event.step, event.path)
        return [events.Message(protocol.CHECKPOINT, data, self.cb.rank)]

    def _on_checkpoint_result(self, event: events.CheckpointAnalysed) -> list[events.Message]:
        return [events.Message(protocol.CHECKPOINT, self._logged("checkpoint_analysis", event.result), self.cb.rank)]

    def _on_rewards(self, event: events.RewardBatch) -> list[events.Message]:
        # Gathered, then published together by tick(): one message per reward function every
        # REWARD_PUBLISH_S instead of one per batch (cleaning, encoding and writing them was ~0.7 ms a batch).
        self.reward_pending.setdefault(event.reward_func, []).append(event)
        return []

    def _publish_rewards(self) -> list[events.Message]:
        self.reward_published = time.monotonic()
        out = []
        for name, batches in self.reward_pending.items():
            data = events.coalesced_rewards(name, batches)
            setting = getattr(self.cb, "sample_setting", DEFAULT_SETTING)
            max_length = self.cb.meta.get("args", {}).get("max_completion_length")
            data["samples"] = batch_samples(batches, setting, max_length)  # JSON-safe as it is built
            world_size = getattr(self.cb, "world_size", None)
            if type(world_size) is int and world_size > 1:  # one record per rank's batch: the monitor labels them
                data["rank"] = self.cb.rank
            # Made JSON-safe piece by piece above: encoded once for the log and the wire.
            out.append(
                events.Message(protocol.REWARD, self._logged("reward_batch", protocol.Clean(data)), self.cb.rank)
            )
        self.reward_pending = {}
        return out

    def _on_action(self, event: events.ActionTaken) -> list[events.Message]:
        """An on_alarm action was taken: the JSONL log says what and why; the wire gets the episode update."""
        done = record(Decision(event.action, event.episode), event.step)
        self.cb.actions.taken.append(done)
        return [events.Message(protocol.ANOMALY, self._logged("action", done), self.cb.rank)]

    def _on_run_end(self, event: events.RunEnded) -> list[events.Message]:
        if self.ended:
            return []
        self.ended = True
        step = event.global_step if event.global_step is not None else self.last_log_step
        data: dict = {"global_step": step, "summary": self.summary}
        if event.status != "finished":  # the run raised: say so (a finished run's run_end is as it always was)
            data.update(status=event.status, error=event.error)
        out = self.sample_system(force=True) + (self._publish_rewards() if self.reward_pending else [])
        return out + [events.Message(protocol.RUN_END, self._logged("run_end", data), self.cb.rank)]


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).isoformat(timespec="milliseconds")
