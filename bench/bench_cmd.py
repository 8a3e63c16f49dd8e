"""``iws-engine bench``: measure configurations side by side with the paper's protocol.

    iws-engine bench [--mode model|e2e] [--config torch:fp32 --config onnxruntime:fp32 ...]
                     [--batch-sizes 1,16,64] [--runs 5] [--warmup 2] [--n 256] [--format rgba16]
                     [--size 539x528] [--model sarcnn|eva02xgb|FILE] [--weights FILE]
                     [--xgboost FILE] [--eva-config large|tiny] [--idle-seconds 3]
                     [-o bench/results] [--report]

`--model` means what it means for classify: sarcnn (pipeline B, the default), eva02xgb (pipeline A:
EVA02 + XGBoost, with --xgboost), or a SAR_CNN weights file. Default configurations: torch:fp32 and
onnxruntime:fp32 on the CPU; on a CUDA machine, for sarcnn torch:fp32 and torch:fp16 on cuda first
(the GPU eager fp32 baseline), then the two CPU ones; for eva02xgb torch fp32 and bf16, inductor
bf16 and fp16 and tensorrt fp16, all on cuda. Writes the JSON, Markdown table and plots (see
iws_engine.bench.report) and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from iws_engine.argtypes import int_at_least, size_wxh
from iws_engine.bench.runner import DEFAULT_BATCH_SIZES, MODES, BenchConfig, default_configs, run_bench


def _config(text: str) -> BenchConfig:
    try:
        return BenchConfig.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _batch_sizes(text: str) -> tuple[int, ...]:
    """``"1,16,64"`` -> (1, 16, 64)."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be integers >= 1, got {text!r}")
    return values


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from iws_engine.export.synth import FORMATS

    parser.add_argument("--mode", choices=MODES, default="model",
                        help="model: backend only, on preprocessed inputs; e2e: PNG bytes -> scores (default: %(default)s)")
    parser.add_argument("--config", dest="configs", action="append", type=_config, metavar="BACKEND:PRECISION[:DEVICE][@LOADER]",
                        help="a configuration to measure, repeatable; the first is the baseline; "
                             "@cpu/@gpu/@dali picks the PNG loader in e2e mode "
                             "(default: torch:fp32, onnxruntime:fp32 on cpu; CUDA machines add torch fp32/fp16 on cuda first)")
    parser.add_argument("--batch-sizes", type=_batch_sizes, default=DEFAULT_BATCH_SIZES, metavar="B[,B...]",
                        help="batch-size sweep (default: 1,16,64)")
    parser.add_argument("--runs", type=int_at_least(1), default=5, help="timed runs, reported as mean ± std (default: %(default)s)")
    parser.add_argument("--warmup", type=int_at_least(0), default=2, help="untimed warm-up passes (default: %(default)s)")
    parser.add_argument("--n", dest="n_images", type=int_at_least(1), default=256, metavar="N",
                        help="images per pass (default: %(default)s)")
    parser.add_argument("--format", default="rgba16", choices=FORMATS, help="synthetic PNG format (default: %(default)s)")
    parser.add_argument("--size", type=size_wxh, default=(539, 528), metavar="WxH", help="synthetic PNG size (default: 539x528)")
    # spelled as classify's model options, without its backend/device/precision: --config sets those
    from iws_engine.cli import add_model_choice_args

    add_model_choice_args(parser)
    parser.add_argument("--idle-seconds", type=_seconds, default=3.0, metavar="S",
                        help="GPU idle-power sampling before the runs, CUDA configurations only (default: %(default)s)")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("bench/results"), metavar="DIR",
                        help="where the JSON, Markdown and plots go (default: %(default)s)")
    parser.add_argument("--report", action="store_true", help="also render DIR/REPORT.md (as iws-engine report does)")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _pipeline(args: argparse.Namespace) -> tuple[str, Path | None]:
    """(pipeline, weights) as classify resolves them; ValueError for contradictory model options."""
    from iws_engine.cli import resolve_model  # lazily: the cli imports this module to build its parser

    pipeline, weights = resolve_model(args)
    if pipeline == "eva02xgb" and args.xgboost is None:
        raise ValueError("--model eva02xgb needs --xgboost FILE: Pipeline A's XGBoost model (the paper's "
                         "models/pipeline_a_xgboost.json)")
    if pipeline == "sarcnn" and args.xgboost is not None:
        raise ValueError("--xgboost is only used with --model eva02xgb")
    return pipeline, weights


def run(args: argparse.Namespace) -> int:
    """Measure, write the outputs, print the table; 0 on success, 2 when nothing could be measured."""
    from iws_engine.backends.base import BackendError
    from iws_engine.bench.report import markdown_table, render_report, write_outputs

    try:
        pipeline, weights = _pipeline(args)
        configs = args.configs or default_configs(_cuda_available(), pipeline)
        result = run_bench(configs, mode=args.mode, batch_sizes=args.batch_sizes, runs=args.runs, warmup=args.warmup,
                           n_images=args.n_images, fmt=args.format, size=args.size, weights=weights,
                           idle_seconds=args.idle_seconds, pipeline=pipeline, xgboost=args.xgboost,
                           eva_config=args.eva_config)
    except (BackendError, ValueError, OSError, ImportError) as error:
        print(f"iws-engine bench: {error}", file=sys.stderr)
        return 2
    paths = write_outputs(result, args.output_dir)
    sys.stdout.write(markdown_table(result))
    for config in result["configs"]:
        if "error" in config:
            print(f"not measured: {config['label']}: {config['error']}", file=sys.stderr)
    if not result["model"]["trained"]:
        print("note: the model is randomly initialised: throughput is valid, scores are not", file=sys.stderr)
    print(f"best {result['throughput_img_s']:,.1f} img/s ({result['device']}); wrote "
          + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    if args.report:
        print(f"wrote {render_report(args.output_dir, args.output_dir / 'REPORT.md')}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point until the lead wires this into ``iws-engine``."""
    parser = argparse.ArgumentParser(prog="iws-engine bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
