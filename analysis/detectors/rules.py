"""The detectors' rules, each written once and vectorised over a whole history (the engine runs them with
invalid/divide floating-point warnings off: NaN means missing): a rule reads row-level series
and yields (detector, metric, level per row, score per row). Rules run in the order they are registered; a
later rule may read what an earlier one left in `Context.shared` (reward hacking reads the KL and entropy rules).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import cast

import numpy as np

from rlhf_tui.analysis.detectors.carry import Pass
from rlhf_tui.analysis.detectors.kernels import (
    count_last,
    early_level,
    leak_growth,
    lr_ratio,
    recent_median,
    reward_residual,
)
from rlhf_tui.analysis.detectors.plan import Plan
from rlhf_tui.analysis.detectors.records import Reads, Shared
from rlhf_tui.analysis.thresholds import Thresholds

LN2 = float(np.log(2.0))
Flags = Iterator[tuple[str, str, np.ndarray, np.ndarray]]  # (detector, metric, level int8 per row, score per row)


class Series:
    """Row-level views of one metric's baseline (batch path)."""

    def __init__(
        self,
        xpad: np.ndarray,
        center: np.ndarray,
        scale: np.ndarray,
        level: np.ndarray,
        ok: np.ndarray,
        block: int,
        n: int,
        med_blocks: np.ndarray,
        med_before: int = 0,
    ):
        self.xpad = xpad  # the values padded with NaN to whole blocks
        self.x = xpad[:n]
        self._c, self._s, self._l, self._ok = center, scale, level, ok
        self.block = block
        self.n = n
        self.med_blocks = med_blocks
        self.med_before = med_before  # blocks of `med_blocks` ahead of the rows' first block
        self._cache: dict[str, np.ndarray] = {}

    def _rows(self, arr: np.ndarray) -> np.ndarray:
        return np.repeat(arr, self.block)[: self.n]

    @property
    def center(self) -> np.ndarray:
        if "c" not in self._cache:
            self._cache["c"] = self._rows(self._c)
        return self._cache["c"]

    @property
    def scale(self) -> np.ndarray:
        if "s" not in self._cache:
            self._cache["s"] = self._rows(self._s)
        return self._cache["s"]

    @property
    def level(self) -> np.ndarray:
        if "l" not in self._cache:
            self._cache["l"] = self._rows(self._l)
        return self._cache["l"]

    @property
    def ok(self) -> np.ndarray:
        if "ok" not in self._cache:
            self._cache["ok"] = self._rows(self._ok) & ~np.isnan(self.x)
        return self._cache["ok"]

    @property
    def z(self) -> np.ndarray:
        if "z" not in self._cache:
            nb = self._c.shape[0]
            z = ((self.xpad.reshape(nb, self.block) - self._c[:, None]) / self._s[:, None]).reshape(-1)[: self.n]
            z[~self.ok] = np.nan
            self._cache["z"] = z
        return self._cache["z"]

    def recent(self, n: int) -> np.ndarray:
        key = f"r{n}"
        if key not in self._cache:
            self._cache[key] = recent_median(self.x, n)
        return self._cache[key]


@dataclass
class Context:
    """What every rule reads: the row-level series by name, the run's plan, the thresholds, the row count and
    `p`, what the rules carry between passes (a pass may cover only the newest rows: rows p.row0 ..; every
    array a rule sees starts there, and a rule needing more history than its lookback reads it through `p`)."""

    series: dict[str, Series]
    plan: Plan
    th: Thresholds
    n: int
    p: Pass
    shared: dict[str, np.ndarray] = field(default_factory=dict)  # values a rule passes to a later one

    def cusum(self, key: str, z: np.ndarray, kref: float, sign: float) -> np.ndarray:
        return self.p.cusum(key, z, kref, self.th.shift_clip, sign)

    def early(self, key: str, x: np.ndarray) -> tuple[float, int]:
        """The run's early level of a series (median of its first `early_steps` finite values) and its row,
        as an index into this pass (clipped to 0; -1 while too few values)."""
        count = int(self.th.early_steps)
        level, row = early_level(*self.p.first_values(key, x, count), count)
        return level, max(-1, row - self.p.row0) if row >= 0 else -1

    def s(self, name: str) -> Series | None:
        return self.series.get(name)

    @property
    def pn(self) -> int:  # "k of the last n steps": n
        return int(self.th.persist_n)

    @property
    def k(self) -> int:
        return min(int(self.th.persist_k), self.pn)

    @property
    def rn(self) -> int:  # rows of a recent median
        return int(self.th.recent_steps)


