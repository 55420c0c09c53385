"""System samples: the NVML and torch.cuda paths with fakes, and a clean "no GPU" on this machine."""

from types import SimpleNamespace

from rlhf_tui.bridge.training.system import MB, SystemSampler, memory_metrics


class FakeNVML:
    def __init__(self, devices):
        self.devices = devices  # [(name, used_bytes, total_bytes, util)]

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetMemoryInfo(self, h):
        _, used, total, _ = self.devices[h]
        return SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self.devices[h][3], memory=0)

    def nvmlDeviceGetName(self, h):
        return self.devices[h][0].encode()


class FakeCuda:
    def __init__(self, allocated):
        self.allocated = allocated

    def is_initialized(self):
        return True

    def is_available(self):
        return True

    def device_count(self):
        return len(self.allocated)

    def memory_allocated(self, i):
        return self.allocated[i]

    def memory_reserved(self, i):
        return self.allocated[i] * 2

    def max_memory_allocated(self, i):
        return self.allocated[i] * 3

    def get_device_properties(self, i):
        return SimpleNamespace(total_memory=80_000 * MB)

    def get_device_name(self, i):
        return "Fake H100"


class FakeProcess:
    def memory_info(self):
        return SimpleNamespace(rss=512 * MB)


def test_nvml_and_torch_cuda_per_device():
    nvml = FakeNVML([("H100", 70_000 * MB, 80_000 * MB, 93), ("H100", 10_000 * MB, 80_000 * MB, 40)])
    torch = SimpleNamespace(cuda=FakeCuda([1000 * MB, 2000 * MB]))
    sample = SystemSampler(nvml=nvml, torch_module=torch, process=FakeProcess()).sample()
    assert sample["gpu_available"] and sample["rss_mb"] == 512
    g0, g1 = sample["gpus"]
    assert (g0["name"], g0["used_mb"], g0["total_mb"], g0["util"]) == ("H100", 70000, 80000, 93.0)
    assert g0["used_frac"] == 0.875 and g1["allocated_mb"] == 2000 and g1["peak_mb"] == 6000
    metrics = memory_metrics(sample)
    assert metrics == {"memory/rss_mb": 512.0, "memory/gpu_mb": 3000.0, "memory/gpu_frac": 0.875}


def test_torch_only_without_nvml():
    sample = SystemSampler(
        nvml=None, torch_module=SimpleNamespace(cuda=FakeCuda([4096 * MB])), process=FakeProcess()
    ).sample()
    (gpu,) = sample["gpus"]
    assert gpu["total_mb"] == 80000 and gpu["name"] == "Fake H100" and gpu["used_frac"] == round(8192 / 80000, 4)


def test_peak_used_is_kept_across_samples():
    nvml = FakeNVML([("A100", 50_000 * MB, 80_000 * MB, 10)])
    sampler = SystemSampler(nvml=nvml, torch_module=None, process=None)
    sampler.sample()
    nvml.devices[0] = ("A100", 20_000 * MB, 80_000 * MB, 10)
    assert sampler.sample()["gpus"][0]["peak_used_mb"] == 50000


def test_failing_sources_degrade_to_no_gpu():
    class Broken:
        def __getattr__(self, name):
            raise RuntimeError("driver gone")

    sample = SystemSampler(nvml=Broken(), torch_module=SimpleNamespace(cuda=Broken()), process=Broken()).sample()
    assert sample == {"rss_mb": None, "gpus": [], "gpu_available": False}
    assert memory_metrics(sample) == {}


def test_this_machine_reports_no_gpu_plainly():
    sample = SystemSampler().sample()
    assert sample["gpu_available"] is False and sample["gpus"] == [] and sample["rss_mb"] > 0


def test_rss_is_read_through_one_open_statm_descriptor_and_matches_psutil():
    import os

    import psutil

    from rlhf_tui.bridge.training import system

    sampler = SystemSampler(nvml=None, torch_module=None)
    reader = getattr(sampler._rss, "__self__", None)
    assert isinstance(reader, system.StatmRss)  # the default on Linux: no psutil open/read/close per sample
    fd = reader._fd
    before = reader.rss()
    assert abs(before - psutil.Process(os.getpid()).memory_info().rss) < 4 * MB
    block = bytearray(64 * MB)
    block[::4096] = b"\1" * len(block[::4096])  # touch every page: resident now
    after = sampler.sample()["rss_mb"]
    assert after * MB >= before + 60 * MB and reader._fd == fd  # fresh figures, same descriptor
    del block


def test_the_recorder_samples_the_system_at_most_once_a_second(tmp_path, monkeypatch):
    from rlhf_tui.bridge.training import recorder as recorder_module
    from rlhf_tui.bridge.training.recorder import Recorder
    from rlhf_tui.bridge.wire import events, protocol

    clock = SimpleNamespace(t=0.0)
    monkeypatch.setattr(
        recorder_module, "time", SimpleNamespace(monotonic=lambda: 100.0 + clock.t, time=lambda: clock.t)
    )
    cb = SimpleNamespace(log_dir=None, run_id="r", rank=0, rank_info={"rank": 0}, detect_anomalies=False, meta={})
    rec = Recorder(cb)
    rec.sampler = SystemSampler(nvml=None, torch_module=None, process=FakeProcess())
    kinds = []
    for step in range(1, 61):  # 3 s of 50 ms steps
        kinds += [m.kind for m in rec(events.LoggedStep(step, float(step), {"loss": 0.5}))]
        clock.t += 0.05
    assert kinds.count(protocol.SYSTEM) == 3 and kinds.count(protocol.STEP) == 60


def test_a_devices_name_is_asked_of_nvml_once():
    class CountingNVML(FakeNVML):
        names = 0

        def nvmlDeviceGetName(self, h):
            CountingNVML.names += 1
            return super().nvmlDeviceGetName(h)

    sampler = SystemSampler(nvml=CountingNVML([("H200", MB, 2 * MB, 5)] * 2), torch_module=None, process=None)
    samples = [sampler.sample() for _ in range(5)]
    assert CountingNVML.names == 2 and all([g["name"] for g in s["gpus"]] == ["H200", "H200"] for s in samples)
