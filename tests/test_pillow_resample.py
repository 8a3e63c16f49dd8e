"""engine/pillow_resample.py and preprocess_clip_scanlines: Pillow's conversion and resampling without Pillow.

Everything here is checked bit for bit against the installed Pillow: `Image.resize(size, BICUBIC)` on
many size pairs (down, up, mixed, odd, 1-pixel edges, both pass orders) and contents, `convert("RGB")`
from the raw samples of every PNG format the GPU path takes, and the whole Pipeline A preprocessing
(`preprocess_clip_reference`) on synthetic IWS vignettes and random images.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from iws_engine.loaders.png import decode_png, parse_png
from iws_engine.pillow_resample import (
    PRECISION_BITS,
    pillow_major_version,
    pillow_rgb_from_scanlines,
    pillow_taps,
    resample_crop_rgb8,
    resample_rgb8,
    vertical_first,
)
from iws_engine.preprocess_clip import (
    EVA02_L448_SPEC,
    ClipPreprocessSpec,
    preprocess_clip_reference,
    preprocess_clip_scanlines,
)
from tests.pngtools import chunk, without_chunks
from tests.test_gpu_loader import CHANNELS, SRGB, gama, make_png, random_pixels, scanlines_of

SPEC_SMALL = ClipPreprocessSpec(size=40)  # the same preprocessing at a test size


def pillow_resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BICUBIC))


def contents(rng: np.random.Generator, height: int, width: int) -> dict[str, np.ndarray]:
    """Random (every channel different), extreme (0/255 checkerboard: clipping both ways), smooth."""
    y, x = np.mgrid[0:height, 0:width]
    checker = (((x + y) % 2) * 255).astype(np.uint8)
    smooth = np.dstack([(127.5 + 127.5 * np.sin(x / 3.0 + c) * np.cos(y / 5.0)).astype(np.uint8) for c in range(3)])
    return {"random": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
            "checker": np.dstack([checker, 255 - checker, checker]), "smooth": smooth}


# --- resampling ---------------------------------------------------------------------------------------

SIZE_PAIRS = [  # ((height, width), (out_width, out_height)) as Image.resize takes them
    ((528, 539), (457, 448)),  # the IWS vignette (horizontal pass first in every Pillow)
    ((539, 528), (448, 457)),
    ((1000, 449), (448, 997)),  # portrait: Pillow 13 resamples vertically first
    ((200, 300), (672, 448)),  # upscaling
    ((449, 448), (448, 449)),  # one axis down by one pixel, the other up by one
    ((2048, 2048), (448, 448)),  # 4.6x down: 21 taps
    ((600, 3000), (1344, 448)),  # one long axis
    ((17, 13), (5, 13)), ((17, 13), (13, 5)), ((13, 17), (29, 3)),  # one axis unchanged (not resampled)
    ((1, 1), (5, 3)), ((1, 7), (1, 3)), ((9, 1), (3, 4)), ((3, 1000), (1, 2)), ((7, 7), (1, 1)),  # 1-pixel edges
    ((20, 20), (27, 10)), ((31, 33), (20, 10)), ((40, 33), (20, 10)),  # pass-order boundaries
]


@pytest.mark.parametrize("shape, size", SIZE_PAIRS, ids=[f"{s[1]}x{s[0]}-{o[0]}x{o[1]}" for s, o in SIZE_PAIRS])
def test_resample_equals_pillow(shape, size) -> None:
    rng = np.random.default_rng(shape[0] * 7919 + size[0])
    for name, rgb in contents(rng, *shape).items():
        np.testing.assert_array_equal(resample_rgb8(rgb, size), pillow_resize(rgb, size), err_msg=name)


def test_resample_equals_pillow_on_random_sizes() -> None:
    rng = np.random.default_rng(42)
    for _ in range(150):
        h, w, out_h, out_w = (int(v) for v in rng.integers(1, 300, 4))
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(resample_rgb8(rgb, (out_w, out_h)), pillow_resize(rgb, (out_w, out_h)),
                                      err_msg=f"{w}x{h} -> {out_w}x{out_h}")


def test_pass_order_matters_and_follows_the_installed_pillow() -> None:
    """Each pass rounds to 8 bits, so the order changes values; Pillow 13 (#9549) changed it for
    images whose height shrinks more than twice as much as their width."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (1000, 449, 3), dtype=np.uint8)
    size = (448, 997)
    other = resample_rgb8(rgb, size, pillow_major=12 if pillow_major_version() >= 13 else 13)
    assert not np.array_equal(other, pillow_resize(rgb, size))  # the test can see the difference
    assert vertical_first(449, 1000, 448, 997, pillow_major=13)
    assert not vertical_first(449, 1000, 448, 997, pillow_major=12)
    assert not vertical_first(539, 528, 457, 448, pillow_major=13)  # IWS vignettes: horizontal first either way
    assert not vertical_first(29, 8, 39, 19, pillow_major=13)  # enlarging the height: horizontal first
    assert vertical_first(20, 20, 27, 10, pillow_major=13)  # enlarging the width, shrinking the height


@pytest.mark.parametrize("pillow_major", [12, 13])
def test_crop_window_computes_the_same_bytes(pillow_major: int) -> None:
    """Computing only the kept outputs (and the intermediate samples they read) changes no value."""
    rng = np.random.default_rng(4)
    for shape, size, box in [((528, 539), (457, 448), (4, 0, 452, 448)), ((1000, 449), (448, 997), (0, 274, 448, 722)),
                             ((60, 50), (55, 40), (3, 7, 40, 33)), ((30, 30), (60, 60), (59, 0, 60, 60))]:
        rgb = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        full = resample_rgb8(rgb, size, pillow_major=pillow_major)
        left, top, right, bottom = box
        np.testing.assert_array_equal(resample_crop_rgb8(rgb, size, box, pillow_major=pillow_major),
                                      full[top:bottom, left:right])


def test_taps_match_pillows_rules() -> None:
    """Bounds within the image, at most ksize taps, weights summing to ~2^22, and the headroom
    the 32-bit sums rely on (kernels/clip_resize.cu): positive weights below 1.25 * 2^22."""
    worst = 0.0
    for n_in in [*range(1, 40), 448, 449, 528, 539, 1000, 2048, 4000]:
        for n_out in [*range(1, 40), 448, 457, 672, 997]:
            taps = pillow_taps(n_in, n_out, resample=True)
            assert np.all(taps.start >= 0) and np.all(taps.start + taps.count <= n_in) and np.all(taps.count >= 1)
            assert np.all(taps.count <= taps.ksize)
            assert np.all(np.diff(taps.start) >= 0) and np.all(np.diff(taps.start + taps.count) >= 0)  # monotonic
            sums = taps.weights.astype(np.int64).sum(axis=1)
            assert np.all(np.abs(sums - (1 << PRECISION_BITS)) <= taps.ksize)  # rounding of each tap
            positive = np.where(taps.weights > 0, taps.weights, 0).astype(np.int64).sum(axis=1)
            worst = max(worst, positive.max() / (1 << PRECISION_BITS))
    assert worst < 1.25
    assert (1 << (PRECISION_BITS - 1)) + 255 * 1.25 * (1 << PRECISION_BITS) < 2**31
    identity = pillow_taps(37, 37)  # an axis Pillow does not resample
    assert identity.ksize == 1 and np.all(identity.weights == 1 << PRECISION_BITS)
    np.testing.assert_array_equal(identity.start, np.arange(37))


# --- Pillow's loading semantics from raw PNG samples --------------------------------------------------

GPU_FORMATS = [(0, 8), (0, 16), (4, 8), (4, 16), (2, 8), (2, 16), (6, 8), (6, 16)]  # (colour type, bit depth)


def ancillary(color_type: int, bit_depth: int) -> dict[str, bytes]:
    """Chunks Pillow ignores when it converts to RGB (libpng would apply some of them)."""
    extra = {"plain": b"", "gAMA": gama(100_000), "sRGB+gAMA": SRGB + gama(45_455),
             "sBIT": chunk(b"sBIT", bytes([5] * CHANNELS[color_type]))}
    if color_type in (0, 2):  # a colour key: Pillow keeps it as info["transparency"], pixels untouched
        extra["tRNS"] = chunk(b"tRNS", bytes(2 if color_type == 0 else 6))
    return extra


@pytest.mark.parametrize("color_type, bit_depth", GPU_FORMATS)
def test_rgb_conversion_equals_pillows_convert(color_type: int, bit_depth: int) -> None:
    rng = np.random.default_rng(color_type * 31 + bit_depth)
    for name, extra in ancillary(color_type, bit_depth).items():
        pixels = random_pixels(rng, 13, 17, color_type, bit_depth)
        if bit_depth == 16:  # values around Pillow's 255 clamp of I;16 and around the high-byte boundaries
            pixels[:5] = rng.integers(0, 600, pixels[:5].shape)
        pixels[0, 0] = 0  # matches the tRNS key
        data = make_png(pixels, color_type, bit_depth, extra=extra)
        expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        ours = pillow_rgb_from_scanlines(scanlines_of(pixels, bit_depth), 17, color_type, bit_depth)
        assert ours.dtype == np.uint8 and ours.shape == (13, 17, 3)
        np.testing.assert_array_equal(ours, expected, err_msg=f"colour type {color_type}, {bit_depth}-bit, {name}")


def test_rgb_conversion_leaves_palette_and_sub_byte_to_pillow() -> None:
    with pytest.raises(ValueError, match="left to Pillow"):
        pillow_rgb_from_scanlines(np.zeros((2, 2), np.uint8), 2, 3, 8)
    with pytest.raises(ValueError, match="left to Pillow"):
        pillow_rgb_from_scanlines(np.zeros((2, 1), np.uint8), 4, 0, 2)


# --- the whole preprocessing --------------------------------------------------------------------------


def unfiltered_scanlines(data: bytes) -> np.ndarray:
    """(H, row_bytes) as the PNG stores its samples (unfiltering comes before gamma, so gAMA is dropped)."""
    info = parse_png(data)
    pixels = decode_png(without_chunks(data, b"gAMA"))[:, :, : info.channels]
    return scanlines_of(pixels, info.bit_depth)


def check_full_path(data: bytes, spec=EVA02_L448_SPEC) -> None:
    info = parse_png(data)
    ours = preprocess_clip_scanlines(unfiltered_scanlines(data), info.width, info.color_type, info.bit_depth, spec)
    expected = preprocess_clip_reference(data, spec)
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    np.testing.assert_array_equal(ours, expected)


@pytest.mark.parametrize("fmt", ["rgba16", "gray8", "gray16", "rgb8"])
def test_full_path_equals_reference_on_synthetic_vignettes(fmt: str) -> None:
    from iws_engine.export.synth import encode_png, render_vignette

    rng = np.random.default_rng(["rgba16", "gray8", "gray16", "rgb8"].index(fmt))
    for positive in (True, False):
        check_full_path(encode_png(render_vignette(rng, positive, 528, 539), fmt))


@pytest.mark.parametrize("color_type, bit_depth", GPU_FORMATS)
def test_full_path_equals_reference_on_random_images(color_type: int, bit_depth: int) -> None:
    """Distinct channels, every geometry: landscape, portrait (vertical pass first), upscaled, exact size,
    1-pixel edges; a gAMA chunk that Pillow ignores."""
    rng = np.random.default_rng(100 + color_type * 17 + bit_depth)
    shapes = [(528, 539), (120, 41), (30, 25), (40, 40), (1, 3), (5, 1)]
    for h, w in shapes:
        pixels = random_pixels(rng, h, w, color_type, bit_depth)
        if color_type == 0 and bit_depth == 16:
            pixels[: h // 2] = rng.integers(0, 300, pixels[: h // 2].shape)  # not all saturated
        extra = gama(100_000) if h == 30 else b""
        spec = EVA02_L448_SPEC if h == 528 else SPEC_SMALL
        check_full_path(make_png(pixels, color_type, bit_depth, extra=extra), spec)
