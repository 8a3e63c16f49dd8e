"""The general PNG decoder (png.decode_parsed): native (kernels/png_decode_general.cpp) = NumPy spec = libpng.

Three implementations of unfilter + de-interlace + unpack are compared on the stored samples, then on the decoded
arrays (palette, tRNS, sub-byte scaling and gamma applied with png.py's tables):
- png._unfilter_numpy, the spec (the fallback where the native core is not built);
- the native core, through decode_parsed(native=True);
- libpng's own unfilter through OpenCV, on the verified scanlines re-wrapped as stored-deflate blocks: the decoder
  this one replaced, kept here as an oracle (OpenCV is a dependency of the engine for encoding anyway).
tests/test_png.py checks decode_png (native by default) against Pillow, an independent pure-Python decoder and libpng
driven with PNGFiles.jl's transform sequence.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from iws_engine.export.synth import encode_png_samples, render_vignette
from iws_engine.loaders import native
from iws_engine.loaders import png
from iws_engine.loaders.png import PngError, decode_parsed, decode_png, inflate_idat, parse_png
from tests.pngtools import SIGNATURE, chunk
from tests.test_png import ALL_FORMATS, CHANNELS, VALID_FOLDERS, encode_png, expected_from_samples, filter_image
from tests.test_png import independent_decode, random_pixels, suite_params

needs_native = pytest.mark.skipif(not native.available(),
                                  reason="the native decode core is not built (pip install -e . builds it with CMake)")

# --- the oracle: libpng's unfilter through OpenCV, as png.py did it before the native decoder -------------------


def _stored_png(info: png.PngInfo, raw: bytes) -> bytes:
    """A minimal PNG holding `raw` in stored deflate blocks; palette images declared as grey (same scanlines)."""
    color_type = 0 if info.color_type == 3 else info.color_type
    ihdr = struct.pack(">IIBBBBB", info.width, info.height, info.bit_depth, color_type, 0, 0, info.interlace)
    blocks = [b"\x78\x01"]
    for start in range(0, len(raw), 65_535):
        block = raw[start : start + 65_535]
        blocks.append(struct.pack("<BHH", start + 65_535 >= len(raw), len(block), len(block) ^ 0xFFFF) + block)
    idat = b"".join(blocks) + struct.pack(">I", zlib.adler32(raw))
    return SIGNATURE + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND")


def libpng_samples(info: png.PngInfo, raw: bytes) -> np.ndarray:
    """Stored samples in _unfilter_numpy's layout (R,G,B order; sub-byte values and palette indices unscaled)."""
    import cv2

    img = cv2.imdecode(np.frombuffer(_stored_png(info, raw), np.uint8), cv2.IMREAD_UNCHANGED)
    assert img is not None and img.shape[:2] == (info.height, info.width)
    ct = info.color_type
    if ct in (0, 3):
        img = img[:, :, None]
        if info.bit_depth < 8:  # libpng expands 1/2/4-bit grey to 8 bits
            img = img // (255 // ((1 << info.bit_depth) - 1))
        return img
    if ct == 4:
        return img[:, :, [0, 3]]  # OpenCV expands grey+alpha to BGRA with B=G=R
    return img[:, :, [2, 1, 0]] if ct == 2 else img[:, :, [2, 1, 0, 3]]


def assert_identical(actual: np.ndarray, expected: np.ndarray, what: str = "") -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert actual.flags.c_contiguous
    np.testing.assert_array_equal(actual, expected, err_msg=what)


def check_all_decoders(data: bytes, what: str = "") -> np.ndarray:
    """Spec samples = libpng samples; decode_parsed native = NumPy = png._to_output(libpng samples). Returns it."""
    info = parse_png(data)
    raw = inflate_idat(info)
    spec = png._unfilter_numpy(info, raw, None)
    assert_identical(spec, libpng_samples(info, raw), what)
    expected = png._to_output(info, spec)
    assert_identical(decode_parsed(info, native=False), expected, what)
    if native.available():
        assert_identical(decode_parsed(info, native=True), expected, what)
        assert_identical(decode_png(data), expected, what)  # the default takes the native core
    return expected


