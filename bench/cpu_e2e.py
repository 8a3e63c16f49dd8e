"""CPU end-to-end throughput of SAR_CNN classification, stage by stage and together.

    python -m iws_engine.bench.cpu_e2e [--n 512] [--format rgba16] [--size 539x528] [--runs 3] [-o bench/results]

Stages, each timed on its own over the same PNG bytes held in RAM, then the whole pipeline:
  decode       PNG bytes → pixels (thread pool, all cores)
  preprocess   pixels → normalised 256×256 float32 (Julia-faithful reference; thread pool)
  inference    model only, batches of --batch-size (ONNX Runtime, or --backend torch)
  end-to-end   Classifier.classify on the bytes: decode + preprocess overlapped with inference
Writes a JSON and a Markdown table named after the CPU, backend, date and commit.
"""

from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from iws_engine.bench.runner import machine_record
from iws_engine.bench.runner import git_commit as _commit
from iws_engine.bench.report import slug, write_result_files


def _timed(fn, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _summary(n: int, seconds: list[float]) -> dict:
    rates = [n / s for s in seconds]
    return {"img_per_s_mean": statistics.mean(rates), "img_per_s_std": statistics.stdev(rates) if len(rates) > 1 else 0.0,
            "seconds": seconds, "images": n}


def run(n: int, fmt: str, size: tuple[int, int], runs: int, batch_size: int, backend: str, weights: Path | None) -> dict:
    from iws_engine.api import Classifier
    from iws_engine.backends.base import cpu_cores
    from iws_engine.export.synth import encode_png, render_vignette
    from iws_engine.loaders.png import decode_png
    from iws_engine.preprocess import preprocess_reference

    width, height = size
    cores = cpu_cores()
    # A pool of distinct vignettes, repeated to n: rendering thousands would dominate the run.
    distinct = min(n, 64)
    pool = [encode_png(render_vignette(np.random.default_rng([7, i]), i % 2 == 0, height, width), fmt) for i in range(distinct)]
    blobs = [pool[i % distinct] for i in range(n)]
    clf = Classifier(weights, backend=backend, batch_size=batch_size)
    spec = clf.spec

    with ThreadPoolExecutor(cores) as ex:
        pixels = list(ex.map(decode_png, blobs))  # warm-up and the input of the preprocess stage
        decode = _timed(lambda: list(ex.map(decode_png, blobs)), runs)
        pre = _timed(lambda: list(ex.map(lambda p: preprocess_reference(p, spec), pixels)), runs)
        inputs = np.stack(list(ex.map(lambda p: preprocess_reference(p, spec), pixels)))[:, None]

    out = np.empty((n,), np.float32)

    def infer():
        for i in range(0, n, batch_size):
            clf.backend.infer(inputs[i:i + batch_size], out[i:i + batch_size])

    infer()  # warm-up
    inference = _timed(infer, runs)
    list(clf.classify(blobs[:batch_size]))  # warm-up
    e2e = _timed(lambda: list(clf.classify(blobs)), runs)
    clf.close()
    mean_bytes = float(np.mean([len(b) for b in blobs]))
    return {
        "schema": "iws-engine/bench-cpu-e2e/1",
        "machine": machine_record(cores),
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
        "config": {"n": n, "format": fmt, "size": f"{width}x{height}", "mean_png_bytes": mean_bytes, "runs": runs,
                   "batch_size": batch_size, "backend": backend, "model": clf.model_id,
                   **clf.backend.info()},
        "stages": {"decode": _summary(n, decode), "preprocess": _summary(n, pre), "inference": _summary(n, inference)},
        "end_to_end": _summary(n, e2e),
        "throughput_img_s": n / statistics.mean(e2e),
    }


def to_markdown(r: dict) -> str:
    c = r["config"]
    lines = [
        f"# CPU end-to-end, SAR_CNN v2 — {r['machine']['cpu']}, {r['machine']['cores']} cores",
        "",
        f"{c['n']} synthetic {c['format']} {c['size']} vignettes (mean {c['mean_png_bytes'] / 1e6:.2f} MB) from RAM, "
        f"{c['runs']} runs, batch {c['batch_size']}, backend {c['backend']}; commit {r['commit']}, {r['date']}.",
        "",
        "| stage | img/s (mean ± std) | ms/img (all cores) |",
        "|---|---:|---:|",
    ]
    for name, s in [*r["stages"].items(), ("end-to-end", r["end_to_end"])]:
        lines.append(f"| {name} | {s['img_per_s_mean']:.1f} ± {s['img_per_s_std']:.1f} | {1000 / s['img_per_s_mean']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--format", default="rgba16", choices=("rgba16", "gray8", "gray16", "rgb8"))
    p.add_argument("--size", default="539x528")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch"))
    p.add_argument("--weights", type=Path)
    p.add_argument("-o", "--output-dir", type=Path, default=Path("bench/results"))
    a = p.parse_args(argv)
    w, h = (int(x) for x in a.size.split("x"))
    r = run(a.n, a.format, (w, h), a.runs, a.batch_size, a.backend, a.weights)
    stem = f"cpu-e2e-{slug(r['machine']['cpu'])}-{r['machine']['cores']}c-{a.backend}-{a.format}-{r['date']}-{r['commit']}"
    write_result_files(a.output_dir, stem, r, to_markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
