"""FP8 Q/DQ post-training quantization (`export.quantize`) and its place in `iws-engine build`.

What TensorRT would build from is checked on the CPU: the graph (onnx.checker, Q/DQ around
exactly the weighted layers, per-output-channel weight scales), and its numerics, which ONNX
Runtime CPU executes (float8 Q/DQ, graph optimisation up to BASIC). FP8 E4M3 keeps 3 mantissa
bits: each rounding has a relative error of at most u = 2^-4, so a quantized product x·w is off
by at most (2u + u²)|x·w| (the single-layer bound tested exactly below), and a network's output
drifts by about 1-2 u over its quantized depth. Measured on the probes here (fp8 vs fp32):
- SAR_CNN, real IWS checkpoint, 48 probes: max |dp| 0.050, logits relative L2 error 0.066,
  decision agreement 1.0 — over the build's fp8 parity limit (2e-2), so that gate refuses it;
- tiny EVA02 (2 blocks, wide random head), 16 probes: logits relative L2 error 0.074; its
  softmax features, saturated by the wide head (logit std 16), move by up to 0.53;
- (EVA02-L/448, random weights, 24 blocks, 170 quantized layers, measured once: logits 0.096.)
A wrong activation scale shows: amax/10 (saturation) or amax×1e5 (underflow) give errors of
order 1. (amax×1000 alone barely does: E4M3 spans 2^-9..448, so a 2^10 shift of the scale only
pushes the smallest activations into its subnormals.)
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from iws_engine.backends.base import BackendError  # noqa: E402
from iws_engine.backends.tensorrt import check_quantization, has_explicit_quantization  # noqa: E402
from iws_engine.export import build  # noqa: E402
from iws_engine.export.quantize import (  # noqa: E402
    FP8_E4M3_MAX,
    QDQ_OPSET,
    QUANTIZED_OPS,
    calibrate_amax,
    quantize_fp8,
)

U = 2.0 ** -4  # unit roundoff of float8 E4M3 (3 mantissa bits, round to nearest even)
TINY_INPUT = (3, 56, 56)


# ----------------------------------------------------------------------------- helpers
def _session(path: Path):
    options = ort.SessionOptions()
    # ORT's QDQ fusions (EXTENDED and up) assume int8 and reject float8 Q/DQ
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(path: Path, x: np.ndarray, extra: tuple[str, ...] = ()) -> list[np.ndarray]:
    """The graph's output (and `extra` intermediate tensors) on ONNX Runtime CPU."""
    if extra:
        model = onnx.load(str(path), load_external_data=False)
        model.graph.output.extend(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in extra)
        copy = path.with_name(f"extra-{path.name}")  # beside the original: its external data resolves
        copy.write_bytes(model.SerializeToString())
        try:
            session = _session(copy)
        finally:
            copy.unlink()
    else:
        session = _session(path)
    return session.run(None, {session.get_inputs()[0].name: x})


def _rel(reference: np.ndarray, got: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - reference) / np.linalg.norm(reference))


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def _weighted_nodes(model) -> list:
    """The nodes the FP8 recipe must quantize, found independently of the quantizer: MatMul/Gemm/Conv
    whose second input is a constant initializer."""
    inits = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type in QUANTIZED_OPS and n.input[1] in inits]


def _with_activation_scales(path: Path, out: Path, factor: float) -> Path:
    """A copy of a quantized graph whose activation scales (both Q and DQ) are `factor` times off."""
    model = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    weights = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in weights:
            scale = inits[node.input[1]]
            scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) * np.float32(factor),
                                                        scale.name))
    out.write_bytes(model.SerializeToString())  # beside `path`: the external data still resolves
    return out


