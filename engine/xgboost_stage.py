"""Pipeline A's classifier stage: the paper's trained XGBoost model on EVA02's 1,000 softmax outputs.

The model file (XGBoost JSON) is checked against what the paper describes: binary:logistic, 550
trees, 1,000 features. On `device="cuda"` the booster predicts in place on the device array the
features already live in (CuPy, or a torch CUDA tensor handed over through DLPack), so nothing
goes through the host; where xgboost has no CUDA build, CuPy is missing or no GPU is visible, the
stage falls back to the CPU predictor and logs why. xgboost is imported lazily: the rest of the
engine works without it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: What the paper's Pipeline A model is (../shared/reference/iws-gmd-2026/models/pipeline_a_xgboost.json).
PIPELINE_A_TREES = 550
PIPELINE_A_FEATURES = 1000
PIPELINE_A_OBJECTIVE = "binary:logistic"


@dataclass(frozen=True)
class BoosterFacts:
    """What a loaded model file says about itself."""

    trees: int  # boosted rounds
    features: int
    objective: str
    base_score: float  # in probability space; the margin offset is logit(base_score) for binary:logistic
    xgboost_version: str  # of the library that loaded it


def _parse_base_score(text: str) -> float:
    """XGBoost >= 3 writes "[5E-1]" (a vector, one per target); 2.x writes "5E-1"."""
    values = json.loads(text) if text.startswith("[") else [float(text)]
    if len(values) != 1:
        raise ValueError(f"expected one base_score for a binary model, got {values}")
    return float(values[0])


def booster_facts(booster: Any) -> BoosterFacts:
    import xgboost

    config = json.loads(booster.save_config())["learner"]
    return BoosterFacts(
        trees=booster.num_boosted_rounds(),
        features=booster.num_features(),
        objective=config["objective"]["name"],
        base_score=_parse_base_score(config["learner_model_param"]["base_score"]),
        xgboost_version=xgboost.__version__,
    )


def cuda_unavailable_reason() -> str | None:
    """Why the GPU predictor cannot run here, or None when it can."""
    try:
        import xgboost
    except ImportError:
        return "xgboost is not installed"
    if not xgboost.build_info().get("USE_CUDA", False):
        return f"xgboost {xgboost.__version__} is a CPU-only build (e.g. the xgboost-cpu wheel)"
    try:
        import cupy
    except ImportError:
        return "cupy is not installed (xgboost returns GPU predictions as CuPy arrays)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError without a driver; its type lives in cupy_backends
        return f"no usable CUDA device ({type(e).__name__}: {e})"
    if count < 1:
        return "no CUDA device is visible"
    return None


def _is_cuda_array(x: Any) -> bool:
    return hasattr(x, "__cuda_array_interface__")


def _is_torch_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch") and hasattr(x, "is_cuda")


class XGBoostStage:
    """Probabilities from Pipeline A's XGBoost model; `device` is "cpu", "cuda" or "cuda:N".

    `predict` takes (n, features) float features: NumPy (or a CPU torch tensor) returns a NumPy
    float32 (n,); a CUDA array (CuPy, torch, anything with `__cuda_array_interface__`) returns a
    CuPy float32 (n,) on the same device when the stage runs on the GPU.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        device: str = "cpu",
        *,
        nthread: int | None = None,
        expect_trees: int = PIPELINE_A_TREES,
        expect_features: int = PIPELINE_A_FEATURES,
        expect_objective: str = PIPELINE_A_OBJECTIVE,
    ):
        import xgboost

        if device != "cpu" and not device.startswith("cuda"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ValueError(f"{self.model_path}: no such XGBoost model file")
        self.booster = xgboost.Booster()
        try:
            self.booster.load_model(str(self.model_path))
        except xgboost.core.XGBoostError as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{self.model_path}: not a loadable XGBoost model ({first_line})") from None
        self.facts = booster_facts(self.booster)
        expected = (expect_trees, expect_features, expect_objective)
        got = (self.facts.trees, self.facts.features, self.facts.objective)
        if got != expected:
            raise ValueError(
                f"{self.model_path}: (trees, features, objective) = {got}, expected {expected} "
                "for Pipeline A's classifier"
            )

        self.requested_device = device
        self.fallback_reason: str | None = None
        if device.startswith("cuda"):
            self.fallback_reason = cuda_unavailable_reason()
            if self.fallback_reason:
                logger.warning("XGBoost stage: %s requested, using the CPU predictor: %s", device, self.fallback_reason)
        self.device = "cpu" if self.fallback_reason or device == "cpu" else device
        params: dict[str, Any] = {"device": self.device}
        if nthread is not None:
            params["nthread"] = int(nthread)
        self.booster.set_param(params)
        self._warned_host_copy = False

    @property
    def on_gpu(self) -> bool:
        return self.device != "cpu"

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if len(shape) != 2 or shape[1] != self.facts.features:
            raise ValueError(f"expected (n, {self.facts.features}) features, got shape {tuple(shape)}")

    def predict(self, features: Any) -> Any:
        """Class-1 probabilities, float32 (n,); see the class docstring for the array types."""
        if _is_cuda_array(features) or (_is_torch_tensor(features) and features.is_cuda):
            if self.on_gpu:
                return self._predict_on_device(features)
            features = self._copy_to_host(features)
        elif _is_torch_tensor(features):
            features = features.detach().numpy()
        host = np.ascontiguousarray(features, dtype=np.float32)
        self._check_shape(host.shape)
        if self.on_gpu:  # host in, host out: one explicit upload, as XGBoost would do itself
            import cupy

            with cupy.cuda.Device(self._device_ordinal()):
                return cupy.asnumpy(self.booster.inplace_predict(cupy.asarray(host))).astype(np.float32, copy=False)
        return np.asarray(self.booster.inplace_predict(host), dtype=np.float32)

    def _device_ordinal(self) -> int:
        return int(self.device.partition(":")[2] or 0)

    def _predict_on_device(self, features: Any) -> Any:
        import cupy

        with cupy.cuda.Device(self._device_ordinal()):
            # torch: DLPack makes CuPy's stream wait for torch's pending work on the tensor (no host sync);
            # others: a zero-copy view through __cuda_array_interface__.
            array = cupy.from_dlpack(features) if _is_torch_tensor(features) else cupy.asarray(features)
            self._check_shape(array.shape)
            array = cupy.ascontiguousarray(array, dtype=cupy.float32)  # a device-side copy only if needed
            return self.booster.inplace_predict(array).astype(cupy.float32, copy=False)

    def _copy_to_host(self, features: Any) -> np.ndarray:
        if not self._warned_host_copy:
            why = self.fallback_reason or "device='cpu'"
            logger.warning("XGBoost stage runs on the CPU (%s): copying device features to the host", why)
            self._warned_host_copy = True
        if _is_torch_tensor(features):
            return features.detach().cpu().numpy()
        if hasattr(features, "get"):  # CuPy
            return features.get()
        import cupy

        return cupy.asnumpy(cupy.asarray(features))
