"""CUDA kernel sources, shipped as package data and compiled at run time (NVRTC) or by CMake.

The GPU loading path (engine/loaders/gpu.py) lives here: PNG Adler-32 check and unfilter, then
the model input, either SAR_CNN's (grey_resize.cu: Julia's bilinear resize + grey) or Pipeline A's
EVA02 input (clip_resize.cu: Pillow's RGB conversion + antialiased bicubic + centre crop + CLIP
normalisation). See the README for their status.
"""

import re
from pathlib import Path

KERNEL_DIR = Path(__file__).resolve().parent

#: Every kernel file and the extern "C" entry points the loader asks NVRTC for.
ENTRY_POINTS: dict[str, tuple[str, ...]] = {
    "adler32.cu": ("adler32_verify",),
    "png_unfilter.cu": ("png_unfilter",),
    "grey_resize.cu": ("grey_resize_normalise",),
    "clip_resize.cu": ("clip_resample_first", "clip_resample_second_normalise"),
}


#: Headers (*.cuh) holding arithmetic shared by the CUDA kernels and the native CPU decoder (engine/native/).
SHARED_HEADERS = ("iws_hd.cuh", "png_filter_math.cuh", "julia_resize_math.cuh")

_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]+"([^"/]+)"[ \t]*$', re.M)


def source(name: str) -> str:
    """The text of kernels/<name> (e.g. "png_unfilter.cu") with its #include "x.cuh" lines replaced by the headers'
    text (each once), so the source compiles with NVRTC from a string alone.

    Why expand rather than pass -I to NVRTC: CuPy caches compiled modules by source text and options, so a changed
    header must change the source text; and no include path is needed inside an installed package.
    """
    return _expand(name, set())


def _expand(name: str, seen: set[str]) -> str:
    seen.add(name)
    text = (KERNEL_DIR / name).read_text()
    parts: list[str] = []
    last = 0
    for match in _LOCAL_INCLUDE.finditer(text):
        header = match.group(1)
        if not (KERNEL_DIR / header).is_file():
            continue  # left for the compiler to report
        line = text.count("\n", 0, match.end()) + 2  # the line after the #include, 1-based
        parts.append(text[last:match.start()])
        if header not in seen:
            parts.append(f'#line 1 "{header}"\n{_expand(header, seen)}\n#line {line} "{name}"')
        last = match.end()
    parts.append(text[last:])
    return "".join(parts)