def _check_structure(source: Path, quantized: Path, summary: dict) -> dict:
    """Q→DQ pairs sit on both inputs of exactly the weighted nodes and nowhere else; returns counts."""
    onnx.checker.check_model(str(quantized), full_check=True)
    src = onnx.load(str(source), load_external_data=False)
    got = onnx.load(str(quantized), load_external_data=False)
    assert next(o.version for o in got.opset_import if o.domain == "") == QDQ_OPSET == summary["opset"]
    assert 9 <= got.ir_version <= 11  # float8 needs IR 9; ONNX Runtime 1.31 refuses newer IRs than it knows
    assert has_explicit_quantization(quantized) and not has_explicit_quantization(source)

    expected = {n.name for n in _weighted_nodes(src)}
    producers = {o: n for n in got.graph.node for o in n.output}
    inits = {t.name: t for t in got.graph.initializer}
    dq_fed = {n.name for n in got.graph.node
              if any(producers.get(i) is not None and producers[i].op_type == "DequantizeLinear" for i in n.input)}
    assert dq_fed == expected == set(summary["quantized_nodes"])
    for node in got.graph.node:
        if node.name in expected:
            for tensor in node.input[:2]:  # activation and weight: both through Q→DQ
                dq = producers[tensor]
                q = producers[dq.input[0]]
                assert (dq.op_type, q.op_type) == ("DequantizeLinear", "QuantizeLinear")
                assert q.input[1:] == dq.input[1:]  # one scale and zero point for the pair
                zero = inits[q.input[2]]
                assert zero.data_type == onnx.TensorProto.FLOAT8E4M3FN
                assert not np.any(onnx.numpy_helper.to_array(zero).astype(np.float32))
                assert np.all(onnx.numpy_helper.to_array(inits[q.input[1]]) > 0)
    q_nodes = [n for n in got.graph.node if n.op_type == "QuantizeLinear"]
    dq_nodes = [n for n in got.graph.node if n.op_type == "DequantizeLinear"]
    activations = {n.input[0] for n in _weighted_nodes(src)}
    weights = {n.input[1] for n in _weighted_nodes(src)}
    assert len(q_nodes) == len(dq_nodes) == len(activations) + len(weights)
    assert set(summary["activations"]) == activations
    # weights: one scale per output channel, amax/448 (Conv [O, I, kh, kw] and Gemm-transB [N, K]:
    # axis 0; MatMul [K, N]: axis 1)
    src_inits = {t.name: t for t in src.graph.initializer}
    for node in _weighted_nodes(src):
        trans_b = any(a.name == "transB" and a.i for a in node.attribute)
        want_axis = 1 if node.op_type == "MatMul" or (node.op_type == "Gemm" and not trans_b) else 0
        scale, axis, tensor = _weight_scale(got, node.name)
        w = onnx.numpy_helper.to_array(src_inits[tensor], str(source.parent))
        amax = np.abs(np.moveaxis(w, want_axis, 0).reshape(w.shape[want_axis], -1)).max(axis=1)
        assert axis == want_axis
        np.testing.assert_allclose(scale, amax / FP8_E4M3_MAX, rtol=1e-6)
    for name, record in summary["activations"].items():
        q = next(n for n in q_nodes if n.input[0] == name)
        assert float(onnx.numpy_helper.to_array(inits[q.input[1]])) == pytest.approx(record["amax"] / FP8_E4M3_MAX,
                                                                                     rel=1e-6)
    return {"nodes": len(expected), "activations": len(activations), "weights": len(weights)}


def _weight_scale(quantized, node_name: str):
    """(scale array, axis) of the weight Q/DQ pair feeding `node_name`."""
    producers = {o: n for n in quantized.graph.node for o in n.output}
    inits = {t.name: t for t in quantized.graph.initializer}
    node = next(n for n in quantized.graph.node if n.name == node_name)
    q = producers[producers[node.input[1]].input[0]]
    axis = next(a.i for a in q.attribute if a.name == "axis")
    return onnx.numpy_helper.to_array(inits[q.input[1]]), axis, q.input[0]


# ----------------------------------------------------------------------------- the single-layer bound
def _linear_graph(tmp_path: Path, weight: np.ndarray, mode: str) -> Path:
    """Y = X @ W as MatMul (W is [K, N]), Gemm with transB (W stored [N, K]) or MatMul through a
    Transpose of a [N, K] initializer; plus an activation×activation MatMul that must stay fp32."""
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    if mode == "matmul":
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="linear")]
        init = numpy_helper.from_array(weight, "W")
    elif mode == "gemm":
        nodes = [helper.make_node("Gemm", ["x", "W"], ["y"], name="linear", transB=1)]
        init = numpy_helper.from_array(np.ascontiguousarray(weight.T), "W")
    else:
        nodes = [helper.make_node("Transpose", ["W"], ["Wt"], name="t", perm=[1, 0]),
                 helper.make_node("MatMul", ["x", "Wt"], ["y"], name="linear")]
        init = numpy_helper.from_array(np.ascontiguousarray(weight.T), "W")
    nodes.append(helper.make_node("MatMul", ["y", "yT"], ["gram"], name="attention_like"))
    nodes.insert(len(nodes) - 1, helper.make_node("Transpose", ["y"], ["yT"], name="yt", perm=[1, 0]))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n]),
                               helper.make_tensor_value_info("gram", TensorProto.FLOAT, ["b", "b"])], [init])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path / f"{mode}.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("mode", ["matmul", "gemm", "transpose"])
