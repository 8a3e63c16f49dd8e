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
