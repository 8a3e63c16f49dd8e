"""The fast CPU precisions: ONNX Runtime INT8 (QDQ, calibrated) and inductor bf16, each parity-gated on the model.

The gate's verdicts that matter are on the real IWS checkpoint (skipped, naming the file, without
../shared/reference); random weights give a real failing case: their logits sit at ~1e-3, so INT8
noise flips decisions at the threshold.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from iws_engine import backends
from iws_engine.backends import BackendError
from iws_engine.export import build
from iws_engine.export.artifact_cache import CACHE_ENV, FAILED_MANIFEST, cache_root, needs_artefact
from tests.conftest import cached_int8_folder, check_bench_model_runs_int8, csv_scores, run_cli


@pytest.fixture(scope="module", autouse=True)
def artefact_cache(module_artefact_cache):
    """Every test here builds into, and reads, one cache of its own."""
    return module_artefact_cache



def _int8_folder(weights) -> Path:
    return cached_int8_folder(weights, "onnxruntime")


# ----------------------------------------------------------------------------- INT8, real checkpoint
@pytest.fixture(scope="module")
def int8_classified(iws_weights, rgba16_vignettes):
    """classify --precision int8 without an artefact: builds (gates) and caches it; and the fp32 run."""
    from iws_engine.api import Classifier

    int8 = run_cli("classify", rgba16_vignettes, "--weights", iws_weights, "--precision", "int8", "--no-progress")
    with Classifier(iws_weights) as clf:
        fp32 = {r.path: r.score for r in clf.classify([rgba16_vignettes])}
    return int8, fp32


def test_int8_classify_builds_a_gated_artefact_on_the_real_checkpoint(int8_classified, iws_weights):
    int8, fp32 = int8_classified
    assert int8.returncode == 0, int8.stderr
    assert "onnxruntime int8, parity-gated: max |dp| 0.01" in int8.stderr and "on 48 probes" in int8.stderr
    m = json.loads((_int8_folder(iws_weights) / "manifest.json").read_text())
    assert m["model_sha256"] == build.sha256_file(iws_weights) and m["artefact"] == build.INT8_ONNX
    p = m["parity"]
    # measured on the 48 probes: max |dp| 0.0134, decision agreement 1.0
    assert p["passed"] and p["probes"] == 48 and p["max_abs_dp"] <= 2e-2 and p["decision_agreement"] >= 0.995
    q = m["artefact_build"]["quantization"]
    assert q["op_types"] == {"Conv": 4, "Gemm": 2} and q["calibration"]["source"] == "probes"
    assert q["weights"]["granularity"] == "per output channel" and q["activations"]["type"] == "uint8"
    # on images that are not the probes, the scores stay within the gate's limit of fp32
    got, ref = csv_scores(int8.stdout), fp32
    assert got.keys() == ref.keys() and len(got) == 8
    assert max(abs(got[k] - ref[k]) for k in got) <= 2e-2
    assert got != ref  # it did run quantized


def test_int8_graph_runs_as_fused_integer_kernels(int8_classified, iws_weights, tmp_path):
    """ONNX Runtime fuses every Q/DQ-wrapped Conv and Gemm into QLinearConv/QGemm (VNNI/AMX kernels)."""
    import onnx
    import onnxruntime as ort

    folder = _int8_folder(iws_weights)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(str(folder / build.INT8_ONNX), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 4 and ops.count("QGemm") == 2
    assert "Conv" not in ops and "Gemm" not in ops and "Relu" not in ops


def test_int8_artefact_reused_by_classify_artifacts(int8_classified, iws_weights, rgba16_vignettes):
    int8, _ = int8_classified
    folder = _int8_folder(iws_weights)
    built_at = json.loads((folder / "manifest.json").read_text())["built_at"]
    again = run_cli("classify", rgba16_vignettes, "--artifacts", folder, "--no-progress")
    assert again.returncode == 0 and again.stdout == int8.stdout
    assert json.loads((folder / "manifest.json").read_text())["built_at"] == built_at  # not rebuilt


def test_a_cached_artefact_runs_on_the_threads_the_caller_gives(int8_classified, iws_weights, rgba16_vignettes):
    """A reprocess worker asks for one thread: the INT8 artefact's session must use one, not every core."""
    from iws_engine.api import Classifier

    folder = _int8_folder(iws_weights)
    for threads in (1, 2):
        with Classifier(artifacts=folder, threads=threads) as clf:
            opts = clf.backend._session.get_session_options()
            assert clf.backend.threads == threads and opts.intra_op_num_threads == threads
    with Classifier(iws_weights, precision="int8", threads=1) as clf:  # the cached artefact, through the cache
        assert clf.backend._session.get_session_options().intra_op_num_threads == 1
        assert len(list(clf.classify([rgba16_vignettes]))) == 8


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_int8_bad_calibration_is_refused_with_its_figures(iws_weights, tmp_path, backend):
    """--calib reaches the quantizer (both INT8 backends build the same graph): two flat grey images give ranges
    far too narrow for real inputs."""
    if backend == "openvino":
        pytest.importorskip("openvino", reason="openvino is not installed (pip install 'iws-engine[openvino]')")
    from iws_engine.export.synth import encode_png

    calib = tmp_path / "flat"
    calib.mkdir()
    for i, level in enumerate((0.45, 0.5)):
        (calib / f"flat{i}.png").write_bytes(encode_png(np.full((528, 539), level), "gray8"))
    out = tmp_path / "art"
    r = run_cli("build", "--weights", iws_weights, "--backend", backend, "--precision", "int8",
                "--calib", calib, "-o", out)
    assert r.returncode == 2
    # measured: max |dp| 0.774, decision agreement 0.6667
    assert "parity gate failed for int8: max |dp| " in r.stderr and "(limit 0.02)" in r.stderr
    assert "(min 0.995)" in r.stderr
    assert not (out / "manifest.json").exists()
    failed = json.loads((out / FAILED_MANIFEST).read_text())
    assert failed["backend"] == backend and failed["parity"]["passed"] is False
    assert failed["parity"]["max_abs_dp"] > 2e-2
    assert failed["calibration"]["images"] == 2
    assert failed["artefact_build"]["quantization"]["calibration"]["source"] == "--calib"