RULES: list[Callable[[Context], Flags]] = []


def rule(fn: Callable[[Context], Flags]) -> Callable[[Context], Flags]:
    """Register a rule (run in registration order)."""
    RULES.append(fn)
    return fn


def run_rules(c: Context, passes: dict[str, Pass], only: set[str], reads: dict[str, set[str]]) -> list[tuple]:
    """The flags of the registered rules in `only`, in order: (rule, detector, metric, level, score). Each rule
    runs with its own carried state (`passes`, by rule name) and has the settings it reads added to
    `reads[rule]`; `c.shared` (a `Shared`) records what it passes on."""
    out: list[tuple] = []
    shared = c.shared
    for fn in RULES:
        name = fn.__name__
        if name not in only:
            continue
        if isinstance(shared, Shared):
            shared.rule = name
        th = cast(Thresholds, Reads(c.th, reads.setdefault(name, set())))
        mine = Context(c.series, c.plan, th, c.n, passes[name], shared)  # (dataclasses.replace: 4x the cost)
        out.extend((name, *flag) for flag in fn(mine))
    if isinstance(shared, Shared):
        shared.rule = ""
    return out


def rule_names() -> list[str]:
    return [fn.__name__ for fn in RULES]


def armed_row(c: Context, rel: np.ndarray) -> int | None:
    """Whole-run row after which the reward identity is trusted: its first `early_steps` valid rows all hold
    exactly; None while they have not."""
    th = c.th
    values, rows = c.p.first_values("reward_identity", rel, th.early_steps)
    if len(values) < th.early_steps or max(values[: th.early_steps]) > th.reward_mismatch_tol * 0.1:
        return None
    return rows[th.early_steps - 1]


@rule
def kl(c: Context) -> Flags:
    """KL: isolated spikes (low) vs. runaway (k of the last n steps far above the baseline)."""
    th, n, s, pn, k = c.th, c.n, c.s, c.pn, c.k
    c.shared["kl_held"] = np.zeros(n, dtype=bool)
    kl = s("kl")
    if kl is not None:
        # (against at least kl_floor: a KL growing from 0 as the policy leaves its reference is no runaway)
        ratio = np.abs(kl.x - kl.center) / np.maximum(np.maximum(kl.scale, np.abs(kl.center)), th.kl_floor)
        ratio[~kl.ok] = np.nan
        yield "kl_spike", "kl", np.where(ratio >= th.kl_spike_factor, 1, 0).astype(np.int8), ratio
        held = count_last(ratio >= th.kl_runaway_factor, pn) >= k
        extreme = count_last(ratio >= th.kl_runaway_high, pn) >= k
        lev = np.where(extreme, 3, np.where(held, 2, 0)).astype(np.int8)
        yield "kl_runaway", "kl", lev, ratio
        c.shared["kl_held"] = held


@rule
def entropy(c: Context) -> Flags:
    """Entropy collapse (a fractional drop from the run's early level) and abrupt rises of entropy or length."""
    th, n, s, rn = c.th, c.n, c.s, c.rn
    ent = s("entropy")
    ent_drop = np.full(n, np.nan)
    if ent is not None:
        early, row = c.early("entropy", ent.x)
        lowest_drop = min(th.entropy_collapse_frac, th.hack_entropy_drop)
        # the recent median can only fall below a level some value fell below: skip the work otherwise
        if early > 0 and np.any(ent.x <= (1.0 - lowest_drop) * early):
            ent_drop = 1.0 - ent.recent(rn) / early
            ent_drop[: row + 1] = np.nan
            lev = np.where(
                ent_drop >= th.entropy_collapse_high, 3, np.where(ent_drop >= th.entropy_collapse_frac, 2, 0)
            ).astype(np.int8)
            yield "entropy_collapse", "entropy", lev, ent_drop
        up = c.cusum("entropy_up", ent.z, th.rise_kref, 1.0)
        yield "policy_shift", "entropy", np.where(up >= th.rise_h, 2, 0).astype(np.int8), up

    c.shared["entropy_drop"] = ent_drop
    # (longer completions alone are common in healthy runs: length is a reward-hacking tell, below)


