"""`iws-engine build`: artefact + manifest, parity gate, cache keyed by the manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest

from iws_engine.api import Classifier
from iws_engine.export import build
from tests.conftest import run_cli


def test_build_onnxruntime_writes_manifest_and_passes_parity(random_weights, tmp_path):
    out = tmp_path / "art"
    m = build.build(weights_path=random_weights, backend="onnxruntime", precision="fp32", out_dir=out, probes=8,
                    profile=build.BatchProfile(1, 4, 16))
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == m
    assert (out / "model.onnx").is_file() and m["artefact_sha256"] == build.sha256_file(out / "model.onnx")
    assert m["parity"]["passed"] and m["parity"]["max_abs_dp"] <= 1e-4 and m["parity"]["decision_agreement"] == 1.0
    assert m["batch_profile"] == "1:4:16" and m["environment"]["onnxruntime"] and m["preprocess"]["size"] == [256, 256]
    # a second build with the same key is a cache hit: nothing is rewritten
    again = build.build(weights_path=random_weights, backend="onnxruntime", precision="fp32", out_dir=out, probes=8,
                        profile=build.BatchProfile(1, 4, 16))
    assert again["built_at"] == m["built_at"]


def test_artifacts_used_by_classify_match_plain_run(random_weights, mixed_inputs, tmp_path):
    out = tmp_path / "art"
    build.build(weights_path=random_weights, backend="onnxruntime", precision="fp32", out_dir=out, probes=4)
    with Classifier(artifacts=out) as a, Classifier(random_weights) as b:
        sa = [r.score for r in a.classify([mixed_inputs])]
        sb = [r.score for r in b.classify([mixed_inputs])]
    assert sa == sb


def test_environment_mismatch_refused_and_no_build(random_weights, tmp_path):
    out = tmp_path / "art"
    build.build(weights_path=random_weights, backend="onnxruntime", precision="fp32", out_dir=out, probes=4)
    m = json.loads((out / "manifest.json").read_text())
    m["environment"]["onnxruntime"] = "0.0.1"
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(build.BuildError, match=r"onnxruntime '0.0.1' \(built\)"):
        build.load_artifacts(out)
    with pytest.raises(build.BuildError, match="does not fit"):
        build.build(weights_path=random_weights, backend="onnxruntime", precision="fp32", out_dir=out, no_build=True)
    rebuilt = build.build(weights_path=random_weights, backend="onnxruntime", precision="fp32", out_dir=out, probes=4)
    assert rebuilt["environment"]["onnxruntime"] != "0.0.1"
    with pytest.raises(build.BuildError, match="no artefact built yet"):
        build.build(weights_path=random_weights, backend="onnxruntime", precision="fp32", out_dir=tmp_path / "new",
                    no_build=True)


def test_tampered_artefact_refused(random_weights, tmp_path):
    out = tmp_path / "art"
    build.build(weights_path=random_weights, backend="onnxruntime", precision="fp32", out_dir=out, probes=4)
    (out / "model.onnx").write_bytes((out / "model.onnx").read_bytes() + b"x")
    with pytest.raises(build.BuildError, match="artefact changed"):
        build.load_artifacts(out)


def test_parity_gate_limits():
    ok = build.gate({"max_abs_dp": 4e-3, "decision_agreement": 1.0}, "fp16")
    assert ok["passed"] and ok["max_abs_dp_limit"] == 5e-3
    with pytest.raises(build.BuildError, match="parity gate failed for fp32"):
        build.gate({"max_abs_dp": 2e-4, "decision_agreement": 1.0}, "fp32")
    with pytest.raises(build.BuildError, match="decision agreement 0.9900"):
        build.gate({"max_abs_dp": 1e-3, "decision_agreement": 0.99}, "int8")


def test_gate_catches_a_wrong_model(random_weights, tmp_path):
    """Parity is measured, not assumed: a backend running different weights fails the gate."""
    import torch

    from iws_engine import backends
    from iws_engine.export import weights
    from iws_engine.export.models.sarcnn import SarCNN, state_to_numpy

    torch.manual_seed(1)
    other = tmp_path / "other.safetensors"
    loaded = weights.load(random_weights)
    weights.save(other, state_to_numpy(SarCNN().eval()), loaded.meta)
    ref = backends.create("torch").load(loaded, (1, 256, 256))
    cand = backends.create("onnxruntime").load(weights.load(other), (1, 256, 256))
    x = np.random.default_rng(0).standard_normal((6, 1, 256, 256)).astype(np.float32)
    res = build.parity(cand, ref, x, 0.5, batch=3)
    with pytest.raises(build.BuildError):
        build.gate(res, "fp32")


def test_batch_profile_parse():
    assert str(build.BatchProfile.parse("1:64:512")) == "1:64:512"
    for bad in ("64", "4:2:8", "0:1:2", "a:b:c"):
        with pytest.raises(ValueError):
            build.BatchProfile.parse(bad)


def test_cli_build_then_classify(random_weights, mixed_inputs, tmp_path):
    out = tmp_path / "art"
    r = run_cli("build", "--weights", random_weights, "--backend", "onnxruntime", "--precision", "fp32", "-o", out,
             "--batch", "1:8:32")
    assert r.returncode == 0, r.stderr
    assert "parity" in r.stdout and (out / "manifest.json").exists()
    r = run_cli("classify", mixed_inputs / "a", "--artifacts", out)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 6
    r = run_cli("build", "--weights", random_weights, "-o", tmp_path / "none", "--no-build")
    assert r.returncode == 2 and "no artefact built yet" in r.stderr
