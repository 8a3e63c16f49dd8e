"""The real kernels/*.cu sources, built as C++ against kernels/cuda_cpu_emulation.h and run on the CPU.

Each kernel file becomes one executable (the .cu file #included unchanged, its extern "C" entry points registered,
the emulation header's harness as main), built with AddressSanitizer + UndefinedBehaviorSanitizer (or
ThreadSanitizer) and cached under build/kernels_cpu/ by a hash of everything that goes into it. `CpuKernel` is a
callable with CuPy's RawKernel calling convention, kernel(grid, block, args, stream=None): NumPy arrays are device
memory (copied to exact-size buffers in the executable, and back), NumPy scalars the scalar arguments. So the
loader's own launch code (engine/loaders/gpu.py, through tests/test_gpu_loader.py's NumPy stand-in for CuPy) drives
the real kernels with the grid, block and arguments it computes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

from iws_engine import kernels

ROOT = Path(__file__).resolve().parents[1]
BUILD_DIR = Path(os.environ.get("IWS_KERNELS_CPU_BUILD", ROOT / "build" / "kernels_cpu"))
HEADER = kernels.KERNEL_DIR / "cuda_cpu_emulation.h"

COMMON_FLAGS = ("-std=c++17", "-O1", "-g", "-pthread", "-x", "c++",
                "-ffp-contract=off",  # every _rn intrinsic stays one rounded operation, as on the device
                "-fno-strict-aliasing",  # adler32.cu reads its bytes as uint4 words, as CUDA code does
                "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Wno-unused-parameter")
SANITIZERS = {
    "asan": ("-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"),
    "tsan": ("-fsanitize=thread",),
}
RUN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:halt_on_error=1:abort_on_error=0",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66",
}
TIMEOUT_S = 300


class KernelRunError(RuntimeError):
    """The emulated launch failed: a sanitizer report, an emulation check (divergent barrier, bad argument), a crash."""


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def skip_reason() -> str | None:
    """Why the emulated kernels cannot run here (None when they can)."""
    if compiler() is None:
        return "no C++ compiler (g++ or $CXX) on PATH: the kernels cannot be built for the CPU"
    return None


#: CUDA sources outside kernels/ that tests run on the CPU (the emulation's own self-test), by name: (path, entries)
EXTRA_SOURCES: dict[str, tuple[Path, tuple[str, ...]]] = {}


def _source(file: str) -> tuple[Path, tuple[str, ...]]:
    if file in EXTRA_SOURCES:
        return EXTRA_SOURCES[file]
    return kernels.KERNEL_DIR / file, kernels.ENTRY_POINTS[file]


def _wrapper(path: Path, entries: tuple[str, ...]) -> str:
    exports = "\n".join(f"CUDA_CPU_EXPORT({entry})" for entry in entries)
    return (f'#include "cuda_cpu_emulation.h"\n#include "{path}"\n{exports}\n'
            "int main(int argc, char** argv) { return cuda_cpu::harness_main(argc, argv); }\n")


@lru_cache(maxsize=None)
def _compiler_version(cxx: str) -> str:
    return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]


@lru_cache(maxsize=None)
def executable(file: str, sanitizer: str = "asan") -> Path:
    """The harness executable of kernels/<file>, built once per content (kernel, headers, flags, compiler)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError(skip_reason())
    flags = (*COMMON_FLAGS, *SANITIZERS[sanitizer])
    source_path, entries = _source(file)
    wrapper = _wrapper(source_path, entries)
    digest = hashlib.sha256()
    for part in (wrapper, " ".join(flags), _compiler_version(cxx)):
        digest.update(part.encode() + b"\0")
    for folder in sorted({kernels.KERNEL_DIR, source_path.parent}):  # the .cu file and every header it may include
        for path in sorted(folder.glob("*")):
            if path.suffix in (".cu", ".cuh", ".h"):
                digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    target = BUILD_DIR / f"{Path(file).stem}-{sanitizer}-{digest.hexdigest()[:16]}"
    if target.exists():
        return target
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BUILD_DIR) as tmp:
        source = Path(tmp) / "wrapper.cpp"
        source.write_text(wrapper)
        built = Path(tmp) / "harness"
        result = subprocess.run([cxx, *flags, "-I", str(kernels.KERNEL_DIR), "-I", str(source_path.parent), str(source),
                                 "-o", str(built)],
                                capture_output=True, text=True, timeout=TIMEOUT_S)
        if result.returncode != 0:
            missing = re.search(r"cannot find -l(asan|ubsan|tsan)|lib(asan|ubsan|tsan)[\w.]* not found", result.stderr)
            if missing:  # the compiler is there, its sanitizer runtime is not (Debian: libasan8, libubsan1, libtsan2)
                import pytest

                pytest.skip(f"the {sanitizer} runtime of {cxx} is not installed ({missing.group(0)})")
            raise RuntimeError(f"building {file} for the CPU failed:\n{result.stderr}{result.stdout}")
        if result.stderr.strip():  # warnings: the kernels build clean with nvcc -Werror, so they must here too
            raise RuntimeError(f"building {file} for the CPU warned:\n{result.stderr}")
        os.replace(built, target)  # atomic: a concurrent build of the same key leaves one complete file
    return target


