"""bench/metrics.py against the paper's own evaluation files (Table 2) and against oracles."""

from __future__ import annotations

import argparse
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from iws_engine.bench import evaluate_cmd
from iws_engine.bench.metrics import (
    auc_standard_error,
    confusion_at,
    evaluation_report,
    f1_optimal_threshold,
    metrics_from_counts,
    plot_roc,
    plot_threshold_sweep,
    roc_auc,
    roc_curve,
    threshold_grid,
    threshold_sweep,
    wilson_interval,
)

from tests.conftest import IWS_REFERENCE as REFERENCE
DATA = REFERENCE / "data"
EVALUATION_FILES = [f"pipeline_{p}_{d}_evaluation.json" for p in "ab" for d in ("gpu", "cpu")]
# The paper's test set: 2,930 ISW positives and 2,930 negatives (data/README.md; the class_balance
# of pipeline_b_cpu_evaluation.json). Pipeline A's sweep rows carry rates only; counts follow from it.
N_POSITIVE = N_NEGATIVE = 2930
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _paper(name: str) -> dict[str, Any]:
    path = DATA / name
    if not path.is_file():
        pytest.skip(f"paper data {path} not present (needs the read-only checkout of ../shared/reference)")
    with path.open(encoding="utf-8") as handle:
        return json.load(handle)


def _same_float(ours: float, paper: float, ulps: int = 2) -> bool:
    """Equal to the JSON's printed (full float64) precision, up to a couple of ulps of rounding order."""
    return abs(ours - paper) <= ulps * math.ulp(paper)


def _sweep_counts(paper: dict[str, Any]) -> list[tuple[float, dict[str, int]]]:
    """(threshold, counts) for each row of the paper's sweep; A's counts rebuilt from its rates."""
    rows = []
    for row in paper["threshold_sweep"]:
        threshold = round(float(row["threshold"]), 2)  # B stored Float32 thresholds (0.4699999988)
        if "tp" in row:
            counts = {key: int(row[key]) for key in ("tp", "tn", "fp", "fn")}
        else:
            tp_exact = row["recall"] * N_POSITIVE
            tp = round(tp_exact)
            fp_exact = tp / row["precision"] - tp
            fp = round(fp_exact)
            assert abs(tp_exact - tp) < 1e-6 and abs(fp_exact - fp) < 1e-6, row
            counts = {"tp": tp, "fn": N_POSITIVE - tp, "fp": fp, "tn": N_NEGATIVE - fp}
        rows.append((threshold, counts))
    return rows


def _paper_operating_points(paper: dict[str, Any]) -> dict[str, tuple[dict[str, int], dict[str, float]]]:
    """The paper's headline operating points as (counts, reported metrics)."""
    if "confusion_matrix" in paper:  # pipeline A: counts only at the optimal threshold
        cm = paper["confusion_matrix"]
        return {"optimal": ({"tp": cm["TP"], "tn": cm["TN"], "fp": cm["FP"], "fn": cm["FN"]},
                            paper["optimal_metrics"])}
    return {
        name: ({k: paper[name]["confusion_matrix"][k] for k in ("tp", "tn", "fp", "fn")},
               {"f1": paper[name]["f1_score"], **{k: paper[name][k] for k in ("accuracy", "precision", "recall")}})
        for name in ("optimal", "baseline")
    }


# ----------------------------------------------------------------------------- counts -> metrics

@pytest.mark.reference
@pytest.mark.parametrize("name", EVALUATION_FILES)
def test_metrics_from_paper_counts_reproduce_paper_figures(name: str) -> None:
    paper = _paper(name)
    for point, (counts, reported) in _paper_operating_points(paper).items():
        ours = metrics_from_counts(**counts)
        for key in ("accuracy", "precision", "recall"):
            assert ours[key] == reported[key], (name, point, key)
        assert _same_float(ours["f1"], reported["f1"]), (name, point, ours["f1"], reported["f1"])
    for row, (_, counts) in zip(paper["threshold_sweep"], _sweep_counts(paper)):
        ours = metrics_from_counts(**counts)
        for key in ("accuracy", "precision", "recall"):
            assert ours[key] == row[key], (name, row["threshold"], key)
        f1_key = "f1" if "f1" in row else "f1_score"
        assert _same_float(ours["f1"], row[f1_key]), (name, row["threshold"])
        if "accuracy_ci_lower" in row:  # B CPU: Wilson 95 % CI, computed partly in Float32 by Julia
            lower, upper = wilson_interval(counts["tp"] + counts["tn"], sum(counts.values()))
            assert abs(lower - row["accuracy_ci_lower"]) < 1e-7
            assert abs(upper - row["accuracy_ci_upper"]) < 1e-7
        if "cost" in row:
            assert counts["fp"] + counts["fn"] == row["cost"]


