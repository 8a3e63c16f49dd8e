"""OpenVINO (CPU plugin): the fastest INT8 runtime for SAR_CNN on x86 CPUs.

It runs the same INT8 QDQ graph as `--backend onnxruntime --precision int8` — made by
export/quantize_int8.py (ONNX Runtime's static quantizer: per-channel int8 weights, uint8
activations, calibrated on vignettes) and parity-gated by `iws-engine build` — but compiles it
with oneDNN's int8 convolutions (brgemm, AVX-512 VNNI / AMX where the CPU has them). Why it is
here: on our 2-core AMD EPYC (Zen 4, AVX-512 VNNI, no AMX), real IWS checkpoint, batch 16, one
core per image stream, the first convolution (1 input channel, 49 MACs per output) costs 0.28 ms
per image in OpenVINO against 0.83 ms in ONNX Runtime's QLinearConv, and the 5×5 convolution
(64 % of the 1.32 GMAC) 3.96 against 4.31 ms: 6.2 against 7.0 core-ms per image, i.e. ~320 against
~280 img/s on 2 cores; the scores are the same (max |dp| 0.0134 against fp32 for both). ONNX
Runtime's own knobs (per-tensor scales, QOperator format, reduce_range, the first conv in fp32)
did not beat 7.0 core-ms (README, "Fast CPU precisions").

fp32 runs the model as exported with `INFERENCE_PRECISION_HINT=f32`: OpenVINO's CPU plugin
otherwise runs fp32 graphs in bf16 wherever the CPU has AVX-512 BF16, which misses the bf16
parity gate on the real checkpoint (max |dp| 0.0067 > 5e-3). The hint also keeps the few float
ops of the INT8 graph (input quantization, global average pool, dequantization) in fp32.

One compiled model serves every batch size (dynamic batch dimension). Each calling thread gets
its own infer request (requests are not thread-safe; the compiled model is). Threads are not
pinned to cores: the CPU loader's decoder threads share them.
"""

from __future__ import annotations

import threading

import numpy as np

from iws_engine.backends.base import Backend, BackendError, cpu_cores

PRECISIONS = ("fp32", "int8")
#: pip distribution that provides it (`pip install 'iws-engine[openvino]'`)
PACKAGE = "openvino"


def import_openvino():
    """The `openvino` module, or a BackendError saying how to install it."""
    try:
        import openvino
    except ImportError as e:
        raise BackendError(f"openvino backend: the openvino package is not installed ({e}); "
                           "pip install 'iws-engine[openvino]'") from None
    return openvino


class OpenVinoBackend(Backend):
    name = "openvino"

    def __init__(self, precision: str = "fp32", device: str = "cpu", threads: int | None = None):
        if precision not in PRECISIONS:
            raise BackendError(f"openvino backend: precision {precision!r} is not supported "
                               f"({', '.join(PRECISIONS)})")
        if device != "cpu":
            raise BackendError(f"openvino backend: runs on the CPU only, not {device!r}")
        super().__init__(precision, device)
        self.threads = threads

    def _load_impl(self, model) -> None:
        ov = import_openvino()

        from iws_engine.backends.onnxruntime import require_int8_graph
        from iws_engine.export.onnx import onnx_session_source

        if self.precision == "int8":
            require_int8_graph(model, self.name)
        core = ov.Core()
        with onnx_session_source(model, self.input_shape) as source:  # a path or in-memory ONNX bytes
            network = core.read_model(source)
        if len(network.inputs) != 1 or len(network.outputs) != 1:
            raise BackendError(f"openvino backend: expected one input and one output, got "
                               f"{len(network.inputs)} and {len(network.outputs)}")
        network.reshape([-1, *self.input_shape])
        self._compiled = core.compile_model(network, "CPU", {
            "INFERENCE_NUM_THREADS": self.threads or cpu_cores(),
            "PERFORMANCE_HINT": "LATENCY",  # one stream: a batch runs on all the threads
            "INFERENCE_PRECISION_HINT": "f32",
            "ENABLE_CPU_PINNING": False,
        })
        self._requests = threading.local()

    def _request(self):
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self._compiled.create_infer_request()
        return request

    def _infer_impl(self, batch, out) -> None:
        from iws_engine.backends.onnxruntime import to_host

        x = np.ascontiguousarray(to_host(batch), dtype=np.float32)
        request = self._request()
        request.infer([x], share_inputs=True)
        y = request.get_output_tensor(0).data
        if isinstance(out, np.ndarray):
            out[...] = y.reshape(out.shape)
        else:  # a torch tensor
            import torch

            out.copy_(torch.from_numpy(np.array(y).reshape(tuple(out.shape))))

    def _close_impl(self) -> None:
        self._compiled = None
        self._requests = threading.local()

    def versions(self) -> dict[str, str]:
        return {"openvino": import_openvino().__version__}
