"""CUDA kernel sources, shipped as package data and compiled at run time (NVRTC) or by CMake.

The GPU loading path (PNG unfilter, grey/resize/normalise on the device) lives here; see the
README for its status.
"""

from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent


def source(name: str) -> str:
    """The text of kernels/<name> (e.g. "png_unfilter.cu")."""
    return (KERNEL_DIR / name).read_text()
