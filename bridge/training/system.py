"""System samples: process RSS, and per CUDA device memory and utilisation when there is a GPU.

Sources are injected so the GPU paths can be unit-tested with fakes: NVML (the `pynvml` module of
nvidia-ml-py) for used/total/utilisation, and torch.cuda (only if torch is already imported and CUDA already
initialised by training: we never create a CUDA context or synchronise) for allocated/reserved/peak.
On a machine without a GPU the sample says so plainly: `gpus == []`, `gpu_available == False`.
"""

from __future__ import annotations

import os
import sys
from typing import Any

MB = 1024 * 1024


class StatmRss:
    """The process's resident set size from `/proc/<pid>/statm` through one descriptor kept open: one pread per
    sample (psutil opens, reads and closes the file, ~10 µs against <1 µs). Same figure: resident pages × page
    size. Reopened in a forked child (the descriptor would read the parent)."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._pid = -1
        self._fd = -1
        self._open()

    def _open(self) -> None:
        self.close()
        self._pid = os.getpid()
        self._fd = os.open(f"/proc/{self._pid}/statm", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def rss(self) -> int:
        if os.getpid() != self._pid:
            self._open()
        return int(os.pread(self._fd, 128, 0).split()[1]) * self._page

    def close(self) -> None:
        if self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = -1

    def __del__(self) -> None:
        self.close()


def _rss_source(process: Any):
    """A callable giving RSS bytes: `process.memory_info().rss` when given one (tests, other platforms), else the
    statm reader where there is /proc, else psutil; None when neither works."""
    if process != "auto":
        return None if process is None else (lambda: process.memory_info().rss)
    try:
        return StatmRss().rss
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        proc = psutil.Process(os.getpid())
        return lambda: proc.memory_info().rss
    except Exception:
        return None


def _load_nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, no device: all mean "no NVML"
        return None


class SystemSampler:
    """Collects one sample dict per call; every failure degrades to 'not available', never raises."""

    def __init__(self, nvml: Any = "auto", torch_module: Any = "auto", process: Any = "auto"):
        self._nvml = _load_nvml() if nvml == "auto" else nvml
        self._torch = torch_module
        self._rss = _rss_source(process)
        self._handles: list | None = None
        self._peak_used: dict[int, float] = {}
        self._names: dict[int, str] = {}

    def _torch_cuda(self):
        torch = sys.modules.get("torch") if self._torch == "auto" else self._torch
        if torch is None:
            return None
        try:
            cuda = torch.cuda
            if self._torch == "auto" and not cuda.is_initialized():
                return None  # never initialise CUDA from the monitoring thread
            return cuda if cuda.is_available() else None
        except Exception:
            return None

    def _nvml_handles(self) -> list:
        if self._nvml is None:
            return []
        if self._handles is None:
            try:
                count = self._nvml.nvmlDeviceGetCount()
                self._handles = [self._nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            except Exception:
                self._handles = []
        return self._handles

    def sample(self) -> dict:
        out: dict[str, Any] = {"rss_mb": None, "gpus": [], "gpu_available": False}
        if self._rss is not None:
            try:
                out["rss_mb"] = round(self._rss() / MB, 2)
            except Exception:
                pass
        devices: dict[int, dict] = {}
        for index, handle in enumerate(self._nvml_handles()):
            dev: dict[str, Any] = {"index": index}
            try:
                mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                dev["used_mb"] = round(mem.used / MB, 1)
                dev["total_mb"] = round(mem.total / MB, 1)
            except Exception:
                pass
            try:
                dev["util"] = float(self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
            except Exception:
                pass
            name = self._names.get(index)
            if name is None:  # a device's name does not change: asked once (each NVML call is a driver call)
                try:
                    raw = self._nvml.nvmlDeviceGetName(handle)
                    name = self._names[index] = raw.decode() if isinstance(raw, bytes) else str(raw)
                except Exception:
                    pass
            if name is not None:
                dev["name"] = name
            devices[index] = dev
        cuda = self._torch_cuda()
        if cuda is not None:
            try:
                for index in range(cuda.device_count()):
                    dev = devices.setdefault(index, {"index": index})
                    dev["allocated_mb"] = round(cuda.memory_allocated(index) / MB, 1)
                    dev["reserved_mb"] = round(cuda.memory_reserved(index) / MB, 1)
                    dev["peak_mb"] = round(cuda.max_memory_allocated(index) / MB, 1)
                    if "total_mb" not in dev:
                        dev["total_mb"] = round(cuda.get_device_properties(index).total_memory / MB, 1)
                        dev.setdefault("name", cuda.get_device_name(index))
            except Exception:
                pass
        for index, dev in devices.items():
            used = dev.get("used_mb", dev.get("reserved_mb"))
            if used is not None:
                self._peak_used[index] = max(self._peak_used.get(index, 0.0), used)
                dev["peak_used_mb"] = self._peak_used[index]
            if used is not None and dev.get("total_mb"):
                dev["used_frac"] = round(used / dev["total_mb"], 4)
        out["gpus"] = [devices[i] for i in sorted(devices)]
        out["gpu_available"] = bool(out["gpus"])
        return out


def memory_metrics(sample: dict) -> dict[str, float]:
    """The memory columns a step row carries (see analysis detectors): RSS, GPU MB, worst device fraction."""
    metrics: dict[str, float] = {}
    if sample.get("rss_mb") is not None:
        metrics["memory/rss_mb"] = float(sample["rss_mb"])
    gpus = sample.get("gpus") or []
    used = [g.get("allocated_mb", g.get("used_mb")) for g in gpus]
    used = [u for u in used if u is not None]
    if used:
        metrics["memory/gpu_mb"] = float(sum(used))
    fracs = [g["used_frac"] for g in gpus if g.get("used_frac") is not None]
    if fracs:
        metrics["memory/gpu_frac"] = float(max(fracs))
    return metrics
