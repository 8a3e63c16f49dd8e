"""The two pipelines' models as build targets: what `iws-engine build`, its parity gate and artefact
loading need to know about a model, in one place per pipeline.

- `SarcnnTarget` (Pipeline B): SAR_CNN v2 weights → one logit per image; score = sigmoid(logit).
- `Eva02XgbTarget` (Pipeline A): EVA02 weights (or a seeded random network) → 1,000 softmax
  features per image; score = the paper's XGBoost model on those features.
A backend compiles only the network (`source`); the target turns its outputs into scores.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from iws_engine.export.weights import sha256_file

PROBE_SEED = 20261121


def _probe_png(index: int, seed: int) -> bytes:
    """Probe `index`: a synthetic RGBA16 539×528 vignette, waves in every other one."""
    from iws_engine.export.synth import encode_png, render_vignette

    return encode_png(render_vignette(np.random.default_rng([seed, index]), index % 2 == 0, 528, 539), "rgba16")


class _Target:
    """What both targets share: the fixed probe set, through each model's own preprocessing."""

    input_shape: tuple[int, ...]

    def preprocess_png(self, blob: bytes, out: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def probe_inputs(self, n: int, seed: int = PROBE_SEED) -> np.ndarray:
        """Probes 0..n-1 (synthetic vignettes, `_probe_png`) preprocessed, (n, *input_shape) float32."""
        out = np.empty((n, *self.input_shape), np.float32)
        for i in range(n):
            self.preprocess_png(_probe_png(i, seed), out[i])
        return out


class SarcnnTarget(_Target):
    """Pipeline B: SAR_CNN v2 from a weights file (default: the embedded model)."""

    model = "sarcnn"
    default_probes = 48
    output_shape: tuple[int, ...] = ()

    def __init__(self, weights_path: str | Path | None = None):
        from iws_engine.export import weights as weights_io

        self.weights_path = Path(weights_path) if weights_path else weights_io.default_weights_path()
        self.loaded = weights_io.load(self.weights_path)
        self.spec = self.loaded.meta.preprocess
        self.input_shape = (self.spec.channels, *self.spec.size)

    @property
    def source(self):
        """What a backend loads: the SAR_CNN weights."""
        return self.loaded

    @property
    def sha256(self) -> str:
        return self.loaded.sha256

    @property
    def model_id(self) -> str:
        return self.loaded.model_id

    @property
    def trained(self) -> bool:
        return bool(self.loaded.meta.trained)

    @property
    def threshold(self) -> float:
        return float(self.loaded.meta.threshold)

    def reference_device(self, device: str) -> str:
        """The fp32 eager reference runs on the CPU: exact, and fast enough for 283 k parameters."""
        return "cpu"

    def preprocess_png(self, blob: bytes, out: np.ndarray) -> np.ndarray:
        """One PNG's bytes through the reference preprocessing into `out`, float32 `input_shape`."""
        from iws_engine.loaders.png import decode_png
        from iws_engine.preprocess import preprocess_reference

        preprocess_reference(decode_png(blob), self.spec, out=out[0])
        return out

    def scores(self, outputs: np.ndarray) -> np.ndarray:
        """Probabilities from the network's logits."""
        from iws_engine.backends.base import sigmoid

        return sigmoid(outputs)

    def loader(self, batch_size: int):
        from iws_engine.loaders.cpu import CpuLoader

        return CpuLoader(self.spec, batch_size=batch_size)

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "model": self.loaded.meta.model,
            "model_id": self.model_id,
            "model_sha256": self.sha256,
            "weights": str(self.weights_path.resolve()),
            "trained": self.trained,
            "threshold": self.threshold,
            "preprocess": json.loads(self.spec.to_json()),
            "input": {"name": "input", "shape": ["batch", *self.input_shape], "dtype": "float32",
                      "layout": self.spec.layout},
            "output": {"name": "logit", "shape": ["batch", 1], "dtype": "float32",
                       "activation": "sigmoid for the score"},
        }

    def same_model(self, manifest: dict) -> bool:
        return manifest.get("model_sha256") == self.sha256

    @classmethod
    def from_manifest(cls, manifest: dict) -> "SarcnnTarget":
        from iws_engine.export.build import BuildError

        target = cls(manifest["weights"])
        if not target.same_model(manifest):
            raise BuildError(f"weights {manifest['weights']} changed since the build (sha256 differs)")
        return target


