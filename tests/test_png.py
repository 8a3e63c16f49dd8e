"""engine/loaders/png.py against Pillow, a decoder written independently here, and libpng itself.

Oracles, from weakest to strongest:
- Pillow, on the valid pngsuite files, where its semantics are the same (it drops 16-bit colour to
  8 bits and never applies gamma, so those are compared as `ours >> 8` and on gAMA-stripped copies);
- `independent_decode` below (pure-Python unfiltering), for synthetic files and the 32x32 suite;
- libpng 1.6, driven through ctypes with PNGFiles.jl's call sequence, when libpng16 is installed:
  the only oracle for the gamma rule short of Julia itself.
Malformed files run in a worker process under a timeout, so a crash or hang fails a test
instead of killing pytest.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import io
import json
import math
import os
import pickle
import selectors
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from iws_engine.loaders.png import PngError, decode_png, decode_png_file, parse_png
from tests.conftest import PNGSUITE
from tests.pngtools import SIGNATURE, chunk, iter_chunks, without_chunks


def script_env() -> dict[str, str]:
    """This file also runs as a script (the libpng oracle, the crash-isolating decode worker): let it import `tests`."""
    paths = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths))}


ABSENT = f"reference PNGs absent: {PNGSUITE} (tests read ../shared/reference next to the repo)"
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
ALL_FORMATS = [(0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16), (3, 1), (3, 2), (3, 4), (3, 8),
               (4, 8), (4, 16), (6, 8), (6, 16)]  # fmt: skip


# --- reference files ------------------------------------------------------------------------------


def suite_params(*folders: str) -> list:
    """One pytest param per PNG in the given pngsuite folders, or one skipped param if absent."""
    if not PNGSUITE.is_dir():
        return [pytest.param(None, marks=pytest.mark.skip(reason=ABSENT), id="pngsuite-absent")]
    files = sorted(p for folder in folders for p in (PNGSUITE / folder).glob("*.png"))
    return [pytest.param(p, id=str(p.relative_to(PNGSUITE))) for p in files]


VALID_FOLDERS = ("basic", "basic/interlaced", "testpngs", "testpngs/png-3")
VALID = suite_params(*VALID_FOLDERS)
MALFORMED = suite_params("testpngs/crashers", "testpngs/badpal")





# --- an independent encoder and decoder -----------------------------------------------------------


def paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else b if pb <= pc else c


def predictor(ftype: int, a: int, b: int, c: int) -> int:
    return (0, a, b, (a + b) // 2, paeth(a, b, c))[ftype]


def pack_row(samples: np.ndarray, bit_depth: int) -> bytes:
    if bit_depth == 16:
        return samples.astype(">u2").tobytes()
    if bit_depth == 8:
        return samples.astype(np.uint8).tobytes()
    bits = np.unpackbits(samples.astype(np.uint8)[:, None], axis=1)[:, 8 - bit_depth :]
    return np.packbits(bits.ravel()).tobytes()


def unpack_row(line: bytes, count: int, bit_depth: int) -> np.ndarray:
    if bit_depth == 16:
        return np.frombuffer(line, ">u2")[:count].astype(np.uint16)
    if bit_depth == 8:
        return np.frombuffer(line, np.uint8)[:count]
    bits = np.unpackbits(np.frombuffer(line, np.uint8))[: count * bit_depth].reshape(count, bit_depth)
    return (bits * (1 << np.arange(bit_depth - 1, -1, -1))).sum(axis=1).astype(np.uint8)


def filter_image(pixels: np.ndarray, bit_depth: int, first_filter: int = 0, filters: list[int] | None = None) -> bytes:
    """Scanlines of one (sub-)image, row r filtered with type (first_filter + r) % 5, or filters[r] when given."""
    height, width, channels = pixels.shape
    bpp = max(1, channels * bit_depth // 8)
    out, prev = bytearray(), None
    for r in range(height):
        line = pack_row(pixels[r].reshape(-1), bit_depth)
        prev = prev or bytes(len(line))
        ftype = (first_filter + r) % 5 if filters is None else filters[r]
        out.append(ftype)
        for i, x in enumerate(line):
            a = line[i - bpp] if i >= bpp else 0
            c = prev[i - bpp] if i >= bpp else 0
            out.append((x - predictor(ftype, a, prev[i], c)) & 0xFF)
        prev = line
    return bytes(out)


def encode_png(pixels: np.ndarray, color_type: int, bit_depth: int, *, interlace: int = 0,
               extra: bytes = b"", raw: bytes | None = None, idat: bytes | None = None) -> bytes:  # fmt: skip
    """A PNG whose rows use all five filter types; `extra` chunks go between IHDR and IDAT."""
    height, width = pixels.shape[:2]
    if raw is None:
        if interlace:
            subs = [pixels[y0::dy, x0::dx] for x0, y0, dx, dy in ADAM7]
            raw = b"".join(filter_image(s, bit_depth, k) for k, s in enumerate(subs) if s.size)
        else:
            raw = filter_image(pixels, bit_depth)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    if idat is None:
        idat = zlib.compress(raw)
    return SIGNATURE + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", idat) + chunk(b"IEND")


def independent_decode(data: bytes) -> np.ndarray:
    """A slow, simple decoder for small files: libpng's expansions (palette, tRNS, sub-byte), no gamma."""
    chunks = list(iter_chunks(data))
    width, height, bit_depth, color_type, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    body = {t: b for t, b in reversed(chunks)}  # first occurrence wins
    raw = zlib.decompress(b"".join(b for t, b in chunks if t == b"IDAT"))
    channels = CHANNELS[color_type]
    bpp = max(1, channels * bit_depth // 8)
    samples = np.zeros((height, width, channels), np.uint16 if bit_depth == 16 else np.uint8)
    pos = 0
    for x0, y0, dx, dy in ADAM7 if interlace else ((0, 0, 1, 1),):
        pass_w, pass_h = len(range(x0, width, dx)), len(range(y0, height, dy))
        if not pass_w or not pass_h:
            continue
        stride = (pass_w * channels * bit_depth + 7) // 8
        prev = bytearray(stride)
        for r in range(pass_h):
            ftype, line = raw[pos], bytearray(raw[pos + 1 : pos + 1 + stride])
            pos += 1 + stride
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                c = prev[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + predictor(ftype, a, prev[i], c)) & 0xFF
            values = unpack_row(bytes(line), pass_w * channels, bit_depth)
            samples[y0 + r * dy, x0::dx] = values.reshape(pass_w, channels)
            prev = line
    assert pos == len(raw), "the independent decoder expects exactly the needed data"

    trns = body.get(b"tRNS")
    if color_type == 3:
        palette = np.zeros((256, 4), np.uint8)  # libpng: entries past PLTE are black and opaque
        palette[:, 3] = 255
        plte = np.frombuffer(body[b"PLTE"], np.uint8).reshape(-1, 3)
        palette[: len(plte), :3] = plte
        if trns:
            palette[: len(trns), 3] = np.frombuffer(trns, np.uint8)
        return palette[samples[:, :, 0]][:, :, : 4 if trns else 3]
    out = samples
    if trns and color_type in (0, 2):
        key = np.array(struct.unpack(f">{channels}H", trns)) & ((1 << bit_depth) - 1)
        alpha = np.where((samples == key).all(axis=2), 0, (1 << max(bit_depth, 8)) - 1)
        out = np.dstack([samples, alpha.astype(samples.dtype)])
    if bit_depth < 8:  # libpng's expansion of 1/2/4-bit grey to 8 bits
        out = out.copy()
        out[:, :, 0] *= 255 // ((1 << bit_depth) - 1)
    return out


def random_pixels(rng: np.random.Generator, height: int, width: int, color_type: int, bit_depth: int) -> np.ndarray:
    return rng.integers(0, 1 << bit_depth, (height, width, CHANNELS[color_type])).astype(
        np.uint16 if bit_depth == 16 else np.uint8
    )


def expected_from_samples(pixels: np.ndarray, color_type: int, bit_depth: int, palette: np.ndarray | None = None):
    if color_type == 3:
        return palette[pixels[:, :, 0]]
    if color_type == 0 and bit_depth < 8:
        return pixels * np.uint8(255 // ((1 << bit_depth) - 1))
    return pixels


# --- synthetic files: every filter type, every format, exact 16-bit colour ------------------------


@pytest.mark.parametrize("interlace", [0, 1], ids=["progressive", "adam7"])
@pytest.mark.parametrize("color_type,bit_depth", ALL_FORMATS, ids=[f"ct{c}-{b}bit" for c, b in ALL_FORMATS])
def test_synthetic_round_trip(color_type: int, bit_depth: int, interlace: int) -> None:
    rng = np.random.default_rng(color_type * 100 + bit_depth + 7 * interlace)
    height, width = 11, 13  # odd sizes: partial bytes and partial Adam7 blocks
    pixels = random_pixels(rng, height, width, color_type, bit_depth)
    palette, extra = None, b""
    if color_type == 3:
        palette = rng.integers(0, 256, (1 << bit_depth, 3)).astype(np.uint8)
        extra = chunk(b"PLTE", palette.tobytes())
    data = encode_png(pixels, color_type, bit_depth, interlace=interlace, extra=extra)
    expected = expected_from_samples(pixels, color_type, bit_depth, palette)

    ours = decode_png(data)
    assert ours.dtype == (np.uint16 if bit_depth == 16 else np.uint8)
    np.testing.assert_array_equal(ours, expected)
    np.testing.assert_array_equal(independent_decode(data), expected)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (2, 3), (8, 8), (17, 5)])
