"""Pipeline A on the engine's backends and `iws-engine build --model eva02xgb` (CPU; the tiny EVA02).

The tiny EVA02 has the full architecture (patch embedding, rotary attention, SwiGLU, average
pool, 1,000-class head) at 56 px and 2 blocks, with a wide head so its softmax features differ
from image to image and a wrong backend shows.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import XGBOOST_MODEL, require, run_cli

pytest.importorskip("xgboost")
TINY_INPUT = (3, 56, 56)
FEATURES = (1000,)


@pytest.fixture(scope="module")
def xgboost_model() -> Path:
    return require(XGBOOST_MODEL)


@pytest.fixture(scope="module")
def tiny_eva(tiny_eva02_weights):
    from iws_engine.export.models.eva02 import Eva02Config, load_eva02_weights

    return load_eva02_weights(tiny_eva02_weights, Eva02Config.tiny())


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    from iws_engine.pipeline_a import clip_spec_for
    from iws_engine.export.targets import _probe_png
    from iws_engine.preprocess_clip import preprocess_clip_reference

    spec = clip_spec_for(56)
    return np.stack([preprocess_clip_reference(_probe_png(i, 11), spec) for i in range(5)])


def eager_features(eva, x: np.ndarray, precision: str = "fp32") -> np.ndarray:
    """The reference: logits from the model itself (under bf16 autocast for "bf16"), softmax in float32."""
    import torch

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        return eva.model(torch.from_numpy(x)).float().softmax(dim=-1).numpy()


def test_the_inputs_make_distinct_features(tiny_eva, x):
    features = eager_features(tiny_eva, x)
    assert features.shape == (5, 1000)
    np.testing.assert_allclose(features.sum(axis=1), 1.0, atol=1e-5)
    assert np.ptp(features.max(axis=1)) > 0.05  # otherwise a parity check could not fail


def test_dynamo_onnx_export_with_external_data_and_dynamic_batch(tiny_eva, x, tmp_path):
    import onnx
    import onnxruntime as ort

    from iws_engine.export.onnx import DYNAMO_OPSET, export_onnx

    path = export_onnx(tiny_eva, tmp_path / "model.onnx", input_shape=TINY_INPUT)
    data = tmp_path / "model.onnx.data"
    assert path.is_file() and data.is_file() and data.stat().st_size > path.stat().st_size  # weights live outside
    model = onnx.load(str(path), load_external_data=False)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == DYNAMO_OPSET
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim][0] == "batch"
    assert model.graph.output[0].name == "features"
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    want = eager_features(tiny_eva, x)
    for n in (1, 5):  # the batch axis is dynamic
        (got,) = session.run(None, {"input": x[:n]})
        assert got.shape == (n, 1000)
        np.testing.assert_allclose(got, want[:n], rtol=0, atol=2e-5)  # wide head: logits ~±30 amplify rounding
    again = export_onnx(tiny_eva, tmp_path / "model.onnx", input_shape=TINY_INPUT)  # re-export replaces, not appends
    assert again == path and (tmp_path / "model.onnx.data").stat().st_size == data.stat().st_size


@pytest.mark.parametrize(("backend", "precision", "tolerance"), [
    ("torch", "fp32", 1e-6), ("onnxruntime", "fp32", 2e-5), ("torch", "bf16", 1e-6), ("inductor", "fp32", 2e-5),
])
def test_backends_give_eva02_features(tiny_eva, x, backend, precision, tolerance):
    """Each backend computes what its precision defines (the wide test head makes bf16 differ from
    fp32 by up to 0.07 on these inputs, so bf16 is checked against bf16 autocast)."""
    import torch

    from iws_engine import backends

    want = eager_features(tiny_eva, x, precision)
    with backends.create(backend, precision=precision).load(tiny_eva, TINY_INPUT, FEATURES) as b:
        got = b.infer(x)
        into_tensor = torch.full((5, 1000), float("nan"))
        b.infer(x, into_tensor)  # a torch destination (on a GPU: device to device)
    assert got.shape == (5, 1000) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance)
    np.testing.assert_array_equal(into_tensor.numpy(), got)


def test_backend_refuses_an_output_buffer_of_the_wrong_shape(tiny_eva, x):
    from iws_engine import backends

    with backends.create("torch").load(tiny_eva, TINY_INPUT, FEATURES) as b:
        with pytest.raises(ValueError, match=r"output buffer shape \(5,\) != \(5, 1000\)"):
            b.infer(x, np.empty(5, np.float32))


def test_each_backend_gets_its_own_copy_of_the_network(tiny_eva):
    """Inductor casts its module to fp16/bf16 in place: that must not touch the parity reference's weights."""
    import torch

    from iws_engine.export.models import build_model

    first, second = build_model(tiny_eva), build_model(tiny_eva)
    first.to(torch.bfloat16)
    assert first.model.head.weight.dtype == torch.bfloat16
    assert second.model.head.weight.dtype == tiny_eva.model.head.weight.dtype == torch.float32
    assert first.model.head.weight.data_ptr() != tiny_eva.model.head.weight.data_ptr()


