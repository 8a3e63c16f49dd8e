"""NVRTC through ctypes: compile a kernel source to PTX or a cubin without a GPU, a driver or CuPy.

The loader compiles its kernels at run time through CuPy (engine/loaders/gpu.py, `nvrtc_options` says with
which options); tests/test_nvrtc.py compiles them here with the same options for each target architecture, so a
compile error shows in CI and not first on a GPU. libnvrtc comes from the `nvidia-cuda-nvrtc` wheel (the `test`
and `gpu` extras; ~58 MB), a CUDA toolkit ($CUDA_HOME/lib64) or the system's library path.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Sequence

NVRTC_SONAMES = ("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so")


class NvrtcError(RuntimeError):
    """NVRTC is missing, or it rejected a program (the message holds its log)."""


def _candidates() -> list[str]:
    found = []
    for entry in sys.path:  # the nvidia-cuda-nvrtc wheel: site-packages/nvidia/cu13/lib (cu12: nvidia/cuda_nvrtc/lib)
        for folder in (Path(entry) / "nvidia" / "cu13" / "lib", Path(entry) / "nvidia" / "cuda_nvrtc" / "lib"):
            found += [str(folder / name) for name in NVRTC_SONAMES if (folder / name).is_file()]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            found += [str(Path(home) / "lib64" / name) for name in NVRTC_SONAMES if (Path(home) / "lib64" / name).is_file()]
    return found + list(NVRTC_SONAMES)  # last: the dynamic loader's own search


@lru_cache(maxsize=None)
def library() -> ctypes.CDLL:
    errors = []
    for candidate in _candidates():
        try:
            lib = ctypes.CDLL(candidate)
        except OSError as e:
            errors.append(str(e))
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        return lib
    raise NvrtcError("libnvrtc not found (pip install 'nvidia-cuda-nvrtc==13.*', or set CUDA_HOME): "
                     + "; ".join(errors[:3]))


def available() -> bool:
    try:
        library()
    except NvrtcError:
        return False
    return True


def _check(status: int, what: str) -> None:
    if status != 0:
        raise NvrtcError(f"{what}: {library().nvrtcGetErrorString(status).decode()}")


def version() -> tuple[int, int]:
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(library().nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


def supported_architectures() -> list[int]:
    """The `sm_XX` targets this NVRTC can compile for (e.g. [75, 80, 86, 89, 90, ...])."""
    lib = library()
    count = ctypes.c_int()
    _check(lib.nvrtcGetNumSupportedArchs(ctypes.byref(count)), "nvrtcGetNumSupportedArchs")
    archs = (ctypes.c_int * count.value)()
    _check(lib.nvrtcGetSupportedArchs(archs), "nvrtcGetSupportedArchs")
    return list(archs)


@dataclass
class Compiled:
    log: str
    ptx: str | None = None  # for a virtual architecture (-arch=compute_XX)
    cubin: bytes | None = None  # for a real one (-arch=sm_XX)
    lowered_names: dict[str, str] | None = None


def _strings(values: Sequence[str]):
    return (ctypes.c_char_p * max(len(values), 1))(*[v.encode() for v in values])


def compile_program(source: str, name: str, options: Sequence[str], *, name_expressions: Sequence[str] = ()) -> Compiled:
    """Compile one program as nvrtcCompileProgram does for CuPy: raises NvrtcError with the log when it fails."""
    lib = library()
    program = ctypes.c_void_p()
    _check(lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), name.encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        for expression in name_expressions:
            _check(lib.nvrtcAddNameExpression(program, expression.encode()), "nvrtcAddNameExpression")
        status = lib.nvrtcCompileProgram(program, len(options), _strings(options))
        size = ctypes.c_size_t()
        _check(lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)), "nvrtcGetProgramLogSize")
        log = ctypes.create_string_buffer(size.value)
        _check(lib.nvrtcGetProgramLog(program, log), "nvrtcGetProgramLog")
        text = log.value.decode(errors="replace")
        if status != 0:
            raise NvrtcError(f"NVRTC rejected {name} ({lib.nvrtcGetErrorString(status).decode()}) with options "
                             f"{' '.join(options)}:\n{text}")
        result = Compiled(log=text)
        if any(o.startswith(("-arch=sm_", "--gpu-architecture=sm_")) for o in options):
            _check(lib.nvrtcGetCUBINSize(program, ctypes.byref(size)), "nvrtcGetCUBINSize")
            cubin = ctypes.create_string_buffer(size.value)
            _check(lib.nvrtcGetCUBIN(program, cubin), "nvrtcGetCUBIN")
            result.cubin = cubin.raw
        else:
            _check(lib.nvrtcGetPTXSize(program, ctypes.byref(size)), "nvrtcGetPTXSize")
            ptx = ctypes.create_string_buffer(size.value)
            _check(lib.nvrtcGetPTX(program, ptx), "nvrtcGetPTX")
            result.ptx = ptx.value.decode()
        if name_expressions:
            result.lowered_names = {}
            for expression in name_expressions:
                lowered = ctypes.c_char_p()
                _check(lib.nvrtcGetLoweredName(program, expression.encode(), ctypes.byref(lowered)),
                       "nvrtcGetLoweredName")
                result.lowered_names[expression] = lowered.value.decode()
        return result
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))
