"""Fault injection for the corpus runs: one `TrainerCallback` plus wrappers around reward functions.

Every fault is off until the optimizer step that follows global step `onset` and on from then to the end of
the run. `Clock` holds `state.global_step` as the callback saw it at `on_step_begin` (the number of finished
optimizer steps), so a reward function called while step `s + 1` is computed reads `s`: the fault is active
when `s >= onset`. A gradual fault ramps its level linearly from 1/ramp at the first faulty step to 1 at
`onset + ramp` and stays there; a sudden one is at full level at once.

How each fault acts (`params` are the run's `fault_params`):

* `lr_spike` (sudden): `mode="scheduler"` multiplies the scheduler's `base_lrs` (so the logged
  `learning_rate` jumps too); `mode="optimizer"` multiplies the optimizer's lr behind the scheduler's back at
  every step (the logged lr stays on schedule);
* `grad_explosion` (sudden): a hook on every policy parameter multiplies its gradient by `factor` (the
  logged `grad_norm` is the pre-clip norm; with a large `max_grad_norm` the update is not clipped either);
* `reward_nan`, `reward_scale`, `dead_reward` (sudden): the wrapped reward function returns NaN for a
  fraction `frac` of completions, its values times `factor`, or the constant `value`;
* `label_flip` (sudden, DPO): `compute_loss` swaps chosen and rejected for a fraction `frac` of the pairs;
* `reward_drift` (gradual): the wrapped function returns `(1 - a) * r + a * noise`, noise ~ N(mu, sigma);
* `length_exploit` (gradual): the wrapped length reward gains `a * gain * max(0, n - base_tokens) /
  (tokens - base_tokens)` (`n` the completion's token count, `base_tokens` the length of a well-formed
  answer, `tokens` the `max_completion_length`): every token beyond a good answer pays, so completions
  grow until they hit the maximum, and the reward grows with them;
* `entropy_collapse` (gradual): a forward hook multiplies the policy's final-norm output (so its logits, in
  generation and in the loss alike) by `1 + a * (sharpen - 1)`;
* `kl_runaway` (gradual): the trainer's `beta` goes linearly from its configured value through 0 to
  `beta_end` (slightly below 0, as a sign slip in a KL schedule would leave it), so nothing holds the policy
  near the reference and the KL term ends up pushing it away: KL grows without bound. (`beta` is never
  exactly 0 on the way: TRL would stop computing and logging `kl`.)
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback

SUDDEN = {"lr_spike", "grad_explosion", "reward_nan", "reward_scale", "dead_reward", "label_flip"}
GRADUAL = {"reward_drift", "length_exploit", "entropy_collapse", "kl_runaway"}
REWARD_FAULTS = {"reward_nan", "reward_scale", "dead_reward", "reward_drift", "length_exploit"}


def kind_of(fault: str) -> str | None:
    if fault == "none":
        return None
    if fault in SUDDEN:
        return "sudden"
    if fault in GRADUAL:
        return "gradual"
    raise ValueError(f"unknown fault {fault!r}")


@dataclass
class Clock:
    onset: int | None
    ramp: int = 0
    step: int = 0
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def level(self) -> float:
        """0 before the onset, then the fault's strength in (0, 1]."""
        if self.onset is None or self.step < self.onset:
            return 0.0
        if self.ramp <= 0:
            return 1.0
        return min(1.0, (self.step - self.onset + 1) / self.ramp)


def wrap_reward(func, fault: str, params: dict[str, Any], clock: Clock):
    """`func` with the reward fault applied while the clock says so; keeps `__name__` for TRL's metric keys."""

    @functools.wraps(func)
    def wrapped(completions, **kwargs):
        values = [float(v) for v in func(completions, **kwargs)]
        a = clock.level()
        if a <= 0.0:
            return values
        if fault == "reward_nan":
            return [math.nan if clock.rng.random() < params["frac"] else v for v in values]
        if fault == "reward_scale":
            return [v * params["factor"] for v in values]
        if fault == "dead_reward":
            return [float(params["value"]) for _ in values]
        if fault == "reward_drift":
            return [(1 - a) * v + a * clock.rng.gauss(params["mu"], params["sigma"]) for v in values]
        if fault == "length_exploit":
            ids = kwargs.get("completion_ids") or [[0] * len(str(c)) for c in completions]
            base, full = float(params["base_tokens"]), float(params["tokens"])
            return [v + a * params["gain"] * max(0.0, len(t) - base) / (full - base) for v, t in zip(values, ids)]
        raise ValueError(f"{fault} is not a reward fault")

    return wrapped