def test_single_layer_meets_the_fp8_rounding_bound_per_output_channel(tmp_path, mode):
    """Every output obeys |y8 - y| <= (2u + u²) Σ|x||w| with output channels 10^±4 apart: only
    scales along the output-channel axis keep the small channels out of FP8's subnormals."""
    rng = np.random.default_rng(0)
    k, n = 32, 9
    magnitude = 10.0 ** np.linspace(-4, 4, n)  # per output channel
    weight = (rng.uniform(0.1, 1.0, (k, n)) * rng.choice([-1, 1], (k, n)) * magnitude).astype(np.float32)
    x = (rng.uniform(0.1, 1.0, (16, k)) * rng.choice([-1, 1], (16, k))).astype(np.float32)
    source = _linear_graph(tmp_path, weight, mode)
    summary = quantize_fp8(source, tmp_path / f"{mode}.fp8.onnx", [x[:8], x[8:]], batch_size=3)
    assert summary["quantized_nodes"] == ["linear"] and summary["source_opset"] == 17
    assert summary["calibration"]["images"] == 16
    assert summary["activations"]["x"]["amax"] == pytest.approx(float(np.abs(x).max()))

    quantized = onnx.load(str(tmp_path / f"{mode}.fp8.onnx"))
    scale, axis, _ = _weight_scale(quantized, "linear")
    stored = weight if mode != "gemm" else weight.T
    assert axis == (0 if mode == "gemm" else 1)  # Gemm transB: W is [N, K]
    np.testing.assert_allclose(scale, np.abs(stored).max(axis=1 - axis) / FP8_E4M3_MAX, rtol=1e-6)
    attention = next(node for node in quantized.graph.node if node.name == "attention_like")
    assert list(attention.input) == ["y", "yT"]  # activation × activation: left in fp32

    y8 = _run(tmp_path / f"{mode}.fp8.onnx", x)[0]
    y = x.astype(np.float64) @ weight
    magnitude_sum = np.abs(x).astype(np.float64) @ np.abs(weight)
    bound = (2 * U + U * U) * magnitude_sum
    assert np.all(np.abs(y8 - y) <= bound + 1e-5 * magnitude_sum)  # + fp32 accumulation

    # ONNX Runtime computes exactly this emulation of the FP8 arithmetic ...
    import ml_dtypes

    def fp8(v, s):
        s = np.asarray(s, np.float32)
        return (v.astype(np.float32) / s).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) * s

    x8 = fp8(x, np.abs(x).max() / FP8_E4M3_MAX)
    np.testing.assert_allclose(y8, x8 @ fp8(weight, np.abs(weight).max(axis=0) / FP8_E4M3_MAX),
                               rtol=1e-5, atol=1e-6 * np.abs(y).max())
    # ... in which one weight scale per tensor, or per input channel (the wrong axis), loses the small
    # output channels in FP8's underflow, where per-output-channel scales keep every channel within a few u
    def worst_channel(got):
        return float(np.max(np.linalg.norm(got - y, axis=0) / np.linalg.norm(y, axis=0)))

    assert worst_channel(y8) < 2 * U
    for wrong in (np.abs(weight).max(), np.abs(weight).max(axis=1, keepdims=True)):
        assert worst_channel(x8 @ fp8(weight, wrong / FP8_E4M3_MAX)) > 0.9


# ----------------------------------------------------------------------------- SAR_CNN
@pytest.fixture(scope="module")
def sarcnn_fp8(random_weights, tmp_path_factory):
    from iws_engine.export.onnx import export_onnx
    from iws_engine.export.targets import PROBE_SEED, SarcnnTarget

    target = SarcnnTarget(random_weights)
    folder = tmp_path_factory.mktemp("sarcnn-fp8")
    source = export_onnx(target.source, folder / "model.onnx", input_shape=target.input_shape)
    calibration = target.probe_inputs(8, seed=PROBE_SEED + 1)
    summary = quantize_fp8(source, folder / "model.fp8.onnx", iter([calibration[:5], calibration[5:]]))
    return target, source, folder / "model.fp8.onnx", summary, calibration


