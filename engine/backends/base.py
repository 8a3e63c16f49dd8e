"""The one small protocol every inference backend implements.

A backend is loaded from a model (weights or a compiled artefact), warmed up, asked to infer
batches of preprocessed input (N×C×H×W float32, host or device memory) into a preallocated
output, and closed. The output holds one value per image (SAR_CNN's logit: shape (N,)) or a
vector per image (EVA02's 1,000 softmax features: (N, 1000)); it is a NumPy array, or a torch
tensor (on any device) so that results can stay on the GPU for the next stage. Backends only fill in the `_impl` methods; argument checking,
timing-free warm-up and the context manager live here once.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

import numpy as np


class BackendError(RuntimeError):
    """A backend cannot be created or run here (missing library, no GPU, bad artefact)."""


def cpu_cores() -> int:
    """Cores this process may use (respects affinity/cgroup masks, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Backend(ABC):
    #: registry name, e.g. "torch", "onnxruntime"
    name: str = ""
    #: the element type of the batches this backend takes as they are ("float32", or "bfloat16" / "float16" where
    #: it computes in that type anyway): the CPU loader writes its batches in it. Every backend also takes float32.
    input_dtype: str = "float32"

    def __init__(self, precision: str = "fp32", device: str = "cpu"):
        self.precision = precision
        self.device = device
        self.input_shape: tuple[int, ...] = ()
        self.output_shape: tuple[int, ...] = ()  # per image: () for one logit, (1000,) for EVA02 features
        self._loaded = False

    # ----- protocol -----
    def load(self, model: Any, input_shape: tuple[int, ...], output_shape: tuple[int, ...] = ()) -> "Backend":
        """Load `model` (weights or an artefact path) for inputs of shape (C, H, W) and outputs of
        `output_shape` per image."""
        self.input_shape = tuple(input_shape)
        self.output_shape = tuple(output_shape)
        self._load_impl(model)
        self._loaded = True
        return self

    def warmup(self, batch_size: int, iterations: int = 2) -> None:
        x = np.zeros((batch_size, *self.input_shape), dtype=np.float32)
        out = np.empty((batch_size, *self.output_shape), dtype=np.float32)
        for _ in range(iterations):
            self.infer(x, out)

    def infer(self, batch, out=None):
        """Outputs for `batch` (N, C, H, W) float32, written into `out` (N, *output_shape) when given:
        a NumPy array or a float32 torch tensor (host or device). Returns `out`."""
        if not self._loaded:
            raise BackendError(f"{self.name}: infer() before load()")
        shape = tuple(batch.shape)
        if shape[1:] != self.input_shape:
            raise ValueError(f"{self.name}: input shape {shape[1:]} != model input {self.input_shape}")
        expected = (shape[0], *self.output_shape)
        if out is None:
            out = np.empty(expected, dtype=np.float32)
        elif tuple(out.shape) != expected:
            raise ValueError(f"{self.name}: output buffer shape {tuple(out.shape)} != {expected}")
        if shape[0] == 0:
            return out
        self._infer_impl(batch, out)
        return out

    def close(self) -> None:
        self._close_impl()
        self._loaded = False

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "precision": self.precision, "device": self.device, **self.versions()}

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- for implementations -----
    @abstractmethod
    def _load_impl(self, model: Any) -> None: ...

    @abstractmethod
    def _infer_impl(self, batch, out) -> None: ...

    def _close_impl(self) -> None:
        pass

    def versions(self) -> dict[str, str]:
        return {}


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Probabilities from logits, stable for large |logit|."""
    z = np.asarray(logits, dtype=np.float64)
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)
