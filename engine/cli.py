"""The `iws-engine` command line. Each subcommand imports what it needs when it runs."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from iws_engine import __version__
from iws_engine.argtypes import positive_int as _positive_int
from iws_engine.argtypes import probability as _threshold
from iws_engine.argtypes import size_wxh as _size

EXIT_OK, EXIT_INPUT_ERRORS, EXIT_USAGE = 0, 1, 2
PIPELINES = ("sarcnn", "eva02xgb")
EVA_CONFIGS = ("large", "tiny")  # iws_engine.pipeline_a.EVA_CONFIGS, without importing torch for --help


# ----- argument groups shared by subcommands (same option, same spelling everywhere) -----
def add_model_choice_args(g) -> None:
    """--model, --weights, --xgboost, --eva-config: which pipeline and which files (classify, evaluate, bench)."""
    g.add_argument("--model", metavar="NAME|FILE",
                   help="the pipeline: sarcnn (Pipeline B, the default) or eva02xgb (Pipeline A: EVA02 + XGBoost); "
                        "any other value is a SAR_CNN weights file, as --weights (write ./eva02xgb for a file of "
                        "that name)")
    g.add_argument("--weights", type=Path, metavar="FILE",
                   help="the model's weights: SAR_CNN .safetensors (from import-lux or train; default: the embedded "
                        "model) or, with --model eva02xgb, EVA02 weights (default: random, untrained)")
    g.add_argument("--xgboost", type=Path, metavar="FILE",
                   help="with --model eva02xgb: Pipeline A's XGBoost model (JSON), e.g. the paper's "
                        "models/pipeline_a_xgboost.json; required")
    g.add_argument("--eva-config", default="large", choices=EVA_CONFIGS,
                   help="with --model eva02xgb: EVA02 architecture; tiny (56 px, 2 blocks) is for tests and "
                        "smoke runs only (default: %(default)s)")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    add_model_choice_args(g)
    g.add_argument("--backend", choices=("onnxruntime", "torch", "inductor", "tensorrt", "torch-tensorrt", "openvino"),
                   help="inference backend (default: onnxruntime for sarcnn, the fastest on CPU; torch for eva02xgb)")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: %(default)s)")
    g.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "fp16", "bf16", "int8"),
                   help="(default: %(default)s, exact; on the CPU, int8 (--backend onnxruntime or openvino, the "
                        "faster on x86) and bf16/fp16 "
                        "(--backend inductor) are parity-gated on first use, then cached; TensorRT int8/fp8 engines "
                        "come from `iws-engine build`)")
    g.add_argument("--artifacts", type=Path, metavar="DIR",
                   help="use an artefact made by `iws-engine build` (its manifest sets model, backend and precision)")


def _add_loader_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loading")
    g.add_argument("--batch-size", type=_positive_int, metavar="N",
                   help="(default: 16 on the CPU, where decoding overlaps inference best; 256 on a GPU)")
    g.add_argument("--workers", type=_positive_int, metavar="K", help="decoder threads (default: all cores)")
    g.add_argument("--max-pixels", type=_positive_int, default=64_000_000, metavar="N",
                   help="refuse PNGs with more pixels (decompression bombs; default: %(default)s)")
    g.add_argument("--loader", choices=("cpu", "gpu", "dali"),
                   help="PNG decoding: gpu (inflate/unfilter/resize on the device, exact), cpu, or dali "
                        "(throughput baseline, not the model's preprocessing); default: gpu when CUDA, CuPy "
                        "and nvCOMP are available, else cpu (eva02xgb: cpu, Pillow itself)")


def _progress(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, file=sys.stderr, dynamic_ncols=True)


# ----- commands -----
def cmd_import_lux(args) -> int:
    from iws_engine.export.lux import CheckpointError, import_lux

    try:
        meta = import_lux(args.checkpoint, args.output, threshold=args.threshold)
    except CheckpointError as e:
        print(f"iws-engine import-lux: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {args.output} (source sha256 {meta['source_sha256'][:12]}…, "
          f"checkpoint {meta['source_timestamp']}, threshold {meta['threshold']})")
    return EXIT_OK


def resolve_model(args) -> tuple[str, Path | None]:
    """(pipeline, weights) from `--model NAME|FILE` and `--weights FILE`: a name picks the pipeline, a path
    is SAR_CNN weights (what --model always meant)."""
    model, weights = getattr(args, "model", None), getattr(args, "weights", None)
    if model is None or model in PIPELINES:
        return model or "sarcnn", weights
    if weights is not None:
        raise ValueError(f"--model {model} is a weights file and --weights {weights} another: give one")
    return "sarcnn", Path(model)


def _eva_xgb_classifier(args, weights: Path | None, threads: int | None = None):
    """Pipeline A from the command line (EVA02 on any backend, or a built artefact, then XGBoost)."""
    from iws_engine.pipeline_a import EvaXgbClassifier

    artifacts = getattr(args, "artifacts", None)
    if artifacts is None and getattr(args, "xgboost", None) is None:
        raise ValueError("--model eva02xgb needs --xgboost FILE: Pipeline A's XGBoost model (the paper's "
                         "models/pipeline_a_xgboost.json)")
    return EvaXgbClassifier(getattr(args, "xgboost", None), weights, eva_config=getattr(args, "eva_config", "large"),
                            backend=args.backend or "torch", device=args.device, precision=args.precision,
                            batch_size=args.batch_size, threshold=getattr(args, "threshold", None),
                            workers=args.workers, max_pixels=args.max_pixels, artifacts=artifacts,
                            loader=getattr(args, "loader", None) or "cpu", threads=threads)


def _artifacts_pipeline(args) -> str | None:
    """The pipeline an --artifacts folder was built for (its manifest's model), or None without one."""
    if getattr(args, "artifacts", None) is None:
        return None
    from iws_engine.export.build import read_manifest

    return read_manifest(args.artifacts).get("model", "sarcnn")


def resolve_pipeline(args) -> tuple[str, Path | None]:
    """(pipeline, weights) the model options name, an --artifacts folder's manifest winning."""
    pipeline, weights = resolve_model(args)
    built_for = _artifacts_pipeline(args)
    if built_for is not None and getattr(args, "model", None) in PIPELINES and built_for != pipeline:
        raise ValueError(f"--artifacts {args.artifacts} was built for --model {built_for}, not {pipeline}")
    return built_for or pipeline, weights


def make_classifier(args, threads: int | None = None):
    """The classifier that the model and loading options describe (classify, evaluate and reprocess workers);
    `threads`: the backend's CPU threads (default: all cores)."""
    from iws_engine.api import Classifier

    pipeline, weights = resolve_pipeline(args)
    if pipeline == "eva02xgb":
        return _eva_xgb_classifier(args, weights, threads)
    return Classifier(weights, backend=args.backend or "onnxruntime", device=args.device, precision=args.precision,
                      batch_size=args.batch_size, threshold=getattr(args, "threshold", None),
                      workers=args.workers, max_pixels=args.max_pixels, artifacts=getattr(args, "artifacts", None),
                      loader=getattr(args, "loader", None), threads=threads)


def run_classify(inputs, args, output: str | None, progress: bool):
    """Classify `inputs`, stream rows to `output`; returns (rows written, failed, stats, classifier info)."""
    from iws_engine.outputs import RowWriter
    from iws_engine.pipeline import expand_inputs

    resolve_pipeline(args)  # option conflicts are refused before the inputs are listed
    items = list(expand_inputs(inputs))
    clf = make_classifier(args)
    failed = 0
    with clf, RowWriter(output or "-") as writer, _progress(len(items), "classify", progress) as bar:
        for row in clf.classify(items):
            writer.write(row)
            failed += not row.ok
            bar.update(1)
    return len(items), failed, clf.last_stats, clf


def cmd_classify(args) -> int:
    progress = not args.no_progress and sys.stderr.isatty()
    try:
        n, failed, stats, clf = run_classify(args.inputs, args, args.output, progress)
    except (ValueError, RuntimeError) as e:
        print(f"iws-engine classify: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not clf.trained:
        print("warning: the model is randomly initialised: throughput is valid, scores are not", file=sys.stderr)
    parity = (getattr(clf, "manifest", None) or {}).get("parity") or {}  # an artefact's gate, when one ran
    gated = (f" parity-gated: max |dp| {parity['max_abs_dp']:.3g} on {parity['probes']} probes,"
             if "max_abs_dp" in parity else "")
    print(f"classified {n - failed}/{n} images in {stats.wall:.2f} s ({stats.throughput:.1f} img/s, "
          f"{clf.runtime},{gated} model {clf.model_id}, threshold {clf.threshold:g})"
          + (f"; {failed} failed (see the error column)" if failed else ""), file=sys.stderr)
    return EXIT_INPUT_ERRORS if failed else EXIT_OK


def cmd_synth(args) -> int:
    from iws_engine.export.synth import generate

    width, height = args.size
    with _progress(args.n, "synth", not args.no_progress and sys.stderr.isatty()) as bar:
        rows = generate(args.out, args.n, fmt=args.format, size=(width, height), seed=args.seed,
                        positive_fraction=args.positive_fraction, workers=args.workers,
                        progress=lambda k: bar.update(k - bar.n))
    positives = sum(label for _, label in rows)
    print(f"wrote {len(rows)} {args.format} {width}x{height} vignettes ({positives} with internal waves) "
          f"and labels.csv to {args.out}", file=sys.stderr)
    return EXIT_OK


def cmd_train(args) -> int:
    from iws_engine.export.train import TrainConfig, train_main

    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, max_lr=args.max_lr, weight_decay=args.weight_decay,
                      label_smoothing=args.label_smoothing, seed=args.seed, n_train=args.n_train, n_val=args.n_val,
                      threads=args.threads)
    import shlex

    command = "iws-engine " + shlex.join(args.argv)
    return train_main(cfg, output=args.output, data=args.data, val_data=args.val_data, record=args.record,
                      command=command)


def cmd_demo(args) -> int:
    """The main job on the embedded default: synthesise vignettes, classify them, summarise."""
    import csv
    import tempfile

    import numpy as np

    from iws_engine.bench.metrics import confusion_at, metrics_from_counts, roc_auc
    from iws_engine.export.synth import generate
    from iws_engine.outputs import read_rows

    out_dir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="iws-demo-"))
    data = out_dir / "vignettes"
    progress = sys.stderr.isatty()
    print(f"[1/3] synthesising {args.n} RGBA16 539x528 vignettes (seed {args.seed}) in {data}", file=sys.stderr)
    t0 = time.perf_counter()
    with _progress(args.n, "synth", progress) as bar:
        generate(data, args.n, fmt="rgba16", seed=args.seed, progress=lambda k: bar.update(k - bar.n))
    print(f"      {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print("[2/3] classifying them with the embedded default model (ONNX Runtime, CPU)", file=sys.stderr)
    results = out_dir / "results.csv"
    args.weights, args.device, args.precision, args.max_pixels, args.workers = None, "cpu", "fp32", 64_000_000, None
    args.threshold = None
    n, failed, stats, clf = run_classify([data], args, str(results), progress)
    with open(data / "labels.csv", newline="") as f:
        truth = {r["id"]: int(r["ground_truth"]) for r in csv.DictReader(f)}
    rows = [r for r in read_rows(results) if r.ok]
    labels = np.array([truth[Path(r.path).stem] for r in rows])
    scores = np.array([r.score for r in rows])
    counts = confusion_at(labels, scores, clf.threshold)
    m = metrics_from_counts(**counts)
    s = stats.stages
    print("[3/3] summary", file=sys.stderr)
    print(f"  images        {n} ({failed} failed)\n"
          f"  model         {clf.model_id} ({clf.meta.model_name}), threshold {clf.threshold:g}\n"
          f"  accuracy      {m['accuracy']:.4f}   F1 {m['f1']:.4f}   precision {m['precision']:.4f}   "
          f"recall {m['recall']:.4f}   AUC {roc_auc(labels, scores):.4f}\n"
          f"  confusion     TP {counts['tp']}  FP {counts['fp']}  TN {counts['tn']}  FN {counts['fn']}\n"
          f"  throughput    {stats.throughput:.1f} img/s end to end (PNG bytes on disk -> scores), "
          f"{stats.wall:.2f} s wall\n"
          f"  stage CPU s   read {s.read:.2f}  decode {s.decode:.2f}  preprocess {s.preprocess:.2f}  "
          f"inference {stats.infer:.2f} (wall)\n"
          f"  results       {results}")
    return EXIT_INPUT_ERRORS if failed else EXIT_OK


def cmd_evaluate(args) -> int:
    from iws_engine.bench import evaluate_cmd

    if args.data:
        import tempfile

        scores = Path(tempfile.mkdtemp(prefix="iws-eval-")) / "scores.csv"
        progress = sys.stderr.isatty()
        _, _, _, clf = run_classify(args.data, args, str(scores), progress)
        args.scores = scores
        args.report_backend = f"{clf.runtime} on {args.device}" if "on " not in clf.runtime else clf.runtime
    if args.scores is None:
        print("iws-engine evaluate: give DATA to classify, or --scores from an earlier classify run", file=sys.stderr)
        return EXIT_USAGE
    return evaluate_cmd.run(args)


def cmd_project(args) -> int:
    from iws_engine.bench import project_cmd

    return project_cmd.run(args)


def _build_target(args):
    """The model `build` compiles: SAR_CNN (default) or Pipeline A's EVA02 + XGBoost."""
    from iws_engine.export.targets import Eva02XgbTarget, SarcnnTarget

    if args.model == "eva02xgb":
        return Eva02XgbTarget(args.weights, args.xgboost, eva_config=args.eva_config)
    if args.xgboost is not None:
        raise ValueError("--xgboost is only used with --model eva02xgb")
    return SarcnnTarget(args.weights)


def cmd_build(args) -> int:
    from iws_engine.backends import BackendError
    from iws_engine.export.build import BatchProfile, BuildError, build

    out = args.output or Path("artifacts") / f"{args.model}-{args.backend}-{args.precision}"
    try:
        m = build(target=_build_target(args), backend=args.backend, precision=args.precision, device=args.device,
                  profile=BatchProfile.parse(args.batch), out_dir=out, no_build=args.no_build, calib_dir=args.calib,
                  probes=args.probes)
    except (BuildError, BackendError, ValueError) as e:
        print(f"iws-engine build: {e}", file=sys.stderr)
        return EXIT_USAGE
    p = m["parity"]
    features = (f"max |dfeature| {p['max_abs_dfeature']:.2e}, " if "max_abs_dfeature" in p else "")
    print(f"{out}: {m['backend']} {m['precision']} for {m['model_id']} — parity on {p['probes']} probes: "
          f"{features}max |dp| {p['max_abs_dp']:.2e} (limit {p['max_abs_dp_limit']:g}), "
          f"decision agreement {p['decision_agreement']:.4f}; built {m['built_at']}")
    if not m.get("trained", True):
        print("warning: the model is randomly initialised: the artefact's speed is valid, its scores are not",
              file=sys.stderr)
    return EXIT_OK


def cmd_info(args) -> int:
    import importlib.metadata as md
    import platform

    from iws_engine.backends import BACKENDS
    from iws_engine.backends.base import cpu_cores

    print(f"iws-engine {__version__} on Python {platform.python_version()}, {cpu_cores()} cores")
    for pkg in ("torch", "onnxruntime", "openvino", "onnx", "numpy", "opencv-python-headless", "xgboost", "xgboost-cpu",
                "cupy-cuda13x", "nvidia-nvcomp-cu13", "nvidia-dali-cuda130", "tensorrt", "torch-tensorrt"):
        try:
            print(f"  {pkg:24s} {md.version(pkg)}")
        except md.PackageNotFoundError:
            pass
    print("backends: " + ", ".join(BACKENDS))
    from iws_engine.loaders import native

    print(f"native decode core: {'built, inflate with ' + native.inflater() if native.available() else 'not built'}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="iws-engine", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--version", action="version", version=f"iws-engine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("classify", help="classify PNG vignettes: one output row per input")
    p.add_argument("inputs", nargs="+", metavar="PATH", help="PNG files or directories (searched recursively)")
    _add_model_args(p)
    _add_loader_args(p)
    p.add_argument("--threshold", type=_threshold,
                   help="decision threshold (default: the model's, 0.47 for IWS; 0.48 for eva02xgb, the paper's)")
    p.add_argument("-o", "--output", metavar="OUT", help="results .csv, .jsonl or .parquet (default: CSV on stdout)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("reprocess", help="the archive pass: every input once into a Parquet dataset, resumable, "
                                         "on every core or a Ray cluster")
    from iws_engine import reprocess

    reprocess.add_arguments(p)
    _add_model_args(p)
    _add_loader_args(p)
    p.set_defaults(func=reprocess.cmd_reprocess)

    p = sub.add_parser("import-lux", help="convert the IWS Lux.jl checkpoint (JLD2) to safetensors")
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT.jld2")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.safetensors")
    p.add_argument("--threshold", type=_threshold, default=0.47, help="operating threshold to declare (default: %(default)s, the paper's)")
    p.set_defaults(func=cmd_import_lux)

    p = sub.add_parser("synth", help="write synthetic IWS-like SAR vignettes and labels.csv")
    p.add_argument("out", type=Path, metavar="OUT")
    p.add_argument("--n", type=_positive_int, default=100)
    p.add_argument("--format", default="rgba16", choices=("rgba16", "gray8", "gray16", "rgb8"))
    p.add_argument("--size", type=_size, default=(539, 528), metavar="WxH", help="(default: 539x528)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--positive-fraction", type=float, default=0.5)
    p.add_argument("--workers", type=_positive_int)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="train SAR_CNN v2 (AdamW, one-cycle, label smoothing, rotations)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT.safetensors")
    p.add_argument("--data", type=Path, help="training PNGs with labels.csv (default: synthesise --n-train)")
    p.add_argument("--val-data", type=Path, help="validation PNGs with labels.csv (default: synthesise --n-val)")
    p.add_argument("--n-train", type=_positive_int, default=3000)
    p.add_argument("--n-val", type=_positive_int, default=300)
    p.add_argument("--epochs", type=_positive_int, default=14)
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--max-lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=_positive_int)
    p.add_argument("--record", type=Path, help="also write the training record (JSON) here")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="AUC, F1-optimal threshold and sweep against labels (paper's schema)",
                       conflict_handler="resolve")
    p.add_argument("data", nargs="*", type=Path, metavar="DATA", help="PNG files/directories to classify first")
    from iws_engine.bench import evaluate_cmd

    evaluate_cmd.add_arguments(p)
    _add_model_args(p)
    _add_loader_args(p)
    p.set_defaults(func=cmd_evaluate, threshold=None)

    p = sub.add_parser("project", help="project a throughput to IWS volumes (paper's Tables 5-7)")
    from iws_engine.bench import project_cmd

    project_cmd.add_arguments(p)
    p.set_defaults(func=cmd_project)

    p = sub.add_parser("bench", help="measure configurations side by side (paper protocol): JSON, Markdown, plots")
    from iws_engine.bench import bench_cmd

    bench_cmd.add_arguments(p)
    p.set_defaults(func=bench_cmd.run)

    p = sub.add_parser("report", help="one Markdown page from the latest bench results, against the paper")
    from iws_engine.bench import report_cmd

    report_cmd.add_arguments(p)
    p.set_defaults(func=report_cmd.run)

    p = sub.add_parser("demo", help="the main job on the embedded default: synthesise, classify, summarise")
    p.add_argument("--n", type=_positive_int, default=200, help="vignettes to synthesise (default: %(default)s)")
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--out", type=Path, help="working folder (default: a new temporary folder)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch"))
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("build", help="build a backend artefact + manifest, parity-checked against fp32 eager")
    p.add_argument("--model", default="sarcnn", choices=PIPELINES,
                   help="sarcnn (Pipeline B, default) or eva02xgb (Pipeline A: EVA02 + XGBoost)")
    p.add_argument("--weights", type=Path, metavar="FILE",
                   help="SAR_CNN weights (default: the embedded model) or, with --model eva02xgb, EVA02 weights "
                        "(timm safetensors/.pth; default: random, untrained)")
    p.add_argument("--xgboost", type=Path, metavar="FILE", help="with --model eva02xgb: Pipeline A's XGBoost model")
    p.add_argument("--eva-config", default="large", choices=EVA_CONFIGS,
                   help="with --model eva02xgb: large (the paper's) or tiny (tests) (default: %(default)s)")
    p.add_argument("--probes", type=_positive_int, metavar="N",
                   help="parity probe images (default: 48 for sarcnn, 16 for eva02xgb)")
    p.add_argument("--backend", default="onnxruntime",
                   choices=("onnxruntime", "torch", "inductor", "tensorrt", "torch-tensorrt", "openvino"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "fp16", "bf16", "int8", "fp8"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", default="1:64:256", metavar="MIN:OPT:MAX", help="batch profile (default: %(default)s)")
    p.add_argument("-o", "--output", type=Path, metavar="DIR", help="default: artifacts/<model>-<backend>-<precision>")
    p.add_argument("--no-build", action="store_true", help="fail instead of (re)building when no fitting artefact exists")
    p.add_argument("--calib", type=Path, metavar="DIR",
                   help="calibration PNGs for --precision int8 (--backend tensorrt: entropy calibration; onnxruntime "
                        "or openvino: QDQ ranges) or --backend tensorrt --precision fp8 (Q/DQ scales); default for fp8 "
                        "and onnxruntime/openvino int8: synthetic probe vignettes")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("serve", help="serve the model over HTTP (KServe v2 / Triton protocol), batching requests")
    _add_model_args(p)
    _add_loader_args(p)
    p.add_argument("--threshold", type=_threshold, help="decision threshold (default: the model's, as classify)")
    from iws_engine import serve

    serve.add_arguments(p)
    p.set_defaults(func=serve.run)

    p = sub.add_parser("info", help="versions and available backends")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # recorded with artefacts that say how they were made
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
