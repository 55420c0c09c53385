"""Checkpoint analysis throughput and memory vs a plain numpy read-and-reduce of the same safetensors file.

Writes a synthetic ≥ 1 GB safetensors file (fp32 + bf16, many tensors, largest 256 MB) into a temp dir, then runs
the baseline (np.memmap per tensor, bf16 widened with a shift, sum + dot) and CheckpointAnalyzer alternately,
3 repetitions each in one process, from the page cache. Peak RSS of each is measured in a child process.
Goal (docs/checkpoint-health.md): faster than the baseline over the whole file, with a peak RSS growth below the
largest tensor (memory stays near one window); the script exits 1 when either is missed.

    python benchmarks/checkpoint_throughput.py [--dir /tmp] [--reps 3] [--layers 14]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

HIDDEN = 1024
VOCAB = 65536


def layout(layers: int) -> list[tuple[str, str, tuple[int, ...]]]:
    tensors = [("model.embed_tokens.weight", "F32", (VOCAB, HIDDEN))]  # 256 MB: the largest tensor
    for i in range(layers):
        p = f"model.layers.{i}"
        tensors += [
            (f"{p}.input_layernorm.weight", "F32", (HIDDEN,)),
            (f"{p}.post_attention_layernorm.weight", "F32", (HIDDEN,)),
        ]
        tensors += [(f"{p}.self_attn.{n}_proj.weight", "F32", (HIDDEN, HIDDEN)) for n in "qkvo"]
        tensors += [
            (f"{p}.mlp.gate_proj.weight", "F32", (4 * HIDDEN, HIDDEN)),
            (f"{p}.mlp.up_proj.weight", "BF16", (4 * HIDDEN, HIDDEN)),
            (f"{p}.mlp.down_proj.weight", "BF16", (HIDDEN, 4 * HIDDEN)),
        ]
    tensors += [("model.norm.weight", "F32", (HIDDEN,)), ("lm_head.weight", "BF16", (VOCAB, HIDDEN))]
    return tensors


def write_checkpoint(path: str, tensors: list[tuple[str, str, tuple[int, ...]]]) -> int:
    header, offset = {}, 0
    for name, dtype, shape in tensors:
        nbytes = int(np.prod(shape)) * (4 if dtype == "F32" else 2)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(0)
    chunk = 1 << 22
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, dtype, shape in tensors:
            numel = int(np.prod(shape))
            for start in range(0, numel, chunk):
                n = min(chunk, numel - start)
                if name.endswith("norm.weight"):
                    x = (1.0 + 0.05 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)
                else:
                    x = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
                if dtype == "BF16":
                    f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
                else:
                    f.write(x.tobytes())
    return os.path.getsize(path)


def baseline(path: str) -> dict[str, float]:
    """Plain numpy: memmap each tensor, widen bf16, sum and sum of squares. Returns seconds per dtype."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    times = {"F32": 0.0, "BF16": 0.0}
    for meta in header.values():
        t0 = time.perf_counter()
        begin, end = meta["data_offsets"]
        raw_dtype = np.float32 if meta["dtype"] == "F32" else np.uint16
        x = np.memmap(
            path,
            dtype=raw_dtype,
            mode="r",
            offset=8 + n + begin,
            shape=((end - begin) // np.dtype(raw_dtype).itemsize,),
        )
        if meta["dtype"] == "BF16":
            x = (x.astype(np.uint32) << 16).view(np.float32)
        float(x.sum())
        float(np.dot(x, x))
        del x
        times[meta["dtype"]] += time.perf_counter() - t0
    return times


def ours(path: str) -> dict:
    from rlhf_tui.analysis.checkpoint import CheckpointAnalyzer

    return CheckpointAnalyzer().analyze_checkpoint_strict(path)


def ours_by_dtype(path: str) -> dict[str, float]:
    """Our reader's per-tensor statistics, timed per dtype (the analyzer adds only findings on top)."""
    from rlhf_tui.analysis.safetensors_io import open_checkpoint, tensor_stats

    times = {"F32": 0.0, "BF16": 0.0}
    for ref in open_checkpoint(path).tensors:
        t0 = time.perf_counter()
        tensor_stats(ref)
        times[ref.dtype] += time.perf_counter() - t0
    return times


def peak_rss_child(which: str, path: str) -> float:
    """Peak RSS growth (MB) of a fresh process running one analysis, above its RSS after imports.

    Uses the kernel's high-water mark (VmHWM), reset after imports through /proc/self/clear_refs; a forked
    child would otherwise inherit the parent's RSS in ru_maxrss.
    """
    code = f"""
import resource, sys
import checkpoint_throughput as bench
import rlhf_tui.analysis.checkpoint  # imports first: they are not the analysis
def status(key):
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) for l in f if l.startswith(key))
try:
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
except OSError:
    pass
before = status('VmRSS')
bench.{which}({path!r})
print((status('VmHWM') - before) / 1024)
"""
    # The child imports this file as a module: its folder goes on the child's PYTHONPATH.
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="where to write the temporary checkpoint")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=14)
    parser.add_argument("--keep", action="store_true", help="keep the file")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="rlhf-tui-bench-", dir=args.dir)
    try:
        path = os.path.join(tmp, "model.safetensors")
        tensors = layout(args.layers)
        t0 = time.perf_counter()
        size = write_checkpoint(path, tensors)
        sizes = {
            d: sum(int(np.prod(s)) * (4 if d == "F32" else 2) for _, dt, s in tensors if dt == d)
            for d in ("F32", "BF16")
        }
        largest = max(int(np.prod(s)) * (4 if d == "F32" else 2) for _, d, s in tensors)
        print(
            f"file: {size / 1e9:.2f} GB, {len(tensors)} tensors (F32 {sizes['F32'] / 1e9:.2f} GB, "
            f"BF16 {sizes['BF16'] / 1e9:.2f} GB), largest tensor {largest / 2**20:.0f} MB, "
            f"written in {time.perf_counter() - t0:.1f}s; cpu cores: {os.cpu_count()}"
        )

        ours(path)  # warm imports and the page cache once, for both sides
        base_total, our_total = [], []
        base_dtype, our_dtype = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            base_dtype.append(baseline(path))
            base_total.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            result = ours(path)
            our_total.append(time.perf_counter() - t0)
            our_dtype.append(ours_by_dtype(path))
        assert result["health_score"] >= 0.9, result["issues"]

        def gbps(nbytes: float, seconds: list[float]) -> float:
            return nbytes / 1e9 / statistics.median(seconds)

        rows = []
        for label, total, per in (
            ("numpy baseline (memmap, sum, dot)", base_total, base_dtype),
            ("CheckpointAnalyzer.analyze_checkpoint", our_total, our_dtype),
        ):
            rows.append(
                (
                    label,
                    gbps(size, total),
                    gbps(sizes["F32"], [p["F32"] for p in per]),
                    gbps(sizes["BF16"], [p["BF16"] for p in per]),
                )
            )
        rss_base = peak_rss_child("baseline", path)
        rss_ours = peak_rss_child("ours", path)
        print()
        print(f"{'':40s} {'all GB/s':>9} {'F32 GB/s':>9} {'BF16 GB/s':>10} {'peak RSS +MB':>13}")
        for (label, a, f32, b16), rss in zip(rows, (rss_base, rss_ours)):
            print(f"{label:40s} {a:9.2f} {f32:9.2f} {b16:10.2f} {rss:13.0f}")
        ratio = rows[1][1] / rows[0][1]
        print(
            f"{'ratio ours / baseline':40s} {ratio:9.2f} {rows[1][2] / rows[0][2]:9.2f} "
            f"{rows[1][3] / rows[0][3]:10.2f} {rss_ours / max(rss_base, 1e-9):13.2f}"
        )
        print(
            f"\nmedian of {args.reps} alternating runs; our peak RSS growth is {rss_ours / (largest / 2**20):.2f}× "
            f"the largest tensor ({largest / 2**20:.0f} MB). F32/BF16 columns time per-tensor statistics only."
        )
        missed = [
            what
            for what, ok in (
                (f"throughput ratio {ratio:.2f} < 1", ratio >= 1.0),
                (f"peak RSS growth {rss_ours:.0f} MB >= largest tensor", rss_ours < largest / 2**20),
            )
            if not ok
        ]
        print("goal met" if not missed else "GOAL MISSED: " + "; ".join(missed))
        return 1 if missed else 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
