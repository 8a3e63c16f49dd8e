"""Build the native core with ASan + UBSan and run the atheris harness (tests/fuzz/fuzz_decode.py) on a seed corpus.

    .venv/bin/python tests/fuzz/campaign.py --seconds 60 [--summary FILE.md]
    .venv/bin/python tests/fuzz/campaign.py --runs 1000000 --summary bench/results/fuzz-....md

The sanitized module is a separate CMake build (build/fuzz, -DIWS_NATIVE=ON -DIWS_SANITIZE=ON, GCC's ASan/UBSan); the
harness runs with GCC's ASan runtime preloaded (Python itself is not instrumented, so the runtime must be loaded
first) and leak detection off (CPython keeps its allocations). atheris instruments the Python side (parse_png,
native.py) for coverage; the C++ is checked by the sanitizers. Seeds: PngSuite (../shared/reference/pngsuite, when
present), small synthetic vignettes of every format and row filter, raw-scanline seeds, and the regression files of
tests/corpus/fuzz (every crash ever found). New crashes land in build/fuzz/artifacts/.
Exit status: 0 when the campaign ended without a finding, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "fuzz"
HARNESS = Path(__file__).resolve().with_name("fuzz_decode.py")
REGRESSIONS = ROOT / "tests" / "corpus" / "fuzz"
PNGSUITE = ROOT.parent / "shared" / "reference" / "pngsuite"


def build_sanitized(build: Path = BUILD) -> Path:
    """Configure (once) and build the ASan+UBSan module in `build`; returns its path."""
    cmake = shutil.which("cmake")
    if cmake is None:
        raise RuntimeError("cmake is not on PATH")
    if not (build / "CMakeCache.txt").is_file():
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), "-DIWS_NATIVE=ON", "-DIWS_SANITIZE=ON",
                        "-DIWS_CUDA_CHECK=OFF", "-DCMAKE_BUILD_TYPE=RelWithDebInfo",
                        f"-DPython_EXECUTABLE={sys.executable}"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([cmake, "--build", str(build), "-j", str(os.cpu_count() or 2)], check=True,
                   stdout=subprocess.DEVNULL)
    return next(build.glob("_cpu_decode*" + sysconfig.get_config_var("EXT_SUFFIX")))


def asan_runtime() -> str:
    """GCC's ASan runtime (the module is built by GCC, whose runtime must match)."""
    cc = os.environ.get("CC", "gcc")
    path = subprocess.run([cc, "-print-file-name=libasan.so"], capture_output=True, text=True, check=True).stdout.strip()
    if not os.path.isabs(path):
        raise RuntimeError(f"{cc} has no libasan.so")
    return path


def build_cov_forward(build: Path = BUILD) -> Path:
    source = Path(__file__).resolve().with_name("cov_forward.c")
    target = build / "cov_forward.so"
    if not target.is_file() or target.stat().st_mtime < source.stat().st_mtime:
        build.mkdir(parents=True, exist_ok=True)
        subprocess.run([os.environ.get("CC", "gcc"), "-O2", "-shared", "-fPIC", str(source), "-o", str(target), "-ldl"],
                       check=True)
    return target


def libfuzzer_core() -> str:
    """atheris' Python extension that holds libFuzzer (found without importing atheris)."""
    import importlib.util

    spec = importlib.util.find_spec("atheris")
    if spec is None or spec.origin is None:
        raise RuntimeError("atheris is not installed (pip install atheris; it is in the test extra)")
    return str(next(Path(spec.origin).parent.glob("core_with_libfuzzer*.so")))


def write_seeds(seeds: Path) -> int:
    """The seed corpus; returns the number of files."""
    import numpy as np

    from iws_engine.export.synth import FORMATS, ROW_FILTERS, encode_png, render_vignette

    seeds.mkdir(parents=True, exist_ok=True)
    n = 0

    def put(name: str, data: bytes) -> None:
        nonlocal n
        (seeds / name).write_bytes(data)
        n += 1

    if PNGSUITE.is_dir():
        for path in sorted(PNGSUITE.rglob("*.png")):
            put(f"pngsuite-{path.parent.name}-{path.name}", b"\0" + path.read_bytes())
    field = render_vignette(np.random.default_rng(11), True, 24, 28)
    for fmt in FORMATS:
        for row_filter in ROW_FILTERS:
            put(f"synth-{fmt}-{row_filter}.png", b"\0" + encode_png(field, fmt, row_filter))
    rng = np.random.default_rng(5)
    for k in range(32):  # raw-scanline inputs: header (see fuzz_raw) + random filtered bytes
        header = bytes([1, int(rng.integers(0, 256)), int(rng.integers(0, 256)), k % 8, int(rng.integers(0, 256)),
                        int(rng.integers(0, 256)), k % 2, 0, k % 15 | (k & 16) | (k % 4) << 5])
        put(f"raw-{k}", header + rng.integers(0, 256, 512, dtype=np.uint8).tobytes())
    if REGRESSIONS.is_dir():
        for path in sorted(REGRESSIONS.iterdir()):
            if path.is_file() and path.suffix != ".md":
                put(f"regression-{path.name}", path.read_bytes())
    return n


