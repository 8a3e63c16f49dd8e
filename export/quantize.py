"""FP8 (E4M3) post-training quantization of an ONNX graph: explicit Q/DQ nodes for TensorRT.

TensorRT 10 has no FP8 calibrator: an FP8 engine needs QuantizeLinear/DequantizeLinear nodes
with float8e4m3fn zero points (opset >= 19) in the ONNX. `quantize_fp8` adds them with the usual
TensorRT FP8 PTQ recipe (NVIDIA ModelOpt's for ONNX: per-channel weights, per-tensor activations,
max calibration; without ModelOpt's onnxruntime-gpu/cupy/onnx pins):

- every MatMul/Gemm/Conv whose weight is a constant initializer (a Linear or Conv layer; the
  weight may reach a MatMul through a Transpose) gets Q→DQ on its weight, one scale per output
  channel (amax/448), and Q→DQ on its activation input, one scale per tensor (calibrated
  amax/448, max calibration on ONNX Runtime CPU);
- everything else stays in higher precision: attention's activation×activation MatMuls,
  softmax, norms, residual adds;
- the default-domain opset goes to 19 through onnx.version_converter (re-stamping is not safe
  from 17: ReduceMean-18 moved `axes` from an attribute to an input), the IR version to >= 9.

Weights in external data (EVA02: model.onnx.data) are copied one tensor at a time into the
output's own data file (`<out>.data`), so no model is ever held as one protobuf, and the output
does not depend on the source files. ONNX Runtime CPU executes the result up to graph
optimisation level BASIC (its QDQ fusions at higher levels assume int8 and reject float8).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: the largest finite float8 E4M3 value: amax maps onto it
FP8_E4M3_MAX = 448.0
#: the first opset whose QuantizeLinear/DequantizeLinear take float8 types
QDQ_OPSET = 19
#: float8 tensor types exist from IR version 9
MIN_IR_VERSION = 9
QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
#: images per calibration run: peak memory is about this times the quantized activations of one
#: image (EVA02-L at 448 px: ~0.6 GB per image, SAR_CNN: ~0.1 GB)
DEFAULT_BATCH_SIZE = 4
#: external data offsets are page-aligned, so runtimes may map the file
_ALIGN = 4096


@dataclass(frozen=True)
class QuantizedNode:
    """One weighted node to quantize, and where its Q/DQ pairs go."""

    index: int  # the node's position in the graph
    node: str  # the node's name (or "<op_type>#<index>" when it has none)
    op_type: str
    activation: str  # the tensor at input 0: per-tensor Q/DQ
    weight: str  # the tensor at the weight input as the node sees it: per-channel Q/DQ
    initializer: str  # the initializer behind `weight` (itself, or a Transpose's input)
    perm: tuple[int, ...] | None  # that Transpose's permutation, None when the weight is direct
    axis: int  # output-channel axis of `weight` (Conv [O,I,kh,kw]: 0; MatMul [K,N]: 1; Gemm: 0 if transB)


def plan_fp8(model, exclude: Iterable[str] = ()) -> tuple[list[QuantizedNode], list[dict[str, str]]]:
    """The nodes `quantize_fp8` quantizes in `model` (an onnx.ModelProto), and the weighted nodes it
    leaves alone with the reason. Matmuls without a constant weight (attention) are neither."""
    from onnx import TensorProto, helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    exclude = set(exclude)
    planned: list[QuantizedNode] = []
    skipped: list[dict[str, str]] = []
    for index, node in enumerate(graph.node):
        if node.op_type not in QUANTIZED_OPS or len(node.input) < 2:
            continue
        name = node.name or f"{node.op_type}#{index}"
        weight = node.input[1]
        initializer, perm = weight, None
        if weight not in initializers:
            producer = producers.get(weight)
            if producer is None or producer.op_type != "Transpose" or producer.input[0] not in initializers:
                continue  # activation × activation (attention), or a computed weight: not a layer
            initializer = producer.input[0]
            attrs = {a.name: helper.get_attribute_value(a) for a in producer.attribute}
            rank = len(initializers[initializer].dims)
            perm = tuple(int(p) for p in attrs.get("perm", range(rank - 1, -1, -1)))
        tensor = initializers[initializer]
        rank = len(tensor.dims)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        why = None
        if name in exclude:
            why = "excluded"
        elif tensor.data_type != TensorProto.FLOAT:
            why = f"weight type {TensorProto.DataType.Name(tensor.data_type)}, not FLOAT"
        elif node.input[0] in initializers:
            why = "constant activation input"
        elif node.op_type == "MatMul" and rank != 2:
            why = f"MatMul weight of rank {rank} (only Linear layers, rank 2)"
        elif node.op_type == "Conv" and rank < 3:
            why = f"Conv weight of rank {rank}"
        if why:
            skipped.append({"node": name, "op_type": node.op_type, "reason": why})
            continue
        if node.op_type == "Conv":
            axis = 0  # [O, I/group, *kernel]
        elif node.op_type == "Gemm":
            axis = 0 if attrs.get("transB", 0) else 1  # B is [N, K] with transB, else [K, N]
        else:
            axis = 1  # MatMul: Y = X @ W, W is [K, N]
        planned.append(QuantizedNode(index, name, node.op_type, node.input[0], weight, initializer, perm, axis))
    return planned, skipped


def weight_scales(weight: np.ndarray, axis: int) -> np.ndarray:
    """Per-channel FP8 scales of `weight` along `axis`: max |w| over every other axis, / 448.
    An all-zero channel gets scale 1/448 (its zeros stay exact; TensorRT needs scales > 0)."""
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    amax = np.max(np.abs(weight.astype(np.float32)), axis=reduce)
    return (np.where(amax > 0, amax, 1.0) / FP8_E4M3_MAX).astype(np.float32)


def activation_scale(amax: float) -> float:
    """The per-tensor FP8 scale of an activation with calibrated `amax` (1/448 for an all-zero one)."""
    return float(np.float32((amax if amax > 0 else 1.0) / FP8_E4M3_MAX))


def calibrate_amax(onnx_path: str | Path, tensors: Iterable[str], batches: Iterable[np.ndarray], *,
                   batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[dict[str, float], int]:
    """max |x| of each of `tensors` over all calibration images, run on ONNX Runtime CPU in fp32;
    returns (amax by tensor, images seen).

    The tensors become extra graph outputs of a temporary copy of the graph written next to
    `onnx_path` (so its external data resolves); each run's outputs are reduced to their max at
    once, and inputs are run `batch_size` images at a time, so memory stays bounded.
    """
    import onnx

    onnx_path = Path(onnx_path)
    return _calibrate(onnx.load(str(onnx_path), load_external_data=False), onnx_path, tensors, batches, batch_size)


def _calibrate(model, onnx_path: Path, tensors: Iterable[str], batches: Iterable[np.ndarray], batch_size: int):
    """`calibrate_amax` for `model`, whose external data lives beside `onnx_path`."""
    import onnx
    import onnxruntime as ort

    if batch_size < 1:
        raise ValueError(f"calibration batch size must be >= 1, got {batch_size}")
    tensors = list(dict.fromkeys(tensors))
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)  # the graph only: external data is not loaded
    input_name = _single_input(augmented)
    present = {v.name for v in augmented.graph.output}
    known = {out for n in augmented.graph.node for out in n.output} | {i.name for i in augmented.graph.input}
    missing = [t for t in tensors if t not in known]
    if missing:
        raise ValueError(f"calibration: tensors not in {onnx_path.name}: {missing[:5]}")
    augmented.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                                  for t in tensors if t not in present)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no warnings about the unshaped extra outputs
    fd, tmp = tempfile.mkstemp(dir=onnx_path.parent, prefix=f".{onnx_path.stem}.calibration-", suffix=".onnx")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(augmented.SerializeToString())
        del augmented
        session = ort.InferenceSession(tmp, options, providers=["CPUExecutionProvider"])
    finally:
        Path(tmp).unlink(missing_ok=True)
    amax = dict.fromkeys(tensors, 0.0)
    images = 0
    for batch in batches:
        batch = np.asarray(batch, dtype=np.float32)
        for start in range(0, len(batch), batch_size):
            chunk = np.ascontiguousarray(batch[start:start + batch_size])
            for name, value in zip(tensors, session.run(tensors, {input_name: chunk})):
                peak = float(np.max(np.abs(value))) if value.size else 0.0
                if not np.isfinite(peak):
                    raise ValueError(f"calibration: {name} is not finite on calibration image(s) "
                                     f"{images}..{images + len(chunk) - 1}")
                amax[name] = max(amax[name], peak)
            images += len(chunk)
    del session
    if images == 0:
        raise ValueError("calibration: no calibration images")
    return amax, images


def quantize_fp8(onnx_path: str | Path, out_path: str | Path, calibration_batches: Iterable[np.ndarray], *,
                 batch_size: int = DEFAULT_BATCH_SIZE, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """Write an FP8 Q/DQ copy of the fp32 graph `onnx_path` to `out_path` (+ `out_path`.data when
    the source keeps weights in external data); returns what was done.

    `calibration_batches`: (N, C, H, W) float32 arrays, preprocessed as the model expects.
    `exclude`: names of nodes to leave in higher precision.
    The result: {"format", "opset", "ir_version", "source_opset", "quantized_nodes",
    "quantized_node_count", "op_types", "weights", "activations" (per tensor: amax, scale),
    "calibration", "skipped", "external_data"}.
    """
    import onnx
    from onnx import version_converter

    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if out_path.resolve() == onnx_path.resolve():
        raise ValueError(f"quantize_fp8: {out_path} would overwrite its source")
    model = onnx.load(str(onnx_path), load_external_data=False)
    if any(n.op_type in QDQ_OPS for n in model.graph.node):
        raise ValueError(f"quantize_fp8: {onnx_path} already holds Q/DQ nodes")
    data_path = out_path.with_name(out_path.name + ".data")
    if data_path.resolve() in _external_files(model, onnx_path.parent):
        raise ValueError(f"quantize_fp8: {data_path} would overwrite the source's external data")
    source_opset = _default_opset(model)
    if source_opset < QDQ_OPSET:
        model = version_converter.convert_version(model, QDQ_OPSET)
    model.ir_version = max(model.ir_version, MIN_IR_VERSION)
    planned, skipped = plan_fp8(model, exclude)
    if not planned:
        raise ValueError(f"quantize_fp8: {onnx_path} has no MatMul/Gemm/Conv with a constant weight to quantize")

    # calibrate the converted fp32 graph: the same tensor names as the graph that gets the Q/DQ nodes
    amax, images = _calibrate(model, onnx_path, [p.activation for p in planned], calibration_batches, batch_size)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    base_dir = str(onnx_path.parent)
    _insert_qdq(model, planned, amax, base_dir)
    external = _write_with_external_data(model, onnx_path.parent, out_path)
    onnx.checker.check_model(str(out_path), full_check=True)  # by path: follows the external data

    op_types: dict[str, int] = {}
    for p in planned:
        op_types[p.op_type] = op_types.get(p.op_type, 0) + 1
    activations = {name: {"amax": amax[name], "scale": activation_scale(amax[name])}
                   for name in dict.fromkeys(p.activation for p in planned)}
    return {
        "format": "float8e4m3fn",
        "opset": _default_opset(model),
        "ir_version": int(model.ir_version),
        "source_opset": source_opset,
        "quantized_nodes": [p.node for p in planned],
        "quantized_node_count": len(planned),
        "op_types": op_types,
        "weights": {"count": len({(p.weight, p.axis) for p in planned}), "granularity": "per output channel",
                    "scale": "amax/448"},
        "activations": activations,
        "calibration": {"method": "max", "images": images, "batch_size": batch_size, "runtime": "onnxruntime-cpu"},
        "skipped": skipped,
        "external_data": external,
    }


# ----------------------------------------------------------------------------- helpers
def _default_opset(model) -> int:
    return next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _external_files(model, base_dir: Path) -> set[Path]:
    """The files `model`'s external initializers live in."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    return {(base_dir / ExternalDataInfo(t).location).resolve() for t in model.graph.initializer
            if uses_external_data(t)}


