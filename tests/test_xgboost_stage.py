"""engine/xgboost_stage.py on the paper's real Pipeline A model (../shared/reference, CPU in CI).

Predictions are checked against an evaluator written here that walks the model's JSON trees
itself, so the figures do not rest on XGBoost alone. The GPU test runs in the device script.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache

import numpy as np
import pytest

from tests.conftest import XGBOOST_MODEL, require

xgboost = pytest.importorskip("xgboost", reason="xgboost (the xgboost-cpu wheel in CI) is not installed")

from iws_engine.xgboost_stage import XGBoostStage, cuda_unavailable_reason  # noqa: E402


@pytest.fixture(scope="module")
def model_path():
    return require(XGBOOST_MODEL)


@pytest.fixture(scope="module")
def cpu_stage(model_path) -> XGBoostStage:
    return XGBoostStage(model_path, device="cpu", nthread=2)


def softmax_like_features(n: int, seed: int = 0) -> np.ndarray:
    """EVA02 softmax outputs look like Dirichlet draws: mostly peaked, some flat."""
    rng = np.random.default_rng(seed)
    peaked = rng.dirichlet(np.full(1000, 0.02), size=n // 2)
    flat = rng.dirichlet(np.ones(1000), size=n - n // 2)
    return np.vstack([peaked, flat]).astype(np.float32)


# --- an independent evaluator of the JSON model ------------------------------------------------------------


@lru_cache(maxsize=1)
def json_model(path_text: str) -> dict:
    with open(path_text) as fh:
        return json.load(fh)


def walk_trees(model: dict, features: np.ndarray) -> np.ndarray:
    """Probabilities from the JSON trees: numeric splits go left when x < condition (float32 compare),
    missing (NaN) follows default_left; a leaf's value is its split_condition; margin = sum of leaves
    + logit(base_score) (XGBoost >= 2 stores base_score as a probability); then the sigmoid."""
    learner = model["learner"]
    trees = learner["gradient_booster"]["model"]["trees"]
    base_text = learner["learner_model_param"]["base_score"]
    base_score = float(json.loads(base_text)[0] if base_text.startswith("[") else base_text)
    margin = np.full(features.shape[0], np.log(base_score / (1.0 - base_score)))
    rows = np.arange(features.shape[0])
    for tree in trees:
        left = np.asarray(tree["left_children"])
        right = np.asarray(tree["right_children"])
        feature = np.asarray(tree["split_indices"])
        condition = np.asarray(tree["split_conditions"], dtype=np.float32)
        default_left = np.asarray(tree["default_left"], dtype=bool)
        assert set(tree["split_type"]) <= {0}, "categorical splits are not handled by this walker"
        node = np.zeros(features.shape[0], dtype=np.int64)
        while True:
            inner = left[node] != -1
            if not inner.any():
                break
            n = node[inner]
            x = features[rows[inner], feature[n]]
            go_left = np.where(np.isnan(x), default_left[n], x < condition[n])
            node[inner] = np.where(go_left, left[n], right[n])
        margin += condition[node].astype(np.float64)
    return 1.0 / (1.0 + np.exp(-margin))


# --- the model file ------------------------------------------------------------------------------------------


def test_model_file_is_what_the_paper_describes(cpu_stage: XGBoostStage, model_path) -> None:
    facts = cpu_stage.facts
    assert (facts.trees, facts.features, facts.objective) == (550, 1000, "binary:logistic")
    assert facts.base_score == 0.5
    # the same facts read straight from the JSON
    learner = json_model(str(model_path))["learner"]
    assert len(learner["gradient_booster"]["model"]["trees"]) == 550
    assert learner["learner_model_param"]["num_feature"] == "1000"
    assert learner["objective"]["name"] == "binary:logistic"


def test_unexpected_model_shapes_are_refused(model_path) -> None:
    with pytest.raises(ValueError, match=r"\(trees, features, objective\) = \(550, 1000, 'binary:logistic'\)"):
        XGBoostStage(model_path, expect_trees=551)
    with pytest.raises(ValueError, match="expected"):
        XGBoostStage(model_path, expect_features=1001)


def test_unloadable_files_name_the_problem(tmp_path) -> None:
    with pytest.raises(ValueError, match="no such XGBoost model file"):
        XGBoostStage(tmp_path / "absent.json")
    junk = tmp_path / "junk.json"
    junk.write_text('{"not": "a model"}')
    with pytest.raises(ValueError, match="not a loadable XGBoost model"):
        XGBoostStage(junk)


# --- predictions ---------------------------------------------------------------------------------------------


def test_predictions_equal_an_independent_tree_walk(cpu_stage: XGBoostStage, model_path) -> None:
    features = softmax_like_features(64)
    got = cpu_stage.predict(features)
    assert got.dtype == np.float32 and got.shape == (64,)
    expected = walk_trees(json_model(str(model_path)), features)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert got.min() < 0.2 and got.max() > 0.8  # the inputs reach both classes


def test_split_boundaries_and_missing_values_follow_xgboost(cpu_stage: XGBoostStage, model_path) -> None:
    """x == condition goes right (x < condition is false); NaN takes the node's default direction."""
    model = json_model(str(model_path))
    trees = model["learner"]["gradient_booster"]["model"]["trees"][:8]
    roots = [(tree["split_indices"][0], np.float32(tree["split_conditions"][0])) for tree in trees]
    features = softmax_like_features(len(roots) * 2, seed=1)
    for i, (feature, condition) in enumerate(roots):
        features[2 * i, feature] = condition  # exactly on the threshold
        features[2 * i + 1, feature] = np.nan
    got = cpu_stage.predict(features)
    np.testing.assert_allclose(got, walk_trees(model, features), rtol=0, atol=1e-6)
    # the boundary matters: one float32 step below each threshold changes every such prediction
    nudged = features.copy()
    for i, (feature, condition) in enumerate(roots):
        nudged[2 * i, feature] = np.nextafter(condition, np.float32(-1))
    assert np.all(np.abs(cpu_stage.predict(nudged) - got)[0::2] > 1e-4)


