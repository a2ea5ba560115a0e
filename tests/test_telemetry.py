"""GPU telemetry: nothing (silently) without NVML, the right keys and units with a fake NVML."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from gad_megatron.telemetry import GIB, gpu_metrics


def test_no_nvml_gives_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails as on a CPU machine without the package
    assert gpu_metrics() == {}


def fake_nvml(count: int, fail_init: bool = False, power_supported: bool = True) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    def init() -> None:
        if fail_init:
            raise NVMLError("driver not loaded")

    def power(handle: int) -> int:
        if not power_supported:
            raise NVMLError("not supported")
        return 350_500 + handle  # milliwatts

    nvml.NVMLError = NVMLError
    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: count
    nvml.nvmlDeviceGetHandleByIndex = lambda i: i
    nvml.nvmlDeviceGetUtilizationRates = lambda h: SimpleNamespace(gpu=90 + h, memory=40)
    nvml.nvmlDeviceGetMemoryInfo = lambda h: SimpleNamespace(used=(10 + h) * GIB, total=80 * GIB, free=0)
    nvml.nvmlDeviceGetPowerUsage = power
    return nvml


def test_fake_nvml_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(2))
    metrics = gpu_metrics()
    assert metrics == {
        "gpu/0/utilization_pct": 90.0, "gpu/0/memory_used_gib": 10.0, "gpu/0/memory_total_gib": 80.0, "gpu/0/power_w": 350.5,
        "gpu/1/utilization_pct": 91.0, "gpu/1/memory_used_gib": 11.0, "gpu/1/memory_total_gib": 80.0, "gpu/1/power_w": 350.501,
    }  # fmt: skip
    assert all(isinstance(v, float) for v in metrics.values())


def test_no_driver_or_no_power(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(1, fail_init=True))
    assert gpu_metrics() == {}
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(0))
    assert gpu_metrics() == {}
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(1, power_supported=False))
    assert set(gpu_metrics()) == {"gpu/0/utilization_pct", "gpu/0/memory_used_gib", "gpu/0/memory_total_gib"}


def test_real_environment_without_gpus() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has GPUs")
    assert gpu_metrics() == {}
