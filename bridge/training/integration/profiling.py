"""`PhaseProfiler`: per-step phase timings (generation, reward, scoring, optimisation) from TRL's own profiling
contexts and our step hooks, logged as time/* metrics and summed for `results["profiling"]`."""

from __future__ import annotations

import functools
import logging
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Callable

try:  # the profiler is a TrainerCallback; importing this module does not need transformers
    from transformers import TrainerCallback as _CallbackBase
except Exception:  # pragma: no cover - exercised only without transformers
    _CallbackBase = object

log = logging.getLogger("rlhf_tui.bridge.training.integration")

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
