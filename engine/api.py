"""The Python API for embedding the engine in a worker.

    from iws_engine import Classifier
    with Classifier() as clf:                       # embedded default model, ONNX Runtime on the CPU
        for row in clf.classify(["/data/vignettes"]):
            print(row.path, row.score, row.decision, row.error)
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from iws_engine import backends
from iws_engine.backends.base import sigmoid
from iws_engine.export.artifact_cache import needs_artefact
from iws_engine.loaders import create_loader, default_loader_name
from iws_engine.loaders.cpu import DEFAULT_MAX_PIXELS
from iws_engine.outputs import Row
from iws_engine.pipeline import RunStats, expand_inputs, score_batches


class Classifier:
    """A loaded model + backend + loader; reuse it for many calls (loading costs more than a batch)."""

    def __init__(self, weights: str | Path | None = None, *, backend: str = "onnxruntime", device: str = "cpu",
                 precision: str = "fp32", batch_size: int | None = None, threshold: float | None = None,
                 workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, artifacts: str | Path | None = None,
                 loader: str | None = None, threads: int | None = None):
        """`loader`: "cpu", "gpu" or "dali"; None picks "gpu" where it can run (CUDA, CuPy, nvCOMP), else "cpu".
        `threads`: the backend's CPU threads (default: all cores).
        `batch_size`: default 16 on the CPU (decoding overlaps inference best; measured in
        bench/results) and 256 on a GPU."""
        from iws_engine.export import weights as weights_io

        if artifacts is None and needs_artefact(backend, precision, device):
            # the fast CPU precisions run only once gated on this model: built once, then cached
            from iws_engine.export.artifact_cache import cached_artifacts
            from iws_engine.export.targets import SarcnnTarget

            artifacts = cached_artifacts(SarcnnTarget(weights), backend, precision, device)
        on_gpu = str(device).startswith("cuda")
        # CPU threads are the caller's to size (e.g. one per reprocess worker); GPU backends take none
        options = {"threads": threads} if threads is not None and not on_gpu else {}
        if artifacts is not None:
            # a built, parity-checked artefact (iws-engine build): its manifest names weights and backend
            from iws_engine.export.build import load_artifacts

            self.backend, target, self.manifest = load_artifacts(Path(artifacts), device=device, **options)
            if target.model != "sarcnn":
                raise ValueError(f"{artifacts}: holds a {target.model} artefact; use "
                                 "iws_engine.pipeline_a.EvaXgbClassifier(artifacts=...) for it")
            self.weights = target.loaded
        else:
            path = Path(weights) if weights is not None else weights_io.default_weights_path()
            self.weights = weights_io.load(path)
            self.manifest = None
        self.meta = self.weights.meta
        self.spec = self.meta.preprocess
        self.threshold = float(self.meta.threshold if threshold is None else threshold)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")
        self.model_id = self.weights.model_id
        batch_size = batch_size or default_batch_size(device)
        self.batch_size = batch_size
        if self.manifest is None:
            self.backend = backends.create(backend, precision=precision, device=device, **options)
            self.backend.load(self.weights, (self.spec.channels, *self.spec.size))
        cuda_index = int(str(device).partition(":")[2] or 0) if on_gpu else 0
        # a backend on the CPU gets its inputs copied back to the host (the decode still runs on the GPU)
        # the CPU loader writes its batches in the element type the backend takes (bfloat16 for inductor bf16)
        loader_options = {"input_dtype": self.backend.input_dtype} \
            if self.backend.input_dtype != "float32" and (loader or default_loader_name()) == "cpu" else {}
        self.loader = create_loader(loader, self.spec, batch_size=batch_size, workers=workers, max_pixels=max_pixels,
                                    device=cuda_index, host_output=not on_gpu, **loader_options)
        self.last_stats = RunStats()

    def classify(self, inputs: Iterable[str | Path | bytes], stats: RunStats | None = None) -> Iterator[Row]:
        """One row per input (files, directories expanded, or PNG bytes), in order; errors are rows."""
        self.last_stats = stats if stats is not None else RunStats()
        return score_batches(self.loader.batches(_expand_mixed(inputs)), self.backend, threshold=self.threshold,
                             model_id=self.model_id, stats=self.last_stats)

    @property
    def trained(self) -> bool:
        """False for randomly initialised weights: throughput is meaningful, scores are not."""
        return bool(self.meta.trained)

    @property
    def runtime(self) -> str:
        return f"{self.backend.name} {self.backend.precision}"

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Probabilities for already preprocessed inputs (N, C, H, W) float32."""
        out = np.empty((inputs.shape[0],), np.float32)
        for i in range(0, inputs.shape[0], self.batch_size):
            self.backend.infer(inputs[i:i + self.batch_size], out[i:i + self.batch_size])
        return sigmoid(out)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "Classifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def default_batch_size(device: str) -> int:
    return 256 if str(device).startswith("cuda") else 16


def _expand_mixed(inputs):
    for x in inputs:
        if isinstance(x, (bytes, bytearray, memoryview)):
            yield x
        else:
            yield from expand_inputs([x])


def classify(inputs: Iterable[str | Path | bytes], **options) -> list[Row]:
    """One-shot convenience: classify `inputs` with a fresh Classifier(**options)."""
    with Classifier(**options) as clf:
        return list(clf.classify(inputs))
