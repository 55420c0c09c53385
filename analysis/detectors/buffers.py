"""Growable arrays for the engine's cache: a history only grows at its end, so its per-row and per-block results
are kept in place and a pass rewrites only the tail (no copy of the whole history per pass)."""

from __future__ import annotations

import numpy as np


class Grow:
    """A 2-D array (rows x columns) whose columns grow; `put(col0, values)` writes columns col0.. and sets the
    length there, so whatever was after them is dropped."""

    __slots__ = ("data", "size", "fill")

    def __init__(self, rows: int, dtype, fill, capacity: int = 64):
        self.fill = fill
        self.data = np.full((rows, max(16, capacity)), fill, dtype=dtype)
        self.size = 0

    def reserve(self, end: int) -> None:
        """Room for `end` columns, with headroom (a growing history does not copy itself at every pass)."""
        if end > self.data.shape[1]:
            cap = max(end + end // 4 + 256, 2 * self.data.shape[1])
            grown = np.empty((self.data.shape[0], cap), dtype=self.data.dtype)
            grown[:, : self.size] = self.data[:, : self.size]
            grown[:, self.size :] = self.fill
            self.data = grown

    def put(self, col0: int, values: np.ndarray, rows: slice = slice(None)) -> None:
        """Write `values` at columns col0.. of `rows` (all rows by default); the length becomes their end."""
        end = col0 + values.shape[-1]
        self.reserve(end)
        self.data[rows, col0:end] = values
        self.size = end

    def view(self, col0: int = 0, col1: int | None = None) -> np.ndarray:
        return self.data[:, col0 : self.size if col1 is None else col1]


class Flags:
    """One detector+metric's flagged rows (row, level, score, value), in row order; `replace_from(row, ...)`
    drops the flags at or after `row` and appends the new ones (which all lie at or after it)."""

    __slots__ = ("rows", "lev", "score", "value", "size")

    def __init__(self) -> None:
        self.rows = np.empty(16, dtype=np.int64)
        self.lev = np.empty(16, dtype=np.int8)
        self.score = np.empty(16)
        self.value = np.empty(16)
        self.size = 0

    def cut(self, row: int) -> int:
        """Index of the first flag at or after `row`."""
        return int(np.searchsorted(self.rows[: self.size], row))

    def replace_from(self, row: int, rows: np.ndarray, lev: np.ndarray, score: np.ndarray, value: np.ndarray) -> bool:
        """Whether the flags at or after `row` changed."""
        i = self.cut(row)
        end = i + rows.shape[0]
        if end == self.size and (
            i == end
            or all(
                old[i:end].tobytes() == np.asarray(new, dtype=old.dtype).tobytes()  # bitwise: NaN equals NaN
                for old, new in ((self.rows, rows), (self.lev, lev), (self.score, score), (self.value, value))
            )
        ):
            return False
        if end > self.rows.shape[0]:
            cap = max(end, 2 * self.rows.shape[0])
            for name in ("rows", "lev", "score", "value"):
                old = getattr(self, name)
                new = np.empty(cap, dtype=old.dtype)
                new[:i] = old[:i]
                setattr(self, name, new)
        self.rows[i:end], self.lev[i:end], self.score[i:end], self.value[i:end] = rows, lev, score, value
        self.size = end
        return True

    def tail(self, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        s = self.size
        return self.rows[start:s], self.lev[start:s], self.score[start:s], self.value[start:s]