def test_sarcnn_quantized_graph(sarcnn_fp8):
    target, source, quantized, summary, calibration = sarcnn_fp8
    counts = _check_structure(source, quantized, summary)
    assert counts == {"nodes": 6, "activations": 6, "weights": 6}  # 4 Conv + 2 Gemm, each its own input
    assert summary["op_types"] == {"Conv": 4, "Gemm": 2} and summary["skipped"] == []
    assert summary["source_opset"] == 17 and summary["external_data"] is None
    assert sorted(p.name for p in quantized.parent.iterdir()) == ["model.fp8.onnx", "model.onnx"]
    with pytest.raises(BackendError, match="fp8 needs an explicitly quantized ONNX"):
        check_quantization("fp8", source, has_calibrator=False)
    check_quantization("fp8", quantized, has_calibrator=False)

    got = onnx.load(str(quantized))
    # opset 17 → 19 through the version converter: ReduceMean-18 takes its axes as an input
    reduce_mean = next(n for n in got.graph.node if n.op_type == "ReduceMean")
    assert len(reduce_mean.input) == 2 and not any(a.name == "axes" for a in reduce_mean.attribute)
    y, y8 = _run(source, calibration)[0], _run(quantized, calibration)[0]
    assert y8.shape == y.shape and np.all(np.isfinite(y8))


def test_calibration_amax_is_the_running_max_in_any_batching(sarcnn_fp8):
    _, source, _, summary, calibration = sarcnn_fp8
    tensors = list(summary["activations"])
    one, images = calibrate_amax(source, tensors, [calibration], batch_size=1)
    assert images == len(calibration)
    assert one == pytest.approx(calibrate_amax(source, tensors, (calibration[i:i + 3] for i in range(0, 8, 3)),
                                               batch_size=8)[0], rel=1e-6)
    assert one["input"] == float(np.abs(calibration).max())
    relu = next(t for t in tensors if "Relu" in t)
    assert one[relu] == pytest.approx(float(np.abs(_run(source, calibration, (relu,))[1]).max()))
    assert {t: r["amax"] for t, r in summary["activations"].items()} == pytest.approx(one)


def test_quantize_refuses_what_it_cannot_do(sarcnn_fp8, tmp_path):
    _, source, quantized, _, calibration = sarcnn_fp8
    with pytest.raises(ValueError, match="already holds Q/DQ nodes"):
        quantize_fp8(quantized, tmp_path / "again.onnx", [calibration])
    with pytest.raises(ValueError, match="would overwrite its source"):
        quantize_fp8(source, source, [calibration])
    with pytest.raises(ValueError, match="no calibration images"):
        quantize_fp8(source, tmp_path / "none.onnx", [])
    names = [n.name for n in _weighted_nodes(onnx.load(str(source)))]
    with pytest.raises(ValueError, match="no MatMul/Gemm/Conv"):
        quantize_fp8(source, tmp_path / "none.onnx", [calibration], exclude=names)
    partial = quantize_fp8(source, tmp_path / "partial.onnx", [calibration], exclude=names[:1])
    assert partial["quantized_node_count"] == 5
    assert partial["skipped"] == [{"node": names[0], "op_type": "Conv", "reason": "excluded"}]
    assert sorted(p.name for p in source.parent.iterdir()) == ["model.fp8.onnx", "model.onnx"]  # no leftovers


