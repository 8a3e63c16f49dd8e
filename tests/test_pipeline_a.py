"""Pipeline A (`--model eva02xgb`) end to end on the CPU with the tiny EVA02 and the paper's XGBoost model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import XGBOOST_MODEL, require, run_cli

pytest.importorskip("xgboost")


@pytest.fixture(scope="module")
def xgboost_model() -> Path:
    return require(XGBOOST_MODEL)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    """Four good RGB PNGs, then a file that is no PNG and a truncated one."""
    from iws_engine.export.synth import generate

    root = tmp_path_factory.mktemp("pipeline_a")
    generate(root, 4, fmt="rgb8", size=(64, 60), seed=1)
    good = sorted(root.glob("*.png"))
    (root / "not_a_png.png").write_bytes(b"hello, I am text")
    (root / "truncated.png").write_bytes(good[0].read_bytes()[:200])
    return [good[0], root / "not_a_png.png", *good[1:], root / "truncated.png"]


def test_classify_matches_an_independent_composition(xgboost_model, tiny_eva02_weights, inputs):
    import torch
    import xgboost

    from iws_engine.export.models.eva02 import Eva02Config, load_eva02_weights
    from iws_engine.pipeline_a import PIPELINE_A_THRESHOLD, EvaXgbClassifier
    from iws_engine.preprocess_clip import ClipPreprocessSpec, preprocess_clip_reference

    with EvaXgbClassifier(xgboost_model, tiny_eva02_weights, eva_config="tiny", batch_size=8, workers=2) as clf:
        rows = list(clf.classify(inputs))
    model = load_eva02_weights(tiny_eva02_weights, Eva02Config.tiny()).model

    assert [r.path for r in rows] == [str(p) for p in inputs]
    bad = {1, 5}
    assert [k for k, r in enumerate(rows) if not r.ok] == sorted(bad)
    assert "not a PNG" in rows[1].error and rows[1].error.startswith(str(inputs[1]))
    assert rows[5].error.startswith(str(inputs[5])) and rows[5].score is None
    assert all(r.model_id.startswith("eva02_tiny@") and "+xgb:pipeline_a_xgboost@" in r.model_id for r in rows)
    assert all(r.threshold == PIPELINE_A_THRESHOLD == 0.48 for r in rows)

    good = [p for k, p in enumerate(inputs) if k not in bad]
    spec = ClipPreprocessSpec(size=56)
    x = torch.from_numpy(np.stack([preprocess_clip_reference(p, spec) for p in good]))
    features = model.probabilities(x).numpy()
    assert np.ptp(features.max(axis=1)) > 0.05  # the features differ per image: the comparison can fail
    booster = xgboost.Booster()
    booster.load_model(str(xgboost_model))
    expected = booster.inplace_predict(features)

    scores = np.array([r.score for k, r in enumerate(rows) if k not in bad])
    assert np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_allclose(scores, expected, rtol=0, atol=1e-6)
    assert [r.decision for k, r in enumerate(rows) if k not in bad] == [int(s >= 0.48) for s in scores]
    assert clf.last_stats.images == 6 and clf.last_stats.failed == 2


def test_cli_classify_eva02xgb(xgboost_model, inputs, tmp_path):
    import csv

    out = tmp_path / "scores.csv"
    r = run_cli("classify", *inputs, "--model", "eva02xgb", "--eva-config", "tiny", "--xgboost", xgboost_model,
                "-o", out, "--batch-size", "4", "--workers", "2")
    assert r.returncode == 1, r.stderr  # two inputs failed
    assert "randomly initialised" in r.stderr and "scores are not" in r.stderr
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["path"] for row in rows] == [str(p) for p in inputs]
    assert [bool(row["error"]) for row in rows] == [False, True, False, False, False, True]
    assert all("random-untrained" in row["model_id"] for row in rows)

    good = run_cli("classify", inputs[0], "--model", "eva02xgb", "--eva-config", "tiny", "--xgboost", xgboost_model,
                   "--threshold", "0.1")
    assert good.returncode == 0, good.stderr
    assert ",0.1," in good.stdout


def test_cli_eva02xgb_needs_the_xgboost_model(inputs):
    r = run_cli("classify", inputs[0], "--model", "eva02xgb", "--eva-config", "tiny")
    assert r.returncode == 2
    assert "--xgboost FILE" in r.stderr


def test_model_names_a_pipeline_or_a_weights_file():
    from argparse import Namespace

    from iws_engine.cli import resolve_model

    assert resolve_model(Namespace(model=None, weights=None)) == ("sarcnn", None)
    assert resolve_model(Namespace(model="eva02xgb", weights=Path("eva.safetensors"))) == (
        "eva02xgb", Path("eva.safetensors"))
    assert resolve_model(Namespace(model="w.safetensors", weights=None)) == ("sarcnn", Path("w.safetensors"))
    with pytest.raises(ValueError, match="give one"):
        resolve_model(Namespace(model="a.safetensors", weights=Path("b.safetensors")))


def test_cpu_loader_default_path_is_unchanged():
    """The pluggable preprocess keeps SAR_CNN batches (N, 1, H, W) and its error rows."""
    from iws_engine.loaders.cpu import CpuLoader
    from iws_engine.preprocess import iws_sarcnn_spec

    loader = CpuLoader(iws_sarcnn_spec(0.38, 0.156), batch_size=4, workers=1)
    (batch,) = list(loader.batches([b"not a png"]))
    assert batch.inputs.shape == (0, 1, *loader.spec.size) and 0 in batch.errors


def test_cli_evaluate_eva02xgb_reports_what_classified(xgboost_model, tiny_eva02_weights, tmp_path):
    import json

    from iws_engine.export.synth import generate

    data = tmp_path / "data"
    generate(data, 6, fmt="rgba16", size=(80, 70), seed=4)
    report = tmp_path / "report.json"
    r = run_cli("evaluate", data, "--labels", data / "labels.csv", "--model", "eva02xgb", "--eva-config", "tiny",
                "--weights", tiny_eva02_weights, "--xgboost", xgboost_model, "--backend", "onnxruntime", "-o", report)
    assert r.returncode == 0, r.stderr
    got = json.loads(report.read_text())
    assert got["inputs"]["evaluated"] == 6 and got["inputs"]["excluded_errors"] == 0
    assert all("+xgb:pipeline_a_xgboost@" in m for m in got["inputs"]["model_ids"])
    assert "onnxruntime fp32" in json.dumps(got) and "XGBoost on cpu" in json.dumps(got)


def test_python_api_exports_pipeline_a():
    import iws_engine
    from iws_engine.pipeline_a import EvaXgbClassifier

    assert iws_engine.EvaXgbClassifier is EvaXgbClassifier
