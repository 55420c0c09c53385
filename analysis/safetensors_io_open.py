"""Find and open a checkpoint: strict safetensors headers, sharded indexes, PEFT adapters, Trainer checkpoint
folders, and the training state (step, scheduler) saved beside the weights. No tensor byte is read here.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from typing import Any

from .safetensors_io_limits import scan_json_header, tensor_limit, too_many_tensors
from .safetensors_io_tensors import (
    DTYPE_BITS,
    MAX_HEADER_BYTES,
    Checkpoint,
    CheckpointError,
    TensorRef,
    _file_size,
)
from .safetensors_io_torch import _torch_load, _torch_tensors

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
    scan_json_header(raw_header, path, tensor_limit(size))  # depth, entries, values: before anything is built
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


def _weights_bytes(folder: str) -> int:
    """Bytes of the weight files in ``folder`` (what a shard index may describe)."""
    total = 0
    try:
        with os.scandir(folder or ".") as entries:
            for entry in entries:
                if entry.name.endswith(_WEIGHT_SUFFIXES) and entry.is_file():
                    total += entry.stat().st_size
    except OSError:
        pass
    return total


def _open_sharded(index_path: str, fmt: str) -> Checkpoint:
    try:
        with open(index_path, "rb") as fb:
            raw = fb.read(MAX_HEADER_BYTES + 1)
    except FileNotFoundError:
        raise CheckpointError(f"missing file: {index_path}") from None
    except OSError as exc:
        raise CheckpointError(f"unreadable file: {index_path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_HEADER_BYTES:
        raise CheckpointError(f"bad shard index {index_path}: larger than {MAX_HEADER_BYTES} bytes")
    # weight_map's names sit at depth 2; the limit comes from the weight files beside the index.
    scan_json_header(raw, index_path, tensor_limit(_weights_bytes(os.path.dirname(index_path))), entry_depth=2)
    try:
        index = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"bad JSON in shard index {index_path}: {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"bad shard index {index_path}: no weight_map")
    folder = os.path.dirname(os.path.abspath(index_path))
    shard_names: dict[str, None] = {}  # ordered, and O(1) per name
    for shard in weight_map.values():
        if not isinstance(shard, str) or os.path.basename(shard) != shard:
            raise CheckpointError(f"bad shard index {index_path}: invalid shard file name {shard!r}")
        shard_names[shard] = None
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
    total_bytes = sum(_file_size(p) for p in files)
    if len(tensors) > tensor_limit(total_bytes):
        raise too_many_tensors(index_path, f"{len(tensors):,}", tensor_limit(total_bytes))
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
        file_size_bytes=total_bytes,
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
    except (OSError, ValueError, TypeError, AttributeError, RecursionError):
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
