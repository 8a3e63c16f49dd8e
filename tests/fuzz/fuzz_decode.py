"""Coverage-guided fuzzing (atheris/libFuzzer) of the CPU decode path: parse -> inflate -> native unfilter -> preprocess.

Run it through tests/fuzz/campaign.py, which builds the native core with AddressSanitizer + UBSan (a separate CMake
build, -DIWS_SANITIZE=ON), preloads the ASan runtime and passes the sanitized module's path in IWS_FUZZ_MODULE:

    .venv/bin/python tests/fuzz/campaign.py --seconds 60            # bounded (CI: tests/test_fuzz.py)
    .venv/bin/python tests/fuzz/campaign.py --runs 1000000           # the long campaign

Two kinds of input, chosen by the first byte, so that mutations reach the native code rather than dying at a CRC:
- even: a PNG file, parsed without CRC checks (the native chunk walk, scan_chunks, then the rules), and once with
  them, then (when the native core takes it) decoded straight into the model input, once as it comes and once
  forced through the full (all-lanes) path, as float32, float16 or bfloat16 (chosen by a byte of the input);
- odd: a header (width, height, depth, colour type, output size, output type) followed by *inflated* scanlines,
  handed to the native core as they are (decode_preprocess with is_raw) and to its general unfilter; the same bytes
  read as float32 values go through its float16/bfloat16 rounding (round_float32).
The only acceptable failures are PngError (a clear per-file error); anything else (a Python exception, a sanitizer
report, a crash) is a finding.
The general decoder (kernels/png_decode_general.cpp: any depth, colour type, Adam7, palette/tRNS/gamma tables) gets
every file the fused path does not take, small ones also decoded by its NumPy spec, which must give the same array;
and every raw input once more, its format, interlace and tables read from header byte 7 (fuzz_raw_general).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import atheris

# The sanitized build replaces the installed module before anything imports it.
_module_path = os.environ.get("IWS_FUZZ_MODULE")
if _module_path:
    _spec = importlib.util.spec_from_file_location("iws_engine.kernels._cpu_decode", _module_path)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["iws_engine.kernels._cpu_decode"] = _module
    _spec.loader.exec_module(_module)

import numpy as np  # not instrumented: its coverage is noise here

with atheris.instrument_imports(include=["iws_engine"]):
    from iws_engine.loaders import native
    from iws_engine.loaders.png import _ADAM7, PngError, decode_parsed, parse_png
    from iws_engine.preprocess import PreprocessSpec, imresize_axis_weights

MAX_PIXELS = 1 << 20  # keeps each input fast; the guard itself is tested in tests/test_png.py
_core = native._core
_COLOUR = (0, 2, 4, 6)  # the colour types the native core takes
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
_GENERAL_FORMATS = ((0, 1), (0, 2), (0, 4), (0, 8), (0, 16), (2, 8), (2, 16), (3, 1), (3, 2), (3, 4), (3, 8),
                    (4, 8), (4, 16), (6, 8), (6, 16))  # (colour type, bit depth): every PNG format
SPEC_CHECK_BYTES = 4096  # files up to this many scanline bytes are also decoded by the (slow) NumPy spec


def _spec(h: int, w: int) -> PreprocessSpec:
    return PreprocessSpec(mean=0.25, std=0.5, size=(h, w))


_OUT_DTYPES = (np.float32, np.float16, np.uint16)  # uint16: bfloat16 bits


def fuzz_file(data: bytes) -> None:
    try:
        parse_png(data, max_pixels=MAX_PIXELS)  # CRCs checked: the native walk stops at the first bad one
    except PngError:
        pass
    try:
        info = parse_png(data, max_pixels=MAX_PIXELS, verify_crc=False)
    except PngError:
        return
    if not native.handles(info):
        try:
            decoded = decode_parsed(info, path="fuzz")
        except PngError:
            return
        if info.raw_size <= SPEC_CHECK_BYTES:
            spec = decode_parsed(info, path="fuzz", native=False)
            assert decoded.dtype == spec.dtype and decoded.shape == spec.shape and np.array_equal(decoded, spec)
        return
    h_out = 1 + data[-1] % 40 if data else 8
    w_out = 1 + data[-2] % 40 if len(data) > 1 else 8
    spec = _spec(h_out, w_out)
    dtype = _OUT_DTYPES[data[-3] % 3 if len(data) > 2 else 0]
    for force_full in (False, True):
        out = np.empty(spec.size, dtype)
        try:
            native.decode_preprocess(info, spec, out, path="fuzz", force_full=force_full)
        except PngError:
            return


def fuzz_raw(data: bytes) -> None:
    if len(data) < 8:
        return
    width = 1 + data[0] % 64
    height = 1 + data[1] % 64
    bit_depth = 8 if data[2] & 1 else 16
    color_type = _COLOUR[data[2] >> 1 & 3]
    h_out, w_out = 1 + data[3] % 48, 1 + data[4] % 48
    force_full = bool(data[5] & 1)
    out_format = data[6] % 3  # OUT_FLOAT32, OUT_FLOAT16, OUT_BFLOAT16
    body = data[8:] or b"\0"
    bpp = _CHANNELS[color_type] * bit_depth // 8
    row_bytes = width * bpp
    need = height * (row_bytes + 1)
    raw = np.frombuffer((body * (need // len(body) + 1))[:need], np.uint8)
    clamp = h_out > height or w_out > width
    cols, rows = imresize_axis_weights(width, w_out, clamp), imresize_axis_weights(height, h_out, clamp)
    out = np.empty((h_out, w_out), _OUT_DTYPES[out_format])
    status, _, _ = _core.decode_preprocess(raw, True, 0, width, height, bit_depth, color_type, cols.i0, cols.i1,
                                           cols.w0, cols.w1, rows.i0, rows.i1, rows.w0, rows.w1, 0.25, 0.5, out,
                                           force_full, out_format)
    assert status in (_core.STATUS_GREY_LANES, _core.STATUS_FULL, _core.STATUS_BAD_FILTER), status
    unfiltered = np.empty(height * row_bytes, np.uint8)
    status, _, _ = _core.unfilter(raw, height, row_bytes, bpp, unfiltered)
    assert status in (_core.STATUS_FULL, _core.STATUS_BAD_FILTER), status
    # a raw stream that is not what it claims must be refused, never read past
    status, _, _ = _core.decode_preprocess(raw[:-1], True, 0, width, height, bit_depth, color_type, cols.i0, cols.i1,
                                           cols.w0, cols.w1, rows.i0, rows.i1, rows.w0, rows.w1, 0.25, 0.5, out,
                                           force_full, out_format)
    assert status == _core.STATUS_BAD_SHAPE, status
    # and so must an output plane of another element type than out_format says
    status, _, _ = _core.decode_preprocess(raw, True, 0, width, height, bit_depth, color_type, cols.i0, cols.i1,
                                           cols.w0, cols.w1, rows.i0, rows.i1, rows.w0, rows.w1, 0.25, 0.5, out,
                                           force_full, (out_format + 1) % 3)
    assert status == _core.STATUS_BAD_SHAPE, status
    values = np.frombuffer(body[: len(body) // 4 * 4], np.float32)
    assert _core.round_float32(values, np.empty(values.shape, np.uint16), 1 + out_format % 2)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] % 2 == 0:
        fuzz_file(data[1:])
    else:
        fuzz_raw(data[1:])
        fuzz_raw_general(data[1:])


def fuzz_raw_general(data: bytes) -> None:
    """fuzz_raw's input for the general decoder: inflated scanlines of any format, Adam7 or not, with or without the
    palette/tRNS/gamma tables. Byte 7: bits 0-3 the format, bit 4 Adam7, bits 5-6 the tables (palette with alpha or
    tRNS key; gamma)."""
    if len(data) < 8:
        return
    width, height, mode, body = 1 + data[0] % 64, 1 + data[1] % 64, data[7], data[8:] or b"\0"
    color_type, bit_depth = _GENERAL_FORMATS[(mode & 15) % len(_GENERAL_FORMATS)]
    interlace, tables = mode >> 4 & 1, mode >> 5
    channels = _CHANNELS[color_type]
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    need = 0
    for x0, y0, dx, dy in passes:
        pass_w, pass_h = len(range(x0, width, dx)), len(range(y0, height, dy))
        if pass_w and pass_h:
            need += pass_h * (1 + (pass_w * channels * bit_depth + 7) // 8)
    raw = np.frombuffer((body * (need // len(body) + 1))[:need], np.uint8)
    table = np.frombuffer((body * (1024 // len(body) + 1))[:1024], np.uint8)
    words = table.view(">u2").astype(np.uint16) if bit_depth == 16 else table[:256].astype(np.uint16)
    palette, trns, gamma = np.zeros(0, np.uint8), np.zeros(0, np.uint16), np.zeros(0, np.uint16)
    out_channels = channels
    if color_type == 3:
        out_channels = 4 if tables & 1 else 3
        palette = table[: 256 * out_channels]
    else:
        if tables & 1 and color_type in (0, 2):
            trns, out_channels = words[:channels] & (0xFFFF if bit_depth == 16 else 0xFF), channels + 1
        if tables & 2:
            gamma = np.resize(words, 65536 if bit_depth == 16 else 256)
    out = np.empty(height * width * out_channels * (2 if bit_depth == 16 else 1), np.uint8)
    number, row, value, refusal = _core.decode_general(raw, width, height, bit_depth, color_type, interlace, palette,
                                                       trns, gamma, out)
    assert not refusal, refusal
    assert number == -1 or (value > 4 and 0 <= row < height and (1 <= number <= 7 if interlace else number == 0))
    # a raw stream that is not what it claims must be refused, never read past
    number, _, _, refusal = _core.decode_general(raw[:-1], width, height, bit_depth, color_type, interlace, palette,
                                                 trns, gamma, out)
    assert number == -2 and refusal, number


def main() -> None:
    if _core is None:
        raise SystemExit("the native core is not built: nothing to fuzz")
    # -jobs/-fork: libFuzzer starts its children through the shell with argv[0], which must run this interpreter
    argv = [f"{sys.executable} {os.path.abspath(__file__)}", *sys.argv[1:]]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
