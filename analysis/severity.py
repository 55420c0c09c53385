"""How bad an anomaly or a checkpoint finding is: one ordered type for every part of the code.

JSON and the command line keep the plain words ("low" .. "critical"); code compares the enum.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class Severity(IntEnum):
    """LOW < MEDIUM < HIGH < CRITICAL; `str()` gives the lower-case word used in JSON."""

    LOW = 1
    MEDIUM = 2
    HIGH = 3
    CRITICAL = 4

    def __str__(self) -> str:
        return self.name.lower()

    @classmethod
    def from_name(cls, name: Any) -> Severity | None:
        """The severity called `name` ("low", "HIGH", a Severity); None for anything else."""
        if isinstance(name, Severity):
            return name
        member = cls.__members__.get(str(name).upper()) if name is not None else None
        return member

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """("low", "medium", "high", "critical")."""
        return tuple(str(s) for s in cls)

    @classmethod
    def at_least(cls, severity: Any, level: Any) -> bool:
        """True when `severity` is `level` or worse; an unknown severity counts as below low."""
        have, want = cls.from_name(severity), cls.from_name(level)
        return have is not None and want is not None and have >= want

    @classmethod
    def worst(cls, severities: Any) -> Severity | None:
        """The worst known severity among `severities` (None when there is none)."""
        known = [s for s in (cls.from_name(v) for v in severities) if s is not None]
        return max(known) if known else None


SEVERITIES: tuple[str, ...] = Severity.names()
