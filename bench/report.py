"""Bench outputs (JSON, Markdown table, PNG plots) and the report page that compares them with the paper.

`write_outputs(result, out_dir)` writes one `iws-engine bench` result as
``bench-<gpu-or-cpu>-<mode>-<date>-<commit>.json`` (pipeline A:
``bench-<gpu-or-cpu>-eva02xgb-<mode>-<date>-<commit>.json``) plus ``.md`` (the table) and
``-throughput.png`` (img/s against batch size, per configuration) and, in e2e mode,
``-stages.png`` (per-stage ms/img). `render_report(results_dir, out_path)` renders the latest
results of a folder per (machine, mode, pipeline) (and any ``cpu-e2e-*.json`` of bench/cpu_e2e.py)
into one Markdown page with the plots, the paper's pipeline B figures next to our SAR_CNN ones, its
pipeline A figures next to our EVA02 + XGBoost ones (when there are any), and the IWS projection of
each pipeline's best.

JSON schema ``iws-engine/bench/1`` (written by iws_engine.bench.runner.run_bench). Statistics
written as ``{mean, std, per_run}`` are over the timed runs (std: sample std, 0 for one run).

- ``schema``: "iws-engine/bench/1".
- ``mode``: "model" (backend.infer on preprocessed inputs in host memory; decode excluded, like
  the paper's 3,396 img/s; for pipeline A EVA02 + softmax only, no XGBoost) or "e2e"
  (Classifier.classify, or EvaXgbClassifier.classify for pipeline A, on PNG bytes in RAM: decode +
  preprocess + inference, XGBoost included).
- ``pipeline``: "SAR_CNN (pipeline B)" or "EVA02-L/14-448 + XGBoost (pipeline A)" (also for the tiny
  test-size EVA02: see ``model.eva_config``).
- ``device``: "<best config> on <machine>", the configuration behind ``throughput_img_s``.
- ``date`` (YYYY-MM-DD), ``timestamp`` (ISO 8601, local time with offset), ``commit`` (short git hash).
- ``throughput_img_s``: the highest mean throughput of any configuration at any batch size, in
  img/s; what ``iws-engine project --from FILE`` reads.
- ``best``: ``{config, batch_size, throughput_img_s}`` of that row.
- ``machine``: ``cpu`` (model name), ``cores`` (usable by this process), ``python``, ``platform``;
  ``gpu`` only when NVML works: ``name``, ``nvml_index``, ``compute_capability`` ("9.0"),
  ``driver``, ``memory_total_mb``, ``power_limit_w`` (each when NVML answers).
- ``libraries``: versions, {name: version} (numpy and what the backends' ``info()`` report).
- ``gpu_telemetry``: ``{available: false, reason}`` without NVML (then no GPU field exists
  anywhere else), else ``{available: true, scope: "GPU board only (NVML)", sample_interval_s,
  idle_seconds, idle_power_w}``; idle power is the median board power sampled before any model loads.
- ``model``: ``pipeline`` ("sarcnn" or "eva02xgb", as --model names it; absent in results written
  before pipeline A could be measured: those are sarcnn), ``id`` (file stem@sha256 prefix; pipeline A
  "<EVA02 id>+xgb:<XGBoost stem>@<sha256 prefix>"), ``name``, ``trained`` (false: random weights;
  the throughput is still valid), ``input_shape`` [C, H, W]; pipeline A also ``eva_config``
  ("large", the paper's EVA02-L/14-448, or "tiny"), ``output_shape`` [1000], ``xgboost`` (the
  model's file name) and ``xgboost_device`` (where XGBoost ran: "cpu" or "cuda[:N]"; null in model
  mode, which does not run it).
- ``protocol``: ``runs``, ``warmup_passes`` (untimed passes over all inputs), ``n_images`` (per
  pass), ``distinct_images`` (synthetic vignettes repeated to n_images), ``batch_sizes``,
  ``format``, ``size`` ("WxH" of the PNGs), ``mean_png_bytes``, ``interleaved`` (true: run k of
  every configuration before run k+1), ``wall_time`` and ``inputs`` (what was timed, in words).
- ``configs``: one per requested configuration, in order: ``label`` ("backend:precision:device"),
  ``backend``, ``precision``, ``device``; ``info`` (backend.info(): versions) and ``load_s``
  (model load seconds, not timed in the runs) when it loaded; ``error`` when it could not run
  (at all, or from the batch size the message names: rows of smaller batch sizes are kept).
- ``baseline``: label of the configuration the ratios refer to (the first one that ran).
- ``rows``: one per configuration x batch size:
  - ``config``, ``backend``, ``precision``, ``device``, ``batch_size``, ``images``, ``runs``;
  - ``wall_s``: {mean, std, per_run} seconds per pass, first batch start to last batch completion;
  - ``throughput_img_s``: {mean, std, per_run}; per_run[k] = images / wall_s.per_run[k];
  - ``speedup_vs_baseline``: {mean, std, per_run} of throughput / baseline throughput, run by run
    at the same batch size (1 for the baseline); null when the baseline has no such row;
  - ``latency_ms``: {mean, p50, p95, batches} over every batch of every timed run (a pass's last
    batch may be smaller). e2e: the time between successive batch completions (pipelined);
  - ``peak_rss_mb``: peak resident memory of the process; ``peak_rss_scope``: "this row's runs"
    (Linux peak mark reset before each run) or "process lifetime" (reset impossible);
  - ``stages`` (e2e only): ``decode_workers`` and, for ``read``, ``decode``, ``preprocess``
    (``clock`` "cpu": CPU seconds summed over the decode threads, overlapping each other and
    inference) and ``inference`` (``clock`` "wall"; pipeline A: EVA02 + softmax + XGBoost) and,
    pipeline A only, ``xgboost`` (``clock`` "wall": time in the XGBoost stage, a part of inference,
    counted from when the features are complete: CUDA synchronised first): ``seconds``
    {mean, std, per_run} per pass and ``ms_per_img`` (mean seconds / images x 1000);
  - ``xgboost_share`` (pipeline A e2e only): {mean, std, per_run} of XGBoost seconds / the pass's wall
    seconds;
  - ``gpu`` (CUDA configurations with NVML only; all GPU board only): ``scope``, ``window_s``
    (mean seconds per measured run: under ~1 s the energy figures are coarse), ``energy_source``
    (NVML's total-energy counter, or power samples on boards without one),
    ``energy_mj_per_img_gross`` {mean, std} and ``energy_mj_per_img_net`` {mean, std} (minus idle
    power x wall time), ``idle_power_w``, ``power_w`` {mean, max, samples} (100 ms samples),
    ``max_temperature_c``, ``throttle_reasons`` (NVML clock-event reason names seen),
    ``throttled`` (a power/thermal slowdown reason was seen), ``nvml_memory_used_peak_mb``
    (device-wide, context included), ``allocator_peak_mb`` (torch.cuda.max_memory_allocated, torch
    configurations only).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from iws_engine.bench.runner import SCHEMA, machine_name

BENCH_GLOB = "bench-*.json"
CPU_E2E_GLOB = "cpu-e2e-*.json"
CPU_E2E_SCHEMA = "iws-engine/bench-cpu-e2e/1"
STAGES = ("read", "decode", "preprocess", "inference")
XGBOOST_STAGE = "xgboost"  # pipeline A's e2e rows: a part of inference

PAPER_DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "iws-gmd-2026" / "data"
PAPER_CITATION = "paper Tables 3–4"
#: Used when the paper's data files are not next to the checkout (Pinelo et al., GMD 2026).
PAPER_PIPELINE_B = {
    "gpu": {"throughput_img_s": 3396.071058744879, "machine": "NVIDIA L40", "energy_mj_per_img_gross": 43.723},
    "cpu": {"throughput_img_s": 15.20708416566176, "machine": "56 Xeon cores"},
}
#: Pipeline A (EVA02-L/14-448 + XGBoost, batch 128, PNG loading included), likewise the fallback for
#: data/pipeline_a_{gpu,cpu}_inference.json and data/pipeline_a_gpu_power.json.
PAPER_PIPELINE_A = {
    "gpu": {"throughput_img_s": 25.64419450832523, "machine": "NVIDIA L40", "batch_size": 128,
            "energy_mj_per_img_gross": 11689.979, "peak_vram_mb": 6422.857421875},
    "cpu": {"throughput_img_s": 0.9222359722129527, "machine": "56 CPU cores", "batch_size": 128},
}
#: Issue #5's goal for pipeline A end to end on one GPU: compiled >= 600 img/s and >= 2.5x eager bf16
#: at the same batch size, in the same run.
PIPELINE_A_GOAL = {"compiled_img_s": 600.0, "vs_eager_bf16": 2.5}
COMPILED_BACKENDS = ("inductor", "tensorrt", "torch-tensorrt")


# ----------------------------------------------------------------------------- names

def slug(text: str, limit: int = 40) -> str:
    """Lower-case alphanumerics joined by single dashes: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    chars = "".join(ch if ch.isalnum() else "-" for ch in text.lower())
    return "-".join(filter(None, chars.split("-")))[:limit].strip("-")


