"""Pillow's 8-bit image conversion and bicubic resampling, transcribed to NumPy integer arithmetic.

Pipeline A's preprocessing is defined by Pillow (`engine/preprocess_clip.py`): `convert("RGB")`
then `Image.resize(size, Image.BICUBIC)`. This module computes the same bytes without Pillow, from
the samples a PNG stores, in a form a GPU kernel can follow step for step (kernels/clip_resize.cu):

* `pillow_taps(n_in, n_out)`: the fixed-point filter taps of one axis, as Pillow's
  `precompute_coeffs` + `normalize_coeffs_8bpc` make them: the bicubic kernel (a = -0.5) with its
  support widened by the downscale factor (antialiasing), evaluated in double precision at
  `(x + xmin - centre + 0.5) * (1 / filterscale)`, normalised by the running sum of the taps, then
  scaled by 2^22 and rounded half away from zero. The host computes them once per (n_in, n_out);
  the device only ever sees the integers.
* `resample_rgb8`: `ImagingResample` for 8-bit images: one separable pass into an 8-bit image, then
  the other; each output is `clip8((1 << 21) + sum(sample * tap))` with 32-bit integer sums,
  `clip8(s) = clamp(s >> 22, 0, 255)`. The horizontal pass comes first, except in Pillow >= 13 when
  the height shrinks much more than the width (`vertical_first`); since each pass rounds to 8 bits,
  the order changes values, so it follows the installed Pillow. An axis whose size does not change is not resampled
  (`need_horizontal` / `need_vertical`); its taps are then the identity (one tap of 1 << 22), which
  gives the same bytes. Pillow computes only the intermediate lines the second pass reads (from
  `start[0]` to `start[-1] + count[-1]`); every intermediate value depends on one source line alone,
  so that restriction changes nothing, and a crop may restrict both passes further
  (`resample_crop_rgb8`), which is what the GPU does.
* `pillow_rgb_from_scanlines`: `Image.open(f).convert("RGB")` from unfiltered PNG scanlines:
  8-bit samples as they are, 16-bit colour and grey+alpha samples by their high byte (Pillow's
  "RGB;16B", "RGBA;16B", "LA;16B" unpackers), 16-bit grey (mode "I;16") clamped at 255 by
  `convert`, grey replicated to three channels, alpha dropped without compositing, gAMA, sRGB,
  sBIT and tRNS ignored. Palette and sub-byte images are left to Pillow itself.

Sums cannot overflow 32 bits: the sum of the positive taps of a row is below 1.25 * 2^22 for this
filter (checked in the tests), so |sum| < 2^21 + 255 * 1.25 * 2^22 < 2^31.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = [
    "PRECISION_BITS", "BICUBIC_SUPPORT", "PillowTaps", "pillow_taps", "vertical_first", "pillow_major_version",
    "resample_rgb8", "resample_crop_rgb8", "pillow_rgb_from_scanlines", "clip8",
]

#: Pillow's PRECISION_BITS for 8-bit images: 32 - 8 - 2 (8 bits of result, 2 of headroom for negative lobes).
PRECISION_BITS = 22
ROUND_BIAS = 1 << (PRECISION_BITS - 1)
BICUBIC_SUPPORT = 2.0
_BICUBIC_A = -0.5

# PNG colour types (as in loaders/png.py; repeated so this module imports nothing from the engine).
_GREY, _RGB, _GREY_ALPHA, _RGBA = 0, 2, 4, 6
_CHANNELS = {_GREY: 1, _RGB: 3, _GREY_ALPHA: 2, _RGBA: 4}


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic_filter, operation for operation (double precision, a = -0.5, no fused multiply-add)."""
    x = np.abs(x)
    a = _BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1  # |x| < 1
    far = (((x - 5) * x + 8) * x - 4) * a  # 1 <= |x| < 2
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@dataclass(frozen=True, eq=False)
class PillowTaps:
    """Fixed-point filter taps of one axis: output i reads inputs start[i] .. start[i] + count[i] - 1
    with weights[i, :count[i]] (int32, scaled by 2^PRECISION_BITS; the rest of the row is 0)."""

    n_in: int
    n_out: int
    start: np.ndarray  # (n_out,) int32
    count: np.ndarray  # (n_out,) int32
    weights: np.ndarray  # (n_out, ksize) int32

    @property
    def ksize(self) -> int:
        return self.weights.shape[1]

    def rows_needed(self, first: int = 0, stop: int | None = None) -> tuple[int, int]:
        """[lo, hi): the inputs that outputs first .. stop - 1 read (bounds are monotonic in the output)."""
        stop = self.n_out if stop is None else stop
        return int(self.start[first]), int(self.start[stop - 1] + self.count[stop - 1])