@rule
def reward_level(c: Context) -> Flags:
    """Reward level shifts (not for DPO, whose "reward" is the margin: see the DPO detectors)."""
    th, plan = c.th, c.plan
    for name in plan.reward_metrics:
        ser = c.series[name]
        z_up, z_down = early_floored_z(c, name, ser)
        up = c.cusum(f"{name}:up", z_up, th.rise_kref, 1.0)
        down = c.cusum(f"{name}:down", z_down, th.shift_kref, -1.0)
        # A climb is what training is for: it alarms with a tell (reward hacking, below) or when it is far
        # faster than learning goes (climb_h, several times the evidence a hacking climb needs).
        lev = np.where((down >= th.shift_h) | (up >= th.climb_h), 2, 0).astype(np.int8)
        yield "reward_shift", name, lev, np.where(up >= down, up, -down)
        if name == "reward":
            c.shared["reward_up"] = up


def early_floored_z(c: Context, name: str, ser: Series) -> tuple[np.ndarray, np.ndarray]:
    """The z-scores (for rises, for drops) against a scale of at least EARLY_RANGE_FLOOR of the range of the
    run's first `early_steps` values: a reward that saturates (a format reward at 1.0) has a tiny recent
    spread, and a dip of one sample in a batch must not read as many spreads. For drops the scale is also at
    least EFFECT_FLOOR of the early within-batch spread of the scores (`reward_std`, `rewards/<f>/std`): an
    effect size, which a history seen from a run's middle (a resumed run, the training side's window), its
    reward already saturated and no early learning phase to take a range from, still has."""
    values, _rows = c.p.first_values(f"early:{name}", ser.x, int(c.th.early_steps))
    if len(values) < int(c.th.early_steps):
        return ser.z, ser.z
    floor = EARLY_RANGE_FLOOR * (max(values) - min(values))
    drop_floor = floor
    spread = c.series.get("reward_std" if name == "reward" else name[: -len("mean")] + "std")
    if spread is not None:
        early_spread, _row = c.early(f"spread:{name}", spread.x)
        if early_spread > 0:
            drop_floor = max(floor, EFFECT_FLOOR * early_spread)
    return floored(ser, floor), floored(ser, drop_floor)


def floored(ser: Series, floor: float) -> np.ndarray:
    if not floor > 0:
        return ser.z
    z = (ser.x - ser.center) / np.maximum(ser.scale, floor)
    z[~ser.ok] = np.nan
    return z


EARLY_RANGE_FLOOR = 0.1
EFFECT_FLOOR = 0.25  # of a reward's early within-batch spread: the smallest drop of its batch mean that counts


@rule
def reward_dead(c: Context) -> Flags:
    """A reward function that turned constant (its per-batch spread exactly 0, held) at a value that is not
    the best it reached: it no longer tells completions apart (a crashed reward model, a parser that always
    fails). Constant at its best is saturation (every completion right: too easy), not a dead function."""
    pn, k = c.pn, c.k
    for name in c.plan.reward_spreads:
        ser, mean = c.series.get(name), c.series.get(name[: -len("std")] + "mean")
        if ser is None or mean is None:
            continue
        early, _row = c.early(name, ser.x)
        if not early > 0:
            continue
        m = mean.x
        best = np.fmax.accumulate(np.concatenate([[c.p.max_before(f"{name}:best", m)], m]))[:-1]
        worst = -np.fmax.accumulate(np.concatenate([[c.p.max_before(f"{name}:worst", -m)], -m]))[:-1]
        below_best = m < best - 0.1 * (best - worst)
        flat = (np.abs(ser.x) <= 1e-9 * early) & below_best
        held = count_last(flat, pn) >= k
        yield "reward_dead", name, np.where(held, 3, 0).astype(np.int8), ser.x