def test_sarcnn_fp8_accuracy_on_the_real_checkpoint(iws_weights, tmp_path):
    """The trained SAR_CNN (random weights give logits ~1e-3 from cancellation: no yardstick)."""
    from iws_engine.export.onnx import export_onnx
    from iws_engine.export.targets import PROBE_SEED, SarcnnTarget

    target = SarcnnTarget(iws_weights)
    source = export_onnx(target.source, tmp_path / "model.onnx", input_shape=target.input_shape)
    quantize_fp8(source, tmp_path / "model.fp8.onnx", [target.probe_inputs(16, seed=PROBE_SEED + 1)])
    probes = target.probe_inputs(48)  # the parity probes: not the calibration images
    logits = _run(source, probes)[0]
    p = _sigmoid(logits)

    def error(path):
        got = _run(path, probes)[0]
        return _rel(logits, got), float(np.max(np.abs(_sigmoid(got) - p))), float(
            np.mean((_sigmoid(got) >= target.threshold) == (p >= target.threshold)))

    rel, dp, agree = error(tmp_path / "model.fp8.onnx")
    # measured 0.066, 0.050 (over the build's fp8 parity limit of 2e-2), 1.0; 6 quantized layers deep
    assert rel < 0.1 and dp < 0.1 and agree >= 0.95
    for factor in (0.1, 1e5):  # amax/10: saturation; amax×1e5: underflow
        bad_rel, bad_dp, _ = error(_with_activation_scales(tmp_path / "model.fp8.onnx", tmp_path / "bad.onnx", factor))
        assert bad_rel > 0.5 and bad_dp > 0.2  # measured 0.99 / 1.98 and 0.54 / 0.91


# ----------------------------------------------------------------------------- EVA02
@pytest.fixture(scope="module")
def eva02_fp8(tiny_eva02_weights, tmp_path_factory):
    from iws_engine.export.models.eva02 import Eva02Config, load_eva02_weights
    from iws_engine.export.onnx import export_onnx
    from iws_engine.export.targets import PROBE_SEED, _probe_png
    from iws_engine.pipeline_a import clip_spec_for
    from iws_engine.preprocess_clip import preprocess_clip_reference

    spec = clip_spec_for(TINY_INPUT[-1])

    def probes(n, seed):
        out = np.empty((n, *TINY_INPUT), np.float32)
        for i in range(n):
            preprocess_clip_reference(_probe_png(i, seed), spec, out=out[i])
        return out

    folder = tmp_path_factory.mktemp("eva02-fp8")
    source = export_onnx(load_eva02_weights(tiny_eva02_weights, Eva02Config.tiny()), folder / "model.onnx",
                         input_shape=TINY_INPUT)
    summary = quantize_fp8(source, folder / "model.fp8.onnx", [probes(8, PROBE_SEED + 1)])
    return source, folder / "model.fp8.onnx", summary, probes(16, PROBE_SEED)


def test_eva02_quantized_graph_keeps_attention_and_norms_in_fp32(eva02_fp8):
    source, quantized, summary, _ = eva02_fp8
    counts = _check_structure(source, quantized, summary)
    # per block: q, k, v, proj, fc1 gate, fc1 value, fc2 (7 Linear), + patch-embedding Conv + head Gemm;
    # q/k/v share one input (norm1), the two fc1s another (norm2): 4 activation pairs per block + 2
    assert counts == {"nodes": 2 * 7 + 2, "activations": 2 * 4 + 2, "weights": 16}
    assert summary["op_types"] == {"Conv": 1, "MatMul": 14, "Gemm": 1} and summary["source_opset"] == 18
    got = onnx.load(str(quantized), load_external_data=False)
    producers = {o: n for n in got.graph.node for o in n.output}
    untouched = [n for n in got.graph.node if n.op_type in ("MatMul", "Softmax", "LayerNormalization")
                 and n.name not in summary["quantized_nodes"]]
    assert sum(n.op_type == "MatMul" for n in untouched) == 2 * 2  # q·kᵀ and attention·v per block
    for node in untouched:
        assert all(producers.get(i) is None or producers[i].op_type not in ("DequantizeLinear", "QuantizeLinear")
                   for i in node.input)


