"""Pipeline A of the paper: EVA02 (ImageNet-1k softmax as features) followed by an XGBoost classifier.

    from iws_engine.pipeline_a import EvaXgbClassifier
    with EvaXgbClassifier("pipeline_a_xgboost.json", weights="eva02_large.safetensors") as clf:
        for row in clf.classify(["/data/vignettes"]):
            print(row.path, row.score, row.decision, row.error)

Each PNG is decoded and preprocessed with Pillow semantics (`preprocess_clip_reference`) in the
CPU loader's thread pool, EVA02 runs in torch eager (fp32, or bf16 autocast), and the score is
the XGBoost probability. Without EVA02 weights the network is randomly initialised: rows then
carry a model_id containing "random-untrained", and their scores mean nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from iws_engine.loaders.cpu import DEFAULT_MAX_PIXELS, CpuLoader, InputItem, PreprocessOne, StageTimes, read_input
from iws_engine.outputs import Row
from iws_engine.pipeline import RunStats, rows_from_batches
from iws_engine.preprocess_clip import EVA02_L448_SPEC, ClipPreprocessSpec

#: Pipeline A's F1-optimal decision threshold: `optimal_threshold` (0.48000000000000015, the 0.48 step of
#: its sweep) in the paper's ../shared/reference/iws-gmd-2026/data/pipeline_a_gpu_evaluation.json.
PIPELINE_A_THRESHOLD = 0.48

EVA_CONFIGS = ("large", "tiny")  # "tiny": the same architecture at test size, for tests and smoke runs only
PRECISIONS = ("fp32", "bf16")


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
    """A CpuLoader `preprocess_one` writing `preprocess_clip_reference` of a PNG into a (3, size, size) `out`."""
    from PIL import Image

    from iws_engine.loaders.png import PngError
    from iws_engine.preprocess_clip import load_rgb, preprocess_clip_reference

    def preprocess(item: InputItem, name: str, out: np.ndarray) -> StageTimes:
        import io

        t = StageTimes()
        t0 = time.perf_counter()
        data = read_input(item, name)
        t1 = time.perf_counter()
        try:
            with Image.open(io.BytesIO(bytes(data))) as img:
                if img.format != "PNG":  # Pillow opens JPEG, GIF, ...: the engine's inputs are PNG only
                    raise PngError(f"not a PNG file (Pillow reads it as {img.format})", path=name)
                if img.width * img.height > max_pixels:  # decompression bombs: refuse before decoding
                    raise PngError(f"{img.width}x{img.height} exceeds --max-pixels {max_pixels}", path=name)
                rgb = load_rgb(img)
        except PngError:
            raise
        except Image.UnidentifiedImageError:
            raise PngError("not a PNG file (Pillow cannot identify it)", path=name) from None
        except Image.DecompressionBombError as e:
            raise PngError(f"refused by Pillow ({e})", path=name) from None
        except (OSError, SyntaxError, ValueError) as e:  # what Pillow raises for unreadable/truncated files
            raise PngError(f"cannot decode PNG ({type(e).__name__}: {e})", path=name) from None
        t2 = time.perf_counter()
        preprocess_clip_reference(rgb, spec, out=out)
        t.read, t.decode, t.preprocess = t1 - t0, t2 - t1, time.perf_counter() - t2
        return t

    return preprocess


def _file_id(path: Path) -> str:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"{path.stem}@{digest[:12]}"


class EvaXgbClassifier:
    """Pipeline A (EVA02 → softmax → XGBoost) with the same surface as `iws_engine.Classifier`.

    `xgboost_model`: the paper's XGBoost JSON (550 trees on 1,000 features). `weights`: EVA02
    weights (timm/safetensors state dict); None gives a random network (throughput only).
    `eva_config`: "large" (the paper's model) or "tiny" (tests). `device`: cpu or cuda[:N].
    """

    def __init__(self, xgboost_model: str | Path, weights: str | Path | None = None, *, eva_config: str = "large",
                 device: str = "cpu", precision: str = "fp32", batch_size: int | None = None, threshold: float | None = None,
                 workers: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, threads: int | None = None,
                 seed: int = 0):
        import torch

        from iws_engine.export.models.eva02 import load_eva02_weights, random_eva02
        from iws_engine.xgboost_stage import XGBoostStage

        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not supported by eva02xgb; choose from {', '.join(PRECISIONS)}")
        self.threshold = float(PIPELINE_A_THRESHOLD if threshold is None else threshold)
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")
        if threads is not None:
            torch.set_num_threads(threads)
        config = eva02_config(eva_config)
        self.spec = clip_spec_for(config.img_size)
        self.xgboost = XGBoostStage(xgboost_model, device=device, nthread=threads)  # checks the model file first
        self.eva = load_eva02_weights(weights, config) if weights is not None else random_eva02(config, seed=seed)
        self.device = torch.device(device)
        self.eva.model.to(self.device)
        self.precision = precision
        self.batch_size = batch_size = batch_size or 16  # EVA02-L activations: keep CPU batches small
        self.trained = self.eva.trained
        self.model_id = f"{self.eva.model_id}+xgb:{_file_id(Path(xgboost_model))}"
        self.runtime = f"torch-eager {precision} on {device}"
        self.loader = CpuLoader(None, batch_size=batch_size, workers=workers, max_pixels=max_pixels,
                                preprocess_one=clip_png_preprocess(self.spec, max_pixels),
                                item_shape=(3, self.spec.size, self.spec.size))
        self.last_stats = RunStats()

    def features(self, inputs: np.ndarray):
        """EVA02's 1,000 softmax outputs for preprocessed (N, 3, S, S) inputs, float32, on the model's device."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32)).to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16,
                                                    enabled=self.precision == "bf16"):
            probs = self.eva.model.probabilities(x)
        return probs.float()  # XGBoost reads float32; under autocast the softmax may come out in bf16

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Pipeline A probabilities (N,) float32 for preprocessed (N, 3, S, S) inputs."""
        out = np.empty((inputs.shape[0],), np.float32)
        for i in range(0, inputs.shape[0], self.batch_size):
            scores = self.xgboost.predict(self.features(inputs[i:i + self.batch_size]))
            out[i:i + self.batch_size] = scores.get() if hasattr(scores, "get") else scores  # CuPy → host
        return out

    def classify(self, inputs: Iterable[str | Path | bytes], stats: RunStats | None = None) -> Iterator[Row]:
        """One row per input (files, directories expanded, or PNG bytes), in order; errors are rows."""
        from iws_engine.api import _expand_mixed

        self.last_stats = stats if stats is not None else RunStats()
        return rows_from_batches(self.loader.batches(_expand_mixed(inputs)), self.predict, threshold=self.threshold,
                                 model_id=self.model_id, stats=self.last_stats)

    def close(self) -> None:
        pass  # nothing held beyond memory; here for the Classifier surface

    def __enter__(self) -> "EvaXgbClassifier":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