# --- PngSuite: every valid file (all interlaced ones included) and the bad-palette files ----------------------------


@pytest.mark.reference
@pytest.mark.parametrize("path", suite_params(*VALID_FOLDERS, "testpngs/badpal"))
def test_pngsuite_file_decodes_identically(path) -> None:
    check_all_decoders(path.read_bytes(), str(path))


# --- random images: every format, both interlace methods, tiny shapes, tRNS, gamma ----------------------------------

SHAPES = [(1, 1), (1, 2), (2, 1), (1, 9), (9, 1), (3, 3), (2, 7), (7, 5), (8, 8), (9, 17), (17, 9), (21, 33)]


def variants(rng: np.random.Generator, pixels: np.ndarray, color_type: int, bit_depth: int):
    """(extra chunks, palette) per variant: plain, tRNS (grey/RGB key or palette alphas), gamma correction."""
    gama = chunk(b"gAMA", struct.pack(">I", 100_000))  # 1.0: libpng corrects (|1.0 * 2.2 - 1| > 0.05)
    if color_type == 3:
        entries = int(rng.integers(1, (1 << bit_depth) + 1))  # fewer entries than indices: black, opaque
        palette = rng.integers(0, 256, (entries, 3)).astype(np.uint8)
        plte = chunk(b"PLTE", palette.tobytes())
        trns = chunk(b"tRNS", rng.integers(0, 256, int(rng.integers(1, entries + 1))).astype(np.uint8).tobytes())
        return [(plte, palette), (plte + trns, palette), (gama + plte + trns, palette)]
    out = [(b"", None), (gama, None)]
    if color_type in (0, 2):
        key = pixels.reshape(-1, CHANNELS[color_type])[-1]  # the last pixel's colour: at least one match
        trns = chunk(b"tRNS", struct.pack(f">{len(key)}H", *map(int, key)))
        out += [(trns, None), (gama + trns, None)]
    return out


@pytest.mark.parametrize("color_type, bit_depth", ALL_FORMATS, ids=[f"ct{c}-{b}bit" for c, b in ALL_FORMATS])
def test_random_images_decode_identically(color_type: int, bit_depth: int) -> None:
    rng = np.random.default_rng([color_type, bit_depth])
    for shape in SHAPES:  # widths < 8 leave Adam7 passes empty; rows cycle through all five filter types per pass
        pixels = random_pixels(rng, *shape, color_type, bit_depth)
        for extra, palette in variants(rng, pixels, color_type, bit_depth):
            for interlace in (0, 1):
                data = encode_png(pixels, color_type, bit_depth, interlace=interlace, extra=extra)
                what = f"ct{color_type} {bit_depth}-bit {shape} interlace={interlace} extra={extra[:40]!r}"
                decoded = check_all_decoders(data, what)
                if b"gAMA" not in extra and b"tRNS" not in extra:
                    full = palette if palette is None else np.vstack([palette, np.zeros((256, 3), np.uint8)])
                    assert_identical(decoded, expected_from_samples(pixels, color_type, bit_depth, full), what)
                    assert_identical(decoded, independent_decode(data), what)


@pytest.mark.parametrize("row_filter", ["none", "sub", "up", "average", "paeth"])
def test_each_filter_type_on_its_own(row_filter: str) -> None:
    """Every row one filter type, on the pixel sizes the unfilter specialises (1, 2, 3, 4, 6, 8 bytes), both layouts."""
    rng = np.random.default_rng(len(row_filter))
    for color_type, bit_depth in [(0, 2), (0, 8), (4, 8), (2, 8), (6, 8), (2, 16), (6, 16)]:
        pixels = random_pixels(rng, 23, 19, color_type, bit_depth)
        for interlace in (False, True):
            data = encode_png_samples(pixels, color_type, bit_depth, interlace=interlace, row_filter=row_filter)
            assert_identical(check_all_decoders(data), expected_from_samples(pixels, color_type, bit_depth))


