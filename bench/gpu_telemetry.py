"""GPU-board telemetry for benchmarks, from NVML: idle power, power and temperature sampled every
100 ms, energy from the board's total-energy counter, throttle reasons and memory peaks.

Everything NVML reports is the GPU board only: not the CPU, host memory, fans or power supply.
The energy counter and the power readings update every few tens of milliseconds (power is a ~1 s
average on Ampere and newer), so a measured span should last a second or more: raise the number
of images per run when it does not.
Without a driver (or without nvidia-ml-py) the monitor says it is unavailable and why, and the
caller leaves the GPU columns out instead of writing zeros.

    with GpuMonitor(device_index=0, idle_seconds=3.0) as gpu:   # idle baseline measured on entry
        if gpu.available:
            with gpu.window() as window:                       # one measured span
                run_the_work()
            summary = summarise_windows(gpu, [window], images_per_window=n)
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

ENERGY_SCOPE = "GPU board only (NVML)"
SAMPLE_INTERVAL_S = 0.1
DEFAULT_IDLE_SECONDS = 3.0
ENERGY_COUNTER = "nvmlDeviceGetTotalEnergyConsumption"
ENERGY_FROM_SAMPLES = "mean of 100 ms power samples x wall time"

#: NVML clock-event ("throttle") reason bits, named as in nvml.h (the same bits in both API generations).
THROTTLE_REASONS: dict[int, str] = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
    0x200: "board_limit",
    0x400: "reliability",
}
#: Reasons that mean the clocks were held down by power or heat, not by idling or a user setting.
SLOWDOWN_REASONS = frozenset({"sw_power_cap", "hw_slowdown", "sw_thermal_slowdown", "hw_thermal_slowdown",
                              "hw_power_brake_slowdown", "board_limit", "reliability"})

_MB = 1024 * 1024


def decode_throttle_reasons(mask: int) -> list[str]:
    """Names of the reason bits set in an NVML clock-event mask (unknown bits as hex)."""
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASONS)
    if unknown:
        names.append(f"unknown_0x{unknown:x}")
    return names


def nvml_index_for_cuda(cuda_index: int) -> int:
    """The NVML index of CUDA device `cuda_index`: CUDA numbers only the devices in
    CUDA_VISIBLE_DEVICES, NVML numbers all of them (UUID-style masks are not mapped)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    parts = [p.strip() for p in visible.split(",") if p.strip()]
    if parts and all(p.isdigit() for p in parts) and cuda_index < len(parts):
        return int(parts[cuda_index])
    return cuda_index


@dataclass
class GpuWindow:
    """What NVML saw during one measured span."""

    seconds: float = 0.0
    energy_mj: float | None = None
    energy_source: str = ""
    power_samples_w: list[float] = field(default_factory=list)
    temperatures_c: list[int] = field(default_factory=list)
    memory_used_peak_bytes: int | None = None
    throttle_mask: int = 0


