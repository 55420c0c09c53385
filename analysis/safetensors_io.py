"""Read model checkpoints tensor by tensor with numpy only: safetensors (single, sharded, PEFT adapter) and,
through torch's weights-only unpickler, ``.pt``/``.bin`` state dicts.

Headers are validated strictly before any tensor byte is read. Tensor data is memory-mapped in windows of at most
``WINDOW_BYTES`` and reduced in cache-sized blocks, so memory stays near one window whatever the model size.
Every problem a user can cause raises :class:`CheckpointError` with a one-line message.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
]

# Blocks of 64k elements (256 KB of float32) stay in L2 while the five reductions run over them.
BLOCK_ELEMS = 1 << 16
# Each mapping covers at most this much of a tensor; touched pages leave RSS when the window is dropped.
WINDOW_BYTES = 32 << 20
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
_RAW_DTYPE = {
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

_STEP_RE = re.compile(r"(?:checkpoint|step|ckpt|global_step|iter)[-_]?(\d+)$", re.IGNORECASE)
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# Files a Trainer writes next to the weights that are not weights.
_NOT_WEIGHTS = {
    "optimizer.pt",
    "scheduler.pt",
    "training_args.bin",
    "rng_state.pth",
    "scaler.pt",
    "trainer_state.json",
}


class CheckpointError(Exception):
    """A checkpoint that cannot be read: missing, truncated, malformed, or unsafe. The message is one line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


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