class FaultCallback(TrainerCallback):
    """Drives the clock and applies the faults that act on the optimizer, the gradients or the model."""

    def __init__(self, fault: str, params: dict[str, Any], clock: Clock):
        self.fault, self.params, self.clock = fault, params, clock
        self.trainer: Any = None  # set after the trainer is built (kl_runaway, label_flip)
        self._scaled = False
        self._beta0: float | None = None
        self._hooks: list[Any] = []

    # -- set-up ------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        if self.fault == "grad_explosion":
            factor = float(self.params["factor"])
            for p in model.parameters():
                if p.requires_grad:
                    self._hooks.append(p.register_hook(lambda g, f=factor: g * f if self.clock.level() > 0 else g))
        elif self.fault == "entropy_collapse":
            norm = model.get_decoder().norm
            sharpen = float(self.params["sharpen"])

            def sharpen_hook(module, inputs, output):
                a = self.clock.level()
                return output * (1.0 + a * (sharpen - 1.0)) if a > 0 else output

            self._hooks.append(norm.register_forward_hook(sharpen_hook))
        if self.fault == "label_flip" and self.trainer is not None:
            self._wrap_compute_loss(self.trainer)

    def on_train_end(self, args, state, control, **kwargs):
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    # -- per step ----------------------------------------------------------------------------------------------
    def on_step_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        self.clock.step = state.global_step
        a = self.clock.level()
        if a <= 0 or optimizer is None:
            return
        if self.fault == "lr_spike":
            factor = float(self.params["factor"])
            if self.params.get("mode", "scheduler") == "scheduler":
                if not self._scaled and lr_scheduler is not None:
                    lr_scheduler.base_lrs = [b * factor for b in lr_scheduler.base_lrs]
                    for g in optimizer.param_groups:
                        g["lr"] *= factor
                    self._scaled = True
            else:  # the scheduler rewrote the lr after the last step: multiply it again
                for g in optimizer.param_groups:
                    g["lr"] *= factor
        elif self.fault == "kl_runaway" and self.trainer is not None:
            if self._beta0 is None:
                self._beta0 = float(self.trainer.beta)
            beta = self._beta0 + a * (float(self.params["beta_end"]) - self._beta0)
            self.trainer.beta = beta if abs(beta) > 1e-9 else 1e-9  # TRL skips the KL term (and its log) at 0

    # -- DPO label flip ----------------------------------------------------------------------------------------
    def _wrap_compute_loss(self, trainer) -> None:
        original = trainer.compute_loss
        frac = float(self.params["frac"])

        def compute_loss(model, inputs, *args, **kwargs):
            if self.clock.level() > 0:
                inputs = flip_pairs(inputs, frac, self.clock.rng)
            return original(model, inputs, *args, **kwargs)

        trainer.compute_loss = compute_loss


def flip_pairs(inputs: dict[str, Any], frac: float, rng: random.Random) -> dict[str, Any]:
    """Swap chosen and rejected for about `frac` of the pairs of a DPO batch (rows i and i + B)."""
    import torch

    ids = inputs["input_ids"]
    pairs = ids.size(0) // 2
    chosen = [i for i in range(pairs) if rng.random() < frac]
    if not chosen:
        return inputs
    order = torch.arange(2 * pairs, device=ids.device)
    idx = torch.tensor(chosen, device=ids.device)
    order[idx], order[idx + pairs] = idx + pairs, idx.clone()
    out = dict(inputs)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.size(0) == 2 * pairs:
            out[key] = value[order]
    if "ref_chosen_logps" in inputs and "ref_rejected_logps" in inputs:
        rc, rr = inputs["ref_chosen_logps"].clone(), inputs["ref_rejected_logps"].clone()
        rc[idx], rr[idx] = inputs["ref_rejected_logps"][idx], inputs["ref_chosen_logps"][idx]
        out["ref_chosen_logps"], out["ref_rejected_logps"] = rc, rr
    return out