@pytest.mark.reference
@pytest.mark.parametrize("name", EVALUATION_FILES)
def test_f1_optimal_threshold_of_paper_sweep_is_papers(name: str) -> None:
    paper = _paper(name)
    reported = paper["optimal_threshold"] if "optimal_threshold" in paper else paper["optimal"]["threshold"]
    # The paper stored np.arange's 0.6400000000000003 (A) or Float32 0.4699999988 (B).
    assert f1_optimal_threshold(paper["threshold_sweep"]) == pytest.approx(reported, abs=1e-6)
    assert round(reported, 2) in (0.47, 0.48, 0.64)


@pytest.mark.reference
def test_paper_sweep_grid_is_ours() -> None:
    paper = _paper("pipeline_a_gpu_evaluation.json")
    assert threshold_grid() == [row["threshold"] for row in paper["threshold_sweep"]]
    assert len(threshold_grid()) == 41 and threshold_grid()[34] == 0.64


@pytest.mark.reference
def test_auc_standard_error_matches_paper() -> None:
    paper = _paper("pipeline_b_cpu_evaluation.json")
    performance = paper["model_performance"]
    se = auc_standard_error(performance["auc_roc"], N_POSITIVE, N_NEGATIVE)
    assert se == pytest.approx(performance["auc_roc_se"], rel=1e-5)  # Julia: Float32 AUC


# ----------------------------------------------------------------------------- synthetic round trip

def _scores_reproducing(sweep: list[tuple[float, dict[str, int]]]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and scores whose counts at every sweep threshold are exactly the given ones.

    Needs non-increasing TP and FP along the grid (true of any real sweep). Each score is put half
    a step above a grid point, far from every threshold, so no rounding question can arise.
    """
    thresholds = [t for t, _ in sweep]
    step = thresholds[1] - thresholds[0]
    labels: list[int] = []
    scores: list[float] = []
    for label, key, n_class in ((1, "tp", N_POSITIVE), (0, "fp", N_NEGATIVE)):
        at_or_above = [counts[key] for _, counts in sweep] + [0]
        assert all(a >= b for a, b in zip(at_or_above, at_or_above[1:])), "sweep is not monotone"
        labels += [label] * (n_class - at_or_above[0])
        scores += [thresholds[0] - 0.1] * (n_class - at_or_above[0])
        for i, threshold in enumerate(thresholds):
            in_bin = at_or_above[i] - at_or_above[i + 1]
            value = threshold + step / 2 if i + 1 < len(thresholds) else threshold + 0.1
            labels += [label] * in_bin
            scores += [value] * in_bin
    return np.asarray(labels), np.asarray(scores)


@pytest.mark.reference
@pytest.mark.parametrize("name", EVALUATION_FILES)
def test_report_round_trip_reproduces_paper_rows(name: str) -> None:
    paper = _paper(name)
    sweep = _sweep_counts(paper)
    labels, scores = _scores_reproducing(sweep)
    report = evaluation_report(labels, scores, pipeline="synthetic", backend="cpu")

    assert [row["threshold"] for row in report["threshold_sweep"]] == [t for t, _ in sweep]
    for ours, theirs, (_, counts) in zip(report["threshold_sweep"], paper["threshold_sweep"], sweep):
        assert {k: ours[k] for k in counts} == counts
        for key in ("accuracy", "precision", "recall"):
            assert ours[key] == theirs[key]
        assert _same_float(ours["f1"], theirs["f1"] if "f1" in theirs else theirs["f1_score"])

    for point, (counts, reported) in _paper_operating_points(paper).items():
        block = report["optimal"] if point == "optimal" else report["baseline"]
        assert block["confusion_matrix"] == counts, point
        for key in ("accuracy", "precision", "recall"):
            assert block[key] == reported[key], (point, key)
    if "optimal_threshold" in paper:  # pipeline A's layout
        assert report["optimal_threshold"] == round(paper["optimal_threshold"], 2)
        assert report["confusion_matrix"] == paper["confusion_matrix"]
        for block in ("threshold_0_5", "optimal_metrics"):
            for key in ("accuracy", "precision", "recall"):
                assert report[block][key] == paper[block][key], (block, key)
            assert _same_float(report[block]["f1"], paper[block]["f1"])
    else:  # pipeline B's layout
        assert report["optimal"]["threshold"] == round(paper["optimal"]["threshold"], 2)
        assert report["optimal"]["cost"] == paper["optimal"]["cost"]
        assert report["error_analysis"] == paper["error_analysis"]
        if "baselines" in paper:
            assert report["baselines"] == paper["baselines"]


def _key_paths(node: Any, prefix: str = "") -> dict[str, type]:
    """Every key path of a JSON document (list items collapsed to ``[]``) with its value's JSON kind."""
    def kind(value: Any) -> type:
        if isinstance(value, bool):
            return bool
        if isinstance(value, (int, float)):
            return float
        return type(value)

    paths: dict[str, type] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else key
            paths[path] = kind(value)
            paths.update(_key_paths(value, path))
    elif isinstance(node, list):
        for item in node:
            paths.update(_key_paths(item, f"{prefix}[]"))
    return paths


@pytest.mark.reference
@pytest.mark.parametrize("name", EVALUATION_FILES)
def test_report_has_every_key_of_paper_layout(name: str) -> None:
    paper = _paper(name)
    labels, scores = _scores_reproducing(_sweep_counts(paper))
    report = evaluation_report(labels, scores, pipeline="synthetic", backend="cpu",
                               model_path="model.safetensors", timing=paper.get("timing"))
    ours = _key_paths(json.loads(json.dumps(report)))
    # A run's random seed is an input of the paper's Julia script, not something scores can give.
    theirs = {path: kind for path, kind in _key_paths(paper).items() if path != "metadata.random_seed"}
    missing = sorted(set(theirs) - set(ours))
    assert not missing, f"keys of {name} missing from the report: {missing}"
    wrong = {path: (ours[path], kind) for path, kind in theirs.items()
             if ours[path] is not kind and not (kind is float and ours[path] is type(None))}
    assert not wrong, wrong


# ----------------------------------------------------------------------------- AUC and ROC

def _brute_force_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    positives = scores[labels == 1]
    negatives = scores[labels == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in positives for n in negatives)
    return wins / (positives.size * negatives.size)


@pytest.mark.parametrize("seed", range(5))
def test_auc_matches_sklearn_and_pairwise_count_with_ties(seed: int) -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    n = 400
    labels = rng.integers(0, 2, n)
    # Coarse scores -> many ties, within and across classes; positives shifted up a little.
    scores = np.round(rng.normal(0.5 + 0.15 * labels, 0.2), 1)
    ours = roc_auc(labels, scores)
    assert ours == pytest.approx(_brute_force_auc(labels, scores), abs=1e-12)
    assert ours == pytest.approx(sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2) == pytest.approx(ours, abs=1e-12)


def test_auc_edge_cases() -> None:
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert roc_auc(np.array([False, True]), np.array([0.3, 0.7], dtype=np.float32)) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0, 1], [0.2, float("nan")])
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc([0, 2], [0.2, 0.3])


