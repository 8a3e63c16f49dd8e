"""``iws-engine project``: the paper's operational projections (Tables 5-7) for a throughput.

    iws-engine project (--throughput IMG_PER_S | --from BENCH.json | --from OUT_DIR [--cores N])
                       [--daily N] [--archive N] [--retrains 2,4] [--json]

--from OUT_DIR reads the run record (_run.json) of an `iws-engine reprocess` pass; with --cores N its per-core
rate (per_core_img_s) is scaled to N cores, e.g. a 56-core server from a pass measured on 2.

Prints a Markdown table (or the JSON of :func:`iws_engine.bench.projection.project` with --json).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from iws_engine.argtypes import positive_float, positive_int
from iws_engine.bench.projection import (
    DEFAULT_ARCHIVE_IMAGES,
    DEFAULT_DAILY_IMAGES,
    DEFAULT_RETRAINS,
    format_projection_markdown,
    project,
    project_from_bench,
)


def _retrains(text: str) -> tuple[int, ...]:
    """``"2,4"`` -> (2, 4)."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--throughput", type=positive_float, metavar="IMG_PER_S",
                        help="measured throughput in images per second")
    source.add_argument("--from", dest="bench_json", type=Path, metavar="BENCH_JSON",
                        help="read the throughput from a bench JSON (ours or the paper's *_inference.json), or "
                             "from a reprocess OUT_DIR (its _run.json)")
    parser.add_argument("--cores", type=positive_int, metavar="N",
                        help="with --from a reprocess run: its per-core rate (per_core_img_s) times N cores")
    parser.add_argument("--throughput-key", metavar="DOTTED.PATH",
                        help="where the throughput is in BENCH_JSON (default: try the known layouts)")
    parser.add_argument("--daily", type=positive_int, default=DEFAULT_DAILY_IMAGES, metavar="N",
                        help="images per day in the live feed (default: %(default)s)")
    parser.add_argument("--archive", type=positive_int, default=DEFAULT_ARCHIVE_IMAGES, metavar="N",
                        help="images in the archive (default: %(default)s)")
    parser.add_argument("--retrains", type=_retrains, default=DEFAULT_RETRAINS, metavar="R[,R...]",
                        help="archive re-classifications per year (default: 2,4)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")


def run(args: argparse.Namespace) -> int:
    """Print the projection; 0 on success, 2 on unusable input (message on stderr)."""
    volumes = {"daily_images": args.daily, "archive_images": args.archive, "retrains": args.retrains}
    try:
        bench_json = args.bench_json
        if bench_json is not None and bench_json.is_dir():
            bench_json = bench_json / "_run.json"  # a reprocess OUT_DIR
        if getattr(args, "cores", None) is not None:
            if bench_json is None:
                raise ValueError("--cores scales the per-core rate of a reprocess run: give --from OUT_DIR")
            result = project_from_bench(bench_json, key=args.throughput_key or "per_core_img_s", **volumes)
            result = project(result["throughput_img_s"] * args.cores, source=f"{bench_json}: per-core rate "
                             f"{result['throughput_img_s']:.4g} img/s x {args.cores} cores", **volumes)
        elif bench_json is not None:
            result = project_from_bench(bench_json, key=args.throughput_key, **volumes)
        else:
            result = project(args.throughput, **volumes)
    except (OSError, ValueError, KeyError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"iws-engine project: {message}", file=sys.stderr)
        return 2
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
    else:
        sys.stdout.write(format_projection_markdown(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point until the lead wires this into ``iws-engine``."""
    parser = argparse.ArgumentParser(prog="iws-engine project", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