def file_of(entry: str) -> str:
    for file, entries in [*kernels.ENTRY_POINTS.items(), *((f, e) for f, (_, e) in EXTRA_SOURCES.items())]:
        if entry in entries:
            return file
    raise KeyError(f"no kernel file defines {entry}")


@lru_cache(maxsize=None)
def uses_block_sync(file: str) -> bool:
    """Whether a kernel file (its headers included) has __shared__ storage or a barrier: then the emulation
    runs its blocks strictly one after the other; otherwise a thread may run ahead into its next block."""
    text = EXTRA_SOURCES[file][0].read_text() if file in EXTRA_SOURCES else kernels.source(file)
    return re.search(r"__shared__|__syncthreads|__syncwarp|_sync\s*\(", text) is not None


def _dims(shape) -> list[int]:
    dims = [int(v) for v in (shape if isinstance(shape, tuple | list) else (shape,))]
    return (dims + [1, 1, 1])[:3]


def _scalar_line(value) -> str:
    if not isinstance(value, np.generic) or value.dtype.kind not in "uif":
        raise TypeError(f"scalar kernel arguments must be NumPy integer or float scalars (a fixed width), got "
                        f"{type(value).__name__}")
    return f"val {value.dtype.kind} {value.dtype.itemsize} {value.tobytes().hex() or '00'}"


def launch(entry: str, grid, block, args, *, sanitizer: str = "asan", poison=()) -> None:
    """Run kernel `entry` on the CPU. Array arguments are device memory: overlapping arrays share one buffer (the
    in-place unfilter passes one array twice), copied back after the launch. `poison`: (array, offset, bytes)
    ranges AddressSanitizer is to treat as unaddressable (gaps between images a kernel must never touch)."""
    arrays = [np.asarray(a) for a in args if isinstance(a, np.ndarray)]
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError("device arrays must be C-contiguous")
    # Merge the arrays' memory ranges into buffers.
    spans = sorted({(a.__array_interface__["data"][0], a.nbytes) for a in arrays})
    regions: list[list[int]] = []  # [start, end]
    for start, size in spans:
        if regions and start < regions[-1][1]:
            regions[-1][1] = max(regions[-1][1], start + size)
        else:
            regions.append([start, start + size])

    def locate(a: np.ndarray) -> tuple[int, int]:
        address = a.__array_interface__["data"][0]
        for k, (start, end) in enumerate(regions):
            if start <= address and address + a.nbytes <= end:
                return k, address - start
        raise AssertionError("array outside every region")

    with tempfile.TemporaryDirectory(prefix="iws-kernels-cpu-") as tmp:
        lines = []
        for k, (start, end) in enumerate(regions):
            path = Path(tmp) / f"buffer{k}"
            path.write_bytes(ctypes.string_at(start, end - start) if end > start else b"")
            lines.append(f"buffer {k} {end - start} {path}")
        for array, offset, size in poison:
            k, base = locate(np.asarray(array))
            lines.append(f"poison {k} {base + offset} {size}")
        arg_lines = []
        for a in args:
            if isinstance(a, np.ndarray):
                k, offset = locate(np.asarray(a))
                arg_lines.append(f"ptr {k} {offset}")
            else:
                arg_lines.append(_scalar_line(a))
        independent = int(not uses_block_sync(file_of(entry)))
        lines.append(f"launch {entry} {' '.join(map(str, _dims(grid) + _dims(block)))} {len(arg_lines)} {independent}")
        lines.extend(arg_lines)
        env = {**os.environ, **RUN_ENV}
        command = [str(executable(file_of(entry), sanitizer))]
        result = subprocess.run(command, input="\n".join(lines) + "\n", capture_output=True, text=True,
                                timeout=TIMEOUT_S, env=env)
        if sanitizer == "tsan" and "unexpected memory mapping" in result.stderr and shutil.which("setarch"):
            # GCC 12's TSan and the high mmap randomisation of recent kernels: run once more without ASLR
            result = subprocess.run(["setarch", os.uname().machine, "-R", *command], input="\n".join(lines) + "\n",
                                    capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
        if result.returncode != 0 or "runtime error" in result.stderr or "WARNING: ThreadSanitizer" in result.stderr:
            raise KernelRunError(f"{entry} on the CPU ({sanitizer}) exited with {result.returncode}:\n{result.stderr}")
        for k, (start, end) in enumerate(regions):
            data = (Path(tmp) / f"buffer{k}").read_bytes()
            assert len(data) == end - start
            if data:
                ctypes.memmove(start, data, len(data))


class CpuKernel:
    """A kernel with CuPy's RawKernel calling convention, run by `launch` (the stream is ignored: launches run
    to completion, in order)."""

    def __init__(self, entry: str, sanitizer: str = "asan"):
        self.entry, self.sanitizer = entry, sanitizer
        self.launches: list[tuple[tuple, tuple]] = []  # (grid, block) of every launch, for the tests to check

    def __call__(self, grid, block, args, stream=None) -> None:
        self.launches.append((tuple(grid), tuple(block)))
        launch(self.entry, grid, block, args, sanitizer=self.sanitizer)


def cpu_kernels(sanitizer: str = "asan") -> dict[str, CpuKernel]:
    """Every entry point of every kernel file, run on the CPU."""
    return {entry: CpuKernel(entry, sanitizer) for entries in kernels.ENTRY_POINTS.values() for entry in entries}
