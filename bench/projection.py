"""The paper's operational projections (its Tables 5-7) from a measured throughput.

The paper (Pinelo et al., GMD 2026, Section 6) projects a throughput T (images/s, inference only,
as measured in data/*_inference.json) onto the Internal Waves Service's volumes: a daily feed of
~4,000 images, an archive of up to 17 million images, and R = 2 or 4 archive re-classifications
(retrains) a year. The formulas below are not printed in the data files; they were derived from the
published figures and reproduce every one that is public (paper abstract, repository README):

    daily feed time      = daily_images / T                         (seconds)
    archive pass         = archive_images / T                       (seconds; A GPU 7.7 days, B GPU 1.4 h)
    annual GPU hours (R) = (R * archive_images + days_per_year * daily_images) / T / 3600
                                                                    (A GPU R=2: 384 h, B GPU R=2: 2.9 h)
    max daily volume     = 86,400 s * T                             (images/day at 100 % occupation)
    headroom             = max daily volume / daily_images

The annual figure counts the daily feed for 365 days on top of R archive passes: without it
pipeline A would be 368 h, not the published 384 h. Time is pure inference time at the measured
throughput (no loading, queueing or idle time), as in the paper.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_ARCHIVE_IMAGES",
    "DEFAULT_DAILY_IMAGES",
    "DEFAULT_RETRAINS",
    "SECONDS_PER_DAY",
    "format_projection_markdown",
    "project",
    "project_from_bench",
    "read_throughput",
]

DEFAULT_DAILY_IMAGES = 4_000  # full Sentinel-1 constellation, WV mode, per day
DEFAULT_ARCHIVE_IMAGES = 17_000_000  # WV-mode archive since 2014 (upper estimate)
DEFAULT_RETRAINS = (2, 4)  # archive re-classifications per year
DAYS_PER_YEAR = 365
SECONDS_PER_DAY = 86_400
SECONDS_PER_HOUR = 3_600

# Where a throughput (images/s) lives in the bench JSON layouts we know, tried in order.
THROUGHPUT_KEY_PATHS: tuple[tuple[str, ...], ...] = (
    ("throughput_img_s",),  # iws-engine bench results
    ("throughput_images_per_sec",),  # paper, pipeline A (*_inference.json)
    ("timing_metrics", "images_per_second"),  # paper, pipeline B GPU (*_inference.json)
    ("performance", "throughput", "img_per_s"),  # paper, pipeline B CPU (*_inference.json)
    ("throughput", "img_per_s"),
    ("images_per_second",),
)


def project(throughput_img_s: float, *, daily_images: int = DEFAULT_DAILY_IMAGES,
            archive_images: int = DEFAULT_ARCHIVE_IMAGES,
            retrains: Sequence[int] = DEFAULT_RETRAINS,
            days_per_year: int = DAYS_PER_YEAR, source: str | None = None) -> dict[str, Any]:
    """Daily feed time, archive pass, annual GPU hours per R, max daily volume and headroom."""
    throughput = float(throughput_img_s)
    if not throughput > 0:
        raise ValueError(f"throughput must be a positive number of images/s, got {throughput_img_s!r}")
    if daily_images <= 0 or archive_images <= 0 or days_per_year <= 0:
        raise ValueError("daily_images, archive_images and days_per_year must be positive")
    if any(r < 0 for r in retrains):
        raise ValueError("retrains must not be negative")

    daily_feed_s = daily_images / throughput
    archive_pass_s = archive_images / throughput
    yearly_feed_hours = days_per_year * daily_images / throughput / SECONDS_PER_HOUR
    max_daily_images = SECONDS_PER_DAY * throughput
    annual = [
        {
            "retrains": int(r),
            "archive_hours": r * archive_images / throughput / SECONDS_PER_HOUR,
            "daily_feed_hours": yearly_feed_hours,
            "gpu_hours": (r * archive_images + days_per_year * daily_images) / throughput / SECONDS_PER_HOUR,
        }
        for r in retrains
    ]
    return {
        "source": source,
        "throughput_img_s": throughput,
        "volumes": {
            "daily_images": int(daily_images),
            "archive_images": int(archive_images),
            "retrains": [int(r) for r in retrains],
            "days_per_year": int(days_per_year),
        },
        "daily_feed": {
            "seconds": daily_feed_s,
            "minutes": daily_feed_s / 60,
            "hours": daily_feed_s / SECONDS_PER_HOUR,
            "share_of_day": daily_feed_s / SECONDS_PER_DAY,
        },
        "archive_pass": {
            "seconds": archive_pass_s,
            "hours": archive_pass_s / SECONDS_PER_HOUR,
            "days": archive_pass_s / SECONDS_PER_DAY,
        },
        "annual": annual,
        "max_daily_images": max_daily_images,
        "headroom": max_daily_images / daily_images,
    }


def read_throughput(bench: Mapping[str, Any], key: str | None = None) -> float:
    """The throughput (images/s) stored in a bench JSON document.

    ``key`` is a dotted path (``"timing_metrics.images_per_second"``); without it the known
    layouts in :data:`THROUGHPUT_KEY_PATHS` are tried in order.
    """
    paths = [tuple(key.split("."))] if key else list(THROUGHPUT_KEY_PATHS)
    for path in paths:
        node: Any = bench
        for part in path:
            if not isinstance(node, Mapping) or part not in node:
                break
            node = node[part]
        else:
            if isinstance(node, (int, float)) and not isinstance(node, bool):
                return float(node)
            raise ValueError(f"{'.'.join(path)} is not a number: {node!r}")
    tried = ", ".join(".".join(p) for p in paths)
    raise KeyError(f"no throughput found (looked for {tried})")


def _source_label(bench: Mapping[str, Any], path: Path) -> str:
    """A name for the measured configuration: the file's own pipeline/device fields, else its name."""
    name = bench.get("pipeline_name") or bench.get("pipeline")
    metadata = bench.get("metadata")
    if not name and isinstance(metadata, Mapping):
        name = metadata.get("pipeline")
    device = bench.get("device") or bench.get("backend")
    if name:
        return f"{name} ({device})" if device else str(name)
    return path.name


