"""Evaluation of binary classifier scores, in the paper's own conventions.

Conventions, each checked against the scripts that wrote the paper's data
(AIRCentre/iws-pipeline-comparison-gmd, benchmarking/pipeline_a_gpu.py and
pipeline_b_{gpu,cpu}_evaluate.jl) and against the numbers in data/*_evaluation.json:

- decision: positive when ``score >= threshold`` (Python ``probs >= t``, Julia ``y_scores .>= threshold``);
- sweep: thresholds 0.30, 0.31, ..., 0.70 (41 points); the "optimal threshold" is the first
  (lowest) threshold of that grid with the highest F1 -- both scripts keep the first maximum
  (``if f1 > best_f1``), so it is a grid point, not a search over every distinct score;
- precision, recall, F1 are 0 when their denominator is 0 (sklearn's ``zero_division`` default
  result, Julia's ``tp > 0 ? ... : 0``);
- "threshold_0_5" / "baseline" are the metrics at 0.5; the paper's "confusion_matrix" is taken at
  the optimal threshold.

The paper's two pipelines wrote two different JSON layouts. :func:`evaluation_report` writes one
document that carries every key of both (pipeline A: ``threshold_0_5``, ``optimal_metrics``,
``confusion_matrix`` ...; pipeline B: ``baseline``, ``optimal``, ``error_analysis`` ...), so a reader
of either layout can read it; the sweep rows carry both ``f1`` (A) and ``f1_score`` (B).

Deliberate differences from the paper's code: thresholds are exact decimals compared in float64
(A compared against ``np.arange`` values such as 0.6400000000000003, B compared Float32 scores with
Float32 thresholds such as 0.4699999988); they only matter for a score lying within ~1e-8 of a grid
point. AUC is the exact Mann-Whitney statistic with ties counted 1/2 (B's Julia AUC ignored ties).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Iterable, Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ConfusionCounts",
    "accuracy",
    "auc_standard_error",
    "confusion_at",
    "evaluation_report",
    "f1_optimal_row",
    "f1_optimal_threshold",
    "f1_score",
    "metrics_from_counts",
    "plot_roc",
    "plot_threshold_sweep",
    "precision",
    "recall",
    "roc_auc",
    "roc_curve",
    "threshold_grid",
    "threshold_sweep",
    "wilson_interval",
]

PAPER_SWEEP_START = 0.30
PAPER_SWEEP_STOP = 0.70
PAPER_SWEEP_STEP = 0.01
BASELINE_THRESHOLD = 0.5
WILSON_Z_95 = 1.96  # the paper's 95 % Wilson interval (Julia used 1.96f0)


# ----------------------------------------------------------------------------- inputs

def _as_labels(labels: Any) -> np.ndarray:
    """Labels as a bool array; accepts bools or 0/1 numbers, rejects anything else."""
    array = np.asarray(labels)
    if array.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {array.shape}")
    if array.dtype == bool:
        return array
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"labels must be bool or 0/1 numbers, got dtype {array.dtype}")
    if not np.all((array == 0) | (array == 1)):
        raise ValueError("labels must be 0 or 1")
    return array == 1


def _as_scores(scores: Any, n_expected: int) -> np.ndarray:
    """Scores as float64 (exact for float32 input), finite, same length as the labels."""
    array = np.asarray(scores, dtype=np.float64)
    if array.shape != (n_expected,):
        raise ValueError(f"scores must have shape ({n_expected},) like the labels, got {array.shape}")
    if not np.all(np.isfinite(array)):
        raise ValueError("scores must be finite (no NaN or inf)")
    return array


def _labels_and_scores(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    label_array = _as_labels(labels)
    return label_array, _as_scores(scores, label_array.shape[0])


# ----------------------------------------------------------------------------- counts and rates

class ConfusionCounts(dict):
    """``{"tp", "tn", "fp", "fn"}`` as ints (a dict, so it serialises to JSON as is)."""

    @property
    def tp(self) -> int:
        return self["tp"]

    @property
    def tn(self) -> int:
        return self["tn"]

    @property
    def fp(self) -> int:
        return self["fp"]

    @property
    def fn(self) -> int:
        return self["fn"]


def _counts(tp: int, tn: int, fp: int, fn: int) -> ConfusionCounts:
    return ConfusionCounts(tp=int(tp), tn=int(tn), fp=int(fp), fn=int(fn))


def confusion_at(labels: Any, scores: Any, threshold: float) -> ConfusionCounts:
    """Confusion counts for the decision ``score >= threshold`` (the paper's convention)."""
    is_positive, score_array = _labels_and_scores(labels, scores)
    predicted = score_array >= float(threshold)
    tp = int(np.count_nonzero(predicted & is_positive))
    fp = int(np.count_nonzero(predicted & ~is_positive))
    n_positive = int(np.count_nonzero(is_positive))
    n_negative = is_positive.shape[0] - n_positive
    return _counts(tp, n_negative - fp, fp, n_positive - tp)


def precision(tp: int, fp: int) -> float:
    """TP / (TP + FP); 0.0 when nothing is predicted positive."""
    return tp / (tp + fp) if tp + fp > 0 else 0.0


def recall(tp: int, fn: int) -> float:
    """TP / (TP + FN); 0.0 when there are no positives."""
    return tp / (tp + fn) if tp + fn > 0 else 0.0


def f1_score(tp: int, fp: int, fn: int) -> float:
    """2TP / (2TP + FP + FN): the harmonic mean of precision and recall, rounded once.

    Bit-identical to the paper's pipeline A (sklearn); pipeline B computed 2PR/(P+R), which can
    differ from this in the last bit.
    """
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if tp > 0 else 0.0


def accuracy(tp: int, tn: int, fp: int, fn: int) -> float:
    """(TP + TN) / N."""
    total = tp + tn + fp + fn
    if total == 0:
        raise ValueError("accuracy of an empty confusion matrix")
    return (tp + tn) / total


def wilson_interval(successes: int, total: int, z: float = WILSON_Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion (the paper's accuracy CI, pipeline B CPU)."""
    if total <= 0:
        raise ValueError("Wilson interval needs at least one trial")
    p = successes / total
    z2 = z * z
    denominator = 1.0 + z2 / total
    centre = p + z2 / (2 * total)
    spread = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    return max(0.0, (centre - spread) / denominator), min(1.0, (centre + spread) / denominator)


def metrics_from_counts(tp: int, tn: int, fp: int, fn: int) -> dict[str, float]:
    """precision, recall, F1 (as ``f1`` and ``f1_score``), accuracy and its 95 % Wilson CI."""
    f1 = f1_score(tp, fp, fn)
    ci_lower, ci_upper = wilson_interval(tp + tn, tp + tn + fp + fn)
    return {
        "f1": f1,
        "f1_score": f1,
        "accuracy": accuracy(tp, tn, fp, fn),
        "precision": precision(tp, fp),
        "recall": recall(tp, fn),
        "accuracy_ci_lower": ci_lower,
        "accuracy_ci_upper": ci_upper,
    }


# ----------------------------------------------------------------------------- threshold sweep

def _decimals_of(step: float) -> int:
    """Number of decimals that represent ``step`` exactly (0.01 -> 2, 0.005 -> 3)."""
    for decimals in range(0, 12):
        if abs(round(step, decimals) - step) < 1e-12:
            return decimals
    raise ValueError(f"step {step!r} is not a short decimal")


def threshold_grid(start: float = PAPER_SWEEP_START, stop: float = PAPER_SWEEP_STOP,
                   step: float = PAPER_SWEEP_STEP) -> list[float]:
    """Thresholds start, start+step, ..., stop (inclusive), each an exact decimal.

    Built as ``round(k * step, decimals)`` for integer k, so 0.64 is 0.64 and not the
    0.6400000000000003 that ``np.arange`` accumulates.
    """
    if step <= 0:
        raise ValueError("step must be positive")
    decimals = _decimals_of(step)
    first, last = start / step, stop / step
    k_first, k_last = round(first), round(last)
    if abs(first - k_first) > 1e-9 or abs(last - k_last) > 1e-9:
        raise ValueError(f"start {start} and stop {stop} must be multiples of step {step}")
    if k_last < k_first:
        raise ValueError("stop must not be below start")
    return [round(k * step, decimals) for k in range(k_first, k_last + 1)]


def _sweep_row(threshold: float, counts: ConfusionCounts) -> dict[str, Any]:
    row: dict[str, Any] = {"threshold": threshold}
    row.update(metrics_from_counts(counts.tp, counts.tn, counts.fp, counts.fn))
    row.update(counts)
    row["cost"] = float(counts.fp + counts.fn)  # the paper's cost with unit FP/FN costs
    return row


def threshold_sweep(labels: Any, scores: Any, start: float = PAPER_SWEEP_START,
                    stop: float = PAPER_SWEEP_STOP, step: float = PAPER_SWEEP_STEP,
                    *, thresholds: Iterable[float] | None = None) -> list[dict[str, Any]]:
    """Metrics and confusion counts at every threshold of the grid (or of ``thresholds``).

    Sorts the scores of each class once and counts ``score >= t`` by binary search, so the whole
    sweep costs O(n log n + T log n). Rows carry the keys of both of the paper's layouts.
    """
    is_positive, score_array = _labels_and_scores(labels, scores)
    positive_scores = np.sort(score_array[is_positive])
    negative_scores = np.sort(score_array[~is_positive])
    grid = threshold_grid(start, stop, step) if thresholds is None else [float(t) for t in thresholds]
    grid_array = np.asarray(grid, dtype=np.float64)
    # side="left" counts the scores strictly below t; the rest are >= t.
    tp = positive_scores.size - np.searchsorted(positive_scores, grid_array, side="left")
    fp = negative_scores.size - np.searchsorted(negative_scores, grid_array, side="left")
    return [
        _sweep_row(t, _counts(tp_t, negative_scores.size - fp_t, fp_t, positive_scores.size - tp_t))
        for t, tp_t, fp_t in zip(grid, tp.tolist(), fp.tolist())
    ]


def _f1_key(row: Mapping[str, Any]) -> Fraction | float:
    """Exact F1 from counts when the row has them, else the row's F1 value (A's rows have no counts)."""
    if all(key in row for key in ("tp", "fp", "fn")):
        tp, fp, fn = int(row["tp"]), int(row["fp"]), int(row["fn"])
        return Fraction(2 * tp, 2 * tp + fp + fn) if tp > 0 else Fraction(0)
    value = row["f1"] if "f1" in row else row["f1_score"]
    return Fraction(float(value))


def f1_optimal_row(sweep: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """The first row (lowest threshold) with the highest F1, as the paper chose it.

    Works on our rows and on the paper's (``f1`` in A's layout, ``f1_score`` in B's).
    """
    if not sweep:
        raise ValueError("empty threshold sweep")
    best = sweep[0]
    best_key = _f1_key(best)
    for row in sweep[1:]:
        key = _f1_key(row)
        if key > best_key:  # strictly greater: ties keep the earlier (lower) threshold
            best, best_key = row, key
    return best


def f1_optimal_threshold(sweep: Sequence[Mapping[str, Any]]) -> float:
    """Threshold of :func:`f1_optimal_row`."""
    return float(f1_optimal_row(sweep)["threshold"])


# ----------------------------------------------------------------------------- ROC

def _distinct_descending(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Distinct scores (descending) with cumulative TP and FP counts at ``score >= value``."""
    is_positive, score_array = _labels_and_scores(labels, scores)
    n_positive = int(np.count_nonzero(is_positive))
    n_negative = is_positive.shape[0] - n_positive
    if n_positive == 0 or n_negative == 0:
        raise ValueError(f"ROC needs both classes, got {n_positive} positives and {n_negative} negatives")
    order = np.argsort(-score_array, kind="stable")
    sorted_scores = score_array[order]
    sorted_positive = is_positive[order]
    # Last index of each run of equal scores: a threshold admits a tie group whole.
    group_ends = np.flatnonzero(np.diff(sorted_scores) != 0)
    group_ends = np.append(group_ends, sorted_scores.size - 1)
    cumulative_tp = np.cumsum(sorted_positive)[group_ends]
    cumulative_fp = (group_ends + 1) - cumulative_tp
    return sorted_scores[group_ends], cumulative_tp, cumulative_fp, n_positive, n_negative


def roc_curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)``, one per distinct score, starting at (0, 0).

    ``thresholds[0]`` is +inf (nothing predicted positive); point i is the rates of
    ``score >= thresholds[i]``. Tied scores move the curve diagonally, so the trapezoid area under
    these points equals :func:`roc_auc`.
    """
    values, tp, fp, n_positive, n_negative = _distinct_descending(labels, scores)
    fpr = np.concatenate(([0.0], fp / n_negative))
    tpr = np.concatenate(([0.0], tp / n_positive))
    return fpr, tpr, np.concatenate(([np.inf], values))


def roc_auc(labels: Any, scores: Any) -> float:
    """Exact area under the ROC curve: P(score_pos > score_neg) + 1/2 P(tie), in O(n log n).

    The Mann-Whitney U statistic over n_pos * n_neg, with tied scores given their mid-rank. Ranks
    are doubled so every sum stays an exact integer until the final division.
    """
    is_positive, score_array = _labels_and_scores(labels, scores)
    n_positive = int(np.count_nonzero(is_positive))
    n_negative = is_positive.shape[0] - n_positive
    if n_positive == 0 or n_negative == 0:
        raise ValueError(f"AUC needs both classes, got {n_positive} positives and {n_negative} negatives")
    order = np.argsort(score_array, kind="stable")
    sorted_scores = score_array[order]
    # Tie groups [start, end) in ascending order; 1-based ranks start+1..end average to (start+1+end)/2.
    boundaries = np.flatnonzero(np.diff(sorted_scores) != 0) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [sorted_scores.size]))
    doubled_midrank = np.repeat(starts + 1 + ends, ends - starts).astype(np.int64)
    doubled_rank_sum = int(doubled_midrank[is_positive[order]].sum())
    doubled_u = doubled_rank_sum - n_positive * (n_positive + 1)
    return doubled_u / (2 * n_positive * n_negative)


def auc_standard_error(auc: float, n_positive: int, n_negative: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC (the paper's ``auc_roc_se``)."""
    q1 = auc / (2 - auc)
    q2 = 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (n_positive - 1) * (q1 - auc * auc)
                + (n_negative - 1) * (q2 - auc * auc)) / (n_positive * n_negative)
    return math.sqrt(max(variance, 0.0))


# ----------------------------------------------------------------------------- report

def _four_metrics(counts: ConfusionCounts) -> dict[str, float]:
    """Pipeline A's metric block: f1, accuracy, precision, recall."""
    m = metrics_from_counts(counts.tp, counts.tn, counts.fp, counts.fn)
    return {key: m[key] for key in ("f1", "accuracy", "precision", "recall")}


def _operating_point(threshold: float, counts: ConfusionCounts) -> dict[str, Any]:
    """Pipeline B's ``baseline`` / ``optimal`` block."""
    m = metrics_from_counts(counts.tp, counts.tn, counts.fp, counts.fn)
    return {
        "threshold": threshold,
        "accuracy": m["accuracy"],
        "precision": m["precision"],
        "recall": m["recall"],
        "f1_score": m["f1_score"],
        "accuracy_ci_lower": m["accuracy_ci_lower"],
        "accuracy_ci_upper": m["accuracy_ci_upper"],
        "cost": float(counts.fp + counts.fn),
        "confusion_matrix": dict(counts),
    }


def _error_analysis(counts: ConfusionCounts) -> dict[str, Any]:
    """Pipeline B's FP/FN analysis at the optimal threshold, with its exact rules.

    Balanced when |FN - FP| is within 1 % of N (Julia ``round(Int, ...)``, half to even like
    Python's ``round``); the recommendation only looks at which error is larger.
    """
    total = counts.tp + counts.tn + counts.fp + counts.fn
    n_negative = counts.fp + counts.tn
    n_positive = counts.fn + counts.tp
    if abs(counts.fn - counts.fp) <= round(0.01 * total):
        bias = "BALANCED"
    else:
        bias = "FALSE_NEGATIVES" if counts.fn > counts.fp else "FALSE_POSITIVES"
    return {
        "fpr": counts.fp / n_negative if n_negative else 0.0,
        "fnr": counts.fn / n_positive if n_positive else 0.0,
        "fp_count": counts.fp,
        "fn_count": counts.fn,
        "error_bias": bias,
        "recommendation": "DECREASE threshold" if counts.fn > counts.fp else "INCREASE threshold",
    }


def _class_baselines(n_positive: int, n_negative: int) -> dict[str, Any]:
    total = n_positive + n_negative
    return {
        "random_classifier": 0.5,
        "majority_class": max(n_positive, n_negative) / total,
        "majority_class_name": "IW" if n_positive > n_negative else "Non-IW",
        "class_balance": {
            "n_pos": n_positive,
            "n_neg": n_negative,
            "pos_ratio": n_positive / total,
            "neg_ratio": n_negative / total,
        },
    }


def evaluation_report(labels: Any, scores: Any, *, pipeline: str, backend: str,
                      start: float = PAPER_SWEEP_START, stop: float = PAPER_SWEEP_STOP,
                      step: float = PAPER_SWEEP_STEP, model_path: str | None = None,
                      timing: Mapping[str, Any] | None = None,
                      timestamp: str | None = None) -> dict[str, Any]:
    """The paper's evaluation document (data/*_evaluation.json) for these labels and scores.

    Holds every key of both of the paper's layouts (see the module docstring), computed the
    paper's way: sweep over the grid, F1-optimal grid threshold, metrics at it and at 0.5, AUC
    (+ Hanley-McNeil SE), Wilson CIs, class baselines and B's error analysis. ``timing`` (B's CPU
    file has one) is copied in when given. ``timestamp`` defaults to now (UTC, ISO 8601).
    """
    is_positive, score_array = _labels_and_scores(labels, scores)
    n_positive = int(np.count_nonzero(is_positive))
    n_negative = is_positive.shape[0] - n_positive
    auc = roc_auc(is_positive, score_array)  # raises if a class is missing
    sweep = threshold_sweep(is_positive, score_array, start, stop, step)
    best = f1_optimal_row(sweep)
    optimal_threshold = float(best["threshold"])
    optimal_counts = _counts(best["tp"], best["tn"], best["fp"], best["fn"])
    baseline_counts = confusion_at(is_positive, score_array, BASELINE_THRESHOLD)
    when = timestamp or datetime.datetime.now(datetime.timezone.utc).isoformat()
    total = int(is_positive.shape[0])

    report: dict[str, Any] = {
        # Pipeline A's layout.
        "pipeline_name": pipeline,
        "device": backend,
        "timestamp": when,
        "total_samples": total,
        "auc_roc": auc,
        "threshold_0_5": _four_metrics(baseline_counts),
        "optimal_threshold": optimal_threshold,
        "optimal_metrics": _four_metrics(optimal_counts),
        "confusion_matrix": {"TP": optimal_counts.tp, "TN": optimal_counts.tn,
                             "FP": optimal_counts.fp, "FN": optimal_counts.fn},
        "threshold_sweep": sweep,
        # Pipeline B's layout.
        "metadata": {
            "timestamp": when,
            "pipeline": pipeline,
            "device": backend,
            "total_samples": total,
            "model_path": model_path,
            "threshold_metric": "f1_score",
            "threshold_metric_note": (
                f"first threshold of the grid {start:g}:{step:g}:{stop:g} with the highest F1; "
                "decision = score >= threshold"),
        },
        "baseline": _operating_point(BASELINE_THRESHOLD, baseline_counts),
        "optimal": {**_operating_point(optimal_threshold, optimal_counts), "optimized_metric": "f1_score"},
        "error_analysis": _error_analysis(optimal_counts),
        "model_performance": {"auc_roc": auc,
                              "auc_roc_se": auc_standard_error(auc, n_positive, n_negative)},
        "baselines": _class_baselines(n_positive, n_negative),
    }
    if timing is not None:
        report["timing"] = dict(timing)
    return report


# ----------------------------------------------------------------------------- plots

def _new_figure(width_in: float, height_in: float):
    """A matplotlib Figure on the Agg canvas, without pyplot (no global backend switch)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def plot_roc(labels: Any, scores: Any, path: str | Path, *, title: str | None = None) -> Path:
    """ROC curve with its AUC in the legend, saved as PNG; returns the path."""
    fpr, tpr, _ = roc_curve(labels, scores)
    auc = roc_auc(labels, scores)
    figure = _new_figure(6, 6)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(fpr, tpr, color="tab:blue", linewidth=2, label=f"ROC (AUC = {auc:.4f})")
    axes.plot([0, 1], [0, 1], color="tab:red", linestyle="--", linewidth=1, label="random classifier")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1)
    axes.set_xlabel("False positive rate")
    axes.set_ylabel("True positive rate")
    axes.set_title(title or "ROC curve")
    axes.legend(loc="lower right")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return out


def plot_threshold_sweep(report: Mapping[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Accuracy, precision, recall and F1 against the threshold, optimal threshold marked.

    Reads either of the paper's layouts (or ours): rows with ``f1`` or ``f1_score``, the optimal
    threshold from ``optimal_threshold`` or ``optimal.threshold``.
    """
    rows = report["threshold_sweep"]
    thresholds = [float(row["threshold"]) for row in rows]
    series = {
        "accuracy": [row["accuracy"] for row in rows],
        "precision": [row["precision"] for row in rows],
        "recall": [row["recall"] for row in rows],
        "F1": [row["f1"] if "f1" in row else row["f1_score"] for row in rows],
    }
    if "optimal_threshold" in report:
        optimal = float(report["optimal_threshold"])
    else:
        optimal = float(report["optimal"]["threshold"])
    figure = _new_figure(8, 5)
    axes = figure.add_subplot(1, 1, 1)
    for name, values in series.items():
        axes.plot(thresholds, values, linewidth=2, label=name)
    axes.axvline(optimal, color="black", linestyle="--", linewidth=1.5,
                 label=f"F1-optimal threshold {optimal:.2f}")
    axes.set_xlim(min(thresholds), max(thresholds))
    axes.set_xlabel("Decision threshold (score >= threshold)")
    axes.set_ylabel("Metric value")
    name = report.get("pipeline_name") or report.get("metadata", {}).get("pipeline")
    axes.set_title(title or f"Metrics against threshold{f' ({name})' if name else ''}")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower left")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")
    return out
