"""Pipeline A of the paper: EVA02 (ImageNet-1k softmax as features) followed by an XGBoost classifier.

    from iws_engine.pipeline_a import EvaXgbClassifier
    with EvaXgbClassifier("pipeline_a_xgboost.json", weights="eva02_large.safetensors") as clf:
        for row in clf.classify(["/data/vignettes"]):
            print(row.path, row.score, row.decision, row.error)

Each PNG is decoded and preprocessed with Pillow semantics (`preprocess_clip_reference`) in the
CPU loader's thread pool, EVA02 + softmax runs on any inference backend (eager, inductor, ONNX
Runtime, TensorRT, or an artefact from `iws-engine build --model eva02xgb`), and the score is
the XGBoost probability. Without EVA02 weights the network is randomly initialised: rows then
carry a model_id containing "random-untrained", and their scores mean nothing.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from iws_engine.loaders.cpu import DEFAULT_MAX_PIXELS, CpuLoader, InputItem, PreprocessOne, StageTimes, load_clip_one
from iws_engine.outputs import Row
from iws_engine.pipeline import RunStats, rows_from_batches
from iws_engine.preprocess_clip import EVA02_L448_SPEC, ClipPreprocessSpec

#: Pipeline A's F1-optimal decision threshold: `optimal_threshold` (0.48000000000000015, the 0.48 step of
#: its sweep) in the paper's ../shared/reference/iws-gmd-2026/data/pipeline_a_gpu_evaluation.json.
PIPELINE_A_THRESHOLD = 0.48

EVA_CONFIGS = ("large", "tiny")  # "tiny": the same architecture at test size, for tests and smoke runs only
#: precisions per backend when EVA02 is loaded from weights (an artefact from `build` brings its own)
PRECISIONS = {"torch": ("fp32", "bf16", "fp16"), "inductor": ("fp32", "bf16", "fp16"), "onnxruntime": ("fp32",),
              "tensorrt": ("fp32", "tf32", "fp16", "bf16"), "torch-tensorrt": ("fp32", "fp16", "bf16")}


def eva02_config(name: str):
    """The EVA02 architecture by name: "large" (the paper's eva02_large_patch14_448) or "tiny"."""
    from iws_engine.export.models.eva02 import Eva02Config

    if name == "large":
        return Eva02Config()
    if name == "tiny":
        return Eva02Config.tiny()
    raise ValueError(f"unknown EVA02 config {name!r}; choose from {', '.join(EVA_CONFIGS)}")


def clip_spec_for(img_size: int) -> ClipPreprocessSpec:
    """The paper's CLIP preprocessing at the model's input size (448 for EVA02-L, smaller for tiny test models)."""
    return EVA02_L448_SPEC if img_size == EVA02_L448_SPEC.size else dataclasses.replace(EVA02_L448_SPEC, size=img_size)


def clip_png_preprocess(spec: ClipPreprocessSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreprocessOne:
    """A CpuLoader `preprocess_one` writing Pipeline A's input (Pillow load + `preprocess_clip_reference`)
    of a PNG into a (3, size, size) `out`; the rules and messages are `loaders.cpu.load_clip_one`'s."""

    def preprocess(item: InputItem, name: str, out: np.ndarray) -> StageTimes:
        return load_clip_one(item, name, spec, max_pixels, out)

    return preprocess


class EvaXgbClassifier:
    """Pipeline A (EVA02 → softmax → XGBoost) with the same surface as `iws_engine.Classifier`.

    `xgboost_model`: the paper's XGBoost JSON (550 trees on 1,000 features). `weights`: EVA02
    weights (timm/safetensors state dict); None gives a random network (throughput only).
    `eva_config`: "large" (the paper's model) or "tiny" (tests). `backend`: any of
    `iws_engine.backends` (torch eager, inductor, onnxruntime, tensorrt, torch-tensorrt) running
    EVA02 + softmax at `precision` on `device` (cpu or cuda[:N]). `artifacts`: a folder made by
    `iws-engine build --model eva02xgb` (its manifest names the weights, XGBoost model, backend
    and precision). On a GPU the softmax features stay on the device: the backend writes them
    into a device buffer and XGBoost predicts from it in place.
    """

    def __init__(self, xgboost_model: str | Path | None = None, weights: str | Path | None = None, *,
                 eva_config: str = "large", backend: str = "torch", device: str = "cpu", precision: str = "fp32",
                 batch_size: int | None = None, threshold: float | None = None, workers: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None, seed: int = 0,
                 artifacts: str | Path | None = None, loader: str | None = "cpu", target=None):
        import torch

        from iws_engine import backends
        from iws_engine.export.targets import Eva02XgbTarget

        if threads is not None:
            torch.set_num_threads(threads)
        # every CPU backend sizes its own thread pool; GPU backends take no thread count
        cpu_threads = {"threads": threads} if threads is not None and not str(device).startswith("cuda") else {}
        if artifacts is not None:
            from iws_engine.export.build import load_artifacts, read_manifest

            manifest = read_manifest(Path(artifacts))
            if manifest.get("model") != Eva02XgbTarget.model:
                raise ValueError(f"{artifacts}: holds a {manifest.get('model')} artefact, not eva02xgb")
            if weights is not None or xgboost_model is not None or target is not None:
                raise ValueError("--artifacts names its own weights and XGBoost model: give neither with it")
            self.backend, self.target, self.manifest = load_artifacts(Path(artifacts), device=device, **cpu_threads)
        else:
            if precision not in PRECISIONS.get(backend, ("fp32",)):
                raise ValueError(f"precision {precision!r} is not supported by eva02xgb on {backend}; choose from "
                                 f"{', '.join(PRECISIONS.get(backend, ('fp32',)))} (or build an artefact)")
            if target is not None and (weights is not None or xgboost_model is not None):
                raise ValueError("give either a target or weights/xgboost_model, not both")
            self.target = target or Eva02XgbTarget(weights, xgboost_model, eva_config=eva_config, seed=seed,
                                                   xgboost_device=device)
            self.manifest = None
            self.backend = backends.create(backend, precision=precision, device=device, **cpu_threads)
            self.backend.load(self.target.source, self.target.input_shape, self.target.output_shape)
        self.xgboost = self.target.xgboost
        self.spec = self.target.spec
        self.threshold = float(PIPELINE_A_THRESHOLD if threshold is None else threshold)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")
        self.device = torch.device(device)
        self.precision = self.backend.precision
        self.batch_size = batch_size = batch_size or (64 if self.device.type == "cuda" else 16)
        self.trained = self.target.trained
        self.model_id = self.target.model_id
        self.runtime = f"{self.backend.name} {self.precision} on {device} + XGBoost on {self.xgboost.device}"
        # the features buffer: on the GPU when XGBoost predicts there (no host round trip), else host memory
        shape = (batch_size, *self.target.output_shape)
        self._features = (torch.empty(shape, dtype=torch.float32, device=self.device) if self.xgboost.on_gpu
                          else np.empty(shape, np.float32))
        if loader in (None, "cpu"):
            self.loader = CpuLoader(None, batch_size=batch_size, workers=workers, max_pixels=max_pixels,
                                    preprocess_one=clip_png_preprocess(self.spec, max_pixels),
                                    item_shape=self.target.input_shape)
        else:  # the GPU loader with the CLIP spec (Pillow semantics on the device)
            from iws_engine.loaders import create_loader

            self.loader = create_loader(loader, self.spec, batch_size=batch_size, workers=workers,
                                        max_pixels=max_pixels, device=self.device.index or 0,
                                        host_output=self.device.type != "cuda")
        self.last_stats = RunStats()
        self.xgboost_seconds = 0.0  # wall time spent in the XGBoost stage (the share the paper's protocol asks for)

    @property
    def eva(self):
        return self.target.eva

    def features(self, inputs):
        """EVA02's 1,000 softmax outputs for up to `batch_size` preprocessed (N, 3, S, S) inputs, float32
        (a view of this classifier's buffer: a torch CUDA tensor on the GPU path, else NumPy)."""
        out = self._features[:inputs.shape[0]]
        self.backend.infer(inputs, out)
        return out

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Pipeline A probabilities (N,) float32 for preprocessed (N, 3, S, S) inputs."""
        import torch

        out = np.empty((inputs.shape[0],), np.float32)
        for i in range(0, inputs.shape[0], self.batch_size):
            features = self.features(inputs[i:i + self.batch_size])
            if self.device.type == "cuda":
                # the backend returns once EVA02's kernels are queued: wait for them here, so that
                # `xgboost_seconds` is XGBoost's time alone (the wait moves, it does not grow: the
                # scores are read on the host right after)
                torch.cuda.synchronize(self.device)
            t0 = time.perf_counter()
            scores = self.xgboost.predict(features)
            out[i:i + self.batch_size] = scores.get() if hasattr(scores, "get") else scores  # CuPy → host
            self.xgboost_seconds += time.perf_counter() - t0
        return out

    def classify(self, inputs: Iterable[str | Path | bytes], stats: RunStats | None = None) -> Iterator[Row]:
        """One row per input (files, directories expanded, or PNG bytes), in order; errors are rows."""
        from iws_engine.api import _expand_mixed

        self.last_stats = stats if stats is not None else RunStats()
        return rows_from_batches(self.loader.batches(_expand_mixed(inputs)), self.predict, threshold=self.threshold,
                                 model_id=self.model_id, stats=self.last_stats)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "EvaXgbClassifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
