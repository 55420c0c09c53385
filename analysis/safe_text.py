"""Text from outside (the wire, a JSONL log, a trainer_state.json, a checkpoint's header) made safe to show on a
terminal, written once: the monitor's ingest applies it to every string it keeps, the renderers again to
whatever did not come through ingest.

Terminal control is removed, whole sequences at once, never passed on: ANSI/ECMA-48 sequences (CSI, 8-bit CSI,
OSC incl. OSC 52 clipboard writes and window titles, DCS, SOS, PM, APC, each with its payload; two-character ESC
sequences), a lone ESC, C0 controls other than tab and newline, DEL, C1 controls, bidirectional overrides and
isolates, zero-width and other invisible format characters, line/paragraph separators, Unicode tag characters
and lone surrogates (which cannot even be written as UTF-8). `"a \\x1b]0;pwned\\x07b"` becomes `"a b"`. Rich
markup in the text stays as it is: renderers show it as `rich.text.Text`, never parse it. Pure standard library.
"""

from __future__ import annotations

import re
from typing import Any

_UNSAFE = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"  # CSI (colours, cursor moves, screen clears)
    r"|(?:\x1b[\]PX^_]|[\x90\x98\x9d\x9e\x9f])[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"  # OSC DCS SOS PM APC + payload
    r"|\x1b[ -/]*[0-~]"  # other escape sequences (ESC c reset, ESC ( B charsets ...)
    r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]"  # lone ESC, C0 but tab/newline, DEL, C1
    r"|[\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff\U000e0000-\U000e007f]"
)
_SPACES = str.maketrans({"\n": " ", "\t": " "})


def safe_text(value: str, limit: int | None = None, one_line: bool = False) -> str:
    """`value` without terminal control (tab and newline kept, or made spaces with `one_line`; a carriage
    return ends a line), clipped to `limit` characters. Printable text is returned as it is (one C-level check)."""
    if not value.isprintable():
        value = _UNSAFE.sub("", value.replace("\r\n", "\n").replace("\r", "\n"))
        if one_line:
            value = value.translate(_SPACES)
    return value if limit is None or len(value) <= limit else value[:limit]


def safe_name(value: str, limit: int = 200) -> str:
    """A name shown on one line (metric, run id, reward function, a key): `safe_text` with `one_line`."""
    return safe_text(value, limit, one_line=True)


def is_safe(value: Any) -> bool:
    """No terminal control left in a string (tab and newline allowed)."""
    return isinstance(value, str) and _UNSAFE.search(value) is None


__all__ = ["is_safe", "safe_name", "safe_text"]