# ----------------------------------------------------------------------------- INT8, refusal in classify
def test_classify_int8_refused_by_the_gate_prints_figures_and_remembers(random_weights, rgba16_vignettes):
    """Random weights: logits ~1e-3 around threshold 0.5, so INT8 flips decisions (measured agreement 0.94)."""
    first = run_cli("classify", rgba16_vignettes, "--weights", random_weights, "--precision", "int8", "--no-progress")
    assert first.returncode == 2 and first.stdout == ""
    assert "parity gate failed for int8" in first.stderr and "decision agreement 0." in first.stderr
    second = run_cli("classify", rgba16_vignettes, "--weights", random_weights, "--precision", "int8", "--no-progress")
    assert second.returncode == 2
    assert first.stderr.strip().splitlines()[-1] in second.stderr  # the same figures ...
    assert "delete " in second.stderr and "to build again" in second.stderr  # ... from the recorded refusal


# ----------------------------------------------------------------------------- bf16, real checkpoint
def test_inductor_bf16_on_cpu_is_gated_and_agrees_with_fp32(iws_weights, rgba16_vignettes):
    from iws_engine.api import Classifier

    with Classifier(iws_weights, backend="inductor", precision="bf16") as bf16, Classifier(iws_weights) as fp32:
        p = bf16.manifest["parity"]
        # measured: max |dp| 0.0027 (a wholesale bf16 conversion: 0.0076, over the limit)
        assert p["passed"] and p["decision_agreement"] == 1.0 and p["max_abs_dp"] <= 5e-3
        assert bf16.backend.info()["autocast"] is True and bf16.runtime == "inductor bf16"
        got = [r.score for r in bf16.classify([rgba16_vignettes])]
        ref = [r.score for r in fp32.classify([rgba16_vignettes])]
        # the CPU loader writes bfloat16 batches for it (the native core rounds the float32 input), and they score
        # exactly as the float32 batches do: autocast's first convolution rounds those the same way
        import torch

        assert bf16.backend.input_dtype == "bfloat16" and bf16.loader.input_dtype == "bfloat16"
        assert fp32.backend.input_dtype == "float32" and fp32.loader.input_dtype == "float32"
        files = sorted(rgba16_vignettes.glob("*.png"))
        (half,), (full,) = bf16.loader.batches(files), fp32.loader.batches(files)
        assert half.inputs.dtype == torch.bfloat16 and full.inputs.dtype == np.float32
        assert torch.equal(half.inputs, torch.from_numpy(full.inputs).to(torch.bfloat16))
        np.testing.assert_array_equal(bf16.predict(half.inputs), bf16.predict(full.inputs))
    assert np.max(np.abs(np.subtract(got, ref))) <= 5e-3


