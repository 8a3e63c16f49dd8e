"""Preprocessing: the declared spec stored with every model, and its NumPy reference.

The reference reproduces, bit for bit, what the IWS Julia evaluation fed SAR_CNN v2
(PNGFiles load → ImageTransformations 0.10 `imresize` → Colors `Gray` → Float32 → normalise).
Every faster path (GPU kernels, other loaders) is tested against this module.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np

#: The only resize method the Julia reference used (BSpline(Linear()), no antialiasing prefilter).
JULIA_IMRESIZE_LINEAR = "julia-imresize-linear"
RESIZE_THEN_GREY = "resize-then-grey"
GREY_REC601_FIXEDPOINT = "rec601-fixedpoint"


@dataclass(frozen=True)
class PreprocessSpec:
    """How a model wants its input made from a decoded PNG; stored in every artefact."""

    mean: float
    std: float
    size: tuple[int, int] = (256, 256)  # (height, width)
    resize: str = JULIA_IMRESIZE_LINEAR
    order: str = RESIZE_THEN_GREY
    grey: str = GREY_REC601_FIXEDPOINT
    channels: int = 1
    dtype: str = "float32"
    layout: str = "NCHW"
    notes: str = field(default="", compare=False)

    def __post_init__(self):
        if self.resize != JULIA_IMRESIZE_LINEAR or self.order != RESIZE_THEN_GREY or self.grey != GREY_REC601_FIXEDPOINT:
            raise ValueError(
                f"unsupported preprocessing spec (resize={self.resize!r}, order={self.order!r}, grey={self.grey!r}); "
                f"this engine implements resize={JULIA_IMRESIZE_LINEAR!r}, order={RESIZE_THEN_GREY!r}, grey={GREY_REC601_FIXEDPOINT!r}"
            )
        if not (self.std > 0 and np.isfinite(self.mean)):
            raise ValueError(f"invalid normalisation mean={self.mean} std={self.std}")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"invalid size {self.size}")

    def to_json(self) -> str:
        d = asdict(self)
        d["size"] = list(self.size)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PreprocessSpec":
        d = json.loads(text)
        d["size"] = tuple(d["size"])
        return cls(**d)


@dataclass(frozen=True)
class AxisWeights:
    """Two-tap linear interpolation along one axis: out[i] = w0[i]*in[i0[i]] + w1[i]*in[i0[i]+1]."""

    i0: np.ndarray
    i1: np.ndarray
    w0: np.ndarray
    w1: np.ndarray


@lru_cache(maxsize=64)
def imresize_axis_weights(n_in: int, n_out: int, clamp: bool) -> AxisWeights:
    """Source taps of ImageTransformations `imresize` (linear) along one axis.

    Output pixel i (1-based) samples the source at x = s*i + (0.5 - 0.5*s), s = n_in/n_out:
    the pixel-centre convention that maps outer corners onto each other. `clamp` is set when
    any axis is enlarged (Julia then clamps every coordinate into [1, n]).
    """
    s = n_in / n_out
    offset = 1 - 0.5 - s * (1 - 0.5)  # io - 0.5 - s*(ir - 0.5) with io = ir = 1, as Julia computes it
    x = s * np.arange(1, n_out + 1, dtype=np.float64) + offset
    if clamp:
        x = np.clip(x, 1.0, float(n_in))
    # Interpolations.jl linear BSpline: ix = floor(x) kept inside [1, n-1], weights (1-δ, δ).
    ix = np.clip(np.floor(x), 1, max(n_in - 1, 1)).astype(np.int64)
    delta = x - ix
    if n_in == 1:  # a single source sample: every output equals it
        ix = np.ones_like(ix)
        delta = np.zeros_like(delta)
    i0 = ix - 1
    i1 = np.minimum(ix, n_in - 1)
    return AxisWeights(i0=i0, i1=i1, w0=1.0 - delta, w1=delta)


def _fixed_point_max(dtype: np.dtype) -> int:
    if dtype == np.uint8:
        return 255
    if dtype == np.uint16:
        return 65535
    raise TypeError(f"expected uint8 or uint16 pixels, got {dtype}")


def julia_imresize(codes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`imresize(img, size)` on fixed-point pixels (H, W, C) of uint8/uint16; returns the same dtype.

    Float64 bilinear interpolation along columns (within each row) first, then along rows,
    which is the summation order of Interpolations.jl; results rounded half-to-even back to
    the fixed-point type, as N0f8/N0f16 conversion does.
    """
    if codes.ndim != 3:
        raise ValueError(f"expected (H, W, C) pixels, got shape {codes.shape}")
    h_in, w_in, _ = codes.shape
    h_out, w_out = size
    if (h_in, w_in) == (h_out, w_out):
        return codes.copy()
    peak = _fixed_point_max(codes.dtype)
    clamp = h_out > h_in or w_out > w_in
    cw = imresize_axis_weights(w_in, w_out, clamp)
    rw = imresize_axis_weights(h_in, h_out, clamp)
    # Only the source columns that are sampled are converted to float (k/255 or k/65535 exactly).
    left = codes[:, cw.i0, :] / float(peak)
    right = codes[:, cw.i1, :] / float(peak)
    rows = cw.w0[None, :, None] * left + cw.w1[None, :, None] * right
    out = rw.w0[:, None, None] * rows[rw.i0] + rw.w1[:, None, None] * rows[rw.i1]
    return np.rint(out * float(peak)).astype(codes.dtype)


