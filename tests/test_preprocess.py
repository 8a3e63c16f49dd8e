"""The NumPy preprocessing reference against a literal, pixel-by-pixel transcription of the Julia stack."""

from __future__ import annotations

import math

import numpy as np
import pytest

from iws_engine.preprocess import PreprocessSpec, grey_codes, julia_imresize, preprocess_reference


def julia_pixel_by_pixel(codes: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """ImageTransformations.imresize! + Interpolations BSpline(Linear()) + N0f conversion, one pixel at a time."""
    peak = 255 if codes.dtype == np.uint8 else 65535
    h, w, c = codes.shape
    s1, s2 = h / out_h, w / out_w
    off1, off2 = 1 - 0.5 - s1 * (1 - 0.5), 1 - 0.5 - s2 * (1 - 0.5)
    enlarge = s1 < 1 or s2 < 1
    out = np.zeros((out_h, out_w, c), codes.dtype)
    for i in range(1, out_h + 1):
        for j in range(1, out_w + 1):
            x1, x2 = s1 * i + off1, s2 * j + off2
            if enlarge:
                x1, x2 = min(max(x1, 1.0), h), min(max(x2, 1.0), w)
            i1 = min(max(math.floor(x1), 1), max(h - 1, 1))
            i2 = min(max(math.floor(x2), 1), max(w - 1, 1))
            d1, d2 = (x1 - i1, x2 - i2)
            if h == 1:
                i1, d1 = 1, 0.0
            if w == 1:
                i2, d2 = 1, 0.0
            for ch in range(c):
                a = lambda r, q: int(codes[r - 1, q - 1, ch]) / peak  # noqa: E731  (Float64 of N0f)
                r2, q2 = min(i1 + 1, h), min(i2 + 1, w)
                # the first index is the outer sum in Interpolations.jl
                v = (1 - d1) * ((1 - d2) * a(i1, i2) + d2 * a(i1, q2)) + d1 * ((1 - d2) * a(r2, i2) + d2 * a(r2, q2))
                out[i - 1, j - 1, ch] = round(v * peak)  # Python round: half to even, like Julia's
    return out


@pytest.mark.parametrize(
    "shape,size,dtype",
    [
        ((53, 47, 3), (16, 16), np.uint16),
        ((40, 61, 1), (17, 13), np.uint8),
        ((9, 7, 3), (20, 15), np.uint8),  # enlarge both axes (clamped)
        ((30, 5, 1), (10, 12), np.uint16),  # shrink one axis, enlarge the other
        ((64, 64, 3), (32, 32), np.uint8),  # s = 2: weights 0.5/0.5, exact ties
        ((1, 9, 1), (3, 3), np.uint8),  # a single row
    ],
)
def test_resize_matches_pixel_by_pixel_julia(shape, size, dtype):
    rng = np.random.default_rng(sum(shape))
    peak = np.iinfo(dtype).max
    codes = rng.integers(0, peak + 1, size=shape, dtype=np.int64).astype(dtype)
    got = julia_imresize(codes, size)
    want = julia_pixel_by_pixel(codes, *size)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)


def test_ties_round_half_to_even():
    # 2x downsample of [1, 2] pairs averages to 1.5 → 2 and [2, 3] → 2.5 → 2 (half to even)
    codes = np.array([[[1], [2], [2], [3]]], dtype=np.uint8).repeat(2, axis=0)
    got = julia_imresize(codes, (1, 2))
    assert got[0, :, 0].tolist() == [2, 2]


def test_grey_rec601_on_fixed_point_codes():
    rng = np.random.default_rng(1)
    for dtype in (np.uint8, np.uint16):
        rgb = rng.integers(0, np.iinfo(dtype).max + 1, size=(20, 20, 3)).astype(dtype)
        got = grey_codes(rgb)
        r, g, b = (rgb[..., k].astype(np.int64) for k in range(3))
        s = 299 * r + 587 * g + 114 * b
        want = np.array([round(float(np.float32(0.001) * np.float32(v))) for v in s.ravel()]).reshape(s.shape)
        np.testing.assert_array_equal(got, want.astype(dtype))
        equal = np.repeat(rgb[..., :1], 3, axis=2)  # R=G=B stays itself
        np.testing.assert_array_equal(grey_codes(equal), equal[..., 0])