class GpuMonitor:
    """NVML session for one GPU: device facts, idle baseline, and measured windows.

    `available` is False (and `reason` says why) when NVML cannot be used here; nothing is faked.
    """

    def __init__(self, device_index: int = 0, *, interval_s: float = SAMPLE_INTERVAL_S,
                 idle_seconds: float = DEFAULT_IDLE_SECONDS):
        self.cuda_index = device_index
        self.interval_s = interval_s
        self.idle_seconds = idle_seconds
        self.available = False
        self.reason: str | None = "not opened (use GpuMonitor as a context manager)"
        self.device: dict[str, Any] = {}
        self.idle_power_w: float | None = None
        self._nvml: Any = None
        self._handle: Any = None

    # ----- session -----
    def __enter__(self) -> "GpuMonitor":
        try:
            import pynvml  # nvidia-ml-py; optional, so imported only here
        except ImportError as e:
            self.reason = f"pynvml not importable ({e}); install nvidia-ml-py"
            return self
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            self.reason = f"NVML unavailable: {type(e).__name__}: {e}"
            return self
        try:
            nvml_index = nvml_index_for_cuda(self.cuda_index)
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index)
            self._nvml = pynvml
            self.device = self._device_facts(nvml_index)
        except pynvml.NVMLError as e:
            pynvml.nvmlShutdown()
            self.reason = f"NVML has no GPU {self.cuda_index}: {type(e).__name__}: {e}"
            return self
        self.available, self.reason = True, None
        if self.idle_seconds > 0:
            self.idle_power_w = self.measure_idle(self.idle_seconds)
        return self

    def __exit__(self, *exc) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()
            self._nvml = None

    def status(self) -> dict[str, Any]:
        """The top-level telemetry record of a bench result."""
        if not self.available:
            return {"available": False, "reason": self.reason}
        return {"available": True, "scope": ENERGY_SCOPE, "sample_interval_s": self.interval_s,
                "idle_seconds": self.idle_seconds, "idle_power_w": self.idle_power_w}

    def _device_facts(self, nvml_index: int) -> dict[str, Any]:
        nvml, handle = self._nvml, self._handle
        facts: dict[str, Any] = {"name": _text(nvml.nvmlDeviceGetName(handle)), "nvml_index": nvml_index}
        for key, read in (("compute_capability", lambda: "%d.%d" % nvml.nvmlDeviceGetCudaComputeCapability(handle)),
                          ("driver", lambda: _text(nvml.nvmlSystemGetDriverVersion())),
                          ("memory_total_mb", lambda: nvml.nvmlDeviceGetMemoryInfo(handle).total / _MB),
                          ("power_limit_w", lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1000.0)):
            try:
                facts[key] = read()
            except nvml.NVMLError:
                pass  # an older board or driver lacks this query: the fact is left out
        return facts

    # ----- measurements -----
    def measure_idle(self, seconds: float) -> float | None:
        """Median board power (W) over `seconds` of sampling while nothing of ours runs."""
        samples: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            power = self._power_w()
            if power is not None:
                samples.append(power)
            time.sleep(self.interval_s)
        return statistics.median(samples) if samples else None

    @contextmanager
    def window(self) -> Iterator[GpuWindow]:
        """Measure the enclosed span: energy-counter delta and a 100 ms sampling thread."""
        if self._nvml is None:
            raise RuntimeError(f"GPU telemetry unavailable: {self.reason or 'NVML session closed'}")
        result = GpuWindow()
        stop = threading.Event()
        sampler = threading.Thread(target=self._sample_until, args=(stop, result), name="iws-nvml-sampler", daemon=True)
        energy_start = self._energy_mj()
        start = time.perf_counter()
        sampler.start()
        try:
            yield result
        finally:
            result.seconds = time.perf_counter() - start
            energy_end = self._energy_mj()
            stop.set()
            sampler.join()
            self._sample_once(result)  # a span shorter than one interval still gets a sample
            if energy_start is not None and energy_end is not None:
                result.energy_mj, result.energy_source = float(energy_end - energy_start), ENERGY_COUNTER
            elif result.power_samples_w:
                mean_w = statistics.fmean(result.power_samples_w)
                result.energy_mj, result.energy_source = mean_w * result.seconds * 1000.0, ENERGY_FROM_SAMPLES

    def _sample_until(self, stop: threading.Event, into: GpuWindow) -> None:
        while True:
            self._sample_once(into)
            if stop.wait(self.interval_s):
                return

    def _sample_once(self, into: GpuWindow) -> None:
        nvml, handle = self._nvml, self._handle
        power = self._power_w()
        if power is not None:
            into.power_samples_w.append(power)
        try:
            into.temperatures_c.append(int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)))
        except nvml.NVMLError:
            pass
        try:
            used = int(nvml.nvmlDeviceGetMemoryInfo(handle).used)
            into.memory_used_peak_bytes = max(used, into.memory_used_peak_bytes or 0)
        except nvml.NVMLError:
            pass
        into.throttle_mask |= self._throttle_mask()

    def _power_w(self) -> float | None:
        # nvmlDeviceGetPowerUsage is a ~1 s moving average on Ampere and newer: fine for a mean,
        # too slow for short peaks; the energy figures come from the counter instead.
        try:
            return self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0
        except self._nvml.NVMLError:
            return None

    def _energy_mj(self) -> int | None:
        try:
            return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
        except self._nvml.NVMLError:  # boards older than Volta have no counter
            return None

    def _throttle_mask(self) -> int:
        nvml = self._nvml
        # The event-reasons call replaced the throttle-reasons one (same bits); use what exists.
        for name in ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons"):
            query = getattr(nvml, name, None)
            if query is None:
                continue
            try:
                return int(query(self._handle))
            except nvml.NVMLError:
                continue
        return 0


def summarise_windows(monitor: GpuMonitor, windows: Sequence[GpuWindow], images_per_window: int,
                      allocator_peak_bytes: int | None = None) -> dict[str, Any]:
    """The per-row GPU record: gross and net mJ/img (mean ± std over windows), power, temperature,
    throttle reasons and memory peaks, all labelled GPU board only."""
    record: dict[str, Any] = {"scope": ENERGY_SCOPE, "window_s": statistics.fmean(w.seconds for w in windows)}
    measured = [w for w in windows if w.energy_mj is not None]
    if measured:
        record["energy_source"] = measured[0].energy_source
        gross = [w.energy_mj / images_per_window for w in measured]
        record["energy_mj_per_img_gross"] = _mean_std(gross)
        if monitor.idle_power_w is not None:
            # idle W x s = J; x 1000 for mJ
            net = [(w.energy_mj - monitor.idle_power_w * w.seconds * 1000.0) / images_per_window for w in measured]
            record["energy_mj_per_img_net"] = _mean_std(net)
    record["idle_power_w"] = monitor.idle_power_w
    samples = [p for w in windows for p in w.power_samples_w]
    if samples:
        record["power_w"] = {"mean": statistics.fmean(samples), "max": max(samples), "samples": len(samples)}
    temperatures = [t for w in windows for t in w.temperatures_c]
    if temperatures:
        record["max_temperature_c"] = max(temperatures)
    mask = 0
    for w in windows:
        mask |= w.throttle_mask
    reasons = decode_throttle_reasons(mask)
    record["throttle_reasons"] = reasons
    record["throttled"] = any(r in SLOWDOWN_REASONS for r in reasons)
    peaks = [w.memory_used_peak_bytes for w in windows if w.memory_used_peak_bytes is not None]
    if peaks:
        # Device-wide: includes the CUDA context and any other process on the GPU.
        record["nvml_memory_used_peak_mb"] = max(peaks) / _MB
    if allocator_peak_bytes is not None:
        record["allocator_peak_mb"] = allocator_peak_bytes / _MB
    return record


# ----- the PyTorch caching allocator's peak, only where torch is already in use -----
def _torch_cuda():
    torch = sys.modules.get("torch")  # never import torch just to ask: ONNX Runtime runs do not need it
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch


def reset_allocator_peak(device: str) -> None:
    torch = _torch_cuda()
    if torch is not None:
        torch.cuda.reset_peak_memory_stats(device)


def allocator_peak_bytes(device: str) -> int | None:
    """torch.cuda.max_memory_allocated since the last reset, or None when torch CUDA is not in use."""
    torch = _torch_cuda()
    return int(torch.cuda.max_memory_allocated(device)) if torch is not None else None


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
