"""The openvino backend: the gated INT8 QDQ graph (export/quantize_int8.py) on OpenVINO's CPU plugin, and fp32.

OpenVINO runs the very graph ONNX Runtime's int8 runs and, measured on the real IWS checkpoint,
gives the same probabilities (|dp| 0 on 32 vignettes), faster (README, "Fast CPU precisions"). The
gate's verdicts that matter are on the real checkpoint (skipped, naming the file, without
../shared/reference); random weights give a real failing case (logits ~1e-3 around the threshold).
Tests that run OpenVINO skip, saying how to install it, where the package is missing (it is in the
`test` extra, so CI runs them).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from iws_engine import backends
from iws_engine.backends import BackendError
from iws_engine.backends.base import sigmoid
from iws_engine.export import build
from iws_engine.export.artifact_cache import needs_artefact
from tests.conftest import cached_int8_folder, check_bench_model_runs_int8, csv_scores, run_cli

requires_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None,
    reason="openvino is not installed (pip install 'iws-engine[openvino]'; the test extra has it)")


@pytest.fixture(scope="module", autouse=True)
def artefact_cache(module_artefact_cache):
    """Every test here builds into, and reads, one cache of its own."""
    return module_artefact_cache



def _folder(weights, backend: str = "openvino") -> Path:
    return cached_int8_folder(weights, backend)


# ----------------------------------------------------------------------------- without the package
def test_missing_openvino_is_a_backend_error_saying_how_to_install(monkeypatch, random_weights):
    from iws_engine.export import weights as weights_io

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(BackendError, match=r"openvino package is not installed .*pip install 'iws-engine\[openvino\]'"):
        backends.create("openvino").load(weights_io.load(random_weights), (1, 256, 256))


def test_openvino_is_not_imported_by_the_package():
    code = "import sys, iws_engine, iws_engine.backends, iws_engine.api; print('openvino' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_openvino_seams_refuse_what_it_cannot_run():
    with pytest.raises(BackendError, match="precision 'fp16' is not supported"):
        backends.create("openvino", precision="fp16")
    with pytest.raises(BackendError, match="runs on the CPU only"):
        backends.create("openvino", precision="int8", device="cuda")
    assert needs_artefact("openvino", "int8") and not needs_artefact("openvino", "fp32")


# ----------------------------------------------------------------------------- INT8, real checkpoint
@pytest.fixture(scope="module")
def int8_classified(iws_weights, rgba16_vignettes):
    """classify --backend openvino --precision int8 without an artefact: builds (gates) and caches it."""
    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'iws-engine[openvino]')")
    from iws_engine.api import Classifier

    int8 = run_cli("classify", rgba16_vignettes, "--weights", iws_weights, "--backend", "openvino", "--precision", "int8",
                   "--no-progress")
    with Classifier(iws_weights) as clf:
        fp32 = {r.path: r.score for r in clf.classify([rgba16_vignettes])}
    return int8, fp32


@requires_openvino
def test_openvino_int8_classify_builds_a_gated_artefact_on_the_real_checkpoint(int8_classified, iws_weights):
    int8, fp32 = int8_classified
    assert int8.returncode == 0, int8.stderr
    assert "openvino int8, parity-gated: max |dp| 0.01" in int8.stderr and "on 48 probes" in int8.stderr
    m = json.loads((_folder(iws_weights) / "manifest.json").read_text())
    assert m["backend"] == "openvino" and m["artefact"] == build.INT8_ONNX
    assert m["model_sha256"] == build.sha256_file(iws_weights)
    p = m["parity"]
    # measured on the 48 probes: max |dp| 0.0134 (as ONNX Runtime on the same graph), decision agreement 1.0
    assert p["passed"] and p["probes"] == 48 and p["max_abs_dp"] <= 2e-2 and p["decision_agreement"] >= 0.995
    q = m["artefact_build"]["quantization"]
    assert q["op_types"] == {"Conv": 4, "Gemm": 2} and q["calibration"]["source"] == "probes"
    # the artefact is bound to the OpenVINO that gated it
    from importlib.metadata import version

    assert m["environment"]["openvino"] == version("openvino")
    other = {**m, "environment": {**m["environment"], "openvino": "2020.1.0"}}
    assert any(w.startswith("openvino '2020.1.0' (built)") for w in build.mismatch(other, build.environment("cpu")))
    # on images that are not the probes, the scores stay within the gate's limit of fp32
    got = csv_scores(int8.stdout)
    assert got.keys() == fp32.keys() and len(got) == 8
    assert max(abs(got[k] - fp32[k]) for k in got) <= 2e-2
    assert got != fp32  # it did run quantized


@requires_openvino
def test_openvino_int8_equals_onnxruntime_int8_on_the_same_graph(int8_classified, iws_weights):
    """Same QDQ graph, same integer arithmetic: measured |dp| 0 between the two runtimes; and a batch's
    scores do not depend on the batch size (one compiled model, dynamic batch)."""
    from iws_engine.export.targets import PROBE_SEED, SarcnnTarget

    graph = _folder(iws_weights) / build.INT8_ONNX
    target = SarcnnTarget(iws_weights)
    x = target.probe_inputs(16, seed=PROBE_SEED + 7)  # neither the parity probes nor the calibration images
    ov = backends.create("openvino", precision="int8").load(graph, target.input_shape)
    ort = backends.create("onnxruntime", precision="int8").load(graph, target.input_shape)
    p_ov, p_ort = sigmoid(ov.infer(x)), sigmoid(ort.infer(x))
    assert np.max(np.abs(p_ov - p_ort)) <= 1e-5
    # a batch is split over the streams (one per core); smaller batches run on one stream with all threads
    one_by_one = np.concatenate([sigmoid(ov.infer(x[i:i + 1])) for i in range(4)])
    uneven = np.concatenate([sigmoid(ov.infer(x[i:i + 3])) for i in range(0, 15, 3)])
    one_stream = backends.create("openvino", precision="int8", streams=1).load(graph, target.input_shape)
    assert np.max(np.abs(one_by_one - p_ov[:4])) <= 1e-5 and np.max(np.abs(uneven - p_ov[:15])) <= 1e-5
    assert np.max(np.abs(sigmoid(one_stream.infer(x)) - p_ov)) <= 1e-5
    info = ov.info()
    assert info["openvino"] and info["precision"] == "int8" and info["streams"] == min(2, info["threads"])
    assert one_stream.info()["streams"] == 1
    with pytest.raises(BackendError, match="iws-engine build --backend openvino --precision int8"):
        backends.create("openvino", precision="int8").load(target.source, target.input_shape)
    with pytest.raises(BackendError, match="holds no INT8 Q/DQ nodes"):
        backends.create("openvino", precision="int8").load(graph.with_name("model.onnx"), target.input_shape)


@requires_openvino
def test_openvino_int8_artefact_reused_by_classify_artifacts(int8_classified, iws_weights, rgba16_vignettes):
    int8, _ = int8_classified
    folder = _folder(iws_weights)
    built_at = json.loads((folder / "manifest.json").read_text())["built_at"]
    again = run_cli("classify", rgba16_vignettes, "--artifacts", folder, "--no-progress")
    assert again.returncode == 0 and again.stdout == int8.stdout
    assert json.loads((folder / "manifest.json").read_text())["built_at"] == built_at  # not rebuilt


@requires_openvino
def test_bench_model_mode_measures_openvino_int8(iws_weights, int8_classified):
    """`iws-engine bench --config openvino:int8` runs the gated artefact classify built (a cache hit here)."""
    check_bench_model_runs_int8(iws_weights, "openvino")


# ----------------------------------------------------------------------------- fp32
@requires_openvino
def test_openvino_fp32_matches_eager_and_is_thread_safe(random_weights):
    """fp32 stays fp32 (OpenVINO would otherwise run bf16 on AVX-512 BF16 CPUs), and concurrent callers each
    get their own infer request."""
    from iws_engine.export import weights as weights_io
    from iws_engine.export.targets import SarcnnTarget

    target = SarcnnTarget()  # the embedded trained model: logits of order 1, not ~1e-3
    x = target.probe_inputs(8)
    ref = backends.create("torch").load(target.source, target.input_shape).infer(x)
    ov = backends.create("openvino", precision="fp32").load(target.source, target.input_shape)
    got = ov.infer(x)
    assert np.max(np.abs(got - ref)) <= 1e-4 and np.max(np.abs(ref)) > 0.1
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: ov.infer(x[i:i + 2]), [0, 2, 4, 6] * 3))
    assert np.array_equal(np.concatenate(results[:4]), got)
    assert all(np.array_equal(results[i], results[i % 4]) for i in range(12))
    out = np.full((2,), np.nan, np.float32)
    assert ov.infer(x[:2], out) is out and np.array_equal(out, got[:2])
    rnd = weights_io.load(random_weights)  # weights given directly load too (no artefact for fp32)
    assert backends.create("openvino").load(rnd, target.input_shape).infer(x).shape == (8,)