# ----------------------------------------------------------------------------- seams
def test_onnxruntime_int8_runs_only_a_quantized_graph(random_weights, tmp_path):
    from iws_engine.export import weights as weights_io
    from iws_engine.export.onnx import export_onnx

    loaded = weights_io.load(random_weights)
    with pytest.raises(BackendError, match="iws-engine build --backend onnxruntime --precision int8"):
        backends.create("onnxruntime", precision="int8").load(loaded, (1, 256, 256))
    fp32_graph = export_onnx(loaded, tmp_path / "model.onnx")
    with pytest.raises(BackendError, match="holds no INT8 Q/DQ nodes"):
        backends.create("onnxruntime", precision="int8").load(fp32_graph, (1, 256, 256))
    with pytest.raises(BackendError, match="precision 'fp16' is not supported"):
        backends.create("onnxruntime", precision="fp16")


def test_which_precisions_are_gated_on_first_use(monkeypatch, tmp_path):
    assert needs_artefact("onnxruntime", "int8") and needs_artefact("inductor", "bf16", "cpu")
    assert not needs_artefact("inductor", "bf16", "cuda:0")  # GPU paths: unchanged, not measured here
    assert not needs_artefact("onnxruntime", "fp32") and not needs_artefact("torch", "bf16")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "iws-engine"


def test_quantize_int8_refuses_what_it_cannot_do(random_weights, tmp_path):
    from iws_engine.export import weights as weights_io
    from iws_engine.export.onnx import export_onnx
    from iws_engine.export.quantize_int8 import quantize_int8

    source = export_onnx(weights_io.load(random_weights), tmp_path / "model.onnx")
    x = np.random.default_rng(0).standard_normal((2, 1, 256, 256)).astype(np.float32)
    with pytest.raises(ValueError, match="would overwrite its source"):
        quantize_int8(source, source, [x])
    with pytest.raises(ValueError, match="calibration method must be one of"):
        quantize_int8(source, tmp_path / "q.onnx", [x], method="mse")
    with pytest.raises(ValueError, match="no node named"):
        quantize_int8(source, tmp_path / "q.onnx", [x], exclude=["no-such-node"])
    with pytest.raises(ValueError, match="non-finite"):
        quantize_int8(source, tmp_path / "q.onnx", [np.full_like(x, np.nan)])
    assert not (tmp_path / "q.onnx").exists()
    summary = quantize_int8(source, tmp_path / "q.onnx", [x], exclude=["/block1/conv/Conv"])
    assert summary["quantized_node_count"] == 5 and summary["excluded"] == ["/block1/conv/Conv"]
    assert summary["calibration"]["images"] == 2
    with pytest.raises(ValueError, match="already holds Q/DQ nodes"):
        quantize_int8(tmp_path / "q.onnx", tmp_path / "q2.onnx", [x])


def test_calib_is_refused_where_nothing_calibrates(random_weights, tmp_path):
    with pytest.raises(build.BuildError, match="--calib is only used by"):
        build.build(weights_path=random_weights, backend="onnxruntime", precision="fp32", out_dir=tmp_path / "a",
                    calib_dir=tmp_path)


def test_bench_model_mode_measures_int8_next_to_fp32(iws_weights, int8_classified):
    """`iws-engine bench --config onnxruntime:int8` runs the gated artefact classify built (a cache hit here)."""
    check_bench_model_runs_int8(iws_weights, "onnxruntime")


def test_int8_on_onnxruntime_is_refused_for_eva02_before_any_export(tmp_path):
    pytest.importorskip("xgboost", reason="xgboost (xgboost-cpu) is not installed")
    from iws_engine.export.targets import Eva02XgbTarget
    from tests.conftest import XGBOOST_MODEL, require

    target = Eva02XgbTarget(None, require(XGBOOST_MODEL), eva_config="tiny")
    with pytest.raises(build.BuildError, match="quantizes SAR_CNN only, not eva02xgb"):
        build.build(target=target, backend="onnxruntime", precision="int8", out_dir=tmp_path / "art")
    assert not (tmp_path / "art").exists()