@rule
def reward_spread(c: Context) -> Flags:
    """Reward spread jumping up (noisy rewards) and reward scale jumps; a drop is "no learning signal"."""
    th, s, plan = c.th, c.s, c.plan
    if not plan.dpo and s("reward_std") is not None:
        up = c.cusum("reward_std:up", c.series["reward_std"].z, th.rise_kref, 1.0)
        yield "reward_shift", "reward_std", np.where(up >= th.rise_h, 2, 0).astype(np.int8), up

    # Reward scale jumps.
    if not plan.dpo:
        rs = s("reward_std")
        if rs is not None:
            ratio = np.where(rs.ok & (rs.center > 0), rs.x / rs.center, np.nan)
            held = count_last(ratio >= th.reward_scale_factor, 3) >= 2  # one odd batch is not a scale change
            yield "reward_scale", "reward_std", np.where(held, 3, 0).astype(np.int8), ratio
        rw = s("reward")
        if rw is not None:
            z = rw.z
            held = count_last(np.abs(z) >= th.reward_scale_z, 3) >= 2
            yield "reward_scale", "reward", np.where(held, 3, 0).astype(np.int8), z


@rule
def reward_identity(c: Context) -> Flags:
    """TRL's reward is the (weighted) sum of per-function means; NaN rewards break it."""
    th, s, plan = c.th, c.s, c.plan
    if plan.reward_parts and s("reward") is not None:
        rel, resid = reward_residual(c.series["reward"].x, [c.series[p].x for p in plan.reward_parts])
        armed = armed_row(c, rel)
        if armed is not None:
            lev = np.where(rel > th.reward_mismatch_tol, 3, 0).astype(np.int8)
            lev[: c.p.rel(armed + 1)] = 0
            yield "reward_mismatch", "reward", lev, resid