def write_result_files(output_dir: Path, stem: str, record: Mapping[str, Any], markdown: str) -> None:
    """A benchmark's record as `stem`.json and its table as `stem`.md in `output_dir`; the table is printed."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{stem}.json").write_text(json.dumps(record, indent=2) + "\n")
    (output_dir / f"{stem}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {output_dir / stem}.json/.md")


def pipeline_of(result: Mapping[str, Any]) -> str:
    """"sarcnn" or "eva02xgb"; results written before the model record named it are SAR_CNN's."""
    return result.get("model", {}).get("pipeline", "sarcnn")


def _measured_on_gpu(result: Mapping[str, Any]) -> bool:
    return bool(result["machine"].get("gpu")) and any(row["device"].startswith("cuda") for row in result["rows"])


def machine_label(result: Mapping[str, Any]) -> str:
    """The machine a result is named after: its GPU when a CUDA configuration ran, else its CPU."""
    return machine_name(result["machine"], "cuda" if _measured_on_gpu(result) else "cpu")


def machine_slug(result: Mapping[str, Any]) -> str:
    machine = result["machine"]
    if _measured_on_gpu(result):
        return slug(machine["gpu"]["name"])
    return f"{slug(machine['cpu'])}-{machine['cores']}c"


def output_stem(result: Mapping[str, Any]) -> str:
    """``bench-<gpu or cpu>-<mode>-<date>-<commit>``; pipeline A's ``bench-<gpu or cpu>-eva02xgb-<mode>-...``
    (SAR_CNN's names are unchanged, so results from before pipeline A keep theirs)."""
    pipeline = pipeline_of(result)
    tag = "" if pipeline == "sarcnn" else f"-{pipeline}"
    return f"bench-{machine_slug(result)}{tag}-{result['mode']}-{result['date']}-{result['commit']}"