def _target(weights, xgboost_model):
    from iws_engine.export.targets import Eva02XgbTarget

    return Eva02XgbTarget(weights, xgboost_model, eva_config="tiny")


def test_build_eva02xgb_onnxruntime_manifest_cache_and_classify(tiny_eva02_weights, xgboost_model, tmp_path):
    from iws_engine.export import build
    from iws_engine.export.synth import generate
    from iws_engine.pipeline_a import PIPELINE_A_THRESHOLD, EvaXgbClassifier

    out = tmp_path / "art"
    m = build.build(target=_target(tiny_eva02_weights, xgboost_model), backend="onnxruntime", precision="fp32",
                    out_dir=out, probes=6, profile=build.BatchProfile(1, 4, 16))
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["model"] == "eva02xgb" and m["eva_config"] == "tiny" and m["trained"] is True
    assert m["threshold"] == PIPELINE_A_THRESHOLD
    assert m["output"]["shape"] == ["batch", 1000] and m["input"]["shape"] == ["batch", *TINY_INPUT]
    assert m["preprocess"]["size"] == 56 and m["preprocess"]["interpolation"] == "pil-bicubic"
    assert m["xgboost_sha256"] == build.sha256_file(xgboost_model)
    assert m["artefact"] == "model.onnx"
    assert m["artefact_data"] == {"model.onnx.data": build.sha256_file(out / "model.onnx.data")}
    parity = m["parity"]
    assert parity["passed"] and parity["probes"] == 6 and parity["max_abs_dfeature"] <= 1e-4
    assert parity["max_abs_dp"] <= 1e-4 and parity["decision_agreement"] == 1.0
    again = build.build(target=_target(tiny_eva02_weights, xgboost_model), backend="onnxruntime", precision="fp32",
                        out_dir=out, probes=6, profile=build.BatchProfile(1, 4, 16))
    assert again["built_at"] == m["built_at"]  # cache hit

    pngs = tmp_path / "pngs"
    generate(pngs, 3, fmt="rgba16", size=(70, 64), seed=8)
    with EvaXgbClassifier(artifacts=out) as a, EvaXgbClassifier(xgboost_model, tiny_eva02_weights, eva_config="tiny",
                                                                backend="torch") as b:
        rows_a, rows_b = list(a.classify([pngs])), list(b.classify([pngs]))
        assert a.runtime.startswith("onnxruntime fp32") and b.runtime.startswith("torch fp32")
    assert [r.model_id for r in rows_a] == [r.model_id for r in rows_b]
    np.testing.assert_allclose([r.score for r in rows_a], [r.score for r in rows_b], rtol=0, atol=1e-6)


def test_eva02xgb_artefact_refuses_changed_files(tiny_eva02_weights, xgboost_model, tmp_path):
    from iws_engine.export import build

    out = tmp_path / "art"
    build.build(target=_target(tiny_eva02_weights, xgboost_model), backend="onnxruntime", precision="fp32",
                out_dir=out, probes=2)
    data = out / "model.onnx.data"
    original = data.read_bytes()
    data.write_bytes(original[:-4] + b"\0\0\0\1")
    with pytest.raises(build.BuildError, match="model.onnx.data: artefact data changed"):
        build.load_artifacts(out)
    data.write_bytes(original)
    xgb = tmp_path / "xgb.json"
    xgb.write_bytes(xgboost_model.read_bytes())
    m = json.loads((out / "manifest.json").read_text())
    m["xgboost"] = str(xgb)
    (out / "manifest.json").write_text(json.dumps(m))
    xgb.write_bytes(xgboost_model.read_bytes().replace(b'"550"', b'"550" ', 1))  # same model, other bytes
    with pytest.raises(build.BuildError, match="changed since the build"):
        build.load_artifacts(out)


def test_eva02xgb_gate_catches_other_weights(tiny_eva, tiny_eva02_weights, xgboost_model, x):
    from iws_engine import backends
    from iws_engine.export import build
    from iws_engine.export.models.eva02 import Eva02Config, random_eva02

    target = _target(tiny_eva02_weights, xgboost_model)
    other = random_eva02(Eva02Config.tiny(), seed=99)
    with backends.create("torch").load(tiny_eva, TINY_INPUT, FEATURES) as ref, \
            backends.create("onnxruntime").load(other, TINY_INPUT, FEATURES) as cand:
        result = build.parity(cand, ref, x, target.threshold, batch=2, scores=target.scores)
    assert result["max_abs_dfeature"] > 1e-2
    with pytest.raises(build.BuildError, match=r"max \|dfeature\|"):
        build.gate(result, "fp32")


