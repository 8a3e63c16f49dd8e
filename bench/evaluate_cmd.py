"""``iws-engine evaluate``: score a classify run against ground-truth labels.

    iws-engine evaluate --scores SCORES --labels labels.csv [-o report.json] [--plots DIR]
                        [--pipeline NAME] [--backend NAME]

SCORES is the engine's classify output: CSV with header ``path,score,decision,threshold,model_id,error``
or JSONL with the same keys (or the engine's .parquet output, when pyarrow is installed). Rows with an error are left out and counted. labels.csv has
``id,ground_truth``; an id matches the stem of the scored file's name (``abc`` or ``abc.png`` both
match ``/data/test/abc.png``). The report is :func:`iws_engine.bench.metrics.evaluation_report` plus
an ``inputs`` block saying what was matched and what was left out.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PureWindowsPath
from typing import Any

import numpy as np

from iws_engine.bench.metrics import (
    confusion_at,
    evaluation_report,
    metrics_from_counts,
    plot_roc,
    plot_threshold_sweep,
)

SCORE_COLUMNS = ("path", "score", "decision", "threshold", "model_id", "error")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Not required at parse time: the CLI may classify DATA first and fill args.scores in; run() checks it.
    parser.add_argument("--scores", type=Path, metavar="SCORES",
                        help="classify output: CSV (path,score,decision,threshold,model_id,error) or JSONL")
    parser.add_argument("--labels", required=True, type=Path, metavar="LABELS_CSV",
                        help="CSV with columns id,ground_truth (id = image file stem, ground_truth 0/1)")
    parser.add_argument("-o", "--output", type=Path, metavar="REPORT_JSON",
                        help="write the report here (default: print it to stdout)")
    parser.add_argument("--plots", type=Path, metavar="DIR",
                        help="also write roc.png and threshold_sweep.png into DIR")
    parser.add_argument("--pipeline", metavar="NAME",
                        help="pipeline name in the report (default: the scores' model_id)")
    parser.add_argument("--backend", default="unknown", metavar="NAME",
                        help="backend/device name in the report (default: %(default)s)")


# ----------------------------------------------------------------------------- reading

def image_key(name: str) -> str:
    """The id an image is matched by: its file name without a .png suffix, any directory dropped."""
    base = PureWindowsPath(name).name if "\\" in name else PurePath(name).name
    return base[:-4] if base.lower().endswith(".png") else base


def _iter_score_rows(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a classify output: Parquet by suffix, JSONL when the file starts with ``{``, else CSV."""
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow") from None
        yield from parquet.read_table(path).to_pylist()
        return
    with path.open(encoding="utf-8", newline="") as handle:
        head = handle.read(1)
        while head and head.isspace():
            head = handle.read(1)
        handle.seek(0)
        if head == "{":
            for line_number, line in enumerate(handle, start=1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{line_number}: not JSON: {error}") from None
        else:
            reader = csv.DictReader(handle)
            missing = {"path", "score"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(f"{path}: missing column(s) {sorted(missing)}; "
                                 f"expected header {','.join(SCORE_COLUMNS)}")
            yield from reader


def _has_error(row: Mapping[str, Any]) -> bool:
    error = row.get("error")
    return error is not None and str(error).strip() not in ("", "None", "null")


def _parse_label(value: Any, where: str) -> int:
    text = str(value).strip().lower()
    if text in ("1", "1.0", "true"):
        return 1
    if text in ("0", "0.0", "false"):
        return 0
    raise ValueError(f"{where}: ground_truth must be 0 or 1, got {value!r}")


def read_labels(path: Path) -> dict[str, int]:
    """``{image key: 0/1}`` from an ``id,ground_truth`` CSV."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"id", "ground_truth"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected id,ground_truth")
        labels: dict[str, int] = {}
        for line_number, row in enumerate(reader, start=2):
            key = image_key(row["id"].strip())
            if key in labels:
                raise ValueError(f"{path}:{line_number}: duplicate id {row['id']!r}")
            labels[key] = _parse_label(row["ground_truth"], f"{path}:{line_number}")
    return labels


@dataclass
class MatchedScores:
    """Scores joined to labels, with the count of everything that was left out."""

    keys: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    rows: int = 0
    excluded_errors: int = 0
    unlabelled: int = 0
    model_ids: set[str] = field(default_factory=set)
    engine_thresholds: set[float] = field(default_factory=set)


def match_scores(scores_path: Path, labels: Mapping[str, int]) -> MatchedScores:
    """Join classify rows to labels by image key; error rows and unlabelled images are counted, not used."""
    matched = MatchedScores()
    seen: set[str] = set()
    for row_number, row in enumerate(_iter_score_rows(scores_path), start=1):
        matched.rows += 1
        if _has_error(row):
            matched.excluded_errors += 1
            continue
        if row.get("path") in (None, ""):
            raise ValueError(f"{scores_path}: row {row_number}: no path")
        key = image_key(str(row["path"]))
        if key in seen:
            raise ValueError(f"{scores_path}: row {row_number}: image {key!r} scored twice")
        seen.add(key)
        try:
            score = float(row["score"])
        except (TypeError, ValueError):
            raise ValueError(f"{scores_path}: row {row_number}: score {row.get('score')!r} "
                             "is not a number and the row has no error") from None
        if key not in labels:
            matched.unlabelled += 1
            continue
        matched.keys.append(key)
        matched.labels.append(labels[key])
        matched.scores.append(score)
        if row.get("model_id") not in (None, ""):
            matched.model_ids.add(str(row["model_id"]))
        if row.get("threshold") not in (None, ""):
            matched.engine_thresholds.add(float(row["threshold"]))
    return matched


# ----------------------------------------------------------------------------- command

def _summary(report: Mapping[str, Any]) -> str:
    optimal = report["optimal"]
    baseline = report["baseline"]
    inputs = report["inputs"]
    return (
        f"evaluated {inputs['evaluated']} images "
        f"({inputs['excluded_errors']} error rows excluded, {inputs['unlabelled']} unlabelled, "
        f"{inputs['labels_without_score']} labels without a score)\n"
        f"AUC-ROC {report['auc_roc']:.4f}\n"
        f"F1-optimal threshold {optimal['threshold']:.2f}: F1 {optimal['f1_score']:.4f}, "
        f"accuracy {optimal['accuracy']:.4f}, precision {optimal['precision']:.4f}, "
        f"recall {optimal['recall']:.4f}\n"
        f"threshold 0.50: F1 {baseline['f1_score']:.4f}, accuracy {baseline['accuracy']:.4f}\n"
    )


def run(args: argparse.Namespace) -> int:
    """Build the report; 0 on success, 2 on unusable input (message on stderr)."""
    if getattr(args, "scores", None) is None:
        print("iws-engine evaluate: --scores is required (the output of iws-engine classify)", file=sys.stderr)
        return 2
    try:
        labels = read_labels(args.labels)
        matched = match_scores(args.scores, labels)
        if not matched.keys:
            raise ValueError(f"no scored image matched an id in {args.labels}")
        pipeline = args.pipeline or (
            next(iter(matched.model_ids)) if len(matched.model_ids) == 1 else "unknown")
        label_array = np.asarray(matched.labels, dtype=bool)
        score_array = np.asarray(matched.scores, dtype=np.float64)
        # what classified the images when evaluate ran them itself, else what --backend says
        backend = getattr(args, "report_backend", None) or args.backend or "unknown"
        report = evaluation_report(label_array, score_array, pipeline=pipeline, backend=backend)
    except (OSError, ValueError, KeyError) as error:
        print(f"iws-engine evaluate: {error}", file=sys.stderr)
        return 2

    report["inputs"] = {
        "scores_file": str(args.scores),
        "labels_file": str(args.labels),
        "score_rows": matched.rows,
        "excluded_errors": matched.excluded_errors,
        "unlabelled": matched.unlabelled,
        "labels_without_score": len(labels) - len(matched.keys),
        "evaluated": len(matched.keys),
        "model_ids": sorted(matched.model_ids),
    }
    if len(matched.engine_thresholds) == 1:
        # The decision the engine actually made, next to the paper's two operating points.
        threshold = next(iter(matched.engine_thresholds))
        counts = confusion_at(label_array, score_array, threshold)
        report["engine_threshold"] = {"threshold": threshold, **metrics_from_counts(**counts),
                                      "confusion_matrix": dict(counts)}

    if args.plots is not None:
        args.plots.mkdir(parents=True, exist_ok=True)
        plot_roc(label_array, score_array, args.plots / "roc.png", title=f"ROC: {pipeline}")
        plot_threshold_sweep(report, args.plots / "threshold_sweep.png")

    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        sys.stdout.write(_summary(report))
    else:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point until the lead wires this into ``iws-engine``."""
    parser = argparse.ArgumentParser(prog="iws-engine evaluate", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
