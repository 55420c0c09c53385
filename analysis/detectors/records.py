"""What a pass notes of each rule, so that a changed setting reruns over the whole history only the rules it
concerns: `Reads`, the thresholds as one rule sees them, noting each setting read; `Shared`, the values rules
pass to later ones, noting who wrote and who read each (docs/anomaly-detection.md, the cache)."""

from __future__ import annotations

from typing import Any

import numpy as np

from rlhf_tui.analysis.thresholds import Thresholds


class Reads:
    """The thresholds as one rule sees them, noting every setting it reads: the engine reruns a rule over the
    whole history only when a setting it read changes (the record is exact, whatever path the data took)."""

    def __init__(self, th: Thresholds, read: set[str]):
        self._th, self._read = th, read

    def __getattr__(self, name: str) -> Any:  # only for a setting not read yet in this pass
        value = getattr(self._th, name)
        self._read.add(name)
        self.__dict__[name] = value  # the rule's next reads of it are plain attribute reads
        return value


class MissingShared(LookupError):
    """A pass that runs only some rules met a rule reading a value it had not read before: its writer may not
    be among them (the engine then runs every rule over every row)."""


class Shared(dict):
    """`Context.shared`, noting which rule wrote and which read each value (a rule rerun over the whole
    history needs its writers' values over it too, and its readers must be rerun with it). `allowed`, in a
    pass that runs only some rules: the values each rule may read (those it read before, whose writers run)."""

    def __init__(self, allowed: dict[str, set[str]] | None = None) -> None:
        super().__init__()
        self.rule = ""  # the rule running now ("" for the engine)
        self.allowed = allowed
        self.writers: dict[str, set[str]] = {}
        self.readers: dict[str, set[str]] = {}

    def _read(self, key: str) -> None:
        self.readers.setdefault(self.rule, set()).add(key)
        if self.allowed is not None and self.rule and key not in self.allowed.get(self.rule, ()):
            raise MissingShared(self.rule, key)

    def __setitem__(self, key: str, value: np.ndarray) -> None:
        self.writers.setdefault(key, set()).add(self.rule)
        super().__setitem__(key, value)

    def __getitem__(self, key: str) -> np.ndarray:
        self._read(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self._read(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:  # asking whether a value is there is reading it too
        self._read(str(key))
        return super().__contains__(key)