class Eva02XgbTarget(_Target):
    """Pipeline A: EVA02 (timm weights file, or a seeded random network) → softmax → XGBoost."""

    model = "eva02xgb"
    default_probes = 16  # 0.72 TFLOP per image: the fp32 reference dominates a build
    output_shape: tuple[int, ...] = (1000,)

    def __init__(self, weights_path: str | Path | None, xgboost_path: str | Path, *, eva_config: str = "large",
                 seed: int = 0, xgboost_device: str = "cpu"):
        from iws_engine.pipeline_a import clip_spec_for, eva02_config
        from iws_engine.xgboost_stage import XGBoostStage

        if xgboost_path is None:
            raise ValueError("--model eva02xgb needs --xgboost FILE: Pipeline A's XGBoost model (the paper's "
                             "models/pipeline_a_xgboost.json)")
        self.eva_config = eva_config
        self.seed = seed
        config = eva02_config(eva_config)
        self.xgboost_path = Path(xgboost_path)
        self.xgboost = XGBoostStage(self.xgboost_path, device=xgboost_device)  # checks the file before 1.2 GB loads
        self.xgboost_sha256 = sha256_file(self.xgboost_path)
        self.weights_path = Path(weights_path) if weights_path is not None else None
        if self.weights_path is not None and not self.weights_path.is_file():
            raise ValueError(f"{self.weights_path}: no such EVA02 weights file")
        self._config = config
        self._eva = None  # loaded when a backend needs the network (an ONNX/TensorRT artefact does not)
        self._weights_sha256 = sha256_file(self.weights_path) if self.weights_path else None
        self.spec = clip_spec_for(config.img_size)
        self.input_shape = (3, self.spec.size, self.spec.size)

    @property
    def eva(self):
        """The EVA02 network (`LoadedEva02`), loaded on first use."""
        from iws_engine.export.models.eva02 import load_eva02_weights, random_eva02

        if self._eva is None:
            self._eva = (load_eva02_weights(self.weights_path, self._config, sha256=self._weights_sha256)
                         if self.weights_path else random_eva02(self._config, self.seed))
        return self._eva

    @property
    def source(self):
        """What a backend loads: EVA02 (the backends add the float32 softmax)."""
        return self.eva

    @property
    def sha256(self) -> str:
        """Of the EVA02 weights file; for a random network, of what defines it (config and seed)."""
        if self._weights_sha256:
            return self._weights_sha256
        return hashlib.sha256(f"eva02-random:{self.eva_config}:{self.seed}".encode()).hexdigest()

    @property
    def model_id(self) -> str:
        eva_id = (f"{self.weights_path.stem}@{self.sha256[:12]}" if self.trained
                  else f"eva02-random-untrained:random-init(seed={self.seed})")
        return f"{eva_id}+xgb:{self.xgboost_path.stem}@{self.xgboost_sha256[:12]}"

    @property
    def trained(self) -> bool:
        return self.weights_path is not None

    @property
    def threshold(self) -> float:
        from iws_engine.pipeline_a import PIPELINE_A_THRESHOLD

        return PIPELINE_A_THRESHOLD

    def reference_device(self, device: str) -> str:
        """EVA02-L's fp32 reference runs where the build runs (3.7 s per image on two CPU cores);
        on a GPU with TF32 off, so it is fp32 to the last bit the kernels allow."""
        return device

    def preprocess_png(self, blob: bytes, out: np.ndarray) -> np.ndarray:
        """One PNG's bytes through Pillow + timm preprocessing into `out`, float32 (3, S, S)."""
        from iws_engine.preprocess_clip import preprocess_clip_reference

        preprocess_clip_reference(blob, self.spec, out=out)
        return out

    def scores(self, outputs) -> np.ndarray:
        """Pipeline A probabilities from (n, 1000) softmax features."""
        scores = self.xgboost.predict(outputs)
        return scores.get() if hasattr(scores, "get") else np.asarray(scores)  # CuPy → host

    def loader(self, batch_size: int):
        from iws_engine.loaders.cpu import CpuLoader
        from iws_engine.pipeline_a import clip_png_preprocess

        return CpuLoader(None, batch_size=batch_size, preprocess_one=clip_png_preprocess(self.spec),
                         item_shape=self.input_shape)

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_id": self.model_id,
            "model_sha256": self.sha256,
            "weights": str(self.weights_path.resolve()) if self.weights_path else None,
            "random_seed": None if self.trained else self.seed,
            "eva_config": self.eva_config,
            "xgboost": str(self.xgboost_path.resolve()),
            "xgboost_sha256": self.xgboost_sha256,
            "trained": self.trained,
            "threshold": self.threshold,
            "preprocess": json.loads(self.spec.to_json()),
            "input": {"name": "input", "shape": ["batch", *self.input_shape], "dtype": "float32", "layout": "NCHW"},
            "output": {"name": "features", "shape": ["batch", *self.output_shape], "dtype": "float32",
                       "activation": "softmax (float32); the XGBoost stage gives the score"},
        }

    def same_model(self, manifest: dict) -> bool:
        return (manifest.get("model_sha256") == self.sha256 and manifest.get("xgboost_sha256") == self.xgboost_sha256
                and manifest.get("eva_config") == self.eva_config)

    @classmethod
    def from_manifest(cls, manifest: dict, xgboost_device: str = "cpu") -> "Eva02XgbTarget":
        from iws_engine.export.build import BuildError

        target = cls(manifest["weights"], manifest["xgboost"], eva_config=manifest["eva_config"],
                     seed=manifest.get("random_seed") or 0, xgboost_device=xgboost_device)
        if not target.same_model(manifest):
            raise BuildError(f"EVA02 weights {manifest['weights']} or XGBoost model {manifest['xgboost']} "
                             "changed since the build (sha256 differs)")
        return target


def target_from_manifest(manifest: dict, device: str = "cpu"):
    """The build target an artefact's manifest names (its files re-read and checked against it)."""
    if manifest.get("model") == Eva02XgbTarget.model:
        return Eva02XgbTarget.from_manifest(manifest, xgboost_device=device)
    return SarcnnTarget.from_manifest(manifest)
