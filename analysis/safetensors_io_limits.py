"""Bounds on what a checkpoint file may make the analyser do, checked before the expensive step they guard.

A file is untrusted: its size is the only honest measure of the work it deserves. Here are the tensor-count limit
(derived from the real size), the structural pre-scan of a safetensors header (depth and value count, iteratively,
before `json.loads` builds anything), the zip entry count of a torch archive (from its end record, before any
reader walks the directory) and the tensor count of a torch pickle (a C unpickler whose every global is a
counting stub: nothing is built or run, and it stops at the limit, before torch's slower loader starts).
"""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

from .safetensors_io_tensors import CheckpointError

# Real checkpoints under 32 GiB hold a few thousand tensors (a 30B MoE about 19,000); past the floor a file pays
# with real bytes: one tensor per MiB (a 235B MoE: 37,000 tensors in 470 GB).
MAX_TENSORS = 32_768
BYTES_PER_EXTRA_TENSOR = 1 << 20
# A safetensors header is {name: {dtype, shape: [...], data_offsets: [...]}}: depth 3. Slack for extra keys.
MAX_HEADER_DEPTH = 16
# Commas, colons and openings per top-level entry (a rank-8 tensor needs about 20); bounds json.loads' objects.
TOKENS_PER_ENTRY = 64
TOKENS_SLACK = 1 << 16
# Longest tensor name kept (real ones are < 200 characters); a longer one is refused, not copied per tensor.
MAX_NAME_CHARS = 4096
_SCAN_CHUNK = 1 << 20