# --------------------------------------------------------------------------------------------------- headers


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_safetensors_header(path: str) -> tuple[list[TensorRef], dict[str, str]]:
    """Parse and validate a safetensors header; return its tensors (sorted by offset) and ``__metadata__``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"missing file: {path}") from None
    except OSError as exc:
        raise CheckpointError(f"unreadable file: {path}: {exc.strerror or exc}") from None
    if not os.path.isfile(path):
        raise CheckpointError(f"not a file: {path}")
    size = st.st_size
    if size < 8:
        raise CheckpointError(f"truncated header: {path} is {size} bytes, shorter than the 8-byte length prefix")
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise CheckpointError(
                    f"truncated header: {path} declares a {header_len}-byte header but only "
                    f"{size - 8} bytes follow the length prefix"
                )
            if header_len > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"bad header: {path} declares a {header_len}-byte header (limit "
                    f"{MAX_HEADER_BYTES}); not a safetensors file?"
                )
            raw_header = f.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"unreadable file: {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw_header.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"bad JSON in safetensors header of {path}: {exc}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"bad header: {path}: the header is not a JSON object")

    data_len = size - 8 - header_len
    data_start = 8 + header_len
    metadata: dict[str, str] = {}
    tensors: list[TensorRef] = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointError(f"bad header: {path}: __metadata__ must map strings to strings")
            metadata = entry
            continue
        if not isinstance(entry, dict):
            raise CheckpointError(f"bad header: {path}: entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise CheckpointError(f"wrong dtype: tensor {name!r} in {path} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise CheckpointError(f"bad header: {path}: tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise CheckpointError(f"bad header: {path}: tensor {name!r} has invalid data_offsets {offsets!r}")
        begin, end = offsets
        numel = math.prod(shape)
        expected = (numel * DTYPE_BITS[dtype] + 7) // 8
        if end - begin != expected:
            raise CheckpointError(
                f"bad header: {path}: tensor {name!r} ({dtype} {shape}) needs {expected} bytes "
                f"but its data_offsets span {end - begin}"
            )
        tensors.append(
            TensorRef(
                name=name, dtype=dtype, shape=tuple(shape), path=path, offset=data_start + begin, nbytes=end - begin
            )
        )
    tensors.sort(key=lambda t: t.offset)
    needed = max((t.offset - data_start + t.nbytes for t in tensors), default=0)
    if needed > data_len:
        raise CheckpointError(
            f"truncated data: {path} holds {data_len} bytes of tensor data but its header needs {needed}"
        )
    for prev, cur in zip(tensors, tensors[1:]):
        if cur.offset < prev.offset + prev.nbytes:
            raise CheckpointError(f"bad header: {path}: tensors {prev.name!r} and {cur.name!r} overlap")
    return tensors, metadata


# --------------------------------------------------------------------------------------------- resolution


def _file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _open_sharded(index_path: str, fmt: str) -> Checkpoint:
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"missing file: {index_path}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"bad JSON in shard index {index_path}: {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"bad shard index {index_path}: no weight_map")
    folder = os.path.dirname(os.path.abspath(index_path))
    shard_names: list[str] = []
    for shard in weight_map.values():
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise CheckpointError(f"bad shard index {index_path}: invalid shard file name {shard!r}")
        if shard not in shard_names:
            shard_names.append(shard)
    files = [os.path.join(folder, s) for s in shard_names]
    tensors: list[TensorRef] = []
    problems: list[str] = []
    for shard_path in files:
        if not os.path.exists(shard_path):
            raise CheckpointError(f"missing file: shard {os.path.basename(shard_path)} listed in {index_path}")
        if shard_path.endswith(".safetensors"):
            found, _ = read_safetensors_header(shard_path)
        else:
            found = _torch_tensors(shard_path)
        tensors.extend(found)
    present = {t.name for t in tensors}
    missing = [name for name in weight_map if name not in present]
    if missing:
        problems.append(
            f"{len(missing)} tensors listed in {os.path.basename(index_path)} are missing from the "
            f"shards (first: {missing[0]})"
        )
    return Checkpoint(
        path=index_path,
        format=fmt,
        files=files,
        tensors=tensors,
        folder=folder,
        file_size_bytes=sum(_file_size(p) for p in files),
        problems=problems,
    )


def _open_file(path: str, fmt: str | None = None) -> Checkpoint:
    base = os.path.basename(path)
    folder = os.path.dirname(os.path.abspath(path))
    if base.endswith(".index.json"):
        return _open_sharded(path, "sharded-safetensors" if ".safetensors" in base else "torch-state-dict")
    if base.endswith(".safetensors"):
        tensors, _ = read_safetensors_header(path)
        fmt = fmt or ("peft-adapter" if base.startswith("adapter_model") else "safetensors")
    elif base.endswith((".pt", ".pth", ".bin", ".ckpt")):
        tensors = _torch_tensors(path)
        fmt = fmt or ("peft-adapter" if base.startswith("adapter_model") else "torch-state-dict")
    else:
        raise CheckpointError(f"unknown checkpoint type: {path} (expected .safetensors, .pt, .pth or .bin)")
    return Checkpoint(
        path=path, format=fmt, files=[path], tensors=tensors, folder=folder, file_size_bytes=_file_size(path)
    )


def _checkpoint_subfolders(folder: str) -> list[tuple[int, str]]:
    found = []
    for entry in os.listdir(folder):
        m = re.fullmatch(r"checkpoint-(\d+)", entry)
        if m and os.path.isdir(os.path.join(folder, entry)):
            found.append((int(m.group(1)), os.path.join(folder, entry)))
    return sorted(found)


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Resolve a file or a folder to its weights and validate every header.

    A folder may hold ``model.safetensors``, a sharded ``model.safetensors.index.json``, a PEFT
    ``adapter_model.safetensors``, a ``pytorch_model.bin``, a single other weights file, or (a training
    ``output_dir``) ``checkpoint-N`` subfolders, of which the newest is used.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"missing file: {path} does not exist")
    if os.path.isfile(path):
        return _open_file(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"not a file or folder: {path}")
    try:
        names = set(os.listdir(path))
    except OSError as exc:
        raise CheckpointError(f"unreadable folder: {path}: {exc.strerror or exc}") from None
    for candidate, fmt in (
        ("model.safetensors", "safetensors"),
        ("model.safetensors.index.json", "sharded-safetensors"),
        ("adapter_model.safetensors", "peft-adapter"),
        ("pytorch_model.bin", "torch-state-dict"),
        ("pytorch_model.bin.index.json", "torch-state-dict"),
        ("adapter_model.bin", "peft-adapter"),
    ):
        if candidate in names:
            if candidate.endswith(".index.json"):
                return _open_sharded(os.path.join(path, candidate), fmt)
            return _open_file(os.path.join(path, candidate), fmt)
    indexes = sorted(n for n in names if n.endswith(".safetensors.index.json"))
    if indexes:
        return _open_sharded(os.path.join(path, indexes[0]), "sharded-safetensors")
    singles = sorted(
        n
        for n in names
        if n.endswith(_WEIGHT_SUFFIXES)
        and n not in _NOT_WEIGHTS
        and not n.startswith("rng_state")
        and os.path.isfile(os.path.join(path, n))
    )
    safes = [n for n in singles if n.endswith(".safetensors")]
    if len(safes) == 1 or (not safes and len(singles) == 1):
        return _open_file(os.path.join(path, (safes or singles)[0]))
    if len(singles) > 1:
        raise CheckpointError(
            f"ambiguous folder: {path} holds several weight files ({', '.join(singles[:4])}); pass one of them"
        )
    subfolders = _checkpoint_subfolders(path)
    if subfolders:
        return open_checkpoint(subfolders[-1][1])
    raise CheckpointError(
        f"no checkpoint weights in {path} (expected model.safetensors, a sharded index, "
        f"adapter_model.safetensors or pytorch_model.bin)"
    )


# ------------------------------------------------------------------------------------------------- torch

_TORCH_TAGS = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "float8_e8m0fnu": "F8_E8M0",
    "complex64": "C64",
}


def _unpickling_reason(exc: BaseException) -> str:
    """The informative line of torch's long weights-only error ("Unsupported global: GLOBAL io.open ...")."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    m = re.search(r"Unsupported [^\n]*?(?= was not|\. |\n|$)", text)
    if m:
        return m.group(0).strip()[:160]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:160]


