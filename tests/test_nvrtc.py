"""Every kernel compiles with NVRTC exactly as the GPU loader compiles it at run time (the options of
engine/loaders/gpu.py's nvrtc_options, the extern "C" entry points of kernels.ENTRY_POINTS), for each target
architecture (sm_89: L40, sm_90: H100). No GPU or driver needed: libnvrtc from the nvidia-cuda-nvrtc wheel (the
`test` extra), through iws_engine.kernels.nvrtc. A compile error or warning shows here, not first on a GPU.
"""

from __future__ import annotations

import pytest

from iws_engine import kernels
from iws_engine.kernels import nvrtc
from iws_engine.loaders.gpu import KERNEL_OPTIONS, NVRTC_ARCHITECTURES, nvrtc_options

pytestmark = pytest.mark.skipif(not nvrtc.available(), reason="libnvrtc is not installed "
                                "(pip install 'nvidia-cuda-nvrtc==13.*', part of the test extra)")


def test_nvrtc_knows_the_target_architectures() -> None:
    assert set(NVRTC_ARCHITECTURES) <= set(nvrtc.supported_architectures()), nvrtc.version()


def test_loader_options_are_what_cupy_passes() -> None:
    options = nvrtc_options(90)
    assert options[:len(KERNEL_OPTIONS)] == KERNEL_OPTIONS and "--fmad=false" in options
    assert "-arch=sm_90" in options and "-ftz=true" in options


@pytest.mark.parametrize("arch", NVRTC_ARCHITECTURES)
@pytest.mark.parametrize("name", sorted(kernels.ENTRY_POINTS))
def test_kernel_compiles_for_the_target(name: str, arch: int) -> None:
    # "kern.cu": the file name CuPy gives NVRTC
    compiled = nvrtc.compile_program(kernels.source(name), "kern.cu", nvrtc_options(arch))
    assert "warning" not in compiled.log.lower() and "error" not in compiled.log.lower(), compiled.log
    assert compiled.cubin[:4] == b"\x7fELF"
    for entry in kernels.ENTRY_POINTS[name]:
        assert b"\0" + entry.encode() + b"\0" in compiled.cubin, entry  # the unmangled symbol get_function finds


def test_a_compile_error_carries_the_log() -> None:
    with pytest.raises(nvrtc.NvrtcError, match="kern.cu.*error"):
        nvrtc.compile_program('extern "C" __global__ void k() { undeclared(); }', "kern.cu", nvrtc_options(90))
