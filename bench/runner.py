"""`iws-engine bench`, the library: the paper's measurement protocol, automated, for either pipeline.

    from iws_engine.bench.runner import BenchConfig, run_bench
    result = run_bench([BenchConfig("torch"), BenchConfig("onnxruntime")], mode="model")
    result = run_bench([BenchConfig("torch", "bf16", "cuda"), BenchConfig("inductor", "bf16", "cuda")],
                       mode="e2e", pipeline="eva02xgb", xgboost="pipeline_a_xgboost.json")

Protocol, per batch size:
- every configuration is loaded once; model load and input preparation are not timed;
- `warmup` untimed passes over the whole input set (every batch shape the timed runs will see);
- `runs` timed passes, interleaved across configurations (run 1 of each, then run 2 ...), so a
  machine that slows down for a while slows every configuration alike and the ratios to the
  baseline (the first configuration that runs) hold on noisy machines;
- a pass's wall time runs from the first batch's start to the last batch's completion
  (CUDA synchronised); throughput = images / wall time, reported as mean ± std over the runs.

Pipelines: "sarcnn" (pipeline B, SAR_CNN) and "eva02xgb" (pipeline A: EVA02 → 1,000 softmax features →
XGBoost), each as its build target (iws_engine.export.targets), built once and shared by every configuration.

Modes:
- "model": `backend.infer` over n preprocessed inputs already in host memory (host-to-device copies
  included, as a worker would see them); decode and preprocessing are excluded, as in the paper's
  3,396 img/s. For eva02xgb the network only: EVA02 + softmax, no XGBoost. SAR_CNN's fast CPU
  precisions (onnxruntime:int8, inductor:bf16 on the CPU) run the parity-gated artefact classify
  would run (export/artifact_cache.py: built on first use, its build time is not timed);
- "e2e": `Classifier.classify` (eva02xgb: `EvaXgbClassifier.classify`) over PNG bytes in RAM (no disk):
  decode + preprocess + inference, with per-stage seconds from `last_stats`; for eva02xgb also the
  XGBoost stage's wall seconds and its share of each pass (the paper's protocol asks for it).
Inputs are a pool of at most 64 distinct synthetic vignettes, repeated to n (rendering thousands
would dominate the run). The JSON layout is documented in iws_engine.bench.report.
"""

from __future__ import annotations

import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iws_engine.bench.gpu_telemetry import (
    DEFAULT_IDLE_SECONDS,
    GpuMonitor,
    GpuWindow,
    allocator_peak_bytes,
    reset_allocator_peak,
    summarise_windows,
)

SCHEMA = "iws-engine/bench/1"
MODES = ("model", "e2e")
MAX_DISTINCT_IMAGES = 64
DEFAULT_BATCH_SIZES = (1, 16, 64)
#: pipeline name (as --model spells it) → how results describe it
PIPELINES = {"sarcnn": "SAR_CNN (pipeline B)", "eva02xgb": "EVA02-L/14-448 + XGBoost (pipeline A)"}
_MB = 1024 * 1024


# ----------------------------------------------------------------------------- machine facts