def test_sweep_matches_direct_counting_and_uses_score_at_least_threshold() -> None:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300), 2)  # many scores land exactly on grid thresholds
    for row in threshold_sweep(labels, scores):
        t = row["threshold"]
        predicted = scores >= t
        assert row["tp"] == int(np.sum(predicted & (labels == 1)))
        assert row["fp"] == int(np.sum(predicted & (labels == 0)))
        assert {k: row[k] for k in ("tp", "tn", "fp", "fn")} == confusion_at(labels, scores, t)
    assert confusion_at([1, 0], [0.5, 0.5], 0.5) == {"tp": 1, "tn": 0, "fp": 1, "fn": 0}


def test_threshold_grid_is_exact_decimals() -> None:
    grid = threshold_grid(0.30, 0.70, 0.01)
    assert len(grid) == 41 and grid[0] == 0.3 and grid[-1] == 0.7
    assert all(t == float(f"{t:.2f}") for t in grid)  # no np.arange drift (0.6400000000000003)
    assert [repr(t) for t in grid[33:36]] == ["0.63", "0.64", "0.65"]
    assert threshold_grid(0.1, 0.2, 0.05) == [0.1, 0.15, 0.2]
    with pytest.raises(ValueError):
        threshold_grid(0.305, 0.7, 0.01)


def test_f1_optimum_ties_keep_lowest_threshold() -> None:
    rows = [{"threshold": 0.3, "tp": 5, "fp": 1, "fn": 1}, {"threshold": 0.4, "tp": 5, "fp": 1, "fn": 1},
            {"threshold": 0.5, "tp": 4, "fp": 0, "fn": 2}]
    assert f1_optimal_threshold(rows) == 0.3


# ----------------------------------------------------------------------------- plots and command

def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 100 and height > 100
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[:2] == (height, width)


def test_plots_are_valid_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    scores = np.clip(rng.normal(0.35 + 0.3 * labels, 0.15), 0, 1)
    _assert_png(plot_roc(labels, scores, tmp_path / "roc.png"))
    report = evaluation_report(labels, scores, pipeline="test", backend="cpu")
    _assert_png(plot_threshold_sweep(report, tmp_path / "sub" / "sweep.png"))