def test_eva02_quantized_graph_has_its_own_external_data(eva02_fp8, tmp_path):
    source, quantized, summary, probes = eva02_fp8
    assert summary["external_data"]["file"] == "model.fp8.onnx.data"
    got = onnx.load(str(quantized), load_external_data=False)
    external = [t for t in got.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) == summary["external_data"]["tensors"] > 0
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"model.fp8.onnx.data"}
    assert all(int(next(e.value for e in t.external_data if e.key == "offset")) % 4096 == 0 for t in external)
    # moved away from the fp32 export, it still loads and runs
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("model.fp8.onnx", "model.fp8.onnx.data"):
        shutil.copy(quantized.parent / name, moved / name)
    np.testing.assert_array_equal(_run(moved / "model.fp8.onnx", probes[:2])[0], _run(quantized, probes[:2])[0])
    assert not any(p.name.startswith(".") for p in quantized.parent.iterdir())  # no temporary files left

    # an output whose data file is the source's own external data is refused before anything is written
    other = tmp_path / "other"
    other.mkdir()
    for name in ("model.onnx", "model.onnx.data"):
        shutil.copy(source.parent / name, other / name)
    shutil.copy(other / "model.onnx", other / "alias.onnx")  # its weights: model.onnx.data
    data = (other / "model.onnx.data").read_bytes()
    with pytest.raises(ValueError, match="would overwrite the source's external data"):
        quantize_fp8(other / "alias.onnx", other / "model.onnx", [probes])
    assert (other / "model.onnx.data").read_bytes() == data


def test_eva02_fp8_accuracy(eva02_fp8):
    source, quantized, summary, probes = eva02_fp8
    head = next(n.output[0] for n in onnx.load(str(source), load_external_data=False).graph.node
                if n.op_type == "Gemm")
    features, logits = _run(source, probes, (head,))
    features8, logits8 = _run(quantized, probes, (head,))
    rel = _rel(logits, logits8)
    assert rel < 0.15  # measured 0.074: 10 quantized layers deep, ~1.2 u
    # the wide random head saturates the softmax (logit std ~16): features move by up to 0.53
    assert float(np.max(np.abs(features8 - features))) < 0.75
    bad = _with_activation_scales(quantized, quantized.with_name("bad.onnx"), 0.1)
    assert _rel(logits, _run(bad, probes, (head,))[1]) > 5 * rel  # measured 0.82


# ----------------------------------------------------------------------------- iws-engine build
def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@pytest.mark.skipif(_importable("tensorrt"), reason="TensorRT is importable here: the error cannot occur")
def test_build_fp8_without_tensorrt_fails_before_any_work(random_weights, tmp_path):
    from iws_engine.export.synth import generate

    calib = tmp_path / "calib"
    generate(calib, 2, fmt="rgba16", size=(96, 80), seed=4)
    for calib_dir in (None, calib):  # --calib is accepted for fp8, and refused by nothing before TensorRT
        out = tmp_path / f"trt-{calib_dir is not None}"
        with pytest.raises(BackendError, match=r"TensorRT is not installed: `import tensorrt` failed"):
            build.build(weights_path=random_weights, backend="tensorrt", precision="fp8", out_dir=out,
                        calib_dir=calib_dir)
        assert not out.exists() or not any(out.iterdir())  # no export, no quantization, no manifest


def test_build_quantizes_the_export_with_calib_or_probes(random_weights, tmp_path):
    """The fp8 branch of the TensorRT build up to the engine: model.fp8.onnx and its manifest record."""
    from iws_engine.export.onnx import export_onnx
    from iws_engine.export.synth import generate
    from iws_engine.export.targets import PROBE_SEED, SarcnnTarget

    target = SarcnnTarget(random_weights)
    target.default_probes = 6  # this instance only: a short fallback calibration
    calib = tmp_path / "calib"
    generate(calib, 5, fmt="rgba16", size=(96, 80), seed=3)
    for files in (build.calibration_files(calib), None):
        out = tmp_path / ("calib" if files else "probes") / "artefact"
        onnx_path = export_onnx(target.source, out / "model.onnx", input_shape=target.input_shape)
        path, record = build.quantize_onnx_fp8(target, onnx_path, out, files)
        assert path == out / build.FP8_ONNX and has_explicit_quantization(path)
        check_quantization("fp8", path, has_calibrator=False)  # what build_engine checks before TensorRT
        assert record["onnx"] == build.FP8_ONNX and record["quantized_node_count"] == 6
        assert record["calibration"]["method"] == "max"
        if files:
            assert record["calibration"]["source"] == "--calib" and record["calibration"]["images"] == 5
        else:
            assert record["calibration"]["source"] == "probes" and record["calibration"]["images"] == 6
            assert record["calibration"]["seed"] == PROBE_SEED + build.FP8_PROBE_SEED_OFFSET != PROBE_SEED
            assert "fallback" in record["calibration"]["note"]
        json.dumps(record)  # goes into manifest.json as is