def run(seconds: int | None, runs: int | None, corpus: Path | None = None, jobs: int = 1, build: Path = BUILD) -> dict:
    """One campaign; `build` holds the sanitized build, seeds, corpus (unless given), artifacts and logs."""
    module = build_sanitized(build)
    seeds = build / "seeds"
    shutil.rmtree(seeds, ignore_errors=True)
    n_seeds = write_seeds(seeds)
    corpus = corpus or build / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts = build / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    # Preload order: cov_forward.c's hooks first (they hand atheris' coverage to its libFuzzer; libasan's weak stubs
    # would swallow it), then ASan, still ahead of libc so it interposes malloc (verify_asan_link_order=0 allows it).
    preload = f"{build_cov_forward(build)}:{asan_runtime()}"
    env = dict(os.environ, IWS_FUZZ_MODULE=str(module), LD_PRELOAD=preload, IWS_LIBFUZZER_CORE=libfuzzer_core(),
               ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:verify_asan_link_order=0",
               UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
    args = [sys.executable, str(HARNESS), str(corpus), str(seeds), f"-artifact_prefix={artifacts}/",
            "-rss_limit_mb=4096", "-timeout=20", "-print_final_stats=1", "-max_len=65536"]
    if seconds is not None:
        args.append(f"-max_total_time={seconds}")
    if runs is not None:
        args.append(f"-runs={runs}")  # per job
    job_dir = build / "jobs"  # libFuzzer writes fuzz-<i>.log for each job into its working directory
    shutil.rmtree(job_dir, ignore_errors=True)
    job_dir.mkdir(parents=True)
    if jobs > 1:
        args += [f"-jobs={jobs}", f"-workers={jobs}"]
    t0 = time.time()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, cwd=job_dir)
    wall = time.time() - t0
    job_logs = [p.read_text(errors="replace") for p in sorted(job_dir.glob("fuzz-*.log"))]
    logs = [proc.stdout + proc.stderr, *job_logs]
    (build / "last-campaign.log").write_text("\n".join(logs))
    # statistics from each job's own log (the parent echoes some of them); a single job reports on stdout
    per_job = [dict(re.findall(r"^stat::(\w+):\s*(\d+)", log, re.M)) for log in (job_logs or logs[:1])]
    per_job = [s for s in per_job if s]
    total = lambda key: sum(int(s.get(key, 0)) for s in per_job)  # noqa: E731
    findings = sorted(p.name for p in artifacts.iterdir())
    # with -jobs the parent's own status is not the jobs' (each log says how its job ended)
    failed = (jobs == 1 and proc.returncode != 0) or any(
        re.search(r"ERROR: (AddressSanitizer|UndefinedBehaviorSanitizer|libFuzzer)|runtime error:|Uncaught Python exception",
                  log) for log in logs)
    return {
        "returncode": proc.returncode, "failed": failed, "wall_s": wall, "seeds": n_seeds, "jobs": jobs,
        "executions": total("number_of_executed_units"), "exec_per_s": total("average_exec_per_sec"),
        "new_units": total("new_units_added"), "peak_rss_mb": max((int(s.get("peak_rss_mb", 0)) for s in per_job), default=0),
        "corpus_files": len(list(corpus.iterdir())), "findings": findings, "log_tail": logs[-1][-3000:],
    }


def summary_markdown(r: dict, command: str) -> str:
    import platform

    from iws_engine.kernels import _cpu_decode  # noqa: F401  (the inflater the sanitized build used is the same)

    lines = [
        "# Fuzzing campaign: parse -> inflate -> native unfilter -> preprocess (ASan + UBSan)",
        "",
        f"Command: `{command}`; {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"inflate: {_cpu_decode.INFLATER}.",
        "",
        "| executions | jobs | exec/s (sum) | wall | seeds | corpus files at the end | new units | peak RSS | findings |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {r['executions']:,} | {r['jobs']} | {r['exec_per_s']} | {r['wall_s'] / 60:.1f} min | {r['seeds']} | {r['corpus_files']} | "
        f"{r['new_units']} | {r['peak_rss_mb']} MB | {', '.join(r['findings']) or 'none'} |",
        "",
        f"Result: {'FINDINGS (see build/fuzz/artifacts)' if r['failed'] or r['findings'] else 'no crash, no sanitizer report'}.",
        "",
        "libFuzzer's last lines (last job):",
        "",
        "```",
        *r["log_tail"].strip().splitlines()[-12:],
        "```",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=int, help="stop after this many seconds")
    p.add_argument("--runs", type=int, help="stop after this many executions")
    p.add_argument("--corpus", type=Path, help="working corpus folder (default build/fuzz/corpus)")
    p.add_argument("--jobs", type=int, default=1, help="parallel fuzzing processes (--runs counts per job)")
    p.add_argument("--summary", type=Path, help="write a Markdown summary here")
    a = p.parse_args(argv)
    if a.seconds is None and a.runs is None:
        p.error("give --seconds and/or --runs")
    r = run(a.seconds, a.runs, a.corpus.resolve() if a.corpus else None, a.jobs)
    print(r["log_tail"][-1500:])
    print({k: v for k, v in r.items() if k != "log_tail"})
    if a.summary:
        a.summary.parent.mkdir(parents=True, exist_ok=True)
        a.summary.write_text(summary_markdown(r, "python tests/fuzz/campaign.py " + " ".join(argv or sys.argv[1:])))
    return 0 if not r["failed"] and not r["findings"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
