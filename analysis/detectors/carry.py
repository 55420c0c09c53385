"""What the rules carry from one pass to the next, so a pass over the newest rows of a history gives exactly what
a pass over the whole history gives.

A pass reads rows `row0 ..` of the history (`row0` on the engine's chunk grid). Two kinds of state:
- at grid rows: a CUSUM's value and a series' last finite value carried into the chunk that starts there,
  kept for the grid rows the next passes may start at;
- from the run's start: the first finite values of a series (its early level) and the first row where a
  condition held, scanned once over rows that can no longer change.
Rows at or after `final` (the newest row, which a repeated step may still merge into) never enter a state.
"""

from __future__ import annotations

import numpy as np

from rlhf_tui.analysis.detectors.kernels import cusum


class MissingCarry(LookupError):
    """A pass starts where a value it needs was not kept (the engine then starts over from the first row)."""


class Carry:
    """The rules' state across passes of one history (kept in the engine's cache)."""

    def __init__(self) -> None:
        self.at_grid: dict[str, dict[int, float]] = {}  # key -> {grid row: value carried into it}
        self.first: dict[str, tuple[int, list[float], list[int]]] = {}  # key -> (rows scanned, values, rows)
        self.first_row_: dict[str, tuple[int, int]] = {}  # key -> (rows scanned, first row or -1)

    def prune(self, oldest: int) -> None:
        """Forget grid values before `oldest` (no later pass starts there)."""
        for values in self.at_grid.values():
            for g in [g for g in values if g < oldest]:
                del values[g]


class Pass:
    """The view of a `Carry` during one pass over rows row0 .. row0 + n - 1."""

    def __init__(self, carry: Carry, row0: int, n: int, final: int, chunk: int):
        self.carry, self.row0, self.n, self.final, self.chunk = carry, row0, n, final, chunk

    def _grid_in(self, key: str, default: float) -> float:
        if self.row0 == 0:
            return default
        try:
            return self.carry.at_grid[key][self.row0]
        except KeyError:
            raise MissingCarry(key, self.row0) from None

    def _grid_out(self, key: str, values: list[float]) -> None:
        kept = self.carry.at_grid.setdefault(key, {})
        for k, v in enumerate(values):
            g = self.row0 + k * self.chunk
            if g <= self.final:  # carried into row g: made of rows before it, none of which can change
                kept[g] = v

    def cusum(self, key: str, z: np.ndarray, kref: float, clip: float, sign: float) -> np.ndarray:
        values, carried = cusum(z, kref, clip, sign, self._grid_in(key, 0.0), self.chunk)
        self._grid_out(key, carried)
        return values

    def last_finite_before(self, key: str, x: np.ndarray) -> float:
        """The series' last finite value before row0 (NaN when none); records it for the grid rows after."""
        before = self._grid_in(key, np.nan)
        n, width = self.n, self.chunk
        last_row = np.maximum.accumulate(np.where(np.isnan(x), -1, np.arange(n)))
        ends = np.arange(width, n + 1, width) - 1  # the last row of each whole chunk
        rows = last_row[ends]
        after = np.where(rows >= 0, x[np.maximum(rows, 0)], before) if n else np.empty(0)
        self._grid_out(key, [before, *after.tolist()])
        return before

    def max_before(self, key: str, x: np.ndarray) -> float:
        """The series' largest finite value before row0 (NaN when none); records it for the grid rows after."""
        before = self._grid_in(key, np.nan)
        n, width = self.n, self.chunk
        running = np.fmax.accumulate(np.concatenate([[before], x]))[1:] if n else np.empty(0)
        ends = np.arange(width, n + 1, width) - 1
        self._grid_out(key, [before, *running[ends].tolist()])
        return before

    def first_values(self, key: str, x: np.ndarray, count: int) -> tuple[list[float], list[int]]:
        """The series' first `count` finite values of the whole run and their rows (fewer while too few)."""
        scanned, values, rows = self.carry.first.get(key, (0, [], []))
        if len(values) >= count:
            return values, rows
        j0 = max(0, scanned - self.row0)
        idx = np.flatnonzero(~np.isnan(x[j0:]))[: count - len(values)] + j0
        got_v, got_r = x[idx].tolist(), (idx + self.row0).tolist()
        keep = [i for i, r in enumerate(got_r) if r < self.final]
        self.carry.first[key] = (
            max(scanned, self.final),
            values + [got_v[i] for i in keep],
            rows + [got_r[i] for i in keep],
        )
        return values + got_v, rows + got_r

    def first_row(self, key: str, mask: np.ndarray) -> int:
        """The first row of the whole run where `mask` holds (-1: none yet)."""
        scanned, found = self.carry.first_row_.get(key, (0, -1))
        if found >= 0:
            return found
        j0 = max(0, scanned - self.row0)
        hit = np.flatnonzero(mask[j0:])
        row = int(hit[0]) + j0 + self.row0 if hit.size else -1
        self.carry.first_row_[key] = (max(scanned, self.final), row if 0 <= row < self.final else -1)
        return row

    def rel(self, row: int) -> int:
        """A whole-run row as an index into this pass's arrays (clipped to 0)."""
        return max(0, row - self.row0)
