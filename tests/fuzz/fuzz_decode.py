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
    from iws_engine.loaders.png import PngError, parse_png
    from iws_engine.preprocess import PreprocessSpec, imresize_axis_weights

MAX_PIXELS = 1 << 20  # keeps each input fast; the guard itself is tested in tests/test_png.py
_core = native._core
_COLOUR = (0, 2, 4, 6)  # the colour types the native core takes
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


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


def main() -> None:
    if _core is None:
        raise SystemExit("the native core is not built: nothing to fuzz")
    # -jobs/-fork: libFuzzer starts its children through the shell with argv[0], which must run this interpreter
    argv = [f"{sys.executable} {os.path.abspath(__file__)}", *sys.argv[1:]]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
