"""The checkpoint model shared by the safetensors_io modules: dtype tables, `TensorRef` (where one tensor's bytes
are, read in memory-mapped windows), `Checkpoint` (a resolved checkpoint) and `CheckpointError`.
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Tensors this small are read with one pread (no mapping, no SIGBUS if the file changes under us).
SMALL_READ_BYTES = 1 << 20
# The safetensors reference implementation refuses headers above 100 MB.
MAX_HEADER_BYTES = 100_000_000

# Bits per element of every safetensors dtype we know.
DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
}
# Raw little-endian storage type of the dtypes we can reduce.
_RAW_DTYPE: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("u1"),
    "F8_E4M3": np.dtype("u1"),
    "F8_E5M2": np.dtype("u1"),
}
SUPPORTED_DTYPES = frozenset(_RAW_DTYPE)
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})


class CheckpointError(Exception):
    """A checkpoint that cannot be read: missing, truncated, malformed, or unsafe. The message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


@dataclass
class TensorRef:
    """Where one tensor's bytes are: a byte range of a file, or an in-memory array (torch state dicts)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: str | None = None
    offset: int = 0
    nbytes: int = 0
    array: Any = None
    # Equal for tensors that are the same view of the same bytes (tied weights): read once, not once per name.
    share_key: Any = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def supported(self) -> bool:
        return self.dtype in SUPPORTED_DTYPES

    def windows(self, max_elems: int) -> Iterator[np.ndarray]:
        """Yield the tensor as flat raw-typed arrays of at most ``max_elems`` elements, in order.

        A window's mapping is released when the caller drops the array, so keep at most one at a time.
        """
        raw = _RAW_DTYPE[self.dtype]
        if self.array is not None:
            flat = self.array.reshape(-1)
            for e0 in range(0, flat.size, max_elems):
                yield flat[e0 : e0 + max_elems]
            return
        if self.numel == 0:
            return
        assert self.path is not None, "a TensorRef holds either an array or a file path"
        if self.nbytes <= SMALL_READ_BYTES:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read(self.nbytes)
            if len(data) != self.nbytes:
                raise CheckpointError(
                    f"truncated data: tensor {self.name!r} in {self.path} ends past the end of the file"
                )
            flat = np.frombuffer(data, dtype=raw)
            for e0 in range(0, flat.size, max_elems):
                yield flat[e0 : e0 + max_elems]
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size < self.offset + self.nbytes:
                raise CheckpointError(
                    f"truncated data: tensor {self.name!r} in {self.path} ends past the end of the file"
                )
            item = raw.itemsize
            for e0 in range(0, self.numel, max_elems):
                start = self.offset + e0 * item
                count = min(max_elems, self.numel - e0)
                page = start - start % mmap.ALLOCATIONGRANULARITY
                m = mmap.mmap(fd, count * item + (start - page), access=mmap.ACCESS_READ, offset=page)
                try:
                    m.madvise(mmap.MADV_SEQUENTIAL)
                except (AttributeError, OSError, ValueError):
                    pass
                # The array keeps the mapping alive; it is unmapped as soon as the caller drops the array.
                arr = np.frombuffer(m, dtype=raw, count=count, offset=start - page)
                del m
                yield arr
                del arr
        finally:
            os.close(fd)


@dataclass
class Checkpoint:
    """A resolved checkpoint: its format, weight files and tensors (in file order)."""

    path: str
    format: str
    files: list[str]
    tensors: list[TensorRef]
    folder: str | None
    file_size_bytes: int
    problems: list[str] = field(default_factory=list)

    @property
    def by_name(self) -> dict[str, TensorRef]:
        return {t.name: t for t in self.tensors}


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
