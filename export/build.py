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

import numpy as np

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1

#: max |Δp| allowed against the fp32 eager reference, per precision (the parity gate)
PARITY_TOLERANCE = {"fp32": 1e-4, "tf32": 1e-4, "fp16": 5e-3, "bf16": 5e-3, "int8": 2e-2, "fp8": 2e-2}
#: minimum share of equal decisions at the model's threshold, per precision
PARITY_AGREEMENT = {"int8": 0.995, "fp8": 0.995}
PROBE_SEED = 20261121


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


def environment(device: str) -> dict[str, str]:
    """Library versions and GPU identity that an artefact depends on."""
    import importlib.metadata as md

    env = {"python": platform.python_version(), "machine": platform.machine()}
    for dist in ("torch", "onnx", "onnxruntime", "tensorrt", "torch-tensorrt"):
        try:
            env[dist] = md.version(dist)
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


def probe_inputs(spec, n: int = 48, seed: int = PROBE_SEED) -> np.ndarray:
    """A fixed probe set: synthetic RGBA16 vignettes (half with waves) through the reference preprocessing."""
    from iws_engine.export.synth import encode_png, render_vignette
    from iws_engine.loaders.png import decode_png
    from iws_engine.preprocess import preprocess_reference

    out = np.empty((n, spec.channels, *spec.size), np.float32)
    for i in range(n):
        png = encode_png(render_vignette(np.random.default_rng([seed, i]), i % 2 == 0, 528, 539), "rgba16")
        preprocess_reference(decode_png(png), spec, out=out[i, 0])
    return out


def parity(candidate, reference, inputs: np.ndarray, threshold: float, batch: int) -> dict:
    """max |Δp| and decision agreement of `candidate` against `reference` backends on `inputs`."""
    from iws_engine.backends.base import sigmoid

    def probs(backend):
        out = np.empty(len(inputs), np.float32)
        for i in range(0, len(inputs), batch):
            backend.infer(inputs[i:i + batch], out[i:i + batch])
        return sigmoid(out).astype(np.float64)

    p_ref, p_got = probs(reference), probs(candidate)
    agree = float(np.mean((p_ref >= threshold) == (p_got >= threshold)))
    return {"probes": int(len(inputs)), "max_abs_dp": float(np.max(np.abs(p_ref - p_got))), "decision_agreement": agree,
            "threshold": threshold}


def gate(result: dict, precision: str) -> dict:
    """Apply the parity gate; returns the result with its limits and verdict, raises BuildError on failure."""
    tol = PARITY_TOLERANCE[precision]
    min_agree = PARITY_AGREEMENT.get(precision, 0.0)
    result = {**result, "max_abs_dp_limit": tol, "decision_agreement_min": min_agree}
    result["passed"] = result["max_abs_dp"] <= tol and result["decision_agreement"] >= min_agree
    if not result["passed"]:
        raise BuildError(f"parity gate failed for {precision}: max |dp| {result['max_abs_dp']:.3g} (limit {tol:g}), "
                         f"decision agreement {result['decision_agreement']:.4f} (min {min_agree})")
    return result


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(*, weights_path: Path | None, backend: str, precision: str, device: str = "cpu",
          profile: BatchProfile = BatchProfile(1, 64, 256), out_dir: Path, no_build: bool = False,
          probes: int = 48) -> dict:
    """Build (or reuse) the artefact for (model, backend, precision, profile) in `out_dir`; returns the manifest."""
    from iws_engine import backends
    from iws_engine.export import weights as weights_io
    from iws_engine.export.onnx import export_onnx

    weights_path = Path(weights_path) if weights_path else weights_io.default_weights_path()
    loaded = weights_io.load(weights_path)
    if precision not in PARITY_TOLERANCE:
        raise BuildError(f"unknown precision {precision!r}; choose from {', '.join(PARITY_TOLERANCE)}")
    env = environment(device)
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        same = (old.get("model_sha256") == loaded.sha256 and old.get("backend") == backend
                and old.get("precision") == precision and old.get("batch_profile") == str(profile))
        why = mismatch(old, env)
        if same and not why:
            return old  # cache hit: built for this model, backend, precision and environment
        if no_build:
            raise BuildError(f"{out_dir}: artefact does not fit: " + ("; ".join(why) or "different model/backend/precision/profile"))
    elif no_build:
        raise BuildError(f"{out_dir}: no artefact built yet and --no-build was given")

    spec = loaded.meta.preprocess
    shape = (spec.channels, *spec.size)
    out_dir.mkdir(parents=True, exist_ok=True)
    artefact = None
    if backend == "onnxruntime":
        artefact = out_dir / "model.onnx"
        export_onnx(loaded, artefact, input_shape=shape)
        source = artefact
    else:
        source = loaded  # eager/compiled-in-process backends build from the weights
    candidate = backends.create(backend, precision=precision, device=device).load(source, shape)
    reference = backends.create("torch", precision="fp32", device="cpu").load(loaded, shape)
    inputs = probe_inputs(spec, probes)
    result = parity(candidate, reference, inputs, loaded.meta.threshold, batch=min(profile.opt, probes))
    info = candidate.info()
    candidate.close()
    reference.close()
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "model": loaded.meta.model,
        "model_id": loaded.model_id,
        "model_sha256": loaded.sha256,
        "weights": str(weights_path.resolve()),
        "trained": loaded.meta.trained,
        "threshold": loaded.meta.threshold,
        "preprocess": json.loads(spec.to_json()),
        "input": {"name": "input", "shape": ["batch", *shape], "dtype": "float32", "layout": spec.layout},
        "output": {"name": "logit", "shape": ["batch", 1], "dtype": "float32", "activation": "sigmoid for the score"},
        "backend": backend,
        "precision": precision,
        "device": device,
        "batch_profile": str(profile),
        "artefact": artefact.name if artefact else None,
        "artefact_sha256": _sha256(artefact) if artefact else None,
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


def load_artifacts(out_dir: Path, device: str = "cpu"):
    """(backend, LoadedWeights, manifest) for a built artefact folder; refuses one that does not fit here."""
    from iws_engine import backends
    from iws_engine.export import weights as weights_io

    out_dir = Path(out_dir)
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except OSError as e:
        raise BuildError(f"{out_dir}: no {MANIFEST} ({e.strerror}); run iws-engine build first") from None
    why = mismatch(manifest, environment(device))
    if why:
        raise BuildError(f"{out_dir}: built for another environment: " + "; ".join(why) + " — rebuild it")
    if not manifest.get("parity", {}).get("passed"):
        raise BuildError(f"{out_dir}: artefact did not pass its parity gate")
    loaded = weights_io.load(manifest["weights"])
    if loaded.sha256 != manifest["model_sha256"]:
        raise BuildError(f"{out_dir}: weights {manifest['weights']} changed since the build (sha256 differs)")
    source = loaded
    if manifest.get("artefact"):
        source = out_dir / manifest["artefact"]
        if _sha256(source) != manifest["artefact_sha256"]:
            raise BuildError(f"{source}: artefact changed since the build (sha256 differs)")
    spec = loaded.meta.preprocess
    backend = backends.create(manifest["backend"], precision=manifest["precision"], device=device)
    return backend.load(source, (spec.channels, *spec.size)), loaded, manifest
