"""Loaders turn PNG inputs into batches of model input: `loader.batches(items)` -> `Batch`es.

- "cpu":  decode + reference preprocessing in a thread pool (loaders/cpu.py); runs anywhere.
- "gpu":  parse on the host, inflate (nvCOMP), unfilter, resize and normalise on the device
          (loaders/gpu.py); bit for bit the CPU result; per-image CPU fallback.
- "dali": NVIDIA DALI's decoder and resize (loaders/dali.py): a throughput baseline only,
          it does not follow the Julia preprocessing spec.
Only the chosen loader's module is imported, so CPU-only machines never import CuPy or DALI.
"""

from __future__ import annotations

import importlib
from typing import Any

LOADERS = {
    "cpu": "iws_engine.loaders.cpu:CpuLoader",
    "gpu": "iws_engine.loaders.gpu:GpuLoader",
    "dali": "iws_engine.loaders.dali:DaliLoader",
}


def gpu_loader_available() -> bool:
    """True when a CUDA device is visible to torch and CuPy and nvCOMP import."""
    try:
        import cupy  # noqa: F401
        from nvidia import nvcomp  # noqa: F401
    except ImportError:
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def default_loader_name() -> str:
    """"gpu" where the GPU loader can run, else "cpu"."""
    return "gpu" if gpu_loader_available() else "cpu"


def create_loader(name: str | None, spec, *, batch_size: int = 64, workers: int | None = None,
                  max_pixels: int | None = None, device: int = 0, host_output: bool = False, **options: Any):
    """A loader by name (None: `default_loader_name()`).

    `device` (CUDA index) and `host_output` (copy inputs to NumPy, for a backend on the CPU)
    only concern the device loaders; `options` go to the loader's constructor as they are.
    """
    name = default_loader_name() if name is None else name
    if name not in LOADERS:
        raise ValueError(f"unknown loader {name!r}; choose from {', '.join(LOADERS)}")
    module_name, class_name = LOADERS[name].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    kwargs: dict[str, Any] = {"batch_size": batch_size, "workers": workers, **options}
    if max_pixels is not None:
        kwargs["max_pixels"] = max_pixels
    if name != "cpu":
        kwargs.update(device=device, host_output=host_output)
    return cls(spec, **kwargs)