def _identity_taps(n: int) -> PillowTaps:
    """What an axis Pillow does not resample amounts to: output i = input i (one tap of 1 << 22)."""
    index = np.arange(n, dtype=np.int32)
    return PillowTaps(n, n, index, np.ones(n, np.int32), np.full((n, 1), 1 << PRECISION_BITS, np.int32))


@lru_cache(maxsize=64)
def pillow_taps(n_in: int, n_out: int, *, resample: bool | None = None) -> PillowTaps:
    """The taps Pillow uses to resample an axis of n_in pixels to n_out (BICUBIC, no box).

    `resample=None` (the default) follows `ImagingResampleInner`: an axis whose size is unchanged is
    not resampled (identity taps). `resample=True` forces the coefficients Pillow would compute.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f"axis sizes must be positive, got {n_in} -> {n_out}")
    if resample is None:
        resample = n_in != n_out
    if not resample:
        if n_in != n_out:
            raise ValueError(f"an axis of {n_in} pixels cannot become {n_out} without resampling")
        return _identity_taps(n_in)
    # precompute_coeffs with box (0, n_in): in0 = 0.0f, in1 = (float)n_in (exact below 2^24)
    scale = float(n_in) / n_out
    filterscale = max(scale, 1.0)
    support = BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    xx = np.arange(n_out, dtype=np.float64)
    center = 0.0 + (xx + 0.5) * scale
    ss = 1.0 / filterscale
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)  # C's (int) truncates toward 0
    xmax = np.minimum(np.trunc(center + support + 0.5), n_in).astype(np.int64) - xmin
    taps = np.zeros((n_out, ksize), np.float64)
    total = np.zeros(n_out, np.float64)
    for x in range(ksize):  # the running sum ww, in Pillow's order
        w = _bicubic(((x + xmin).astype(np.float64) - center + 0.5) * ss)
        w = np.where(x < xmax, w, 0.0)
        taps[:, x] = w
        total = total + w  # adding 0.0 past the end changes nothing
    taps = np.divide(taps, total[:, None], out=taps.copy(), where=total[:, None] != 0.0)
    scaled = taps * (1 << PRECISION_BITS)  # exact: a power of two
    fixed = np.trunc(np.where(taps < 0, -0.5 + scaled, 0.5 + scaled))  # normalize_coeffs_8bpc
    fixed[np.arange(ksize)[None, :] >= xmax[:, None]] = 0
    start, count, weights = xmin.astype(np.int32), xmax.astype(np.int32), fixed.astype(np.int32)
    for a in (start, count, weights):
        a.flags.writeable = False
    return PillowTaps(n_in, n_out, start, count, weights)


def clip8(sums: np.ndarray) -> np.ndarray:
    """Pillow's clip8: the fixed-point sum (bias included) to a byte, clamped to 0..255."""
    return np.clip(np.right_shift(sums, PRECISION_BITS), 0, 255).astype(np.uint8)


def _pass(samples: np.ndarray, taps: PillowTaps, axis: int, outputs: slice) -> np.ndarray:
    """One separable pass over `axis` of uint8 samples, for the outputs in `outputs`, 32-bit sums."""
    idx = np.arange(outputs.start, outputs.stop)
    start, count, weights = taps.start[idx], taps.count[idx], taps.weights[idx]
    moved = np.moveaxis(samples, axis, 0).astype(np.int32)
    sums = np.full((len(idx), *moved.shape[1:]), ROUND_BIAS, np.int32)
    extra = (1,) * (moved.ndim - 1)
    for t in range(taps.ksize):
        source = np.minimum(start + t, moved.shape[0] - 1)  # past `count` the weight is 0
        weight = np.where(t < count, weights[:, t], 0).astype(np.int32).reshape(-1, *extra)
        sums += moved[source] * weight  # int32, as Pillow's `int ss0 += UINT8 * INT32`
    return np.moveaxis(clip8(sums), 0, axis)


