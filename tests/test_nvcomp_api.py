"""The GPU loader's nvCOMP calls (engine/loaders/gpu.py: nvcomp_codec, nvcomp_inflate) against the installed
nvidia-nvcomp-cu13's own documentation: the pybind signatures help() shows. Every nvCOMP call needs a CUDA driver
(even as_arrays on host memory), so CI checks the calling convention, and tests/test_gpu_loader.py runs the loader
up to those calls with stand-ins that follow these signatures (FAKE_NVCOMP, both API generations).
"""

from __future__ import annotations

import re

import pytest

from iws_engine.loaders.gpu import NVCOMP_EXECUTION_POLICIES, nvcomp_batch_api

nvcomp = pytest.importorskip("nvidia.nvcomp", reason="nvidia-nvcomp-cu13 is not installed (the test and gpu extras)")


def signatures(function) -> list[dict[str, str]]:
    """Each overload's parameters (name -> annotation) as pybind11 writes them at the top of the docstring."""
    found = []
    for params in re.findall(rf"^\s*(?:\d+\. )?{function.__name__}\((.*?)\) ->", function.__doc__, re.M):
        fields = [p.strip() for p in re.split(r",\s*(?![^\[]*\])", params) if p.strip()]
        found.append({f.split(":")[0].strip(): f.split(":", 1)[1].split("=")[0].strip() if ":" in f else "" for f in fields})
    assert found, function.__doc__[:300]
    return found


def test_the_installed_nvcomp_is_one_the_loader_speaks() -> None:
    major = int(nvcomp.__version__.split(".")[0]) if hasattr(nvcomp, "__version__") else 5
    assert major in (5, 6), nvcomp.__version__
    assert nvcomp_batch_api(nvcomp) == (major >= 6)


def test_codec_takes_the_loader_options() -> None:
    doc = nvcomp.Codec.__init__.__doc__
    for option in ("algorithm", "device_id", "cuda_stream", "bitstream_kind"):
        assert re.search(rf"^\s*{option}:", doc, re.M), option
    assert nvcomp.BitstreamKind.RAW is not None
    if nvcomp_batch_api(nvcomp):
        assert re.search(r"^\s*execution_policy:", doc, re.M)
        for policy in NVCOMP_EXECUTION_POLICIES:
            assert getattr(nvcomp.ExecutionPolicy, policy.upper()) is not None
        assert "self" in signatures(nvcomp.Codec.get_required_decompression_alignment)[0]


def test_batch_calls_match_the_documented_overloads() -> None:
    as_arrays = signatures(nvcomp.as_arrays)
    decode = signatures(nvcomp.Codec.decode)
    if nvcomp_batch_api(nvcomp):
        # nvcomp_inflate: as_arrays(buffer, offsets, sizes, cuda_stream=...), decode(BatchArray, out=BatchArray)
        assert {"buffer": "object", "offsets": "list[int]", "sizes": "list[int]", "cuda_stream": "int"} in as_arrays
        assert any(p.get("srcs", "").endswith("BatchArray") and "out" in p for p in decode)
        assert "Sizes in bytes of every entry" in nvcomp.BatchArray.buffer_sizes.__doc__
        assert "too small" in nvcomp.Codec.decode.__doc__  # a longer stream fails the batch: the loader's fallback
    else:
        assert any(set(p) == {"sources", "cuda_stream"} for p in as_arrays)
        assert any(p.get("srcs", "").startswith("list") and "out" in p for p in decode)
