"""The native CPU decode core (kernels/cpu_decode.cpp via loaders/native.py) equals the NumPy reference bit for bit.

The reference is decode_png (png.py's general decoder, itself tested against its NumPy spec, libpng and Pillow in
tests/test_png_decode_general.py and tests/test_png.py) followed by preprocess_reference;
the native core shares its arithmetic with the CUDA kernels (kernels/png_filter_math.cuh, julia_resize_math.cuh), so
these tests also check the GPU kernels' per-pixel arithmetic on the CPU.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from iws_engine.loaders import native
from iws_engine.loaders.cpu import CpuLoader, load_one
from iws_engine.loaders.png import PngError, decode_png, parse_png
from iws_engine.preprocess import PreprocessSpec, iws_sarcnn_spec, preprocess_reference
from tests.conftest import PNGSUITE
from tests.pngtools import chunk, iter_chunks
from tests.test_png import VALID_FOLDERS, encode_png, filter_image, random_pixels

pytestmark = pytest.mark.skipif(not native.available(),
                                reason="the native decode core is not built (pip install -e . builds it with CMake)")

SPEC = iws_sarcnn_spec(0.4137, 0.2251)
CORPUS = Path(__file__).resolve().parent / "corpus" / "fuzz"


def reference_input(data: bytes, spec: PreprocessSpec) -> np.ndarray:
    return preprocess_reference(decode_png(data), spec)


def native_input(data: bytes, spec: PreprocessSpec, force_full: bool = False) -> tuple[np.ndarray, str]:
    info = parse_png(data)
    assert native.handles(info)
    out = np.full(spec.size, np.nan, np.float32)
    path = native.decode_preprocess(info, spec, out, force_full=force_full)
    return out, path


def assert_bits_equal(actual: np.ndarray, expected: np.ndarray) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))


def make_png(pixels: np.ndarray, color_type: int, bit_depth: int) -> bytes:
    return encode_png(pixels, color_type, bit_depth)  # rows cycle through all five filter types


# --- random images, every colour type and depth the core takes, every filter, down/up/same size ----------------


@pytest.mark.parametrize("color_type", [0, 2, 4, 6], ids=["grey", "rgb", "grey-alpha", "rgba"])
@pytest.mark.parametrize("bit_depth", [8, 16])
@pytest.mark.parametrize("shape, size", [((61, 83), (29, 40)), ((13, 9), (32, 21)), ((24, 24), (24, 24)),
                                         ((1, 1), (5, 3)), ((1, 37), (2, 9)), ((40, 1), (7, 1))],
                         ids=["down", "up", "same", "1x1", "one-row", "one-column"])
def test_random_images_equal_the_reference(color_type: int, bit_depth: int, shape, size) -> None:
    rng = np.random.default_rng([color_type, bit_depth, *shape])
    pixels = random_pixels(rng, *shape, color_type, bit_depth)
    spec = PreprocessSpec(mean=0.31, std=0.17, size=size)
    data = make_png(pixels, color_type, bit_depth)
    out, path = native_input(data, spec)
    assert_bits_equal(out, reference_input(data, spec))
    # random colour is not grey: the full path, except for types whose only colour channel is grey anyway
    assert path == (native.GREY_LANES if color_type in (0, 4) else native.FULL)


@pytest.mark.parametrize("color_type", [2, 6], ids=["rgb", "rgba"])
@pytest.mark.parametrize("bit_depth", [8, 16])
def test_grey_colour_images_take_the_grey_lane_path(color_type: int, bit_depth: int) -> None:
    rng = np.random.default_rng(bit_depth)
    grey = random_pixels(rng, 57, 71, 0, bit_depth)
    pixels = np.concatenate([grey] * 3 + ([random_pixels(rng, 57, 71, 0, bit_depth)] if color_type == 6 else []), 2)
    data = make_png(pixels, color_type, bit_depth)
    spec = PreprocessSpec(mean=0.5, std=0.25, size=(32, 48))
    expected = reference_input(data, spec)
    out, path = native_input(data, spec)
    assert path == native.GREY_LANES  # varying alpha: alpha never reaches grey (the reference drops it first)
    assert_bits_equal(out, expected)
    forced, forced_path = native_input(data, spec, force_full=True)
    assert forced_path == native.FULL
    assert_bits_equal(forced, expected)


def filter_runs(rng: np.random.Generator, height: int) -> list[int]:
    """Row filter types in runs of 1 to 20 rows: the core unfilters runs of rows sharing a type together."""
    types: list[int] = []
    while len(types) < height:
        types += [int(rng.integers(0, 5))] * int(rng.integers(1, 21))
    return types[:height]


@pytest.mark.parametrize("color_type, bit_depth", [(0, 8), (0, 16), (2, 8), (4, 16), (2, 16), (6, 16)],
                         ids=["1-byte", "2-byte", "3-byte", "4-byte", "6-byte", "8-byte"])  # pixel sizes
@pytest.mark.parametrize("width", [1, 3, 8, 9, 17, 45])
def test_unfilter_of_row_runs_equals_the_pixels(color_type: int, bit_depth: int, width: int) -> None:
    """Rows in runs of one filter type (the row-parallel unfilter), every pixel size, bands narrower and wider than
    their rows: the general unfilter gives the pixels, decode_preprocess the reference (full path for colour, the
    grey lanes of an R=G=B copy)."""
    from iws_engine.kernels import _cpu_decode as core

    rng = np.random.default_rng([color_type, bit_depth, width])
    height = 67
    pixels = random_pixels(rng, height, width, color_type, bit_depth)
    raw = filter_image(pixels, bit_depth, filters=filter_runs(rng, height))
    bpp = pixels.shape[2] * bit_depth // 8
    out = np.zeros(height * width * bpp, np.uint8)
    assert core.unfilter(np.frombuffer(raw, np.uint8), height, width * bpp, bpp, out)[0] == core.STATUS_FULL
    assert out.tobytes() == pixels.astype(">u2" if bit_depth == 16 else np.uint8).tobytes()
    spec = PreprocessSpec(mean=0.5, std=0.25, size=(31, 7))
    data = encode_png(pixels, color_type, bit_depth, raw=raw)
    actual, path = native_input(data, spec)
    assert path == (native.FULL if color_type in (2, 6) else native.GREY_LANES)
    assert_bits_equal(actual, preprocess_reference(pixels, spec))
    grey = pixels[:, :, :1]
    rgba = np.concatenate([grey] * 3 + [random_pixels(rng, height, width, 0, bit_depth)], 2)  # R=G=B, any alpha
    data = encode_png(rgba, 6, bit_depth, raw=filter_image(rgba, bit_depth, filters=filter_runs(rng, height)))
    actual, path = native_input(data, spec)
    assert path == native.GREY_LANES
    assert_bits_equal(actual, preprocess_reference(rgba, spec))


def _bfloat16_bits(x: np.ndarray) -> np.ndarray:
    torch = pytest.importorskip("torch", reason="torch is the bfloat16 reference (.to(torch.bfloat16))")
    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@pytest.mark.parametrize("std", [0.2251, 5e-6, 3e4, 1e38],
                         ids=["iws", "float16-overflow", "float16-subnormal", "bfloat16-subnormal"])
@pytest.mark.parametrize("color_type, grey", [(6, True), (2, False), (0, True)], ids=["rgba-grey", "rgb", "grey"])
def test_float16_and_bfloat16_outputs_are_the_float32_input_rounded(std: float, color_type: int, grey: bool) -> None:
    """out as float16 / bfloat16 (uint16 bits): NumPy's astype(np.float16) and torch's .to(torch.bfloat16) of the
    float32 model input, bit for bit, through both paths, at scales that overflow or go subnormal."""
    rng = np.random.default_rng([color_type, int(std * 1e4) % 1000])
    base = random_pixels(rng, 83, 97, 0, 16)
    if color_type == 0:
        pixels = base
    else:
        colour = [base] * 3 if grey else [base, random_pixels(rng, 83, 97, 4, 16)]  # 1 + 2 channels
        pixels = np.concatenate(colour + ([random_pixels(rng, 83, 97, 0, 16)] if color_type == 6 else []), 2)
    data = make_png(pixels, color_type, 16)
    spec = PreprocessSpec(mean=0.4137, std=std, size=(64, 40))
    info = parse_png(data)
    expected32 = np.empty(spec.size, np.float32)
    path = native.decode_preprocess(info, spec, expected32)
    assert path == (native.GREY_LANES if grey else native.FULL)
    assert_bits_equal(expected32, reference_input(data, spec))
    half = np.full(spec.size, np.nan, np.float16)
    assert native.decode_preprocess(info, spec, half) == path
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(half.view(np.uint16), expected32.astype(np.float16).view(np.uint16))
    brain = np.zeros(spec.size, np.uint16)
    assert native.decode_preprocess(info, spec, brain) == path
    np.testing.assert_array_equal(brain, _bfloat16_bits(expected32))
    if std == 5e-6:
        assert np.isinf(half).any() and np.isfinite(half).any()
    if std == 3e4:
        assert ((np.abs(half) < np.finfo(np.float16).tiny) & (half != 0)).any()
    if std == 1e38:
        assert ((np.abs(expected32) < np.finfo(np.float32).tiny) & (brain & 0x7fff != 0)).any()
    with pytest.raises(TypeError, match="float64"):
        native.decode_preprocess(info, spec, np.empty(spec.size, np.float64))


def test_rounding_to_float16_and_bfloat16_equals_numpy_and_torch() -> None:
    """The core's rounding (native.round_float32, the one decode_preprocess applies) on random float32 bit patterns
    of every class and on exact ties, normal and subnormal: NumPy's float16 and torch's bfloat16, bit for bit
    (NaNs: a NaN either way)."""
    rng = np.random.default_rng(11)
    bits = rng.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32)
    exponents = rng.integers(0, 256, 20_000, dtype=np.uint32) << 23
    mantissas = rng.integers(0, 2**23, 20_000, dtype=np.uint32)
    ties = np.concatenate([exponents | (mantissas & ~np.uint32(0x1FFF)) | 0x1000,  # float16 ties (normal range)
                           exponents | (mantissas & ~np.uint32(0xFFFF)) | 0x8000,  # bfloat16 ties
                           np.arange(0x33000000, 0x38800000, 0x800, dtype=np.uint32),  # float16 subnormals
                           np.uint32([0, 0x80000000, 0x7F800000, 0xFF800000, 0x477FEFFF, 0x477FF000, 0x7F7FFFFF])])
    values = np.concatenate([bits, ties, ties | 0x80000000]).view(np.float32)
    nan = np.isnan(values)
    half = native.round_float32(values, np.empty(values.shape, np.float16))
    with np.errstate(over="ignore"):
        expected = values.astype(np.float16)
    np.testing.assert_array_equal(np.isnan(half), nan)
    np.testing.assert_array_equal(half.view(np.uint16)[~nan], expected.view(np.uint16)[~nan])
    brain = native.round_float32(values, np.empty(values.shape, np.uint16))
    np.testing.assert_array_equal(brain[~nan], _bfloat16_bits(values)[~nan])
    assert ((brain[nan] & 0x7F80) == 0x7F80).all() and (brain[nan] & 0x7F).all()


# --- synthetic IWS vignettes of every format and row filter ------------------------------------------------------


@pytest.fixture(scope="module")
def vignette_field() -> np.ndarray:
    from iws_engine.export.synth import render_vignette

    return render_vignette(np.random.default_rng(21), True, 528, 539)


@pytest.mark.parametrize("fmt", ["rgba16", "gray8", "gray16", "rgb8"])
@pytest.mark.parametrize("row_filter", ["paeth", "adaptive", "none", "sub", "up", "average"])
def test_synthetic_vignettes_equal_the_reference(vignette_field, fmt: str, row_filter: str) -> None:
    from iws_engine.export.synth import encode_png as encode_vignette

    data = encode_vignette(vignette_field, fmt, row_filter)
    out, path = native_input(data, SPEC)
    assert path == native.GREY_LANES  # R=G=B (or grey): only the grey lane is unfiltered
    assert_bits_equal(out, reference_input(data, SPEC))


def rgba16_with(pixels: np.ndarray, edit) -> bytes:
    pixels = pixels.copy()
    edit(pixels)
    return make_png(pixels, 6, 16)


@pytest.mark.parametrize("edit", [
    lambda p: p.__setitem__((17, 23, 1), p[17, 23, 1] ^ 1),  # one pixel, green off by one
    lambda p: p.__setitem__((slice(None), 40, 2), 0),  # one column stripe, blue zero
    lambda p: p.__setitem__((66, slice(None), 0), 65535),  # one row stripe, red saturated
    lambda p: p.__setitem__((0, 0, 2), p[0, 0, 2] ^ 0x100),  # the first pixel, high byte of blue
    lambda p: p.__setitem__((-1, -1, 1), p[-1, -1, 1] ^ 0x8000),  # the last pixel
], ids=["one-pixel", "column-stripe", "row-stripe", "first-pixel-high-byte", "last-pixel"])
def test_almost_grey_images_take_the_full_path(edit) -> None:
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 65536, (90, 77, 1)).astype(np.uint16)
    pixels = np.concatenate([grey, grey, grey, np.full_like(grey, 65535)], 2)
    data = rgba16_with(pixels, edit)
    spec = PreprocessSpec(mean=0.5, std=0.25, size=(40, 40))
    out, path = native_input(data, spec)
    assert path == native.FULL
    assert_bits_equal(out, reference_input(data, spec))


# --- PngSuite ----------------------------------------------------------------------------------------------------


def test_pngsuite_equals_the_reference() -> None:
    """Every valid PngSuite file through the CPU loader's per-file function, native on and off."""
    if not PNGSUITE.is_dir():
        pytest.skip(f"reference PNGs absent: {PNGSUITE}")
    files = sorted(p for folder in VALID_FOLDERS for p in (PNGSUITE / folder).glob("*.png"))
    taken = 0
    for path in files:
        data = path.read_bytes()
        taken += native.handles(parse_png(data))
        for size in ((256, 256), (9, 13)):
            spec = PreprocessSpec(mean=0.45, std=0.3, size=size)
            a, b = np.empty(size, np.float32), np.empty(size, np.float32)
            load_one(data, path.name, spec, 10**8, a, native=True)
            load_one(data, path.name, spec, 10**8, b, native=False)
            assert_bits_equal(a, b)
    assert taken >= 20, taken  # the suite's non-interlaced 8/16-bit grey/colour files


