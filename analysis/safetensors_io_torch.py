"""Torch ``.pt``/``.bin`` state dicts through the weights-only unpickler: each tensor becomes an in-memory
`TensorRef`. torch is imported only when such a file is opened (analysis stays importable without it).
"""

from __future__ import annotations

import os
import re
import struct
from typing import Any

import numpy as np

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