# --- vignette-sized interlaced and palette images (native vs libpng only: the NumPy spec is slow at this size) ------


@needs_native
@pytest.mark.parametrize("fmt", ["adam7-rgba16", "adam7-grey8", "palette8", "adam7-palette4"])
def test_vignettes_equal_libpng(fmt: str) -> None:
    field = render_vignette(np.random.default_rng(8), True, 132, 135)  # a quarter of 528 x 539: odd sizes
    interlace = fmt.startswith("adam7")
    if fmt.endswith("rgba16"):
        grey = np.rint(field * 65535).astype(np.uint16)[:, :, None]
        samples, color_type, bit_depth, palette = np.concatenate([grey] * 3 + [grey // 2], 2), 6, 16, None
    elif fmt.endswith("grey8"):
        samples, color_type, bit_depth, palette = np.rint(field * 255).astype(np.uint8)[:, :, None], 0, 8, None
    else:
        bit_depth = 8 if fmt.endswith("8") else 4
        levels = (1 << bit_depth) - 1
        samples = np.rint(field * levels).astype(np.uint8)[:, :, None]
        color_type, palette = 3, np.repeat(np.linspace(0, 255, levels + 1).astype(np.uint8)[:, None], 3, 1)
    data = encode_png_samples(samples, color_type, bit_depth, interlace=interlace, palette=palette, row_filter="all")
    info = parse_png(data)
    raw = inflate_idat(info)
    expected = png._to_output(info, libpng_samples(info, raw))
    assert_identical(decode_png(data), expected, fmt)
    if color_type == 3:
        assert_identical(decode_png(data), palette[samples[:, :, 0]], fmt)


# --- errors -----------------------------------------------------------------------------------------------------------


def test_invalid_filter_type_names_the_adam7_pass_and_row() -> None:
    # 3x3 grey 8-bit, Adam7 passes 1..7 as (width x height): 1x1, empty, empty, 1x1, 2x1, 1x2, 3x1.
    pixels = np.arange(9, dtype=np.uint8).reshape(3, 3, 1)
    subs = [pixels[y0::dy, x0::dx] for x0, y0, dx, dy in png._ADAM7]
    parts = [bytearray(filter_image(s, 8, k)) for k, s in enumerate(subs) if s.size]
    parts[3][2] = 9  # pass 6 (the fourth non-empty one) is 1 pixel wide: its row 1 starts at byte 2
    data = encode_png(pixels, 0, 8, interlace=1, raw=b"".join(map(bytes, parts)))
    info = parse_png(data)
    for use_native in (False, True) if native.available() else (False,):
        with pytest.raises(PngError) as caught:
            decode_parsed(info, path="x.png", native=use_native)
        assert str(caught.value) == "x.png: invalid filter type 9 on Adam7 pass 6 row 1"


def test_invalid_filter_type_in_a_palette_image_with_both_decoders() -> None:
    pixels = np.zeros((4, 5, 1), np.uint8)
    raw = bytearray(filter_image(pixels, 2))
    raw[3 * 3] = 5  # 5 pixels of 2 bits: 2 bytes + filter byte per row; row 3
    data = encode_png(pixels, 3, 2, raw=bytes(raw), extra=chunk(b"PLTE", bytes(12)))
    for use_native in (False, True) if native.available() else (False,):
        with pytest.raises(PngError, match=r"^invalid filter type 5 on row 3$"):
            decode_parsed(parse_png(data), native=use_native)


def test_native_true_without_the_core_is_an_error(monkeypatch) -> None:
    monkeypatch.setattr(png, "_native_decode_general", None)
    data = encode_png(np.zeros((2, 2, 1), np.uint8), 0, 8)
    with pytest.raises(RuntimeError, match="not built"):
        decode_parsed(parse_png(data), native=True)
    np.testing.assert_array_equal(decode_png(data), np.zeros((2, 2, 1), np.uint8))  # the NumPy spec decodes it


@needs_native
def test_native_refuses_inconsistent_arguments() -> None:
    """Caller bugs are refused (pass -2, a reason) before any memory is touched; the fuzz harness drives the same."""
    from iws_engine.kernels import _cpu_decode as core

    u8, u16 = np.zeros(0, np.uint8), np.zeros(0, np.uint16)
    raw = np.zeros(3 * (1 + 4), np.uint8)  # 4x3 grey 8-bit

    def call(raw=raw, width=4, height=3, depth=8, ct=0, interlace=0, palette=u8, trns=u16, gamma=u16, out_len=12):
        return core.decode_general(raw, width, height, depth, ct, interlace, palette, trns, gamma,
                                   np.zeros(out_len, np.uint8))

    assert call() == (-1, 0, 0, "")
    bad = {"raw is not the image's scanlines": [dict(raw=raw[:-1]), dict(interlace=1)],
           "the output is not H * W * C samples": [dict(out_len=11), dict(out_len=13)],
           "invalid bit depth": [dict(depth=3), dict(ct=2, depth=4)],
           "invalid colour type": [dict(ct=5)], "invalid interlace method": [dict(interlace=2)],
           "width and height must be": [dict(width=0, out_len=0)],
           "a table for a non-palette image": [dict(palette=np.zeros(768, np.uint8))],
           "a palette image needs": [dict(ct=3, palette=np.zeros(700, np.uint8))],
           "a tRNS key needs": [dict(trns=np.zeros(3, np.uint16))],
           "tRNS key beyond": [dict(trns=np.full(1, 256, np.uint16))],
           "the gamma table needs": [dict(gamma=np.zeros(255, np.uint16))],
           "gamma table beyond 8 bits": [dict(gamma=np.full(256, 256, np.uint16))]}
    for reason, cases in bad.items():
        for kwargs in cases:
            number, _, _, refusal = call(**kwargs)
            assert number == -2 and refusal.startswith("decode_general: " + reason), (kwargs, refusal)


@needs_native
def test_the_gil_is_released_and_threads_decode_independently() -> None:
    """While one thread is inside a long general decode, another keeps running Python code; concurrent decodes (each
    thread with its own row buffers) give the single-threaded arrays."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from iws_engine.kernels import _cpu_decode as core

    height, width = 1500, 1500  # Adam7 RGBA16 of random filtered bytes with valid filter types: ~100 ms of work
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, png._raw_size(width, height, 64, 1), dtype=np.uint8)
    pos = 0
    for x0, y0, dx, dy in png._ADAM7:  # every filter byte valid
        pass_w, pass_h = len(range(x0, width, dx)), len(range(y0, height, dy))
        stride = 1 + pass_w * 8
        raw[pos : pos + pass_h * stride : stride] = rng.integers(0, 5, pass_h)
        pos += pass_h * stride
    none = np.zeros(0, np.uint8), np.zeros(0, np.uint16)
    out = np.empty(height * width * 8, np.uint8)
    inside = threading.Event()
    result = []

    def decode():
        inside.set()
        result.append(core.decode_general(raw, width, height, 16, 6, 1, none[0], none[1], none[1], out))

    worker = threading.Thread(target=decode)
    worker.start()
    inside.wait()
    time.sleep(0.005)  # hands the GIL to the worker, which enters the native call
    steps = 0
    while worker.is_alive():  # with the GIL held by the decode, this loop could not run until it returned
        steps += 1
    worker.join()
    assert result == [(-1, 0, 0, "")]
    assert steps > 1000, steps

    files = [encode_png(random_pixels(np.random.default_rng(k), 37, 29, 6, 16), 6, 16, interlace=k % 2)
             for k in range(8)]
    alone = [decode_png(f) for f in files]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(3):
            for got, expected in zip(pool.map(decode_png, files), alone):
                assert_identical(got, expected)
