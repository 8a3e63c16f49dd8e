"""Inference backends, one module each, created by name (imported lazily)."""

from __future__ import annotations

from importlib import import_module

from iws_engine.backends.base import Backend, BackendError

#: name → "module:Class"; modules are imported only when their backend is asked for.
BACKENDS = {
    "torch": "iws_engine.backends.torch_eager:TorchBackend",
    "onnxruntime": "iws_engine.backends.onnxruntime:OnnxRuntimeBackend",
    "openvino": "iws_engine.backends.openvino:OpenVinoBackend",
    "inductor": "iws_engine.backends.inductor:InductorBackend",
    "tensorrt": "iws_engine.backends.tensorrt:TensorRTBackend",
    "torch-tensorrt": "iws_engine.backends.torch_tensorrt:TorchTensorRTBackend",
}


def create(name: str, **options) -> Backend:
    try:
        target = BACKENDS[name]
    except KeyError:
        raise BackendError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}") from None
    module, cls = target.split(":")
    return getattr(import_module(module), cls)(**options)


__all__ = ["BACKENDS", "Backend", "BackendError", "create"]