@pytest.mark.parametrize("bit_depth", [8, 16])
@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 9])
def test_one_differing_sample_anywhere_in_a_row_takes_the_full_path(bit_depth: int, width: int) -> None:
    """The grey detection compares 16 filtered bytes at a time, then the row's last pixels one by one: a sample off
    by one in any column and colour channel, alone in the image, is found."""
    rng = np.random.default_rng([bit_depth, width])
    grey = random_pixels(rng, 3, width, 0, bit_depth)
    base = np.concatenate([grey] * 3 + [random_pixels(rng, 3, width, 0, bit_depth)], 2)
    spec = PreprocessSpec(mean=0.5, std=0.25, size=(2, 2))
    for x in range(width):
        for channel in range(3):
            pixels = base.copy()
            pixels[1, x, channel] ^= 1
            data = make_png(pixels, 6, bit_depth)
            out, path = native_input(data, spec)
            assert path == native.FULL, (x, channel)
            assert_bits_equal(out, reference_input(data, spec))
    assert native_input(make_png(base, 6, bit_depth), spec)[1] == native.GREY_LANES


# --- errors: the same clear per-file messages ---------------------------------------------------------------------


def rewrite_idat(data: bytes, fn) -> bytes:
    out = data[:8]
    for ctype, body in iter_chunks(data):
        out += chunk(ctype, fn(body) if ctype == b"IDAT" else body)
    return out