def _single_input(model) -> str:
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise ValueError(f"calibration needs a graph with one input, got {inputs}")
    return inputs[0]


class _Names:
    """Fresh tensor/node names that collide with nothing in the graph."""

    def __init__(self, graph):
        self.taken = {t.name for t in graph.initializer} | {v.name for v in graph.input} | {
            v.name for v in graph.output} | {n.name for n in graph.node} | {o for n in graph.node for o in n.output}

    def __call__(self, base: str) -> str:
        name, k = base, 1
        while name in self.taken:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name


def _insert_qdq(model, planned: list[QuantizedNode], amax: dict[str, float], base_dir: str) -> None:
    """Rewrite `model.graph` in place: Q→DQ pairs before the planned nodes' inputs, each pair
    emitted right before its first consumer (so the node list stays topologically sorted)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    names = _Names(graph)
    initializers = {t.name: t for t in graph.initializer}
    by_index = {p.index: p for p in planned}  # node names need not be unique
    pairs: dict[tuple[str, int | None], str] = {}  # (tensor, axis or None) → its DQ output
    new_nodes, new_inits = [], []

    def qdq(tensor: str, scale: np.ndarray, axis: int | None) -> str:
        key = (tensor, axis)
        if key in pairs:
            return pairs[key]
        scale_name, zero_name = names(f"{tensor}_fp8_scale"), names(f"{tensor}_fp8_zero_point")
        new_inits.append(numpy_helper.from_array(np.asarray(scale, np.float32), scale_name))
        new_inits.append(helper.make_tensor(zero_name, TensorProto.FLOAT8E4M3FN, list(np.shape(scale)),
                                            vals=bytes(int(np.size(scale))), raw=True))
        q_out, dq_out = names(f"{tensor}_fp8_q"), names(f"{tensor}_fp8_dq")
        kwargs = {} if axis is None else {"axis": axis}
        new_nodes.append(helper.make_node("QuantizeLinear", [tensor, scale_name, zero_name], [q_out],
                                          name=names(f"{tensor}_QuantizeLinear"), **kwargs))
        new_nodes.append(helper.make_node("DequantizeLinear", [q_out, scale_name, zero_name], [dq_out],
                                          name=names(f"{tensor}_DequantizeLinear"), **kwargs))
        pairs[key] = dq_out
        return dq_out

    for index, node in enumerate(graph.node):
        plan = by_index.get(index)
        if plan is not None:
            w = numpy_helper.to_array(initializers[plan.initializer], base_dir)  # this tensor only
            if plan.perm is not None:
                w = np.transpose(w, plan.perm)
            node.input[0] = qdq(plan.activation, np.float32(activation_scale(amax[plan.activation])), None)
            node.input[1] = qdq(plan.weight, weight_scales(w, plan.axis), plan.axis)
            del w
        new_nodes.append(node)
    graph.initializer.extend(new_inits)
    del graph.node[:]
    graph.node.extend(new_nodes)
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(int(opset.version), QDQ_OPSET)


def _write_with_external_data(model, source_dir: Path, out_path: Path) -> dict[str, Any] | None:
    """Write `model` to `out_path`; initializers held in external data at the source are copied, one
    at a time, into `out_path`.data (page-aligned), which the written graph then refers to.
    Returns {"file", "tensors", "bytes"} for that data file, or None when there is none."""
    from onnx import TensorProto, numpy_helper
    from onnx.external_data_helper import uses_external_data

    external = [t for t in model.graph.initializer if uses_external_data(t)]
    data_path = out_path.with_name(out_path.name + ".data")
    data_path.unlink(missing_ok=True)
    if not external:
        _atomic_bytes(out_path, model.SerializeToString())
        return None
    tmp_data = data_path.with_name(f".{data_path.name}.tmp")
    offset = 0
    try:
        with open(tmp_data, "wb") as f:
            for tensor in external:
                array = numpy_helper.to_array(tensor, str(source_dir))  # this tensor only
                blob = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()  # ONNX raw data is LE
                del array
                pad = (-offset) % _ALIGN
                f.write(b"\0" * pad)
                offset += pad
                f.write(blob)
                del tensor.external_data[:]
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(blob)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                offset += len(blob)
                del blob
        os.replace(tmp_data, data_path)
    except BaseException:
        tmp_data.unlink(missing_ok=True)
        raise
    _atomic_bytes(out_path, model.SerializeToString())
    return {"file": data_path.name, "tensors": len(external), "bytes": offset}


def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
