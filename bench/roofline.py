"""The CPU's arithmetic ceiling for SAR_CNN, measured: how fast could the model and the whole pipeline be here?

    python -m iws_engine.bench.roofline [--seconds 2] [--model-json M.json] [--decode-json D.json] [--e2e-json E.json]
                                        [-o bench/results]

Compiles bench/peak_ops.c (gcc) and runs its multiply-accumulate loops — fp32 FMA, bf16 VDPBF16PS, int8 VPDPBUSD,
no memory traffic — on one core and on every core at once. SAR_CNN v2's multiply-accumulates per image (counted from
the architecture) turn these peaks into model ceilings in img/s. Given a model benchmark JSON (`iws-engine bench`,
model only) it reports each precision's measured rate as a fraction of its ceiling; given a decode benchmark JSON
(`bench.decode_bench`) it adds the end-to-end ceiling (the native decode's measured per-core cost plus the model at
its arithmetic peak, both on every core) and the 17 M archive projection for a 56-core server at that ceiling;
given an end-to-end benchmark JSON (`iws-engine bench --mode e2e`), each precision's measured end-to-end rate
as a fraction of that ceiling.
Writes a JSON and a Markdown table named after the CPU, cores, date and commit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from iws_engine.bench.projection import DEFAULT_ARCHIVE_IMAGES
from iws_engine.bench.report import slug, write_result_files
from iws_engine.bench.runner import machine_record
from iws_engine.bench.runner import git_commit as _commit

KINDS = ("fp32", "bf16", "int8")
#: Which peak bounds each model precision (bf16 runs as VDPBF16PS dot products, int8 as VNNI u8×s8).
PRECISION_PEAK = {"fp32": "fp32", "bf16": "bf16", "int8": "int8"}
SERVER_CORES = 56
PAPER_L40_ARCHIVE_HOURS = 1.4
SOURCE = Path(__file__).with_name("peak_ops.c")
UNSUPPORTED = 3  # peak_ops' exit status when the CPU lacks the instructions
REPEATS = 3  # each peak: the best of this many runs


def sarcnn_macs_per_image() -> int:
    """Multiply-accumulates of one SAR_CNN v2 forward pass (convolutions and dense layers; BN, ReLU, pooling add none)."""
    from iws_engine.export.models.sarcnn import INPUT_SHAPE, SARCNN_V2_BLOCKS, SARCNN_V2_HEAD

    _, h, w = INPUT_SHAPE
    macs = 0
    for b in SARCNN_V2_BLOCKS:
        h = (h + 2 * b.pad - b.kernel) // b.stride + 1
        w = (w + 2 * b.pad - b.kernel) // b.stride + 1
        macs += h * w * b.out_ch * b.in_ch * b.kernel * b.kernel
        if b.pool:
            h, w = h // 2, w // 2
    d_in, d_hidden, d_out = SARCNN_V2_HEAD
    return macs + d_in * d_hidden + d_hidden * d_out


def build_peak_ops(workdir: Path) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("no C compiler (gcc/cc) on PATH to build bench/peak_ops.c")
    exe = workdir / "peak_ops"
    subprocess.run([gcc, "-O2", "-o", str(exe), str(SOURCE)], check=True, capture_output=True, text=True)
    return exe


def measure_peak(exe: Path, kind: str, processes: int, seconds: float, repeats: int = 1) -> float | None:
    """Multiply-accumulates per second of `processes` copies running at once (summed; the best of `repeats`: a peak
    is what the hardware can do, and anything else running only lowers it); None if unsupported."""
    best = 0.0
    for _ in range(repeats):
        procs = [subprocess.Popen([str(exe), kind, str(seconds)], stdout=subprocess.PIPE, text=True)
                 for _ in range(processes)]
        outputs = [(p, p.communicate()[0]) for p in procs]
        if any(p.returncode == UNSUPPORTED for p, _ in outputs):
            return None
        for p, _ in outputs:
            if p.returncode != 0:
                raise RuntimeError(f"peak_ops {kind} exited with status {p.returncode}")
        best = max(best, sum(float(out.split()[1]) for _, out in outputs))
    return best


def _model_rates(model_json: Path | None) -> dict[str, dict]:
    """The best measured rate per precision (CPU rows) from an `iws-engine bench` JSON (model-only or e2e mode)."""
    if model_json is None:
        return {}
    doc = json.loads(model_json.read_text())
    best: dict[str, dict] = {}
    for row in doc.get("rows", []):
        if row.get("device") != "cpu":
            continue
        rate = row["throughput_img_s"]["mean"]
        if rate > best.get(row["precision"], {}).get("img_s", 0.0):
            best[row["precision"]] = {"img_s": rate, "config": row["config"], "batch_size": row["batch_size"]}
    return best


def _decode_ms(decode_json: Path | None) -> float | None:
    """The native core's best per-core decode + preprocess time (ms/img) from a decode benchmark JSON."""
    if decode_json is None:
        return None
    return float(json.loads(decode_json.read_text())["per_core_decode"]["native"]["ms_min"])


