"""The embedded default model: shipped, documented, and good on held-out synthetic data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from iws_engine.api import Classifier
from iws_engine.bench.metrics import roc_auc
from iws_engine.export import weights
from iws_engine.export.synth import generate
from tests.conftest import run_cli

HELD_OUT_SEED = 4242  # train used seed+1000, validation seed+2000 (export/train.py)


def test_embedded_weights_are_packaged_with_their_record():
    path = weights.default_weights_path()
    assert path.is_file() and 0.9e6 < path.stat().st_size < 1.4e6
    w = weights.load(path)
    assert w.meta.model == "sarcnn" and w.meta.trained
    record = json.loads(path.with_suffix(".json").read_text())
    assert record == w.meta.extra["training"]
    assert record["command"].startswith("iws-engine train")
    assert record["config"]["seed"] + record["config"]["train_seed_offset"] != HELD_OUT_SEED
    assert record["history"] and 0.30 <= record["threshold"] <= 0.70


@pytest.mark.slow
def test_default_model_auc_on_held_out_synthetic_set(tmp_path):
    rows = generate(tmp_path, 1000, seed=HELD_OUT_SEED)
    truth = dict(rows)
    with Classifier() as clf:
        results = list(clf.classify([tmp_path]))
    assert len(results) == 1000 and all(r.ok for r in results)
    labels = np.array([truth[r.path.rsplit("/", 1)[-1][:-4]] for r in results])
    scores = np.array([r.score for r in results])
    auc = roc_auc(labels, scores)
    assert auc >= 0.95, f"held-out AUC {auc:.4f}"


def test_demo_main_job(tmp_path):
    r = run_cli("demo", "--n", "24", "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    for word in ("accuracy", "AUC", "img/s", "TP", "results"):
        assert word in r.stdout
    assert (tmp_path / "results.csv").read_text().count("\n") == 25


def test_evaluate_classifies_data_then_reports(tmp_path):
    generate(tmp_path / "d", 30, fmt="gray8", seed=99)
    report = tmp_path / "report.json"
    r = run_cli("evaluate", tmp_path / "d", "--labels", tmp_path / "d" / "labels.csv", "-o", report, "--plots", tmp_path / "plots")
    assert r.returncode == 0, r.stderr
    rep = json.loads(report.read_text())
    assert rep["inputs"]["evaluated"] == 30 and rep["inputs"]["excluded_errors"] == 0
    assert 0.0 <= rep["auc_roc"] <= 1.0
    assert len(rep["threshold_sweep"]) == 41
    assert (tmp_path / "plots" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
