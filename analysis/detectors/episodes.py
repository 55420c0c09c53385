"""Flagged rows -> anomaly episodes: flags of one detector and metric at most `cooldown_steps` apart form one
episode, with its severity, peak, first step at each severity and its words; the monitor's bounded selection.
"""

from __future__ import annotations

import operator

import numpy as np

from rlhf_tui.analysis.detectors.registry import ZSCORE_ADVICE, describe, zscore_message
from rlhf_tui.analysis.severity import SEVERITIES
from rlhf_tui.analysis.thresholds import Thresholds


def new_episode(
    detector: str,
    metric: str,
    step: int,
    level: int,
    value: float | None,
    score: float,
    sev_steps: dict[str, int],
    msg_level: int,
    msg_value: float | None,
    msg_score: float,
) -> dict:
    message, recommendation = describe(detector, metric, msg_value, msg_score)
    return {
        "step": step,
        "metric": metric,
        "detector": detector,
        "severity": SEVERITIES[level - 1],
        "value": value,
        "message": message,
        "recommendation": recommendation,
        "first_step": step,
        "peak_step": step,
        "peak_value": value,
        "last_step": step,
        "count": 1,
        "ongoing": True,
        "severity_steps": sev_steps,
    }


class Spans:
    """Episodes of one detector+metric as arrays (indices into its flagged rows), before any dict is built."""

    __slots__ = ("starts", "last", "sev", "peak", "first_at")

    def __init__(self, st: np.ndarray, lev: np.ndarray, score: np.ndarray, cooldown: int):
        n = st.shape[0]
        starts = np.concatenate([[0], np.flatnonzero(np.diff(st) > cooldown) + 1])
        ends = np.concatenate([starts[1:], [n]])
        lev = lev.astype(np.int64)
        ar = np.arange(n)
        big = n + 1
        mag = np.abs(score)
        mx = np.maximum.reduceat(mag, starts)
        self.starts = starts
        self.last = ends - 1
        self.sev = np.maximum.reduceat(lev, starts)
        self.peak = np.minimum.reduceat(np.where(mag == np.repeat(mx, ends - starts), ar, big), starts)
        # first row at each level or above (only needed when a level above "low" occurs)
        self.first_at = (
            None
            if self.sev.max() == 1
            else [np.minimum.reduceat(np.where(lev >= L, ar, big), starts) for L in (1, 2, 3, 4)]
        )


def episode_dicts(
    detector: str,
    metric: str,
    sp: Spans,
    st: np.ndarray,
    score: np.ndarray,
    value: np.ndarray,
    cooldown: int,
    latest: int,
    which: np.ndarray | None = None,
) -> list[dict]:
    """The episode dicts of `sp` (all, or the episode indices `which`); same result as `_Episodes`."""
    idx = np.arange(sp.starts.shape[0]) if which is None else which
    if idx.size == 0:
        return []
    s0s, s1s, pks = sp.starts[idx], sp.last[idx], sp.peak[idx]
    counts = (s1s - s0s + 1).tolist()
    first, last, peak = st[s0s].tolist(), st[s1s].tolist(), st[pks].tolist()

    def vals(rows: np.ndarray) -> list:
        v = value[rows]
        return [None if x != x else x for x in np.where(np.isfinite(v), v, np.nan).tolist()]

    v0, vpk, sc0 = vals(s0s), vals(pks), score[s0s].tolist()
    out: list[dict] = []
    if sp.first_at is None and detector == "zscore":  # many low episodes: keep this loop lean
        for step, v, sc, pstep, pv, lstep, cnt in zip(first, v0, sc0, peak, vpk, last, counts):
            out.append(
                {
                    "step": step,
                    "metric": metric,
                    "detector": detector,
                    "severity": "low",
                    "value": v,
                    "message": zscore_message(metric, v, sc),
                    "recommendation": ZSCORE_ADVICE,
                    "first_step": step,
                    "peak_step": pstep,
                    "peak_value": pv,
                    "last_step": lstep,
                    "count": cnt,
                    "ongoing": latest - lstep <= cooldown,
                    "severity_steps": {"low": step},
                }
            )
        return out
    sevs = sp.sev[idx].tolist()
    # (levels an episode never reached hold a sentinel past the end: clipped here, never read below)
    fa = [st[np.minimum(f[idx], st.shape[0] - 1)].tolist() for f in sp.first_at] if sp.first_at is not None else None
    at_rows = np.choose(sp.sev[idx] - 1, [f[idx] for f in sp.first_at]) if sp.first_at is not None else s0s
    v_at, sc_at = vals(at_rows), score[at_rows].tolist()
    for e, (step, sv, pstep, pv, lstep, cnt) in enumerate(zip(first, sevs, peak, vpk, last, counts)):
        sev_steps = {SEVERITIES[L]: fa[L][e] for L in range(sv)} if fa is not None else {"low": step}
        ep = new_episode(detector, metric, step, sv, v0[e], sc0[e], sev_steps, sv, v_at[e], sc_at[e])
        ep["peak_step"] = pstep
        ep["peak_value"] = pv
        ep["last_step"] = lstep
        ep["count"] = cnt
        ep["ongoing"] = latest - lstep <= cooldown
        out.append(ep)
    return out


def episodes(
    flagged: list[tuple], steps: np.ndarray, th: Thresholds, keep_low: int | None, keep_other: int | None
) -> tuple[list[dict], dict[str, int]]:
    """Flagged rows -> episodes (only the newest kept ones built) and counts per severity."""
    latest, cooldown = int(steps[-1]), int(th.cooldown_steps)
    spans: list[tuple] = []
    for det, metric, rows, lev, score, value in flagged:
        if rows.size:
            st = steps[rows]
            score = np.nan_to_num(score, nan=0.0)
            spans.append((det, metric, Spans(st, lev, score, cooldown), st, score, value))
    if not spans:
        return [], {}
    counts: dict[str, int] = {}
    for _d, _m, sp, *_ in spans:
        for L, c in zip(*np.unique(sp.sev, return_counts=True)):
            counts[SEVERITIES[L - 1]] = counts.get(SEVERITIES[L - 1], 0) + int(c)
    which: list[np.ndarray | None] = [None] * len(spans)
    if keep_low is not None or keep_other is not None:
        first_all = np.concatenate([st[sp.starts] for _d, _m, sp, st, *_ in spans])
        last_all = np.concatenate([st[sp.last] for _d, _m, sp, st, *_ in spans])
        low_all = np.concatenate([sp.sev == 1 for _d, _m, sp, *_ in spans])
        keep = latest - last_all <= cooldown  # ongoing episodes always stay
        order = np.lexsort((last_all, first_all))[::-1]  # newest first
        for is_low, limit in ((True, keep_low), (False, keep_other)):
            chosen = order[low_all[order] == is_low]
            keep[chosen if limit is None else chosen[: max(0, int(limit))]] = True
        sizes = [sp.starts.shape[0] for _d, _m, sp, *_ in spans]
        which = [np.flatnonzero(k) for k in np.split(keep, np.cumsum(sizes)[:-1])]
    out: list[dict] = []
    for (det, metric, sp, st, score, value), w in zip(spans, which):
        out.extend(episode_dicts(det, metric, sp, st, score, value, cooldown, latest, w))
    out.sort(key=EPISODE_ORDER)
    return out, counts


EPISODE_ORDER = operator.itemgetter("step", "detector", "metric")
