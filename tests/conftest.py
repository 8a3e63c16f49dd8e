"""Shared test fixtures: where the read-only reference data lives, and skips when it is absent."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference"
IWS_REFERENCE = REFERENCE / "iws-gmd-2026"
PNGSUITE = REFERENCE / "pngsuite"
LUX_CHECKPOINT = IWS_REFERENCE / "models" / "pipeline_b_sar_cnn_v2.jld2"
XGBOOST_MODEL = IWS_REFERENCE / "models" / "pipeline_a_xgboost.json"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data absent: {path} (tests read ../shared/reference next to the repo)")
    return path


@pytest.fixture(scope="session")
def lux_checkpoint() -> Path:
    return require(LUX_CHECKPOINT)


@pytest.fixture(scope="session")
def iws_weights(tmp_path_factory, lux_checkpoint) -> Path:
    """The real IWS checkpoint converted once per session."""
    from iws_engine.export.lux import import_lux

    out = tmp_path_factory.mktemp("iws") / "iws_sarcnn_v2.safetensors"
    import_lux(lux_checkpoint, out)
    return out


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory) -> Path:
    """Randomly initialised SAR_CNN (declared untrained): exercises the machinery without the real checkpoint."""
    import torch

    from iws_engine.export import weights
    from iws_engine.export.models.sarcnn import SarCNN, state_to_numpy
    from iws_engine.preprocess import iws_sarcnn_spec

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "random.safetensors"
    meta = weights.ModelMetadata(model="sarcnn", model_name="random", preprocess=iws_sarcnn_spec(0.38, 0.156),
                                 threshold=0.5, trained=False)
    weights.save(path, state_to_numpy(SarCNN().eval()), meta)
    return path


@pytest.fixture(scope="session")
def tiny_eva02_weights(tmp_path_factory) -> Path:
    """The tiny EVA02 (56 px, 2 blocks) as a timm-style safetensors file, with a head wide enough that
    the softmax features, and so Pipeline A's scores, differ from image to image."""
    import torch
    from safetensors.torch import save_file

    from iws_engine.export.models.eva02 import Eva02Config, random_eva02

    model = random_eva02(Eva02Config.tiny(), seed=5).model
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=torch.Generator().manual_seed(6)) * 2.0)
    path = tmp_path_factory.mktemp("eva") / "eva02_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def mixed_inputs(tmp_path_factory) -> Path:
    """Good PNGs of several formats, nested, plus files that must fail with a clear reason."""
    from iws_engine.export.synth import generate

    root = tmp_path_factory.mktemp("mixed")
    generate(root / "a", 5, fmt="rgba16", size=(96, 80), seed=1)
    generate(root / "b" / "deep", 3, fmt="gray8", size=(300, 310), seed=2)
    good = sorted((root / "a").glob("*.png"))[0].read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "not_a_png.png").write_bytes(b"hello, I am text")
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("ignored: not a .png")
    return root


def run_cli(*args, cwd=None):
    """`python -m iws_engine ARGS`, captured."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "iws_engine", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


# ----------------------------------------------------------------------------- gated CPU precisions
@pytest.fixture(scope="module")
def module_artefact_cache(tmp_path_factory):
    """An artefact cache ($IWS_ENGINE_CACHE) for one test module (in-process and CLI subprocesses), never the
    user's; a module that builds gated artefacts requests it from an autouse fixture of its own."""
    from iws_engine.export.artifact_cache import CACHE_ENV

    with pytest.MonkeyPatch.context() as mp:
        path = tmp_path_factory.mktemp("iws-cache")
        mp.setenv(CACHE_ENV, str(path))
        yield path


@pytest.fixture(scope="module")
def rgba16_vignettes(tmp_path_factory):
    """Eight synthetic RGBA16 vignettes (seed 11) in a folder."""
    from iws_engine.export.synth import generate

    root = tmp_path_factory.mktemp("vignettes")
    generate(root, 8, fmt="rgba16", seed=11)
    return root


def cached_int8_folder(weights, backend: str) -> Path:
    """The cached INT8 artefact of `weights` for `backend` (classify names it after the model's sha256)."""
    from iws_engine.export import build
    from iws_engine.export.artifact_cache import cache_root

    (folder,) = (cache_root() / "artifacts").glob(f"sarcnn-{build.sha256_file(weights)[:16]}-{backend}-int8-cpu")
    return folder


def csv_scores(csv_text: str) -> dict[str, float]:
    """path -> score from classify's CSV output."""
    return {line.split(",")[0]: float(line.split(",")[1]) for line in csv_text.strip().splitlines()[1:]}


def check_bench_model_runs_int8(weights, backend: str) -> None:
    """`iws-engine bench --config BACKEND:int8` (model mode) runs the gated artefact classify built (a cache hit)
    next to ONNX Runtime fp32."""
    from iws_engine.bench.runner import BenchConfig, run_bench

    result = run_bench([BenchConfig("onnxruntime", "fp32"), BenchConfig(backend, "int8")], mode="model",
                       batch_sizes=(4,), runs=1, warmup=0, n_images=8, weights=weights)
    assert [r["config"] for r in result["rows"]] == ["onnxruntime:fp32:cpu", f"{backend}:int8:cpu"]
    assert all(r["throughput_img_s"]["mean"] > 0 for r in result["rows"])
    int8 = next(c for c in result["configs"] if c["backend"] == backend and c["precision"] == "int8")
    assert "error" not in int8 and int8["info"]["precision"] == "int8"