def test_synthetic_odd_shapes_16bit_rgba(shape: tuple[int, int]) -> None:
    """Tiny and thin images, where Adam7 passes are empty, keep all 16 bits."""
    pixels = random_pixels(np.random.default_rng(sum(shape)), *shape, 6, 16)
    for interlace in (0, 1):
        data = encode_png(pixels, 6, 16, interlace=interlace)
        info = parse_png(data)
        assert info.raw_size == len(zlib.decompress(info.idat))
        np.testing.assert_array_equal(decode_png(data), pixels)


def test_parse_png_exposes_the_streams_a_gpu_inflater_needs() -> None:
    pixels = random_pixels(np.random.default_rng(3), 7, 5, 2, 16)
    raw = filter_image(pixels, 16)
    idat = zlib.compress(raw, 9)
    # Split the stream over three IDAT chunks: parse_png must join them.
    thirds = [idat[: len(idat) // 3], idat[len(idat) // 3 : 2 * len(idat) // 3], idat[2 * len(idat) // 3 :]]
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 5, 7, 16, 2, 0, 0, 0))
    data = SIGNATURE + ihdr + b"".join(chunk(b"IDAT", t) for t in thirds) + chunk(b"IEND")

    info = parse_png(data)
    header = (info.width, info.height, info.bit_depth, info.color_type, info.interlace, info.channels)
    assert header == (5, 7, 16, 2, 0, 3)
    assert info.idat == idat
    assert bytes(info.deflate) == idat[2:-4]
    assert zlib.decompressobj(-15).decompress(info.deflate) == raw
    assert info.adler32 == zlib.adler32(raw)
    assert info.raw_size == len(raw) == 7 * (1 + 5 * 6)
    assert (info.palette, info.trns, info.gamma, info.srgb) == (None, None, None, False)
    np.testing.assert_array_equal(decode_png(data), pixels)


def test_raw_size_counts_a_filter_byte_per_row_of_each_adam7_pass() -> None:
    # 3x3 grey 8-bit, Adam7 passes as (width x height): 1x1, empty, empty, 1x1, 2x1, 1x2, 3x1.
    pixels = random_pixels(np.random.default_rng(0), 3, 3, 0, 8)
    info = parse_png(encode_png(pixels, 0, 8, interlace=1))
    assert info.raw_size == (1 + 1) + (1 + 1) + (1 + 2) + 2 * (1 + 1) + (1 + 3) == 15


def test_palette_trns_and_out_of_range_indices_follow_libpng() -> None:
    pixels = np.array([[[0], [1], [2], [3]]], np.uint8)  # index 3 is past the 3-entry PLTE
    plte = bytes([10, 20, 30, 40, 50, 60, 70, 80, 90])
    data = encode_png(pixels, 3, 2, extra=chunk(b"PLTE", plte) + chunk(b"tRNS", bytes([0, 128])))
    np.testing.assert_array_equal(
        decode_png(data)[0], [[10, 20, 30, 0], [40, 50, 60, 128], [70, 80, 90, 255], [0, 0, 0, 255]]
    )