def tensor_limit(real_bytes: int) -> int:
    """How many tensors a checkpoint of ``real_bytes`` bytes may hold."""
    return max(MAX_TENSORS, int(real_bytes) // BYTES_PER_EXTRA_TENSOR)


def too_many_tensors(path: str, count: int | str, limit: int, what: str = "tensors") -> CheckpointError:
    return CheckpointError(
        f"too many tensors: {path} holds {count} {what}, over the limit of {limit:,} for a file of its size "
        f"({MAX_TENSORS:,}, or one per MiB of data)"
    )


def _structural(chunk: np.ndarray, in_string: bool, backslashes: int) -> tuple[np.ndarray, bool, int]:
    """Mask of the bytes of ``chunk`` outside JSON strings, given the state at its start (inside a string? how
    many backslashes ended the previous chunk); returns the state at its end too."""
    n = chunk.size
    idx = np.arange(n)
    is_bs = chunk == 0x5C
    # For each byte: how many backslashes stand right before it (a quote after an odd run is escaped).
    last_other = np.maximum.accumulate(np.where(is_bs, -1, idx))
    run_before = np.empty(n, np.int64)
    run_before[0] = backslashes
    prev_other = last_other[:-1]
    run_before[1:] = np.where(prev_other >= 0, idx[:-1] - prev_other, idx[:-1] + 1 + backslashes)
    quote = (chunk == 0x22) & (run_before % 2 == 0)
    parity = (np.cumsum(quote) + in_string) % 2
    end_run = n - 1 - int(last_other[-1]) if last_other[-1] >= 0 else n + backslashes
    return (parity == 0) & ~quote, bool(parity[-1]), end_run


def scan_json_header(raw: bytes, path: str, limit: int, entry_depth: int = 1) -> None:
    """Refuse JSON nested deeper than MAX_HEADER_DEPTH, with more than ``limit`` entries (keys at
    ``entry_depth``), or with more values than its entries justify, before it is parsed. Iterative and chunked:
    no recursion, and memory stays near one chunk beside the header itself."""
    data = np.frombuffer(raw, dtype=np.uint8)
    depth = entries = tokens = 0
    in_string, backslashes = False, 0
    for start in range(0, data.size, _SCAN_CHUNK):
        chunk = data[start : start + _SCAN_CHUNK]
        outside, in_string, backslashes = _structural(chunk, in_string, backslashes)
        opening = outside & ((chunk == 0x7B) | (chunk == 0x5B))  # { [
        closing = outside & ((chunk == 0x7D) | (chunk == 0x5D))  # } ]
        brackets = np.flatnonzero(opening | closing)
        levels = depth + np.cumsum(np.where(opening[brackets], 1, -1))
        if levels.size and int(levels.max()) > MAX_HEADER_DEPTH:
            raise CheckpointError(
                f"bad header: {path}: nested too deeply to parse (over {MAX_HEADER_DEPTH} levels; not a checkpoint?)"
            )
        seps = np.flatnonzero(outside & ((chunk == 0x2C) | (chunk == 0x3A)))  # , :
        if seps.size:
            # The depth at a separator is the level after the nearest bracket before it.
            before = np.searchsorted(brackets, seps) - 1
            sep_depth = levels[np.maximum(before, 0)] if levels.size else np.zeros(seps.size, np.int64)
            sep_depth = np.where(before >= 0, sep_depth, depth)
            entries += int(np.count_nonzero((chunk[seps] == 0x3A) & (sep_depth == entry_depth)))
        tokens += int(seps.size) + int(np.count_nonzero(opening))
        if levels.size:
            depth = int(levels[-1])
        if entries > limit + 1:  # + __metadata__
            raise too_many_tensors(path, f"more than {limit:,}", limit, "entries")
    if tokens > TOKENS_PER_ENTRY * (entries + 1) + TOKENS_SLACK:
        raise CheckpointError(
            f"bad header: {path}: {tokens:,} JSON values for {entries:,} entries (not a safetensors header)"
        )


# ------------------------------------------------------------------------------------------------ torch


def zip_entry_count(path: str) -> int | None:
    """The entry count a zip's end record declares (zip64 too), or None when the file is no zip."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            tail_len = min(size, 22 + 0xFFFF)
            f.seek(size - tail_len)
            tail = f.read(tail_len)
            at = tail.rfind(b"PK\x05\x06")
            if at < 0 or len(tail) - at < 22:
                return None
            count = struct.unpack_from("<H", tail, at + 10)[0]
            if count != 0xFFFF or at < 20 or tail[at - 20 : at - 16] != b"PK\x06\x07":
                return int(count)
            (z64_offset,) = struct.unpack_from("<Q", tail, at - 20 + 8)
            f.seek(z64_offset)
            record = f.read(56)
            if len(record) < 40 or record[:4] != b"PK\x06\x06":
                return int(count)
            return int(struct.unpack_from("<Q", record, 32)[0])
    except (OSError, struct.error, ValueError):
        return None


# Rebuilds that wrap another (a Parameter around a tensor): counting them would count a tensor twice.
_WRAPPING_REBUILDS = frozenset(
    {"_rebuild_parameter", "_rebuild_parameter_with_state", "_rebuild_from_type", "_rebuild_from_type_v2"}
)


class _Stub:
    """Stands for every global and persistent id of a scanned pickle: accepts any call and any mutation."""

    def __init__(self, *args: Any, **kwargs: Any):
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def add(self, value: Any) -> None:
        pass


class _LimitReached(Exception):
    pass


class _CountingUnpickler(pickle.Unpickler):
    """Counts tensor rebuilds and other calls; refuses to go past the limits."""

    def __init__(self, file: Any, tensor_limit: int):
        super().__init__(file)
        self.tensors = 0
        self.calls = 0
        self.tensor_limit = tensor_limit
        self.call_limit = 4 * tensor_limit + 1024

    def find_class(self, module: str, name: str) -> Any:
        is_tensor = name.startswith("_rebuild") and name not in _WRAPPING_REBUILDS
        scanner = self

        class Counted(_Stub):
            def __init__(self, *args: Any, **kwargs: Any):
                scanner.calls += 1
                scanner.tensors += is_tensor
                if scanner.tensors > scanner.tensor_limit or scanner.calls > scanner.call_limit:
                    raise _LimitReached

        return Counted

    def persistent_load(self, pid: Any) -> Any:
        return _Stub()


def check_torch_tensor_count(path: str, limit: int) -> None:
    """Refuse a torch file whose archive or pickle holds more than ``limit`` tensors, before torch loads it.

    A pickle this scan cannot read is left to torch's loader, which says why (and is bounded after loading).
    """
    entries = zip_entry_count(path)
    if entries is not None and entries > limit + 16:  # data.pkl, version, byteorder, ... beside the storages
        raise too_many_tensors(path, f"{entries:,}", limit, "archive entries")
    try:
        if entries is not None:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
                if not names:
                    return
                with zf.open(names[0]) as f:
                    _CountingUnpickler(f, limit).load()
        else:  # legacy format: magic number, protocol, system info, then the object
            with open(path, "rb") as f:
                for _ in range(4):
                    _CountingUnpickler(f, limit).load()
    except _LimitReached:
        raise too_many_tensors(path, "more than " + f"{limit:,}", limit) from None
    except Exception:  # not ours to judge: torch's loader reports it
        return