def group_split_held(c: Context) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Rows where the median of the last `recent_steps` logs of `groups/too_easy` / `groups/too_hard`
    (analysis/groups.py, from the reward batches' scores) is at or above `groups_flat_frac` (None: the run has
    no such series). The same window as no_learning_signal's, so where its zero-spread fraction holds near 1
    because of one kind of group, the split holds on the same rows and can take the alarm over."""
    out = []
    for name in ("groups/too_easy", "groups/too_hard"):
        ser = c.s(name)
        out.append(None if ser is None else ser.recent(c.rn) >= c.th.groups_flat_frac)
    return out[0], out[1]


@rule
def learning_signal(c: Context) -> Flags:
    """No learning signal: groups with identical rewards, reward spread collapsing; and the prompt-group split
    saying why (most groups solved, or most hopeless). Where the split explains it, no_learning_signal defers
    to it: the split's detector takes the alarm (at no_learning_signal's severity when that was higher), so one
    cause raises one alarm and its advice (harder prompts / easier prompts) is not "raise the temperature"."""
    th, s, rn, plan, n = c.th, c.s, c.rn, c.plan, c.n
    easy, hard = group_split_held(c)
    explained = np.zeros(n, dtype=bool)
    for held in (easy, hard):
        if held is not None:
            explained |= held
    deferred = np.zeros(n, dtype=np.int8)  # the level no_learning_signal gave up where the split explains it
    fz = s("frac_reward_zero_std")
    if fz is not None:
        # Identical rewards within a group are normal when prompts are too easy or too hard: only a fraction
        # near 1 (no signal at all) or a jump above its own level says something changed.
        cur = fz.recent(rn)
        jump = fz.recent(2 * rn) - fz.level  # a longer median: a few groups make the fraction coarse
        jump[~fz.ok] = np.nan
        lev = np.where(cur >= th.no_signal_frac, 3, np.where(jump >= th.no_signal_jump, 2, 0)).astype(np.int8)
        deferred = np.maximum(deferred, np.where(explained, lev, 0))
        yield "no_learning_signal", "frac_reward_zero_std", np.where(explained, 0, lev).astype(np.int8), cur
        # The other way: where a good share of groups used to tie (a rule-based reward scores alike
        # completions alike), none tying for most of the last 2 x recent_steps logs means the rewards turned
        # continuous: a reward model or function drifting to noise. (With a tie share L and g groups a log with
        # no tie has chance (1 - L)^g; half of ten such logs in a row is far from chance.)
        longer = fz.recent(2 * rn)
        gone = (longer <= 0.0) & (fz.level - longer >= th.no_signal_jump) & fz.ok
        yield "reward_noise", "frac_reward_zero_std", np.where(gone, 2, 0).astype(np.int8), fz.level
    rs = s("reward_std")
    if rs is not None and not plan.dpo:
        early, row = c.early("reward_std", rs.x)
        if early > 0 and np.any(rs.x <= th.reward_std_collapse * early):
            cur = rs.recent(rn)
            collapsed = cur <= th.reward_std_collapse * early
            collapsed[: row + 1] = False
            deferred = np.maximum(deferred, np.where(collapsed & explained, 3, 0))
            yield "no_learning_signal", "reward_std", np.where(collapsed & ~explained, 3, 0).astype(np.int8), cur
    if easy is not None:
        x = c.series["groups/too_easy"].recent(rn)
        yield "groups_too_easy", "groups/too_easy", np.where(easy, np.maximum(deferred, 2), 0).astype(np.int8), x
    if hard is not None:
        x = c.series["groups/too_hard"].recent(rn)
        yield "groups_too_hard", "groups/too_hard", np.where(hard, np.maximum(deferred, 2), 0).astype(np.int8), x


@rule
def reward_hacking(c: Context) -> Flags:
    """Reward hacking: a recent abnormal climb plus a hacking sign."""
    th, s, rn, plan = c.th, c.s, c.rn, c.plan
    reward_up, length = c.shared.get("reward_up"), s("completion_length")
    if reward_up is not None:
        climb = count_last(reward_up >= th.rise_h, max(1, int(th.hack_window))) > 0
        if climb.any():  # the signs only matter where the reward climbed
            sign = c.shared["kl_held"] | (c.shared["entropy_drop"] >= th.hack_entropy_drop)
            cr = s("completions/clipped_ratio")
            if cr is not None:
                sign = sign | (cr.recent(rn) >= th.hack_clipped_ratio)
            if length is not None and plan.max_len:
                sign = sign | (length.recent(rn) >= th.hack_length_frac * plan.max_len)
            climb &= sign
        yield "reward_hacking", "reward", np.where(climb, 3, 0).astype(np.int8), reward_up


@rule
def loss_and_gradients(c: Context) -> Flags:
    """Loss and gradient spikes and held shifts, PPO value loss blow-ups."""
    th, s, pn, k = c.th, c.s, c.pn, c.k
    gn = s("grad_norm")
    if gn is not None:
        z = gn.z
        ratio = np.where(gn.ok & (gn.center > 0), gn.x / gn.center, np.nan)
        held = count_last(ratio >= th.grad_norm_factor, pn) >= k
        yield "grad_norm_spike", "grad_norm", np.where(z >= th.spike_z, 1, 0).astype(np.int8), z
        yield "grad_norm_shift", "grad_norm", np.where(held, 2, 0).astype(np.int8), ratio
    # GRPO/RLOO's loss is ~0 by construction (advantages are centred per group): its noise is not a signal.
    for name in () if c.plan.group_relative else ("loss", "policy_loss"):
        ls = s(name)
        if ls is None:
            continue
        az = np.abs(ls.z)
        held = count_last(az >= th.loss_persist_z, pn) >= k
        yield "loss_spike", name, np.where(az >= th.spike_z, 1, 0).astype(np.int8), ls.z
        yield "loss_shift", name, np.where(held, 2, 0).astype(np.int8), ls.z
    vl = s("value_loss")
    if vl is not None:
        ratio = np.where(vl.ok & (vl.center > 0), vl.x / vl.center, np.nan)
        held = count_last(ratio >= th.value_loss_factor, pn) >= max(1, k - 1)
        yield "value_loss_blowup", "value_loss", np.where(held, 3, 0).astype(np.int8), ratio


@rule
def clip_fraction(c: Context) -> Flags:
    """Clip fraction: only meaningful off-policy (GRPO with num_iterations=1 logs 0 by design)."""
    th, n, s, rn, plan = c.th, c.n, c.s, c.rn, c.plan
    cl = s("clip_ratio")
    if cl is not None:
        armed = np.full(n, plan.off_policy)
        if not plan.off_policy:
            first = c.p.first_row("clip_ratio", np.nan_to_num(cl.x) > 0)
            if first >= 0:
                armed[c.p.rel(first) :] = True
        cur = cl.recent(rn) if np.any(cl.x >= th.clip_ratio_high) else np.full(n, np.nan)
        yield "clip_ratio", "clip_ratio", np.where(armed & (cur >= th.clip_ratio_high), 2, 0).astype(np.int8), cur


@rule
def learning_rate(c: Context) -> Flags:
    """Learning-rate jumps."""
    th, s = c.th, c.s
    lr = s("learning_rate")
    if lr is not None:
        ratio = lr_ratio(lr.x, c.p.last_finite_before("learning_rate", lr.x))
        # A scheduler restart returns to the run's earlier peak: only a jump above every earlier value counts.
        peak = np.fmax.accumulate(np.concatenate([[c.p.max_before("learning_rate", lr.x)], lr.x]))[:-1]
        above = ~(lr.x <= 1.05 * peak)  # (NaN peak: nothing before, so above)
        yield "lr_jump", "learning_rate", np.where((ratio >= th.lr_jump_factor) & above, 2, 0).astype(np.int8), ratio


@rule
def dpo(c: Context) -> Flags:
    """DPO: accuracy dropping or pinned, margins exploding, log-probs falling, loss back above ln 2."""
    th, n, s, pn, k, rn, plan = c.th, c.n, c.s, c.pn, c.k, c.rn, c.plan
    if plan.dpo:
        acc = s("rewards/accuracies")
        if acc is not None:
            gap = acc.level - acc.x
            need = np.maximum(th.dpo_accuracy_drop, 4.0 * acc.scale)
            gap[~acc.ok] = np.nan
            big = gap >= 2 * need
            held = count_last(gap >= need, 3) >= 2  # one dip of a small batch is not enough
            lev = np.where(count_last(big, 3) >= 2, 3, np.where(big | held, 2, 0)).astype(np.int8)
            yield "dpo_accuracy_drop", "rewards/accuracies", lev, -gap
            ps = max(1, int(th.dpo_pinned_steps))
            pinned = count_last(acc.x >= 0.999, ps) >= ps
            pinned[c.p.rel(5 * ps) :] = False  # only early in the run
            yield "dpo_accuracy_pinned", "rewards/accuracies", np.where(pinned, 1, 0).astype(np.int8), acc.x
        mg = s("rewards/margins")
        if mg is not None:
            r = (mg.x - mg.center) / np.maximum(mg.scale, np.abs(mg.center))
            r[~mg.ok] = np.nan
            held = count_last(r >= th.dpo_margin_factor, pn) >= max(1, k - 1)
            yield "dpo_margin_explosion", "rewards/margins", np.where(held, 2, 0).astype(np.int8), r
        lc, lrj = s("logps/chosen"), s("logps/rejected")
        if lc is not None and lrj is not None:
            dc = c.cusum("logps/chosen:down", lc.z, th.shift_kref, -1.0)
            dr = c.cusum("logps/rejected:down", lrj.z, th.shift_kref, -1.0)
            both = (dc >= th.shift_h) & (dr >= th.shift_h)
            # (both falling is common in healthy DPO too, likelihood displacement: a note, not an alarm)
            yield "dpo_logps_falling", "logps/chosen", np.where(both, 1, 0).astype(np.int8), np.minimum(dc, dr)
        ls = s("loss")
        if ls is not None:
            cur = ls.recent(rn)
            first = c.p.first_row("dpo_loss_below", cur < LN2 - th.dpo_loss_margin)
            prev_below = np.zeros(n, dtype=bool)  # the loss was below ln 2 at some earlier row
            if first >= 0:
                prev_below[c.p.rel(first + 1) :] = True
            lev = np.where(prev_below & (cur > LN2 + th.dpo_loss_margin), 2, 0).astype(np.int8)
            yield "dpo_loss", "loss", lev, cur


# The training-inference mismatch, first key present wins: TRL's (GRPO with vLLM and importance-sampling
# correction: mean |logp_vllm - logp_train| per token) and verl's rollout-vs-training probability difference
# (custom loops that log verl's keys). Reference level: ~0.01 (verl's FAQ: above it, an inference-precision
# problem: dtype, kernels, a stale weight sync).
SAMPLING_DIFFERENCE = (
    "sampling/sampling_logp_difference/mean",
    "training/rollout_probs_diff_mean",
)
SAMPLING_IS_RATIO = "sampling/importance_sampling_ratio/mean"


@rule
def sampling(c: Context) -> Flags:
    """Sampling vs training mismatch (vLLM), and completions running into the length limit."""
    th, s, pn, k = c.th, c.s, c.pn, c.k
    for name in SAMPLING_DIFFERENCE:
        diff = s(name)
        if diff is None:
            continue
        ratio = diff.x / max(th.sampling_difference, 1e-12)
        held = count_last(ratio >= 1.0, 3) >= 2  # one odd batch of hard tokens is not a precision problem
        high = count_last(ratio >= 10.0, 3) >= 2
        yield "sampling_mismatch", name, np.where(high, 3, np.where(held, 2, 0)).astype(np.int8), ratio
        break
    isr = s(SAMPLING_IS_RATIO)
    if isr is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            off = np.abs(np.log(np.where(isr.x > 0, isr.x, np.nan)))  # 0 when sampler and trainer agree
        held = count_last(off >= np.log1p(th.sampling_is_band), 3) >= 2
        yield "sampling_mismatch", SAMPLING_IS_RATIO, np.where(held, 2, 0).astype(np.int8), isr.x
    cr = s("completions/clipped_ratio")
    if cr is not None:
        held = count_last(cr.x >= th.truncation_ratio, pn) >= k
        # A note, not an alarm: tiny or deliberately short completions run into the limit by design.
        yield "truncation", "completions/clipped_ratio", np.where(held, 1, 0).astype(np.int8), cr.x


@rule
def system(c: Context) -> Flags:
    """Memory growing or near OOM, step time regressing."""
    th, n, s, rn, plan = c.th, c.n, c.s, c.rn, c.plan
    for name in plan.memory:
        ser = c.series[name]
        growth = leak_growth(ser.med_blocks, int(th.memory_leak_blocks), B=ser.block, n=n, before=ser.med_before)
        lev = np.where(growth >= 3 * th.memory_leak_frac, 3, np.where(growth >= th.memory_leak_frac, 2, 0)).astype(
            np.int8
        )
        yield "memory_leak", name, lev, growth
    gf = s("memory/gpu_frac")
    if gf is not None:
        lev = np.where(gf.x >= th.gpu_frac_critical, 4, np.where(gf.x >= th.gpu_frac_high, 3, 0)).astype(np.int8)
        yield "memory_near_oom", "memory/gpu_frac", lev, gf.x
    for timer in plan.step_time[:1]:  # one timer: step_time and time/step_s are one signal
        ser = c.series[timer]
        pos = ser.ok & (ser.center > 0)
        if not pos.any() or not np.nanmax(ser.x) >= th.step_time_factor * np.min(ser.center[pos]):
            ratio = np.full(n, np.nan)  # no value reaches factor x the smallest baseline: nothing to flag
        else:
            eval_rows = c.shared.get("eval_rows")  # steps that also ran an evaluation are slow by design
            x = ser.x if eval_rows is None else np.where(eval_rows, np.nan, ser.x)
            ratio = np.where(pos, recent_median(x, rn) / ser.center, np.nan)
        yield "step_time_regression", timer, np.where(ratio >= th.step_time_factor, 1, 0).astype(np.int8), ratio
