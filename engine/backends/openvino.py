"""OpenVINO (CPU plugin): the fastest INT8 runtime for SAR_CNN on x86 CPUs.

It runs the same INT8 QDQ graph as `--backend onnxruntime --precision int8` — made by
export/quantize_int8.py (ONNX Runtime's static quantizer: per-channel int8 weights, uint8
activations, calibrated on vignettes) and parity-gated by `iws-engine build` — but compiles it
with oneDNN's int8 convolutions (brgemm, AVX-512 VNNI / AMX where the CPU has them). Why it is
here: on our 2-core AMD EPYC (Zen 4, AVX-512 VNNI, no AMX), real IWS checkpoint, batch 16, one
core per image stream, the first convolution (1 input channel, 49 MACs per output) costs 0.28 ms
per image in OpenVINO against 0.83 ms in ONNX Runtime's QLinearConv, and the 5×5 convolution
(64 % of the 1.32 GMAC) 3.96 against 4.31 ms: 6.2 against 7.0 core-ms per image, i.e. ~320 against
~280 img/s on 2 cores (end to end from PNG bytes, batch 16: 14.6 against 16.1 core-ms per image,
135 against 122 img/s, noisy); the scores are the same (max |dp| 0.0134 against fp32 for both). ONNX
Runtime's own knobs (per-tensor scales, QOperator format, reduce_range, the first conv in fp32)
did not beat 7.0 core-ms (README, "Fast CPU precisions").

fp32 runs the model as exported with `INFERENCE_PRECISION_HINT=f32`: OpenVINO's CPU plugin
otherwise runs fp32 graphs in bf16 wherever the CPU has AVX-512 BF16, which misses the bf16
parity gate on the real checkpoint (max |dp| 0.0067 > 5e-3). The hint also keeps the few float
ops of the INT8 graph (input quantization, global average pool, dequantization) in fp32.

A batch is split over `streams` infer requests (default: one per thread, i.e. per core), each run
by its own single-threaded OpenVINO stream, instead of one request whose convolutions all threads
share: no synchronisation inside a layer, so a core taken for a while by another thread (a decoder)
stalls only its own part of the batch instead of every layer's barrier. Measured on the 2-core EPYC (noisy, best of 7, same process): batch 16, 316 img/s
with 2 streams against 279 with one 2-thread stream (ONNX Runtime int8: 266); batch 64, 318 / 291.
A batch smaller than the stream count runs as one request on all the threads (a second compiled
model, made when first needed). One compiled model serves every batch size (dynamic batch
dimension). Each calling thread gets its own requests (requests are not thread-safe, compiled
models are). Threads are not pinned to cores: the CPU loader's decoder threads share them.
"""

from __future__ import annotations

import threading

import numpy as np

from iws_engine.backends.base import Backend, BackendError, cpu_cores

PRECISIONS = ("fp32", "int8")


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

    def __init__(self, precision: str = "fp32", device: str = "cpu", threads: int | None = None,
                 streams: int | None = None):
        if precision not in PRECISIONS:
            raise BackendError(f"openvino backend: precision {precision!r} is not supported "
                               f"({', '.join(PRECISIONS)})")
        if device != "cpu":
            raise BackendError(f"openvino backend: runs on the CPU only, not {device!r}")
        super().__init__(precision, device)
        self.threads = threads
        self.streams = streams
        self._lock = threading.Lock()

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
        self.threads = self.threads or cpu_cores()
        self.streams = max(1, min(self.streams or self.threads, self.threads))
        self._compile = lambda streams: core.compile_model(network, "CPU", {
            "INFERENCE_NUM_THREADS": self.threads, "NUM_STREAMS": streams,
            "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False})
        self._compiled = self._compile(self.streams)
        self._one_stream = None  # for batches smaller than the stream count: compiled when first needed
        self._requests = threading.local()

    def _requests_here(self, n: int) -> list:
        """This thread's infer requests for a batch of `n`: one per stream, or, for n < streams, one request
        on all the threads (a single image would otherwise run on one core)."""
        here = self._requests.__dict__
        if n >= self.streams:
            if "streams" not in here:
                here["streams"] = [self._compiled.create_infer_request() for _ in range(self.streams)]
            return here["streams"]
        if "one_stream" not in here:
            with self._lock:
                if self._one_stream is None:
                    self._one_stream = self._compile(1)
            here["one_stream"] = [self._one_stream.create_infer_request()]
        return here["one_stream"]

    def _infer_impl(self, batch, out) -> None:
        from iws_engine.backends.onnxruntime import to_host

        x = np.ascontiguousarray(to_host(batch), dtype=np.float32)
        y = np.empty((len(x), *self.output_shape), np.float32) if not isinstance(out, np.ndarray) else out
        requests = self._requests_here(len(x))
        parts = np.array_split(np.arange(len(x)), len(requests))
        for request, part in zip(requests, parts):
            request.start_async([x[part[0]:part[-1] + 1]], share_inputs=True)
        for request, part in zip(requests, parts):
            request.wait()
            y[part[0]:part[-1] + 1] = request.get_output_tensor(0).data.reshape((len(part), *self.output_shape))
        if y is not out:  # a torch tensor
            import torch

            out.copy_(torch.from_numpy(y).reshape(tuple(out.shape)))

    def _close_impl(self) -> None:
        self._compiled = self._one_stream = self._compile = None
        self._requests = threading.local()

    def info(self) -> dict:
        return {**super().info(), "threads": self.threads, "streams": self.streams}

    def versions(self) -> dict[str, str]:
        return {"openvino": import_openvino().__version__}
