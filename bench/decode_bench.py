"""The CPU decode core, old (decode_png + NumPy reference) vs native (kernels/cpu_decode.cpp), in one run.

    python -m iws_engine.bench.decode_bench [--n 512] [--runs 5] [--format rgba16] [--size 539x528] [-o bench/results]

Measures, on the same PNG bytes held in RAM:
  per-core decode   one vignette at a time on one thread (min and median ms/img): old decode only, old decode +
                    preprocess, native (parse + inflate + unfilter + resize/grey/normalise, fused), native forced
                    through the full (all-lanes) path, native parse alone, native writing bfloat16
  decode threads    CpuLoader batches (decode + preprocess, no model) with 1 and 2 worker threads, old and native
  end to end        Classifier.classify, exact fp32 (ONNX Runtime, Julia-exact preprocessing), old and native loader
  projection        per-core end-to-end rate and the 17 M archive pass on a 56-core server at that per-core rate
  general decode    decode_png (the general decoder) on the same vignettes written Adam7-interlaced and as 8-bit
                    palette images, formats the fused native path does not take (min and median ms/img, one thread)
Writes a JSON and a Markdown table named after the CPU, cores, date and commit.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from iws_engine.bench.projection import DEFAULT_ARCHIVE_IMAGES
from iws_engine.bench.runner import machine_record
from iws_engine.bench.runner import git_commit as _commit
from iws_engine.bench.report import slug, write_result_files

SERVER_CORES = 56  # the CPU server the archive projection is for
PAPER_L40_ARCHIVE_HOURS = 1.4  # the paper's pipeline B archive pass on an L40 (inference only)


def _per_image_ms(fn, blobs: list[bytes], runs: int) -> dict:
    """One thread, one image at a time: min and median ms per image over `runs` passes."""
    fn(blobs[0])  # warm-up (buffers, caches)
    per_pass = []
    for _ in range(runs):
        t0 = time.perf_counter()
        for b in blobs:
            fn(b)
        per_pass.append((time.perf_counter() - t0) / len(blobs) * 1e3)
    return {"ms_min": min(per_pass), "ms_median": statistics.median(per_pass), "ms_passes": per_pass}


def _rate(fn, n: int, runs: int) -> dict:
    fn()  # warm-up
    seconds = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    rates = [n / s for s in seconds]
    return {"img_per_s_mean": statistics.mean(rates), "img_per_s_std": statistics.stdev(rates) if runs > 1 else 0.0,
            "img_per_s_best": max(rates), "seconds": seconds, "images": n}


def _general_decode_rows(blobs: list[bytes], runs: int) -> dict:
    """decode_png (the general decoder, kernels/png_decode_general.cpp) on the vignettes re-encoded Adam7-interlaced
    (same format) and as 8-bit palette images (a grey ramp), Paeth rows like the originals."""
    from iws_engine.export.synth import encode_png_samples
    from iws_engine.loaders.png import decode_png, parse_png

    adam7, palette8 = [], []
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    for blob in blobs:
        info, samples = parse_png(blob), decode_png(blob)
        adam7.append(encode_png_samples(samples, info.color_type, info.bit_depth, interlace=True))
        grey = samples[:, :, :1] >> 8 if samples.dtype == np.uint16 else samples[:, :, :1]
        palette8.append(encode_png_samples(grey.astype(np.uint8), 3, 8, palette=ramp))
    return {"adam7": _per_image_ms(decode_png, adam7, runs), "palette8": _per_image_ms(decode_png, palette8, runs)}


def run(n: int, fmt: str, size: tuple[int, int], runs: int, batch_size: int, single: int) -> dict:
    from iws_engine.api import Classifier
    from iws_engine.backends.base import cpu_cores
    from iws_engine.export.synth import encode_png, render_vignette
    from iws_engine.loaders import native
    from iws_engine.loaders.cpu import CpuLoader
    from iws_engine.loaders.png import decode_png, parse_png
    from iws_engine.preprocess import preprocess_reference

    if not native.available():
        raise SystemExit("the native decode core is not built (pip install -e . builds it)")
    width, height = size
    cores = cpu_cores()
    distinct = min(n, 32)  # rendering is slow; a pool of distinct vignettes repeated to n
    pool = [encode_png(render_vignette(np.random.default_rng([7, i]), i % 2 == 0, height, width), fmt)
            for i in range(distinct)]
    blobs = [pool[i % distinct] for i in range(n)]
    clf = Classifier(None, backend="onnxruntime", batch_size=batch_size, loader="cpu")
    spec = clf.spec
    out = np.empty(spec.size, np.float32)
    out_bf16 = np.empty(spec.size, native.OUT_DTYPES["bfloat16"])
    few = pool[:single]

    per_core = {
        "old_decode": _per_image_ms(lambda b: decode_png(b), few, runs),
        "old_decode_preprocess": _per_image_ms(lambda b: preprocess_reference(decode_png(b), spec, out=out), few, runs),
        "native": _per_image_ms(lambda b: native.decode_preprocess(parse_png(b), spec, out), few, runs),
        "native_full_path": _per_image_ms(lambda b: native.decode_preprocess(parse_png(b), spec, out, force_full=True),
                                          few, runs),
        "native_parse_only": _per_image_ms(lambda b: parse_png(b), few, runs),
        # the batch element type inductor bf16 takes (CpuLoader input_dtype="bfloat16")
        "native_bfloat16_out": _per_image_ms(lambda b: native.decode_preprocess(parse_png(b), spec, out_bf16), few,
                                             runs),
    }

    def loader_pass(workers: int, use_native: bool):
        loader = CpuLoader(spec, batch_size=batch_size, workers=workers, native=use_native)
        return lambda: sum(len(b.ok) for b in loader.batches(blobs))

    threads = {f"{'native' if use_native else 'old'}_{w}_threads": _rate(loader_pass(w, use_native), n, runs)
               for use_native in (True, False) for w in (1, 2)}

    e2e = {}
    for use_native in (True, False):
        clf.loader.native = use_native
        e2e["native" if use_native else "old"] = _rate(lambda: list(clf.classify(blobs)), n, runs)
    info = clf.backend.info()
    clf.close()
    per_core_rate = e2e["native"]["img_per_s_mean"] / cores
    archive_hours = DEFAULT_ARCHIVE_IMAGES / (per_core_rate * SERVER_CORES) / 3600
    general = _general_decode_rows(few, runs)
    return {
        "schema": "iws-engine/bench-decode/1",
        "machine": machine_record(cores),
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
        "config": {"n": n, "format": fmt, "size": f"{width}x{height}", "runs": runs, "batch_size": batch_size,
                   "single_thread_images": single, "mean_png_bytes": float(np.mean([len(b) for b in blobs])),
                   "inflater": native.inflater(), "backend": "onnxruntime", "precision": "fp32",
                   "model": clf.model_id, **info},
        "per_core_decode": per_core,
        "decode_threads": threads,
        "general_decode": general,
        "end_to_end": e2e,
        "throughput_img_s": e2e["native"]["img_per_s_mean"],
        "projection": {"per_core_img_s": per_core_rate, "server_cores": SERVER_CORES,
                       "archive_images": DEFAULT_ARCHIVE_IMAGES, "archive_hours": archive_hours,
                       "paper_l40_archive_hours": PAPER_L40_ARCHIVE_HOURS},
    }


def to_markdown(r: dict) -> str:
    c, p = r["config"], r["projection"]
    lines = [
        f"# CPU decode core, old vs native — {r['machine']['cpu']}, {r['machine']['cores']} cores",
        "",
        f"{c['n']} synthetic {c['format']} {c['size']} vignettes (mean {c['mean_png_bytes'] / 1e6:.2f} MB) from RAM, "
        f"{c['runs']} runs, batch {c['batch_size']}, inflate {c['inflater']}, model {c['model']} on ONNX Runtime fp32; "
        f"commit {r['commit']}, {r['date']}.",
        "",
        "## One vignette on one core (ms/img)",
        "",
        "| path | min | median |",
        "|---|---:|---:|",
    ]
    for name, s in r["per_core_decode"].items():
        lines.append(f"| {name} | {s['ms_min']:.2f} | {s['ms_median']:.2f} |")
    lines += ["", "## Decode threads (CpuLoader, decode + preprocess, no model; img/s)", "",
              "| path | img/s (mean ± std) |", "|---|---:|"]
    for name, s in r["decode_threads"].items():
        lines.append(f"| {name} | {s['img_per_s_mean']:.1f} ± {s['img_per_s_std']:.1f} |")
    lines += ["", "## End to end, exact fp32 (img/s)", "", "| loader | img/s (mean ± std) |", "|---|---:|"]
    for name, s in r["end_to_end"].items():
        lines.append(f"| {name} | {s['img_per_s_mean']:.1f} ± {s['img_per_s_std']:.1f} |")
    lines += ["", f"Per core: {p['per_core_img_s']:.1f} img/s end to end; the {p['archive_images'] / 1e6:.0f} M archive "
              f"on {p['server_cores']} such cores: {p['archive_hours']:.2f} h (paper, L40 GPU: "
              f"{p['paper_l40_archive_hours']} h, inference only)."]
    lines += ["", "## The general decoder on the same vignettes, Adam7-interlaced or 8-bit palette (decode_png, ms/img)",
              "", "| file | min | median |", "|---|---:|---:|"]
    for name, s in r["general_decode"].items():
        lines.append(f"| {name} | {s['ms_min']:.2f} | {s['ms_median']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=512, help="images per throughput pass")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--single", type=int, default=8, help="distinct images in the one-core per-image timing")
    p.add_argument("--format", default="rgba16", choices=("rgba16", "gray8", "gray16", "rgb8"))
    p.add_argument("--size", default="539x528")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("-o", "--output-dir", type=Path, default=Path("bench/results"))
    a = p.parse_args(argv)
    w, h = (int(x) for x in a.size.split("x"))
    r = run(a.n, a.format, (w, h), a.runs, a.batch_size, a.single)
    stem = f"decode-{slug(r['machine']['cpu'])}-{r['machine']['cores']}c-{a.format}-{r['date']}-{r['commit']}"
    write_result_files(a.output_dir, stem, r, to_markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
