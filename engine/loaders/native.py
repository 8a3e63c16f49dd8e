"""The native CPU decode core (kernels/cpu_decode.cpp): PNG bytes -> the SAR_CNN model input in one GIL-free call.

For a non-interlaced 8/16-bit grey, grey+alpha, RGB or RGBA file without gamma correction, `decode_preprocess`
inflates into a reused per-thread buffer (libdeflate, Adler-32 checked), checks the filter types, unfilters only the
grey lane when the filtered R, G and B lanes are identical (else every byte), and writes Julia's imresize + Gray +
normalise straight into the caller's float32 plane, bit for bit as engine/preprocess.py's NumPy reference. Other
files (interlaced, palette, sub-byte, gamma) take the general decoder (engine/loaders/png.py).

Parsing and validation stay in png.parse_png (when built, the core's scan_chunks walks the chunks, checks their
framing and CRCs and joins the IDAT bodies; the rules and messages stay in Python); when the native inflate refuses
a stream, png's zlib inflate names the precise reason, so error messages are the same either way.
"""

from __future__ import annotations

import os

import numpy as np

from iws_engine.loaders.png import (
    _LIBPNG_USER_LIMIT,
    GREY,
    GREY_ALPHA,
    RGB,
    RGBA,
    PngError,
    PngInfo,
    _gamma_lut_for,
    _inflate_idat_zlib,
)
from iws_engine.preprocess import PreprocessSpec, imresize_axis_weights

try:  # built by `pip install` (setup.py -> CMakeLists.txt); absent in a source tree that was never built
    from iws_engine.kernels import _cpu_decode as _core
except ImportError:  # pragma: no cover - depends on the install
    _core = None

#: Path names reported by decode_preprocess.
GREY_LANES = "grey-lanes"  # only the grey lane(s) were unfiltered (grey, grey+alpha, or R=G=B colour)
FULL = "full"  # every byte was unfiltered (colour that is not R=G=B somewhere)


def available() -> bool:
    """Whether the native core was built into this install."""
    return _core is not None


def inflater() -> str | None:
    """The inflate library the core was built with ("libdeflate" or "zlib"), None when not built."""
    return None if _core is None else _core.INFLATER


def handles(info: PngInfo) -> bool:
    """Whether decode_preprocess takes this file (else the general decoder does, which also refuses sides over
    libpng's user limit, as Julia's PNGFiles would)."""
    return (_core is not None and not info.interlace and info.bit_depth in (8, 16)
            and info.color_type in (GREY, GREY_ALPHA, RGB, RGBA) and _gamma_lut_for(info) is None
            and max(info.width, info.height) <= _LIBPNG_USER_LIMIT)


#: Element types decode_preprocess writes, by the NumPy dtype of its `out` (bfloat16, which NumPy lacks, as its bit
#: patterns in uint16): the float32 model input, or it rounded to nearest-even as NumPy's astype(np.float16) and
#: torch's .to(torch.bfloat16) round it.
OUT_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}


def _out_format(out: np.ndarray) -> int:
    if out.dtype == np.float32:
        return _core.OUT_FLOAT32
    if out.dtype == np.float16:
        return _core.OUT_FLOAT16
    if out.dtype == np.uint16:
        return _core.OUT_BFLOAT16
    raise TypeError(f"decode_preprocess writes float32, float16 or bfloat16 (as uint16 bits), not {out.dtype}")


def decode_preprocess(info: PngInfo, spec: PreprocessSpec, out: np.ndarray, *,
                      path: str | os.PathLike[str] | None = None, force_full: bool = False) -> str:
    """Decode a parsed PNG (handles(info) must hold) into `out`, a C-contiguous (H', W') plane of float32, float16,
    or uint16 holding bfloat16 bit patterns (OUT_DTYPES).

    Returns the path taken (GREY_LANES or FULL); `force_full` makes an R=G=B image take the full path (tests, bench).
    Raises PngError, naming `path`, for a stream that does not inflate or a bad filter type.
    """
    out_format = _out_format(out)
    h_out, w_out = spec.size
    clamp = h_out > info.height or w_out > info.width
    cols = imresize_axis_weights(info.width, w_out, clamp)
    rows = imresize_axis_weights(info.height, h_out, clamp)
    data, is_raw = np.frombuffer(info.deflate, np.uint8), False
    for _ in range(2):
        status, detail0, detail1 = _core.decode_preprocess(
            data, is_raw, info.adler32, info.width, info.height, info.bit_depth, info.color_type,
            cols.i0, cols.i1, cols.w0, cols.w1, rows.i0, rows.i1, rows.w0, rows.w1,
            float(np.float32(spec.mean)), float(np.float32(spec.std)), out, force_full, out_format)
        if status == _core.STATUS_GREY_LANES:
            return GREY_LANES
        if status == _core.STATUS_FULL:
            return FULL
        if status == _core.STATUS_BAD_FILTER:
            raise PngError(f"invalid filter type {detail1} on row {detail0}", path)
        if status == _core.STATUS_INFLATE_FAILED and not is_raw:
            # zlib names what is wrong (and raises); should it accept the stream after all, decode its output
            data, is_raw = np.frombuffer(_inflate_idat_zlib(info, path=path), np.uint8), True
            continue
        break
    raise RuntimeError(f"native decode core refused its arguments (status {status}) for a {info.width}x{info.height} "
                       f"{info.bit_depth}-bit colour-type-{info.color_type} image into {out.shape} {out.dtype}")


def round_float32(values: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 `values` rounded into `out` (same shape, float16 or uint16 = bfloat16 bits) as decode_preprocess
    rounds its output: for inputs that take the general decoder and the NumPy reference. Returns `out`."""
    if out.shape != values.shape or not out.flags.c_contiguous or out.dtype not in (np.float16, np.uint16):
        raise ValueError(f"round_float32: cannot round {values.shape} values into {out.shape} {out.dtype}")
    src = np.ascontiguousarray(values, np.float32).reshape(-1)
    _core.round_float32(src, out.reshape(-1).view(np.uint16), _out_format(out))
    return out


def crc32(data, value: int = 0) -> int:
    """CRC-32 (libdeflate's, or zlib's when built with zlib) of a bytes-like object; same values as zlib.crc32."""
    return _core.crc32(np.frombuffer(data, np.uint8), value)
