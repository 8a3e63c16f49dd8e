"""The real CUDA kernels (kernels/*.cu, unchanged) executed on the CPU, under AddressSanitizer +
UndefinedBehaviorSanitizer (and the unfilter once under ThreadSanitizer): tests/cuda_cpu.py builds them with
kernels/cuda_cpu_emulation.h (a block's threads are real threads, __syncthreads() a real barrier).

The launches are the loader's own: GpuLoader and decode_scanlines_on_gpu (engine/loaders/gpu.py) run with
tests/test_gpu_loader.py's NumPy stand-in for CuPy, whose compiled functions are here the emulated kernels,
so grid, block and arguments are exactly what the loader computes. The results are compared with the
references: the unfiltered scanlines PNG stores, the CPU loader's inputs (preprocess_reference), Pillow's
Pipeline A input (preprocess_clip_reference), zlib's Adler-32. The emulation itself is tested on
tests/cuda_cpu_selftest.cu: CUDA's results for shared memory, barriers, shuffles and atomics, and a report for a
divergent barrier, a shared-memory race and an out-of-bounds read.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest

from iws_engine.loaders.gpu import (
    ADLER_JOB,
    ADLER_THREADS,
    STATUS_ADLER_MISMATCH,
    STATUS_BAD_FILTER,
    STATUS_BAD_JOB,
    UNFILTER_JOB,
    UNFILTER_THREADS,
    GpuLoader,
    TapTables,
    decode_scanlines_on_gpu,
    plan_batch,
)
from iws_engine.loaders.png import PngError, decode_png, inflate_idat, parse_png
from iws_engine.pipeline_a import clip_spec_for
from iws_engine.preprocess_clip import EVA02_L448_SPEC, preprocess_clip_reference
from tests import cuda_cpu
from tests.test_gpu_clip import check_clip_mixed_batch, collect_clip, format_pngs
from tests.test_gpu_loader import (
    GPU_FORMATS,
    SPEC,
    check_mixed_batch,
    collect,
    filter_scanlines,
    install_numpy_device,
    make_png,
    mixed_items,
    random_pixels,
    reference_inputs,
    scanlines_of,
    unfilter_sequentially,
)

pytestmark = [pytest.mark.kernels_cpu,
              pytest.mark.skipif(cuda_cpu.skip_reason() is not None, reason=str(cuda_cpu.skip_reason()))]

#: Pipeline A's model input sizes: EVA02-L (448) and the tiny EVA02 of the tests and smoke runs (56).
CLIP_SIZES = (EVA02_L448_SPEC.size, 56)


@pytest.fixture
def cpu_device(monkeypatch) -> dict[str, cuda_cpu.CpuKernel]:
    """GpuLoader and decode_scanlines_on_gpu with NumPy device memory and the real kernels run on the CPU."""
    compiled = cuda_cpu.cpu_kernels()
    install_numpy_device(monkeypatch, compiled)
    return compiled


# --- png_unfilter.cu ----------------------------------------------------------------------------------------

# (colour type, bit depth) -> bytes per complete pixel (the filters' "left" distance): 1, 2, 3, 4, 6, 8
UNFILTER_FORMATS = [((0, 8), 1), ((0, 16), 2), ((4, 8), 2), ((2, 8), 3), ((6, 8), 4), ((4, 16), 4), ((2, 16), 6),
                    ((6, 16), 8)]
# odd sizes; one row, one column, one pixel; two bands of UNFILTER_THREADS rows, the second partial; wider than tall
SHAPES = [(13, 11), (1, 9), (17, 1), (1, 1), (UNFILTER_THREADS + 3, 5), (4, 70)]


def sub_byte_png(rng, height: int, width: int, depth: int, filters=(0, 1, 2, 3, 4)) -> tuple[bytes, np.ndarray]:
    """A grey PNG of 1/2/4-bit samples (filter_stride 1) and its unfiltered scanlines."""
    rows = rng.integers(0, 256, (height, (width * depth + 7) // 8), dtype=np.uint8)
    rows[:, -1] &= (0xFF << (-width * depth % 8)) & 0xFF  # padding bits are zero
    return make_png(np.zeros((height, width, 1)), 0, depth, raw=filter_scanlines(rows, 1, filters)), rows


@pytest.mark.parametrize("color_type, bit_depth, bpp", [(*f, bpp) for f, bpp in UNFILTER_FORMATS])
def test_unfilter_every_filter_type_and_shape_in_one_launch(cpu_device, color_type: int, bit_depth: int,
                                                            bpp: int) -> None:
    rng = np.random.default_rng(color_type * 31 + bit_depth)
    pixels, datas = [], []
    for h, w in SHAPES:
        pixels.append(random_pixels(rng, h, w, color_type, bit_depth))
        datas.append(make_png(pixels[-1], color_type, bit_depth, filters=(4, 0, 1, 2, 3, 4, 4, 3)))
    for ftype in range(5):  # a one-row image of each filter type (row 0: "above" is zero)
        pixels.append(random_pixels(rng, 1, 6, color_type, bit_depth))
        datas.append(make_png(pixels[-1], color_type, bit_depth, filters=(ftype,)))
    assert {parse_png(d).filter_stride for d in datas} == {bpp}
    rows = decode_scanlines_on_gpu(datas)  # one launch, all images, in place
    assert cpu_device["png_unfilter"].launches == [((len(datas),), (UNFILTER_THREADS,))]
    for k, (got, want) in enumerate(zip(rows, pixels)):
        np.testing.assert_array_equal(got, scanlines_of(want, bit_depth), err_msg=str(want.shape))


def test_unfilter_sub_byte_depths(cpu_device) -> None:
    """1-, 2- and 4-bit grey: bytes, not pixels, are the unit (filter_stride 1)."""
    rng = np.random.default_rng(3)
    made = [sub_byte_png(rng, h, w, depth) for depth in (1, 2, 4) for h, w in ((9, 20), (1, 3), (6, 1))]
    for got, (data, want) in zip(decode_scanlines_on_gpu([d for d, _ in made]), made):
        np.testing.assert_array_equal(got, want)


def unfilter_jobs(raws: list[bytes], shapes: list[tuple[int, int, int]], dst_pitch_extra: int):
    """Filtered data packed 256-aligned in one buffer, and jobs writing to a second buffer with padded rows."""
    offsets = np.cumsum([0] + [(len(r) + 255) // 256 * 256 for r in raws])
    src = np.zeros(int(offsets[-1]), np.uint8)
    jobs = np.zeros(len(raws), UNFILTER_JOB)
    dst_offset = 0
    for j, (raw, (row_bytes, height, stride)) in enumerate(zip(raws, shapes)):
        src[offsets[j]:offsets[j] + len(raw)] = np.frombuffer(raw, np.uint8)
        pitch = row_bytes + dst_pitch_extra
        jobs[j] = (offsets[j], dst_offset, row_bytes, height, pitch, stride)
        dst_offset += pitch * height
    return src, jobs, offsets, dst_offset


def test_unfilter_into_a_separate_buffer_touches_only_its_rows() -> None:
    """dst != src, rows padded: every output byte written, the padding never touched (ASan poisons the gaps of
    the source), and the filtered input left as it was."""
    rng = np.random.default_rng(4)
    made = [(random_pixels(rng, h, w, ct, bd), ct, bd) for (h, w), (ct, bd) in
            zip([(13, 11), (1, 9), (17, 1), (UNFILTER_THREADS + 1, 3)], [(6, 16), (2, 8), (0, 16), (4, 8)])]
    infos = [parse_png(make_png(p, ct, bd)) for p, ct, bd in made]
    raws = [inflate_idat(info) for info in infos]
    shapes = [(len(r) // info.height - 1, info.height, info.filter_stride) for r, info in zip(raws, infos)]
    src, jobs, offsets, dst_size = unfilter_jobs(raws, shapes, dst_pitch_extra=3)
    dst = np.full(dst_size, 0xA5, np.uint8)
    status = np.zeros(len(raws), np.uint32)
    before = src.copy()
    gaps = [(src, int(offsets[j]) + len(r), int(offsets[j + 1] - offsets[j]) - len(r)) for j, r in enumerate(raws)]
    cuda_cpu.launch("png_unfilter", (len(raws),), (UNFILTER_THREADS,),
                    (jobs.view(np.uint8), src, dst, status, np.uint32(len(raws))), poison=[g for g in gaps if g[2]])
    np.testing.assert_array_equal(src, before)
    assert not status.any()
    for j, ((pixels, _, bd), (row_bytes, height, _)) in enumerate(zip(made, shapes)):
        pitch = row_bytes + 3
        block = dst[int(jobs[j]["dst_offset"]):int(jobs[j]["dst_offset"]) + pitch * height].reshape(height, pitch)
        np.testing.assert_array_equal(block[:, :row_bytes], scanlines_of(pixels, bd))
        assert (block[:, row_bytes:] == 0xA5).all()


def test_unfilter_flags_invalid_filter_bytes_per_image(cpu_device) -> None:
    """Filter types 5, 7 and 255 in rows of three images (one in the second band): only those images get
    STATUS_BAD_FILTER; their neighbours in the launch are unfiltered correctly."""
    rng = np.random.default_rng(6)
    pixels = [random_pixels(rng, h, 7, 2, 8) for h in (5, 6, UNFILTER_THREADS + 4, 4, 3)]
    raws = [bytearray(filter_scanlines(scanlines_of(p, 8), 3)) for p in pixels]
    for k, (row, ftype) in {1: (0, 5), 2: (UNFILTER_THREADS + 2, 255), 4: (2, 7)}.items():
        raws[k][row * 22] = ftype
    datas = [make_png(p, 2, 8, raw=bytes(r)) for p, r in zip(pixels, raws)]
    infos = [parse_png(d) for d in datas]
    plan = plan_batch(infos, SPEC, TapTables())
    buffer = np.zeros(plan.inflated_bytes, np.uint8)
    for j, r in enumerate(raws):
        buffer[plan.inflated_offsets[j]:plan.inflated_offsets[j] + len(r)] = np.frombuffer(bytes(r), np.uint8)
    status = np.zeros(len(datas), np.uint32)
    cuda_cpu.launch("png_unfilter", (len(datas),), (UNFILTER_THREADS,),
                    (plan.unfilter_jobs.view(np.uint8), buffer, buffer, status, np.uint32(len(datas))))
    assert status.tolist() == [0, STATUS_BAD_FILTER, STATUS_BAD_FILTER, 0, STATUS_BAD_FILTER]
    for j in (0, 3):
        rows = buffer[plan.inflated_offsets[j]:plan.inflated_offsets[j] + len(raws[j])].reshape(len(pixels[j]), -1)
        np.testing.assert_array_equal(rows[:, 1:], scanlines_of(pixels[j], 8))
    with pytest.raises(PngError, match="invalid filter type 7"):
        decode_png(datas[4])  # the CPU decoder, which the loader asks for the precise error


def test_unfilter_refuses_bad_descriptors() -> None:
    """A stride PNG does not have, a row not a whole number of pixels, an empty image: STATUS_BAD_JOB, nothing
    written; and a job count below the grid leaves the extra block idle."""
    jobs = np.zeros(4, UNFILTER_JOB)
    jobs[0] = (0, 1, 10, 2, 11, 5)  # stride 5
    jobs[1] = (0, 1, 10, 2, 11, 4)  # 10 % 4 != 0
    jobs[2] = (0, 1, 12, 0, 13, 4)  # no rows
    jobs[3] = (0, 1, 12, 2, 13, 4)  # valid, but beyond n_jobs
    buffer = np.arange(32, dtype=np.uint8) % 4  # filter bytes 0..3 wherever a row would start
    before = buffer.copy()
    status = np.zeros(4, np.uint32)
    cuda_cpu.launch("png_unfilter", (4,), (UNFILTER_THREADS,), (jobs.view(np.uint8), buffer, buffer, status,
                                                                 np.uint32(3)))
    assert status.tolist() == [STATUS_BAD_JOB] * 3 + [0]
    np.testing.assert_array_equal(buffer, before)


def test_unfilter_under_thread_sanitizer() -> None:
    """The wavefront's shared-memory hand-off and its barriers, checked for data races: two bands, several
    images, every filter type, in place as the loader runs it."""
    rng = np.random.default_rng(8)
    pixels = [random_pixels(rng, h, w, 6, 16) for h, w in ((UNFILTER_THREADS + 5, 6), (9, 13), (1, 4))]
    infos = [parse_png(make_png(p, 6, 16)) for p in pixels]
    plan = plan_batch(infos, SPEC, TapTables())
    buffer = np.zeros(plan.inflated_bytes, np.uint8)
    for j, info in enumerate(infos):
        buffer[plan.inflated_offsets[j]:plan.inflated_offsets[j] + info.raw_size] = np.frombuffer(
            inflate_idat(info), np.uint8)
    status = np.zeros(len(infos), np.uint32)
    cuda_cpu.launch("png_unfilter", (len(infos),), (UNFILTER_THREADS,),
                    (plan.unfilter_jobs.view(np.uint8), buffer, buffer, status, np.uint32(len(infos))),
                    sanitizer="tsan")
    assert not status.any()
    for j, p in enumerate(pixels):
        rows = buffer[plan.inflated_offsets[j]:plan.inflated_offsets[j] + infos[j].raw_size].reshape(len(p), -1)
        np.testing.assert_array_equal(rows[:, 1:], scanlines_of(p, 16))


def test_unfilter_equals_a_sequential_unfilter_on_pngsuite(cpu_device) -> None:
    from tests.test_gpu_loader import suite_files

    files = [p for p in suite_files("basic") if not parse_png(p.read_bytes()).interlace]
    datas = [p.read_bytes() for p in files]
    for path, data, got in zip(files, datas, decode_scanlines_on_gpu(datas)):
        info = parse_png(data)
        raw = inflate_idat(info)
        want = unfilter_sequentially(raw, len(raw) // info.height - 1, info.height, info.filter_stride)
        np.testing.assert_array_equal(got, want, err_msg=path.name)


# --- adler32.cu ---------------------------------------------------------------------------------------------


def test_adler32_on_a_batch() -> None:
    """The loader's jobs (256-aligned images: the uint4 path) plus unaligned ones (the byte path); lengths
    around the 16-byte chunk and the block's 4,096-byte stride; one stored checksum wrong."""
    rng = np.random.default_rng(10)
    lengths = [1, 15, 16, 17, 255, ADLER_THREADS * 16, ADLER_THREADS * 16 + 1, 100_003, 3]
    datas = [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in lengths]
    datas.append(b"\xff" * 70_000)  # the largest per-chunk sums
    offsets = np.cumsum([0] + [(len(d) + 1 + 255) // 256 * 256 for d in datas])  # room for the shifted start
    buffer = np.zeros(int(offsets[-1]) + 16, np.uint8)
    jobs = np.zeros(len(datas), ADLER_JOB)
    for j, d in enumerate(datas):
        start = int(offsets[j]) + (1 if j % 3 == 2 else 0)  # every third image starts unaligned
        buffer[start:start + len(d)] = np.frombuffer(d, np.uint8)
        jobs[j] = (start, len(d), zlib.adler32(d) ^ (1 if j == 4 else 0), 0)
    status = np.zeros(len(datas), np.uint32)
    computed = np.zeros(len(datas), np.uint32)
    cuda_cpu.launch("adler32_verify", (len(datas),), (ADLER_THREADS,),
                    (jobs.view(np.uint8), buffer, status, computed, np.uint32(len(datas))))
    assert computed.tolist() == [zlib.adler32(d) for d in datas]
    assert status.tolist() == [STATUS_ADLER_MISMATCH if j == 4 else 0 for j in range(len(datas))]


# --- the loader's pipeline: adler32.cu, png_unfilter.cu, then grey_resize.cu or clip_resize.cu ---------------


@pytest.mark.parametrize("output_dtype", ["float32", "float16"])
@pytest.mark.parametrize("inflate", ["nvcomp", "host"])
def test_loader_mixed_batch_on_the_real_kernels(cpu_device, inflate: str, output_dtype: str, tmp_path: Path) -> None:
    """Checksum and filter-type errors flagged by the kernels' status bits, per image; CPU rows in between."""
    loader = GpuLoader(SPEC, batch_size=5, workers=2, inflate=inflate, output_dtype=output_dtype)
    check_mixed_batch(loader, mixed_items(tmp_path))


@pytest.mark.parametrize("color_type, bit_depth", GPU_FORMATS)
def test_grey_resize_every_format_equals_the_reference(cpu_device, color_type: int, bit_depth: int) -> None:
    """SAR_CNN's 256x256 input, bit for bit: down, up (clamped), identity, one axis each way, 1x1, odd sizes."""
    rng = np.random.default_rng(color_type * 17 + bit_depth)
    shapes = [(300, 200), (100, 90), (256, 256), (1, 1), (2, 513), (257, 3)]
    datas = [make_png(random_pixels(rng, h, w, color_type, bit_depth), color_type, bit_depth) for h, w in shapes]
    loader = GpuLoader(SPEC, batch_size=4, workers=2, inflate="host")  # two launches, the second partial
    inputs, errors, _ = collect(loader, datas)
    assert errors == {} and loader.stats.on_gpu == len(datas)
    for k, want in enumerate(reference_inputs(datas)):
        np.testing.assert_array_equal(inputs[k], want, err_msg=str(shapes[k]))


def test_grey_resize_iws_vignettes_fp32_and_fp16(cpu_device) -> None:
    """The IWS format (RGBA16 539x528: fp32 and fp16) and 8-bit grey (fp32)."""
    from iws_engine.export.synth import encode_png, render_vignette

    rng = np.random.default_rng(12)
    datas = [encode_png(render_vignette(rng, k == 0, 528, 539), fmt) for k, fmt in enumerate(["rgba16", "gray8"])]
    want = reference_inputs(datas)
    for dtype, count in (("float32", 2), ("float16", 1)):
        inputs, errors, _ = collect(GpuLoader(SPEC, batch_size=2, workers=2, output_dtype=dtype), datas[:count])
        assert errors == {}
        for k in range(count):
            np.testing.assert_array_equal(inputs[k], want[k].astype(dtype).astype(np.float32))


@pytest.mark.parametrize("size", CLIP_SIZES)
def test_clip_resize_every_format_at_the_pipeline_a_sizes(cpu_device, size: int) -> None:
    """Pipeline A's input at each model size, bit for bit with Pillow: every GPU format, both pass orders,
    up- and downscaling, 1-pixel edges, gAMA (which Pillow ignores)."""
    spec = clip_spec_for(size)
    rng = np.random.default_rng(size)
    shapes = [(60, 70), (100, 37), (1, 4), (7, 1)] if size < 100 else [(300, 200), (1, 3)]
    # at 448, one format per way clip_resize.cu reads a pixel (RGB, 16-bit grey, grey) and per sample size
    formats = GPU_FORMATS if size < 100 else [(6, 16), (0, 16), (4, 8), (2, 8)]
    datas = []
    for color_type, bit_depth in formats:
        datas += format_pngs(rng, shapes, color_type, bit_depth, gama_height=shapes[0][0])
    loader = GpuLoader(spec, batch_size=len(shapes) * 2, workers=2, inflate="host")
    inputs, errors, _ = collect_clip(loader, datas, size)
    assert errors == {} and loader.stats.on_gpu == len(datas)
    for k, data in enumerate(datas):
        np.testing.assert_array_equal(inputs[k], preprocess_clip_reference(data, spec), err_msg=str(k))


def test_clip_resize_iws_vignette_fp16_at_448(cpu_device) -> None:
    from iws_engine.export.synth import encode_png, render_vignette

    rng = np.random.default_rng(14)
    data = encode_png(render_vignette(rng, True, 528, 539), "rgba16")
    inputs, errors, _ = collect_clip(GpuLoader(EVA02_L448_SPEC, batch_size=1, workers=2, output_dtype="float16"),
                                     [data], EVA02_L448_SPEC.size)
    assert errors == {}
    np.testing.assert_array_equal(inputs[0], preprocess_clip_reference(data).astype(np.float16).astype(np.float32))


def test_clip_loader_mixed_batch_on_the_real_kernels(cpu_device, tmp_path: Path) -> None:
    check_clip_mixed_batch(GpuLoader(clip_spec_for(56), batch_size=5, workers=2, output_dtype="float16"),
                           mixed_items(tmp_path))


# --- the emulation itself (tests/cuda_cpu_selftest.cu) --------------------------------------------------------

SELFTEST = Path(__file__).with_name("cuda_cpu_selftest.cu")
cuda_cpu.EXTRA_SOURCES["cuda_cpu_selftest.cu"] = (SELFTEST, ("block_sum", "warp_shuffles", "atomic_histogram",
                                                             "divergent_barrier", "racy_neighbour", "read_past"))


@pytest.mark.parametrize("grid, block", [((3,), (256,)), ((2, 2, 1), (8, 4, 2)), ((1,), (1,))])
def test_emulation_shared_memory_and_barriers(grid, block) -> None:
    blocks, threads = int(np.prod(grid)), int(np.prod(block))
    data = np.arange(blocks * threads, dtype=np.uint32) * 7 + 1
    out = np.zeros(blocks, np.uint32)
    cuda_cpu.launch("block_sum", grid, block, (data, out))
    np.testing.assert_array_equal(out, data.reshape(blocks, threads).sum(1))  # and no block saw another's sums


def test_emulation_warp_shuffles() -> None:
    data = np.arange(64, dtype=np.int32) * 3 - 50
    out = np.zeros(4 * 64, np.int32)
    cuda_cpu.launch("warp_shuffles", (1,), (64,), (data, out))
    lane, warp = np.arange(64) % 32, np.arange(64) // 32 * 32
    got = out.reshape(64, 4)
    np.testing.assert_array_equal(got[:, 0], np.where(lane + 1 < 32, data[np.minimum(np.arange(64) + 1, 63)], data))
    np.testing.assert_array_equal(got[:, 1], np.where(lane >= 2, data[np.arange(64) - 2], data))
    np.testing.assert_array_equal(got[:, 2], data[warp + (lane ^ 5)])
    np.testing.assert_array_equal(got[:, 3], data[warp + 3])


def test_emulation_atomics() -> None:
    data = np.random.default_rng(0).integers(0, 1000, 1000).astype(np.uint32)
    bins = np.zeros(16, np.uint32)
    cuda_cpu.launch("atomic_histogram", (4,), (256,), (data, np.uint32(len(data)), bins))
    np.testing.assert_array_equal(bins, np.bincount(data % 16, minlength=16))


def test_emulation_reports_a_divergent_barrier() -> None:
    with pytest.raises(cuda_cpu.KernelRunError, match="divergent __syncthreads"):
        cuda_cpu.launch("divergent_barrier", (1,), (8,), (np.zeros(8, np.uint32),))


def test_emulation_reports_a_shared_memory_race() -> None:
    with pytest.raises(cuda_cpu.KernelRunError, match="ThreadSanitizer: data race"):
        cuda_cpu.launch("racy_neighbour", (1,), (64,), (np.zeros(64, np.uint32),), sanitizer="tsan")


def test_emulation_reports_a_read_past_a_buffer_and_into_a_poisoned_gap() -> None:
    with pytest.raises(cuda_cpu.KernelRunError, match="heap-buffer-overflow"):
        cuda_cpu.launch("read_past", (1,), (4,), (np.zeros(6, np.uint32), np.zeros(4, np.uint32), np.uint32(3)))
    data = np.zeros(16, np.uint32)
    with pytest.raises(cuda_cpu.KernelRunError, match="use-after-poison"):
        cuda_cpu.launch("read_past", (1,), (4,), (data, np.zeros(4, np.uint32), np.uint32(3)), poison=[(data, 24, 8)])
    with pytest.raises(TypeError, match="NumPy integer or float scalars"):
        cuda_cpu.launch("read_past", (1,), (4,), (data, np.zeros(4, np.uint32), 3))
    with pytest.raises(cuda_cpu.KernelRunError, match="argument 2: scalar kind 'f'"):
        cuda_cpu.launch("read_past", (1,), (4,), (data, np.zeros(4, np.uint32), np.float32(3)))