_LUMA_SCALE = np.float32(0.001)


def grey_codes(codes: np.ndarray) -> np.ndarray:
    """Colors.jl `Gray` on fixed-point codes (H, W, C) → (H, W) of the same dtype; alpha dropped."""
    channels = codes.shape[2]
    if channels in (1, 2):
        return codes[:, :, 0]
    if channels not in (3, 4):
        raise ValueError(f"unsupported channel count {channels}")
    r = codes[:, :, 0].astype(np.int64)
    g = codes[:, :, 1].astype(np.int64)
    b = codes[:, :, 2].astype(np.int64)
    luma = 299 * r + 587 * g + 114 * b
    # Float32 arithmetic on purpose: it is what the Julia conversion computes.
    return np.rint(_LUMA_SCALE * luma.astype(np.float32)).astype(codes.dtype)


def _channels_equal(rgb: np.ndarray) -> bool:
    r = rgb[:, :, 0]
    return bool(np.array_equal(r, rgb[:, :, 1]) and np.array_equal(r, rgb[:, :, 2]))


def preprocess_reference(pixels: np.ndarray, spec: PreprocessSpec, out: np.ndarray | None = None) -> np.ndarray:
    """Decoded PNG pixels (H, W, C) uint8/uint16 → normalised float32 model input (H', W').

    `out`, when given, is a float32 (H', W') array (e.g. a slice of a batch) written in place.
    """
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    peak = _fixed_point_max(pixels.dtype)
    if pixels.shape[2] in (2, 4):
        pixels = pixels[:, :, :-1]  # alpha never reaches the grey value, so skip resizing it
    if pixels.shape[2] == 3 and _channels_equal(pixels):
        # IWS quicklooks store R=G=B. Resizing is per channel, and Gray(v, v, v) == v for every
        # 8- and 16-bit code (checked exhaustively in the tests), so one channel gives the
        # identical result at a third of the work (and no luma pass).
        pixels = pixels[:, :, :1]
    resized = julia_imresize(pixels, spec.size)
    grey = grey_codes(resized)
    x = grey.astype(np.float32) / np.float32(peak)
    if out is None:
        out = np.empty(spec.size, dtype=np.float32)
    np.subtract(x, np.float32(spec.mean), out=out)
    np.divide(out, np.float32(spec.std), out=out)
    return out


def iws_sarcnn_spec(mean: float, std: float) -> PreprocessSpec:
    """The IWS SAR_CNN v2 spec, with the checkpoint's Float32 normalisation statistics."""
    return PreprocessSpec(
        mean=float(np.float32(mean)),
        std=float(np.float32(std)),
        notes="PNGFiles load -> ImageTransformations 0.10 imresize (linear, no antialias) -> Colors Gray -> Float32 -> (x-mean)/std",
    )
