"""The GPU loading path: kernels/*.cu and engine/loaders/gpu.py.

On any machine (CI has no GPU): the kernels compile with nvcc (sm_90, all warnings as errors)
and with NVRTC (when CuPy is installed); the descriptor layouts and status bits match the CUDA
structs; routing (which images the CPU decoder takes) and the batch descriptors are right; the
Adler-32 chunk-combine formula of adler32.cu and the unfilter wavefront schedule of
png_unfilter.cu, replayed in NumPy/Python, agree with zlib and a sequential unfilter.

On a CUDA device (marked gpu): pngsuite files unfiltered on the GPU equal decode_png's pixels
(and Pillow's); synthetic vignettes of every format equal preprocess_reference exactly (fp32)
and after fp16 rounding; malformed files get the CPU loader's errors; mixed batches keep their
order and errors. Loader tests run with nvCOMP when it is installed and with zlib on the host
(inflate="host") always, so the kernels are tested on machines without nvCOMP too.

kernels/clip_resize.cu (Pipeline A's input) is compile-checked and its structs compared here with
the others; its arithmetic, host side and loader path are tested in tests/test_gpu_clip.py.
"""

from __future__ import annotations

import io
import re
import shutil
import struct
import subprocess
import zlib
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from iws_engine import kernels
from iws_engine.loaders import create_loader, default_loader_name
from iws_engine.loaders.cpu import CpuLoader
from iws_engine.loaders.gpu import (
    ADLER_JOB,
    CLIP_JOB,
    DEVICE_ALIGN,
    PILLOW_TAP,
    RESIZE_JOB,
    STATUS_ADLER_MISMATCH,
    STATUS_BAD_FILTER,
    STATUS_BAD_JOB,
    UNFILTER_JOB,
    GpuLoader,
    LoaderError,
    TapTables,
    cpu_fallback_reason,
    plan_batch,
)
from iws_engine.loaders.png import decode_png, inflate_idat, parse_png
from iws_engine.preprocess import PreprocessSpec, imresize_axis_weights, preprocess_reference
from tests.conftest import PNGSUITE
from tests.pngtools import SIGNATURE, chunk, iter_chunks, without_chunks

KERNEL_FILES = tuple(kernels.ENTRY_POINTS)
CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
GPU_FORMATS = [(0, 8), (0, 16), (4, 8), (4, 16), (2, 8), (2, 16), (6, 8), (6, 16)]  # (colour type, bit depth)
SPEC = PreprocessSpec(mean=0.4, std=0.2)  # 256x256, the IWS spec's shape
ADLER_MOD = 65521


# --- a PNG writer that uses every filter type (vectorised per row, fast enough for 539x528 RGBA16) ---



def paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def filter_scanlines(rows: np.ndarray, bpp: int, filters=(0, 1, 2, 3, 4)) -> bytes:
    """Filtered data of unfiltered scanlines (H, row_bytes) uint8; row r uses filters[r % len]."""
    out, prev = [], np.zeros(rows.shape[1], np.int32)
    for r, row in enumerate(rows.astype(np.int32)):
        ftype = filters[r % len(filters)]
        a = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])[: len(row)]
        c = np.concatenate([np.zeros(bpp, np.int32), prev[:-bpp]])[: len(row)]
        predicted = (0, a, prev, (a + prev) // 2, paeth(a, prev, c))[ftype]
        out.append(bytes([ftype]) + ((row - predicted) & 0xFF).astype(np.uint8).tobytes())
        prev = row
    return b"".join(out)


def scanlines_of(pixels: np.ndarray, bit_depth: int) -> np.ndarray:
    """(H, W, C) samples -> (H, row_bytes) bytes as PNG stores them (big-endian 16-bit)."""
    h = pixels.shape[0]
    if bit_depth == 16:
        return np.ascontiguousarray(pixels.astype(">u2")).view(np.uint8).reshape(h, -1)
    return np.ascontiguousarray(pixels.astype(np.uint8)).reshape(h, -1)


def make_png(pixels: np.ndarray, color_type: int, bit_depth: int, *, filters=(0, 1, 2, 3, 4), extra: bytes = b"",
             raw: bytes | None = None, plte: bytes | None = None) -> bytes:
    """A non-interlaced PNG of 8/16-bit samples (or of `raw` filtered data as given)."""
    height, width = pixels.shape[:2]
    if raw is None:
        bpp = max(1, CHANNELS[color_type] * bit_depth // 8)
        raw = filter_scanlines(scanlines_of(pixels, bit_depth), bpp, filters)
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    palette = chunk(b"PLTE", plte) if plte is not None else b""
    return SIGNATURE + chunk(b"IHDR", ihdr) + extra + palette + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND")


def header_only_png(width: int, height: int, color_type: int, bit_depth: int, *, interlace: int = 0,
                    extra: bytes = b"") -> bytes:
    """A PNG that parses (routing tests); its IDAT holds zeros, not necessarily the right amount."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, interlace)
    plte = chunk(b"PLTE", bytes(range(3 * min(16, 1 << bit_depth)))) if color_type == 3 else b""
    return SIGNATURE + chunk(b"IHDR", ihdr) + extra + plte + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND")


def random_pixels(rng: np.random.Generator, height: int, width: int, color_type: int, bit_depth: int) -> np.ndarray:
    dtype = np.uint16 if bit_depth == 16 else np.uint8
    return rng.integers(0, 1 << bit_depth, (height, width, CHANNELS[color_type]), dtype=np.int64).astype(dtype)


def gama(value: int) -> bytes:
    return chunk(b"gAMA", struct.pack(">I", value))


SRGB = chunk(b"sRGB", b"\0")


# --- CPU: the kernels compile ----------------------------------------------------------------------


@pytest.mark.parametrize("name", KERNEL_FILES)
def test_kernel_compiles_with_nvcc(name: str, tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the kernels are compile-checked where the CUDA toolkit is installed")
    result = subprocess.run(
        [nvcc, "-c", "--fmad=false", "-arch=sm_90", "-std=c++17", "-Werror", "all-warnings",
         str(kernels.KERNEL_DIR / name), "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr + result.stdout
    assert "warning" not in (result.stderr + result.stdout).lower()


@lru_cache(maxsize=None)
def nvrtc_ptx(name: str) -> str:
    """PTX of a kernel file compiled by NVRTC for compute_90 with the loader's options (no GPU needed)."""
    from iws_engine.kernels import nvrtc
    from iws_engine.loaders.gpu import nvrtc_options

    if not nvrtc.available():
        pytest.skip("libnvrtc is not installed (pip install 'nvidia-cuda-nvrtc==13.*'): NVRTC check skipped")
    options = [o.replace("-arch=sm_", "-arch=compute_") for o in nvrtc_options(90)]  # PTX, not a cubin
    compiled = nvrtc.compile_program(kernels.source(name), name, options)
    assert "warning" not in compiled.log.lower(), compiled.log
    return compiled.ptx


@pytest.mark.parametrize("name", KERNEL_FILES)
def test_kernel_ptx_has_its_entry_points(name: str) -> None:
    ptx = nvrtc_ptx(name)
    for entry in kernels.ENTRY_POINTS[name]:
        assert f".entry {entry}(" in ptx  # extern "C": the unmangled name the loader asks for


def test_every_kernel_file_is_listed() -> None:
    assert sorted(p.name for p in kernels.KERNEL_DIR.glob("*.cu")) == sorted(kernels.ENTRY_POINTS)


def test_grey_resize_ptx_has_no_fused_multiply_add() -> None:
    """The exactness argument: every product and sum is rounded on its own, as in NumPy."""
    ptx = nvrtc_ptx("grey_resize.cu")
    fused = set(re.findall(r"\b(?:fma|mad)\.[\w.]*f(?:32|64)\b", ptx))  # integer mad.lo is address arithmetic
    assert not fused, fused
    assert "mul.rn.f64" in ptx and "add.rn.f64" in ptx and "cvt.rni.f64.f64" in ptx


# --- CPU: the host/device contract -----------------------------------------------------------------


def struct_fields(source: str, name: str) -> list[tuple[str, str]]:
    body = re.search(rf"struct {name} \{{(.*?)\}};", source, re.S).group(1)
    return re.findall(r"^\s*(u64|u32|int)\s+(\w+);", body, re.M)


@pytest.mark.parametrize("file, struct_name, dtype", [
    ("png_unfilter.cu", "UnfilterJob", UNFILTER_JOB),
    ("grey_resize.cu", "ResizeJob", RESIZE_JOB),
    ("adler32.cu", "AdlerJob", ADLER_JOB),
    ("clip_resize.cu", "ClipJob", CLIP_JOB),
    ("clip_resize.cu", "PillowTap", PILLOW_TAP),
])
def test_descriptor_layouts_match_the_cuda_structs(file: str, struct_name: str, dtype: np.dtype) -> None:
    source = kernels.source(file)
    fields = struct_fields(source, struct_name)
    assert [f for _, f in fields] == list(dtype.names)
    assert [{"u64": "<u8", "u32": "<u4", "int": "<i4"}[t] for t, _ in fields] == [dtype[f].str for f in dtype.names]
    size = int(re.search(rf"static_assert\(sizeof\({struct_name}\) == (\d+)", source).group(1))
    assert dtype.itemsize == size


def test_status_bits_match_the_kernels() -> None:
    def define(file: str, name: str) -> int:
        return int(re.search(rf"#define {name} (\d+)u", kernels.source(file)).group(1))

    assert define("adler32.cu", "ADLER_MISMATCH") == STATUS_ADLER_MISMATCH
    assert define("png_unfilter.cu", "UNFILTER_BAD_FILTER") == STATUS_BAD_FILTER
    assert define("png_unfilter.cu", "UNFILTER_BAD_JOB") == STATUS_BAD_JOB


# --- CPU: routing ------------------------------------------------------------------------------------


@pytest.mark.parametrize("data, expected", [
    (header_only_png(8, 8, 0, 8), None),
    (header_only_png(8, 8, 0, 16), None),
    (header_only_png(8, 8, 2, 16, extra=chunk(b"tRNS", bytes(6))), None),  # tRNS only adds alpha, dropped anyway
    (header_only_png(8, 8, 6, 16), None),
    (header_only_png(8, 8, 4, 8), None),
    (header_only_png(8, 8, 0, 8, extra=SRGB + gama(100_000)), None),  # sRGB: libpng ignores gAMA
    (header_only_png(8, 8, 0, 8, extra=gama(45_455)), None),  # 0.45455 * 2.2 ~ 1: below libpng's threshold
    (header_only_png(8, 8, 0, 8, extra=gama(100_000)), "gamma correction"),
    (header_only_png(8, 8, 6, 16, extra=gama(65_909)), "gamma correction"),
    (header_only_png(8, 8, 0, 8, interlace=1), "interlaced"),
    (header_only_png(8, 8, 3, 8), "palette"),
    (header_only_png(8, 8, 3, 1), "palette"),
    (header_only_png(8, 8, 0, 1), "1-bit greyscale"),
    (header_only_png(8, 8, 0, 2), "2-bit greyscale"),
    (header_only_png(8, 8, 0, 4), "4-bit greyscale"),
], ids=["grey8", "grey16", "rgb16-trns", "rgba16", "ga8", "srgb-overrides-gama", "gama-near-screen",
        "gama-1.0", "gama-1/1.8", "interlaced", "palette8", "palette1", "grey1", "grey2", "grey4"])
def test_cpu_fallback_reason(data: bytes, expected: str | None) -> None:
    reason = cpu_fallback_reason(parse_png(data))
    assert reason == expected if expected is None else expected in reason


def test_fallback_routes_every_pngsuite_file() -> None:
    """Expected route from the chunks themselves: interlace, palette, depth, gAMA/sRGB."""
    if not PNGSUITE.is_dir():
        pytest.skip(f"reference PNGs absent: {PNGSUITE}")
    files = sorted(p for folder in ("basic", "basic/interlaced", "testpngs", "testpngs/png-3")
                   for p in (PNGSUITE / folder).glob("*.png"))
    on_gpu = 0
    for path in files:
        data = path.read_bytes()
        chunks = dict(iter_chunks(data))
        width, height, depth, ctype, _, _, interlace = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
        gamma = int.from_bytes(chunks[b"gAMA"], "big") if b"gAMA" in chunks else None
        corrected = gamma is not None and b"sRGB" not in chunks and abs(gamma * 2.2 / 100_000 - 1) > 0.05
        expected = ("interlaced" if interlace else "palette" if ctype == 3 else "greyscale (sub-byte" if depth < 8
                    else "gamma" if corrected else None)
        reason = cpu_fallback_reason(parse_png(data))
        assert (reason is None) == (expected is None), (path.name, reason)
        assert expected is None or expected in reason, (path.name, reason)
        on_gpu += reason is None
    assert on_gpu >= 20  # the 8/16-bit non-gamma files of testpngs/



# --- CPU: batch descriptors --------------------------------------------------------------------------


def test_plan_batch_descriptors_for_mixed_formats() -> None:
    rng = np.random.default_rng(1)
    formats = [(528, 539, 6, 16), (7, 31, 0, 8), None, (1, 1, 4, 16), (200, 300, 2, 8), (256, 256, 0, 16),
               (9, 5, 4, 8), (3, 1000, 6, 8)]  # (height, width, colour type, depth); None = failed earlier
    datas = [None if f is None else make_png(random_pixels(rng, f[0], f[1], f[2], f[3]), f[2], f[3]) for f in formats]
    datas += [header_only_png(16, 16, 3, 8), header_only_png(16, 16, 0, 4), header_only_png(16, 16, 2, 8, interlace=1)]
    infos = [None if d is None else parse_png(d) for d in datas]
    taps = TapTables()
    plan = plan_batch(infos, SPEC, taps)

    assert plan.size == len(datas)
    assert plan.gpu == [0, 1, 3, 4, 5, 6, 7]
    assert sorted(plan.cpu) == [8, 9, 10]
    assert "palette" in plan.cpu[8] and "sub-byte" in plan.cpu[9] and "interlaced" in plan.cpu[10]
    for name in ("compressed", "inflated"):
        offsets, sizes = getattr(plan, f"{name}_offsets"), getattr(plan, f"{name}_sizes")
        assert np.all(offsets % DEVICE_ALIGN == 0)
        assert np.all(offsets[1:] >= offsets[:-1] + sizes[:-1])  # packed in order, never overlapping
        assert offsets[-1] + sizes[-1] <= getattr(plan, f"{name}_bytes")
    out_h, out_w = SPEC.size
    for j, k in enumerate(plan.gpu):
        info = infos[k]
        channels, depth = CHANNELS[info.color_type], info.bit_depth
        row_bytes = info.width * channels * depth // 8
        assert plan.compressed_sizes[j] == len(info.deflate)
        assert plan.inflated_sizes[j] == info.raw_size == info.height * (row_bytes + 1)
        offset = int(plan.inflated_offsets[j])
        assert tuple(plan.adler_jobs[j]) == (offset, info.raw_size, info.adler32, 0)
        assert tuple(plan.unfilter_jobs[j]) == (offset, offset + 1, row_bytes, info.height, row_bytes + 1,
                                                channels * depth // 8)
        job = plan.resize_jobs[j]
        assert (job["src_offset"], job["src_pitch"]) == (offset + 1, row_bytes + 1)
        assert (job["pixel_bytes"], job["sample_bytes"]) == (channels * depth // 8, depth // 8)
        assert job["colour_channels"] == (1 if info.color_type in (0, 4) else 3)
        assert job["out_index"] == k
        clamp = out_h > info.height or out_w > info.width
        i0, i1, w0, w1 = taps.arrays()
        for start, n_in, n_out in ((job["col_taps"], info.width, out_w), (job["row_taps"], info.height, out_h)):
            want = imresize_axis_weights(n_in, n_out, clamp)
            sl = slice(int(start), int(start) + n_out)
            np.testing.assert_array_equal(i0[sl], want.i0)
            np.testing.assert_array_equal(i1[sl], want.i1)
            assert w0[sl].tobytes() == want.w0.tobytes() and w1[sl].tobytes() == want.w1.tobytes()
    # one table per distinct (n_in, n_out, clamp): 528/539 down, 7/31 up (clamp), 1 up, ...
    assert taps.total == sum(n_out for (_, n_out, _) in taps._offsets)


def test_plan_batch_keeps_device_memory_bounded() -> None:
    rng = np.random.default_rng(2)
    data = make_png(random_pixels(rng, 64, 64, 6, 16), 6, 16)  # raw_size 64 * 513 = 32,832 bytes
    infos = [parse_png(data)] * 5
    plan = plan_batch(infos, SPEC, TapTables(), max_batch_bytes=3 * 33_024)  # room for three aligned images
    assert plan.gpu == [0, 1, 2]
    assert sorted(plan.cpu) == [3, 4] and all("max_batch_bytes" in r for r in plan.cpu.values())
    assert plan.inflated_bytes <= 3 * 33_024


def test_tap_tables_reuse_and_reset() -> None:
    taps = TapTables(max_entries=600)
    a = taps.offset(528, 256, False)
    b = taps.offset(539, 256, False)
    assert (a, b, taps.offset(528, 256, False)) == (0, 256, 0) and taps.version == 2
    taps.offset(100, 256, True)
    taps.reset_if_full()  # 768 entries > 600
    assert taps.total == 0 and taps.version == 4
    assert taps.offset(539, 256, False) == 0


# --- CPU: the Adler-32 kernel's arithmetic, replayed in NumPy ---------------------------------------


def adler32_like_the_kernel(data: bytes, chunk: int = 16) -> int:
    """kernels/adler32.cu in NumPy: independent chunk sums, combined by position, reduced once."""
    d = np.frombuffer(data, np.uint8).astype(np.uint64)
    n = len(d)
    whole = n // chunk
    body = d[: whole * chunk].reshape(whole, chunk)
    a = body.sum(axis=1)  # per chunk: sum d_k
    b = (body * np.arange(chunk, 0, -1, dtype=np.uint64)).sum(axis=1)  # sum (L - k) d_k
    after = (n - np.arange(whole, dtype=np.uint64) * chunk - chunk) % ADLER_MOD  # bytes after the chunk
    sum_a, sum_b = int(a.sum()), int((b + after * a).sum())
    tail = d[whole * chunk:]
    if len(tail):  # the kernel's byte path: zlib's recurrence from a = b = 0
        ta = tb = 0
        for x in tail.tolist():
            ta += x
            tb += ta
        sum_a, sum_b = sum_a + ta, sum_b + tb  # nothing follows the tail
    assert sum_a < 2**64 and sum_b < 2**64
    return ((n % ADLER_MOD + sum_b % ADLER_MOD) % ADLER_MOD) << 16 | (1 + sum_a % ADLER_MOD) % ADLER_MOD


@pytest.mark.parametrize("length", [0, 1, 15, 16, 17, 5552, 65521, 65537, 1_000_003])
def test_adler32_chunk_combine_matches_zlib(length: int) -> None:
    rng = np.random.default_rng(length)
    for data in (rng.integers(0, 256, length, dtype=np.uint8).tobytes(), b"\xff" * length):
        assert adler32_like_the_kernel(data) == zlib.adler32(data)
        assert adler32_like_the_kernel(data, chunk=7) == zlib.adler32(data)  # the formula is not tied to 16


def test_adler32_chunk_term_bound() -> None:
    # adler32.cu's comment: per 16-byte chunk, b + (n-s-L) mod M * a < 2^28, so u64 sums hold 2^36 chunks.
    assert 136 * 255 + (ADLER_MOD - 1) * 16 * 255 < 2**28


def test_adler32_ordered_pairwise_combine() -> None:
    """The same algebra as an associative combine of (a, b, length) chunks, on random splits."""
    def combine(x, y):
        return ((x[0] + y[0]) % ADLER_MOD, (x[1] + y[1] + y[2] * x[0]) % ADLER_MOD, x[2] + y[2])

    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, 200_000, dtype=np.uint8).tobytes()
    cuts = np.unique(np.concatenate([[0, len(data)], rng.integers(0, len(data), 50)]))
    parts = []
    for s, e in zip(cuts[:-1], cuts[1:]):
        piece = np.frombuffer(data[s:e], np.uint8).astype(np.int64)
        parts.append((int(piece.sum()) % ADLER_MOD, int((piece * np.arange(len(piece), 0, -1)).sum()) % ADLER_MOD,
                      len(piece)))
    while len(parts) > 1:  # a tree, as a parallel reduction would combine them
        parts = [combine(*parts[i:i + 2]) if i + 1 < len(parts) else parts[i] for i in range(0, len(parts), 2)]
    a, b, n = parts[0]
    assert ((n + b) % ADLER_MOD) << 16 | (1 + a) % ADLER_MOD == zlib.adler32(data)


# --- CPU: the unfilter kernel's wavefront schedule, replayed in Python --------------------------------


def reconstruct(ftype: int, x: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    predicted = (np.zeros_like(x), a, b, (a + b) // 2, paeth(a, b, c))[ftype] if ftype <= 4 else 0
    return (x + predicted) & 0xFF


def unfilter_like_the_kernel(raw: bytes, row_bytes: int, height: int, bpp: int, threads: int) -> np.ndarray:
    """png_unfilter.cu's schedule: bands of `threads` rows, anti-diagonal steps, shared-memory handoff."""
    src = np.frombuffer(raw, np.uint8).reshape(height, row_bytes + 1).astype(np.int64)
    dst = np.full((height, row_bytes), -1, np.int64)  # -1: never written (a read of it would show)
    width = row_bytes // bpp
    handoff = np.full((2, threads, bpp), -1, np.int64)
    zero = np.zeros(bpp, np.int64)
    for band in range(0, height, threads):
        rows = min(threads, height - band)
        left, upper_left = [zero] * rows, [zero] * rows
        for d in range(rows + width - 1):
            # Within a step, threads read parity (d-1)&1 and write parity d&1: any order is the barrier's.
            for t in range(rows):
                p, r = d - t, band + t
                if not 0 <= p < width:
                    continue
                cols = slice(p * bpp, (p + 1) * bpp)
                up = zero if r == 0 else (handoff[(d - 1) & 1, t - 1] if t > 0 else dst[r - 1, cols]).copy()  # a register
                assert np.all(up >= 0), "read a pixel before it was written"
                value = reconstruct(int(src[r, 0]), src[r, 1:][cols], left[t], up, upper_left[t])
                dst[r, cols] = value
                handoff[d & 1, t] = value
                left[t], upper_left[t] = value, up
    return dst.astype(np.uint8)


def unfilter_sequentially(raw: bytes, row_bytes: int, height: int, bpp: int) -> np.ndarray:
    src = np.frombuffer(raw, np.uint8).reshape(height, row_bytes + 1)
    out = np.zeros((height, row_bytes), np.int64)
    prev = np.zeros(row_bytes, np.int64)
    for r in range(height):
        line = src[r, 1:].astype(np.int64)
        for i in range(row_bytes):
            a = out[r, i - bpp] if i >= bpp else 0
            c = prev[i - bpp] if i >= bpp else 0
            out[r, i] = reconstruct(int(src[r, 0]), np.int64(line[i]), np.int64(a), np.int64(prev[i]), np.int64(c))
        prev = out[r]
    return out.astype(np.uint8)


@pytest.mark.parametrize("color_type, bit_depth", GPU_FORMATS + [(3, 8)])
@pytest.mark.parametrize("threads", [1, 4, 32])
def test_unfilter_wavefront_schedule(color_type: int, bit_depth: int, threads: int) -> None:
    rng = np.random.default_rng(color_type * 100 + bit_depth)
    height, width = 11, 7  # 11 rows: 3 bands of 4 (last one partial), or 1 band of 32
    pixels = random_pixels(rng, height, width, color_type, bit_depth)
    data = make_png(pixels, color_type, bit_depth, filters=(0, 1, 2, 3, 4, 4, 3, 1),
                    plte=bytes(range(256)) * 3 if color_type == 3 else None)
    info = parse_png(data)
    raw = inflate_idat(info)
    row_bytes = len(raw) // height - 1
    got = unfilter_like_the_kernel(raw, row_bytes, height, info.filter_stride, threads)
    np.testing.assert_array_equal(got, unfilter_sequentially(raw, row_bytes, height, info.filter_stride))
    np.testing.assert_array_equal(got, scanlines_of(pixels, bit_depth))


def test_unfilter_wavefront_schedule_sub_byte() -> None:
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 256, (9, 3), dtype=np.uint8)  # 1-bit grey, 20 pixels wide: 3 bytes per row
    raw = filter_scanlines(rows, 1)
    np.testing.assert_array_equal(unfilter_like_the_kernel(raw, 3, 9, 1, threads=4), rows)


# --- CPU: loader selection and its errors without a GPU ---------------------------------------------


def cuda_device_count() -> int:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:
        return 0


def nvcomp_installed() -> bool:
    try:
        from nvidia import nvcomp  # noqa: F401
    except ImportError:
        return False
    return True


def test_gpu_loader_refuses_a_spec_that_would_flush_subnormals() -> None:
    with pytest.raises(ValueError, match="subnormal"):
        GpuLoader(PreprocessSpec(mean=1e-40, std=0.2))


def test_create_loader_by_name() -> None:
    assert isinstance(create_loader("cpu", SPEC, batch_size=4, device=1, host_output=True), CpuLoader)
    with pytest.raises(ValueError, match="unknown loader 'vulkan'"):
        create_loader("vulkan", SPEC)
    if cuda_device_count() == 0:
        assert default_loader_name() == "cpu"


def test_gpu_loader_says_what_is_missing() -> None:
    if cuda_device_count() > 0 and nvcomp_installed():
        pytest.skip("everything the GPU loader needs is here")
    with pytest.raises(LoaderError, match=r"CuPy|CUDA device|nvCOMP"):
        GpuLoader(SPEC)
    with pytest.raises(ValueError, match="inflate must be"):
        GpuLoader(SPEC, inflate="zstd")


def test_cli_has_a_loader_option() -> None:
    from iws_engine.cli import build_parser

    args = build_parser().parse_args(["classify", "a.png", "--loader", "gpu"])
    assert args.loader == "gpu"
    assert build_parser().parse_args(["classify", "a.png"]).loader is None


# --- CPU: the loader's pipeline, with NumPy standing in for CuPy and nvCOMP ---------------------------
# Not a test of the CUDA code (that needs a device): of everything around it, i.e. batching, the two
# slots, pinned staging, descriptor plumbing, nvCOMP's calling convention, status bits, the CPU
# fallback and re-decode, compaction and error rows. The kernels are replaced by the emulations
# above (the wavefront schedule, the Adler-32 chunk formula) and a NumPy version of grey_resize.cu.


class FakeDeviceArray(np.ndarray):
    """A NumPy array with CuPy's transfer methods; "device memory" is host memory here."""

    def set(self, arr, stream=None) -> None:
        self[...] = np.asarray(arr).reshape(self.shape)

    def get(self, stream=None, out=None) -> np.ndarray:
        host = np.array(self, copy=True).view(np.ndarray)
        if out is None:
            return host
        out[...] = host
        return out


def emulated_adler(grid, block, args, stream=None) -> None:
    jobs, data, status, computed, count = args
    for i, job in enumerate(np.asarray(jobs).view(ADLER_JOB)[:count]):
        offset, length = int(job["offset"]), int(job["length"])
        computed[i] = adler32_like_the_kernel(np.asarray(data[offset:offset + length]).tobytes())
        status[i] |= STATUS_ADLER_MISMATCH * (int(computed[i]) != int(job["expected"]))


def emulated_unfilter(grid, block, args, stream=None) -> None:
    jobs, filtered, unfiltered, status, count = args
    for i, job in enumerate(np.asarray(jobs).view(UNFILTER_JOB)[:count]):
        row_bytes, height, pitch = int(job["row_bytes"]), int(job["height"]), int(job["dst_pitch"])
        start = int(job["src_offset"])
        raw = np.asarray(filtered[start:start + height * (row_bytes + 1)]).tobytes()
        if max(raw[::row_bytes + 1]) > 4:
            status[i] |= STATUS_BAD_FILTER
        rows = unfilter_like_the_kernel(raw, row_bytes, height, int(job["filter_stride"]), threads=block[0])
        for r in range(height):
            at = int(job["dst_offset"]) + r * pitch
            unfiltered[at:at + row_bytes] = rows[r]


def emulated_resize(grid, block, args, stream=None) -> None:
    jobs, count, pixels, i0, i1, w0, w1, out, out_fp16, out_h, out_w, mean, std, luma_scale = args
    pixels = np.asarray(pixels)
    for job in np.asarray(jobs).view(RESIZE_JOB)[:count]:
        cols = np.arange(job["col_taps"], job["col_taps"] + out_w)
        rows = np.arange(job["row_taps"], job["row_taps"] + out_h)
        sample_bytes, peak = int(job["sample_bytes"]), 65535.0 if job["sample_bytes"] == 2 else 255.0

        def codes(ys, xs, channel):
            at = (int(job["src_offset"]) + ys[:, None].astype(np.int64) * int(job["src_pitch"])
                  + xs[None, :] * int(job["pixel_bytes"]) + channel * sample_bytes)
            v = pixels[at].astype(np.uint32)
            return (v << 8 | pixels[at + 1]) if sample_bytes == 2 else v

        def resized(channel):
            a, b = codes(i0[rows], i0[cols], channel) / peak, codes(i0[rows], i1[cols], channel) / peak
            c, d = codes(i1[rows], i0[cols], channel) / peak, codes(i1[rows], i1[cols], channel) / peak
            top, bottom = w0[cols] * a + w1[cols] * b, w0[cols] * c + w1[cols] * d
            return np.rint((w0[rows][:, None] * top + w1[rows][:, None] * bottom) * peak).astype(np.uint32)

        if job["colour_channels"] == 1:
            grey = resized(0)
        else:
            luma = 299 * resized(0) + 587 * resized(1) + 114 * resized(2)
            grey = np.rint(luma_scale * luma.astype(np.float32))
        value = (grey.astype(np.float32) / np.float32(peak) - mean) / std
        out[int(job["out_index"]), 0] = value.astype(np.float16 if out_fp16 else np.float32)


class FakeCodec:
    """nvCOMP 5.x's batched raw-Deflate decode, by zlib; a stream too long for its buffer fails the batch."""

    def __init__(self, *, algorithm: str, bitstream_kind: str, device_id: int, cuda_stream: int):
        assert (algorithm, bitstream_kind) == ("Deflate", "RAW")

    def decode(self, sources: list, out: list) -> list:
        results = []
        for source, target in zip(sources, out):
            data = zlib.decompressobj(-15).decompress(np.asarray(source).tobytes())
            if len(data) > len(target):
                raise ValueError("decompressed data does not fit the output buffer")
            target[:len(data)] = np.frombuffer(data, np.uint8)
            results.append(SimpleNamespace(buffer_size=len(data)))
        return results


class FakeBatchArray:
    """nvCOMP 6's BatchArray: entries carved from one buffer (as_arrays(buffer, offsets, sizes)), with the sizes
    a decode reports."""

    def __init__(self, buffer: np.ndarray, offsets: list[int], sizes: list[int], cuda_stream: int = 0):
        assert isinstance(offsets, list) and isinstance(sizes, list) and len(offsets) == len(sizes)  # pybind list[int]
        assert all(o % 4 == 0 for o in offsets)  # nvCOMP's decompression alignment
        assert all(0 <= o and o + n <= len(buffer) for o, n in zip(offsets, sizes))
        self.entries = [buffer[o:o + n] for o, n in zip(offsets, sizes)]
        self.buffer_sizes = list(sizes)

    def __len__(self) -> int:
        return len(self.entries)


class FakeCodec6:
    """nvCOMP 6's batched raw-Deflate decode into a BatchArray of fixed capacities, by zlib."""

    def __init__(self, *, algorithm: str, bitstream_kind: str, device_id: int, cuda_stream: int, execution_policy: str):
        assert (algorithm, bitstream_kind, execution_policy) == ("Deflate", "RAW", "CONCURRENCY")

    def get_required_decompression_alignment(self) -> int:
        return 4

    def decode(self, sources: FakeBatchArray, out: FakeBatchArray) -> FakeBatchArray:
        assert isinstance(sources, FakeBatchArray) and isinstance(out, FakeBatchArray) and len(sources) == len(out)
        sizes = []
        for source, target in zip(sources.entries, out.entries):
            data = zlib.decompressobj(-15).decompress(np.asarray(source).tobytes())
            if len(data) > len(target):
                raise ValueError("decompressed data does not fit the output buffer")
            target[:len(data)] = np.frombuffer(data, np.uint8)
            sizes.append(len(data))
        out.buffer_sizes = sizes
        return out


#: The two nvCOMP Python APIs the loader supports, standing in for nvidia.nvcomp (their calling conventions as
#: documented by help(); tests/test_nvcomp_api.py checks the loader's calls against the installed package).
FAKE_NVCOMP = {
    5: SimpleNamespace(Codec=FakeCodec, BitstreamKind=SimpleNamespace(RAW="RAW"),
                       as_arrays=lambda arrays, cuda_stream=0: list(arrays)),
    6: SimpleNamespace(Codec=FakeCodec6, BitstreamKind=SimpleNamespace(RAW="RAW"), BatchArray=FakeBatchArray,
                       ExecutionPolicy=SimpleNamespace(CONCURRENCY="CONCURRENCY", LATENCY="LATENCY"),
                       as_arrays=FakeBatchArray),
}


EMULATED_KERNELS = {"adler32_verify": emulated_adler, "png_unfilter": emulated_unfilter,
                    "grey_resize_normalise": emulated_resize}


def install_numpy_device(monkeypatch, emulations: dict, nvcomp_api: int = 6) -> None:
    """Make GpuLoader use NumPy arrays for device memory, `emulations` (kernel name -> NumPy
    function taking (grid, block, args)) for the kernels it compiles, and FAKE_NVCOMP[nvcomp_api]."""
    import contextlib

    from iws_engine.loaders import gpu

    class Stream:
        ptr = 0

        def __init__(self, non_blocking: bool = False):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def synchronize(self) -> None:
            pass

    class RawModule:
        def __init__(self, code: str, options: tuple):
            assert "--fmad=false" in options
            self.code = code

        def get_function(self, name: str):
            assert f"void {name}(" in self.code or f"\n{name}(" in self.code
            return emulations[name]

    def empty(shape, dtype=np.float32):
        return np.empty(shape, dtype).view(FakeDeviceArray)

    fake_cupy = SimpleNamespace(
        cuda=SimpleNamespace(Device=lambda index=0: contextlib.nullcontext(), Stream=Stream,
                             alloc_pinned_memory=bytearray, runtime=SimpleNamespace(getDeviceCount=lambda: 1)),
        RawModule=RawModule, uint8=np.uint8, uint32=np.uint32, empty=empty,
        zeros=lambda shape, dtype=np.float32: np.zeros(shape, dtype).view(FakeDeviceArray),
        asarray=lambda a: np.array(a, copy=True).view(FakeDeviceArray),
    )
    monkeypatch.setattr(gpu, "_import_cupy", lambda: fake_cupy)
    monkeypatch.setattr(gpu, "_import_nvcomp", lambda: FAKE_NVCOMP[nvcomp_api])


@pytest.fixture
def numpy_device(monkeypatch):
    """Run GpuLoader with NumPy arrays for device memory and the emulated kernels."""
    install_numpy_device(monkeypatch, EMULATED_KERNELS)


@pytest.mark.parametrize("output_dtype", ["float32", "float16"])
@pytest.mark.parametrize("inflate", ["nvcomp", "host"])
def test_loader_pipeline_with_emulated_device(numpy_device, inflate: str, output_dtype: str, tmp_path: Path) -> None:
    loader = GpuLoader(SPEC, batch_size=5, workers=2, inflate=inflate, output_dtype=output_dtype)
    check_mixed_batch(loader, mixed_items(tmp_path))


def test_loader_pipeline_with_the_nvcomp_5_api(monkeypatch, tmp_path: Path) -> None:
    """nvCOMP 5.3 (the version DALI pins) still works: lists of Arrays instead of BatchArrays."""
    install_numpy_device(monkeypatch, EMULATED_KERNELS, nvcomp_api=5)
    check_mixed_batch(GpuLoader(SPEC, batch_size=5, workers=2), mixed_items(tmp_path))
    with pytest.raises(LoaderError, match="needs nvCOMP 6"):
        GpuLoader(SPEC, batch_size=5, workers=2, nvcomp_execution_policy="latency")


def test_loader_refuses_an_unknown_execution_policy(numpy_device) -> None:
    with pytest.raises(ValueError, match="execution_policy must be one of"):
        GpuLoader(SPEC, batch_size=5, workers=2, nvcomp_execution_policy="fast")


@pytest.mark.parametrize("nvcomp_api", [5, 6])
def test_loader_pipeline_survives_a_failed_nvcomp_batch(monkeypatch, nvcomp_api: int) -> None:
    """A stream that inflates past its image fails nvCOMP's whole batch: every image is redone on the CPU."""
    rng = np.random.default_rng(29)
    pixels = [random_pixels(rng, 12, 10, 2, 16) for _ in range(3)]
    datas = [make_png(p, 2, 16) for p in pixels]
    too_long = filter_scanlines(scanlines_of(pixels[1], 16), 6) + bytes(61)  # one row too many
    datas[1] = make_png(pixels[1], 2, 16, raw=too_long)
    install_numpy_device(monkeypatch, EMULATED_KERNELS, nvcomp_api=nvcomp_api)
    loader = GpuLoader(SPEC, batch_size=3, workers=2)
    with pytest.warns(RuntimeWarning, match="nvCOMP could not inflate a batch"):
        inputs, errors, _ = collect(loader, datas)
    assert list(errors) == [1] and "IDAT data too long" in errors[1]
    for k in (0, 2):
        np.testing.assert_array_equal(inputs[k], preprocess_reference(decode_png(datas[k]), SPEC))
    assert loader.stats.redo_reasons == {"nvCOMP failed the batch (ValueError)": 3}


@pytest.mark.parametrize("nvcomp_api", [5, 6])
def test_loader_pipeline_redoes_a_short_stream(monkeypatch, nvcomp_api: int) -> None:
    """A stream that inflates to fewer bytes than its image: nvCOMP's reported size (read when the batch is done)
    sends that image, and only it, to the CPU decoder, which names the error."""
    rng = np.random.default_rng(31)
    pixels = [random_pixels(rng, 12, 10, 0, 8) for _ in range(3)]
    datas = [make_png(p, 0, 8) for p in pixels]
    datas[1] = make_png(pixels[1], 0, 8, raw=filter_scanlines(scanlines_of(pixels[1], 8), 1)[:-11])  # a row short
    install_numpy_device(monkeypatch, EMULATED_KERNELS, nvcomp_api=nvcomp_api)
    loader = GpuLoader(SPEC, batch_size=3, workers=2)
    inputs, errors, _ = collect(loader, datas)
    assert list(errors) == [1] and "too short" in errors[1]
    assert loader.stats.redo_reasons == {"nvCOMP inflated 121 bytes, the image needs 132": 1}
    for k in (0, 2):
        np.testing.assert_array_equal(inputs[k], preprocess_reference(decode_png(datas[k]), SPEC))


def test_loader_pipeline_bounds_memory_with_emulated_device(numpy_device) -> None:
    rng = np.random.default_rng(23)
    datas = [make_png(random_pixels(rng, 16, 16, 6, 16), 6, 16) for _ in range(4)]  # 2,064 inflated bytes each
    loader = GpuLoader(SPEC, batch_size=4, workers=2, max_batch_bytes=2 * 2_304)
    inputs, errors, _ = collect(loader, datas)
    assert errors == {} and (loader.stats.on_gpu, loader.stats.routed_to_cpu) == (2, 2)
    for k, want in enumerate(reference_inputs(datas)):
        np.testing.assert_array_equal(inputs[k], want)
    assert all(len(slot.inflated) <= (1 << 20) for slot in loader._slots)  # grown once, to what a batch needs


def test_classifier_loader_choice(random_weights: Path, monkeypatch) -> None:
    from iws_engine.api import Classifier

    assert isinstance(Classifier(random_weights, loader="cpu").loader, CpuLoader)
    if cuda_device_count() == 0:
        assert isinstance(Classifier(random_weights).loader, CpuLoader)  # the default without CUDA
        with pytest.raises(LoaderError):
            Classifier(random_weights, loader="gpu")


def test_classifier_scores_through_the_emulated_gpu_loader(random_weights: Path, numpy_device, tmp_path: Path) -> None:
    """The GPU loader behind the Python API, with a CPU backend (inputs copied to the host)."""
    from iws_engine.api import Classifier

    items = mixed_items(tmp_path)
    with Classifier(random_weights, loader="gpu", batch_size=4, workers=2) as gpu_clf:
        assert isinstance(gpu_clf.loader, GpuLoader) and gpu_clf.loader.host_output
        gpu_rows = list(gpu_clf.classify(items))
    with Classifier(random_weights, loader="cpu", batch_size=4, workers=2) as cpu_clf:
        cpu_rows = list(cpu_clf.classify(items))
    assert [(r.path, r.error) for r in gpu_rows] == [(r.path, r.error) for r in cpu_rows]
    assert [r.score for r in gpu_rows] == [r.score for r in cpu_rows]


# --- GPU -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda() -> None:
    if cuda_device_count() == 0:
        pytest.skip("needs a CUDA device")


INFLATE_MODES = [
    pytest.param("nvcomp", marks=pytest.mark.skipif(not nvcomp_installed(), reason="nvCOMP is not installed "
                                                    "(pip install 'nvidia-nvcomp-cu13==6.0.*')")),
    "host",
]


def collect(loader, items) -> tuple[dict[int, np.ndarray], dict[int, str], list[str]]:
    """Inputs (as float32 host arrays) and errors by global item index, and the item labels."""
    inputs, errors, names, base = {}, {}, [], 0
    for batch in loader.batches(items):
        host = batch.inputs if isinstance(batch.inputs, np.ndarray) else batch.inputs.get()
        assert host.shape == (len(batch.ok), 1, *SPEC.size)
        for k, x in zip(batch.ok, host):
            inputs[base + k] = x[0]
        errors.update({base + k: e for k, e in batch.errors.items()})
        assert sorted([*batch.ok, *batch.errors]) == list(range(len(batch.items)))
        names += batch.items
        base += len(batch.items)
    return inputs, errors, names


VALID_FOLDERS = ("basic", "basic/interlaced", "testpngs", "testpngs/png-3")


def suite_files(*folders: str) -> list[Path]:
    if not PNGSUITE.is_dir():
        pytest.skip(f"reference PNGs absent: {PNGSUITE}")
    return sorted(p for folder in folders for p in (PNGSUITE / folder).glob("*.png"))



def unpack_sub_byte(rows: np.ndarray, width: int, depth: int) -> np.ndarray:
    bits = np.unpackbits(rows, axis=1)[:, : width * depth].reshape(rows.shape[0], width, depth)
    return (bits * (1 << np.arange(depth - 1, -1, -1))).sum(axis=2).astype(np.uint8)


@pytest.mark.gpu
def test_gpu_unfilter_equals_decode_png_on_pngsuite(cuda) -> None:
    """Every non-interlaced valid file, all in one batch (interlaced ones take the CPU path)."""
    from PIL import Image

    from iws_engine.loaders.gpu import decode_scanlines_on_gpu

    files = [p for p in suite_files(*VALID_FOLDERS) if not parse_png(p.read_bytes()).interlace]
    datas = [p.read_bytes() for p in files]
    for path, data, rows in zip(files, datas, decode_scanlines_on_gpu(datas)):
        info = parse_png(data)
        expected = decode_png(without_chunks(data, b"gAMA"))  # unfiltering happens before gamma
        h, w, depth = info.height, info.width, info.bit_depth
        if depth == 16:
            samples = rows.view(">u2").astype(np.uint16).reshape(h, w, info.channels)
        elif depth == 8:
            samples = rows.reshape(h, w, info.channels)
        else:
            samples = unpack_sub_byte(rows, w, depth)[:, :, None]
        if info.color_type == 3:
            lut = np.zeros((256, 3), np.uint8)
            lut[: len(info.palette)] = info.palette
            np.testing.assert_array_equal(lut[samples[:, :, 0]], expected[:, :, :3], err_msg=path.name)
            pil = np.asarray(Image.open(io.BytesIO(data)))
            if Image.open(io.BytesIO(data)).mode == "P":
                np.testing.assert_array_equal(samples[:, :, 0], pil, err_msg=path.name)
            continue
        if depth < 8:
            samples = samples * np.uint8(255 // ((1 << depth) - 1))
        np.testing.assert_array_equal(samples, expected[:, :, : info.channels], err_msg=path.name)
        if depth == 8:  # Pillow keeps 8-bit samples as they are
            pil = np.asarray(Image.open(io.BytesIO(data)))
            np.testing.assert_array_equal(samples.reshape(pil.shape), pil, err_msg=path.name)


@pytest.mark.gpu
@pytest.mark.parametrize("color_type, bit_depth", GPU_FORMATS)
def test_gpu_unfilter_all_filter_types_and_bands(cuda, color_type: int, bit_depth: int) -> None:
    from iws_engine.loaders.gpu import decode_scanlines_on_gpu

    rng = np.random.default_rng(7)
    shapes = [(528, 539), (300, 1), (1, 300), (129, 3), (1, 1)]  # several bands, 1-pixel rows and columns
    pixels = [random_pixels(rng, h, w, color_type, bit_depth) for h, w in shapes]
    datas = [make_png(p, color_type, bit_depth, filters=(4, 1, 3, 2, 0, 4, 4)) for p in pixels]
    for p, rows in zip(pixels, decode_scanlines_on_gpu(datas)):
        np.testing.assert_array_equal(rows, scanlines_of(p, bit_depth))


def reference_inputs(datas: list[bytes]) -> list[np.ndarray]:
    return [preprocess_reference(decode_png(d), SPEC) for d in datas]


@pytest.mark.gpu
@pytest.mark.parametrize("inflate", INFLATE_MODES)
@pytest.mark.parametrize("color_type, bit_depth", GPU_FORMATS)
def test_gpu_loader_equals_reference_on_every_format(cuda, inflate: str, color_type: int, bit_depth: int) -> None:
    rng = np.random.default_rng(color_type * 17 + bit_depth)
    # down (IWS), up with clamping, identity, one axis each way, tiny, odd
    shapes = [(528, 539), (100, 90), (256, 256), (300, 200), (1, 1), (2, 513), (257, 255)]
    datas = []
    for h, w in shapes:
        pixels = random_pixels(rng, h, w, color_type, bit_depth)
        if color_type in (2, 6):  # smooth R=G=B-like content too, as real vignettes have
            pixels[: h // 2, :, 1] = pixels[: h // 2, :, 0]
        datas.append(make_png(pixels, color_type, bit_depth))
    expected = reference_inputs(datas)
    loader = GpuLoader(SPEC, batch_size=3, inflate=inflate)  # 3 batches: both slots, a partial last batch
    inputs, errors, _ = collect(loader, datas)
    assert errors == {}
    assert loader.stats.on_gpu == len(datas) and loader.stats.redone_on_cpu == 0
    for k, want in enumerate(expected):
        assert np.max(np.abs(inputs[k] - want)) <= 1e-6
        np.testing.assert_array_equal(inputs[k], want)  # bit for bit, as argued in grey_resize.cu
    half, _, _ = collect(GpuLoader(SPEC, batch_size=4, inflate=inflate, output_dtype="float16"), datas)
    for k, want in enumerate(expected):
        np.testing.assert_array_equal(half[k], want.astype(np.float16).astype(np.float32))


@pytest.mark.gpu
@pytest.mark.parametrize("inflate", INFLATE_MODES)
def test_gpu_loader_on_realistic_vignettes(cuda, inflate: str) -> None:
    """RGBA16 539x528 vignettes encoded by libpng (OpenCV), as the IWS files are."""
    from iws_engine.export.synth import encode_png, render_vignette

    rng = np.random.default_rng(11)
    datas = [encode_png(render_vignette(rng, k % 2 == 0, 528, 539), fmt, filt)
             for k, (fmt, filt) in enumerate([("rgba16", "paeth"), ("rgba16", "paeth"), ("gray8", "paeth"),
                                               ("gray16", "paeth"), ("rgb8", "paeth")])]
    inputs, errors, _ = collect(GpuLoader(SPEC, batch_size=2, inflate=inflate), datas)
    assert errors == {}
    for k, want in enumerate(reference_inputs(datas)):
        np.testing.assert_array_equal(inputs[k], want)


@pytest.mark.gpu
@pytest.mark.parametrize("inflate", INFLATE_MODES)
def test_gpu_loader_equals_cpu_loader_on_pngsuite(cuda, inflate: str) -> None:
    """Valid files (GPU or CPU route) give the same inputs; crashers and bad palettes the same errors."""
    files = suite_files(*VALID_FOLDERS, "testpngs/crashers", "testpngs/badpal")
    items = [str(p) for p in files]
    loader = GpuLoader(SPEC, batch_size=16, inflate=inflate)
    gpu_inputs, gpu_errors, names = collect(loader, items)
    cpu_inputs, cpu_errors, _ = collect(CpuLoader(SPEC, batch_size=16, workers=2), items)
    assert names == items
    assert gpu_errors == cpu_errors
    assert sorted(gpu_inputs) == sorted(cpu_inputs)
    for k in cpu_inputs:
        np.testing.assert_array_equal(gpu_inputs[k], cpu_inputs[k], err_msg=items[k])
    valid = {k for k, p in enumerate(files) if "crashers" not in str(p) and "badpal" not in str(p)}
    assert valid <= set(gpu_inputs)  # every valid file decodes
    crashers = {k for k, p in enumerate(files) if "crashers" in str(p)}
    assert crashers & set(gpu_errors)  # crashers are rejected (the CPU loader says which and why)
    # 27 valid files take the GPU path; a crasher may make nvCOMP fail its whole batch (redone on the CPU)
    whole_batch = sum(v for reason, v in loader.stats.redo_reasons.items() if reason.startswith("nvCOMP failed"))
    assert loader.stats.on_gpu >= 27 - whole_batch


def with_crc(data: bytes) -> bytes:
    """Recompute every chunk CRC (so a corrupted IDAT passes parse_png and reaches the device)."""
    return SIGNATURE + b"".join(chunk(t, b) for t, b in iter_chunks(data))


def mixed_items(tmp_path: Path) -> list:
    """Good files of four formats between every kind of trouble: checksum, filter type, corrupt
    deflate, unreadable paths, non-PNG bytes, and formats the CPU decoder takes."""
    suite_files("basic")  # skips without the reference files
    rng = np.random.default_rng(13)
    good = [make_png(random_pixels(rng, 30, 35, ct, bd), ct, bd) for ct, bd in ((6, 16), (0, 8), (2, 16), (4, 8))]
    # checksum mismatch: the stored Adler-32 is wrong, the deflate data intact
    bad_adler = bytearray(good[1])
    idat_crc = bad_adler.index(b"IEND") - 8  # IDAT's CRC, then IEND's length, precede "IEND"
    bad_adler[idat_crc - 1] ^= 0xFF  # last byte of the Adler-32
    # filter type 7 on row 3: inflates fine, only the unfilter kernel can see it
    pixels = random_pixels(rng, 20, 20, 0, 8)
    raw = bytearray(filter_scanlines(scanlines_of(pixels, 8), 1))
    raw[3 * 21] = 7
    bad_filter = make_png(pixels, 0, 8, raw=bytes(raw))
    # a corrupt deflate stream
    corrupt = bytearray(good[2])
    start = corrupt.index(b"IDAT") + 4
    corrupt[start + 10:start + 40] = bytes(30)
    interlaced = (PNGSUITE / "basic" / "ibasn6a16.png").read_bytes()
    palette = (PNGSUITE / "testpngs" / "palette-8.png").read_bytes()
    gamma = make_png(random_pixels(rng, 30, 30, 2, 8), 2, 8, extra=gama(100_000))
    (tmp_path / "dir.png").mkdir()
    return [good[0], with_crc(bytes(bad_adler)), str(tmp_path / "missing.png"), interlaced, bad_filter, good[1],
            with_crc(bytes(corrupt)), palette, str(tmp_path / "dir.png"), gamma, good[2], b"not a png", good[3]]


def check_mixed_batch(loader: GpuLoader, items: list) -> None:
    gpu_inputs, gpu_errors, names = collect(loader, items)
    cpu_inputs, cpu_errors, cpu_names = collect(CpuLoader(SPEC, batch_size=5, workers=2), items)
    assert names == cpu_names
    assert gpu_errors == cpu_errors
    assert sorted(gpu_errors) == [1, 2, 4, 6, 8, 11]
    assert "Adler-32" in gpu_errors[1] and "invalid filter type 7" in gpu_errors[4]
    assert sorted(gpu_inputs) == sorted(cpu_inputs) == [0, 3, 5, 7, 9, 10, 12]
    for k in cpu_inputs:
        if loader.output_dtype == "float16":
            np.testing.assert_array_equal(gpu_inputs[k], cpu_inputs[k].astype(np.float16).astype(np.float32))
        else:
            np.testing.assert_array_equal(gpu_inputs[k], cpu_inputs[k])
    stats = loader.stats
    assert stats.routed_to_cpu == 3  # interlaced, palette, gamma
    # Host inflate (zlib) rejects the bad checksum and the corrupt stream before the device sees them.
    assert stats.on_gpu + stats.redone_on_cpu == (7 if loader.inflate == "nvcomp" else 5)
    assert stats.redo_reasons.get("device: invalid filter type") == 1  # only the unfilter kernel can see it
    assert sum(stats.redo_reasons.values()) == stats.redone_on_cpu
    # a corrupt stream may make nvCOMP fail its whole batch (a RuntimeWarning): the good images of that
    # batch are then redone on the CPU too; otherwise all four good files stay on the device
    whole_batch = sum(v for reason, v in stats.redo_reasons.items() if reason.startswith("nvCOMP failed"))
    assert stats.on_gpu >= 4 - whole_batch


@pytest.mark.gpu
@pytest.mark.parametrize("inflate", INFLATE_MODES)
def test_gpu_loader_mixed_batch_keeps_order_and_errors(cuda, inflate: str, tmp_path: Path) -> None:
    check_mixed_batch(GpuLoader(SPEC, batch_size=5, inflate=inflate), mixed_items(tmp_path))


@pytest.mark.gpu
def test_gpu_loader_host_output_and_empty_input(cuda) -> None:
    rng = np.random.default_rng(17)
    datas = [make_png(random_pixels(rng, 40, 40, 6, 16), 6, 16) for _ in range(3)]
    loader = GpuLoader(SPEC, batch_size=2, inflate="host", host_output=True)
    batches = list(loader.batches(datas))
    assert all(isinstance(b.inputs, np.ndarray) for b in batches)
    np.testing.assert_array_equal(batches[1].inputs[0, 0], reference_inputs(datas[2:])[0])
    assert list(loader.batches([])) == []


@pytest.mark.gpu
def test_dali_baseline_parity_is_reported(cuda) -> None:
    pytest.importorskip("nvidia.dali", reason="DALI is not installed")
    from iws_engine.loaders.dali import DaliLoader

    rng = np.random.default_rng(19)
    datas = [make_png(random_pixels(rng, 60, 80, 2, 8), 2, 8) for _ in range(4)]
    parity = DaliLoader(SPEC, batch_size=2).parity(datas)
    assert parity["images"] == 4
    print(f"DALI baseline vs preprocess_reference: {parity}")  # a throughput baseline, not the spec


def test_dali_loader_module_imports_and_validates_inputs_without_dali(tmp_path) -> None:
    """The DALI loader's host side (reading and validating an input) runs without DALI or a GPU."""
    from iws_engine.loaders.dali import DaliLoader

    loader = DaliLoader.__new__(DaliLoader)  # the host-side checks need no pipeline
    loader.max_pixels = 64_000_000
    data, err, _ = loader._read_and_validate(str(tmp_path / "missing.png"), "missing.png")
    assert data is None and "missing.png" in err and "cannot read file" in err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png at all")
    data, err, _ = loader._read_and_validate(str(bad), "bad.png")
    assert data is None and "bad.png" in err