def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (platform.processor() elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def machine_record(cores: int) -> dict:
    """The machine a result was measured on, as every benchmark's JSON records it."""
    return {"cpu": cpu_name(), "cores": cores, "python": platform.python_version(), "platform": platform.platform()}


def git_commit() -> str:
    """Short hash of the checkout's HEAD, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parents[1], timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ----------------------------------------------------------------------------- configurations

@dataclass(frozen=True)
class BenchConfig:
    """One configuration to measure: a backend name, a precision, a device and (e2e) a PNG loader."""

    backend: str = "torch"
    precision: str = "fp32"
    device: str = "cpu"
    loader: str | None = None  # e2e only: "cpu", "gpu" or "dali"; None = the Classifier's default

    @property
    def label(self) -> str:
        base = f"{self.backend}:{self.precision}:{self.device}"
        return f"{base}@{self.loader}" if self.loader else base

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def cuda_index(self) -> int:
        _, _, index = self.device.partition(":")
        return int(index) if index.isdigit() else 0

    @classmethod
    def parse(cls, text: str) -> "BenchConfig":
        """``backend:precision[:device][@loader]``, e.g. ``torch:fp16:cuda@gpu`` or ``onnxruntime:fp32`` (device cpu)."""
        text, _, loader = text.strip().partition("@")
        backend, _, rest = text.partition(":")
        precision, _, device = rest.partition(":")  # the device may itself hold a colon: cuda:1
        if not backend or not precision:
            raise ValueError(f"configuration must look like backend:precision[:device][@loader], got {text!r}")
        if loader and loader not in ("cpu", "gpu", "dali"):
            raise ValueError(f"loader must be cpu, gpu or dali, got {loader!r}")
        return cls(backend, precision, device or "cpu", loader or None)


def default_configs(cuda_available: bool, pipeline: str = "sarcnn") -> list[BenchConfig]:
    """Eager torch fp32 first (the baseline), then the others; on a CUDA machine the GPU ones first.

    eva02xgb on a CUDA machine: eager fp32 and bf16, compiled bf16 and fp16 (inductor) and TensorRT
    fp16, the comparison issue #5 asks for (EVA02-L on the host's CPU would take the run's time for
    nothing); without CUDA: eager torch and ONNX Runtime fp32 on the CPU, as for SAR_CNN.
    """
    cpu = [BenchConfig("torch", "fp32", "cpu"), BenchConfig("onnxruntime", "fp32", "cpu")]
    if not cuda_available:
        return cpu
    if pipeline == "eva02xgb":
        return [BenchConfig("torch", "fp32", "cuda"), BenchConfig("torch", "bf16", "cuda"),
                BenchConfig("inductor", "bf16", "cuda"), BenchConfig("inductor", "fp16", "cuda"),
                BenchConfig("tensorrt", "fp16", "cuda")]
    return [BenchConfig("torch", "fp32", "cuda"), BenchConfig("torch", "fp16", "cuda"), *cpu]


def load_target(pipeline: str = "sarcnn", weights: str | Path | None = None, xgboost: str | Path | None = None,
                eva_config: str = "large", xgboost_device: str = "cpu"):
    """The pipeline's build target: `SarcnnTarget(weights)` or `Eva02XgbTarget(weights, xgboost, ...)`."""
    from iws_engine.export.targets import Eva02XgbTarget, SarcnnTarget

    if pipeline == "sarcnn":
        if xgboost is not None:
            raise ValueError("--xgboost is only used with --model eva02xgb")
        return SarcnnTarget(weights)
    if pipeline == "eva02xgb":
        return Eva02XgbTarget(weights, xgboost, eva_config=eva_config, xgboost_device=xgboost_device)
    raise ValueError(f"pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")


# ----------------------------------------------------------------------------- inputs

def synthetic_pngs(n_images: int, fmt: str, size: tuple[int, int]) -> list[bytes]:
    """n PNG vignettes in RAM: at most 64 distinct ones (half with internal waves), repeated."""
    from iws_engine.backends.base import cpu_cores
    from iws_engine.export.synth import encode_png, render_vignette

    width, height = size
    distinct = min(n_images, MAX_DISTINCT_IMAGES)

    def render(i: int) -> bytes:
        return encode_png(render_vignette(np.random.default_rng([7, i]), i % 2 == 0, height, width), fmt)

    with ThreadPoolExecutor(cpu_cores()) as pool:
        unique = list(pool.map(render, range(distinct)))
    return [unique[i % distinct] for i in range(n_images)]


def preprocessed_inputs(blobs: Sequence[bytes], target, n_images: int) -> np.ndarray:
    """(n, *target.input_shape) float32 model inputs from the distinct PNGs, each preprocessed once
    by the target's own preprocessing (`target.preprocess_png`)."""
    distinct = min(n_images, MAX_DISTINCT_IMAGES)
    unique = np.empty((distinct, *target.input_shape), np.float32)
    for i, blob in enumerate(blobs[:distinct]):
        target.preprocess_png(blob, unique[i])
    return np.ascontiguousarray(unique[np.arange(n_images) % distinct])


# ----------------------------------------------------------------------------- memory

def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so the next reading is this span's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ----------------------------------------------------------------------------- what is timed

@dataclass
class PassTiming:
    """One timed pass over all the inputs."""

    wall_s: float
    batch_s: list[float]
    stages: Any = None  # RunStats of an e2e pass
    xgboost_s: float | None = None  # wall seconds in Pipeline A's XGBoost stage (e2e eva02xgb passes)


def _synchroniser(config: BenchConfig) -> Callable[[], None]:
    """A call that waits for the config's device to finish queued work (nothing to wait for on CPU)."""
    if not config.is_cuda:
        return lambda: None
    try:
        import torch  # only CUDA configurations need it
    except ImportError:  # a CUDA backend without torch returns host arrays: already synchronised
        return lambda: None
    return lambda: torch.cuda.synchronize(config.device)