def project_from_bench(path: str | Path, *, key: str | None = None, **volumes: Any) -> dict[str, Any]:
    """:func:`project` for the throughput recorded in a bench JSON (ours or the paper's)."""
    bench_path = Path(path)
    with bench_path.open(encoding="utf-8") as handle:
        bench = json.load(handle)
    if not isinstance(bench, Mapping):
        raise ValueError(f"{bench_path}: expected a JSON object")
    try:
        throughput = read_throughput(bench, key)
    except KeyError as error:
        raise KeyError(f"{bench_path}: {error.args[0]}") from None
    result = project(throughput, source=_source_label(bench, bench_path), **volumes)
    result["bench_file"] = str(bench_path)
    return result


# ----------------------------------------------------------------------------- Markdown

def _format_duration(seconds: float) -> str:
    """A duration in the unit a reader expects: s below 2 min, min below 2 h, h below 2 days, else days."""
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 2 * SECONDS_PER_HOUR:
        return f"{seconds / 60:.3g} min"
    if seconds < 2 * SECONDS_PER_DAY:
        return f"{seconds / SECONDS_PER_HOUR:.3g} h"
    return f"{seconds / SECONDS_PER_DAY:.3g} days"


def _format_hours(hours: float) -> str:
    return f"{hours:,.1f} h" if hours >= 10 else f"{hours:.3g} h"


def format_projection_markdown(result: Mapping[str, Any]) -> str:
    """A two-column Markdown table of one projection, with the volumes it assumed."""
    volumes = result["volumes"]
    daily = volumes["daily_images"]
    archive = volumes["archive_images"]
    rows = [
        ("Measured throughput", f"{result['throughput_img_s']:,.4g} img/s"),
        (f"Daily feed ({daily:,} img/day)",
         f"{_format_duration(result['daily_feed']['seconds'])} "
         f"({100 * result['daily_feed']['share_of_day']:.3g} % of a day)"),
        (f"Archive pass ({archive:,} img)",
         f"{_format_duration(result['archive_pass']['seconds'])} "
         f"({_format_hours(result['archive_pass']['hours'])})"),
    ]
    for entry in result["annual"]:
        rows.append((
            f"Annual GPU hours, R = {entry['retrains']} "
            f"(R x archive + {volumes['days_per_year']} days of feed)",
            _format_hours(entry["gpu_hours"]),
        ))
    rows.append(("Max daily volume (86,400 s x throughput)", f"{result['max_daily_images']:,.0f} img/day"))
    rows.append((f"Headroom over {daily:,} img/day", f"{result['headroom']:,.1f}x"))

    title = f"Operational projection: {result['source']}" if result.get("source") else "Operational projection"
    lines = [f"### {title}", "", "| Quantity | Value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in rows]
    lines += ["", "Pure inference time at the measured throughput (no loading, queueing or idle time)."]
    return "\n".join(lines) + "\n"