def test_inplace_predict_equals_dmatrix_predict(cpu_stage: XGBoostStage) -> None:
    features = softmax_like_features(32, seed=2)
    inplace = cpu_stage.booster.inplace_predict(features)
    via_dmatrix = cpu_stage.booster.predict(xgboost.DMatrix(features))
    np.testing.assert_array_equal(inplace, via_dmatrix)
    np.testing.assert_array_equal(cpu_stage.predict(features), via_dmatrix)


def test_accepts_float64_and_torch_cpu_input(cpu_stage: XGBoostStage) -> None:
    torch = pytest.importorskip("torch")
    features = softmax_like_features(8, seed=3)
    expected = cpu_stage.predict(features)
    np.testing.assert_array_equal(cpu_stage.predict(features.astype(np.float64)), expected)
    np.testing.assert_array_equal(cpu_stage.predict(torch.from_numpy(features)), expected)


def test_wrong_feature_shape_is_refused(cpu_stage: XGBoostStage) -> None:
    with pytest.raises(ValueError, match=r"expected \(n, 1000\) features"):
        cpu_stage.predict(np.zeros((2, 999), np.float32))
    with pytest.raises(ValueError, match=r"expected \(n, 1000\) features"):
        cpu_stage.predict(np.zeros(1000, np.float32))


def test_cuda_request_without_a_gpu_falls_back_to_cpu_and_says_why(model_path, caplog) -> None:
    reason = cuda_unavailable_reason()
    if reason is None:
        pytest.skip("the GPU predictor is available here; the fallback is not exercised")
    with caplog.at_level(logging.WARNING, logger="iws_engine.xgboost_stage"):
        stage = XGBoostStage(model_path, device="cuda", nthread=2)
    assert stage.device == "cpu" and stage.requested_device == "cuda" and stage.fallback_reason == reason
    assert reason in caplog.text and "CPU predictor" in caplog.text
    features = softmax_like_features(16, seed=4)
    np.testing.assert_array_equal(stage.predict(features), XGBoostStage(model_path, nthread=2).predict(features))


def test_invalid_device_is_refused(model_path) -> None:
    with pytest.raises(ValueError, match="device must be"):
        XGBoostStage(model_path, device="gpu")


@pytest.mark.gpu
def test_gpu_predictor_on_device_arrays_equals_cpu(model_path) -> None:
    reason = cuda_unavailable_reason()
    if reason:
        pytest.skip(f"GPU predictor unavailable: {reason}")
    import cupy

    gpu = XGBoostStage(model_path, device="cuda")
    assert gpu.device == "cuda" and gpu.fallback_reason is None
    features = softmax_like_features(256, seed=5)
    expected = XGBoostStage(model_path, device="cpu").predict(features)

    on_device = cupy.asarray(features)
    got = gpu.predict(on_device)
    assert isinstance(got, cupy.ndarray) and got.dtype == cupy.float32  # stayed on the device
    np.testing.assert_allclose(cupy.asnumpy(got), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(gpu.predict(features), expected, rtol=0, atol=1e-6)  # host in, host out

    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        from_torch = gpu.predict(torch.from_numpy(features).cuda())
        assert isinstance(from_torch, cupy.ndarray)
        np.testing.assert_allclose(cupy.asnumpy(from_torch), expected, rtol=0, atol=1e-6)
