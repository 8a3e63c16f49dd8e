"""ONNX Runtime: the fastest CPU backend (CPU execution provider, intra-op threads = cores).

CUDA/TensorRT execution providers are used when an onnxruntime-gpu install offers them and
`device="cuda"` is asked for. fp32 runs the model as exported; int8 runs an INT8 QDQ graph made
and parity-gated by `iws-engine build --backend onnxruntime --precision int8` (export/quantize_int8.py),
which ORT_ENABLE_ALL fuses into QLinearConv/QGemm kernels (VNNI/AMX where the CPU has them).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from iws_engine.backends.base import Backend, BackendError, cpu_cores

PRECISIONS = ("fp32", "int8")


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"

    def __init__(self, precision: str = "fp32", device: str = "cpu", threads: int | None = None):
        if precision not in PRECISIONS:
            raise BackendError(f"onnxruntime backend: precision {precision!r} is not supported "
                               f"({', '.join(PRECISIONS)})")
        super().__init__(precision, device)
        self.threads = threads

    def _load_impl(self, model) -> None:
        import onnxruntime as ort

        from iws_engine.export.onnx import onnx_session_source

        if self.precision == "int8":
            require_int8_graph(model, self.name)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads or cpu_cores()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # ORT's pool threads spin after each operator by default. The CPU loader's decode threads share these
        # cores, and a spinning thread takes their time (and stalls ORT's own barrier when it is descheduled);
        # the model's operators are long enough (ms per batch) that sleeping between them costs nothing.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        if self.device.startswith("cuda"):
            wanted = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in available]
            if not wanted:
                raise BackendError(f"onnxruntime backend: no CUDA execution provider in this install ({available})")
            providers = [*wanted, "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        with onnx_session_source(model, self.input_shape) as source:  # a path (external data) or bytes
            self._session = ort.InferenceSession(source, sess_options=opts, providers=providers)
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        self.providers = self._session.get_providers()

    def _infer_impl(self, batch, out) -> None:
        x = np.ascontiguousarray(to_host(batch), dtype=np.float32)
        (y,) = self._session.run([self._output], {self._input: x})
        if isinstance(out, np.ndarray):
            out[...] = y.reshape(out.shape)
        else:  # a torch tensor, possibly on a GPU
            import torch

            out.copy_(torch.from_numpy(y.reshape(tuple(out.shape))))

    def _close_impl(self) -> None:
        self._session = None

    def versions(self) -> dict[str, str]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__}


def require_int8_graph(model, backend: str) -> None:
    """int8 runs only a quantized graph: quantizing here would skip calibration and the parity gate.
    (The openvino backend runs the same graphs and shares this check.)"""
    if not (isinstance(model, (str, Path)) and str(model).endswith(".onnx")):
        raise BackendError(f"{backend} int8 runs a quantized, parity-gated graph: build it with "
                           f"`iws-engine build --backend {backend} --precision int8 [--calib DIR]` and pass "
                           "--artifacts (classify --precision int8 builds it on first use)")
    from iws_engine.export.quantize_int8 import is_int8_graph

    if not is_int8_graph(model):
        raise BackendError(f"{backend} int8: {model} holds no INT8 Q/DQ nodes")


def to_host(batch):
    """A host array from NumPy, a torch tensor or a CuPy/`__cuda_array_interface__` array."""
    if isinstance(batch, np.ndarray):
        return batch
    if hasattr(batch, "detach"):  # torch
        return batch.detach().cpu().numpy()
    if hasattr(batch, "get"):  # CuPy
        return batch.get()
    return np.asarray(batch)
