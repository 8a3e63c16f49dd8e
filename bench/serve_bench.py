"""Serving benchmark: offline `classify` vs the BatchingClassifier under concurrent single-image callers vs
`iws-engine serve` under concurrent HTTP clients, in one run on one machine.

    python -m iws_engine.bench.serve_bench -o bench/results                 # the issue's configuration
    python -m iws_engine.bench.serve_bench --n 48 --runs 1 --size 128x128 --callers 1,4 -o /tmp/x   # smoke

Measured (SAR_CNN, the same N synthetic PNGs held in RAM, the same loaded model throughout):
  offline        Classifier.classify(all N) — the throughput reference
  single image   Classifier.classify([one]) one after another — the single-image latency reference
  batching C     C threads, each sending one image at a time (submit(...).result()), closed loop
  serve H        `iws-engine serve` (in this process) and H client threads in another process, each sending
                 one image per request with tritonclient.http (binary data), closed loop
Throughput is images / wall time of a pass (mean ± std over --runs); latencies are per request, client side,
pooled over the runs; batch sizes come from the batcher's stats. The goals of issue #12: at 16 callers both
batching and serve reach >= 90 % of offline throughput, and at 4 callers p99 <= 3x the single-image latency.
Writes serve-<cpu>-<cores>c-<date>-<commit>.json and .md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from iws_engine.argtypes import positive_int, size_wxh

SCHEMA = "iws-engine/bench-serve/1"
THROUGHPUT_GOAL = 0.90  # of offline, at 16 callers
LATENCY_GOAL = 3.0  # p99 at 4 callers, times the single-image latency


def _cpu_seconds() -> float:
    """This process's CPU time, all threads (user + system)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _percentiles(latencies_s: list[float]) -> dict:
    ms = np.asarray(latencies_s, dtype=np.float64) * 1000.0
    return {"p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "p99": float(np.percentile(ms, 99)), "mean": float(ms.mean()), "requests": int(ms.size)}


def _cpu_ms(since: float, images: int) -> float:
    return (_cpu_seconds() - since) * 1000.0 / images if images else 0.0


def _rates(n: int, walls: list[float]) -> dict:
    rates = [n / w for w in walls]
    return {"img_per_s_mean": statistics.mean(rates), "img_per_s_std": statistics.stdev(rates) if len(rates) > 1 else 0.0,
            "seconds": walls, "images": n}


def _closed_loop(n_callers: int, n_images: int, send) -> tuple[float, list[float]]:
    """`n_callers` threads share images 0..n-1 (caller k takes k, k+C, ...), each calling `send(i)` for one image
    at a time; returns (wall seconds, per-request latencies)."""
    latencies: list[list[float]] = [[] for _ in range(n_callers)]
    errors: list[str] = []
    start = threading.Barrier(n_callers + 1)

    def caller(k: int):
        start.wait()
        try:
            for i in range(k, n_images, n_callers):
                t0 = time.perf_counter()
                send(i)
                latencies[k].append(time.perf_counter() - t0)
        except Exception as e:  # reported after the pass
            errors.append(f"caller {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(n_callers)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    return wall, [x for per in latencies for x in per]


def _batch_sizes(before: dict, after: dict) -> dict[int, int]:
    sizes = dict(after["batch_sizes"])
    for k, v in before["batch_sizes"].items():
        sizes[k] -= v
    return {k: v for k, v in sorted(sizes.items()) if v}


def _batching_record(sizes: dict[int, int]) -> dict:
    batches = sum(sizes.values())
    return {"batches": batches, "mean_batch_size": sum(k * v for k, v in sizes.items()) / batches if batches else 0.0,
            "batch_sizes": {str(k): v for k, v in sizes.items()}}


# ----------------------------------------------------------------------------- HTTP clients (another process)

_CLIENT_BLOBS: dict = {}

def http_clients(address: str, n_clients: int, n_images: int, fmt: str, size: tuple[int, int], runs: int,
                 warmup: int, model_name: str) -> dict:
    """In a child process: H tritonclient threads, one image per request, `runs` closed-loop passes.
    The PNGs are re-made here from the same seeds (bench.runner.synthetic_pngs), not pickled across."""
    import tritonclient.http as httpclient

    from iws_engine.bench.runner import synthetic_pngs

    key = (n_images, fmt, size)
    if key not in _CLIENT_BLOBS:  # the warm-up call makes them, the measured call reuses them
        _CLIENT_BLOBS[key] = synthetic_pngs(n_images, fmt, size)
    blobs = _CLIENT_BLOBS[key]
    local = threading.local()

    def send(i: int):
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpclient.InferenceServerClient(address, network_timeout=300)
        x = httpclient.InferInput("png", [1], "BYTES")
        x.set_data_from_numpy(np.array([blobs[i]], dtype=np.object_), binary_data=True)
        result = client.infer(model_name, [x])
        error = result.as_numpy("error")[0]
        if error:
            raise RuntimeError(error.decode())

    if warmup:
        _closed_loop(n_clients, min(warmup, n_images), send)
    walls, latencies, cpu0 = [], [], _cpu_seconds()
    for _ in range(runs):
        wall, lat = _closed_loop(n_clients, n_images, send)
        walls.append(wall)
        latencies.extend(lat)
    return {"walls": walls, "latencies": latencies, "cpu_ms_per_image": _cpu_ms(cpu0, runs * n_images)}


# ----------------------------------------------------------------------------- the run

def run(n: int, fmt: str, size: tuple[int, int], runs: int, callers: list[int], http_clients_n: int,
        batch_size: int, max_queue_delay_ms: float, backend: str, weights: Path | None, single: int,
        warmup: int) -> dict:
    from iws_engine.api import Classifier
    from iws_engine.backends.base import cpu_cores
    from iws_engine.batching import BatchingClassifier
    from iws_engine.bench.runner import git_commit, machine_record, synthetic_pngs
    from iws_engine.serve import ServerThread

    blobs = synthetic_pngs(n, fmt, size)
    clf = Classifier(weights, backend=backend, batch_size=batch_size, loader="cpu")
    result: dict = {
        "schema": SCHEMA,
        "machine": machine_record(cpu_cores()),
        "commit": git_commit(), "date": time.strftime("%Y-%m-%d"),
        "config": {"n": n, "format": fmt, "size": f"{size[0]}x{size[1]}",
                   "mean_png_bytes": float(np.mean([len(b) for b in blobs])), "runs": runs, "warmup": warmup,
                   "max_batch_size": batch_size, "max_queue_delay_ms": max_queue_delay_ms, "model": clf.model_id,
                   **clf.backend.info()},
        "rows": [],
    }
    rows = result["rows"]
    try:
        # offline: the whole set in one classify call
        list(clf.classify(blobs[:warmup]))
        walls, cpu0 = [], _cpu_seconds()
        for _ in range(runs):
            t0 = time.perf_counter()
            out = list(clf.classify(blobs))
            walls.append(time.perf_counter() - t0)
            assert all(r.ok for r in out)
        rows.append({"mode": "offline", "callers": 1, **_rates(n, walls), "cpu_ms_per_image": _cpu_ms(cpu0, runs * n)})
        offline_rate = rows[-1]["img_per_s_mean"]

        # single-image latency: classify([one]) one after another
        latencies = []
        for i in range(single):
            t0 = time.perf_counter()
            list(clf.classify([blobs[i % n]]))
            latencies.append(time.perf_counter() - t0)
        rows.append({"mode": "single image", "callers": 1, "latency_ms": _percentiles(latencies)})
        single_ms = rows[-1]["latency_ms"]["p50"]

        # the in-process batcher under C concurrent single-image callers
        for c in callers:
            with BatchingClassifier(classifier=clf, max_batch_size=batch_size,
                                    max_queue_delay_ms=max_queue_delay_ms) as batcher:
                def send(i: int):
                    row = batcher.submit(blobs[i]).result()
                    if not row.ok:
                        raise RuntimeError(row.error)

                _closed_loop(c, min(warmup, n), send)
                before, cpu0 = batcher.stats(), _cpu_seconds()
                walls, latencies = [], []
                for _ in range(runs):
                    wall, lat = _closed_loop(c, n, send)
                    walls.append(wall)
                    latencies.extend(lat)
                sizes = _batch_sizes(before, batcher.stats())
                cpu_ms = _cpu_ms(cpu0, runs * n)
            rows.append({"mode": "batching", "callers": c, **_rates(n, walls), "latency_ms": _percentiles(latencies),
                         **_batching_record(sizes), "cpu_ms_per_image": cpu_ms})

        # the HTTP server under H client threads in another process
        if http_clients_n:
            with BatchingClassifier(classifier=clf, max_batch_size=batch_size,
                                    max_queue_delay_ms=max_queue_delay_ms) as batcher, \
                    ServerThread(batcher) as server:
                with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                    pool.submit(http_clients, server.address, http_clients_n, n, fmt, size, 0, warmup, "iws").result()
                    before, cpu0 = batcher.stats(), _cpu_seconds()
                    measured = pool.submit(http_clients, server.address, http_clients_n, n, fmt, size, runs, 0,
                                           "iws").result()
                    sizes = _batch_sizes(before, batcher.stats())
                    cpu_ms = _cpu_ms(cpu0, runs * n)
            rows.append({"mode": "serve (HTTP)", "callers": http_clients_n, **_rates(n, measured["walls"]),
                         "latency_ms": _percentiles(measured["latencies"]), **_batching_record(sizes),
                         "cpu_ms_per_image": cpu_ms, "client_cpu_ms_per_image": measured["cpu_ms_per_image"]})
    finally:
        clf.close()

    for row in rows:
        if "img_per_s_mean" in row:
            row["fraction_of_offline"] = row["img_per_s_mean"] / offline_rate
    result["goals"] = goals(rows, single_ms)
    return result


def goals(rows: list[dict], single_ms: float) -> list[dict]:
    """The issue's goals, evaluated where the run measured what they need."""
    out = []
    for row in rows:
        if row["mode"] in ("batching", "serve (HTTP)") and row["callers"] == 16:
            out.append({"goal": f"{row['mode']} at 16 callers >= {THROUGHPUT_GOAL:.0%} of offline throughput",
                        "value": row["fraction_of_offline"], "met": row["fraction_of_offline"] >= THROUGHPUT_GOAL})
        if row["mode"] == "batching" and row["callers"] == 4:
            ratio = row["latency_ms"]["p99"] / single_ms
            out.append({"goal": f"batching at 4 callers: p99 <= {LATENCY_GOAL:g}x single-image latency "
                                f"({single_ms:.1f} ms)", "value": ratio, "met": ratio <= LATENCY_GOAL})
    return out


def to_markdown(r: dict) -> str:
    c, m = r["config"], r["machine"]
    lines = [
        f"# Serving benchmark, SAR_CNN — {m['cpu']}, {m['cores']} cores",
        "",
        f"{c['n']} synthetic {c['format']} {c['size']} vignettes (mean {c['mean_png_bytes'] / 1e6:.2f} MB) from RAM, "
        f"{c['runs']} runs; {c['backend']} {c['precision']}; max batch {c['max_batch_size']}, max queue delay "
        f"{c['max_queue_delay_ms']:g} ms; model {c['model']}; commit {r['commit']}, {r['date']}.",
        "",
        "| mode | callers | img/s (mean ± std) | of offline | latency p50 / p95 / p99 ms | CPU ms/img | mean batch "
        "| batch sizes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in r["rows"]:
        rate = (f"{row['img_per_s_mean']:.1f} ± {row['img_per_s_std']:.1f}" if "img_per_s_mean" in row else "–")
        frac = f"{row['fraction_of_offline']:.0%}" if "fraction_of_offline" in row else "–"
        lat = row.get("latency_ms")
        lat_text = f"{lat['p50']:.1f} / {lat['p95']:.1f} / {lat['p99']:.1f}" if lat else "–"
        mean_batch = f"{row['mean_batch_size']:.2f}" if "mean_batch_size" in row else "–"
        sizes = ", ".join(f"{k}: {v}" for k, v in row.get("batch_sizes", {}).items()) or "–"
        cpu = f"{row['cpu_ms_per_image']:.1f}" if "cpu_ms_per_image" in row else "–"
        lines.append(f"| {row['mode']} | {row['callers']} | {rate} | {frac} | {lat_text} | {cpu} | {mean_batch} "
                     f"| {sizes} |")
    if r["goals"]:
        lines += ["", "| goal | value | met |", "|---|---:|---|"]
        for g in r["goals"]:
            value = f"{g['value']:.0%}" if "throughput" in g["goal"] else f"{g['value']:.2f}x"
            lines.append(f"| {g['goal']} | {value} | {'yes' if g['met'] else 'no'} |")
    lines += ["", "Latency is per request, client side (serve: through HTTP from another process). CPU ms/img: the "
                  "measuring process, all threads (serve: the server's side; its clients' is in the JSON)."]
    return "\n".join(lines) + "\n"


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    from iws_engine.bench.report import slug, write_result_files

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=positive_int, default=512, help="images per pass (default: %(default)s)")
    p.add_argument("--runs", type=positive_int, default=3, help="timed passes per mode (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=32, help="untimed images before each mode (default: %(default)s)")
    p.add_argument("--callers", type=_int_list, default=[1, 4, 16], metavar="C[,C...]",
                   help="concurrent single-image callers of the BatchingClassifier (default: 1,4,16)")
    p.add_argument("--http-clients", type=int, default=16, metavar="H",
                   help="concurrent HTTP clients of serve; 0 skips serve (default: %(default)s)")
    p.add_argument("--single", type=positive_int, default=64,
                   help="single-image classify calls for the latency reference (default: %(default)s)")
    p.add_argument("--format", default="rgba16", choices=("rgba16", "gray8", "gray16", "rgb8"))
    p.add_argument("--size", type=size_wxh, default=(539, 528), metavar="WxH", help="(default: 539x528)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="max batch size (default: %(default)s)")
    p.add_argument("--max-queue-delay-ms", type=float, default=5.0, help="(default: %(default)s)")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch"))
    p.add_argument("--weights", type=Path, metavar="FILE", help="SAR_CNN weights (default: the embedded model)")
    p.add_argument("-o", "--output-dir", type=Path, default=Path("bench/results"))
    a = p.parse_args(argv)
    r = run(a.n, a.format, a.size, a.runs, a.callers, a.http_clients, a.batch_size, a.max_queue_delay_ms, a.backend,
            a.weights, a.single, a.warmup)
    stem = f"serve-{slug(r['machine']['cpu'])}-{r['machine']['cores']}c-{r['date']}-{r['commit']}"
    write_result_files(a.output_dir, stem, r, to_markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
