"""Torch ``.pt``/``.bin`` state dicts through the weights-only unpickler: each tensor becomes an in-memory
`TensorRef`. torch is imported only when such a file is opened (analysis stays importable without it).
"""

from __future__ import annotations

import os
import re
import struct
from typing import Any

import numpy as np

from .safetensors_io_limits import MAX_NAME_CHARS, check_torch_tensor_count, tensor_limit, too_many_tensors
from .safetensors_io_tensors import CheckpointError, TensorRef, _file_size

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


def _collect_tensors(obj: Any, limit: int, path: str) -> dict[str, Any]:
    """Tensors of nested dicts/lists/tuples (6 levels), by dotted name, in order. Iterative and bounded: a pickle
    may share one container many times over (a tiny file, a huge tree), so nodes and tensors are counted."""
    import torch

    out: dict[str, Any] = {}
    budget = 4 * limit + 1024
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        node, prefix, depth = stack.pop()
        budget -= 1
        if budget < 0:
            raise too_many_tensors(path, f"more than {limit:,}", limit, "tensors and containers")
        if len(prefix) > MAX_NAME_CHARS:
            raise CheckpointError(f"bad tensor name: {path} holds a name longer than {MAX_NAME_CHARS} characters")
        if isinstance(node, torch.Tensor):
            out[prefix or "tensor"] = node
            if len(out) > limit:
                raise too_many_tensors(path, f"more than {limit:,}", limit)
        elif depth < 6 and isinstance(node, (dict, list, tuple)):
            items = node.items() if isinstance(node, dict) else enumerate(node)
            children = [(v, f"{prefix}.{k}" if prefix else str(k), depth + 1) for k, v in _take(items, budget)]
            stack.extend(reversed(children))
    return out


def _take(items: Any, budget: int) -> list[tuple[Any, Any]]:
    """At most ``budget + 1`` items: enough to run the budget out, never a huge list of names."""
    taken = []
    for item in items:
        taken.append(item)
        if len(taken) > budget:
            break
    return taken


def _layout_problem(tensor: Any) -> str | None:
    """Why a tensor's elements cannot be read once each from its own storage, or None when they can."""
    numel = tensor.numel()
    if numel == 0:
        return None
    shape, strides = tuple(tensor.shape), tuple(tensor.stride())
    if any(st == 0 and n > 1 for n, st in zip(shape, strides)):
        return f"is a stride-0 (expanded) view: {numel:,} elements backed by fewer"
    extent = 1 + sum((n - 1) * st for n, st in zip(shape, strides))
    if extent < numel:
        return f"has overlapping strides: {numel:,} elements in {extent:,} storage slots"
    if (tensor.storage_offset() + extent) * tensor.element_size() > tensor.untyped_storage().nbytes():
        return "points past the end of its storage"
    return None


def _torch_tensors(path: str) -> list[TensorRef]:
    limit = tensor_limit(_file_size(path))
    check_torch_tensor_count(path, limit)  # before torch's loader pays per tensor
    obj = _torch_load(path)  # raises CheckpointError when torch is missing
    import torch

    # Common wrappers around the real state dict.
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    found = _collect_tensors(obj, limit, path)
    if not found:
        raise CheckpointError(f"no tensors in {path}: not a state dict")
    # Every element is read once: a view that expands or overlaps its storage is refused before any copy, and
    # identical views (tied weights) share one reading through `share_key`.
    storages: set[int] = set()
    views: set[tuple] = set()
    view_bytes = storage_bytes = 0
    refs = []
    for name, tensor in found.items():
        problem = _layout_problem(tensor)
        if problem:
            raise CheckpointError(f"refused: tensor {name!r} in {path} {problem}")
        storage = tensor.untyped_storage()
        view_key = (
            storage.data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            str(tensor.dtype),
        )
        if tensor.numel() and view_key not in views:
            views.add(view_key)
            if storage.data_ptr() not in storages:
                storages.add(storage.data_ptr())
                storage_bytes += storage.nbytes()
            view_bytes += tensor.numel() * tensor.element_size()
            if view_bytes > storage_bytes:
                raise CheckpointError(
                    f"refused: tensor {name!r} in {path} overlaps another tensor's storage "
                    f"({view_bytes:,} bytes of tensors over {storage_bytes:,} bytes of storage)"
                )
        tag = _TORCH_TAGS.get(str(tensor.dtype).replace("torch.", ""), str(tensor.dtype).replace("torch.", ""))
        ref = TensorRef(
            name=name,
            dtype=tag,
            shape=tuple(tensor.shape),
            path=path,
            nbytes=tensor.numel() * tensor.element_size(),
            share_key=view_key,
        )
        if ref.supported:
            t = tensor.detach().contiguous()  # a copy only for a permuted view: at most its own storage's bytes
            if t.dtype == torch.bfloat16:
                ref.array = t.view(torch.int16).numpy().view(np.uint16)
            elif tag in ("F8_E4M3", "F8_E5M2"):
                ref.array = t.view(torch.uint8).numpy()
            else:
                ref.array = t.numpy()
        refs.append(ref)
    return refs