def test_full_reference_normalises_in_float32():
    spec = PreprocessSpec(mean=0.37975472, std=0.1560785, size=(8, 8))
    rng = np.random.default_rng(2)
    rgba = rng.integers(0, 65536, size=(20, 24, 4)).astype(np.uint16)
    x = preprocess_reference(rgba, spec)
    grey = grey_codes(julia_pixel_by_pixel(rgba[..., :3], 8, 8))
    want = (grey.astype(np.float32) / np.float32(65535) - np.float32(spec.mean)) / np.float32(spec.std)
    assert x.dtype == np.float32 and x.shape == (8, 8)
    np.testing.assert_array_equal(x, want)
    # alpha never changes the result
    rgba2 = rgba.copy()
    rgba2[..., 3] = 0
    np.testing.assert_array_equal(preprocess_reference(rgba2, spec), x)


def test_common_resizers_differ_from_the_reference():
    """Why the reference exists: float32 torch bilinear and cv2 on uint8 do not reproduce Julia's imresize."""
    import cv2
    import torch

    rng = np.random.default_rng(3)
    img16 = rng.integers(0, 65536, size=(528, 539, 1)).astype(np.uint16)
    ref16 = julia_imresize(img16, (256, 256))[..., 0]
    t = torch.nn.functional.interpolate(
        torch.from_numpy(img16[..., 0] / 65535.0).float()[None, None], size=(256, 256), mode="bilinear", align_corners=False
    )
    torch_codes = np.rint(t[0, 0].numpy().astype(np.float64) * 65535).astype(np.uint16)
    assert (torch_codes != ref16).mean() > 1e-4  # ~0.1% of pixels off by one code
    img8 = (img16 >> 8).astype(np.uint8)
    cv = cv2.resize(img8[..., 0], (256, 256), interpolation=cv2.INTER_LINEAR)
    assert (cv != julia_imresize(img8, (256, 256))[..., 0]).mean() > 0.01


def test_spec_round_trip_and_refusal():
    spec = PreprocessSpec(mean=0.5, std=0.25)
    assert PreprocessSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="unsupported preprocessing spec"):
        PreprocessSpec(mean=0.5, std=0.25, resize="pil-bilinear")
    with pytest.raises(ValueError, match="invalid normalisation"):
        PreprocessSpec(mean=0.5, std=0.0)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_grey_of_equal_channels_is_the_code_itself(dtype):
    """Every code v: Gray(v, v, v) == v. This licenses preprocessing R=G=B images from one channel."""
    v = np.arange(np.iinfo(dtype).max + 1, dtype=dtype)
    np.testing.assert_array_equal(grey_codes(np.stack([v, v, v], axis=-1)[None])[0], v)


def test_equal_channel_shortcut_gives_the_full_path_result():
    spec = PreprocessSpec(mean=0.38, std=0.156, size=(16, 16))
    rng = np.random.default_rng(7)
    grey = rng.integers(0, 65536, size=(41, 37, 1)).astype(np.uint16)
    rgba = np.concatenate([grey, grey, grey, np.full_like(grey, 65535)], axis=2)
    via_shortcut = preprocess_reference(rgba, spec)
    full = (grey_codes(julia_pixel_by_pixel(rgba[..., :3], 16, 16)).astype(np.float32) / np.float32(65535)
            - np.float32(spec.mean)) / np.float32(spec.std)
    np.testing.assert_array_equal(via_shortcut, full)
    rgba[3, 4, 1] += 1  # one differing sample: the full colour path must be taken
    almost = preprocess_reference(rgba, spec)
    np.testing.assert_array_equal(
        almost,
        (grey_codes(julia_pixel_by_pixel(rgba[..., :3], 16, 16)).astype(np.float32) / np.float32(65535)
         - np.float32(spec.mean)) / np.float32(spec.std))
