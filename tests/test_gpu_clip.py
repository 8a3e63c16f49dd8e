"""The GPU loader with Pipeline A's CLIP spec: kernels/clip_resize.cu and its host side in loaders/gpu.py.

On any machine (CI has no GPU): routing for the CLIP spec (Pillow ignores gAMA), the CLIP_JOB
descriptors and Pillow tap tables, and a NumPy replay of clip_resize.cu's two passes (the same
integer operations on the same descriptors) equal to Pillow's `preprocess_clip_reference` bit for bit;
then the whole loader with NumPy standing in for CuPy/nvCOMP (tests/test_gpu_loader.py's emulation)
against Pipeline A's CPU loader, malformed files included. (The kernel's compile checks and its
struct layouts are tested with the other kernels in tests/test_gpu_loader.py.)

On a CUDA device (marked gpu): the real kernels on synthetic vignettes and random images of every
format, within 1e-5 of `preprocess_clip_reference` (and in fact equal), and mixed batches.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from iws_engine import kernels
from iws_engine.loaders import create_loader
from iws_engine.loaders.cpu import CpuLoader
from iws_engine.loaders.gpu import (
    CLIP_JOB,
    CLIP_PARSER_REJECTED,
    CLIP_SOURCE_GREY,
    CLIP_SOURCE_GREY16,
    CLIP_SOURCE_RGB,
    CLIP_THREADS,
    DEVICE_ALIGN,
    PILLOW_TAP,
    ClipTapTables,
    GpuLoader,
    clip_cpu_fallback_reason,
    plan_batch,
)
from iws_engine.loaders.png import parse_png
from iws_engine.pillow_resample import PRECISION_BITS, pillow_taps, vertical_first
from iws_engine.pipeline_a import clip_png_preprocess
from iws_engine.preprocess_clip import (
    EVA02_L448_SPEC,
    ClipPreprocessSpec,
    _normalise_table,
    clip_geometry,
    preprocess_clip_reference,
)
from tests.test_gpu_loader import (
    CHANNELS,
    EMULATED_KERNELS,
    GPU_FORMATS,
    INFLATE_MODES,
    SRGB,
    VALID_FOLDERS,
    cuda_device_count,
    gama,
    header_only_png,
    install_numpy_device,
    make_png,
    mixed_items,
    random_pixels,
    suite_files,
)
from tests.test_pillow_resample import unfiltered_scanlines

SMALL = ClipPreprocessSpec(size=24)  # Pipeline A's preprocessing at a size the emulated loader runs quickly


def clip_kernel_source_value(name: str) -> int:
    return int(re.search(rf"#define {name} (\d+)u?\b", kernels.source("clip_resize.cu")).group(1))


def test_source_kinds_match_the_kernel() -> None:
    assert clip_kernel_source_value("CLIP_SOURCE_RGB") == CLIP_SOURCE_RGB
    assert clip_kernel_source_value("CLIP_SOURCE_GREY") == CLIP_SOURCE_GREY
    assert clip_kernel_source_value("CLIP_SOURCE_GREY16") == CLIP_SOURCE_GREY16
    assert clip_kernel_source_value("CLIP_PRECISION_BITS") == PRECISION_BITS


def test_clip_kernel_ptx_has_no_floating_point_arithmetic() -> None:
    """The exactness argument: integer sums only; the floats are looked up, never computed."""
    from tests.test_gpu_loader import nvrtc_ptx

    ptx = nvrtc_ptx("clip_resize.cu")
    arithmetic = set(re.findall(r"\b(?:add|sub|mul|div|fma|mad|rcp|sqrt|cvt)\.[\w.]*f(?:16|32|64)\b", ptx))
    assert not arithmetic, arithmetic
    assert "ld.global" in ptx and "shr.s32" in ptx  # the table loads; clip8's arithmetic shift


# --- CPU: routing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("data, expected", [
    (header_only_png(8, 8, 0, 8), None),
    (header_only_png(8, 8, 0, 16), None),
    (header_only_png(8, 8, 6, 16), None),
    (header_only_png(8, 8, 4, 16), None),
    (header_only_png(8, 8, 2, 8), None),
    (header_only_png(8, 8, 0, 8, extra=gama(100_000)), None),  # Pillow ignores gAMA: stays on the GPU
    (header_only_png(8, 8, 6, 16, extra=gama(65_909)), None),
    (header_only_png(8, 8, 2, 16, extra=SRGB + gama(100_000)), None),
    (header_only_png(8, 8, 0, 8, interlace=1), "interlaced"),
    (header_only_png(8, 8, 3, 8), "palette"),
    (header_only_png(8, 8, 0, 4), "4-bit greyscale"),
    (header_only_png(8, 8, 0, 1), "1-bit greyscale"),
], ids=["grey8", "grey16", "rgba16", "ga16", "rgb8", "gama-1.0", "gama-1/1.8", "srgb", "interlaced", "palette", "grey4",
        "grey1"])
def test_clip_cpu_fallback_reason(data: bytes, expected: str | None) -> None:
    reason = clip_cpu_fallback_reason(parse_png(data), EVA02_L448_SPEC)
    assert reason == expected if expected is None else expected in reason


def test_clip_cpu_fallback_reason_absurd_aspect_ratio() -> None:
    tall = parse_png(header_only_png(1, 200, 0, 8))  # 448 x 89,600 after the resize
    assert "resized side over 65,536" in clip_cpu_fallback_reason(tall, EVA02_L448_SPEC)
    assert clip_cpu_fallback_reason(tall, ClipPreprocessSpec(size=224)) is None  # 224 x 44,800


# --- CPU: tap tables and descriptors -----------------------------------------------------------------


def test_clip_tap_tables_store_the_cropped_outputs_once() -> None:
    taps = ClipTapTables(max_entries=5_000)
    a = taps.offset(539, 457, 4, 448)
    b = taps.offset(528, 448, 0, 448)
    assert (a, b, taps.offset(539, 457, 4, 448)) == (0, 448, 0) and taps.version == 2
    rows, coeffs = taps.arrays()
    rows = rows.view(PILLOW_TAP)
    for base, (n_in, n_out, first) in ((a, (539, 457, 4)), (b, (528, 448, 0))):
        want = pillow_taps(n_in, n_out)
        for i in (0, 1, 200, 447):
            row = rows[base + i]
            assert (row["start"], row["count"]) == (want.start[first + i], want.count[first + i])
            np.testing.assert_array_equal(coeffs[row["coeffs"]:row["coeffs"] + row["count"]],
                                          want.weights[first + i, :want.count[first + i]])
    taps.reset_if_full()  # 448 * 7 + 448 * 5 weights > 5,000
    assert taps.total == 0 and taps.version == 3 and taps.offset(528, 448, 0, 448) == 0


def test_plan_batch_clip_descriptors() -> None:
    rng = np.random.default_rng(1)
    formats = [(528, 539, 6, 16), (1000, 449, 2, 8), None, (30, 25, 0, 16), (448, 448, 4, 8), (5, 1, 0, 8),
               (40, 60, 6, 8, gama(100_000))]  # (height, width, colour type, depth[, extra]); None = failed earlier
    datas = [None if f is None else make_png(random_pixels(rng, *f[:4]), f[2], f[3], extra=(f[4:] or [b""])[0])
             for f in formats]
    datas += [header_only_png(16, 16, 3, 8), header_only_png(16, 16, 2, 8, interlace=1)]
    infos = [None if d is None else parse_png(d) for d in datas]
    taps = ClipTapTables()
    spec = EVA02_L448_SPEC
    plan = plan_batch(infos, spec, taps)
    assert plan.gpu == [0, 1, 3, 4, 5, 6] and sorted(plan.cpu) == [7, 8]  # the gamma file stays on the GPU
    assert len(plan.resize_jobs) == 0 and len(plan.clip_jobs) == len(plan.gpu)
    rows, coeffs = taps.arrays()
    rows = rows.view(PILLOW_TAP)
    scratch_end = 0
    for j, k in enumerate(plan.gpu):
        info, job = infos[k], plan.clip_jobs[j]
        sample_bytes = info.bit_depth // 8
        row_bytes = info.width * CHANNELS[info.color_type] * sample_bytes
        assert job["src_offset"] == plan.inflated_offsets[j] + 1 and job["src_pitch"] == row_bytes + 1
        assert (job["pixel_bytes"], job["sample_bytes"]) == (CHANNELS[info.color_type] * sample_bytes, sample_bytes)
        assert job["source"] == {(0, 8): CLIP_SOURCE_GREY, (0, 16): CLIP_SOURCE_GREY16}.get(
            (info.color_type, info.bit_depth), CLIP_SOURCE_GREY if info.color_type == 4 else CLIP_SOURCE_RGB)
        assert job["out_index"] == k
        (rw, rh), (left, top) = clip_geometry(info.width, info.height, spec)
        vertical = vertical_first(info.width, info.height, rw, rh)
        assert job["vertical_first"] == vertical
        cols_t, rows_t = pillow_taps(info.width, rw), pillow_taps(info.height, rh)
        first_axis, second_axis = ((rows_t, top), (cols_t, left)) if vertical else ((cols_t, left), (rows_t, top))
        for field, (axis, start) in (("first_taps", first_axis), ("second_taps", second_axis)):
            got = rows[int(job[field]):int(job[field]) + spec.size]
            np.testing.assert_array_equal(got["start"], axis.start[start:start + spec.size])
            np.testing.assert_array_equal(got["count"], axis.count[start:start + spec.size])
        lo, hi = (cols_t if vertical else rows_t).rows_needed(*((left, left + 448) if vertical else (top, top + 448)))
        assert job["inter_first"] == lo
        assert (job["inter_rows"], job["inter_cols"]) == ((448, hi - lo) if vertical else (hi - lo, 448))
        assert job["scratch_offset"] % DEVICE_ALIGN == 0 and job["scratch_offset"] >= scratch_end
        scratch_end = job["scratch_offset"] + 4 * job["inter_rows"] * job["inter_cols"]
    assert scratch_end <= plan.scratch_bytes
    assert plan.max_intermediate == max(int(j["inter_rows"]) * int(j["inter_cols"]) for j in plan.clip_jobs)
    assert plan.clip_jobs[1]["vertical_first"] == (vertical_first(449, 1000, 448, 997))  # portrait


def test_plan_batch_clip_bounds_scratch_memory() -> None:
    # 1000x900 grey: the first (horizontal) pass keeps all 900 rows x 448 columns, 1.6 MB against 0.9 MB of pixels
    info = parse_png(header_only_png(1000, 900, 0, 8))
    one = plan_batch([info], EVA02_L448_SPEC, ClipTapTables())
    assert one.scratch_bytes == 900 * 448 * 4 and one.max_intermediate == 900 * 448
    plan = plan_batch([info] * 3, EVA02_L448_SPEC, ClipTapTables(), max_batch_bytes=2 * one.scratch_bytes)
    assert plan.gpu == [0, 1] and "max_batch_bytes" in plan.cpu[2]
    assert plan.scratch_bytes <= 2 * one.scratch_bytes


# --- CPU: clip_resize.cu's two passes, replayed in NumPy ----------------------------------------------
# The same integer operations on the same descriptors as the kernel, one vector lane per thread.


def _gather_taps(taps: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(start, count, first weight index) of each lane's PillowTap."""
    tap = taps[index]
    return tap["start"].astype(np.int64), tap["count"].astype(np.int64), tap["coeffs"].astype(np.int64)


