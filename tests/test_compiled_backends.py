"""Compiled backends: inductor (CPU here, CUDA graphs on the GPU), TensorRT seams, Torch-TensorRT.

TensorRT is never faked: its pure seams (profiles, precision flags, calibration batching and
cache, quantization checks, manifest binding) are tested here; what needs the real library is
marked `gpu` and skips with the reason when TensorRT or a CUDA device is absent.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from iws_engine import backends
from iws_engine.backends.base import BackendError, sigmoid
from iws_engine.backends.torch_support import plan_graph_batch
from iws_engine.backends.tensorrt import (
    CalibrationCache,
    CalibrationStream,
    ProfileSpec,
    check_quantization,
    precision_flags,
)
from iws_engine.export import build
from iws_engine.export import weights as weights_io
from iws_engine.export.targets import SarcnnTarget

SMALL_INPUT = (1, 64, 64)  # SAR_CNN pools globally, so a small input keeps CPU runs short


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


needs_cuda = pytest.mark.skipif(not _cuda_available(), reason="needs a CUDA device: torch.cuda.is_available() is False")
needs_tensorrt = pytest.mark.skipif(not _importable("tensorrt"), reason="TensorRT is not installed (import tensorrt)")


def _eager_logits(weights_path, x: np.ndarray) -> np.ndarray:
    reference = backends.create("torch", precision="fp32", device="cpu")
    with reference.load(weights_io.load(weights_path), x.shape[1:]):
        return reference.infer(x).copy()


# ----------------------------------------------------------------------------- inductor
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # torch-internal
def test_inductor_cpu_matches_eager_fp32(random_weights):
    x = np.random.default_rng(0).standard_normal((2, *SMALL_INPUT)).astype(np.float32)
    with backends.create("inductor", precision="fp32", device="cpu").load(weights_io.load(random_weights),
                                                                           SMALL_INPUT) as compiled:
        got = compiled.infer(x).copy()
        info = compiled.info()
    want = _eager_logits(random_weights, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert np.max(np.abs(sigmoid(got) - sigmoid(want))) <= 1e-4
    assert info["compile_mode"] == "default" and info["cuda_graphs"] is False


def test_inductor_refuses_bad_options():
    with pytest.raises(BackendError, match="unsupported precision 'int8'"):
        backends.create("inductor", precision="int8")
    with pytest.raises(BackendError, match="unknown torch.compile mode"):
        backends.create("inductor", mode="fastest")
    with pytest.raises(BackendError, match="CUDA graphs need a CUDA device"):
        backends.create("inductor", device="cpu", cuda_graphs=True)
    with pytest.raises(BackendError, match="captures its own CUDA graphs"):
        backends.create("inductor", device="cuda", mode="reduce-overhead", cuda_graphs=True)


def test_graph_batch_plan():
    assert plan_graph_batch(64, [], max_graphs=4) == 64  # first sight: capture
    assert plan_graph_batch(64, [64], max_graphs=4) == 64  # replay
    assert plan_graph_batch(40, [64, 512], max_graphs=4) == 64  # partial batch padded (1.6x)
    assert plan_graph_batch(20, [64], max_graphs=4) == 20  # padding 3.2x is too wasteful: own graph
    assert plan_graph_batch(20, [64, 512], max_graphs=2) is None  # no room: run without a graph


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_inductor_cuda_graphs_match_eager(random_weights, precision):
    """Reduced precision + captured graphs (full and padded partial batches) against fp32 eager on the CPU."""
    spec_shape = (1, 256, 256)
    x = np.random.default_rng(1).standard_normal((40, *spec_shape)).astype(np.float32)
    want = sigmoid(_eager_logits(random_weights, x))
    with backends.create("inductor", precision=precision, device="cuda").load(weights_io.load(random_weights),
                                                                               spec_shape) as compiled:
        got = np.empty(len(x), np.float32)
        compiled.infer(x[:16], got[:16])  # captures the 16-graph
        compiled.infer(x[16:32], got[16:32])  # replays it
        compiled.infer(x[32:40], got[32:40])  # 8 rows: padded into the 16-graph (2x)
        info = compiled.info()
    assert info["graph_batch_sizes"] == [16] and not info["graph_failures"]
    assert np.max(np.abs(sigmoid(got) - want)) <= build.PARITY_TOLERANCE[precision]


@pytest.mark.gpu
@needs_cuda
def test_inductor_device_input_has_no_host_copy(random_weights):
    import torch
    from torch.profiler import ProfilerActivity, profile

    spec_shape = (1, 256, 256)
    host = np.random.default_rng(2).standard_normal((8, *spec_shape)).astype(np.float32)
    device_batch = torch.from_numpy(host).cuda()
    with backends.create("inductor", precision="fp16", device="cuda").load(weights_io.load(random_weights),
                                                                           spec_shape) as compiled:
        warm = compiled.infer(device_batch).copy()  # capture outside the profiled region
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            got = compiled.infer(device_batch).copy()
            torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    assert not [n for n in names if "HtoD" in n], "a device input must not be copied through the host"
    assert [n for n in names if "DtoH" in n], "the profiler saw no copies at all: the check would be vacuous"
    np.testing.assert_array_equal(got, warm)
    assert np.max(np.abs(sigmoid(got) - sigmoid(_eager_logits(random_weights, host)))) <= 5e-3


# ----------------------------------------------------------------------------- TensorRT seams
def test_profile_spec_shapes():
    spec = ProfileSpec.from_batch(1, 64, 4096, (1, 256, 256))
    assert spec.shapes == ((1, 1, 256, 256), (64, 1, 256, 256), (4096, 1, 256, 256))
    assert spec.max_batch == 4096
    for bad in ((0, 1, 2), (4, 2, 8), (1, 9, 8)):
        with pytest.raises(ValueError, match="1 <= min <= opt <= max"):
            ProfileSpec.from_batch(*bad, (1, 256, 256))


def test_precision_flags():
    assert precision_flags("fp32", "9.0") == []
    assert precision_flags("tf32", "9.0") == ["TF32"]
    assert precision_flags("fp16", (7, 5)) == ["FP16"]
    assert precision_flags("bf16", "8.0") == ["BF16"]
    assert precision_flags("int8", "8.6") == ["INT8", "FP16"]
    assert precision_flags("fp8", "8.9") == ["FP8"]
    assert precision_flags("fp8", (9, 0)) == ["FP8"]
    with pytest.raises(BackendError, match=r"fp8 needs compute capability >= 8\.9 .*this GPU has 8\.6"):
        precision_flags("fp8", "8.6")
    with pytest.raises(BackendError, match=r"fp8 needs compute capability >= 8\.9 .*this GPU has 8\.0"):
        precision_flags("fp8", (8, 0))
    with pytest.raises(BackendError, match=r"bf16 needs compute capability >= 8\.0"):
        precision_flags("bf16", "7.5")
    with pytest.raises(BackendError, match="unknown precision 'int4'"):
        precision_flags("int4", "9.0")


def _chunks(sizes, start=0, shape=(1, 2, 2)):
    """Arrays of the given lengths whose images are numbered consecutively (value = image index)."""
    out, k = [], start
    for n in sizes:
        out.append(np.arange(k, k + n, dtype=np.float32)[:, None, None, None] * np.ones((1, *shape), np.float32))
        k += n
    return out


def _ids(batch: np.ndarray) -> list[int]:
    return [int(v) for v in batch[:, 0, 0, 0]]


def test_calibration_stream_rebatches_and_pads_with_repeats():
    stream = CalibrationStream(_chunks([3, 5, 2]), batch_size=4)
    batches = list(stream)
    assert [_ids(b) for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 8, 9]]
    assert all(b.shape == (4, 1, 2, 2) and b.dtype == np.float32 and b.flags.c_contiguous for b in batches)
    assert stream.images_read == 10 and stream.batches_served == 3
    assert stream.next_batch() is None and stream.next_batch() is None  # exhausted for good


def test_calibration_stream_drop_policy_and_edge_cases():
    assert [_ids(b) for b in CalibrationStream(_chunks([3, 5, 2]), 4, remainder="drop")] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [_ids(b) for b in CalibrationStream(_chunks([8]), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # no remainder
    assert [_ids(b) for b in CalibrationStream(_chunks([1]), 3)] == [[0, 0, 0]]  # smaller than one batch
    assert CalibrationStream([], 4).next_batch() is None
    assert [_ids(b) for b in CalibrationStream([np.empty((0, 1, 2, 2), np.float32), *_chunks([2])], 2)] == [[0, 1]]
    with pytest.raises(ValueError, match="after inputs of shape"):
        list(CalibrationStream([*_chunks([2]), np.zeros((2, 1, 3, 3), np.float32)], 4))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        CalibrationStream([np.zeros((2, 2), np.float32)], 4).next_batch()
    with pytest.raises(ValueError, match="remainder policy"):
        CalibrationStream([], 4, remainder="zeros")


def test_calibration_cache_round_trip(tmp_path):
    cache = CalibrationCache(tmp_path / "calibration.cache", key="model-a")
    assert cache.read() is None  # nothing written yet
    blob = b"TRT-10x-EntropyCalibration2\ninput: 3c010a14\n"
    cache.write(blob)
    assert cache.read() == blob
    assert CalibrationCache(tmp_path / "calibration.cache", key="model-b").read() is None  # another model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.cache", "calibration.cache.key"]


def test_quantization_check_refuses_silent_fallbacks(random_weights, tmp_path):
    from iws_engine.export.onnx import export_onnx

    onnx_path = tmp_path / "model.onnx"
    export_onnx(weights_io.load(random_weights), onnx_path, input_shape=SMALL_INPUT)
    with pytest.raises(BackendError, match="fp8 needs an explicitly quantized ONNX"):
        check_quantization("fp8", onnx_path, has_calibrator=True)
    with pytest.raises(BackendError, match="int8 needs calibration data"):
        check_quantization("int8", onnx_path, has_calibrator=False)
    check_quantization("int8", onnx_path, has_calibrator=True)
    check_quantization("fp16", onnx_path, has_calibrator=False)


@pytest.mark.skipif(_importable("tensorrt"), reason="TensorRT is importable here: the error cannot occur")
def test_tensorrt_missing_is_a_precise_backend_error(random_weights, tmp_path):
    with pytest.raises(BackendError, match=r"TensorRT is not installed: `import tensorrt` failed \(ModuleNotFound"):
        backends.create("tensorrt", precision="fp16", device="cuda")
    with pytest.raises(BackendError, match="TensorRT is not installed"):
        build.build(weights_path=random_weights, backend="tensorrt", precision="fp16", out_dir=tmp_path / "trt")


@pytest.mark.skipif(_importable("torch_tensorrt"), reason="Torch-TensorRT is importable here")
def test_torch_tensorrt_missing_is_a_precise_backend_error():
    with pytest.raises(BackendError, match=r"Torch-TensorRT is not installed: `import torch_tensorrt` failed"):
        backends.create("torch-tensorrt", precision="fp16", device="cuda")


def test_tensorrt_manifest_is_bound_to_gpu_and_tensorrt_version(random_weights, tmp_path):
    assert {"gpu", "compute_capability", "tensorrt"} <= set(build.BINDING_FIELDS["tensorrt"])
    assert {"gpu", "tensorrt", "torch-tensorrt", "torch"} <= set(build.BINDING_FIELDS["torch-tensorrt"])
    assert {"gpu", "torch"} <= set(build.BINDING_FIELDS["inductor"])
    built_env = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.13.0"}
    manifest = {"backend": "tensorrt", "environment": built_env}
    here = {**built_env, "gpu": "NVIDIA L40S", "compute_capability": "8.9"}
    why = build.mismatch(manifest, here)
    assert "gpu 'NVIDIA H100 80GB HBM3' (built) != 'NVIDIA L40S' (here)" in why
    assert build.mismatch(manifest, built_env) == []
    assert any(w.startswith("tensorrt ") for w in build.mismatch(manifest, {**built_env, "tensorrt": "10.14.1"}))

    # an artefact folder built on another GPU: --no-build refuses it and names the GPU
    out = tmp_path / "trt"
    out.mkdir()
    loaded = weights_io.load(random_weights)
    (out / build.MANIFEST).write_text(json.dumps({
        "model_sha256": loaded.sha256, "backend": "tensorrt", "precision": "fp16", "batch_profile": "1:64:256",
        "environment": built_env, "parity": {"passed": True}}))
    with pytest.raises(build.BuildError, match=r"does not fit: .*gpu 'NVIDIA H100 80GB HBM3' \(built\)"):
        build.build(weights_path=random_weights, backend="tensorrt", precision="fp16", out_dir=out, no_build=True)
    with pytest.raises(build.BuildError, match=r"built for another environment: .*gpu 'NVIDIA H100 80GB HBM3'"):
        build.load_artifacts(out)


def test_build_calibration_inputs(random_weights, tmp_path):
    """--calib PNGs are preprocessed with the model's spec into fixed-size calibration batches."""
    from iws_engine.export.synth import generate

    calib = tmp_path / "calib"
    generate(calib, 5, fmt="rgba16", size=(96, 80), seed=3)
    files = build.calibration_files(calib)
    target = SarcnnTarget(random_weights)
    spec = target.spec
    batches = list(CalibrationStream(build.calibration_inputs(files, target, 2), batch_size=2))
    assert len(files) == 5 and len(batches) == 3
    assert all(b.shape == (2, spec.channels, *spec.size) for b in batches)
    key = build.calibration_key("sha", spec, files)
    assert key == build.calibration_key("sha", spec, files) != build.calibration_key("sha2", spec, files)
    with pytest.raises(build.BuildError, match="no PNG files"):
        build.calibration_files(_empty(tmp_path))
    with pytest.raises(build.BuildError, match="only used by --backend tensorrt --precision int8"):
        build.build(weights_path=random_weights, backend="tensorrt", precision="fp16", out_dir=tmp_path / "x",
                    calib_dir=calib)