class _ModelSubject:
    """Model-only: backend.infer over preprocessed inputs in host memory (the target's network only)."""

    def __init__(self, config: BenchConfig, target, inputs: np.ndarray):
        from iws_engine import backends
        from iws_engine.export.artifact_cache import needs_artefact

        self.config = config
        self.inputs = inputs
        self.sync = _synchroniser(config)
        start = time.perf_counter()
        # what classify runs: SAR_CNN's fast CPU precisions only once gated (Pipeline A's classifier does not gate)
        if target.model == "sarcnn" and needs_artefact(config.backend, config.precision, config.device):
            from iws_engine.export.artifact_cache import cached_artifacts
            from iws_engine.export.build import load_artifacts

            folder = cached_artifacts(target, config.backend, config.precision, config.device)
            self.backend = load_artifacts(folder, config.device)[0]
        else:
            self.backend = backends.create(config.backend, precision=config.precision, device=config.device)
            self.backend.load(target.source, target.input_shape, target.output_shape)
        self.load_s = time.perf_counter() - start
        self.info = self.backend.info()
        self.out = np.empty((len(inputs), *target.output_shape), np.float32)
        self.batch_size = 0

    decode_workers = None  # no decoding in model-only mode

    def prepare(self, batch_size: int) -> None:
        self.batch_size = batch_size

    def finish_batch_size(self) -> None:
        pass  # the loaded backend serves every batch size

    def run_pass(self) -> PassTiming:
        n, bs, infer, sync = len(self.inputs), self.batch_size, self.backend.infer, self.sync
        batch_s = []
        start = previous = time.perf_counter()
        for i in range(0, n, bs):
            infer(self.inputs[i:i + bs], self.out[i:i + bs])
            sync()
            now = time.perf_counter()
            batch_s.append(now - previous)
            previous = now
        return PassTiming(previous - start, batch_s)

    def close(self) -> None:
        self.backend.close()


class _EndToEndSubject:
    """End to end: the pipeline's classifier over PNG bytes in RAM (one classifier per batch size):
    `Classifier` for sarcnn, `EvaXgbClassifier` for eva02xgb."""

    def __init__(self, config: BenchConfig, target, blobs: list[bytes]):
        self.config = config
        self.target = target
        self.blobs = blobs
        self.sync = _synchroniser(config)
        self.classifier = None
        self.load_s: float | None = None
        self.info: dict[str, Any] = {}
        self.batch_size = 0

    def prepare(self, batch_size: int) -> None:
        self.close()
        start = time.perf_counter()
        self.classifier = self._classifier(batch_size)
        if self.load_s is None:
            self.load_s = time.perf_counter() - start
            self.info = self.classifier.backend.info()
        self.batch_size = batch_size

    def _classifier(self, batch_size: int):
        config = self.config
        if self.target.model == "sarcnn":
            from iws_engine.api import Classifier

            return Classifier(self.target.weights_path, backend=config.backend, device=config.device,
                              precision=config.precision, batch_size=batch_size, loader=config.loader)
        from iws_engine.pipeline_a import EvaXgbClassifier

        return EvaXgbClassifier(target=self.target, backend=config.backend, device=config.device,
                                precision=config.precision, batch_size=batch_size, loader=config.loader or "cpu")

    @property
    def decode_workers(self) -> int | None:
        return getattr(self.classifier.loader, "workers", None) if self.classifier is not None else None

    def finish_batch_size(self) -> None:
        self.close()  # one Classifier per batch size: free it before the next one is built

    def run_pass(self) -> PassTiming:
        from iws_engine.pipeline import RunStats

        stats = RunStats()
        batch_s = []
        xgboost_before = getattr(self.classifier, "xgboost_seconds", None)
        start = previous = time.perf_counter()
        for index, _row in enumerate(self.classifier.classify(self.blobs, stats)):
            if index % self.batch_size == 0:  # a batch's first row appears once that batch is inferred
                now = time.perf_counter()
                batch_s.append(now - previous)
                previous = now
        self.sync()
        wall = time.perf_counter() - start
        if stats.failed:
            raise RuntimeError(f"{self.config.label}: {stats.failed} synthetic images failed to classify")
        xgboost_s = None if xgboost_before is None else self.classifier.xgboost_seconds - xgboost_before
        return PassTiming(wall, batch_s, stats, xgboost_s)

    def close(self) -> None:
        if self.classifier is not None:
            self.classifier.close()
            self.classifier = None


