"""Flagged rows -> anomaly episodes: flags of one detector and metric at most `cooldown_steps` apart form one
episode, with its severity, peak, first step at each severity and its words; the monitor's bounded selection.
"""

from __future__ import annotations

import bisect
import operator

import numpy as np

from rlhf_tui.analysis.detectors.buffers import Flags
from rlhf_tui.analysis.detectors.registry import ZSCORE_ADVICE, describe, zscore_message
from rlhf_tui.analysis.severity import SEVERITIES


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


EPISODE_ORDER = operator.itemgetter("step", "detector", "metric")


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


class _KeyEpisodes:
    """One detector+metric's episodes that may still change: those from flag `closed_upto` on."""

    __slots__ = ("closed_upto", "open")

    def __init__(self) -> None:
        self.closed_upto = 0
        self.open: list[dict] = []


class EpisodeBook:
    """The episodes of a growing history, kept between passes.

    An episode whose last flag is more than `cooldown_steps` before the step where the next pass starts can no
    longer change: it is closed, built once, and (when the monitor keeps only the newest `keep_low` low and
    `keep_other` other episodes) kept only while it is among the newest of its kind. The other episodes are
    rebuilt from their flags whenever those change."""

    def __init__(self, cooldown: int, keep_low: int | None, keep_other: int | None):
        self.cooldown, self.keep = cooldown, {True: keep_low, False: keep_other}
        self.keys: dict[tuple[str, str], _KeyEpisodes] = {}
        self.closed: dict[bool, list[dict]] = {True: [], False: []}  # by kind (low?), in EPISODE_ORDER
        self.closed_counts: dict[str, int] = {}

    def update(
        self,
        flags: dict,
        redo: set[tuple[str, str]],
        steps: np.ndarray,
        horizon: int,
    ) -> tuple[list[dict], dict[str, int]]:
        """Rebuild the episodes of the keys in `redo` (their flags changed), close what ends before step
        `horizon`, and return the selection and counts of every episode. `flags`: {(detector, metric): Flags}."""
        latest, cooldown = int(steps[-1]), self.cooldown
        closing: list[tuple] = []  # (detector, metric, spans, steps, score, value, span indices) newly closed
        for key, fl in flags.items():
            state = self.keys.get(key)
            if state is None:
                state = self.keys[key] = _KeyEpisodes()
            if key in redo:
                rows, lev, score, value = fl.tail(state.closed_upto)
                state.open = []
                if not rows.size:
                    continue
                st = steps[rows]
                score = np.nan_to_num(score, nan=0.0)
                sp = Spans(st, lev, score, cooldown)
                ends = st[sp.last]
                done = int(np.searchsorted(ends + cooldown >= horizon, True))  # closed spans are a prefix
                if done:
                    closing.append((key[0], key[1], sp, st, score, value, np.arange(done)))
                    state.closed_upto += int(sp.last[done - 1]) + 1
                if done < sp.starts.shape[0]:
                    state.open = episode_dicts(
                        key[0], key[1], sp, st, score, value, cooldown, latest, np.arange(done, sp.starts.shape[0])
                    )
            elif state.open:  # same flags: episodes close, or stop being ongoing, as time passes
                still = []
                for ep in state.open:
                    ongoing = latest - ep["last_step"] <= cooldown
                    if ongoing != ep["ongoing"]:
                        ep = dict(ep, ongoing=ongoing)  # a new dict: callers compare passes by value
                    if ep["last_step"] + cooldown < horizon:
                        self._close([ep])
                        state.closed_upto += ep["count"]
                    else:
                        still.append(ep)
                state.open = still
        if closing:
            self._close_spans(closing, latest)
        return self._select()

    def _close(self, eps: list[dict]) -> None:
        """Count closed episodes and keep them (the newest of each kind)."""
        for ep in eps:
            sev = ep["severity"]
            self.closed_counts[sev] = self.closed_counts.get(sev, 0) + 1
        self._keep(eps)

    def _keep(self, eps: list[dict]) -> None:
        for low in (True, False):
            mine = [ep for ep in eps if (ep["severity"] == "low") == low]
            if not mine:
                continue
            kept = self.closed[low]
            if len(mine) < 8:
                for ep in mine:
                    bisect.insort(kept, ep, key=EPISODE_ORDER)
            else:
                kept.extend(mine)
                kept.sort(key=EPISODE_ORDER)
            limit = self.keep[low]
            if limit is not None and len(kept) > limit:
                del kept[: len(kept) - max(0, int(limit))]

    def _close_spans(self, closing: list[tuple], latest: int) -> None:
        """Count every newly closed episode; build only those that can be among the kept newest."""
        for _det, _metric, sp, _st, _sc, _v, which in closing:
            for L, c in zip(*np.unique(sp.sev[which], return_counts=True)):
                name = SEVERITIES[L - 1]
                self.closed_counts[name] = self.closed_counts.get(name, 0) + int(c)
        order = sorted(range(len(closing)), key=lambda i: (closing[i][0], closing[i][1]))
        rank = np.empty(len(closing), dtype=np.int64)
        rank[order] = np.arange(len(closing))
        first = np.concatenate([c[3][c[2].starts[c[6]]] for c in closing])
        low = np.concatenate([c[2].sev[c[6]] == 1 for c in closing])
        owner = np.concatenate([np.full(c[6].shape[0], i) for i, c in enumerate(closing)])
        index = np.concatenate([c[6] for c in closing])
        newest = np.lexsort((rank[owner], first))  # EPISODE_ORDER, oldest first
        chosen = []
        for is_low in (True, False):
            mine = newest[low[newest] == is_low]
            limit = self.keep[is_low]
            chosen.append(mine if limit is None else mine[mine.shape[0] - min(mine.shape[0], max(0, int(limit))) :])
        pick = np.concatenate(chosen)
        built: list[dict] = []
        for i, c in enumerate(closing):
            which = np.sort(index[pick[owner[pick] == i]])
            if which.size:
                det, metric, sp, st, score, value, _w = c
                built.extend(episode_dicts(det, metric, sp, st, score, value, self.cooldown, latest, which))
        self._keep(built)

    def _select(self) -> tuple[list[dict], dict[str, int]]:
        counts = dict(self.closed_counts)
        out: list[dict] = []
        for low in (True, False):
            opens = [ep for st in self.keys.values() for ep in st.open if (ep["severity"] == "low") == low]
            opens.sort(key=EPISODE_ORDER)
            for ep in opens:
                counts[ep["severity"]] = counts.get(ep["severity"], 0) + 1
            limit = self.keep[low]
            if limit is None:
                out = merge_sorted(out, merge_sorted(self.closed[low], opens))
                continue
            limit = max(0, int(limit))
            if not limit:
                out = merge_sorted(out, [ep for ep in opens if ep["ongoing"]])
                continue
            pool = merge_sorted(self.closed[low][-limit:], opens)
            top = pool[max(0, len(pool) - limit) :]
            cut = EPISODE_ORDER(top[0]) if top else None
            late = [ep for ep in opens if ep["ongoing"] and cut is not None and EPISODE_ORDER(ep) < cut]
            out = merge_sorted(out, merge_sorted(top, late))
        return out, {k: v for k, v in counts.items() if v}


def merge_sorted(a: list[dict], b: list[dict]) -> list[dict]:
    """Two lists in EPISODE_ORDER as one new list in that order (cheap when one of them is short)."""
    if len(a) < len(b):
        a, b = b, a
    if len(b) > 16:
        return sorted(a + b, key=EPISODE_ORDER)
    out = list(a)
    for ep in b:
        bisect.insort(out, ep, key=EPISODE_ORDER)
    return out


def episodes(
    flagged: list[tuple], steps: np.ndarray, th, keep_low: int | None = None, keep_other: int | None = None
) -> tuple[list[dict], dict[str, int]]:
    """Flagged rows -> (episodes, counts per severity) in one go, for flags made outside the engine.
    `flagged`: (detector, metric, rows, level per row, score, value) with rows increasing."""
    book = EpisodeBook(int(th.cooldown_steps), keep_low, keep_other)
    flags: dict[tuple[str, str], Flags] = {}
    for det, metric, rows, lev, score, value in flagged:
        fl = flags.setdefault((det, metric), Flags())
        fl.replace_from(int(rows[0]) if len(rows) else 0, rows, lev, score, value)
    if not len(steps):
        return [], {}
    return book.update(flags, set(flags), steps, int(steps[0]))  # nothing is final: every episode is built
