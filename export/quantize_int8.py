"""INT8 post-training static quantization of an ONNX graph for ONNX Runtime's CPU execution provider.

ONNX Runtime's own quantizer (`onnxruntime.quantization.quantize_static`) writes QDQ nodes, which
the CPU EP fuses at ORT_ENABLE_ALL into QLinearConv / QGemm kernels in NHWC that use VNNI
(AVX512-VNNI, AVX-VNNI) or AMX where the CPU has them (verified on SAR_CNN: every Conv and Gemm
becomes a QLinearConv/QGemm, ReLUs fold into the activation ranges, only the global average pool
runs in float). The recipe:

- weights int8, symmetric, one scale per output channel;
- activations uint8, asymmetric, one scale per tensor (U8S8: the int8 GEMM form x86 VNNI runs
  natively; int8 activations gave the same accuracy and no measurable gain on our noisy machine,
  and symmetric activation ranges cost accuracy: max |dp| 0.020 vs 0.013 on the real IWS checkpoint);
- every op ORT can quantize is quantized (not only Conv/Gemm): a ReLU then disappears into its
  producer's output range [0, max]; restricting the op types keeps the ReLUs and spends half of
  each conv output's 256 levels on negatives (measured: max |dp| 0.022 instead of 0.013 on the
  real IWS checkpoint, over the gate's 2e-2);
- ranges calibrated on ONNX Runtime CPU in fp32 over all the calibration images (MinMax by
  default; "entropy" and "percentile" are ORT's other calibrators). ORT's
  CalibMaxIntermediateOutputs option is not used: in onnxruntime 1.32 it discards the collected
  batches instead of reducing them (the ranges then come from the last few batches only); MinMax
  keeps only a per-tensor min and max per batch anyway.

The scales depend on the calibration images: `export.build` feeds them (the --calib PNGs or the
target's probe vignettes) and gates the result against fp32.
"""

from __future__ import annotations

import io
import logging
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np

#: calibrators offered by ONNX Runtime, by the name the manifest records
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: the weighted ops whose quantization the summary reports
QUANTIZED_OPS = ("Conv", "Gemm", "MatMul")
#: images per calibration run
DEFAULT_BATCH_SIZE = 8


def quantize_int8(onnx_path: str | Path, out_path: str | Path, calibration_batches: Iterable[np.ndarray], *,
                  method: str = "minmax", exclude: Iterable[str] = (),
                  batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, Any]:
    """Write an INT8 QDQ copy of the fp32 graph `onnx_path` to `out_path`; returns what was done.

    `calibration_batches`: (N, C, H, W) float32 arrays, preprocessed as the model expects.
    `exclude`: names of nodes to leave in float. The result: {"format", "weights", "activations",
    "quantized_nodes", "quantized_node_count", "op_types", "excluded", "calibration"}.
    """
    import onnx
    import onnxruntime
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"quantize_int8: calibration method must be one of {', '.join(CALIBRATION_METHODS)}, "
                         f"got {method!r}")
    if out_path.resolve() == onnx_path.resolve():
        raise ValueError(f"quantize_int8: {out_path} would overwrite its source")
    source = onnx.load(str(onnx_path), load_external_data=False)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in source.graph.node):
        raise ValueError(f"quantize_int8: {onnx_path} already holds Q/DQ nodes")
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in source.graph.initializer):
        raise ValueError(f"quantize_int8: {onnx_path} keeps its weights in external data (EVA02); "
                         "INT8 on ONNX Runtime is for SAR_CNN")
    exclude = list(dict.fromkeys(exclude))
    names = {n.name for n in source.graph.node}
    unknown = [e for e in exclude if e not in names]
    if unknown:
        raise ValueError(f"quantize_int8: no node named {unknown} in {onnx_path.name}")
    input_name = next(i.name for i in source.graph.input
                      if i.name not in {t.name for t in source.graph.initializer})
    reader = _BatchReader(input_name, calibration_batches, batch_size)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="iws-int8-") as tmp, _quiet_quantizer():
        prepared = Path(tmp) / "prepared.onnx"
        # shape inference + ORT's basic graph optimisation, as the quantizer asks for
        quant_pre_process(str(onnx_path), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out_path), reader, quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        calibrate_method=getattr(CalibrationMethod, _ORT_METHOD[method]),
                        nodes_to_exclude=exclude, calibration_providers=["CPUExecutionProvider"])
    if reader.images == 0:
        out_path.unlink(missing_ok=True)
        raise ValueError("quantize_int8: no calibration images")
    quantized = onnx.load(str(out_path))
    onnx.checker.check_model(quantized, full_check=True)
    dq_inputs = {n.output[0] for n in quantized.graph.node if n.op_type == "DequantizeLinear"}
    done = [n for n in quantized.graph.node
            if n.op_type in QUANTIZED_OPS and all(i in dq_inputs for i in n.input[:2])]
    op_types: dict[str, int] = {}
    for n in done:
        op_types[n.op_type] = op_types.get(n.op_type, 0) + 1
    return {
        "format": "int8 QDQ (ONNX Runtime)",
        "weights": {"type": "int8", "granularity": "per output channel", "symmetric": True},
        "activations": {"type": "uint8", "granularity": "per tensor", "symmetric": False},
        "quantized_nodes": [n.name for n in done],
        "quantized_node_count": len(done),
        "op_types": op_types,
        "excluded": exclude,
        "calibration": {"method": method, "images": reader.images, "batch_size": batch_size,
                        "runtime": "onnxruntime-cpu"},
        "onnxruntime": onnxruntime.__version__,
    }


_ORT_METHOD = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}


def is_int8_graph(onnx_path: str | Path) -> bool:
    """Whether an ONNX file holds integer Q/DQ nodes (an INT8 graph from `quantize_int8`)."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    return any(n.op_type == "QuantizeLinear" for n in model.graph.node) and not any(
        t.data_type == onnx.TensorProto.FLOAT8E4M3FN for t in model.graph.initializer)


class _BatchReader:
    """ORT's CalibrationDataReader protocol over a stream of batches, re-cut to `batch_size` images."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray], batch_size: int):
        if batch_size < 1:
            raise ValueError(f"calibration batch size must be >= 1, got {batch_size}")
        self.input_name = input_name
        self.images = 0
        self._chunks = self._cut(batches, batch_size)

    def _cut(self, batches: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
        for batch in batches:
            batch = np.asarray(batch, dtype=np.float32)
            for start in range(0, len(batch), batch_size):
                chunk = np.ascontiguousarray(batch[start:start + batch_size])
                if not np.isfinite(chunk).all():  # ORT would fail later with an opaque "scale issue"
                    raise ValueError(f"quantize_int8: calibration image(s) {self.images}..{self.images + len(chunk) - 1} "
                                     "hold non-finite values")
                self.images += len(chunk)
                yield chunk

    def get_next(self) -> dict[str, np.ndarray] | None:
        chunk = next(self._chunks, None)
        return None if chunk is None else {self.input_name: chunk}

    def rewind(self) -> None:  # the quantizer calls it only for iterative calibrators we do not use
        raise NotImplementedError("calibration batches are streamed once")


@contextmanager
def _quiet_quantizer():
    """The quantizer logs advice on the root logger and its histogram calibrators print progress: keep
    both out of the command's output (classify may be writing its CSV to stdout)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