def _empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_cli_build_accepts_compiled_backends_and_calib():
    from iws_engine.cli import build_parser

    args = build_parser().parse_args(["build", "--backend", "tensorrt", "--precision", "int8", "--calib", "imgs",
                                      "--device", "cuda"])
    assert args.backend == "tensorrt" and str(args.calib) == "imgs"
    for name in ("inductor", "torch-tensorrt"):
        assert build_parser().parse_args(["classify", "x.png", "--backend", name]).backend == name
    assert {"inductor", "tensorrt", "torch-tensorrt"} <= set(backends.BACKENDS)


# ----------------------------------------------------------------------------- TensorRT on the GPU
@pytest.mark.gpu
@needs_cuda
@needs_tensorrt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_build_and_graph_replay_match_eager(random_weights, tmp_path, precision):
    m = build.build(weights_path=random_weights, backend="tensorrt", precision=precision, device="cuda",
                    profile=build.BatchProfile(1, 16, 64), out_dir=tmp_path / "trt", probes=16)
    assert m["parity"]["passed"] and (tmp_path / "trt" / "model.engine").is_file()
    assert (tmp_path / "trt" / "timing.cache").is_file() and m["environment"]["tensorrt"]
    backend, target, _ = build.load_artifacts(tmp_path / "trt", device="cuda")
    x = np.random.default_rng(4).standard_normal((24, 1, 256, 256)).astype(np.float32)
    with backend:
        got = np.empty(len(x), np.float32)
        backend.infer(x[:16], got[:16])
        backend.infer(x[16:], got[16:])  # 8 rows padded into the 16-graph
        info = backend.info()
    assert info["graph_batch_sizes"] == [16] and not info["graph_failures"]
    assert np.max(np.abs(sigmoid(got) - sigmoid(_eager_logits(random_weights, x)))) <= build.PARITY_TOLERANCE[precision]


def test_onnxruntime_threads_sleep_between_operators(random_weights):
    """The CPU loader's decode threads share the cores: ORT's pool must not spin on them between operators."""
    from iws_engine import backends
    from iws_engine.export import weights as weights_io

    b = backends.create("onnxruntime", threads=2).load(weights_io.load(random_weights), (1, 256, 256))
    opts = b._session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 2
