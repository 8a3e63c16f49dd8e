"""`iws-engine build`: make a backend artefact, check it against the fp32 eager reference, write its manifest.

An artefact folder holds the artefact (e.g. model.onnx) and manifest.json: the model's sha256,
preprocessing spec, input/output spec, backend, precision, batch profile, library versions,
GPU identity, build time and the parity results. The manifest is the cache key: an artefact is
only reused where the key matches the current environment (a TensorRT engine is never loaded
on another GPU or TensorRT version than it was built for).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from iws_engine.export.weights import sha256_file

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1

#: max |Δp| allowed against the fp32 eager reference, per precision (the parity gate)
PARITY_TOLERANCE = {"fp32": 1e-4, "tf32": 1e-4, "fp16": 5e-3, "bf16": 5e-3, "int8": 2e-2, "fp8": 2e-2}
#: minimum share of equal decisions at the model's threshold, per precision
PARITY_AGREEMENT = {"int8": 0.995, "fp8": 0.995}


class BuildError(RuntimeError):
    """The artefact could not be built, failed its parity gate, or does not fit this environment."""


@dataclass(frozen=True)
class BatchProfile:
    min: int
    opt: int
    max: int

    @classmethod
    def parse(cls, text: str) -> "BatchProfile":
        try:
            lo, opt, hi = (int(x) for x in text.split(":"))
        except ValueError:
            raise ValueError(f"batch profile must be MIN:OPT:MAX, got {text!r}") from None
        if not 1 <= lo <= opt <= hi:
            raise ValueError(f"batch profile needs 1 <= MIN <= OPT <= MAX, got {text!r}")
        return cls(lo, opt, hi)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


#: pip distributions that may provide a library (TensorRT's runtime wheel is named per CUDA major)
_DISTRIBUTIONS = {"tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12")}
CALIBRATION_CACHE = "calibration.cache"
#: the FP8 Q/DQ graph a TensorRT fp8 engine is built from (+ its .data file for EVA02)
FP8_ONNX = "model.fp8.onnx"
#: the INT8 QDQ graph ONNX Runtime (and OpenVINO) run for --backend onnxruntime|openvino --precision int8
INT8_ONNX = "model.int8.onnx"
#: backends that run the INT8 QDQ graph of export/quantize_int8.py (SAR_CNN only)
INT8_QDQ_BACKENDS = ("onnxruntime", "openvino")
#: builds that take --calib: TensorRT's INT8 calibrator and FP8 scales, the INT8 QDQ ranges
CALIBRATED_BUILDS = (("tensorrt", "int8"), ("tensorrt", "fp8"), *((b, "int8") for b in INT8_QDQ_BACKENDS))
#: fp8/int8 without --calib calibrate on the target's probe vignettes drawn with this seed offset, so
#: the parity gate never scores the images the scales came from
FP8_PROBE_SEED_OFFSET = 1


def environment(device: str) -> dict[str, str]:
    """Library versions and GPU identity that an artefact depends on."""
    import importlib.metadata as md

    env = {"python": platform.python_version(), "machine": platform.machine()}
    for library in ("torch", "onnx", "onnxruntime", "openvino", "tensorrt", "torch-tensorrt"):
        for dist in _DISTRIBUTIONS.get(library, (library,)):
            try:
                env[library] = md.version(dist)
                break
            except md.PackageNotFoundError:
                pass
    if device.startswith("cuda"):
        import torch

        idx = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(idx)
        env.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda or "")
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # noqa: BLE001 - the driver version is informative only
            pass
    return env


#: environment fields an artefact of each backend must match exactly to be reused
BINDING_FIELDS = {
    "onnxruntime": ("onnx", "onnxruntime"),
    "openvino": ("onnx", "onnxruntime", "openvino"),  # onnxruntime: its quantizer made the INT8 graph
    "torch": ("torch",),
    "inductor": ("torch", "gpu", "compute_capability", "cuda"),
    "tensorrt": ("tensorrt", "gpu", "compute_capability"),
    "torch-tensorrt": ("torch", "torch-tensorrt", "tensorrt", "gpu", "compute_capability"),
}


def mismatch(manifest: dict, env: dict) -> list[str]:
    """Why an artefact cannot be used in `env` (empty when it can)."""
    built = manifest.get("environment", {})
    return [f"{k} {built.get(k)!r} (built) != {env.get(k)!r} (here)"
            for k in BINDING_FIELDS.get(manifest.get("backend"), ()) if built.get(k) != env.get(k)]


def parity(candidate, reference, inputs: np.ndarray, threshold: float, batch: int, scores=None) -> dict:
    """max |Δp| and decision agreement of `candidate` against `reference` backends on `inputs`.

    `scores` turns backend outputs into probabilities (default: sigmoid of SAR_CNN's logits). For
    backends with a feature vector per image (EVA02's softmax), max |Δfeature| is measured too.
    """
    from iws_engine.backends.base import sigmoid

    scores = scores or sigmoid

    def outputs(backend):
        out = np.empty((len(inputs), *backend.output_shape), np.float32)
        for i in range(0, len(inputs), batch):
            backend.infer(inputs[i:i + batch], out[i:i + batch])
        return out

    y_ref, y_got = outputs(reference), outputs(candidate)
    p_ref = np.asarray(scores(y_ref), np.float64)
    p_got = np.asarray(scores(y_got), np.float64)
    agree = float(np.mean((p_ref >= threshold) == (p_got >= threshold)))
    result = {"probes": int(len(inputs)), "max_abs_dp": float(np.max(np.abs(p_ref - p_got))),
              "decision_agreement": agree, "threshold": threshold}
    if y_ref.ndim > 1:
        result["max_abs_dfeature"] = float(np.max(np.abs(y_ref.astype(np.float64) - y_got)))
    return result


def gate(result: dict, precision: str) -> dict:
    """Apply the parity gate; returns the result with its limits and verdict, raises BuildError on failure.

    The same limit applies to the final probabilities and, where measured, to the features
    (EVA02's softmax) the probabilities are computed from.
    """
    tol = PARITY_TOLERANCE[precision]
    min_agree = PARITY_AGREEMENT.get(precision, 0.0)
    result = {**result, "max_abs_dp_limit": tol, "decision_agreement_min": min_agree}
    dfeature = result.get("max_abs_dfeature", 0.0)
    result["passed"] = result["max_abs_dp"] <= tol and dfeature <= tol and result["decision_agreement"] >= min_agree
    if not result["passed"]:
        features = f", max |dfeature| {dfeature:.3g} (limit {tol:g})" if "max_abs_dfeature" in result else ""
        raise BuildError(f"parity gate failed for {precision}: max |dp| {result['max_abs_dp']:.3g} (limit {tol:g})"
                         f"{features}, decision agreement {result['decision_agreement']:.4f} (min {min_agree})")
    return result


def calibration_files(calib_dir: Path) -> list[str]:
    """The calibration PNGs under `calib_dir` (recursively, sorted); refuses an empty folder."""
    from iws_engine.pipeline import expand_inputs

    if not Path(calib_dir).is_dir():
        raise BuildError(f"--calib {calib_dir}: not a directory")
    files = list(expand_inputs([calib_dir]))
    if not files:
        raise BuildError(f"--calib {calib_dir}: no PNG files in it")
    return files


def calibration_key(model_sha256: str, spec, files: list[str]) -> str:
    """What INT8 scales depend on: the model, its preprocessing and every calibration image's bytes."""
    h = hashlib.sha256(f"{model_sha256}\n{spec.to_json()}\n".encode())
    for f in files:
        h.update(f"{Path(f).name}\n{sha256_file(Path(f))}\n".encode())
    return h.hexdigest()


def calibration_inputs(files: list[str], target, batch_size: int):
    """Calibration PNGs decoded and preprocessed as the model's pipeline does, as (N, C, H, W) float32 arrays."""
    for batch in target.loader(batch_size).batches(files):
        if batch.errors:
            raise BuildError("calibration images failed to load: " + "; ".join(batch.errors.values()))
        yield batch.inputs


def _build_tensorrt(target, precision: str, device: str, profile: BatchProfile, out_dir: Path,
                    calib_files: list[str] | None, calib_key: str | None) -> tuple[Path, dict]:
    """model.onnx → model.engine (+ timing.cache, and calibration.cache for int8); returns (engine, build info)."""
    from iws_engine.backends import tensorrt as trt_backend
    from iws_engine.export.onnx import export_onnx

    trt_backend.import_tensorrt()  # the precise "not installed" reason before any work
    if not device.startswith("cuda"):
        raise BuildError("tensorrt builds need a CUDA device: pass --device cuda")
    if precision == "fp8":  # refuse a pre-Ada GPU before minutes of calibration, not after
        trt_backend.precision_flags(precision, trt_backend.gpu_compute_capability(device))
    onnx_path = export_onnx(target.source, out_dir / "model.onnx", input_shape=target.input_shape)
    calibrator, quantization = None, None
    if precision == "fp8" and not trt_backend.has_explicit_quantization(onnx_path):
        onnx_path, quantization = quantize_onnx_fp8(target, onnx_path, out_dir, calib_files)
    elif calib_files and precision == "int8":
        batch_size = min(profile.opt, len(calib_files))
        stream = trt_backend.CalibrationStream(calibration_inputs(calib_files, target, batch_size), batch_size)
        cache = trt_backend.CalibrationCache(out_dir / CALIBRATION_CACHE, calib_key)
        calibrator = trt_backend.make_entropy_calibrator(stream, cache, device)
    engine = out_dir / "model.engine"
    spec = trt_backend.ProfileSpec.from_batch(profile.min, profile.opt, profile.max, target.input_shape)
    info = trt_backend.build_engine(onnx_path, engine, precision, spec, out_dir / "timing.cache",
                                    calibrator=calibrator, device=device)
    if quantization is not None:
        info["quantization"] = quantization
    return engine, info


def calibration_batches(target, calib_files: list[str] | None, batch_size: int) -> tuple[Any, dict]:
    """(batches of preprocessed calibration inputs, what they are for the manifest) for quantization.

    The --calib PNGs go through the model's own loader (as TensorRT INT8 calibration); without
    them, the target's synthetic probe vignettes drawn with another seed than the parity probes:
    a fallback that the record names as such.
    """
    from iws_engine.export.targets import PROBE_SEED

    if calib_files:
        return calibration_inputs(calib_files, target, batch_size), {"source": "--calib", "files": len(calib_files)}
    seed = PROBE_SEED + FP8_PROBE_SEED_OFFSET
    return [target.probe_inputs(target.default_probes, seed=seed)], {
        "source": "probes", "seed": seed,
        "note": "fallback without --calib: synthetic probe vignettes (not the parity probes); "
                "pass --calib DIR with real images for production scales"}


def quantize_onnx_fp8(target, onnx_path: Path, out_dir: Path, calib_files: list[str] | None) -> tuple[Path, dict]:
    """The fp32 export → `FP8_ONNX` (FP8 Q/DQ, `export.quantize`); returns (its path, the manifest record).

    Scales come from `calibration_batches`: the --calib PNGs or the target's probe vignettes. The record also
    names and hashes the FP8 ONNX, from which the TensorRT engine is built.
    """
    from iws_engine.export import quantize

    out, record = _quantize_onnx("fp8", quantize.quantize_fp8, quantize.DEFAULT_BATCH_SIZE, FP8_ONNX,
                                 target, onnx_path, out_dir, calib_files)
    return out, {**record, "onnx": out.name, "onnx_sha256": sha256_file(out)}


def quantize_onnx_int8(target, onnx_path: Path, out_dir: Path, calib_files: list[str] | None) -> tuple[Path, dict]:
    """The fp32 export → `INT8_ONNX` (ONNX Runtime QDQ, `export.quantize_int8`), calibrated as
    `calibration_batches` says; returns (its path, the manifest record)."""
    from iws_engine.export import quantize_int8

    return _quantize_onnx("int8", quantize_int8.quantize_int8, quantize_int8.DEFAULT_BATCH_SIZE, INT8_ONNX,
                          target, onnx_path, out_dir, calib_files)


def _quantize_onnx(precision: str, quantizer, batch_size: int, filename: str, target, onnx_path: Path,
                   out_dir: Path, calib_files: list[str] | None) -> tuple[Path, dict]:
    """`quantizer(onnx_path, out, batches)` on the calibration batches into out_dir/filename; returns (out, its
    summary with the calibration source)."""
    batches, source = calibration_batches(target, calib_files, batch_size)
    out = Path(out_dir) / filename
    try:
        summary = quantizer(onnx_path, out, batches)
    except ValueError as e:
        raise BuildError(f"{precision} quantization of {onnx_path} failed: {e}") from e
    return out, {**summary, "calibration": {**summary["calibration"], **source}}


def _build_torch_tensorrt(target, precision: str, device: str, profile: BatchProfile, out_dir: Path) -> Path:
    """The Torch-TensorRT dynamo program saved as model.ep."""
    import torch

    from iws_engine.backends import torch_tensorrt as ttrt_backend
    from iws_engine.export.models import build_model

    ttrt_backend.import_torch_tensorrt()
    if not device.startswith("cuda"):
        raise BuildError("torch-tensorrt builds need a CUDA device: pass --device cuda")
    compiled = ttrt_backend.compile_program(build_model(target.source), target.input_shape, precision,
                                            (profile.min, profile.opt, profile.max), device)
    path = out_dir / "model.ep"
    ttrt_backend.save_program(compiled, path, torch.zeros((profile.opt, *target.input_shape), device=device))
    return path


def build(*, weights_path: Path | None = None, backend: str, precision: str, device: str = "cpu",
          profile: BatchProfile = BatchProfile(1, 64, 256), out_dir: Path, no_build: bool = False,
          probes: int | None = None, calib_dir: Path | None = None, target=None) -> dict:
    """Build (or reuse) the artefact for (model, backend, precision, profile) in `out_dir`; returns the manifest.

    `target`: the model (`export.targets.SarcnnTarget` or `Eva02XgbTarget`); default: SAR_CNN
    from `weights_path` (default: the embedded model). `calib_dir`: PNGs for TensorRT INT8
    calibration or FP8 scales, preprocessed as the model's pipeline does (fp8 without them:
    the target's probe vignettes, see `quantize_onnx_fp8`). `probes`: parity probe images
    (default: the target's).
    """
    from iws_engine import backends
    from iws_engine.export.onnx import export_onnx
    from iws_engine.export.targets import SarcnnTarget

    if target is None:
        target = SarcnnTarget(weights_path)
    elif weights_path is not None:
        raise BuildError("give the weights through the target, not also as weights_path")
    if precision not in PARITY_TOLERANCE:
        raise BuildError(f"unknown precision {precision!r}; choose from {', '.join(PARITY_TOLERANCE)}")
    if calib_dir is not None and (backend, precision) not in CALIBRATED_BUILDS:
        raise BuildError("--calib is only used by --backend tensorrt --precision int8 or fp8 and "
                         "--backend onnxruntime|openvino --precision int8")
    if backend in INT8_QDQ_BACKENDS and precision == "int8" and target.model != "sarcnn":
        raise BuildError(f"--backend {backend} --precision int8 quantizes SAR_CNN only, not {target.model}")
    calib_files = calibration_files(Path(calib_dir)) if calib_dir is not None else None
    calib_key = calibration_key(target.sha256, target.spec, calib_files) if calib_files else None
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BuildError(f"--device {device}: no CUDA device is available here")
    env = environment(device)
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        same = (old.get("model") == target.model and target.same_model(old) and old.get("backend") == backend
                and old.get("precision") == precision and old.get("batch_profile") == str(profile)
                and (calib_key is None or (old.get("calibration") or {}).get("key") == calib_key))
        why = mismatch(old, env)
        if same and not why:
            return old  # cache hit: built for this model, backend, precision and environment
        if no_build:
            raise BuildError(f"{out_dir}: artefact does not fit: " + ("; ".join(why) or "different model/backend/precision/profile"))
    elif no_build:
        raise BuildError(f"{out_dir}: no artefact built yet and --no-build was given")

    out_dir.mkdir(parents=True, exist_ok=True)
    artefact, artefact_build = None, None
    if backend in ("onnxruntime", "openvino"):
        artefact = source = export_onnx(target.source, out_dir / "model.onnx", input_shape=target.input_shape)
        if precision == "int8":
            artefact, quantization = quantize_onnx_int8(target, artefact, out_dir, calib_files)
            source, artefact_build = artefact, {"quantization": quantization}
    elif backend == "tensorrt":
        artefact, artefact_build = _build_tensorrt(target, precision, device, profile, out_dir, calib_files, calib_key)
        source = artefact
    elif backend == "torch-tensorrt":
        artefact = source = _build_torch_tensorrt(target, precision, device, profile, out_dir)
    else:
        source = target.source  # eager and inductor (compiled at load) build from the weights
    shapes = (target.input_shape, target.output_shape)
    candidate = backends.create(backend, precision=precision, device=device).load(source, *shapes)
    reference = backends.create("torch", precision="fp32", device=target.reference_device(device)).load(
        target.source, *shapes)
    probes = probes or target.default_probes
    inputs = target.probe_inputs(probes)
    result = parity(candidate, reference, inputs, target.threshold, batch=min(profile.opt, probes),
                    scores=target.scores)
    info = candidate.info()
    candidate.close()
    reference.close()
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        **target.manifest_fields(),
        "backend": backend,
        "precision": precision,
        "device": device,
        "batch_profile": str(profile),
        "artefact": artefact.name if artefact else None,
        "artefact_sha256": sha256_file(artefact) if artefact else None,
        "artefact_data": _external_data(artefact),
        "artefact_build": artefact_build,
        # fp8 and the INT8 QDQ graphs: no calibration cache; their scales are in artefact_build.quantization
        "calibration": ({"key": calib_key, "images": len(calib_files),
                         "cache": CALIBRATION_CACHE if (backend, precision) == ("tensorrt", "int8") else None}
                        if calib_files else None),
        "environment": env,
        "backend_info": info,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "parity": None,
    }
    try:
        manifest["parity"] = gate(result, precision)
    finally:
        if manifest["parity"] is None:
            manifest["parity"] = {**result, "passed": False}
            (out_dir / "manifest.failed.json").write_text(json.dumps(manifest, indent=2) + "\n")
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _external_data(artefact: Path | None) -> dict[str, str] | None:
    """sha256 of an ONNX artefact's external weight file (EVA02: model.onnx.data), keyed by name."""
    if artefact is None:
        return None
    data = artefact.with_name(artefact.name + ".data")
    return {data.name: sha256_file(data)} if data.is_file() else None


def read_manifest(out_dir: Path) -> dict:
    """An artefact folder's manifest; a BuildError naming the folder when there is none."""
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except OSError as e:
        raise BuildError(f"{out_dir}: no {MANIFEST} ({e.strerror}); run iws-engine build first") from None


def load_artifacts(out_dir: Path, device: str = "cpu", **backend_options):
    """(backend, target, manifest) for a built artefact folder; refuses one that does not fit here.

    `target` is the model the manifest names (`SarcnnTarget` or `Eva02XgbTarget`), its files
    checked against the manifest's sha256s; the backend is loaded and ready to infer.
    `backend_options` go to the backend's constructor (e.g. `threads`: what the build decided is the
    model; how many cores run it is the caller's choice).
    """
    from iws_engine import backends
    from iws_engine.export.targets import target_from_manifest

    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    why = mismatch(manifest, environment(device))
    if why:
        raise BuildError(f"{out_dir}: built for another environment: " + "; ".join(why) + " — rebuild it")
    if not manifest.get("parity", {}).get("passed"):
        raise BuildError(f"{out_dir}: artefact did not pass its parity gate")
    target = target_from_manifest(manifest, device=device)
    source = None
    if manifest.get("artefact"):
        source = out_dir / manifest["artefact"]
        if sha256_file(source) != manifest["artefact_sha256"]:
            raise BuildError(f"{source}: artefact changed since the build (sha256 differs)")
        for name, digest in (manifest.get("artefact_data") or {}).items():
            if sha256_file(out_dir / name) != digest:
                raise BuildError(f"{out_dir / name}: artefact data changed since the build (sha256 differs)")
    backend = backends.create(manifest["backend"], precision=manifest["precision"], device=device, **backend_options)
    backend.load(source if source is not None else target.source, target.input_shape, target.output_shape)
    return backend, target, manifest