@pytest.mark.reference
def test_threshold_sweep_plot_reads_paper_layouts(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    for name in ("pipeline_a_gpu_evaluation.json", "pipeline_b_gpu_evaluation.json"):
        _assert_png(plot_threshold_sweep(_paper(name), tmp_path / f"{name}.png"))


def _write_classify_output(tmp_path: Path, fmt: str) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    n = 60
    labels = rng.integers(0, 2, n)
    labels[:2] = [0, 1]
    scores = np.round(np.clip(rng.normal(0.35 + 0.3 * labels, 0.15), 0, 1), 4)
    rows = [{"path": f"/data/test/img_{i:03d}.png", "score": float(scores[i]), "decision": int(scores[i] >= 0.5),
             "threshold": 0.5, "model_id": "sar_cnn_v2", "error": ""} for i in range(n)]
    rows.append({"path": "/data/test/broken.png", "score": "", "decision": "", "threshold": 0.5,
                 "model_id": "sar_cnn_v2", "error": "PNG: bad IDAT checksum"})
    rows.append({"path": "/data/test/no_label.png", "score": 0.9, "decision": 1, "threshold": 0.5,
                 "model_id": "sar_cnn_v2", "error": ""})
    scores_path = tmp_path / f"scores.{fmt}"
    if fmt == "csv":
        header = "path,score,decision,threshold,model_id,error"
        lines = [header] + [",".join(str(r[k]) for k in header.split(",")) for r in rows]
        scores_path.write_text("\n".join(lines) + "\n")
    else:
        for r in rows:
            r["score"] = None if r["score"] == "" else r["score"]
            r["decision"] = None if r["decision"] == "" else r["decision"]
            r["error"] = r["error"] or None
        if fmt == "jsonl":
            scores_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            import pyarrow
            import pyarrow.parquet

            pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), scores_path)
    labels_path = tmp_path / "labels.csv"
    # ids as file stems, one with the .png suffix (the paper's test.csv style), plus a label with no score.
    ids = [f"img_{i:03d}" + (".png" if i == 0 else "") for i in range(n)] + ["never_scored"]
    truth = list(labels) + [1]
    labels_path.write_text("id,ground_truth\n" + "".join(f"{i},{int(t)}\n" for i, t in zip(ids, truth)))
    return scores_path, labels_path, labels, scores


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_evaluate_command_end_to_end(tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    scores_path, labels_path, labels, scores = _write_classify_output(tmp_path, fmt)
    parser = argparse.ArgumentParser()
    evaluate_cmd.add_arguments(parser)
    out = tmp_path / "out" / "report.json"
    plots = tmp_path / "plots"
    args = parser.parse_args(["--scores", str(scores_path), "--labels", str(labels_path),
                              "-o", str(out), "--plots", str(plots)])
    assert evaluate_cmd.run(args) == 0
    assert "AUC-ROC" in capsys.readouterr().out

    report = json.loads(out.read_text())
    assert report["pipeline_name"] == "sar_cnn_v2"
    assert report["inputs"]["evaluated"] == len(labels)
    assert report["inputs"]["excluded_errors"] == 1
    assert report["inputs"]["unlabelled"] == 1
    assert report["inputs"]["labels_without_score"] == 1
    assert report["auc_roc"] == pytest.approx(roc_auc(labels, scores), abs=1e-15)
    assert report["threshold_sweep"] == json.loads(json.dumps(threshold_sweep(labels, scores)))
    assert report["engine_threshold"]["confusion_matrix"] == confusion_at(labels, scores, 0.5)
    _assert_png(plots / "roc.png")
    _assert_png(plots / "threshold_sweep.png")

    # Without -o the report goes to stdout as JSON.
    args = parser.parse_args(["--scores", str(scores_path), "--labels", str(labels_path), "--pipeline", "X"])
    assert evaluate_cmd.run(args) == 0
    assert json.loads(capsys.readouterr().out)["pipeline_name"] == "X"


def test_evaluate_command_rejects_unusable_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    evaluate_cmd.add_arguments(parser)
    scores_path = tmp_path / "scores.csv"
    scores_path.write_text("path,score,decision,threshold,model_id,error\n/a/x.png,0.7,1,0.5,m,\n")
    labels_path = tmp_path / "labels.csv"
    labels_path.write_text("id,ground_truth\nx,1\n")  # one class only: no AUC
    assert evaluate_cmd.run(parser.parse_args(["--scores", str(scores_path), "--labels", str(labels_path)])) == 2
    assert "both classes" in capsys.readouterr().err
    assert evaluate_cmd.run(parser.parse_args(["--labels", str(labels_path)])) == 2
    assert "--scores is required" in capsys.readouterr().err
    labels_path.write_text("name,label\nx,1\n")
    assert evaluate_cmd.run(parser.parse_args(["--scores", str(scores_path), "--labels", str(labels_path)])) == 2
    assert "id,ground_truth" in capsys.readouterr().err
