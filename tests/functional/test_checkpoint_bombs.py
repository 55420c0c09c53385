"""Checkpoint bombs: tiny files that ask the analyser for gigabytes or minutes. `rlhf-tui analyze-checkpoint BOMB`
must exit 2 with one line on stderr naming the cause, within 10 s and 500 MB (max RSS of the child)."""

from __future__ import annotations

import os
import resource
import struct
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

WALL_S = 10.0
RSS_MB = 500
# A safety net, not the measure: the old code would have asked for 14.4 GB on a shared machine.
AS_LIMIT = 3 << 30


def _safetensors(path, header: bytes, data: bytes = b"") -> str:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)
    return str(path)


def stride0(tmp_path):
    """1.5 KB: one float expanded to 60,000 × 60,000 (14.4 GB if copied)."""
    path = tmp_path / "stride0.pt"
    torch.save({"w": torch.zeros(1).expand(60_000, 60_000)}, path)
    return str(path)


def overlapping(tmp_path):
    """2,000 views base[i:] of one 2,000-float storage: 2 million elements from 8 KB."""
    base = torch.zeros(2_000)
    path = tmp_path / "overlap.pt"
    torch.save({f"v{i}": base[i:] for i in range(2_000)}, path)
    return str(path)


def shared_million(tmp_path):
    """One tensor referenced 10^6 times through a shared list: 5 KB, a million names."""
    row = [torch.zeros(1)] * 1_000
    path = tmp_path / "dag.pt"
    torch.save([row] * 1_000, path)
    return str(path)


def many_storages(tmp_path):
    """40,000 one-float tensors, each its own storage (past the 32,768 limit)."""
    path = tmp_path / "many.pt"
    torch.save({f"t{i}": torch.zeros(1) for i in range(40_000)}, path)
    return str(path)


def million_tensors(tmp_path):
    """10^6 one-float tensors in a safetensors file (was 159 s and 4.3 GB)."""
    entries = ",".join(
        f'"t{i}":{{"dtype":"F32","shape":[1],"data_offsets":[{4 * i},{4 * i + 4}]}}' for i in range(10**6)
    )
    return _safetensors(tmp_path / "million.safetensors", ("{" + entries + "}").encode(), bytes(4 * 10**6))


def many_values(tmp_path):
    """One tensor entry carrying 10^7 empty lists: a 30 MB header that json.loads makes 600+ MB of."""
    header = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":[' + b"[]," * 10**7 + b"[]]}}"
    return _safetensors(tmp_path / "values.safetensors", header, bytes(4))


def deep_header(tmp_path):
    """100,000 nested objects: past the JSON parser's recursion limit."""
    return _safetensors(tmp_path / "deep.safetensors", b'{"a":' * 100_000 + b"1" + b"}" * 100_000)


BOMBS = {
    "stride-0": (stride0, "stride-0"),
    "overlapping-views": (overlapping, "overlaps another tensor's storage"),
    "one-tensor-a-million-times": (shared_million, "too many tensors"),
    "many-storages": (many_storages, "too many tensors"),
    "a-million-tiny-tensors": (million_tensors, "too many tensors"),
    "a-million-values": (many_values, "JSON values"),
    "deep-header": (deep_header, "nested too deeply"),
}


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))


# Runs the command as its only child and prints that child's max RSS (KB): the measure is of the CLI alone.
_MEASURE = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(rc)\n"
)


def run_measured(*args):
    """The console script in a child: (exit code, stderr, wall seconds, max RSS in MB)."""
    exe = os.path.join(os.path.dirname(sys.executable), "rlhf-tui")
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, exe, *args],
        capture_output=True,
        text=True,
        timeout=WALL_S * 3,
        env={**os.environ, "RLHF_TUI_DEBUG": ""},
        preexec_fn=_limit_memory,
    )
    wall = time.monotonic() - started
    return proc.returncode, proc.stderr, wall, int(proc.stdout.split()[-1]) / 1024


@pytest.mark.parametrize("kind", list(BOMBS))
def test_checkpoint_bomb_exits_2_with_one_line_in_bounds(kind, tmp_path):
    make, cause = BOMBS[kind]
    path = make(tmp_path)
    assert os.path.getsize(path) < 100 << 20
    rc, err, wall, rss_mb = run_measured("analyze-checkpoint", path)
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert cause in lines[0], lines[0]
    assert wall < WALL_S, f"{wall:.1f} s"
    assert rss_mb < RSS_MB, f"{rss_mb:.0f} MB"


def test_tied_weights_are_read_once_and_analysed(tmp_path):
    """The real case behind shared storages: tied weights (one view, two names) analyse as before, once."""
    emb = torch.randn(64, 16)
    path = tmp_path / "pytorch_model.bin"
    torch.save({"wte.weight": emb, "lm_head.weight": emb, "ln.bias": torch.zeros(16)}, path)
    from rlhf_tui.analysis.checkpoint import CheckpointAnalyzer

    result = CheckpointAnalyzer().analyze_checkpoint_strict(str(path))
    stats = result["weight_stats"]
    assert result["num_tensors"] == 3
    assert stats["wte.weight"]["rms"] == pytest.approx(float(emb.pow(2).mean().sqrt()), rel=1e-6)
    assert stats["lm_head.weight"] == stats["wte.weight"] | {"kind": stats["lm_head.weight"]["kind"]}


def test_a_transposed_view_still_analyses(tmp_path):
    """A permuted (non-contiguous) but non-overlapping view is a real layout: read, not refused."""
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    path = tmp_path / "t.pt"
    torch.save({"w": w.t()}, path)
    from rlhf_tui.analysis.checkpoint import CheckpointAnalyzer

    stats = CheckpointAnalyzer().analyze_checkpoint_strict(str(path))["weight_stats"]["w"]
    assert stats["shape"] == [4, 3] and stats["max"] == 11.0 and stats["mean"] == pytest.approx(5.5)


def test_the_limit_grows_with_real_bytes():
    from rlhf_tui.analysis.safetensors_io_limits import MAX_TENSORS, tensor_limit

    assert tensor_limit(0) == MAX_TENSORS == 32_768
    assert tensor_limit(470 * 10**9) > 37_000  # a 235B MoE in bf16
    assert tensor_limit(64 << 30) == 65_536