# ----------------------------------------------------------------------------- Markdown

def _mean_std(stat: Mapping[str, float], digits: int = 1) -> str:
    """mean ± std with `digits` decimals, more for small values (EVA02-L on a CPU: 0.17 img/s, not 0.2)."""
    mean = abs(stat["mean"])
    if 0 < mean < 1:
        digits = max(digits, 3)
    elif mean < 10:
        digits = max(digits, 2)
    return f"{stat['mean']:,.{digits}f} ± {stat['std']:,.{digits}f}"


def _rate(value: float) -> str:
    """A throughput with enough decimals to tell small ones apart (0.345, 2.61, 147.9, 3,396.1)."""
    digits = 3 if abs(value) < 1 else 2 if abs(value) < 10 else 1
    return f"{value:,.{digits}f}"


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _share(stat: Mapping[str, float] | None) -> str:
    return "–" if not stat else f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f} %"


def markdown_table(result: Mapping[str, Any]) -> str:
    """One row per configuration x batch size; GPU, stage and XGBoost columns only where measured."""
    rows = result["rows"]
    with_gpu = any("gpu" in row for row in rows)
    with_stages = any("stages" in row for row in rows)
    with_xgboost = any("xgboost_share" in row for row in rows)
    stages = STAGES + ((XGBOOST_STAGE,) if any(XGBOOST_STAGE in row.get("stages", {}) for row in rows) else ())
    header = ["config", "batch", "img/s (mean ± std)", f"× {result['baseline']}",
              "batch ms mean / p50 / p95", "peak RSS MB"]
    if with_stages:
        header += [f"{stage} ms/img" for stage in stages]
    if with_xgboost:
        header += ["XGBoost share of wall"]
    if with_gpu:
        header += ["mJ/img gross (GPU board)", "mJ/img net (GPU board)", "board W mean / max", "max °C",
                   "throttle reasons", "VRAM MB allocator / NVML"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for row in rows:
        latency = row["latency_ms"]
        speedup = row.get("speedup_vs_baseline")
        cells = [row["config"], str(row["batch_size"]), _mean_std(row["throughput_img_s"]),
                 _mean_std(speedup, 2) if speedup else "–",
                 f"{latency['mean']:.2f} / {latency['p50']:.2f} / {latency['p95']:.2f}", f"{row['peak_rss_mb']:,.0f}"]
        if with_stages:
            measured = row.get("stages", {})
            cells += [_fmt(measured[s]["ms_per_img"], 2) if s in measured else "–" for s in stages]
        if with_xgboost:
            cells.append(_share(row.get("xgboost_share")))
        if with_gpu:
            gpu = row.get("gpu", {})
            power = gpu.get("power_w")
            cells += [
                _mean_std(gpu["energy_mj_per_img_gross"], 2) if "energy_mj_per_img_gross" in gpu else "–",
                _mean_std(gpu["energy_mj_per_img_net"], 2) if "energy_mj_per_img_net" in gpu else "–",
                f"{power['mean']:.0f} / {power['max']:.0f}" if power else "–",
                str(gpu.get("max_temperature_c", "–")),
                ", ".join(gpu.get("throttle_reasons", [])) or ("none" if gpu else "–"),
                f"{_fmt(gpu.get('allocator_peak_mb'), 0)} / {_fmt(gpu.get('nvml_memory_used_peak_mb'), 0)}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _describe(result: Mapping[str, Any]) -> str:
    """One paragraph: what was measured, where, how."""
    machine, protocol = result["machine"], result["protocol"]
    gpu = machine.get("gpu")
    where = f"CPU {machine['cpu']} ({machine['cores']} cores)"
    if gpu:
        facts = ", ".join(f"{k.replace('_', ' ')} {gpu[k]}" for k in ("compute_capability", "driver") if k in gpu)
        where += f"; GPU {gpu['name']}" + (f" ({facts})" if facts else "")
    model, pipeline_a = result["model"], pipeline_of(result) == "eva02xgb"
    if result["mode"] == "model":
        mode = ("model only (EVA02 + softmax on preprocessed inputs in RAM; XGBoost not run)" if pipeline_a
                else "model only (preprocessed inputs in RAM)")
    elif pipeline_a:
        mode = (f"end to end (PNG bytes in RAM → decode → preprocess → EVA02 + softmax → XGBoost on "
                f"{model.get('xgboost_device')}; inference includes XGBoost, whose share of the wall time is "
                "its own column)")
    else:
        mode = "end to end (PNG bytes in RAM → decode → preprocess → inference)"
    what = f"{result['pipeline']}, EVA02 config {model.get('eva_config')}: {model['id']}" if pipeline_a else model["id"]
    text = (f"{mode}; {where}. {protocol['n_images']} images per pass ({protocol['distinct_images']} distinct "
            f"synthetic {protocol['format']} {protocol['size']} vignettes), warm-up passes: {protocol['warmup_passes']}, "
            f"timed runs: {protocol['runs']}, interleaved across configurations (mean ± std). Model {what}"
            f"{' (random weights: throughput only)' if not model['trained'] else ''}. "
            f"Commit {result['commit']}, {result['date']}.")
    telemetry = result["gpu_telemetry"]
    if telemetry.get("available"):
        idle = telemetry.get("idle_power_w")
        text += (f" Power and energy are NVML figures, GPU board only (idle {_fmt(idle)} W over "
                 f"{telemetry['idle_seconds']:g} s; energy from the board's counter).")
    else:
        text += f" No GPU telemetry: {telemetry.get('reason')}."
    errors = [c for c in result["configs"] if "error" in c]
    for config in errors:
        text += f"\n\nNot measured: {config['label']}: {config['error']}"
    return text


def _mode_title(result: Mapping[str, Any]) -> str:
    """The mode, prefixed "pipeline A" for EVA02 + XGBoost results (SAR_CNN's titles are unchanged)."""
    return f"pipeline A {result['mode']}" if pipeline_of(result) == "eva02xgb" else result["mode"]


def markdown_page(result: Mapping[str, Any], plots: Mapping[str, str] | None = None, heading: str = "#") -> str:
    """The bench's own Markdown file: description, table, plot links (relative to the page)."""
    title = f"{heading} iws-engine bench, {_mode_title(result)}: {result['device']}"
    parts = [title, "", _describe(result), "", markdown_table(result)]
    for label, link in (plots or {}).items():
        parts += [f"![{label}]({link})", ""]
    return "\n".join(parts).rstrip() + "\n"


# ----------------------------------------------------------------------------- plots

def plot_throughput(result: Mapping[str, Any], path: Path) -> Path:
    """img/s (mean ± std) against batch size (log axis), one line per configuration."""
    from iws_engine.bench.metrics import _new_figure

    figure = _new_figure(7, 4.5)
    axes = figure.add_subplot(1, 1, 1)
    configs = list(dict.fromkeys(row["config"] for row in result["rows"]))
    for config in configs:
        rows = sorted((r for r in result["rows"] if r["config"] == config), key=lambda r: r["batch_size"])
        axes.errorbar([r["batch_size"] for r in rows], [r["throughput_img_s"]["mean"] for r in rows],
                      yerr=[r["throughput_img_s"]["std"] for r in rows], marker="o", capsize=3, label=config)
    batch_sizes = sorted({r["batch_size"] for r in result["rows"]})
    axes.set_xscale("log", base=2)
    axes.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    axes.set_xlabel("batch size")
    axes.set_ylabel(f"images/s (mean ± std, {result['protocol']['runs']} runs)")
    axes.set_title(f"{_mode_title(result)} throughput, {machine_label(result)}", fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


def plot_stages(result: Mapping[str, Any], path: Path) -> Path:
    """Stacked ms/img per stage for each configuration x batch size, with the measured wall ms/img
    (pipeline A: inference split into the network and XGBoost, which is a part of it)."""
    from iws_engine.bench.metrics import _new_figure

    rows = [r for r in result["rows"] if "stages" in r]
    figure = _new_figure(max(6.0, 1.1 * len(rows) + 2), 4.5)
    axes = figure.add_subplot(1, 1, 1)
    positions = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    split = bool(rows) and all(XGBOOST_STAGE in r["stages"] for r in rows)

    def ms(row: Mapping[str, Any], stage: str) -> float:
        value = row["stages"][stage]["ms_per_img"]
        return value - row["stages"][XGBOOST_STAGE]["ms_per_img"] if split and stage == "inference" else value

    for stage in STAGES + ((XGBOOST_STAGE,) if split else ()):
        heights = [ms(r, stage) for r in rows]
        clock = rows[0]["stages"][stage]["clock"] if rows else "cpu"
        name = "inference without XGBoost" if split and stage == "inference" else stage
        clock_text = "CPU, all threads" if clock == "cpu" else "wall"
        axes.bar(positions, heights, bottom=bottom, label=f"{name} ({clock_text})")
        bottom = [b + h for b, h in zip(bottom, heights)]
    axes.plot(positions, [1000.0 / r["throughput_img_s"]["mean"] for r in rows], "k_", markersize=30, mew=2,
              label="end-to-end wall ms/img")
    axes.set_xticks(positions, [f"{r['config']}\nbatch {r['batch_size']}" for r in rows], fontsize=7)
    axes.set_ylabel("ms per image")
    where = machine_label(result)
    if _measured_on_gpu(result):  # decoding still runs on the CPU
        where += f" + {result['machine']['cpu']} ({result['machine']['cores']} cores)"
    axes.set_title(f"{_mode_title(result)} stage breakdown, {where}", fontsize=10)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, format="png")
    return path


# ----------------------------------------------------------------------------- writing

def write_outputs(result: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write JSON, Markdown and plots; returns {"json", "markdown", "throughput_plot"[, "stages_plot"]}.

    A second result with the same stem (same machine, mode, day and commit) gets a numbered suffix
    instead of overwriting the first.
    """
    if result.get("schema") != SCHEMA:
        raise ValueError(f"not an {SCHEMA} result (schema {result.get('schema')!r})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = base = output_stem(result)
    copy = 1
    while (out / f"{stem}.json").exists():
        copy += 1
        stem = f"{base}-{copy}"
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md",
             "throughput_plot": plot_throughput(result, out / f"{stem}-throughput.png")}
    if any("stages" in row for row in result["rows"]):
        paths["stages_plot"] = plot_stages(result, out / f"{stem}-stages.png")
    paths["json"].write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    plots = {name.replace("_", " "): path.name for name, path in paths.items() if name.endswith("plot")}
    paths["markdown"].write_text(markdown_page(result, plots), encoding="utf-8")
    return paths


# ----------------------------------------------------------------------------- the report

def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


Found = tuple[Path, dict[str, Any]]


def _newest(candidates: list[tuple[tuple, tuple, Path, dict[str, Any]]]) -> list[Found]:
    """Per key, the candidate with the highest order; newest first."""
    newest: dict[tuple, tuple[tuple, Path, dict[str, Any]]] = {}
    for key, order, path, data in candidates:
        if key not in newest or order > newest[key][0]:
            newest[key] = (order, path, data)
    return [(path, data) for _order, path, data in sorted(newest.values(), key=lambda v: v[0], reverse=True)]


def latest_results(results_dir: str | Path) -> tuple[list[Found], list[Found]]:
    """The newest bench result per (machine, mode, pipeline), and the newest cpu_e2e result per
    (CPU, backend, format)."""
    folder = Path(results_dir)
    benches, cpu_e2e = [], []
    for path in sorted(folder.glob(BENCH_GLOB)):
        data = _load_json(path)
        if data is not None and data.get("schema") == SCHEMA:
            key = (machine_slug(data), data["mode"], pipeline_of(data))
            benches.append((key, (data.get("timestamp", ""), path.stat().st_mtime), path, data))
    for path in sorted(folder.glob(CPU_E2E_GLOB)):
        data = _load_json(path)
        if data is not None and data.get("schema") == CPU_E2E_SCHEMA:
            config = data.get("config", {})
            key = (data["machine"]["cpu"], data["machine"]["cores"], config.get("backend"), config.get("format"))
            cpu_e2e.append((key, (data.get("date", ""), path.stat().st_mtime), path, data))
    return _newest(benches), _newest(cpu_e2e)


def paper_pipeline_b(data_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The paper's pipeline B figures: from its data files when present, else the published constants."""
    folder = Path(data_dir) if data_dir is not None else PAPER_DATA_DIR
    figures = {kind: {**values, "source": PAPER_CITATION} for kind, values in PAPER_PIPELINE_B.items()}
    gpu = _load_json(folder / "pipeline_b_gpu_inference.json")
    if gpu is not None:
        timing, system = gpu.get("timing_metrics", {}), gpu.get("system", {})
        figures["gpu"].update(source=f"{PAPER_CITATION}; data/pipeline_b_gpu_inference.json")
        if "images_per_second" in timing:
            figures["gpu"]["throughput_img_s"] = float(timing["images_per_second"])
        if system.get("gpu", {}).get("gpu_name"):
            figures["gpu"]["machine"] = system["gpu"]["gpu_name"]
        energy = gpu.get("publishable_summary", {}).get("energy_per_image_mj_gross")
        if energy is not None:
            figures["gpu"]["energy_mj_per_img_gross"] = float(energy)
        if system.get("batch_size"):
            figures["gpu"]["batch_size"] = system["batch_size"]
    cpu = _load_json(folder / "pipeline_b_cpu_inference.json")
    if cpu is not None:
        figures["cpu"].update(source=f"{PAPER_CITATION}; data/pipeline_b_cpu_inference.json")
        throughput = cpu.get("performance", {}).get("throughput", {}).get("img_per_s")
        if throughput is not None:
            figures["cpu"]["throughput_img_s"] = float(throughput)
        threads = cpu.get("metadata", {}).get("blas_threads")
        if threads:
            figures["cpu"]["machine"] = f"{threads} Xeon cores"
    return figures


def paper_pipeline_a(data_dir: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The paper's pipeline A figures: from its data files when present, else the published constants."""
    folder = Path(data_dir) if data_dir is not None else PAPER_DATA_DIR
    figures = {kind: {**values, "source": PAPER_CITATION} for kind, values in PAPER_PIPELINE_A.items()}
    for kind in ("gpu", "cpu"):
        data = _load_json(folder / f"pipeline_a_{kind}_inference.json")
        if data is None:
            continue
        figure = figures[kind]
        figure["source"] = f"{PAPER_CITATION}; data/pipeline_a_{kind}_inference.json"
        if data.get("throughput_images_per_sec") is not None:
            figure["throughput_img_s"] = float(data["throughput_images_per_sec"])
        if data.get("batch_size"):
            figure["batch_size"] = data["batch_size"]
        if kind == "gpu" and data.get("peak_gpu_vram_mb"):
            figure["peak_vram_mb"] = float(data["peak_gpu_vram_mb"])
    power = _load_json(folder / "pipeline_a_gpu_power.json")
    if power is not None:
        run = next((v for k, v in power.items() if k.startswith("pipeline_") and isinstance(v, dict)), {})
        gpu_name = run.get("system", {}).get("gpu", {}).get("gpu_name")
        energy = run.get("publishable_summary", {}).get("energy_per_image_mj_gross")
        if gpu_name or energy is not None:
            figures["gpu"]["source"] += "; data/pipeline_a_gpu_power.json"
        if gpu_name:
            figures["gpu"]["machine"] = gpu_name
        if energy is not None:
            figures["gpu"]["energy_mj_per_img_gross"] = float(energy)
    return figures


def pipeline_a_goal(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """Issue #5's check on one pipeline A result: its fastest compiled row against eager bf16 (torch) at
    the same batch size, run by run; None when it has no compiled row."""
    rows = result["rows"]
    compiled = [r for r in rows if r["backend"] in COMPILED_BACKENDS]
    if not compiled:
        return None
    best = max(compiled, key=lambda r: r["throughput_img_s"]["mean"])
    goal: dict[str, Any] = {"config": best["config"], "batch_size": best["batch_size"],
                            "throughput_img_s": best["throughput_img_s"]["mean"],
                            "meets_throughput": best["throughput_img_s"]["mean"] >= PIPELINE_A_GOAL["compiled_img_s"],
                            "eager_bf16": None, "vs_eager_bf16": None, "meets_ratio": None}
    eager = next((r for r in rows if r["backend"] == "torch" and r["precision"] == "bf16"
                  and r["device"] == best["device"] and r["batch_size"] == best["batch_size"]), None)
    if eager is not None:
        ratios = [c / e for c, e in zip(best["throughput_img_s"]["per_run"], eager["throughput_img_s"]["per_run"])]
        ratio = sum(ratios) / len(ratios)
        goal.update(eager_bf16=eager["config"], eager_bf16_img_s=eager["throughput_img_s"]["mean"], vs_eager_bf16=ratio,
                    meets_ratio=ratio >= PIPELINE_A_GOAL["vs_eager_bf16"])
    return goal


def _relative(target: Path, page: Path) -> str:
    return Path(os.path.relpath(target.resolve(), page.resolve().parent)).as_posix()


def _measured_figures(benches: Sequence[Found], cpu_e2e: Sequence[Found]) -> list[dict[str, Any]]:
    """Our best figure per result: which pipeline, what, where, how fast."""
    figures = []
    for _path, result in benches:
        best_row = next(r for r in result["rows"] if r["config"] == result["best"]["config"]
                        and r["batch_size"] == result["best"]["batch_size"])
        gpu = best_row.get("gpu", {})
        pipeline = pipeline_of(result)
        what = f"iws-engine bench {result['mode']}, {best_row['config']}, batch {best_row['batch_size']}"
        if pipeline == "eva02xgb" and result["model"].get("eva_config", "large") != "large":
            what += f" (EVA02 {result['model']['eva_config']}, not the paper's model)"
        figures.append({"pipeline": pipeline, "mode": result["mode"], "what": what,
                        "machine": machine_name(result["machine"], best_row["device"]),
                        "throughput_img_s": result["throughput_img_s"],
                        "energy_mj_per_img_gross": gpu.get("energy_mj_per_img_gross", {}).get("mean"),
                        "allocator_peak_mb": gpu.get("allocator_peak_mb"),
                        "xgboost_share": best_row.get("xgboost_share", {}).get("mean"),
                        "date": result["date"], "commit": result["commit"]})
    for _path, result in cpu_e2e:
        config = result["config"]
        figures.append({"pipeline": "sarcnn", "mode": "e2e",
                        "what": f"cpu_e2e end to end, {config['backend']}, batch {config['batch_size']}",
                        "machine": f"{result['machine']['cpu']} ({result['machine']['cores']} cores)",
                        "throughput_img_s": result["throughput_img_s"], "energy_mj_per_img_gross": None,
                        "date": result["date"], "commit": result["commit"]})
    return figures


def _paper_section(figures: Sequence[Mapping[str, Any]], paper: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Our best figures next to the paper's pipeline B, each with the machine it was measured on."""
    gpu, cpu = paper["gpu"], paper["cpu"]
    gpu_energy = gpu.get("energy_mj_per_img_gross")
    sources = "; ".join(dict.fromkeys(part for figure in (gpu, cpu) for part in figure["source"].split("; ")))
    lines = [
        "## Against the paper (pipeline B, SAR_CNN)", "",
        f"Paper: pipeline B GPU **{gpu['throughput_img_s']:,.0f} img/s on {gpu['machine']}**"
        + (f" ({gpu_energy:.1f} mJ/img gross, GPU board only)" if gpu_energy is not None else "")
        + f"; pipeline B CPU **{cpu['throughput_img_s']:.1f} img/s on {cpu['machine']}** (sources: {sources}).",
        "The paper's figures exclude PNG loading (images preloaded): compare them with model-only results; "
        "end-to-end results also decode every PNG.", "",
        f"| measurement | machine | img/s | × paper GPU ({gpu['machine']}) | × paper CPU ({cpu['machine']}) "
        "| mJ/img gross (GPU board) |",
        "|---|---|---:|---:|---:|---:|",
        f"| paper, pipeline B GPU | {gpu['machine']} | {gpu['throughput_img_s']:,.1f} | 1.00 | "
        f"{gpu['throughput_img_s'] / cpu['throughput_img_s']:,.1f} | {_fmt(gpu_energy, 1)} |",
        f"| paper, pipeline B CPU | {cpu['machine']} | {cpu['throughput_img_s']:,.1f} | "
        f"{cpu['throughput_img_s'] / gpu['throughput_img_s']:.4f} | 1.00 | – |",
    ]
    for f in figures:
        t = f["throughput_img_s"]
        lines.append(f"| {f['what']} ({f['date']}, {f['commit']}) | {f['machine']} | {_rate(t)} | "
                     f"{t / gpu['throughput_img_s']:.3g} | {t / cpu['throughput_img_s']:.3g} | "
                     f"{_fmt(f['energy_mj_per_img_gross'], 1)} |")
    return lines + [""]


def _paper_section_a(figures: Sequence[Mapping[str, Any]], paper: Mapping[str, Mapping[str, Any]],
                     benches: Sequence[Found]) -> list[str]:
    """Our pipeline A figures next to the paper's, each with its machine, then issue #5's goal per GPU result."""
    gpu, cpu = paper["gpu"], paper["cpu"]
    gpu_energy, vram = gpu.get("energy_mj_per_img_gross"), gpu.get("peak_vram_mb")
    sources = "; ".join(dict.fromkeys(part for figure in (gpu, cpu) for part in figure["source"].split("; ")))
    facts = ", ".join(filter(None, [
        f"batch {gpu['batch_size']}" if gpu.get("batch_size") else None,
        f"{gpu_energy:,.0f} mJ/img gross, GPU board only" if gpu_energy is not None else None,
        f"peak VRAM {vram:,.0f} MB" if vram is not None else None]))
    lines = [
        "## Against the paper (pipeline A, EVA02-L/14-448 + XGBoost)", "",
        f"Paper: pipeline A GPU **{gpu['throughput_img_s']:,.1f} img/s on {gpu['machine']}**"
        + (f" ({facts})" if facts else "")
        + f"; pipeline A CPU **{cpu['throughput_img_s']:.2f} img/s on {cpu['machine']}** (sources: {sources}).",
        "The paper's pipeline A figures include PNG loading (load PNG → resize to 448 → EVA02 → XGBoost): "
        "compare them with end-to-end results; model-only results run EVA02 + softmax alone, on preprocessed "
        "inputs. Our VRAM figure is torch's allocator peak for the whole process: it includes the weights of "
        "every configuration loaded side by side in that run.", "",
        f"| measurement | machine | img/s | × paper GPU ({gpu['machine']}) | × paper CPU ({cpu['machine']}) "
        "| XGBoost share of wall | mJ/img gross (GPU board) | VRAM MB (allocator peak) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        f"| paper, pipeline A GPU | {gpu['machine']} | {gpu['throughput_img_s']:,.2f} | 1.00 | "
        f"{gpu['throughput_img_s'] / cpu['throughput_img_s']:,.1f} | – | {_fmt(gpu_energy, 0)} | {_fmt(vram, 0)} |",
        f"| paper, pipeline A CPU | {cpu['machine']} | {cpu['throughput_img_s']:,.2f} | "
        f"{cpu['throughput_img_s'] / gpu['throughput_img_s']:.4f} | 1.00 | – | – | – |",
    ]
    for f in figures:
        t, share = f["throughput_img_s"], f.get("xgboost_share")
        lines.append(f"| {f['what']} ({f['date']}, {f['commit']}) | {f['machine']} | {_rate(t)} | "
                     f"{t / gpu['throughput_img_s']:.3g} | {t / cpu['throughput_img_s']:.3g} | "
                     f"{'–' if share is None else f'{100 * share:.1f} %'} | "
                     f"{_fmt(f['energy_mj_per_img_gross'], 1)} | {_fmt(f.get('allocator_peak_mb'), 0)} |")
    goals = [(result, pipeline_a_goal(result)) for _path, result in benches
             if pipeline_of(result) == "eva02xgb" and result["mode"] == "e2e" and _measured_on_gpu(result)]
    if goals:
        lines += ["", f"Goal (issue #5), end to end on one GPU: compiled ≥ {PIPELINE_A_GOAL['compiled_img_s']:,.0f} "
                      f"img/s and ≥ {PIPELINE_A_GOAL['vs_eager_bf16']:g}× eager bf16 at the same batch size, "
                      "in the same run.", ""]
    for result, goal in goals:
        where = f"{result['mode']}, {machine_label(result)} ({result['date']}, {result['commit']})"
        if goal is None:
            lines.append(f"- {where}: no compiled configuration measured.")
            continue
        text = (f"- {where}: {goal['config']} at batch {goal['batch_size']}: {goal['throughput_img_s']:,.1f} img/s "
                f"({'met' if goal['meets_throughput'] else 'not met'})")
        if goal["vs_eager_bf16"] is None:
            text += "; no eager bf16 row at that batch size to compare with."
        else:
            text += (f"; {goal['vs_eager_bf16']:.2f}× {goal['eager_bf16']} ({goal['eager_bf16_img_s']:,.1f} img/s) "
                     f"({'met' if goal['meets_ratio'] else 'not met'}).")
        lines.append(text)
    return lines + [""]


def render_report(results_dir: str | Path, out_path: str | Path, *, paper_data_dir: str | Path | None = None) -> Path:
    """One Markdown page from the latest results in `results_dir`; raises FileNotFoundError if there are none."""
    from iws_engine.bench.cpu_e2e import to_markdown as cpu_e2e_markdown
    from iws_engine.bench.projection import format_projection_markdown, project

    page = Path(out_path)
    benches, cpu_e2e = latest_results(results_dir)
    if not benches and not cpu_e2e:
        raise FileNotFoundError(f"no bench results ({BENCH_GLOB} or {CPU_E2E_GLOB}) in {results_dir}")
    figures = _measured_figures(benches, cpu_e2e)
    figures_b = [f for f in figures if f["pipeline"] == "sarcnn"]
    figures_a = [f for f in figures if f["pipeline"] == "eva02xgb"]
    paper_b = paper_pipeline_b(paper_data_dir)
    paper_a = paper_pipeline_a(paper_data_dir) if figures_a else None

    def fastest(candidates: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
        return max(candidates, key=lambda f: f["throughput_img_s"])

    # Pipeline A's paper figure includes PNG loading: its projection uses our best end-to-end figure if any.
    bests = []
    if figures_b:
        bests.append(("pipeline B", fastest(figures_b)))
    if figures_a:
        bests.append(("pipeline A", fastest([f for f in figures_a if f["mode"] == "e2e"] or figures_a)))
    summary = "; ".join(f"{name}: **{_rate(f['throughput_img_s'])} img/s**, {f['what']} on {f['machine']}"
                        for name, f in bests)
    lines = ["# iws-engine benchmark report", "", f"Latest results from `{results_dir}`; best measured, {summary}.", ""]
    if figures_b:
        lines += _paper_section(figures_b, paper_b)
    if paper_a is not None:
        lines += _paper_section_a(figures_a, paper_a, benches)
    lines += ["## IWS projection of the best measured throughput", ""]
    for name, best in bests:
        lines.append(format_projection_markdown(project(best["throughput_img_s"],
                                                        source=f"{name}, {best['what']} on {best['machine']}")))
    if figures_b:
        lines.append(format_projection_markdown(project(paper_b["gpu"]["throughput_img_s"],
                                                        source=f"paper pipeline B GPU on {paper_b['gpu']['machine']}")))
    if paper_a is not None:
        lines.append(format_projection_markdown(project(paper_a["gpu"]["throughput_img_s"],
                                                        source=f"paper pipeline A GPU on {paper_a['gpu']['machine']}")))
    lines += ["## Results", ""]
    for path, result in benches:
        plots = {}
        for suffix, label in (("throughput", "throughput vs batch size"), ("stages", "per-stage breakdown")):
            plot = path.with_name(f"{path.stem}-{suffix}.png")
            if plot.exists():
                plots[label] = _relative(plot, page)
        lines += [markdown_page(result, plots, heading="###"), f"Data: [{path.name}]({_relative(path, page)})", ""]
    for path, result in cpu_e2e:
        body = cpu_e2e_markdown(result).replace("# ", "### ", 1)
        lines += [body, f"Data: [{path.name}]({_relative(path, page)})", ""]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines).rstrip() + "\n", encoding="utf-8")
    return page
