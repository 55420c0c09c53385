"""Plain JSON data from analysis results: what `json.dumps(allow_nan=False)` accepts and any reader parses.

(The wire's own encoding, bridge/wire/protocol.to_json_safe, writes non-finite floats as "NaN"/"Infinity"
strings instead; analysis results say "no value" with None.)
"""

from __future__ import annotations

import math
from typing import Any


def finite(value: Any) -> float | None:
    """`value` as a finite float (anything float() takes: numpy scalars, numeric strings), else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def finite_number(value: Any) -> float | None:
    """`value` as a float when it already is a finite int or float (not a bool, not a string), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def json_safe(value: Any) -> Any:
    """A copy of `value` as plain JSON data: non-finite floats become None, tuples lists, dict keys strings,
    numpy scalars Python numbers, anything else its str()."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    try:  # numpy scalars (a 0-d array too); a bigger array has no .item()
        return json_safe(value.item())
    except (AttributeError, ValueError):
        return str(value)