def with_raw(pixels_png: bytes, fn) -> bytes:
    return rewrite_idat(pixels_png, lambda idat: zlib.compress(fn(zlib.decompress(idat))))


def _bad_filter(raw: bytes) -> bytes:
    raw = bytearray(raw)
    raw[(1 + 8 * 12) * 5] = 7  # row 5 of a 12-pixel RGBA16 image
    return bytes(raw)


BAD = {
    "bad-filter-type": lambda d: with_raw(d, _bad_filter),
    "too-short": lambda d: with_raw(d, lambda raw: raw[:-10]),
    "too-long": lambda d: with_raw(d, lambda raw: raw + b"\0" * 50),
    "bad-adler32": lambda d: rewrite_idat(d, lambda idat: idat[:-4] + bytes(4)),
    "corrupt-deflate": lambda d: rewrite_idat(d, lambda idat: idat[:2] + b"\xff" * 9 + idat[11:]),
    "truncated-stream": lambda d: rewrite_idat(d, lambda idat: idat[: len(idat) // 2]),
    "trailing-data": lambda d: rewrite_idat(d, lambda idat: idat + b"junk"),
    "bytes-between-stream-and-adler32": lambda d: rewrite_idat(d, lambda idat: idat[:-4] + b"xy" + idat[-4:]),
    "side-over-libpng-limit": lambda d: (d[:8] + chunk(b"IHDR", (1_000_001).to_bytes(4, "big") + bytes([0, 0, 0, 1, 8, 0, 0, 0, 0]))
                                         + chunk(b"IDAT", zlib.compress(bytes(1_000_002))) + chunk(b"IEND")),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_files_give_the_same_error_either_way(kind: str) -> None:
    rng = np.random.default_rng(9)
    good = make_png(random_pixels(rng, 10, 12, 6, 16), 6, 16)
    data = BAD[kind](good)
    messages = []
    for use_native in (True, False):
        with pytest.raises(PngError) as e:
            load_one(data, "bad.png", SPEC, 10**8, np.empty(SPEC.size, np.float32), native=use_native)
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith("bad.png: ")
    if kind == "bad-filter-type":
        assert messages[0] == "bad.png: invalid filter type 7 on row 5"


def _parse_outcome(data: bytes, verify_crc: bool):
    try:
        i = parse_png(data, path="f.png", verify_crc=verify_crc)
    except PngError as e:
        return str(e)
    return (i.width, i.height, i.bit_depth, i.color_type, i.interlace, i.idat, i.adler32, i.trns, i.gamma_fixed,
            i.srgb, i.sbit, None if i.palette is None else i.palette.tobytes())


def test_native_chunk_walk_gives_the_python_walks_results_and_messages(monkeypatch) -> None:
    """png.parse_png with the core's scan_chunks vs without it, on PngSuite (crashers included) and on files cut,
    flipped, shortened and lengthened at random: the same PngInfo or the same message, CRCs checked or not."""
    from iws_engine.loaders import png

    assert png._native_scan_chunks is not None
    rng = np.random.default_rng(5)
    files = [p.read_bytes() for p in sorted(PNGSUITE.rglob("*.png"))]
    assert len(files) > 150
    cases = []
    for data in files[::3]:
        cases.append(data)
        for kind in range(4):
            m = bytearray(data)
            k = int(rng.integers(8, len(m)))
            if kind == 0:
                m = m[:k]
            elif kind == 1:
                m[k] = (m[k] + 1 + int(rng.integers(255))) % 256
            elif kind == 2:
                del m[k : k + int(rng.integers(1, 20))]
            else:
                m[k:k] = rng.integers(0, 256, int(rng.integers(1, 13)), dtype=np.uint8).tobytes()
            cases.append(bytes(m))
    failures = 0
    for data in cases:
        for verify_crc in (True, False):
            with_native = _parse_outcome(data, verify_crc)
            monkeypatch.setattr(png, "_native_scan_chunks", None)
            assert _parse_outcome(data, verify_crc) == with_native
            monkeypatch.undo()
            failures += isinstance(with_native, str)
    assert failures > len(cases) // 2  # most mutations are caught, by many different checks


def test_malformed_pngsuite_files_give_the_same_error_either_way() -> None:
    if not PNGSUITE.is_dir():
        pytest.skip(f"reference PNGs absent: {PNGSUITE}")
    for path in sorted([*(PNGSUITE / "testpngs" / "crashers").glob("*.png"), *(PNGSUITE / "testpngs" / "badpal").glob("*.png")]):
        outcomes = []
        for use_native in (True, False):
            out = np.empty(SPEC.size, np.float32)
            try:
                load_one(path.read_bytes(), path.name, SPEC, 10**8, out, native=use_native)
                outcomes.append(out.view(np.uint32).tobytes())
            except PngError as e:
                outcomes.append(str(e))
        assert outcomes[0] == outcomes[1], path.name


def test_fuzz_regression_files_fail_cleanly_or_decode() -> None:
    """The regression corpus (tests/corpus/fuzz: hand-made edge cases, every crash a campaign found) decodes or fails
    with a clean PngError."""
    files = sorted(p for p in CORPUS.glob("*") if p.is_file() and p.suffix != ".md") if CORPUS.is_dir() else []
    if not files:
        pytest.skip("no fuzzing regression files in tests/corpus/fuzz")
    pytest.importorskip("atheris", reason="atheris is not installed (it is in the test extra)")
    from tests.fuzz.fuzz_decode import test_one_input

    for path in files:
        test_one_input(path.read_bytes())  # raises only for a finding (PngError is handled inside)


# --- the loader and the scores ------------------------------------------------------------------------------------


def test_cpu_loader_batches_and_scores_equal_the_reference(vignette_field) -> None:
    from iws_engine.api import Classifier
    from iws_engine.export.synth import encode_png as encode_vignette

    blobs = [encode_vignette(vignette_field[::-1] if k % 2 else vignette_field, fmt)
             for k, fmt in enumerate(["rgba16", "gray8", "gray16", "rgb8"])]
    blobs.append(b"not a png")
    with Classifier(backend="onnxruntime", batch_size=4, loader="cpu") as clf:
        assert isinstance(clf.loader, CpuLoader) and clf.loader.native
        rows_native = list(clf.classify(blobs))
        clf.loader.native = False
        rows_reference = list(clf.classify(blobs))
    assert [r.error is None for r in rows_native] == [True] * 4 + [False]
    assert [(r.score, r.error) for r in rows_native] == [(r.score, r.error) for r in rows_reference]
    loader = CpuLoader(SPEC, batch_size=3, workers=2)
    reference = CpuLoader(SPEC, batch_size=3, workers=2, native=False)
    for a, b in zip(loader.batches(blobs), reference.batches(blobs)):
        assert a.ok == b.ok and a.errors == b.errors
        assert_bits_equal(a.inputs, b.inputs)


@pytest.mark.parametrize("input_dtype", ["float16", "bfloat16"])
def test_cpu_loader_writes_float16_and_bfloat16_batches(vignette_field, input_dtype: str) -> None:
    """CpuLoader(input_dtype=...): the float32 batches rounded, native or not (an interlaced file takes the general
    decoder either way), with the same error rows."""
    torch = pytest.importorskip("torch", reason="bfloat16 batches are torch tensors")
    from iws_engine.export.synth import encode_png as encode_vignette

    rng = np.random.default_rng(3)
    blobs = [encode_vignette(vignette_field, "rgba16"), b"not a png", encode_vignette(vignette_field, "gray8"),
             encode_png(random_pixels(rng, 40, 30, 2, 16), 2, 16, interlace=1)]
    (full,) = CpuLoader(SPEC, batch_size=4).batches(blobs)
    for use_native in (True, False):
        loader = CpuLoader(SPEC, batch_size=4, native=use_native, input_dtype=input_dtype)
        assert loader.input_dtype == input_dtype
        (batch,) = loader.batches(blobs)
        assert batch.ok == full.ok == [0, 2, 3] and batch.errors == full.errors
        if input_dtype == "float16":
            assert batch.inputs.dtype == np.float16
            np.testing.assert_array_equal(batch.inputs.view(np.uint16), full.inputs.astype(np.float16).view(np.uint16))
        else:
            assert batch.inputs.dtype == torch.bfloat16
            assert torch.equal(batch.inputs, torch.from_numpy(full.inputs).to(torch.bfloat16))
    with pytest.raises(ValueError, match="input_dtype"):
        CpuLoader(SPEC, input_dtype="float64")


def test_the_gil_is_released_while_decoding() -> None:
    """Decode threads scale across cores only if the core runs without the GIL: while one thread is inside a long
    native decode, another keeps running Python code."""
    import threading
    import time

    from iws_engine.kernels import _cpu_decode as core
    from iws_engine.preprocess import imresize_axis_weights

    height, width = 1500, 1500
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (height, 1 + width * 8), dtype=np.uint8)
    raw[:, 0] = rng.integers(0, 5, height)  # valid filter types, the rest random: a colour image, full path
    cols, rows = imresize_axis_weights(width, 256, False), imresize_axis_weights(height, 256, False)
    out = np.empty((256, 256), np.float32)
    inside = threading.Event()
    status = []

    def decode():
        inside.set()
        status.append(core.decode_preprocess(raw.reshape(-1), True, 0, width, height, 16, 6, cols.i0, cols.i1, cols.w0,
                                             cols.w1, rows.i0, rows.i1, rows.w0, rows.w1, 0.5, 0.25, out, True)[0])

    worker = threading.Thread(target=decode)
    worker.start()
    inside.wait()
    time.sleep(0.005)  # hands the GIL to the worker, which enters the native call (~100 ms of work)
    steps = 0
    while worker.is_alive():  # with the GIL held by the decode, this loop could not run until it returned
        steps += 1
    worker.join()
    assert status == [core.STATUS_FULL]
    assert steps > 1000, steps  # a call holding the GIL leaves ~0 here (the loop starts only after it returns)


def test_kernel_sources_carry_the_shared_headers_for_nvrtc() -> None:
    """NVRTC compiles kernels.source(name) from a string: the shared headers must be inlined into it (once each)."""
    from iws_engine import kernels

    for name, header, function in [("png_unfilter.cu", "png_filter_math.cuh", "iws_unfilter_byte"),
                                   ("grey_resize.cu", "julia_resize_math.cuh", "iws_resized_code")]:
        text = kernels.source(name)
        assert '#include "' not in text
        assert f'#line 1 "{header}"' in text and text.count('#line 1 "iws_hd.cuh"') == 1
        assert f"{function}(" in (kernels.KERNEL_DIR / header).read_text() and f"{function}(" in text
    for header in kernels.SHARED_HEADERS:
        assert (kernels.KERNEL_DIR / header).is_file()