def _clip8(s: np.ndarray) -> np.ndarray:
    return np.clip(s >> PRECISION_BITS, 0, 255).astype(np.uint32)


def emulated_clip_first(grid, block, args, stream=None) -> None:
    jobs, count, pixels, taps, coeffs, scratch = args
    pixels, scratch = np.asarray(pixels), np.asarray(scratch).view(np.uint32)
    taps, coeffs = np.asarray(taps).view(PILLOW_TAP), np.asarray(coeffs).view(np.int32)
    for image, job in enumerate(np.asarray(jobs).view(CLIP_JOB)[:count]):
        assert image < grid[1]
        n = int(job["inter_rows"]) * int(job["inter_cols"])
        assert grid[0] * block[0] >= n  # every sample has a thread
        sample = np.arange(n, dtype=np.int64)
        i, j = sample // int(job["inter_cols"]), sample % int(job["inter_cols"])
        vertical = job["vertical_first"] != 0
        start, taps_n, first_coeff = _gather_taps(taps, int(job["first_taps"]) + (i if vertical else j))
        tap_stride = int(job["src_pitch"]) if vertical else int(job["pixel_bytes"])
        other_stride = int(job["pixel_bytes"]) if vertical else int(job["src_pitch"])
        other = int(job["inter_first"]) + (j if vertical else i)
        base = int(job["src_offset"]) + other * other_stride + start * tap_stride
        sums = np.full((3, n), 1 << (PRECISION_BITS - 1), np.int32)
        for t in range(int(taps_n.max())):
            active = t < taps_n
            p = np.where(active, base + t * tap_stride, 0)
            k = np.where(active, coeffs[np.where(active, first_coeff + t, 0)], 0).astype(np.int32)
            if job["source"] == CLIP_SOURCE_RGB:
                for c in range(3):
                    sums[c] += pixels[p + c * int(job["sample_bytes"])].astype(np.int32) * k
            else:
                v = pixels[p].astype(np.int32)
                if job["source"] == CLIP_SOURCE_GREY16:
                    v = np.minimum(v << 8 | pixels[p + 1], 255)
                sums[0] += v * k
        if job["source"] != CLIP_SOURCE_RGB:
            sums[1] = sums[2] = sums[0]
        packed = _clip8(sums[0]) | _clip8(sums[1]) << 8 | _clip8(sums[2]) << 16
        scratch[int(job["scratch_offset"]) // 4 + sample] = packed


def emulated_clip_second(grid, block, args, stream=None) -> None:
    jobs, count, scratch, taps, coeffs, table, out, out_fp16, out_size = args
    scratch, out = np.asarray(scratch).view(np.uint32), np.asarray(out)
    taps, coeffs = np.asarray(taps).view(PILLOW_TAP), np.asarray(coeffs).view(np.int32)
    table = np.asarray(table).reshape(-1)
    size = int(out_size)
    assert grid[0] * block[0] >= size * size
    assert table.dtype == (np.float16 if out_fp16 else np.float32) and out.dtype == table.dtype
    for job in np.asarray(jobs).view(CLIP_JOB)[:count]:
        pixel = np.arange(size * size, dtype=np.int64)
        y, x = pixel // size, pixel % size
        vertical = job["vertical_first"] != 0
        start, taps_n, first_coeff = _gather_taps(taps, int(job["second_taps"]) + (x if vertical else y))
        cols = int(job["inter_cols"])
        first = start - int(job["inter_first"])
        assert np.all(first >= 0) and np.all(first + taps_n <= (cols if vertical else int(job["inter_rows"])))
        tap_stride = 1 if vertical else cols
        cell = int(job["scratch_offset"]) // 4 + (y * cols + first if vertical else first * cols + x)
        sums = np.full((3, size * size), 1 << (PRECISION_BITS - 1), np.int32)
        for t in range(int(taps_n.max())):
            active = t < taps_n
            v = scratch[np.where(active, cell + t * tap_stride, 0)]
            k = np.where(active, coeffs[np.where(active, first_coeff + t, 0)], 0).astype(np.int32)
            for c in range(3):
                sums[c] += ((v >> (8 * c)) & 0xFF).astype(np.int32) * k
        for c in range(3):
            out[int(job["out_index"]), c] = table[256 * c + _clip8(sums[c])].reshape(size, size)


CLIP_KERNELS = {"clip_resample_first": emulated_clip_first, "clip_resample_second_normalise": emulated_clip_second}


def replay(datas: list[bytes], spec: ClipPreprocessSpec, output_dtype: str = "float32") -> np.ndarray:
    """plan_batch + the replayed kernels on scanlines placed where png_unfilter.cu leaves them."""
    infos = [parse_png(d) for d in datas]
    taps = ClipTapTables()
    plan = plan_batch(infos, spec, taps)
    assert plan.gpu == list(range(len(datas)))
    pixels = np.full(plan.inflated_bytes, 0xAB, np.uint8)  # filter bytes and padding: never read
    for j, data in enumerate(datas):
        rows = unfiltered_scanlines(data)
        offset, size = int(plan.inflated_offsets[j]), int(plan.inflated_sizes[j])
        pixels[offset:offset + size].reshape(rows.shape[0], -1)[:, 1:] = rows
    scratch = np.zeros(plan.scratch_bytes, np.uint8)
    out = np.full((len(datas), 3, spec.size, spec.size), np.nan, output_dtype)
    table = _normalise_table(tuple(spec.mean), tuple(spec.std)).astype(output_dtype)
    tap_rows, coeffs = taps.arrays()
    n = np.uint32(len(datas))
    emulated_clip_first((math.ceil(plan.max_intermediate / CLIP_THREADS), len(datas)), (CLIP_THREADS,),
                        (plan.clip_jobs.view(np.uint8), n, pixels, tap_rows, coeffs, scratch))
    emulated_clip_second((math.ceil(spec.size**2 / CLIP_THREADS), len(datas)), (CLIP_THREADS,),
                         (plan.clip_jobs.view(np.uint8), n, scratch, tap_rows, coeffs, table, out,
                          np.int32(output_dtype == "float16"), np.uint32(spec.size)))
    return out


def test_replay_equals_pillow_on_synthetic_vignettes() -> None:
    """The IWS case: RGBA16 539x528 (and the other synthetic formats) at Pipeline A's 448."""
    from iws_engine.export.synth import encode_png, render_vignette

    rng = np.random.default_rng(5)
    datas = [encode_png(render_vignette(rng, k % 2 == 0, 528, 539), fmt)
             for k, fmt in enumerate(["rgba16", "rgba16", "gray8", "gray16", "rgb8"])]
    out = replay(datas, EVA02_L448_SPEC)
    for k, data in enumerate(datas):
        np.testing.assert_array_equal(out[k], preprocess_clip_reference(data))


def format_pngs(rng, shapes, color_type: int, bit_depth: int, gama_height: int) -> list[bytes]:
    """Random PNGs of one format at each (h, w); 16-bit grey has its top half in 0..299 (Pillow saturates
    at 255), and images `gama_height` high carry a gAMA chunk, which Pillow ignores."""
    datas = []
    for h, w in shapes:
        pixels = random_pixels(rng, h, w, color_type, bit_depth)
        if color_type == 0 and bit_depth == 16:
            pixels[: (h + 1) // 2] = rng.integers(0, 300, pixels[: (h + 1) // 2].shape)
        datas.append(make_png(pixels, color_type, bit_depth, extra=gama(100_000) if h == gama_height else b""))
    return datas


@pytest.mark.parametrize("color_type, bit_depth", GPU_FORMATS)
def test_replay_equals_pillow_on_every_format_and_geometry(color_type: int, bit_depth: int) -> None:
    """Distinct channels; landscape (horizontal first), portrait (vertical first in Pillow 13), upscaled,
    exact size, square, 1-pixel edges, one axis unchanged; gAMA that Pillow ignores."""
    rng = np.random.default_rng(200 + color_type * 17 + bit_depth)
    shapes = [(60, 70), (100, 37), (10, 15), (24, 24), (30, 30), (1, 4), (7, 1), (24, 50), (90, 24)]
    datas = format_pngs(rng, shapes, color_type, bit_depth, gama_height=30)
    geometry = [clip_geometry(w, h, SMALL)[0] for h, w in shapes]
    assert any(vertical_first(w, h, *g) for (h, w), g in zip(shapes, geometry))  # both pass orders are exercised
    assert not all(vertical_first(w, h, *g) for (h, w), g in zip(shapes, geometry))
    out = replay(datas, SMALL)
    for k, data in enumerate(datas):
        np.testing.assert_array_equal(out[k], preprocess_clip_reference(data, SMALL), err_msg=str(shapes[k]))
    half = replay(datas, SMALL, "float16")
    for k, data in enumerate(datas):
        np.testing.assert_array_equal(half[k], preprocess_clip_reference(data, SMALL).astype(np.float16))


# --- CPU: the loader's pipeline with the emulated device ----------------------------------------------


@pytest.fixture
def numpy_device_clip(monkeypatch):
    install_numpy_device(monkeypatch, {**EMULATED_KERNELS, **CLIP_KERNELS})


def collect_clip(loader, items, size: int) -> tuple[dict[int, np.ndarray], dict[int, str], list[str]]:
    inputs, errors, names, base = {}, {}, [], 0
    for batch in loader.batches(items):
        host = batch.inputs if isinstance(batch.inputs, np.ndarray) else batch.inputs.get()
        assert host.shape == (len(batch.ok), 3, size, size)
        for k, x in zip(batch.ok, host):
            inputs[base + k] = np.asarray(x, np.float32)
        errors.update({base + k: e for k, e in batch.errors.items()})
        assert sorted([*batch.ok, *batch.errors]) == list(range(len(batch.items)))
        names += batch.items
        base += len(batch.items)
    return inputs, errors, names


def pipeline_a_cpu_loader(spec: ClipPreprocessSpec, batch_size: int) -> CpuLoader:
    """Pipeline A's own CPU loader (pipeline_a.EvaXgbClassifier builds it this way)."""
    return CpuLoader(None, batch_size=batch_size, workers=2, preprocess_one=clip_png_preprocess(spec),
                     item_shape=(3, spec.size, spec.size))


def check_clip_mixed_batch(loader: GpuLoader, items: list) -> None:
    """The GPU loader gives Pipeline A's CPU loader's rows: same inputs, same errors, same order."""
    gpu_inputs, gpu_errors, names = collect_clip(loader, items, loader.spec.size)
    cpu_inputs, cpu_errors, cpu_names = collect_clip(pipeline_a_cpu_loader(loader.spec, 5), items, loader.spec.size)
    assert names == cpu_names
    assert gpu_errors == cpu_errors
    assert sorted(gpu_inputs) == sorted(cpu_inputs)
    for k in cpu_inputs:
        want = cpu_inputs[k]
        if loader.output_dtype == "float16":
            want = want.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(gpu_inputs[k], want, err_msg=names[k])
    stats = loader.stats
    assert stats.cpu_fallback_reasons.get("interlaced (Adam7)") == 1 and stats.cpu_fallback_reasons.get("palette") == 1
    assert stats.redo_reasons.get("device: invalid filter type") == 1
    assert sum(stats.redo_reasons.values()) == stats.redone_on_cpu


@pytest.mark.parametrize("output_dtype", ["float32", "float16"])
@pytest.mark.parametrize("inflate", ["nvcomp", "host"])
def test_clip_loader_with_emulated_device(numpy_device_clip, inflate: str, output_dtype: str, tmp_path: Path) -> None:
    items = mixed_items(tmp_path)
    loader = GpuLoader(SMALL, batch_size=5, workers=2, inflate=inflate, output_dtype=output_dtype)
    check_clip_mixed_batch(loader, items)
    # the non-PNG bytes fail parse_png; with zlib on the host the bad checksum and the corrupt stream fail
    # too: Pillow decides each (on the nvCOMP path the device flags those two instead, and Pillow redoes them)
    assert loader.stats.cpu_fallback_reasons.get(CLIP_PARSER_REJECTED) == (3 if inflate == "host" else 1)
    # the gamma-corrected file (libpng semantics: CPU) stays on the GPU here: Pillow ignores gAMA
    assert "gamma correction (gAMA without sRGB)" not in loader.stats.cpu_fallback_reasons


def test_clip_loader_every_format_with_emulated_device(numpy_device_clip) -> None:
    rng = np.random.default_rng(9)
    datas = [make_png(random_pixels(rng, h, w, ct, bd), ct, bd)
             for (ct, bd), (h, w) in zip(GPU_FORMATS, [(20, 30), (31, 17), (1, 5), (24, 24), (9, 40), (40, 9),
                                                       (12, 12), (30, 26)])]
    loader = create_loader("gpu", SMALL, batch_size=3, workers=2, inflate="host")
    assert isinstance(loader, GpuLoader)
    inputs, errors, _ = collect_clip(loader, datas, SMALL.size)
    assert errors == {} and loader.stats.on_gpu == len(datas) and loader.stats.redone_on_cpu == 0
    for k, data in enumerate(datas):
        np.testing.assert_array_equal(inputs[k], preprocess_clip_reference(data, SMALL))


def test_clip_loader_falls_back_to_pillow_when_the_strict_parser_refuses(numpy_device_clip) -> None:
    """A bad IDAT CRC: parse_png refuses it, Pillow (which does not check IDAT CRCs) decodes it."""
    from tests.pngtools import SIGNATURE, chunk, iter_chunks

    rng = np.random.default_rng(10)
    good = make_png(random_pixels(rng, 20, 20, 2, 8), 2, 8)
    parts = list(iter_chunks(good))
    bad_crc = bytearray(SIGNATURE + b"".join(chunk(t, b) for t, b in parts))
    idat = bad_crc.index(b"IDAT")
    length = int.from_bytes(bad_crc[idat - 4:idat], "big")
    bad_crc[idat + 4 + length] ^= 0xFF  # the IDAT's CRC
    loader = GpuLoader(SMALL, batch_size=4, workers=2, inflate="host")
    inputs, errors, _ = collect_clip(loader, [good, bytes(bad_crc)], SMALL.size)
    cpu_inputs, cpu_errors, _ = collect_clip(pipeline_a_cpu_loader(SMALL, 4), [good, bytes(bad_crc)], SMALL.size)
    assert errors == cpu_errors
    assert sorted(inputs) == sorted(cpu_inputs)
    for k in inputs:
        np.testing.assert_array_equal(inputs[k], cpu_inputs[k])
    assert loader.stats.cpu_fallback_reasons == {CLIP_PARSER_REJECTED: 1} and loader.stats.on_gpu == 1


def check_clip_equals_pipeline_a_on_pngsuite(loader: GpuLoader, *folders: str) -> None:
    items = [str(p) for p in suite_files(*folders)]
    gpu_inputs, gpu_errors, names = collect_clip(loader, items, loader.spec.size)
    cpu_inputs, cpu_errors, _ = collect_clip(pipeline_a_cpu_loader(loader.spec, 16), items, loader.spec.size)
    assert names == items
    assert gpu_errors == cpu_errors
    assert sorted(gpu_inputs) == sorted(cpu_inputs)
    for k in cpu_inputs:
        np.testing.assert_array_equal(gpu_inputs[k], cpu_inputs[k], err_msg=items[k])


def test_clip_loader_on_malformed_pngsuite_files_with_emulated_device(numpy_device_clip) -> None:
    """Crashers and bad palettes: Pillow's verdict (error or pixels) for each, as in Pipeline A's CPU loader.
    (The whole suite through the emulated device also agrees, but takes ~100 s here; the GPU test runs it.)"""
    loader = GpuLoader(SMALL, batch_size=16, workers=2, inflate="host")
    check_clip_equals_pipeline_a_on_pngsuite(loader, "testpngs/crashers", "testpngs/badpal")
    assert loader.stats.cpu_fallback_reasons.get(CLIP_PARSER_REJECTED, 0) >= 20


def test_sar_spec_still_writes_one_channel(numpy_device_clip) -> None:
    from iws_engine.preprocess import PreprocessSpec

    rng = np.random.default_rng(11)
    data = make_png(random_pixels(rng, 30, 30, 6, 16), 6, 16)
    batch = next(GpuLoader(PreprocessSpec(mean=0.4, std=0.2), batch_size=2, workers=2, inflate="host").batches([data]))
    assert batch.inputs.shape == (1, 1, 256, 256)


# --- GPU ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda() -> None:
    if cuda_device_count() == 0:
        pytest.skip("needs a CUDA device (CuPy finds none here): clip_resize.cu runs only on the device machine")


@pytest.mark.gpu
@pytest.mark.parametrize("inflate", INFLATE_MODES)
def test_gpu_clip_loader_on_synthetic_vignettes(cuda, inflate: str) -> None:
    """Pipeline A's input on the device equals preprocess_clip_reference: max |diff| <= 1e-5, expected 0."""
    from iws_engine.export.synth import encode_png, render_vignette

    rng = np.random.default_rng(12)
    datas = [encode_png(render_vignette(rng, k % 2 == 0, 528, 539), fmt, "paeth" if k % 3 else "adaptive")
             for k, fmt in enumerate(["rgba16", "rgba16", "rgba16", "gray8", "gray16", "rgb8"])]
    loader = GpuLoader(EVA02_L448_SPEC, batch_size=4, inflate=inflate)  # 2 batches: both slots
    inputs, errors, _ = collect_clip(loader, datas, 448)
    assert errors == {} and loader.stats.on_gpu == len(datas)
    for k, data in enumerate(datas):
        want = preprocess_clip_reference(data)
        assert float(np.max(np.abs(inputs[k] - want))) <= 1e-5
        np.testing.assert_array_equal(inputs[k], want)  # integer arithmetic + the same table: exact


@pytest.mark.gpu
@pytest.mark.parametrize("inflate", INFLATE_MODES)
@pytest.mark.parametrize("color_type, bit_depth", GPU_FORMATS)
def test_gpu_clip_loader_every_format_and_geometry(cuda, inflate: str, color_type: int, bit_depth: int) -> None:
    rng = np.random.default_rng(300 + color_type * 17 + bit_depth)
    shapes = [(528, 539), (1000, 449), (200, 300), (448, 448), (1, 3), (600, 449), (2048, 700)]
    datas = format_pngs(rng, shapes, color_type, bit_depth, gama_height=200)
    loader = GpuLoader(EVA02_L448_SPEC, batch_size=3, inflate=inflate)
    inputs, errors, _ = collect_clip(loader, datas, 448)
    assert errors == {} and loader.stats.on_gpu == len(datas) and loader.stats.redone_on_cpu == 0
    for k, data in enumerate(datas):
        want = preprocess_clip_reference(data)
        assert float(np.max(np.abs(inputs[k] - want))) <= 1e-5, shapes[k]
        np.testing.assert_array_equal(inputs[k], want, err_msg=str(shapes[k]))
    half, _, _ = collect_clip(GpuLoader(EVA02_L448_SPEC, batch_size=4, inflate=inflate, output_dtype="float16"),
                              datas[:3], 448)
    for k in range(3):
        want = preprocess_clip_reference(datas[k]).astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(half[k], want)


@pytest.mark.gpu
@pytest.mark.parametrize("inflate", INFLATE_MODES)
def test_gpu_clip_loader_equals_pipeline_a_on_pngsuite(cuda, inflate: str) -> None:
    """Every reference file, valid or not: the same inputs and errors as Pipeline A's CPU loader."""
    loader = GpuLoader(EVA02_L448_SPEC, batch_size=16, inflate=inflate)
    check_clip_equals_pipeline_a_on_pngsuite(loader, *VALID_FOLDERS, "testpngs/crashers", "testpngs/badpal")
    # 65 files take the GPU path (the gamma ones included); nvCOMP failing a batch sends its images to Pillow
    whole_batch = sum(v for reason, v in loader.stats.redo_reasons.items() if reason.startswith("nvCOMP failed"))
    assert loader.stats.on_gpu >= 65 - whole_batch


@pytest.mark.gpu
@pytest.mark.parametrize("inflate", INFLATE_MODES)
def test_gpu_clip_loader_mixed_batch(cuda, inflate: str, tmp_path: Path) -> None:
    check_clip_mixed_batch(GpuLoader(SMALL, batch_size=5, inflate=inflate), mixed_items(tmp_path))