@pytest.mark.parametrize("bit_depth", [1, 2, 4, 8, 16])
def test_grey_trns_key_compares_stored_values(bit_depth: int) -> None:
    peak = (1 << bit_depth) - 1
    pixels = np.array([[[0], [peak], [max(peak - 1, 0)], [peak]]], np.uint16 if bit_depth == 16 else np.uint8)
    data = encode_png(pixels, 0, bit_depth, extra=chunk(b"tRNS", struct.pack(">H", peak)))
    out = decode_png(data)
    opaque = 65535 if bit_depth == 16 else 255
    assert out.shape == (1, 4, 2)
    np.testing.assert_array_equal(out[0, :, 1], [opaque, 0, opaque, 0])
    np.testing.assert_array_equal(out[0, :, 0], pixels[0, :, 0] * (255 // peak if bit_depth < 8 else 1))


@pytest.mark.parametrize(
    "bit_depth,key,pixels,alpha",
    [
        (8, 0x0107, [7, 8], [0, 255]),
        (2, 0x0005, [1, 0], [0, 255]),
        (4, 0x0013, [1, 0], [255, 255]),
        (1, 0x0003, [1, 0], [0, 255]),
    ],
)
def test_out_of_range_trns_key_is_masked_like_libpng(bit_depth: int, key: int, pixels: list, alpha: list) -> None:
    """libpng 1.6.39 warns 'tRNS chunk has out-of-range samples' and keeps the low bits (values taken from it)."""
    pixels = np.array(pixels, np.uint8).reshape(1, 2, 1)
    data = encode_png(pixels, 0, bit_depth, extra=chunk(b"tRNS", struct.pack(">H", key)))
    assert decode_png(data)[0, :, 1].tolist() == alpha


def test_rgb16_trns_needs_all_16_bits_to_match() -> None:
    pixels = np.array([[[1000, 2000, 3000], [1000, 2000, 3001], [1000, 2000, 3000 + 256]]], np.uint16)
    data = encode_png(pixels, 2, 16, extra=chunk(b"tRNS", struct.pack(">3H", 1000, 2000, 3000)))
    np.testing.assert_array_equal(decode_png(data)[0, :, 3], [0, 65535, 65535])


# --- gamma ----------------------------------------------------------------------------------------


def libpng_gamma(value: int, gama: int, peak: int, shift: int = 0) -> int:
    """png_build_gamma_table for screen gamma 2.2 (PNG_DEFAULT_sRGB), one sample value."""
    exponent = math.floor(1e15 / gama / 220_000 + 0.5)  # png_reciprocal2, 1e-5 units
    top = peak >> shift
    index = value >> shift
    if abs(exponent - 100_000) <= 5_000:
        return (index * peak + top // 2) // top
    return math.floor(peak * math.pow(index / top, exponent * 1e-5) + 0.5)


def gamma_is_significant(gama: int) -> bool:
    return abs(math.floor(gama * 220_000 / 100_000 + 0.5) - 100_000) > 5_000


def test_gamma_formula_on_known_values() -> None:
    ramp8 = np.arange(256, dtype=np.uint8).reshape(1, 256, 1)
    linear = encode_png(ramp8, 0, 8, extra=chunk(b"gAMA", struct.pack(">I", 100_000)))
    out = decode_png(linear)[0, :, 0]
    # g = 1/2.2 -> 0.45455: 1 -> floor(255 * (1/255)^0.45455 + 0.5) = 21, 128 -> 186
    assert (out[0], out[1], out[128], out[255]) == (0, 21, 186, 255)
    assert all(out[v] == libpng_gamma(v, 100_000, 255) for v in range(256))

    ramp16 = np.array([[[0], [1], [32768], [65534], [65535]]], np.uint16)
    out16 = decode_png(encode_png(ramp16, 0, 16, extra=chunk(b"gAMA", struct.pack(">I", 100_000))))[0, :, 0]
    assert out16.tolist() == [libpng_gamma(int(v), 100_000, 65535) for v in ramp16.ravel()]
    assert out16.tolist()[2] == math.floor(65535 * (32768 / 65535) ** 0.45455 + 0.5)


@pytest.mark.parametrize(
    "extra",
    [
        b"",
        chunk(b"gAMA", struct.pack(">I", 45_455)),  # 0.45455 * 2.2 = 1.00001: under the threshold
        chunk(b"gAMA", struct.pack(">I", 47_700)),  # 1.0494: still under 0.05
        chunk(b"sRGB", b"\x00"),
        chunk(b"sRGB", b"\x00") + chunk(b"gAMA", struct.pack(">I", 100_000)),  # sRGB wins, as in PNGFiles.jl
        chunk(b"gAMA", struct.pack(">I", 0)),  # out of libpng's range: ignored
        chunk(b"gAMA", struct.pack(">H", 1)),  # wrong length: ignored
    ],
    ids=["none", "gAMA-0.45455", "gAMA-0.477", "sRGB", "sRGB+gAMA-1.0", "gAMA-zero", "gAMA-short"],
)
def test_no_gamma_correction_cases(extra: bytes) -> None:
    ramp = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    np.testing.assert_array_equal(decode_png(encode_png(ramp, 0, 8, extra=extra)), ramp)


def test_gamma_leaves_alpha_alone_and_applies_after_trns() -> None:
    pixels = np.array([[[10, 20, 30, 40], [10, 20, 30, 200]]], np.uint8)
    out = decode_png(encode_png(pixels, 6, 8, extra=chunk(b"gAMA", struct.pack(">I", 100_000))))
    assert out[0, :, 3].tolist() == [40, 200]
    assert out[0, 0, :3].tolist() == [libpng_gamma(v, 100_000, 255) for v in (10, 20, 30)]

    rgb = np.array([[[10, 20, 30], [11, 20, 30]]], np.uint8)
    extra = chunk(b"gAMA", struct.pack(">I", 100_000)) + chunk(b"tRNS", struct.pack(">3H", 10, 20, 30))
    out = decode_png(encode_png(rgb, 2, 8, extra=extra))
    assert out[0, :, 3].tolist() == [0, 255]  # the key matched the stored, uncorrected value


@pytest.mark.reference
@pytest.mark.parametrize("path", VALID)
def test_reference_gamma_matches_libpng_formula(path: Path) -> None:
    data = path.read_bytes()
    info = parse_png(data)
    ours, plain = decode_png(data), decode_png(without_chunks(data, b"gAMA"))
    if info.gamma_fixed is None or info.srgb or not gamma_is_significant(info.gamma_fixed):
        np.testing.assert_array_equal(ours, plain)
        return
    has_alpha = info.color_type in (4, 6) or info.trns is not None
    colour = ours.shape[2] - has_alpha
    peak = 65535 if info.bit_depth == 16 else 255
    shift = 0
    if info.bit_depth == 16 and info.sbit is not None:
        significant = max(info.sbit[:3]) if info.color_type in (2, 6) else info.sbit[0]
        shift = min(16 - significant, 8) if 0 < significant < 16 else 0
    values, inverse = np.unique(plain[:, :, :colour], return_inverse=True)
    corrected = np.array([libpng_gamma(int(v), info.gamma_fixed, peak, shift) for v in values], plain.dtype)
    np.testing.assert_array_equal(ours[:, :, :colour], corrected[inverse].reshape(plain[:, :, :colour].shape))
    np.testing.assert_array_equal(ours[:, :, colour:], plain[:, :, colour:])


# --- the valid pngsuite files against Pillow and the independent decoder --------------------------


def assert_matches_pillow(ours: np.ndarray, data: bytes) -> None:
    """Strict, per-format correspondences between our libpng semantics and Pillow's decode."""
    from PIL import Image

    info = parse_png(data)
    ct, depth = info.color_type, info.bit_depth
    image = Image.open(io.BytesIO(data))
    image.load()
    trns = dict(iter_chunks(data)).get(b"tRNS") if info.trns is not None else None
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}[ct] + (trns is not None and ct in (0, 2, 3))
    assert ours.shape == (info.height, info.width, channels)
    assert ours.dtype == (np.uint16 if depth == 16 else np.uint8)

    if ct == 3:
        np.testing.assert_array_equal(ours, np.asarray(image.convert("RGBA" if trns else "RGB")))
        return
    if ct == 4 and depth == 16:  # Pillow widens 16-bit grey+alpha to 8-bit RGBA
        pil = np.asarray(image)
        for c in range(3):
            np.testing.assert_array_equal(ours[:, :, 0] >> 8, pil[:, :, c])
        np.testing.assert_array_equal(ours[:, :, 1] >> 8, pil[:, :, 3])
        return
    if ct in (4, 6):
        np.testing.assert_array_equal(ours >> 8 if depth == 16 else ours, np.asarray(image))
        return

    # grey and RGB: colour from Pillow, alpha (tRNS) from the chunk's key on the stored values
    colour = ours[:, :, : CHANNELS[ct]]
    if ct == 0 and depth < 8:
        pil = np.asarray(image.convert("L"))[:, :, None]  # Pillow scales 1/2/4-bit grey like libpng
    else:
        pil = np.asarray(image).reshape(colour.shape[0], colour.shape[1], -1)
    np.testing.assert_array_equal(colour >> 8 if depth == 16 and ct == 2 else colour, pil)
    if trns is not None:
        key = np.array(struct.unpack(f">{CHANNELS[ct]}H", trns)) & ((1 << depth) - 1)
        stored = colour if depth >= 8 else colour // (255 // ((1 << depth) - 1))
        alpha = np.where((stored == key).all(axis=2), 0, 65535 if depth == 16 else 255)
        np.testing.assert_array_equal(ours[:, :, -1], alpha)


@pytest.mark.reference
@pytest.mark.parametrize("path", VALID)
def test_valid_reference_file_matches_pillow(path: Path) -> None:
    data = path.read_bytes()
    # Pillow applies no gamma: compare the decode of a gAMA-stripped copy (gamma is tested above).
    assert_matches_pillow(decode_png(without_chunks(data, b"gAMA")), data)
    assert decode_png_file(path).shape == decode_png(data).shape


@pytest.mark.reference
@pytest.mark.parametrize("path", suite_params("basic", "basic/interlaced"))
def test_basic_suite_matches_independent_decoder(path: Path) -> None:
    """The 32x32 files, 16-bit colour included, bit for bit (gamma stripped)."""
    data = without_chunks(path.read_bytes(), b"gAMA")
    np.testing.assert_array_equal(decode_png(data), independent_decode(data))


@pytest.mark.reference
@pytest.mark.parametrize("path", VALID)
def test_reference_idat_facts(path: Path) -> None:
    info = parse_png(path.read_bytes())
    raw = zlib.decompress(info.idat)
    assert info.raw_size == len(raw)
    assert info.adler32 == zlib.adler32(raw)
    assert zlib.decompressobj(-15).decompress(info.deflate) == raw


# --- libpng itself, with PNGFiles.jl's transform sequence -----------------------------------------


def libpng_load(lib: ctypes.CDLL, data: bytes) -> np.ndarray:
    """PNGFiles.jl `_load` (gamma=nothing, background=false, expanded palettes) through ctypes.

    Only for valid files: a libpng error would longjmp into nothing and abort the process,
    which is why this runs in a subprocess.
    """
    vp = ctypes.c_void_p
    read_fn_type = ctypes.CFUNCTYPE(None, vp, ctypes.POINTER(ctypes.c_ubyte), ctypes.c_size_t)
    sigs = {
        "png_get_libpng_ver": (ctypes.c_char_p, [vp]),
        "png_create_read_struct": (vp, [ctypes.c_char_p, vp, vp, vp]),
        "png_create_info_struct": (vp, [vp]),
        "png_set_read_fn": (None, [vp, vp, read_fn_type]),
        "png_read_info": (None, [vp, vp]),
        "png_get_valid": (ctypes.c_uint32, [vp, vp, ctypes.c_uint32]),
        "png_get_sRGB": (ctypes.c_uint32, [vp, vp, ctypes.POINTER(ctypes.c_int)]),
        "png_get_gAMA": (ctypes.c_uint32, [vp, vp, ctypes.POINTER(ctypes.c_double)]),
        "png_set_gamma": (None, [vp, ctypes.c_double, ctypes.c_double]),
        "png_get_color_type": (ctypes.c_ubyte, [vp, vp]),
        "png_get_bit_depth": (ctypes.c_ubyte, [vp, vp]),
        "png_get_channels": (ctypes.c_ubyte, [vp, vp]),
        "png_get_image_width": (ctypes.c_uint32, [vp, vp]),
        "png_get_image_height": (ctypes.c_uint32, [vp, vp]),
        "png_get_rowbytes": (ctypes.c_size_t, [vp, vp]),
        "png_set_palette_to_rgb": (None, [vp]),
        "png_set_expand_gray_1_2_4_to_8": (None, [vp]),
        "png_set_packing": (None, [vp]),
        "png_set_tRNS_to_alpha": (None, [vp]),
        "png_set_swap": (None, [vp]),
        "png_set_interlace_handling": (ctypes.c_int, [vp]),
        "png_read_update_info": (None, [vp, vp]),
        "png_read_image": (None, [vp, ctypes.POINTER(vp)]),
        "png_read_end": (None, [vp, vp]),
    }
    for name, (restype, argtypes) in sigs.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes

    offset = 0

    def read(_png, out, n):
        nonlocal offset
        ctypes.memmove(out, data[offset : offset + n], n)
        offset += n

    reader = read_fn_type(read)
    png = lib.png_create_read_struct(lib.png_get_libpng_ver(None), None, None, None)
    info = lib.png_create_info_struct(png)
    lib.png_set_read_fn(png, None, reader)
    lib.png_read_info(png, info)
    valid = lib.png_get_valid(png, info, 0x0800 | 0x0001 | 0x0010)  # sRGB | gAMA | tRNS
    color_type, bit_depth = lib.png_get_color_type(png, info), lib.png_get_bit_depth(png, info)
    default_srgb = -1.0  # PNG_DEFAULT_sRGB
    if valid & 0x0800 and lib.png_get_sRGB(png, info, ctypes.byref(ctypes.c_int())):
        lib.png_set_gamma(png, default_srgb, default_srgb)
    elif valid & 0x0801:
        gamma = ctypes.c_double(0.45455)
        lib.png_get_gAMA(png, info, ctypes.byref(gamma))
        lib.png_set_gamma(png, default_srgb, gamma.value)
    if color_type == 3:
        lib.png_set_palette_to_rgb(png)
    if color_type == 0 and bit_depth < 8:
        lib.png_set_expand_gray_1_2_4_to_8(png)
        lib.png_set_packing(png)
    if valid & 0x0010:
        lib.png_set_tRNS_to_alpha(png)
    if bit_depth == 16:
        lib.png_set_swap(png)
    lib.png_set_interlace_handling(png)
    lib.png_read_update_info(png, info)
    width, height = lib.png_get_image_width(png, info), lib.png_get_image_height(png, info)
    channels, out_depth = lib.png_get_channels(png, info), lib.png_get_bit_depth(png, info)
    rows = np.zeros((height, lib.png_get_rowbytes(png, info)), np.uint8)
    lib.png_read_image(png, (vp * height)(*[rows[i].ctypes.data for i in range(height)]))
    lib.png_read_end(png, info)  # the structs are left to process exit
    dtype = np.uint16 if out_depth == 16 else np.uint8
    return rows.view(dtype)[:, : width * channels].reshape(height, width, channels)


def run_libpng(files: list[Path], out: Path) -> str:
    lib_name = ctypes.util.find_library("png16")
    if lib_name is None:
        pytest.skip("libpng16 shared library not found: cannot run the libpng oracle")
    proc = subprocess.run(
        [sys.executable, __file__, "--libpng", lib_name, str(out), *map(str, files)],
        capture_output=True, text=True, timeout=120, env=script_env(),
    )  # fmt: skip
    assert proc.returncode == 0, f"libpng oracle failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout.strip()


def fuzz_files(folder: Path, count: int) -> list[Path]:
    """Seeded random small files: every format, tRNS keys, palettes, gAMA near the threshold, sBIT."""
    rng = np.random.default_rng(2026)
    files = []
    for k in range(count):
        color_type, bit_depth = ALL_FORMATS[k % len(ALL_FORMATS)]
        pixels = random_pixels(rng, int(rng.integers(1, 12)), int(rng.integers(1, 12)), color_type, bit_depth)
        extra = b""
        if rng.random() < 0.8:
            near_threshold = [45_455, 100_000, 55_556, 47_727, 47_800, 47_846, 43_290]
            gama = int(rng.choice([*near_threshold, int(rng.integers(16, 300_000))]))
            extra += chunk(b"gAMA", struct.pack(">I", gama))
        if bit_depth == 16 and rng.random() < 0.5:
            extra += chunk(b"sBIT", bytes(int(rng.integers(1, 17)) for _ in range(CHANNELS[color_type])))
        if color_type == 3:
            entries = int(rng.integers(1, (1 << bit_depth) + 1))  # may leave indices out of range
            extra += chunk(b"PLTE", rng.integers(0, 256, 3 * entries).astype(np.uint8).tobytes())
            if rng.random() < 0.5:
                alphas = rng.integers(0, 256, int(rng.integers(1, entries + 1))).astype(np.uint8)
                extra += chunk(b"tRNS", alphas.tobytes())
        elif color_type in (0, 2) and rng.random() < 0.6:
            key = pixels.reshape(-1, CHANNELS[color_type])[0]
            extra += chunk(b"tRNS", struct.pack(f">{len(key)}H", *map(int, key)))
        path = folder / f"fuzz{k:03d}.png"
        path.write_bytes(encode_png(pixels, color_type, bit_depth, interlace=int(rng.integers(2)), extra=extra))
        files.append(path)
    return files


def assert_same_as_libpng(files: list[Path], tmp_path: Path) -> None:
    run_libpng(files, tmp_path / "libpng.npz")
    with np.load(tmp_path / "libpng.npz") as reference:
        for k, path in enumerate(files):
            expected, ours = reference[str(k)], decode_png_file(path)
            assert ours.dtype == expected.dtype and ours.shape == expected.shape, path
            np.testing.assert_array_equal(ours, expected, err_msg=str(path))


def test_synthetic_files_match_libpng(tmp_path: Path) -> None:
    assert_same_as_libpng(fuzz_files(tmp_path, 90), tmp_path)


@pytest.mark.reference
def test_reference_files_match_libpng(tmp_path: Path) -> None:
    if not PNGSUITE.is_dir():
        pytest.skip(ABSENT)
    files = sorted(p for folder in (*VALID_FOLDERS, "testpngs/badpal") for p in (PNGSUITE / folder).glob("*.png"))
    assert_same_as_libpng(files, tmp_path)


# --- malformed files: a PngError or plausible pixels, never a crash or a hang ---------------------


def guarded_decode(paths: list[Path], timeout_s: float = 20.0) -> dict[str, dict]:
    """Decode each file in a worker process; a crash or hang is reported, then the worker restarts."""
    results: dict[str, dict] = {}
    pending = [str(p) for p in paths]
    while pending:
        with open(os.devnull, "wb") as devnull:
            worker = subprocess.Popen(
                [sys.executable, __file__, "--decode-worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=devnull, env=script_env(),
            )  # fmt: skip
        worker.stdin.write("\n".join(pending).encode() + b"\n")
        worker.stdin.close()
        selector = selectors.DefaultSelector()
        selector.register(worker.stdout, selectors.EVENT_READ)
        buffer = b""
        try:
            while pending:
                deadline = time.monotonic() + timeout_s
                while b"\n" not in buffer:
                    left = deadline - time.monotonic()
                    if left <= 0 or not selector.select(left):
                        results[pending.pop(0)] = {"error": "timeout", "reason": f"no answer in {timeout_s} s"}
                        raise StopIteration
                    data = os.read(worker.stdout.fileno(), 65536)
                    if not data:
                        code = worker.wait()
                        results[pending.pop(0)] = {"error": "crash", "reason": f"worker exited with {code}"}
                        raise StopIteration
                    buffer += data
                line, buffer = buffer.split(b"\n", 1)
                results[pending.pop(0)] = json.loads(line)
        except StopIteration:
            pass
        finally:
            selector.close()
            worker.kill()
            worker.wait()
            worker.stdout.close()
    return results


def decode_worker() -> None:
    for line in sys.stdin:
        path = line.strip()
        try:
            info = parse_png(Path(path).read_bytes(), verify_crc=False)
            header = [info.height, info.width]
        except Exception:
            header = None
        try:
            img = decode_png_file(path)
            result = {"shape": list(img.shape), "dtype": str(img.dtype), "header": header}
        except PngError as exc:
            result = {"error": "PngError", "reason": exc.reason, "message": str(exc)}
        except BaseException as exc:  # noqa: BLE001 - the point is to report any other type
            result = {"error": type(exc).__name__, "reason": str(exc)}
        print(json.dumps(result), flush=True)


@pytest.fixture(scope="module")
def malformed_results() -> dict[str, dict]:
    if not PNGSUITE.is_dir():
        pytest.skip(ABSENT)
    paths = sorted(p for folder in ("testpngs/crashers", "testpngs/badpal") for p in (PNGSUITE / folder).glob("*.png"))
    return guarded_decode(paths)


@pytest.mark.reference
@pytest.mark.parametrize("path", MALFORMED)
def test_malformed_file_is_rejected_or_plausible(path: Path, malformed_results: dict[str, dict]) -> None:
    result = malformed_results[str(path)]
    if "error" in result:
        assert result["error"] == "PngError", result
        assert result["reason"].strip(), result
        assert result["message"] == f"{path}: {result['reason']}"
    else:
        height, width = result["header"]
        assert result["shape"][:2] == [height, width] and result["shape"][2] in (1, 2, 3, 4)
        assert result["dtype"] in ("uint8", "uint16")


@pytest.mark.reference
def test_known_crashers_get_precise_reasons(malformed_results: dict[str, dict]) -> None:
    def reason(name: str) -> str:
        return malformed_results[str(PNGSUITE / "testpngs" / "crashers" / name)]["reason"]

    assert reason("badcrc.png").startswith("CRC mismatch in IDAT chunk at byte 33")
    assert reason("badadler.png").startswith("IDAT Adler-32 mismatch (stored abadad32")
    assert reason("huge_IDAT.png") == (
        "truncated file: IDAT chunk at byte 33 declares 1073741823 data bytes but only 34 remain"
    )
    assert reason("huge_iCCP_chunk.png").startswith("truncated file: iCCP chunk at byte 33")
    assert "error" not in malformed_results[str(PNGSUITE / "testpngs" / "crashers" / "empty_ancillary_chunks.png")]


def test_guard_reports_a_hang_and_a_crash(tmp_path: Path, monkeypatch) -> None:
    """The guard itself: a worker that dies or stalls is reported, and the next file still runs."""
    good = tmp_path / "good.png"
    good.write_bytes(encode_png(np.zeros((2, 2, 1), np.uint8), 0, 8))
    crash, hang = tmp_path / "crash.png", tmp_path / "hang.png"
    crash.write_bytes(b"")
    hang.write_bytes(b"")
    monkeypatch.setenv("IWS_TEST_PNG_WORKER_FAULTS", "1")
    results = guarded_decode([crash, good, hang, good], timeout_s=2.0)
    assert results[str(crash)]["error"] == "crash"
    assert results[str(hang)]["error"] == "timeout"
    assert results[str(good)]["shape"] == [2, 2, 1]


# --- targeted rejections --------------------------------------------------------------------------


def grey_png(width: int = 4, height: int = 3, **kw) -> tuple[bytes, np.ndarray]:
    pixels = np.arange(width * height, dtype=np.uint8).reshape(height, width, 1)
    return encode_png(pixels, 0, 8, **kw), pixels


def rejects(data: bytes, **kw) -> str:
    with pytest.raises(PngError) as caught:
        decode_png(data, **kw)
    assert type(caught.value) is PngError
    return caught.value.reason


def ihdr_png(width: int, height: int, bit_depth: int, color_type: int, *tail: int) -> bytes:
    fields = (width, height, bit_depth, color_type, *(tail or (0, 0, 0)))
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", *fields))
    return SIGNATURE + ihdr + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND")


def test_bad_signature() -> None:
    data, _ = grey_png()
    assert rejects(b"\x89PNG\r\n\x1a\x0b" + data[8:]) == "not a PNG file (bad 8-byte signature)"
    assert rejects(b"") == "not a PNG file (bad 8-byte signature)"
    assert rejects(b"GIF89a") == "not a PNG file (bad 8-byte signature)"


def test_corrupted_crc() -> None:
    data, _ = grey_png()
    broken = bytearray(data)
    broken[8 + 8 + 13] ^= 0xFF  # first byte of the IHDR CRC
    reason = rejects(bytes(broken))
    assert reason.startswith("CRC mismatch in IHDR chunk at byte 8 (stored ")
    assert parse_png(bytes(broken), verify_crc=False).width == 4


def test_corrupted_pixel_data_fails_its_idat_crc() -> None:
    data, _ = grey_png()
    broken = bytearray(data)
    broken[33 + 8 + 3] ^= 0x01
    assert rejects(bytes(broken)).startswith("CRC mismatch in IDAT chunk at byte 33 (stored ")


def test_truncated_file() -> None:
    data, _ = grey_png()
    idat_length = struct.unpack(">I", data[33:37])[0]
    assert rejects(data[:50]) == (
        f"truncated file: IDAT chunk at byte 33 declares {idat_length} data bytes but only {50 - 33 - 12} remain"
    )
    assert rejects(data[:37]) == "truncated file: chunk header at byte 33 is cut short"
    assert rejects(data[:-12]) == f"missing IEND chunk (file ends at byte {len(data) - 12})"


def test_missing_ihdr_idat_iend() -> None:
    data, _ = grey_png()
    assert rejects(SIGNATURE + data[33:]) == "first chunk is IDAT, expected IHDR"
    assert rejects(SIGNATURE + chunk(b"IEND")) == "first chunk is IEND, expected IHDR"
    ihdr = data[8:33]
    assert rejects(SIGNATURE + ihdr + chunk(b"IEND")) == "no IDAT chunk"
    assert rejects(SIGNATURE + ihdr + chunk(b"tEXt", b"a\0b") + chunk(b"IEND")) == "no IDAT chunk"
    assert rejects(without_chunks(data, b"IEND")) == f"missing IEND chunk (file ends at byte {len(data) - 12})"


@pytest.mark.parametrize(
    "color_type,bit_depth,reason",
    [
        (1, 8, "invalid colour type 1"),
        (5, 8, "invalid colour type 5"),
        (7, 8, "invalid colour type 7"),
        (0, 3, "invalid bit depth 3 for colour type 0 (greyscale allows 1/2/4/8/16)"),
        (0, 32, "invalid bit depth 32 for colour type 0 (greyscale allows 1/2/4/8/16)"),
        (2, 4, "invalid bit depth 4 for colour type 2 (RGB allows 8/16)"),
        (3, 16, "invalid bit depth 16 for colour type 3 (palette allows 1/2/4/8)"),
        (4, 1, "invalid bit depth 1 for colour type 4 (grey+alpha allows 8/16)"),
        (6, 2, "invalid bit depth 2 for colour type 6 (RGBA allows 8/16)"),
    ],
)
def test_invalid_colour_type_or_bit_depth(color_type: int, bit_depth: int, reason: str) -> None:
    assert rejects(ihdr_png(2, 2, bit_depth, color_type)) == reason


@pytest.mark.parametrize(
    "fields,reason",
    [
        ((0, 2, 8, 0), "invalid image width 0 (must be 1..2^31-1)"),
        ((2, 0, 8, 0), "invalid image height 0 (must be 1..2^31-1)"),
        ((2**31, 1, 8, 0), "invalid image width 2147483648 (must be 1..2^31-1)"),
        ((2, 2, 8, 0, 1, 0, 0), "unknown compression method 1"),
        ((2, 2, 8, 0, 0, 1, 0), "unknown filter method 1"),
        ((2, 2, 8, 0, 0, 0, 2), "unknown interlace method 2"),
    ],
)
def test_invalid_ihdr_fields(fields: tuple[int, ...], reason: str) -> None:
    assert rejects(ihdr_png(*fields)) == reason


def test_ihdr_length_and_duplicates() -> None:
    data, _ = grey_png()
    long_ihdr = SIGNATURE + chunk(b"IHDR", data[16:29] + b"\0") + data[33:]
    assert rejects(long_ihdr) == "IHDR chunk is 14 bytes, expected 13"
    assert rejects(data[:33] + data[8:33] + data[33:]) == "duplicate IHDR chunk"


def test_pixel_count_above_max_pixels() -> None:
    data, _ = grey_png(4, 3)
    assert decode_png(data, max_pixels=12).shape == (3, 4, 1)
    assert rejects(data, max_pixels=11) == (
        "image is 4x3 = 12 pixels, above the limit of max_pixels=11 (decompression-bomb guard)"
    )
    huge = ihdr_png(100_000, 100_000, 8, 6)  # a 40 GB image declared in a 60-byte file
    assert rejects(huge) == (
        "image is 100000x100000 = 10000000000 pixels, above the limit of max_pixels=64000000 "
        "(decompression-bomb guard)"
    )


def test_idat_too_short_and_too_long() -> None:
    data, pixels = grey_png(4, 3)
    raw = filter_image(pixels, 8)
    assert len(raw) == 15
    short = encode_png(pixels, 0, 8, raw=raw[:-1])
    assert rejects(short) == "IDAT data too short: inflates to 14 bytes, a 4x3 8-bit greyscale image needs 15"
    missing_row = encode_png(pixels, 0, 8, raw=raw[:-5])
    assert rejects(missing_row) == "IDAT data too short: inflates to 10 bytes, a 4x3 8-bit greyscale image needs 15"
    long = encode_png(pixels, 0, 8, raw=raw + b"\0")
    assert rejects(long) == "IDAT data too long: inflates to more than the 15 bytes a 4x3 8-bit greyscale image needs"


def test_idat_bomb_is_bounded() -> None:
    """A 1x1 image whose IDAT inflates to 50 MB is refused without inflating it all."""
    bomb = zlib.compress(b"\0" * 50_000_000, 9)
    data = encode_png(np.zeros((1, 1, 1), np.uint8), 0, 8, idat=bomb)
    start = time.perf_counter()
    assert rejects(data) == "IDAT data too long: inflates to more than the 2 bytes a 1x1 8-bit greyscale image needs"
    assert time.perf_counter() - start < 1.0


def test_sides_beyond_libpngs_user_limit_are_a_clear_error() -> None:
    width = 1_000_001
    idat = zlib.compress(bytes(width + 1))
    data = SIGNATURE + chunk(b"IHDR", struct.pack(">IIBBBBB", width, 1, 8, 0, 0, 0, 0)) + chunk(b"IDAT", idat)
    assert rejects(data + chunk(b"IEND")) == (
        "1000001x1 8-bit greyscale image: libpng (PNGFiles.jl) refuses sides over 1000000 pixels"
    )


def test_bad_adler32() -> None:
    data, pixels = grey_png()
    raw = filter_image(pixels, 8)
    stream = zlib.compress(raw)
    bad = stream[:-4] + struct.pack(">I", zlib.adler32(raw) ^ 0x10000)
    reason = rejects(encode_png(pixels, 0, 8, idat=bad))
    good = zlib.adler32(raw)
    assert reason == f"IDAT Adler-32 mismatch (stored {good ^ 0x10000:08x}, computed {good:08x})"


def test_zlib_stream_framing() -> None:
    _, pixels = grey_png()
    stream = zlib.compress(filter_image(pixels, 8))
    assert rejects(encode_png(pixels, 0, 8, idat=stream[:-4])) == "IDAT zlib stream lacks its 4-byte Adler-32 trailer"
    extra = rejects(encode_png(pixels, 0, 8, idat=stream + b"xy"))
    assert extra == "IDAT has 2 bytes of extra data after the zlib stream"
    assert rejects(encode_png(pixels, 0, 8, idat=stream[:8])).startswith("truncated IDAT zlib stream: it stops after ")
    assert rejects(encode_png(pixels, 0, 8, idat=stream[:2] + b"\xff" * 10)).startswith("corrupt IDAT deflate data (")
    assert rejects(encode_png(pixels, 0, 8, idat=b"\x78\x9c\x03")) == "IDAT zlib stream is only 3 bytes"


@pytest.mark.parametrize(
    "header,reason",
    [
        (b"\x79\x9c", "IDAT zlib stream: compression method 9, expected 8 (deflate)"),
        (b"\x88\x98", "IDAT zlib stream: window size field CINFO=8 exceeds 7"),
        (b"\x78\x9d", "IDAT zlib stream: header check bits (FCHECK) are wrong"),
        (b"\x78\xbb", "IDAT zlib stream: preset dictionary (FDICT) is not allowed in PNG"),
    ],
)
def test_zlib_header(header: bytes, reason: str) -> None:
    _, pixels = grey_png()
    stream = zlib.compress(filter_image(pixels, 8))
    assert rejects(encode_png(pixels, 0, 8, idat=header + stream[2:])) == reason


def test_invalid_filter_type() -> None:
    _, pixels = grey_png(4, 3)
    raw = bytearray(filter_image(pixels, 8))
    raw[5] = 5  # the filter byte of row 1
    assert rejects(encode_png(pixels, 0, 8, raw=bytes(raw))) == "invalid filter type 5 on row 1"


def test_palette_rules() -> None:
    pixels = np.zeros((2, 2, 1), np.uint8)
    assert rejects(encode_png(pixels, 3, 8)) == "palette image (colour type 3) has no PLTE chunk before IDAT"
    assert rejects(encode_png(pixels, 3, 1, extra=chunk(b"PLTE", bytes(9)))) == (
        "PLTE has 3 entries, more than 2^1 for a 1-bit palette image"
    )
    ragged = encode_png(pixels, 3, 8, extra=chunk(b"PLTE", bytes(7)))
    assert rejects(ragged) == "PLTE chunk length 7 is not a multiple of 3"
    assert rejects(encode_png(pixels, 3, 8, extra=chunk(b"PLTE"))) == "PLTE chunk is empty"
    twice = chunk(b"PLTE", bytes(3)) * 2
    assert rejects(encode_png(pixels, 3, 8, extra=twice)) == "duplicate PLTE chunk"
    # libpng ignores a PLTE in a grey file rather than failing
    np.testing.assert_array_equal(decode_png(encode_png(pixels, 0, 8, extra=chunk(b"PLTE", bytes(3)))), pixels)


def test_chunk_order_and_names() -> None:
    data, pixels = grey_png()
    head, idat, iend = data[:33], data[33:-12], data[-12:]
    split = head + idat + chunk(b"tEXt", b"k\0v") + idat + iend
    assert rejects(split) == f"IDAT chunks are not consecutive (another IDAT at byte {33 + len(idat) + 15})"
    assert rejects(head + chunk(b"ABCD", b"x") + idat + iend) == "unknown critical chunk ABCD at byte 33"
    assert rejects(head + chunk(b"ab1d") + idat + iend) == "invalid chunk type b'ab1d' at byte 33"
    np.testing.assert_array_equal(decode_png(head + chunk(b"abCd", b"x") + idat + iend), pixels)  # unknown ancillary
    np.testing.assert_array_equal(decode_png(data + b"trailing junk"), pixels)  # libpng stops at IEND


def test_invalid_ancillary_chunks_are_ignored_like_libpng() -> None:
    pixels = np.array([[[7], [8]]], np.uint8)
    cases = [
        chunk(b"tRNS", b"\0\7\0"),  # wrong length for grey
        chunk(b"tRNS", b""),
        chunk(b"sRGB", b"\x09"),
        chunk(b"gAMA", b""),
    ]
    for extra in cases:
        np.testing.assert_array_equal(decode_png(encode_png(pixels, 0, 8, extra=extra)), pixels)
    rgba = np.zeros((1, 2, 4), np.uint8)
    np.testing.assert_array_equal(decode_png(encode_png(rgba, 6, 8, extra=chunk(b"tRNS", bytes(6)))), rgba)


def test_error_message_path_and_pickling(tmp_path: Path) -> None:
    err = PngError("bad thing", "dir/x.png")
    assert (str(err), err.reason, err.path) == ("dir/x.png: bad thing", "bad thing", "dir/x.png")
    assert str(PngError("bad thing")) == "bad thing"
    assert isinstance(err, ValueError)
    again = pickle.loads(pickle.dumps(err))
    assert (type(again), str(again), again.reason, again.path) == (PngError, str(err), err.reason, err.path)

    path = tmp_path / "cut.png"
    path.write_bytes(grey_png()[0][:40])
    with pytest.raises(PngError) as caught:
        decode_png_file(path)
    assert caught.value.path == str(path) and str(caught.value).startswith(f"{path}: truncated file: ")


def test_io_errors_are_png_errors(tmp_path: Path) -> None:
    with pytest.raises(PngError) as caught:
        decode_png_file(tmp_path / "absent.png")
    assert caught.value.reason == "cannot read file: No such file or directory"
    assert caught.value.path == str(tmp_path / "absent.png")
    with pytest.raises(PngError) as caught:
        decode_png_file(tmp_path)
    assert caught.value.reason == "cannot read file: Is a directory"


def test_accepts_bytes_bytearray_memoryview_and_numpy() -> None:
    data, pixels = grey_png()
    for form in (data, bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        np.testing.assert_array_equal(decode_png(form), pixels)


if __name__ == "__main__":
    # Subprocess entry points: the crash/hang guard's worker and the libpng oracle.
    if sys.argv[1] == "--decode-worker":
        if os.environ.get("IWS_TEST_PNG_WORKER_FAULTS"):  # self-test of the guard
            for line in sys.stdin:
                if line.strip().endswith("crash.png"):
                    os.abort()
                if line.strip().endswith("hang.png"):
                    time.sleep(60)
                print(json.dumps({"shape": [2, 2, 1]}), flush=True)
        else:
            decode_worker()
    elif sys.argv[1] == "--libpng":
        library = ctypes.CDLL(sys.argv[2])
        arrays = {str(k): libpng_load(library, Path(p).read_bytes()) for k, p in enumerate(sys.argv[4:])}
        np.savez(sys.argv[3], **arrays)
        print(library.png_get_libpng_ver(None).decode())


def test_fast_inflate_agrees_with_the_zlib_reference():
    """libdeflate (when installed) is only a faster route to the same bytes; zlib stays the reference."""
    from iws_engine.export.synth import encode_png, render_vignette
    from iws_engine.loaders import png as png_module

    if png_module._libdeflate is None:
        pytest.skip("the optional 'deflate' package (libdeflate) is not installed")
    for fmt in ("rgba16", "gray8"):
        data = encode_png(render_vignette(np.random.default_rng([5, 1]), True, 64, 80), fmt)
        info = png_module.parse_png(data)
        assert png_module.inflate_idat(info) == png_module._inflate_idat_zlib(info)
