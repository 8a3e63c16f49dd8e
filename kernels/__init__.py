"""CUDA kernel sources, shipped as package data and compiled at run time (NVRTC) or by CMake.

The GPU loading path (engine/loaders/gpu.py) lives here: PNG Adler-32 check and unfilter, then
the model input, either SAR_CNN's (grey_resize.cu: Julia's bilinear resize + grey) or Pipeline A's
EVA02 input (clip_resize.cu: Pillow's RGB conversion + antialiased bicubic + centre crop + CLIP
normalisation). See the README for their status.
"""

from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent

#: Every kernel file and the extern "C" entry points the loader asks NVRTC for.
ENTRY_POINTS: dict[str, tuple[str, ...]] = {
    "adler32.cu": ("adler32_verify",),
    "png_unfilter.cu": ("png_unfilter",),
    "grey_resize.cu": ("grey_resize_normalise",),
    "clip_resize.cu": ("clip_resample_first", "clip_resample_second_normalise"),
}


def source(name: str) -> str:
    """The text of kernels/<name> (e.g. "png_unfilter.cu")."""
    return (KERNEL_DIR / name).read_text()
