"""``iws-engine report``: one Markdown page from the latest bench results, against the paper's figures.

    iws-engine report [--results bench/results] [-o bench/results/REPORT.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, default=Path("bench/results"), metavar="DIR",
                        help="folder of bench-*.json (and cpu-e2e-*.json) results (default: %(default)s)")
    parser.add_argument("-o", "--output", type=Path, metavar="REPORT.md",
                        help="the page to write (default: DIR/REPORT.md)")


def run(args: argparse.Namespace) -> int:
    """Render the page; 0 on success, 2 when there is nothing to report."""
    from iws_engine.bench.report import render_report

    output = args.output or args.results / "REPORT.md"
    try:
        page = render_report(args.results, output)
    except (OSError, ValueError, KeyError) as error:
        print(f"iws-engine report: {error}", file=sys.stderr)
        return 2
    print(f"wrote {page}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point until the lead wires this into ``iws-engine``."""
    parser = argparse.ArgumentParser(prog="iws-engine report", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