# ----------------------------------------------------------------------------- summaries

def _summary(values: Sequence[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_run": list(values)}


def _latency_ms(passes: Sequence[PassTiming]) -> dict[str, Any]:
    ms = np.array([s for p in passes for s in p.batch_s]) * 1000.0
    return {"mean": float(ms.mean()), "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)),
            "batches": int(ms.size)}


def _stage_summary(passes: Sequence[PassTiming], images: int, workers: int | None) -> dict[str, Any]:
    """Per-stage seconds of e2e passes: loader stages are CPU seconds summed over the decode
    threads (they overlap each other and inference), inference is wall seconds; Pipeline A's
    xgboost stage is wall seconds too, a part of inference."""
    per_stage = {
        "read": ("cpu", [p.stages.stages.read for p in passes]),
        "decode": ("cpu", [p.stages.stages.decode for p in passes]),
        "preprocess": ("cpu", [p.stages.stages.preprocess for p in passes]),
        "inference": ("wall", [p.stages.infer for p in passes]),
    }
    if all(p.xgboost_s is not None for p in passes):
        per_stage["xgboost"] = ("wall", [p.xgboost_s for p in passes])
    stages: dict[str, Any] = {"decode_workers": workers}
    for name, (clock, seconds) in per_stage.items():
        summary = _summary(seconds)
        stages[name] = {"clock": clock, "seconds": summary, "ms_per_img": 1000.0 * summary["mean"] / images}
    return stages


# ----------------------------------------------------------------------------- the bench

def run_bench(configs: Iterable[BenchConfig], *, mode: str = "model",
              batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES, runs: int = 5, warmup: int = 2,
              n_images: int = 256, fmt: str = "rgba16", size: tuple[int, int] = (539, 528),
              weights: str | Path | None = None, idle_seconds: float = DEFAULT_IDLE_SECONDS,
              pipeline: str = "sarcnn", xgboost: str | Path | None = None,
              eva_config: str = "large") -> dict[str, Any]:
    """Measure `configs` side by side; returns the result document (see bench/report.py for its schema).

    `pipeline`: "sarcnn" (`weights`: SAR_CNN weights, default the embedded model) or "eva02xgb"
    (`weights`: EVA02 weights, default a random network; `xgboost`: Pipeline A's XGBoost model,
    required; `eva_config`: "large", the paper's, or "tiny" for tests). In e2e mode XGBoost runs
    on the first CUDA configuration's device when there is one, else on the CPU.

    A configuration that cannot run here (BackendError: missing library, no GPU, unsupported
    precision) is recorded with its error and skipped; the baseline is the first one that runs.
    """
    from iws_engine.backends.base import BackendError, cpu_cores
    from iws_engine.export.build import BuildError

    configs = list(configs)
    batch_sizes = [int(b) for b in batch_sizes]
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not configs:
        raise ValueError("no configuration to measure")
    if len({c.label for c in configs}) != len(configs):
        raise ValueError("a configuration is listed twice")
    if not batch_sizes or min(batch_sizes) < 1:
        raise ValueError(f"batch sizes must be >= 1, got {batch_sizes}")
    if runs < 1 or warmup < 0 or n_images < 1:
        raise ValueError("need runs >= 1, warmup >= 0 and n_images >= 1")
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline must be one of {', '.join(PIPELINES)}, got {pipeline!r}")

    cuda_configs = [c for c in configs if c.is_cuda]
    # XGBoost only runs end to end; there it runs beside the network, on the first CUDA device
    xgboost_device = cuda_configs[0].device if mode == "e2e" and cuda_configs else "cpu"
    monitor_index = cuda_configs[0].cuda_index if cuda_configs else 0
    # Idle power is sampled on entry, before any model is loaded or input rendered.
    with GpuMonitor(monitor_index, idle_seconds=idle_seconds if cuda_configs else 0.0) as gpu:
        target = load_target(pipeline, weights, xgboost, eva_config, xgboost_device)
        blobs = synthetic_pngs(n_images, fmt, size)
        inputs = preprocessed_inputs(blobs, target, n_images) if mode == "model" else None
        config_records: list[dict[str, Any]] = []
        subjects = []
        for config in configs:
            record: dict[str, Any] = {"label": config.label, "backend": config.backend,
                                      "precision": config.precision, "device": config.device, "loader": config.loader}
            config_records.append(record)
            try:
                if mode == "model":
                    subjects.append((_ModelSubject(config, target, inputs), record))
                else:
                    subjects.append((_EndToEndSubject(config, target, blobs), record))
            except (BackendError, BuildError) as e:  # cannot run here, or its parity gate refused it
                record["error"] = str(e)

        rows: list[dict[str, Any]] = []
        try:
            for batch_size in batch_sizes:
                rows.extend(_measure_batch_size(subjects, batch_size, runs, warmup, n_images, gpu))
        finally:
            for subject, record in subjects:
                subject.close()
                if subject.load_s is not None:
                    record.update(info=subject.info, load_s=subject.load_s)
        gpu_status = gpu.status()
        gpu_device = dict(gpu.device) if gpu.available else None

    if not rows:
        raise BackendError("no configuration could run here: "
                           + "; ".join(f"{r['label']}: {r.get('error')}" for r in config_records))
    measured = {row["config"] for row in rows}
    baseline = next(r["label"] for r in config_records if r["label"] in measured)
    _add_speedups(rows, baseline)
    best = max(rows, key=lambda r: r["throughput_img_s"]["mean"])
    machine: dict[str, Any] = {"cpu": cpu_name(), "cores": cpu_cores(), "python": platform.python_version(),
                               "platform": platform.platform()}
    if gpu_device is not None:
        machine["gpu"] = gpu_device
    libraries = {"numpy": np.__version__}
    if pipeline == "eva02xgb":
        import xgboost as xgboost_lib  # loaded already, by the target's XGBoost stage

        libraries["xgboost"] = xgboost_lib.__version__
    for record in config_records:
        libraries.update({k: v for k, v in record.get("info", {}).items()
                          if k not in ("backend", "precision", "device")})
    now = time.localtime()
    return {
        "schema": SCHEMA,
        "mode": mode,
        "pipeline": PIPELINES[pipeline],
        "device": f"{best['config']} on {machine_name(machine, best['device'])}",
        "date": time.strftime("%Y-%m-%d", now),
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z", now),
        "commit": git_commit(),
        "machine": machine,
        "libraries": libraries,
        "gpu_telemetry": gpu_status,
        "model": _model_record(target, mode),
        "protocol": {
            "runs": runs, "warmup_passes": warmup, "n_images": n_images,
            "distinct_images": min(n_images, MAX_DISTINCT_IMAGES), "batch_sizes": batch_sizes,
            "format": fmt, "size": f"{size[0]}x{size[1]}",
            "mean_png_bytes": float(np.mean([len(b) for b in blobs])),
            "interleaved": True,
            "wall_time": "first batch start to last batch completion (CUDA synchronised); "
                         "model load, input preparation and warm-up excluded",
            "inputs": _inputs_text(pipeline, mode),
        },
        "configs": config_records,
        "baseline": baseline,
        "rows": rows,
        "best": {"config": best["config"], "batch_size": best["batch_size"],
                 "throughput_img_s": best["throughput_img_s"]["mean"]},
        "throughput_img_s": best["throughput_img_s"]["mean"],
    }


def _model_record(target, mode: str) -> dict[str, Any]:
    """What was measured: the pipeline, the model's id and name, whether it is trained, its input shape."""
    record: dict[str, Any] = {"pipeline": target.model, "id": target.model_id}
    if target.model == "sarcnn":
        record["name"] = target.loaded.meta.model_name
    else:
        network = "EVA02-L/14-448" if target.eva_config == "large" else f"EVA02 {target.eva_config} (test size)"
        record["name"] = f"{network} + XGBoost ({target.xgboost.facts.trees} trees)"
    record.update(trained=target.trained, input_shape=list(target.input_shape))
    if target.model == "eva02xgb":
        record.update(eva_config=target.eva_config, output_shape=list(target.output_shape),
                      xgboost=target.xgboost_path.name,
                      xgboost_device=target.xgboost.device if mode == "e2e" else None)  # model mode: not run
    return record


def _inputs_text(pipeline: str, mode: str) -> str:
    if mode == "model":
        return "preprocessed float32 inputs in host memory" + (
            "; EVA02 + softmax only (XGBoost not run)" if pipeline == "eva02xgb" else "")
    if pipeline == "eva02xgb":
        return "PNG bytes in RAM: decode + preprocess + EVA02 + softmax + XGBoost"
    return "PNG bytes in RAM: decode + preprocess + inference"


def _measure_batch_size(subjects, batch_size: int, runs: int, warmup: int, n_images: int,
                        gpu: GpuMonitor) -> list[dict[str, Any]]:
    """Warm up every configuration at `batch_size`, then interleave their timed runs."""
    # Every configuration is loaded before any is warmed up, in both modes: which libraries have
    # initialised before a backend's first inference can change its speed (seen with torch on CPU).
    live = [(s, r) for s, r in subjects if "error" not in r]
    live = [(s, r) for s, r in live if _attempt(s, r, batch_size, lambda s=s: s.prepare(batch_size))]
    live = [(s, r) for s, r in live if _attempt(s, r, batch_size, lambda s=s: [s.run_pass() for _ in range(warmup)])]
    active = [s for s, _ in live]

    passes: dict[int, list[PassTiming]] = {id(s): [] for s in active}
    windows: dict[int, list[GpuWindow]] = {id(s): [] for s in active}
    rss: dict[int, float] = {id(s): 0.0 for s in active}
    allocator: dict[int, int | None] = {id(s): None for s in active}
    rss_resettable = True
    for _ in range(runs):
        for subject in active:
            watch_gpu = gpu.available and subject.config.is_cuda
            rss_resettable = reset_peak_rss() and rss_resettable
            if watch_gpu:
                reset_allocator_peak(subject.config.device)
            with gpu.window() if watch_gpu else nullcontext() as window:
                passes[id(subject)].append(subject.run_pass())
            rss[id(subject)] = max(rss[id(subject)], peak_rss_mb())
            if watch_gpu:
                windows[id(subject)].append(window)
                peak = allocator_peak_bytes(subject.config.device)
                if peak is not None:
                    allocator[id(subject)] = max(peak, allocator[id(subject)] or 0)

    rows = []
    for subject in active:
        config, timed = subject.config, passes[id(subject)]
        walls = [p.wall_s for p in timed]
        row: dict[str, Any] = {
            "config": config.label, "backend": config.backend, "precision": config.precision,
            "device": config.device, "batch_size": batch_size, "images": n_images, "runs": runs,
            "wall_s": _summary(walls),
            "throughput_img_s": _summary([n_images / w for w in walls]),
            "latency_ms": _latency_ms(timed),
            "peak_rss_mb": rss[id(subject)],
            "peak_rss_scope": "this row's runs" if rss_resettable else "process lifetime",
        }
        if timed[0].stages is not None:
            row["stages"] = _stage_summary(timed, n_images, subject.decode_workers)
        if timed[0].xgboost_s is not None:
            row["xgboost_share"] = _summary([p.xgboost_s / p.wall_s for p in timed])
        if windows[id(subject)]:
            row["gpu"] = summarise_windows(gpu, windows[id(subject)], n_images, allocator[id(subject)])
        rows.append(row)
    for subject in active:
        subject.finish_batch_size()
    return rows


def _attempt(subject, record: dict[str, Any], batch_size: int, action: Callable[[], Any]) -> bool:
    """Run `action`; when it fails, record the error against the configuration and free it."""
    try:
        action()
        return True
    except Exception as e:  # noqa: BLE001 -- one configuration that cannot run (e.g. fp16 on a CPU
        # without it) is reported in the results, not allowed to cost the others theirs
        record["error"] = f"batch size {batch_size}: {type(e).__name__}: {e}"
        subject.close()
        return False


def _add_speedups(rows: list[dict[str, Any]], baseline: str) -> None:
    """Throughput ratio to the baseline at the same batch size, run by run (the runs were interleaved)."""
    base = {r["batch_size"]: r["throughput_img_s"]["per_run"] for r in rows if r["config"] == baseline}
    for row in rows:
        reference = base.get(row["batch_size"])
        if reference is None:
            row["speedup_vs_baseline"] = None
            continue
        ratios = [t / b for t, b in zip(row["throughput_img_s"]["per_run"], reference)]
        row["speedup_vs_baseline"] = _summary(ratios)


def machine_name(machine: dict[str, Any], device: str) -> str:
    """The machine a figure on `device` was measured on: the GPU for CUDA configurations, else the
    CPU and its cores (`machine` is a result's "machine" record)."""
    gpu = machine.get("gpu")
    if device.startswith("cuda") and gpu:
        return str(gpu["name"])
    return f"{machine['cpu']} ({machine['cores']} cores)"