def _torch_load(path: str, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)``: plain tensors and containers only; a pickle carrying code is refused."""
    import pickle

    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"torch is needed to read {path} (pip install torch), or convert it to safetensors"
        ) from None
    if os.path.isdir(path):
        raise CheckpointError(f"not a file: {path}")
    if not os.path.exists(path):
        raise CheckpointError(f"missing file: {path}")
    if _file_size(path) == 0:
        raise CheckpointError(f"truncated data: {path} is empty")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # legacy (non-zip) files cannot be mapped
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refused: {path} is a pickle with code (or objects other than plain tensors), "
            f"which a weights-only load will not run ({_unpickling_reason(exc)})"
        ) from None
    except (EOFError, RuntimeError, OSError, ValueError, struct.error) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        kind = "truncated data" if isinstance(exc, EOFError) or "zip" in msg.lower() else f"unreadable {what}"
        raise CheckpointError(f"{kind}: {path} cannot be loaded: {msg[:200]}") from None


def _collect_tensors(obj: Any, prefix: str, out: dict[str, Any], depth: int = 0) -> None:
    import torch

    if isinstance(obj, torch.Tensor):
        out[prefix or "tensor"] = obj
    elif isinstance(obj, dict) and depth < 6:
        for key, value in obj.items():
            _collect_tensors(value, f"{prefix}.{key}" if prefix else str(key), out, depth + 1)
    elif isinstance(obj, (list, tuple)) and depth < 6:
        for i, value in enumerate(obj):
            _collect_tensors(value, f"{prefix}.{i}" if prefix else str(i), out, depth + 1)


def _torch_tensors(path: str) -> list[TensorRef]:
    obj = _torch_load(path)  # raises CheckpointError when torch is missing
    import torch

    # Common wrappers around the real state dict.
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    found: dict[str, Any] = {}
    _collect_tensors(obj, "", found)
    if not found:
        raise CheckpointError(f"no tensors in {path}: not a state dict")
    refs = []
    for name, tensor in found.items():
        tag = _TORCH_TAGS.get(str(tensor.dtype).replace("torch.", ""), str(tensor.dtype).replace("torch.", ""))
        ref = TensorRef(
            name=name, dtype=tag, shape=tuple(tensor.shape), path=path, nbytes=tensor.numel() * tensor.element_size()
        )
        if ref.supported:
            t = tensor.detach().contiguous()
            if t.dtype == torch.bfloat16:
                ref.array = t.view(torch.int16).numpy().view(np.uint16)
            elif tag in ("F8_E4M3", "F8_E5M2"):
                ref.array = t.view(torch.uint8).numpy()
            else:
                ref.array = t.numpy()
        refs.append(ref)
    return refs


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
            out = self.u32[:n]
            np.left_shift(raw, 16, out=out, dtype=np.uint32)
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


# ----------------------------------------------------------------------------------------- training state


def parse_step_from_path(path: str | os.PathLike) -> int | None:
    """``.../checkpoint-500`` or ``step_100.pt`` → the step; None when the name carries none."""
    p = os.path.abspath(os.fspath(path))
    candidates = [p, os.path.dirname(p)] if os.path.isfile(p) else [p]
    for cand in candidates:
        stem = os.path.basename(cand.rstrip(os.sep))
        for suffix in (".safetensors", ".pt", ".pth", ".bin", ".ckpt"):
            if stem.endswith(suffix):
                stem = stem[: -len(suffix)]
        m = _STEP_RE.search(stem)
        if m:
            return int(m.group(1))
    return None


def read_training_state(folder: str | None) -> dict[str, Any]:
    """Best effort: ``global_step`` and last ``learning_rate`` from trainer_state.json (else scheduler.pt).

    Never raises; missing or unreadable files just leave the fields out.
    """
    out: dict[str, Any] = {}
    if not folder:
        return out
    state_path = os.path.join(folder, "trainer_state.json")
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
        if isinstance(state, dict):
            step = state.get("global_step")
            if isinstance(step, int) and not isinstance(step, bool):
                out["global_step"] = step
            for entry in reversed(state.get("log_history") or []):
                if isinstance(entry, dict):
                    lr = entry.get("learning_rate", entry.get("lr"))
                    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
                        out["learning_rate"] = float(lr)
                        out["learning_rate_source"] = "trainer_state.json"
                        break
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    sched_path = os.path.join(folder, "scheduler.pt")
    if "learning_rate" not in out and os.path.isfile(sched_path):
        try:
            sched = _torch_load(sched_path, "scheduler state")
            last = sched.get("_last_lr") if isinstance(sched, dict) else None
            if isinstance(last, (list, tuple)) and last and isinstance(last[0], (int, float)):
                out["learning_rate"] = float(last[0])
                out["learning_rate_source"] = "scheduler.pt"
        except Exception:  # best effort: a scheduler file never makes the analysis fail
            pass
    return out
