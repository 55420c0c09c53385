"""The numpy-only safetensors reader: strict header validation and streamed statistics checked against numpy."""

from __future__ import annotations

import json
import pickle
import struct
import subprocess
import sys

import numpy as np
import pytest

from rlhf_tui.analysis import safetensors_io as sio
from rlhf_tui.analysis.safetensors_io import (
    CheckpointError,
    open_checkpoint,
    read_safetensors_header,
    tensor_drift,
    tensor_stats,
)


def write_safetensors(path, tensors, header_override=None):
    """Minimal writer: tensors = {name: (dtype_tag, shape, raw_bytes)}."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    if header_override is not None:
        header = header_override
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return path


def bf16_bytes(x: np.ndarray) -> bytes:
    return (x.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()


def bf16_values(x: np.ndarray) -> np.ndarray:
    # Independent of the reader's shift: pad each bf16 with two zero bytes on the low side.
    u = (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint32)
    return (u * 65536).view(np.float32).astype(np.float64)


def expected_stats(x: np.ndarray) -> dict:
    x = np.asarray(x, dtype=np.float64).ravel()
    f = x[np.isfinite(x)]
    return {
        "mean": f.mean(),
        "std": f.std(),
        "min": f.min(),
        "max": f.max(),
        "norm": np.sqrt(np.dot(f, f)),
        "nan_count": int(np.isnan(x).sum()),
        "inf_count": int(np.isinf(x).sum()),
        "zero_fraction": float(np.mean(x == 0)),
    }


def assert_stats_match(got: dict, want: dict, rtol: float = 1e-6) -> None:
    scale = max(abs(want["mean"]), want["std"], 1e-30)
    assert got["mean"] == pytest.approx(want["mean"], abs=rtol * scale)
    for key in ("std", "min", "max", "norm"):
        assert got[key] == pytest.approx(want[key], rel=rtol, abs=1e-30), key
    for key in ("nan_count", "inf_count"):
        assert got[key] == want[key], key
    assert got["zero_fraction"] == pytest.approx(want["zero_fraction"], abs=1e-12)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ------------------------------------------------------------------------------------------------ headers


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing file"):
        read_safetensors_header(str(tmp_path / "nope.safetensors"))


def test_truncated_header_short_prefix(tmp_path):
    p = tmp_path / "short.safetensors"
    p.write_bytes(b"\x10\x00\x00")
    with pytest.raises(CheckpointError, match="truncated header"):
        read_safetensors_header(str(p))


def test_truncated_header_length_past_end(tmp_path, rng):
    p = write_safetensors(tmp_path / "a.safetensors", {"w": ("F32", (4,), rng.random(4, np.float32).tobytes())})
    data = p.read_bytes()
    p.write_bytes(data[:20])
    with pytest.raises(CheckpointError, match="truncated header") as info:
        read_safetensors_header(str(p))
    assert "\n" not in str(info.value)


def test_bad_json(tmp_path):
    p = tmp_path / "bad.safetensors"
    body = b"{not json!"
    p.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(CheckpointError, match="bad JSON"):
        read_safetensors_header(str(p))


def test_duplicate_tensor_names_rejected(tmp_path):
    p = tmp_path / "dup.safetensors"
    body = (
        b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
        b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    )
    p.write_bytes(struct.pack("<Q", len(body)) + body + b"\x00" * 4)
    with pytest.raises(CheckpointError, match="bad JSON"):
        read_safetensors_header(str(p))


def test_unknown_dtype(tmp_path):
    header = {"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}
    p = write_safetensors(tmp_path / "d.safetensors", {"w": ("F32", (2,), b"\x00" * 8)}, header_override=header)
    with pytest.raises(CheckpointError, match="wrong dtype"):
        read_safetensors_header(str(p))


def test_offsets_inconsistent_with_shape(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}
    p = write_safetensors(tmp_path / "o.safetensors", {"w": ("F32", (2,), b"\x00" * 8)}, header_override=header)
    with pytest.raises(CheckpointError, match="needs 12 bytes"):
        read_safetensors_header(str(p))


def test_overlapping_tensors(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    p = write_safetensors(tmp_path / "ov.safetensors", {"w": ("F32", (3,), b"\x00" * 12)}, header_override=header)
    with pytest.raises(CheckpointError, match="overlap"):
        read_safetensors_header(str(p))


def test_truncated_data(tmp_path, rng):
    p = write_safetensors(tmp_path / "t.safetensors", {"w": ("F32", (100,), rng.random(100, np.float32).tobytes())})
    data = p.read_bytes()
    p.write_bytes(data[:-40])
    with pytest.raises(CheckpointError, match="truncated data"):
        read_safetensors_header(str(p))


def test_unsupported_f8_e8m0_is_listed_not_fatal(tmp_path, rng):
    p = write_safetensors(
        tmp_path / "q.safetensors",
        {
            "scales": ("F8_E8M0", (8,), bytes(range(120, 128))),
            "w": ("F32", (4,), rng.random(4, np.float32).tobytes()),
        },
    )
    ckpt = open_checkpoint(str(p))
    refs = ckpt.by_name
    assert not refs["scales"].supported and refs["w"].supported
    with pytest.raises(CheckpointError, match="unsupported dtype"):
        tensor_stats(refs["scales"])


# ------------------------------------------------------------------------------------------------ stats


@pytest.mark.parametrize("dtype", ["F32", "F64", "F16", "I64", "I8", "U8", "BOOL"])
def test_stats_match_numpy(tmp_path, rng, dtype):
    np_dtype = {"F32": "<f4", "F64": "<f8", "F16": "<f2", "I64": "<i8", "I8": "i1", "U8": "u1", "BOOL": "u1"}[dtype]
    if dtype in ("F32", "F64", "F16"):
        x = (rng.standard_normal(3000) * 0.05 + 0.01).astype(np_dtype)
        x[:17] = 0
    elif dtype == "BOOL":
        x = (rng.random(3000) > 0.3).astype(np_dtype)
    else:
        x = rng.integers(-100 if dtype != "U8" else 0, 100, 3000).astype(np_dtype)
    p = write_safetensors(tmp_path / "s.safetensors", {"t": (dtype, (30, 100), x.tobytes())})
    got = tensor_stats(open_checkpoint(str(p)).tensors[0])
    assert got["numel"] == 3000 and got["dtype"] == dtype and got["shape"] == [30, 100]
    assert_stats_match(got, expected_stats(x))


def test_bf16_conversion_and_stats(tmp_path, rng):
    x = rng.standard_normal(5000).astype(np.float32) * 3
    p = write_safetensors(tmp_path / "b.safetensors", {"t": ("BF16", (5000,), bf16_bytes(x))})
    ref = open_checkpoint(str(p)).tensors[0]
    want = expected_stats(bf16_values(x))
    assert_stats_match(tensor_stats(ref), want)
    assert_stats_match(tensor_stats(ref, block=512), want)  # streamed path, many blocks


def test_f8_tables_match_torch():
    torch = pytest.importorskip("torch")
    codes = torch.arange(256, dtype=torch.uint8)
    for tag, tdtype in (("F8_E4M3", torch.float8_e4m3fn), ("F8_E5M2", torch.float8_e5m2)):
        want = codes.view(tdtype).float().numpy()
        got = sio._f8_table(tag)
        np.testing.assert_array_equal(got, want)


def test_streamed_stats_with_nan_inf_across_blocks_and_windows(tmp_path, rng, monkeypatch):
    # 6 MB tensor: goes through the mmap path; small windows force several mappings.
    monkeypatch.setattr(sio, "WINDOW_BYTES", 1 << 20)
    x = rng.standard_normal(1_500_000).astype(np.float32) * 0.02
    x[10] = np.nan
    x[700_001] = np.inf
    x[900_000] = -np.inf
    x[1_000_000:1_000_500] = 0
    p = write_safetensors(tmp_path / "big.safetensors", {"t": ("F32", (1500, 1000), x.tobytes())})
    got = tensor_stats(open_checkpoint(str(p)).tensors[0])
    assert got["nan_count"] == 1 and got["inf_count"] == 2
    assert_stats_match(got, expected_stats(x))


def test_large_mean_small_spread_keeps_precision(tmp_path, rng):
    x = (5.0 + rng.standard_normal(400_000) * 1e-3).astype(np.float32)
    p = write_safetensors(tmp_path / "m.safetensors", {"t": ("F32", (400_000,), x.tobytes())})
    got = tensor_stats(open_checkpoint(str(p)).tensors[0])
    assert_stats_match(got, expected_stats(x), rtol=1e-5)


def test_constant_and_empty_tensors(tmp_path):
    p = write_safetensors(
        tmp_path / "c.safetensors",
        {
            "ones": ("F32", (200_000,), np.ones(200_000, "<f4").tobytes()),
            "empty": ("F32", (0, 4), b""),
        },
    )
    refs = open_checkpoint(str(p)).by_name
    ones = tensor_stats(refs["ones"])
    assert ones["std"] == 0.0 and ones["min"] == ones["max"] == 1.0 and ones["mean"] == 1.0
    empty = tensor_stats(refs["empty"])
    assert empty["numel"] == 0 and empty["mean"] is None


def test_drift_sums(tmp_path, rng):
    a = rng.standard_normal(200_000).astype(np.float32)
    b = (a + rng.standard_normal(200_000).astype(np.float32) * 0.1).astype(np.float32)
    pa = write_safetensors(tmp_path / "a.safetensors", {"t": ("F32", (200_000,), a.tobytes())})
    pb = write_safetensors(tmp_path / "b.safetensors", {"t": ("BF16", (200_000,), bf16_bytes(b))})
    diff_sq, ref_sq = tensor_drift(open_checkpoint(str(pa)).tensors[0], open_checkpoint(str(pb)).tensors[0], block=4096)
    b64 = bf16_values(b)
    assert ref_sq == pytest.approx(np.dot(b64, b64), rel=1e-9)
    d = a.astype(np.float64) - b64
    assert diff_sq == pytest.approx(np.dot(d, d), rel=1e-9)


# ------------------------------------------------------------------------------------------------ torch


def test_weights_only_refuses_code(tmp_path):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "pwned"

    class Payload:
        def __init__(self, target):
            self.target = target

        def __reduce__(self):
            return (open, (str(self.target), "w"))

    # Control: the payload is live — an ordinary unpickler runs it.
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control))).close()
    assert control.exists()

    evil_zip = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(3), "x": Payload(marker)}, evil_zip)
    evil_plain = tmp_path / "evil_plain.bin"
    evil_plain.write_bytes(pickle.dumps({"x": Payload(marker)}))
    for path in (evil_zip, evil_plain):
        with pytest.raises(CheckpointError, match="refused") as info:
            open_checkpoint(str(path))
        assert "\n" not in str(info.value)
    assert not marker.exists()


def test_import_does_not_pull_torch():
    code = (
        "import sys; import rlhf_tui.analysis.safetensors_io, rlhf_tui.analysis.checkpoint, "
        "rlhf_tui.analysis.rewards; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