@lru_cache(maxsize=1)
def pillow_major_version() -> int:
    """The installed Pillow's major version (the pass order below depends on it)."""
    from PIL import __version__

    return int(__version__.split(".")[0])


def vertical_first(width: int, height: int, out_w: int, out_h: int, *, pillow_major: int | None = None) -> bool:
    """Whether Pillow resamples the vertical axis first.

    Pillow 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height shrinks by
    more than twice as many pixels as the width: `in_h > out_h and in_h - out_h > 2 * (in_w - out_w)`
    (the rule fitted to Pillow 13.0.0 on every size pair in the tests). Earlier versions always run
    the horizontal pass first. The order matters: the intermediate image is rounded to 8 bits.
    """
    major = pillow_major_version() if pillow_major is None else pillow_major
    return major >= 13 and height > out_h and height - out_h > 2 * (width - out_w)


def resample_crop_rgb8(rgb: np.ndarray, size: tuple[int, int], box: tuple[int, int, int, int] | None = None, *,
                       pillow_major: int | None = None) -> np.ndarray:
    """`Image.fromarray(rgb).resize(size, BICUBIC).crop(box)` for (H, W, C) uint8, computing only
    what the crop keeps: the first pass for the intermediate samples the second pass reads for the
    kept outputs, then the second pass. `size` is (width, height) like Pillow's."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3:
        raise ValueError(f"expected (H, W, C) uint8 samples, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    out_w, out_h = size
    left, top, right, bottom = box if box is not None else (0, 0, out_w, out_h)
    if not (0 <= left < right <= out_w and 0 <= top < bottom <= out_h):
        raise ValueError(f"crop box {box} is not inside the {out_w}x{out_h} output")
    cols, rows = pillow_taps(width, out_w), pillow_taps(height, out_h)
    if vertical_first(width, height, out_w, out_h, pillow_major=pillow_major):
        lo, hi = cols.rows_needed(left, right)
        first = _pass(rgb[:, lo:hi], rows, axis=0, outputs=slice(top, bottom))
        return _pass(first, _shifted(cols, lo), axis=1, outputs=slice(left, right))
    lo, hi = rows.rows_needed(top, bottom)
    first = _pass(rgb[lo:hi], cols, axis=1, outputs=slice(left, right))
    return _pass(first, _shifted(rows, lo), axis=0, outputs=slice(top, bottom))


def _shifted(taps: PillowTaps, first_input: int) -> PillowTaps:
    """The same taps reading an intermediate image that starts at input `first_input`."""
    return PillowTaps(taps.n_in, taps.n_out, (taps.start - first_input).astype(np.int32), taps.count, taps.weights)


def resample_rgb8(rgb: np.ndarray, size: tuple[int, int], *, pillow_major: int | None = None) -> np.ndarray:
    """`Image.fromarray(rgb).resize(size, Image.BICUBIC)` for (H, W, C) uint8 samples, bit for bit."""
    return resample_crop_rgb8(rgb, size, pillow_major=pillow_major)


def pillow_rgb_from_scanlines(rows: np.ndarray, width: int, color_type: int, bit_depth: int) -> np.ndarray:
    """(H, W, 3) uint8 as `Image.open(png).convert("RGB")` gives it, from unfiltered scanlines
    (H, row_bytes) uint8 with 16-bit samples big-endian, as PNG stores them."""
    if color_type not in _CHANNELS or bit_depth not in (8, 16):
        raise ValueError(f"colour type {color_type} at {bit_depth} bits is left to Pillow (palette, sub-byte grey)")
    channels = _CHANNELS[color_type]
    sample_bytes = bit_depth // 8
    samples = np.asarray(rows, np.uint8).reshape(rows.shape[0], width, channels, sample_bytes)
    if color_type == _GREY and bit_depth == 16:  # mode "I;16": convert("RGB") clamps at 255
        grey = np.minimum(samples[..., 0].astype(np.uint16) << 8 | samples[..., 1], 255).astype(np.uint8)
        return np.repeat(grey, 3, axis=2)
    high = samples[..., 0]  # 8-bit samples, or the high byte of 16-bit ones
    if color_type in (_GREY, _GREY_ALPHA):
        return np.repeat(high[..., :1], 3, axis=2)
    return np.ascontiguousarray(high[..., :3])
