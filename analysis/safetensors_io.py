"""Read model checkpoints tensor by tensor with numpy only: safetensors (single, sharded, PEFT adapter) and,
through torch's weights-only unpickler, ``.pt``/``.bin`` state dicts.

Headers are validated strictly before any tensor byte is read. Tensor data is memory-mapped in windows of at most
``WINDOW_BYTES`` and reduced in cache-sized blocks, so memory stays near one window whatever the model size.
Every problem a user can cause raises :class:`CheckpointError` with a one-line message.
The code is in rooms: `safetensors_io_tensors` (the model), `safetensors_io_open` (headers and resolution),
`safetensors_io_torch` (torch state dicts); this module streams the statistics and is the public face.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from .safetensors_io_open import open_checkpoint, parse_step_from_path, read_safetensors_header, read_training_state
from .safetensors_io_tensors import (
    _RAW_DTYPE,
    DTYPE_BITS,
    FLOAT_DTYPES,
    SUPPORTED_DTYPES,
    Checkpoint,
    CheckpointError,
    TensorRef,
)

__all__ = [
    "CheckpointError",
    "TensorRef",
    "Checkpoint",
    "read_safetensors_header",
    "open_checkpoint",
    "tensor_stats",
    "tensor_drift",
    "read_training_state",
    "parse_step_from_path",
    "DTYPE_BITS",
    "FLOAT_DTYPES",
    "SUPPORTED_DTYPES",
]

# Blocks of 64k elements (256 KB of float32) stay in L2 while the five reductions run over them.
BLOCK_ELEMS = 1 << 16
# Each mapping covers at most this much of a tensor; touched pages leave RSS when the window is dropped.
WINDOW_BYTES = 32 << 20


def _f8_e4m3_table() -> np.ndarray:
    """float8_e4m3fn → float32: bias 7, no infinities, 0x7F/0xFF are NaN."""
    out = np.empty(256, np.float32)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        exp, man = (b >> 3) & 0xF, b & 0x7
        if exp == 0xF and man == 0x7:
            out[b] = np.nan
        elif exp == 0:
            out[b] = sign * (man / 8.0) * 2.0**-6
        else:
            out[b] = sign * (1.0 + man / 8.0) * 2.0 ** (exp - 7)
    return out


_F8_TABLES: dict[str, np.ndarray] = {}


def _f8_table(dtype: str) -> np.ndarray:
    if dtype not in _F8_TABLES:
        if dtype == "F8_E4M3":
            _F8_TABLES[dtype] = _f8_e4m3_table()
        else:  # F8_E5M2 is the top byte of an IEEE half
            _F8_TABLES[dtype] = (np.arange(256, dtype=np.uint16) << 8).view(np.float16).astype(np.float32)
    return _F8_TABLES[dtype]


# ------------------------------------------------------------------------------------------- reductions


class _Converter:
    """Turns a raw block into float32 (floats) or float64 (integers), reusing one buffer per tensor."""

    def __init__(self, dtype: str, block: int):
        self.dtype = dtype
        self.table = None
        if dtype in ("F32", "F64"):
            self.out = None
            self.float_dtype = np.float32 if dtype == "F32" else np.float64
        elif dtype in ("BF16", "F16", "F8_E4M3", "F8_E5M2"):
            self.out = np.empty(block, np.float32)
            self.float_dtype = np.float32
            self.u32 = self.out.view(np.uint32)
            self.table = _f8_table(dtype) if dtype.startswith("F8") else None
        else:
            self.out = np.empty(block, np.float64)
            self.float_dtype = np.float64

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        if self.out is None:
            return raw
        n = raw.size
        if self.dtype == "BF16":
            # bfloat16 is the top half of a float32.
            bits = self.u32[:n]
            np.left_shift(raw, 16, out=bits, dtype=np.uint32)
            return self.out[:n]
        if self.table is not None:
            return self.table.take(raw, out=self.out[:n])
        out = self.out[:n]
        np.copyto(out, raw, casting="unsafe")
        return out


def _blocks(ref: TensorRef, block: int) -> Iterator[np.ndarray]:
    """Converted float blocks of a tensor; each block is only valid until the next one is requested."""
    conv = _Converter(ref.dtype, block)
    window = max(block, (WINDOW_BYTES // _RAW_DTYPE[ref.dtype].itemsize) // block * block)
    for raw in ref.windows(window):
        for i in range(0, raw.size, block):
            yield conv(raw[i : i + block])
        del raw


def _empty_stats(ref: TensorRef) -> dict[str, Any]:
    return {
        "mean": None,
        "std": None,
        "min": None,
        "max": None,
        "norm": 0.0,
        "rms": None,
        "nan_count": 0,
        "inf_count": 0,
        "zero_fraction": 0.0,
        "numel": ref.numel,
        "dtype": ref.dtype,
        "shape": list(ref.shape),
    }


def _finish_stats(
    ref: TensorRef,
    n_finite: int,
    total: float,
    sumsq: float,
    mn: float,
    mx: float,
    zeros: int,
    nan: int,
    inf: int,
    var: float,
) -> dict[str, Any]:
    numel = ref.numel
    stats = _empty_stats(ref)
    stats.update(nan_count=int(nan), inf_count=int(inf), zero_fraction=zeros / numel if numel else 0.0)
    if n_finite:
        mean = total / n_finite
        stats.update(
            mean=float(mean),
            std=float(math.sqrt(max(var, 0.0))),
            min=float(mn),
            max=float(mx),
            norm=float(math.sqrt(sumsq)),
            rms=float(math.sqrt(sumsq / n_finite)),
        )
    return stats


def tensor_stats(ref: TensorRef, block: int = BLOCK_ELEMS) -> dict[str, Any]:
    """mean, std, min, max, L2 norm, rms, NaN/Inf counts, zero fraction of one tensor, streamed.

    Moments are taken over the finite values (NaN/Inf are counted apart); sums are accumulated in float64
    across blocks. Raises :class:`CheckpointError` for an unsupported dtype or data that vanished.
    """
    if not ref.supported:
        raise CheckpointError(f"unsupported dtype {ref.dtype} for tensor {ref.name!r}")
    numel = ref.numel
    if numel == 0:
        return _empty_stats(ref)
    if numel <= block:
        # One block: exact two-pass float64 statistics cost nothing here (norm weights, biases).
        x = np.asarray(next(_blocks(ref, block)), dtype=np.float64)
        finite = np.isfinite(x)
        n_finite = int(np.count_nonzero(finite))
        nan = int(np.count_nonzero(np.isnan(x)))
        xf = x if n_finite == x.size else x[finite]
        zeros = int(np.count_nonzero(xf == 0))
        if not n_finite:
            return _finish_stats(ref, 0, 0.0, 0.0, 0.0, 0.0, zeros, nan, numel - nan, 0.0)
        return _finish_stats(
            ref,
            n_finite,
            float(xf.sum()),
            float(np.dot(xf, xf)),
            float(xf.min()),
            float(xf.max()),
            zeros,
            nan,
            numel - n_finite - nan,
            float(xf.var()),
        )

    dot, mnr, mxr, eq, cnz, isfinite = (
        np.dot,
        np.minimum.reduce,
        np.maximum.reduce,
        np.equal,
        np.count_nonzero,
        math.isfinite,
    )
    conv = _Converter(ref.dtype, block)
    identity = conv.out is None
    zb = np.empty(block, np.bool_)
    ones = np.ones(block, conv.float_dtype)
    # Row sums of a (block/1024, 1024) view through BLAS gemv read the block once and keep `ones` in L1.
    row = 1024 if block % 1024 == 0 else block
    ones_row = np.ones(row, conv.float_dtype)
    shape2d = (block // row, row)
    window = max(block, (WINDOW_BYTES // _RAW_DTYPE[ref.dtype].itemsize) // block * block)
    sums: list = []
    sumsqs: list = []
    mins: list = []
    maxs: list = []
    zeros = nan = inf = n_finite = 0
    c = None
    for raw in ref.windows(window):
        for i in range(0, raw.size, block):
            c = raw[i : i + block] if identity else conv(raw[i : i + block])
            k = c.size
            ss = dot(c, c)
            if isfinite(ss):
                # Fast path: a finite sum of squares proves the block holds no NaN/Inf.
                sumsqs.append(ss)
                if k == block:
                    sums.append(dot(c.reshape(shape2d), ones_row))
                    eq(c, 0, out=zb)
                    zeros += cnz(zb)
                else:
                    sums.append(dot(c, ones[:k]))
                    zeros += cnz(eq(c, 0, out=zb[:k]))
                mins.append(mnr(c))
                maxs.append(mxr(c))
                n_finite += k
            else:
                x = c.astype(np.float64)
                fin = np.isfinite(x)
                kf = int(cnz(fin))
                kn = int(cnz(np.isnan(x)))
                nan += kn
                inf += k - kf - kn
                xf = x[fin] if kf < k else x
                if kf:
                    sums.append(xf.sum())
                    sumsqs.append(dot(xf, xf))
                    mins.append(xf.min())
                    maxs.append(xf.max())
                    zeros += int(cnz(xf == 0))
                    n_finite += kf
        del raw, c
    if not n_finite:
        return _finish_stats(ref, 0, 0.0, 0.0, 0.0, 0.0, zeros, nan, inf, 0.0)
    total = math.fsum(float(np.sum(s, dtype=np.float64)) for s in sums)
    sumsq = math.fsum(float(s) for s in sumsqs)
    mean = total / n_finite
    var = sumsq / n_finite - mean * mean
    if var < 1e-6 * mean * mean:
        # |mean| dominates: E[x²] − mean² lost its digits; take the deviations in a second, exact pass.
        acc = 0.0
        for c in _blocks(ref, block):
            x = c.astype(np.float64)
            if nan or inf:
                x = x[np.isfinite(x)]
            x -= mean
            acc += float(dot(x, x))
        var = acc / n_finite
    return _finish_stats(ref, n_finite, total, sumsq, float(min(mins)), float(max(maxs)), int(zeros), nan, inf, var)


def tensor_drift(current: TensorRef, reference: TensorRef, block: int = BLOCK_ELEMS) -> tuple[float, float]:
    """Return (‖θ − θ_ref‖², ‖θ_ref‖²) in float64, streaming both tensors block by block.

    The caller checks shapes first. NaN/Inf make the result NaN/Inf.
    """
    diff_sq = 0.0
    ref_sq = 0.0
    dot = np.dot
    for a, b in zip(_blocks(current, block), _blocks(reference, block)):
        b64 = b.astype(np.float64)
        d = a.astype(np.float64)
        d -= b64
        diff_sq += float(dot(d, d))
        ref_sq += float(dot(b64, b64))
    return diff_sq, ref_sq
