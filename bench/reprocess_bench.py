"""The archive pass on this machine: `classify` (one process, every core) against `reprocess` with one
single-threaded process, two, the default, and `--engine ray`, over the same PNG files on disk.

    python -m iws_engine.bench.reprocess_bench [--n 1000] [--format rgba16] [--size 539x528] [--runs 1]
                                               [--no-ray] [--work DIR] [-o bench/results]

Each configuration is the real command in a subprocess, writing into a fresh folder. Two rates per run:
  command  n / wall time of the whole command (start-up, listing, model loads, pass, verification): what a user waits
  pass     the rate the pass records in _run.json (workers started, models loaded, shards classified and committed);
           for classify, its own printed rate (model loaded, classification loop only)
"One single-threaded process" is `reprocess --processes 1` with the command pinned to one core (its workers
inherit the affinity), so the pass sizes it to one backend thread and one decoder thread. Writes JSON + Markdown
named after the CPU, cores, date and commit. Goals (issue #10): 2 single-threaded processes >= 1.8x one; the default
>= classify; Ray >= 85 % of the local engine. Projections: 17 M images at each rate, and on 56 cores at the
per-core rate of 2 single-threaded processes (the paper: 1.4 h on its L40 GPU, 12.9 days on its 56-core CPU path).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from iws_engine.bench.projection import DEFAULT_ARCHIVE_IMAGES
from iws_engine.bench.runner import git_commit, machine_record
from iws_engine.bench.report import slug, write_result_files

PAPER = {"pipeline_b_gpu_l40_archive_hours": 1.4, "pipeline_b_cpu_56_cores_archive_days": 12.9}
SERVER_CORES = 56


def write_vignettes(directory: Path, n: int, fmt: str, size: tuple[int, int]) -> None:
    """n PNG files (synthetic_pngs: at most 64 distinct vignettes, repeated) in 10 sub-folders."""
    from iws_engine.bench.runner import synthetic_pngs

    for i, blob in enumerate(synthetic_pngs(n, fmt, size)):
        folder = directory / f"{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"v{i:06d}.png").write_bytes(blob)


def configurations(with_ray: bool) -> list[dict]:
    first_core = min(os.sched_getaffinity(0))
    configs = [
        {"name": "classify", "command": ["classify"], "output": "out.parquet"},
        {"name": "reprocess 1 process x 1 thread", "command": ["reprocess", "--processes", "1"],
         "affinity": {first_core}},
        {"name": "reprocess 2 processes x 1 thread", "command": ["reprocess", "--processes", "2"]},
        {"name": "reprocess default", "command": ["reprocess"]},
    ]
    if with_ray:
        configs.append({"name": "reprocess --engine ray", "command": ["reprocess", "--engine", "ray"]})
    return configs


def model_arguments(weights: Path | None, backend: str | None, precision: str | None) -> list[str]:
    """The model options every configuration gets (classify and reprocess spell them alike)."""
    args = ["--weights", str(weights)] if weights else []
    args += ["--backend", backend] if backend else []
    return args + (["--precision", precision] if precision else [])


def model_label(weights: Path | None, backend: str | None, precision: str | None) -> str:
    model = f"model {weights.name}" if weights else "embedded SAR_CNN"
    return f"{model}, {backend or 'onnxruntime'} {precision or 'fp32'}"


def run_one(config: dict, data: Path, work: Path, n: int, model_args: list[str] = ()) -> dict:
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    target = out / config["output"] if "output" in config else out
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "iws_engine", config["command"][0], str(data), "-o", str(target),
               *config["command"][1:], *model_args, "--no-progress"]
    affinity = config.get("affinity")
    t0 = time.perf_counter()
    r = subprocess.run(command, capture_output=True, text=True,
                       preexec_fn=(lambda: os.sched_setaffinity(0, affinity)) if affinity else None)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {r.returncode}:\n{r.stderr[-2000:]}")
    cores = len(affinity) if affinity else len(os.sched_getaffinity(0))
    if config["command"][0] == "classify":
        pass_rate = float(re.search(r"\(([\d.]+) img/s", r.stderr).group(1))
        processes, threads = 1, cores
    else:
        run = json.loads((out / "_run.json").read_text())["runs"][-1]
        pass_rate, cores = run["throughput_img_s"], run["cores"]
        processes, threads = run.get("processes"), run.get("threads")
    return {"command_wall_s": wall, "command_img_s": n / wall, "pass_img_s": pass_rate, "cores": cores,
            "processes": processes, "threads": threads}


def summarise(rows: dict[str, list[dict]]) -> dict:
    out = {}
    for name, runs in rows.items():
        entry = {"runs": runs, "cores": runs[0]["cores"], "processes": runs[0]["processes"],
                 "threads": runs[0]["threads"]}
        for key in ("command_img_s", "pass_img_s"):
            values = [r[key] for r in runs]
            entry[key] = statistics.mean(values)
            entry[key.replace("_img_s", "_per_core_img_s")] = entry[key] / entry["cores"]
        entry["archive_days_here"] = DEFAULT_ARCHIVE_IMAGES / entry["command_img_s"] / 86400
        out[name] = entry
    return out


def ratios(configs: dict) -> dict:
    one, two = configs["reprocess 1 process x 1 thread"], configs["reprocess 2 processes x 1 thread"]
    default, classify = configs["reprocess default"], configs["classify"]
    result = {}
    for key in ("command_img_s", "pass_img_s"):
        result[key] = {
            "two_over_one": two[key] / one[key],
            "scaling_efficiency": two[key] / (2 * one[key]),
            "default_over_classify": default[key] / classify[key],
        }
        if "reprocess --engine ray" in configs:
            result[key]["ray_over_local_default"] = configs["reprocess --engine ray"][key] / default[key]
    per_core = two["command_per_core_img_s"]
    result["projection_56_cores"] = {"per_core_img_s": per_core, "img_s": per_core * SERVER_CORES,
                                     "archive_days": DEFAULT_ARCHIVE_IMAGES / (per_core * SERVER_CORES) / 86400}
    return result


def to_markdown(r: dict) -> str:
    c, m = r["config"], r["machine"]
    lines = [f"# Archive pass (reprocess) — {m['cpu']}, {m['cores']} cores", "",
             f"{c['n']} synthetic {c['format']} {c['size']} PNG files on disk, {c.get('model', 'embedded SAR_CNN, onnxruntime fp32')}, "
             f"{c['runs']} run(s) each; commit {r['commit']}, {r['date']}. command = n / whole command wall; "
             "pass = the pass's own rate (see the module docstring).", "",
             "| configuration | processes x threads | command img/s | per core | pass img/s | per core | 17 M here |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for name, e in r["configurations"].items():
        lines.append(f"| {name} | {e['processes']} x {e['threads']} | {e['command_img_s']:.2f} | "
                     f"{e['command_per_core_img_s']:.2f} | {e['pass_img_s']:.2f} | {e['pass_per_core_img_s']:.2f} | "
                     f"{e['archive_days_here']:.1f} days |")
    q = r["ratios"]
    lines += ["", "| ratio (goal) | command | pass |", "|---|---:|---:|"]
    for key, goal in (("two_over_one", ">= 1.8"), ("scaling_efficiency", ">= 0.90"),
                      ("default_over_classify", ">= 1.0"), ("ray_over_local_default", ">= 0.85")):
        if key in q["command_img_s"]:
            lines.append(f"| {key} ({goal}) | {q['command_img_s'][key]:.3f} | {q['pass_img_s'][key]:.3f} |")
    p = q["projection_56_cores"]
    lines += ["", f"17 M images on a {SERVER_CORES}-core server at the per-core rate of 2 single-threaded processes "
              f"({p['per_core_img_s']:.2f} img/s per core): {p['img_s']:.0f} img/s, {p['archive_days']:.2f} days = "
              f"{24 * p['archive_days']:.2f} h "
              f"(the paper: {PAPER['pipeline_b_cpu_56_cores_archive_days']} days on its 56-core CPU path, "
              f"{PAPER['pipeline_b_gpu_l40_archive_hours']} h on its L40 GPU)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from iws_engine.argtypes import positive_int, size_wxh

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=positive_int, default=1000)
    p.add_argument("--format", default="rgba16", choices=("rgba16", "gray8", "gray16", "rgb8"))
    p.add_argument("--size", type=size_wxh, default=(539, 528), metavar="WxH")
    p.add_argument("--runs", type=positive_int, default=1)
    p.add_argument("--no-ray", action="store_true", help="leave out --engine ray")
    p.add_argument("--weights", type=Path, help="model weights for every configuration (default: the embedded model)")
    p.add_argument("--backend", help="backend for every configuration (default: classify's, onnxruntime)")
    p.add_argument("--precision", help="precision for every configuration (default: fp32; int8/bf16 are gated and "
                   "built on first use, before the timed runs)")
    p.add_argument("--work", type=Path, help="working folder (default: a temporary folder, removed)")
    p.add_argument("-o", "--output-dir", type=Path, default=Path("bench/results"))
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="iws-reprocess-bench-"))
    data = work / "vignettes"
    try:
        if not data.is_dir():
            write_vignettes(data, a.n, a.format, a.size)
        for path in data.rglob("*.png"):  # the files in the page cache for every configuration alike
            path.read_bytes()
        with_ray = not a.no_ray
        if with_ray:
            try:
                import ray  # noqa: F401
            except ImportError:
                print("ray is not installed (pip install 'iws-engine[ray]'): --engine ray left out", file=sys.stderr)
                with_ray = False
        configs = configurations(with_ray)
        model_args = model_arguments(a.weights, a.backend, a.precision)
        if a.precision not in (None, "fp32"):  # build (gate) the cached artefact once, untimed
            one = next(data.rglob("*.png"))
            subprocess.run([sys.executable, "-m", "iws_engine", "classify", str(one), *model_args, "--no-progress"],
                           check=True, capture_output=True)
        rows: dict[str, list[dict]] = {c["name"]: [] for c in configs}
        for run in range(a.runs):
            for config in configs:  # interleaved: drift on a shared machine hits every configuration alike
                rows[config["name"]].append(run_one(config, data, work, a.n, model_args))
                e = rows[config["name"]][-1]
                print(f"run {run + 1}: {config['name']}: {e['command_img_s']:.2f} img/s (command), "
                      f"{e['pass_img_s']:.2f} img/s (pass)", file=sys.stderr)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = summarise(rows)
    cores = len(os.sched_getaffinity(0))
    r = {"schema": "iws-engine/bench-reprocess/1",
         "machine": machine_record(cores),
         "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
         "config": {"n": a.n, "format": a.format, "size": f"{a.size[0]}x{a.size[1]}", "runs": a.runs,
                    "model": model_label(a.weights, a.backend, a.precision)},
         "configurations": summary, "ratios": ratios(summary), "paper": PAPER,
         "throughput_img_s": summary["reprocess default"]["command_img_s"],
         "per_core_img_s": summary["reprocess 2 processes x 1 thread"]["command_per_core_img_s"]}
    flavour = f"-{a.backend or 'onnxruntime'}-{a.precision}" if a.precision not in (None, "fp32") else ""
    stem = f"reprocess-{slug(r['machine']['cpu'])}-{cores}c-{a.format}{flavour}-{r['date']}-{r['commit']}"
    write_result_files(a.output_dir, stem, r, to_markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
