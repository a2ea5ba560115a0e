"""GPU telemetry for the training logs: utilisation, memory and power of every GPU, from NVML.

``pynvml`` comes from the ``nvidia-ml-py`` package (the ``gpu`` extra) and is imported lazily:
on a machine without it, without the NVIDIA driver or without GPUs, :func:`gpu_metrics`
returns ``{}`` silently, so the trainer can log it unconditionally.
"""

from __future__ import annotations

from typing import Any

GIB = 1024**3


def _device_metrics(nvml: Any, index: int) -> dict[str, float]:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    out = {
        f"gpu/{index}/utilization_pct": float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu),
        f"gpu/{index}/memory_used_gib": memory.used / GIB,
        f"gpu/{index}/memory_total_gib": memory.total / GIB,
    }
    try:  # some boards (and MIG slices) do not report power
        out[f"gpu/{index}/power_w"] = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0  # milliwatts
    except nvml.NVMLError:
        pass
    return out


def gpu_metrics() -> dict[str, float]:
    """``gpu/<index>/{utilization_pct, memory_used_gib, memory_total_gib, power_w}`` for every GPU
    this process can see through NVML (NVML indices: CUDA_VISIBLE_DEVICES does not renumber them)."""
    try:
        import pynvml as nvml
    except ImportError:
        return {}
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:  # no driver, or a container without the NVIDIA runtime
        return {}
    try:
        metrics: dict[str, float] = {}
        for index in range(nvml.nvmlDeviceGetCount()):
            metrics.update(_device_metrics(nvml, index))
        return metrics
    except nvml.NVMLError:  # a GPU that fell off the bus must not stop training
        return {}
    finally:
        nvml.nvmlShutdown()