def test_cli_build_eva02xgb_then_classify_with_artifacts(tiny_eva02_weights, xgboost_model, tmp_path):
    from iws_engine.export.synth import generate

    out = tmp_path / "art"
    r = run_cli("build", "--model", "eva02xgb", "--eva-config", "tiny", "--weights", tiny_eva02_weights,
                "--xgboost", xgboost_model, "--backend", "onnxruntime", "--probes", "4", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "max |dfeature|" in r.stdout and "eva02_tiny@" in r.stdout
    pngs = tmp_path / "pngs"
    generate(pngs, 2, fmt="rgb8", size=(64, 64), seed=2)
    c = run_cli("classify", pngs, "--artifacts", out, "--no-progress")
    assert c.returncode == 0, c.stderr
    assert "onnxruntime fp32" in c.stderr and c.stdout.count("+xgb:pipeline_a_xgboost@") == 2
    wrong = run_cli("classify", pngs, "--model", "sarcnn", "--artifacts", out)
    assert wrong.returncode == 2 and "built for --model eva02xgb, not sarcnn" in wrong.stderr
    missing = run_cli("build", "--model", "eva02xgb", "--eva-config", "tiny", "-o", tmp_path / "x")
    assert missing.returncode == 2 and "--xgboost FILE" in missing.stderr


# ----------------------------------------------------------------------------- on the GPU (bench/gpu_check.sh)
def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA device: torch.cuda.is_available() is False")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_gpu_inductor_eva02_features_with_cuda_graphs(tiny_eva, x, precision):
    """Inductor with per-batch-size CUDA graphs writes EVA02 features straight into a device tensor."""
    import torch

    from iws_engine import backends

    with backends.create("torch", precision=precision, device="cuda").load(tiny_eva, TINY_INPUT, FEATURES) as eager:
        want = eager.infer(x)
    with backends.create("inductor", precision=precision, device="cuda").load(tiny_eva, TINY_INPUT,
                                                                              FEATURES) as compiled:
        on_device = torch.empty((5, 1000), device="cuda")
        compiled.infer(x[:4], on_device[:4])  # captures the 4-graph
        compiled.infer(x[4:], on_device[4:])  # 1 row: its own graph (padding 4x is too wasteful)
        info = compiled.info()
    assert info["graph_batch_sizes"] == [1, 4] and not info["graph_failures"]
    got = on_device.cpu().numpy()
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-4)
    # converted weights (inductor) vs autocast (eager) at the same precision; the wide head amplifies rounding
    assert np.max(np.abs(got - want)) <= 0.1


@pytest.mark.gpu
@needs_cuda
def test_gpu_pipeline_a_keeps_features_on_the_device(tiny_eva02_weights, xgboost_model, tmp_path):
    """On CUDA with a GPU XGBoost, features go from the backend to XGBoost in device memory; the scores
    equal the CPU pipeline's."""
    import torch

    from iws_engine.export.synth import generate
    from iws_engine.pipeline_a import EvaXgbClassifier
    from iws_engine.xgboost_stage import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(f"GPU XGBoost predictor unavailable: {reason}")
    pngs = tmp_path / "pngs"
    generate(pngs, 6, fmt="rgba16", size=(80, 70), seed=3)
    with EvaXgbClassifier(xgboost_model, tiny_eva02_weights, eva_config="tiny", device="cuda",
                          backend="torch") as gpu, \
            EvaXgbClassifier(xgboost_model, tiny_eva02_weights, eva_config="tiny", device="cpu") as cpu:
        assert isinstance(gpu._features, torch.Tensor) and gpu._features.is_cuda and gpu.xgboost.on_gpu
        gpu_rows, cpu_rows = list(gpu.classify([pngs])), list(cpu.classify([pngs]))
    assert all(r.ok for r in gpu_rows)
    # eager fp32 on CUDA (TF32 off) against the CPU: the wide head turns ~1e-6 logit noise into ~1e-5
    np.testing.assert_allclose([r.score for r in gpu_rows], [r.score for r in cpu_rows], rtol=0, atol=1e-4)


@pytest.mark.gpu
@needs_cuda
def test_gpu_build_eva02xgb_inductor_bf16(xgboost_model, tmp_path):
    """`build --model eva02xgb --backend inductor --precision bf16 --device cuda` on the tiny random EVA02."""
    from iws_engine.export import build
    from iws_engine.export.targets import Eva02XgbTarget

    target = Eva02XgbTarget(None, xgboost_model, eva_config="tiny", xgboost_device="cuda")
    m = build.build(target=target, backend="inductor", precision="bf16", device="cuda", out_dir=tmp_path / "a",
                    probes=8, profile=build.BatchProfile(1, 8, 8))
    assert m["parity"]["passed"] and m["environment"]["gpu"] and m["environment"]["compute_capability"]
    assert m["trained"] is False and "random-untrained" in m["model_id"]