def run(seconds: float, model_json: Path | None, decode_json: Path | None, cores: int | None = None,
        e2e_json: Path | None = None) -> dict:
    from iws_engine.backends.base import cpu_cores

    cores = cores or cpu_cores()
    macs = sarcnn_macs_per_image()
    with tempfile.TemporaryDirectory(prefix="iws-roofline-") as tmp:
        exe = build_peak_ops(Path(tmp))
        peaks = {}
        for kind in KINDS:
            one = measure_peak(exe, kind, 1, seconds, REPEATS)
            every = measure_peak(exe, kind, cores, seconds, REPEATS) if one is not None else None
            peaks[kind] = None if one is None else {"mac_per_s_one_core": one, "mac_per_s_all_cores": every}
    measured = _model_rates(model_json)
    measured_e2e = _model_rates(e2e_json)
    decode_ms = _decode_ms(decode_json)
    ceilings = {}
    for precision, kind in PRECISION_PEAK.items():
        peak = peaks[kind]
        if peak is None:
            continue
        ceiling = peak["mac_per_s_all_cores"] / macs
        row = {"peak": kind, "model_img_s_ceiling": ceiling}
        if precision in measured:
            row["model_img_s_measured"] = measured[precision]["img_s"]
            row["measured_config"] = measured[precision]["config"]
            row["fraction_of_ceiling"] = measured[precision]["img_s"] / ceiling
        if decode_ms is not None:
            core_ms = decode_ms + 1e3 * cores / ceiling  # one image's decode + its model work at peak, per core
            row["e2e_img_s_ceiling"] = 1e3 * cores / core_ms
            row["archive_hours_at_ceiling"] = DEFAULT_ARCHIVE_IMAGES / (1e3 / core_ms * SERVER_CORES) / 3600
            if precision in measured_e2e:
                row["e2e_img_s_measured"] = measured_e2e[precision]["img_s"]
                row["e2e_measured_config"] = measured_e2e[precision]["config"]
                row["e2e_fraction_of_ceiling"] = measured_e2e[precision]["img_s"] / row["e2e_img_s_ceiling"]
        ceilings[precision] = row
    return {
        "schema": "iws-engine/bench-roofline/1",
        "machine": machine_record(cores),
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
        "config": {"seconds": seconds, "model_json": str(model_json) if model_json else None,
                   "e2e_json": str(e2e_json) if e2e_json else None,
                   "decode_json": str(decode_json) if decode_json else None,
                   "sarcnn_macs_per_image": macs, "decode_ms_per_img_core": decode_ms,
                   "server_cores": SERVER_CORES, "archive_images": DEFAULT_ARCHIVE_IMAGES},
        "peaks": peaks,
        "ceilings": ceilings,
    }


def to_markdown(r: dict) -> str:
    c, m = r["config"], r["machine"]
    lines = [
        f"# Arithmetic ceiling of SAR_CNN v2 — {m['cpu']}, {m['cores']} cores",
        "",
        f"bench/peak_ops.c multiply-accumulate loops, best of {REPEATS} runs of {c['seconds']} s, on one core and on all {m['cores']} at once; "
        f"SAR_CNN v2 = {c['sarcnn_macs_per_image'] / 1e9:.3f} GMAC/img; commit {r['commit']}, {r['date']}.",
        "",
        "| peak | GMAC/s one core | GMAC/s all cores |",
        "|---|---:|---:|",
    ]
    for kind, p in r["peaks"].items():
        if p is None:
            lines.append(f"| {kind} | not supported by this CPU | |")
        else:
            lines.append(f"| {kind} | {p['mac_per_s_one_core'] / 1e9:.1f} | {p['mac_per_s_all_cores'] / 1e9:.1f} |")
    lines += ["", "| model precision | ceiling img/s (model only) | measured img/s | of ceiling | "
              "end-to-end ceiling img/s | measured img/s | of ceiling | 17 M on 56 cores at that ceiling (h) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]

    def cell(row, key, fmt):
        return fmt.format(row[key]) if key in row else "–"

    for precision, row in r["ceilings"].items():
        lines.append(" | ".join([
            f"| {precision}", f"{row['model_img_s_ceiling']:.1f}", cell(row, "model_img_s_measured", "{:.1f}"),
            cell(row, "fraction_of_ceiling", "{:.0%}"), cell(row, "e2e_img_s_ceiling", "{:.1f}"),
            cell(row, "e2e_img_s_measured", "{:.1f}"), cell(row, "e2e_fraction_of_ceiling", "{:.0%}"),
            cell(row, "archive_hours_at_ceiling", "{:.2f}")]) + " |")
    if c["decode_ms_per_img_core"] is not None:
        lines += ["", f"End-to-end ceiling: the native decode's measured {c['decode_ms_per_img_core']:.2f} ms/img per core "
                  "plus the model's work at the arithmetic peak, on every core. The paper's L40 pass: "
                  f"{PAPER_L40_ARCHIVE_HOURS} h."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per peak loop (default: %(default)s)")
    p.add_argument("--model-json", type=Path, help="an `iws-engine bench` model-only result to compare against")
    p.add_argument("--decode-json", type=Path, help="a bench.decode_bench result (native per-core decode time)")
    p.add_argument("--e2e-json", type=Path, help="an `iws-engine bench --mode e2e` result to compare against")
    p.add_argument("-o", "--output-dir", type=Path, default=Path("bench/results"))
    a = p.parse_args(argv)
    r = run(a.seconds, a.model_json, a.decode_json, e2e_json=a.e2e_json)
    stem = f"roofline-{slug(r['machine']['cpu'])}-{r['machine']['cores']}c-{r['date']}-{r['commit']}"
    write_result_files(a.output_dir, stem, r, to_markdown(r))
    print(to_markdown(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
