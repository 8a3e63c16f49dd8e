"""The GPU loader: PNG bytes -> inflate, unfilter, resize, grey and normalise on the device.

Two model inputs: SAR_CNN's (a `PreprocessSpec`: Julia's bilinear resize and grey, (N, 1, H, W))
and Pipeline A's EVA02 input (a `ClipPreprocessSpec`: Pillow's RGB conversion, antialiased
bicubic resize, centre crop and CLIP normalisation, (N, 3, S, S)). Steps 1-3 are shared; the last
kernel differs (kernels/grey_resize.cu or kernels/clip_resize.cu), and so does the CPU fallback
(the PNGFiles-semantics decoder, or Pillow itself).

Per batch:
1. host (thread pool, overlapping the previous batches): read each file, `parse_png` it (framing,
   CRCs, IHDR, zlib header), and choose its path. 8/16-bit grey, grey+alpha, RGB and RGBA
   images without gamma correction go to the GPU; interlaced, palette, sub-byte and
   gamma-corrected images are decoded by the CPU decoder (`decode_png` + `preprocess_reference`)
   in the same batch and copied into their rows of the same device batch.
2. the raw deflate streams (IDAT minus zlib header and Adler-32) are packed into a pinned
   staging buffer, copied to the device in one transfer, inflated by nvCOMP's batched raw
   Deflate, and checked against their Adler-32 on the device (kernels/adler32.cu);
3. kernels/png_unfilter.cu unfilters every image in place, kernels/grey_resize.cu writes the
   model input (N, 1, H, W) fp32 or fp16 straight into a device array, bit for bit as
   engine/preprocess.py computes it; for a CLIP spec kernels/clip_resize.cu writes (N, 3, S, S)
   bit for bit as engine/preprocess_clip.py's Pillow reference (two fixed-point passes through a
   scratch buffer, integer taps from engine/pillow_resample.py).
Any image the device flags (Adler-32 mismatch, invalid filter type, size mismatch) is decoded
again on the CPU, which either reports the precise `PngError` or supplies its pixels: errors are
per image, never per batch. When nvCOMP rejects a whole batch (one stream longer than its image
does that), the batch's GPU images are all redone on the CPU, with a RuntimeWarning.

A CLIP spec routes where Pillow differs from libpng: gAMA is ignored (gamma files stay on the GPU),
and a file the strict parser or host zlib rejects is not an error yet: Pillow decides on the CPU
(it accepts a bad IDAT CRC, for one), exactly as Pipeline A's CPU loader does. Palette, sub-byte
grey and interlaced images, and absurd aspect ratios, are decoded by Pillow on the CPU too.

Pipelining: two slots (CUDA stream + pinned staging + device buffers) alternate. Batch k+1 is
launched on one stream before batch k is finished on the other and handed to the caller, so the
H2D copy, inflate and kernels of k+1 overlap the host work and the inference of k, while the
thread pool reads and parses the batches after. Buffers grow to the largest batch seen, up to
`max_batch_bytes` each; an image that does not fit goes to the CPU path, so memory is bounded.

`inflate="host"` replaces nvCOMP by zlib in the thread pool (the GPU still unfilters, checks
and resizes): for machines without nvCOMP, and as a measurement of what nvCOMP buys.

Known gaps against the CPU decoder (documented, not silent): bytes between the end of the
deflate stream and the Adler-32 trailer are not detected on the nvCOMP path (the Adler-32 of
the pixel data still is), and a stream that inflates to fewer bytes than the image needs is
only caught by its Adler-32 when nvCOMP does not report the short size (the region is zeroed
first, so the check is deterministic: such a file passes only if its stored Adler-32 happens to
equal that of the zero-padded data).
"""

from __future__ import annotations

import math
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from iws_engine import kernels
from iws_engine.backends.base import cpu_cores
from iws_engine.loaders.cpu import DEFAULT_MAX_PIXELS, Batch, StageTimes, _label, load_clip_one, load_one, read_input
from iws_engine.loaders.png import (
    _LIBPNG_USER_LIMIT,  # libpng (PNGFiles.jl) refuses larger sides; the CPU path reports that error
    GREY,
    GREY_ALPHA,
    PALETTE,
    PngError,
    PngInfo,
    _gamma_lut_for,  # the one definition of "libpng would gamma-correct this file"
    inflate_idat,
    parse_png,
)
from iws_engine.pillow_resample import pillow_taps, vertical_first
from iws_engine.preprocess import _LUMA_SCALE, PreprocessSpec, imresize_axis_weights
from iws_engine.preprocess_clip import ClipPreprocessSpec, _normalise_table, clip_geometry

__all__ = [
    "GpuLoader", "GpuLoaderStats", "LoaderError", "BatchPlan", "TapTables", "ClipTapTables", "plan_batch",
    "cpu_fallback_reason", "clip_cpu_fallback_reason", "decode_scanlines_on_gpu",
    "UNFILTER_JOB", "RESIZE_JOB", "ADLER_JOB", "CLIP_JOB", "PILLOW_TAP",
]

# Status bits per image, set by the kernels (#defines in kernels/*.cu).
STATUS_ADLER_MISMATCH = 1
STATUS_BAD_FILTER = 2
STATUS_BAD_JOB = 4

# Descriptor layouts, mirrored field for field by the structs in kernels/*.cu (static_assert'ed sizes).
UNFILTER_JOB = np.dtype([("src_offset", "<u8"), ("dst_offset", "<u8"), ("row_bytes", "<u4"), ("height", "<u4"),
                         ("dst_pitch", "<u4"), ("filter_stride", "<u4")])
RESIZE_JOB = np.dtype([("src_offset", "<u8"), ("src_pitch", "<u4"), ("pixel_bytes", "<u4"), ("sample_bytes", "<u4"),
                       ("colour_channels", "<u4"), ("col_taps", "<u4"), ("row_taps", "<u4"), ("out_index", "<u4"),
                       ("reserved", "<u4")])
ADLER_JOB = np.dtype([("offset", "<u8"), ("length", "<u8"), ("expected", "<u4"), ("reserved", "<u4")])
CLIP_JOB = np.dtype([("src_offset", "<u8"), ("scratch_offset", "<u8"), ("src_pitch", "<u4"), ("pixel_bytes", "<u4"),
                     ("sample_bytes", "<u4"), ("source", "<u4"), ("vertical_first", "<u4"), ("first_taps", "<u4"),
                     ("second_taps", "<u4"), ("inter_first", "<u4"), ("inter_rows", "<u4"), ("inter_cols", "<u4"),
                     ("out_index", "<u4"), ("reserved", "<u4")])
PILLOW_TAP = np.dtype([("start", "<i4"), ("count", "<i4"), ("coeffs", "<u4"), ("reserved", "<u4")])

# How clip_resize.cu turns a stored pixel into RGB (#defines CLIP_SOURCE_* there).
CLIP_SOURCE_RGB = 0  # RGB, RGBA: the high byte of three samples
CLIP_SOURCE_GREY = 1  # 8-bit grey, grey+alpha: the high byte of one sample, replicated
CLIP_SOURCE_GREY16 = 2  # 16-bit grey ("I;16" in Pillow): min(sample, 255), replicated

#: Device offsets are multiples of this: adler32.cu needs 16 for its uint4 loads, 256 keeps every
#: image on its own cache lines.
DEVICE_ALIGN = 256
DEFAULT_MAX_BATCH_BYTES = 1 << 30
KERNEL_OPTIONS = ("--fmad=false", "-std=c++17")  # --fmad=false: grey_resize.cu's exactness argument
#: Compute capabilities the kernels must compile for: the paper's L40 (8.9) and the H100 (9.0).
NVRTC_ARCHITECTURES = (89, 90)


def nvrtc_options(arch: int) -> tuple[str, ...]:
    """Every option NVRTC gets when the loader compiles a kernel on a device of compute capability `arch` (90 for
    9.0): KERNEL_OPTIONS, then what cupy.RawModule appends (CuPy 14, cupy/cuda/compiler.py: -ftz=true, -arch=sm_XX
    for a cubin, --device-as-default-execution-space; --pch only under CUPY_NVRTC_USE_PCH=1). The loader asks for
    its kernels by their extern "C" names (kernels.ENTRY_POINTS): no name expressions. tests/test_nvrtc.py compiles
    every kernel with these options for each of NVRTC_ARCHITECTURES."""
    return (*KERNEL_OPTIONS, "-ftz=true", f"-arch=sm_{arch}", "--device-as-default-execution-space")

UNFILTER_THREADS = 128  # rows per wavefront band (png_unfilter.cu); 128 keeps ~70% of threads busy at 539 px
RESIZE_THREADS = 256
CLIP_THREADS = 256
ADLER_THREADS = 256  # a multiple of 32 (adler32.cu's warp reduction)


class LoaderError(RuntimeError):
    """A loader cannot run here (missing CuPy, nvCOMP or DALI, no CUDA device)."""


# --- routing and planning (host only, no GPU needed) -----------------------------------------------


def cpu_fallback_reason(info: PngInfo) -> str | None:
    """Why this image is decoded on the CPU, or None when the GPU path takes it."""
    if info.interlace:
        return "interlaced (Adam7)"
    if info.color_type == PALETTE:
        return "palette"
    if info.bit_depth < 8:
        return f"{info.bit_depth}-bit greyscale (sub-byte samples)"
    if _gamma_lut_for(info) is not None:
        return "gamma correction (gAMA without sRGB)"
    if max(info.width, info.height) > _LIBPNG_USER_LIMIT:
        return f"a side over {_LIBPNG_USER_LIMIT:,} pixels (the CPU decoder reports it)"
    if len(info.deflate) == 0:
        return "empty deflate stream (the CPU decoder reports it)"
    return None


#: CLIP spec: an image whose resized longer side would exceed this goes to Pillow (its tap table
#: would cover the whole resized axis; an aspect ratio over ~146 at S = 448, never a vignette).
CLIP_MAX_RESIZED_SIDE = 1 << 16


def clip_cpu_fallback_reason(info: PngInfo, spec: ClipPreprocessSpec | None = None) -> str | None:
    """Why this image is decoded by Pillow on the CPU under a CLIP spec, or None for the GPU path.

    Unlike `cpu_fallback_reason`, gamma correction is no reason: Pillow ignores gAMA.
    """
    if info.interlace:
        return "interlaced (Adam7)"
    if info.color_type == PALETTE:
        return "palette"
    if info.bit_depth < 8:
        return f"{info.bit_depth}-bit greyscale (sub-byte samples)"
    if len(info.deflate) == 0:
        return "empty deflate stream (Pillow decides)"
    if spec is not None and max(clip_geometry(info.width, info.height, spec)[0]) > CLIP_MAX_RESIZED_SIDE:
        return f"resized side over {CLIP_MAX_RESIZED_SIDE:,} pixels"
    return None


#: plan.cpu reason for a file the strict parser (or host zlib) rejected, under a CLIP spec.
CLIP_PARSER_REJECTED = "rejected by parse_png/zlib (Pillow decides)"


def _align(n: int, to: int = DEVICE_ALIGN) -> int:
    return (n + to - 1) // to * to


class TapTables:
    """Resize tap tables (preprocess.imresize_axis_weights) concatenated for the device.

    Keyed by (n_in, n_out, clamp); offsets stay valid until `reset`, which bumps `version`
    so that each slot re-uploads. IWS batches need two tables, so this stays tiny.
    """

    def __init__(self, max_entries: int = 1 << 20):
        self.max_entries = max_entries
        self.version = 0
        self._offsets: dict[tuple[int, int, bool], int] = {}
        self._parts: list[Any] = []
        self.total = 0

    def offset(self, n_in: int, n_out: int, clamp: bool) -> int:
        key = (n_in, n_out, bool(clamp))
        found = self._offsets.get(key)
        if found is None:
            found = self._offsets[key] = self.total
            self._parts.append(imresize_axis_weights(n_in, n_out, bool(clamp)))
            self.total += n_out
            self.version += 1
        return found

    def reset_if_full(self) -> None:
        if self.total > self.max_entries:
            self._offsets.clear()
            self._parts.clear()
            self.total = 0
            self.version += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(i0, i1) int32 and (w0, w1) float64, each `total` long."""
        if not self._parts:
            return (np.zeros(1, np.int32), np.zeros(1, np.int32), np.zeros(1, np.float64), np.zeros(1, np.float64))
        return (np.concatenate([p.i0 for p in self._parts]).astype(np.int32),
                np.concatenate([p.i1 for p in self._parts]).astype(np.int32),
                np.concatenate([p.w0 for p in self._parts]).astype(np.float64),
                np.concatenate([p.w1 for p in self._parts]).astype(np.float64))


class ClipTapTables:
    """Pillow's fixed-point taps (pillow_resample.pillow_taps) for the device, as PILLOW_TAP rows + int32 weights.

    Keyed by (n_in, n_out, first, count): only the `count` outputs from `first` that the centre crop
    keeps are stored (a 1-pixel-high image resized to 448 rows would otherwise need its whole long
    axis). Offsets stay valid until `reset_if_full`, which bumps `version` so that each slot re-uploads.
    """

    def __init__(self, max_entries: int = 1 << 22):
        self.max_entries = max_entries  # int32 weights, the bigger array
        self.version = 0
        self._offsets: dict[tuple[int, int, int, int], int] = {}
        self._rows: list[np.ndarray] = []
        self._coeffs: list[np.ndarray] = []
        self.total = 0  # rows
        self.total_coeffs = 0

    def offset(self, n_in: int, n_out: int, first: int, count: int) -> int:
        """Tap index of output `first` of this axis; outputs first .. first + count - 1 follow it."""
        key = (n_in, n_out, first, count)
        found = self._offsets.get(key)
        if found is None:
            taps = pillow_taps(n_in, n_out)
            weights = taps.weights[first:first + count]
            rows = np.zeros(count, PILLOW_TAP)
            rows["start"], rows["count"] = taps.start[first:first + count], taps.count[first:first + count]
            rows["coeffs"] = self.total_coeffs + np.arange(count, dtype=np.int64) * taps.ksize
            found = self._offsets[key] = self.total
            self._rows.append(rows)
            self._coeffs.append(np.ascontiguousarray(weights, np.int32).reshape(-1))
            self.total += count
            self.total_coeffs += weights.size
            self.version += 1
        return found

    def reset_if_full(self) -> None:
        if self.total_coeffs > self.max_entries:
            self._offsets.clear()
            self._rows.clear()
            self._coeffs.clear()
            self.total = self.total_coeffs = 0
            self.version += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(PILLOW_TAP rows as bytes, int32 weights)."""
        if not self._rows:
            return np.zeros(PILLOW_TAP.itemsize, np.uint8), np.zeros(1, np.int32)
        return np.concatenate(self._rows).view(np.uint8), np.concatenate(self._coeffs)


def clip_job(info: PngInfo, spec: ClipPreprocessSpec, taps: ClipTapTables, src_offset: int, out_index: int) -> tuple:
    """The CLIP_JOB fields of one image (scratch_offset left 0), and its intermediate's size in samples.

    Geometry as preprocess_clip.resize_and_crop; pass order as Pillow's (pillow_resample.vertical_first).
    """
    (resized_w, resized_h), (left, top) = clip_geometry(info.width, info.height, spec)
    size = spec.size
    col_first = taps.offset(info.width, resized_w, left, size)
    row_first = taps.offset(info.height, resized_h, top, size)
    sample_bytes = info.bit_depth // 8
    if info.color_type in (GREY, GREY_ALPHA):
        source = CLIP_SOURCE_GREY16 if info.color_type == GREY and sample_bytes == 2 else CLIP_SOURCE_GREY
    else:
        source = CLIP_SOURCE_RGB
    if vertical_first(info.width, info.height, resized_w, resized_h):
        lo, hi = pillow_taps(info.width, resized_w).rows_needed(left, left + size)  # source columns read
        passes, inter_rows, inter_cols = (1, row_first, col_first), size, hi - lo
    else:
        lo, hi = pillow_taps(info.height, resized_h).rows_needed(top, top + size)  # source rows read
        passes, inter_rows, inter_cols = (0, col_first, row_first), hi - lo, size
    row_bytes = info.width * info.channels * sample_bytes
    job = (src_offset, 0, row_bytes + 1, info.channels * sample_bytes, sample_bytes, source, *passes, lo,
           inter_rows, inter_cols, out_index, 0)
    return job, inter_rows * inter_cols


@dataclass
class BatchPlan:
    """Where each image of a batch goes, and the descriptors of the GPU part.

    `gpu[j]` is the batch position of the j-th GPU image; its deflate stream goes to
    compressed_offsets[j] in the staging buffer, its inflated data (filter bytes included) to
    inflated_offsets[j], and jobs row j of each descriptor array describes it.
    """

    size: int
    gpu: list[int] = field(default_factory=list)
    cpu: dict[int, str] = field(default_factory=dict)
    compressed_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    compressed_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    inflated_offsets: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    inflated_sizes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    compressed_bytes: int = 0
    inflated_bytes: int = 0
    adler_jobs: np.ndarray = field(default_factory=lambda: np.zeros(0, ADLER_JOB))
    unfilter_jobs: np.ndarray = field(default_factory=lambda: np.zeros(0, UNFILTER_JOB))
    resize_jobs: np.ndarray = field(default_factory=lambda: np.zeros(0, RESIZE_JOB))
    clip_jobs: np.ndarray = field(default_factory=lambda: np.zeros(0, CLIP_JOB))  # CLIP spec only
    scratch_bytes: int = 0  # CLIP spec: the first pass's intermediate samples (u32 each), all images
    max_intermediate: int = 0  # CLIP spec: the largest image's intermediate samples (pass 1's grid)


def plan_batch(infos: Sequence[PngInfo | None], spec: PreprocessSpec | ClipPreprocessSpec,
               taps: TapTables | ClipTapTables, *, max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES) -> BatchPlan:
    """Route each image (None = already failed) and build the GPU descriptors.

    Images are packed in order; one that would push the compressed, inflated (or, for a CLIP spec,
    scratch) total past `max_batch_bytes` goes to the CPU path instead (memory stays bounded).
    A CLIP spec takes a ClipTapTables and fills `clip_jobs`; a PreprocessSpec a TapTables and `resize_jobs`.
    """
    clip = isinstance(spec, ClipPreprocessSpec)
    taps.reset_if_full()
    plan = BatchPlan(size=len(infos))
    compressed, inflated = [], []
    adler, unfilter, resize, clips = [], [], [], []
    c_total = i_total = s_total = 0
    for k, info in enumerate(infos):
        if info is None:
            continue
        reason = clip_cpu_fallback_reason(info, spec) if clip else cpu_fallback_reason(info)
        c_size, i_size = len(info.deflate), info.raw_size
        job, s_size = None, 0
        if reason is None and clip:
            job, samples = clip_job(info, spec, taps, i_total + 1, k)
            s_size = 4 * samples
        if reason is None and (c_total + _align(c_size) > max_batch_bytes or i_total + _align(i_size) > max_batch_bytes
                               or s_total + _align(s_size) > max_batch_bytes):
            reason = f"does not fit the batch's device buffers (max_batch_bytes={max_batch_bytes})"
        if reason is not None:
            plan.cpu[k] = reason
            continue
        plan.gpu.append(k)
        compressed.append((c_total, c_size))
        inflated.append((i_total, i_size))
        row_bytes = (info.width * info.bits_per_pixel + 7) // 8
        adler.append((i_total, i_size, info.adler32, 0))
        unfilter.append((i_total, i_total + 1, row_bytes, info.height, row_bytes + 1, info.filter_stride))
        if clip:
            job = list(job)
            job[1] = s_total  # scratch_offset
            clips.append(tuple(job))
            plan.max_intermediate = max(plan.max_intermediate, s_size // 4)
            s_total += _align(s_size)
        else:
            out_h, out_w = spec.size
            sample_bytes = info.bit_depth // 8
            clamp = out_h > info.height or out_w > info.width  # Julia clamps when any axis is enlarged
            resize.append((i_total + 1, row_bytes + 1, info.channels * sample_bytes, sample_bytes,
                           1 if info.color_type in (GREY, GREY_ALPHA) else 3,
                           taps.offset(info.width, out_w, clamp), taps.offset(info.height, out_h, clamp), k, 0))
        c_total += _align(c_size)
        i_total += _align(i_size)
    if plan.gpu:
        plan.compressed_offsets, plan.compressed_sizes = (np.array(v, np.int64) for v in zip(*compressed))
        plan.inflated_offsets, plan.inflated_sizes = (np.array(v, np.int64) for v in zip(*inflated))
        plan.adler_jobs = np.array(adler, ADLER_JOB)
        plan.unfilter_jobs = np.array(unfilter, UNFILTER_JOB)
        if clip:
            plan.clip_jobs = np.array(clips, CLIP_JOB)
        else:
            plan.resize_jobs = np.array(resize, RESIZE_JOB)
    plan.compressed_bytes, plan.inflated_bytes, plan.scratch_bytes = c_total, i_total, s_total
    return plan


# --- device side -----------------------------------------------------------------------------------


def _import_cupy():
    try:
        import cupy
    except ImportError as e:
        raise LoaderError(f"the GPU loader needs CuPy ({e}); install it with: pip install cupy-cuda13x "
                          "(or the iws-engine[gpu] extra)") from None
    return cupy


def _import_nvcomp():
    try:
        from nvidia import nvcomp
    except ImportError as e:
        raise LoaderError(f"the GPU loader inflates with nvCOMP, which is not installed ({e}); install it with: "
                          "pip install 'nvidia-nvcomp-cu13==6.0.*' (5.3.0.16 next to DALI), or use "
                          "GpuLoader(inflate='host') to inflate with zlib on the CPU") from None
    return nvcomp


#: nvCOMP's ExecutionPolicy (6.x) for the inflate: "concurrency" (nvCOMP's default) suits this loader, whose
#: inflate runs on one slot's stream while the other slot's kernels and the model run; "latency" is there to be
#: measured against it on a GPU.
NVCOMP_EXECUTION_POLICIES = ("concurrency", "latency")


def nvcomp_batch_api(nvcomp) -> bool:
    """True for nvCOMP 6's Python API (one buffer carved into a `BatchArray` by offsets and sizes; decode into a
    BatchArray), False for 5.x (lists of `Array`s, one per buffer)."""
    return hasattr(nvcomp, "BatchArray")


def nvcomp_codec(nvcomp, device: int, stream_ptr: int, execution_policy: str = "concurrency"):
    """The raw-Deflate codec of one slot (its stream), for nvCOMP 5.x or 6.x."""
    if execution_policy not in NVCOMP_EXECUTION_POLICIES:
        raise ValueError(f"execution_policy must be one of {NVCOMP_EXECUTION_POLICIES}, got {execution_policy!r}")
    options: dict[str, Any] = dict(algorithm="Deflate", bitstream_kind=nvcomp.BitstreamKind.RAW, device_id=device,
                                   cuda_stream=stream_ptr)
    if hasattr(nvcomp, "ExecutionPolicy"):
        options["execution_policy"] = getattr(nvcomp.ExecutionPolicy, execution_policy.upper())
    elif execution_policy != "concurrency":
        raise LoaderError(f"execution_policy={execution_policy!r} needs nvCOMP 6 (nvidia-nvcomp-cu13==6.0.*)")
    codec = nvcomp.Codec(**options)
    alignment = codec.get_required_decompression_alignment() if hasattr(codec, "get_required_decompression_alignment") else 4
    if DEVICE_ALIGN % alignment:
        raise LoaderError(f"nvCOMP needs {alignment}-byte aligned buffers; the loader aligns to {DEVICE_ALIGN}")
    return codec


def nvcomp_inflate(nvcomp, codec, compressed, compressed_offsets: Sequence[int], compressed_sizes: Sequence[int],
                   inflated, inflated_offsets: Sequence[int], inflated_sizes: Sequence[int],
                   stream_ptr: int) -> Callable[[], list[int]]:
    """Inflate raw-Deflate streams packed in the device buffer `compressed` into their regions of `inflated`
    (each region's capacity is its size: a longer stream raises ValueError for the whole batch). Returns a function
    giving the inflated size of each stream as nvCOMP reports it: calling it waits for the decode, so the loader
    calls it when it waits for the batch anyway, not while it queues the batch's kernels."""
    if nvcomp_batch_api(nvcomp):  # 6.x: both sides are one buffer carved by an offset table
        sources = nvcomp.as_arrays(compressed, list(compressed_offsets), list(compressed_sizes), cuda_stream=stream_ptr)
        targets = nvcomp.as_arrays(inflated, list(inflated_offsets), list(inflated_sizes), cuda_stream=stream_ptr)
        decoded = codec.decode(sources, out=targets)
        return lambda: list(decoded.buffer_sizes)
    sources = [compressed[o:o + n] for o, n in zip(compressed_offsets, compressed_sizes)]  # 5.x: one Array per stream
    targets = [inflated[o:o + n] for o, n in zip(inflated_offsets, inflated_sizes)]
    results = codec.decode(nvcomp.as_arrays(sources, cuda_stream=stream_ptr), out=targets)
    return lambda: [getattr(result, "buffer_size", n) for result, n in zip(results, inflated_sizes)]


def _check_device(cupy, device: int) -> None:
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # cudaErrorInsufficientDriver / NoDevice on machines without a GPU
        raise LoaderError(f"the GPU loader needs a CUDA device, and none is usable here ({e})") from None
    if not 0 <= device < count:
        raise LoaderError(f"CUDA device {device} requested, but {count} device(s) are present")


class _Kernels:
    """The loader's kernels, compiled once per loader with NVRTC from the package's .cu sources:
    Adler-32 and unfilter, then grey_resize.cu (SAR_CNN spec) or clip_resize.cu's two passes (CLIP spec)."""

    def __init__(self, cupy, clip: bool):
        def compile_(name: str):
            return cupy.RawModule(code=kernels.source(name), options=KERNEL_OPTIONS)

        try:
            self.adler = compile_("adler32.cu").get_function("adler32_verify")
            self.unfilter = compile_("png_unfilter.cu").get_function("png_unfilter")
            if clip:
                module = compile_("clip_resize.cu")
                self.clip_first = module.get_function("clip_resample_first")
                self.clip_second = module.get_function("clip_resample_second_normalise")
            else:
                self.resize = compile_("grey_resize.cu").get_function("grey_resize_normalise")
        except Exception as e:  # CompileException carries the NVRTC log
            raise LoaderError(f"compiling the GPU loader's kernels failed: {e}") from None


class _Slot:
    """One half of the double buffer: a stream, pinned staging, device buffers, grown on demand."""

    def __init__(self, cupy, nvcomp, device: int, batch_size: int, execution_policy: str = "concurrency"):
        self.cp = cupy
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.codec = None
        if nvcomp is not None:
            self.codec = nvcomp_codec(nvcomp, device, self.stream.ptr, execution_policy)
        self.staging = np.empty(0, np.uint8)  # pinned: deflate streams (nvCOMP) or inflated data (host inflate)
        self.compressed = cupy.empty(0, cupy.uint8)
        self.inflated = cupy.empty(0, cupy.uint8)
        self.scratch = cupy.empty(0, cupy.uint8)  # CLIP spec: clip_resize.cu's intermediate samples
        self.status = cupy.zeros(batch_size, cupy.uint32)
        self.adler_computed = cupy.zeros(batch_size, cupy.uint32)
        self.status_host = self._empty_pinned(batch_size, np.uint32)
        self.taps_version = -1
        self.taps: tuple = ()

    def _empty_pinned(self, count: int, dtype) -> np.ndarray:
        """A NumPy array in page-locked memory (what cupyx.empty_pinned does), for async copies."""
        dtype = np.dtype(dtype)
        memory = self.cp.cuda.alloc_pinned_memory(max(count, 1) * dtype.itemsize)
        return np.ndarray((count,), dtype, buffer=memory)  # the array keeps `memory` alive

    def _grow(self, current, need: int, device: bool):
        if len(current) >= need:
            return current
        size = _align(int(need * 1.25) + 1, 1 << 20)  # headroom, so a slightly larger batch does not reallocate
        return self.cp.empty(size, self.cp.uint8) if device else self._empty_pinned(size, np.uint8)

    def reserve(self, staging: int, compressed: int, inflated: int, scratch: int = 0) -> None:
        self.staging = self._grow(self.staging, staging, device=False)
        self.compressed = self._grow(self.compressed, compressed, device=True)
        self.inflated = self._grow(self.inflated, inflated, device=True)
        self.scratch = self._grow(self.scratch, scratch, device=True)

    def upload_taps(self, taps: TapTables | ClipTapTables) -> None:
        if self.taps_version != taps.version:
            self.taps = tuple(self.cp.asarray(a) for a in taps.arrays())
            self.taps_version = taps.version


@dataclass
class _Parsed:
    """Host-side result of reading and parsing one item."""

    name: str
    data: bytes | None = None
    info: PngInfo | None = None
    inflated: bytes | None = None  # inflate="host": zlib's output, already Adler-32-checked
    error: str | None = None
    cpu_reason: str | None = None  # CLIP spec: the host parser (or zlib) rejected it; Pillow decides on the CPU
    read: float = 0.0
    decode: float = 0.0


@dataclass
class _InFlight:
    """A launched batch: what finishing it needs."""

    parsed: list[_Parsed]
    plan: BatchPlan
    slot: _Slot
    out: Any  # cupy array (N, C, H, W)
    cpu_futures: dict[int, Future]
    redo_on_cpu: dict[int, str]  # position -> why the device result is not trusted (known at launch)
    times: StageTimes
    keep_alive: list = field(default_factory=list)  # job arrays the kernels read until the stream is done
    nvcomp_sizes: Callable[[], list[int]] | None = None  # nvCOMP's inflated sizes, read when the batch is done


@dataclass
class GpuLoaderStats:
    """Where the images went, summed over the loader's life (a silent fall back would show here)."""

    on_gpu: int = 0  # decoded on the device
    routed_to_cpu: int = 0  # formats the GPU path does not take (see `cpu_fallback_reasons`)
    redone_on_cpu: int = 0  # flagged by the device (checksum, filter type, nvCOMP) and decoded again
    failed: int = 0
    cpu_fallback_reasons: dict[str, int] = field(default_factory=dict)
    redo_reasons: dict[str, int] = field(default_factory=dict)


def _status_reason(bits: int) -> str:
    names = [(STATUS_ADLER_MISMATCH, "Adler-32 mismatch"), (STATUS_BAD_FILTER, "invalid filter type"),
             (STATUS_BAD_JOB, "bad descriptor")]
    return "device: " + ", ".join(name for bit, name in names if bits & bit)


class GpuLoader:
    """Batches whose `inputs` is a device array (CuPy, (N, C, H, W) fp32 or fp16) in item order.

    `spec`: a PreprocessSpec (SAR_CNN, (N, 1, H, W)) or a ClipPreprocessSpec (Pipeline A's EVA02,
    (N, 3, S, S), Pillow's semantics; images the GPU path does not take are made by Pillow on the CPU).
    `host_output=True` copies each batch's inputs to a NumPy array (for a backend on the CPU).
    A batch's `inputs` is a fresh allocation, valid as long as the caller holds it.
    Device memory: two slots, each at most ~1.25 x `max_batch_bytes` for the compressed and for
    the inflated data, plus the batches' inputs; pinned host memory: the same for staging.
    `stats` counts where the images went (GPU, CPU by format, redone on the CPU).
    `nvcomp_execution_policy`: nvCOMP 6's ExecutionPolicy for the inflate ("concurrency" or "latency").
    """

    name = "gpu"

    def __init__(self, spec: PreprocessSpec | ClipPreprocessSpec, batch_size: int = 64, device: int = 0,
                 max_pixels: int = DEFAULT_MAX_PIXELS, workers: int | None = None, *,
                 inflate: str = "nvcomp", output_dtype: str = "float32", host_output: bool = False,
                 max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES, prefetch_batches: int = 2,
                 nvcomp_execution_policy: str = "concurrency"):
        if not 1 <= batch_size <= 65_535:  # grid.y of the resize kernel is the image index
            raise ValueError(f"batch_size must be within 1..65535, got {batch_size}")
        if inflate not in ("nvcomp", "host"):
            raise ValueError(f"inflate must be 'nvcomp' or 'host', got {inflate!r}")
        if output_dtype not in ("float32", "float16"):
            raise ValueError(f"output_dtype must be 'float32' or 'float16', got {output_dtype!r}")
        self._clip = isinstance(spec, ClipPreprocessSpec)
        if self._clip:
            # ClipPreprocessSpec validates itself (3 channels, NCHW, Pillow bicubic, centre crop); the
            # normalisation is a table lookup, so no float range matters on the device.
            self._item_shape: tuple[int, ...] = (3, spec.size, spec.size)
        else:
            if spec.channels != 1 or spec.layout != "NCHW":
                raise ValueError(f"the GPU loader writes 1-channel NCHW input; the spec asks for {spec.channels} "
                                 f"{spec.layout}")
            mean, std = abs(float(np.float32(spec.mean))), float(np.float32(spec.std))
            if (mean != 0.0 and mean < 2.0**-126) or std >= 2.0**86:
                # grey_resize.cu's float32 steps are exact only without subnormals (CuPy compiles with -ftz=true)
                raise ValueError(f"mean={spec.mean} / std={spec.std} would make subnormal floats on the device")
            self._item_shape = (1, *spec.size)
        self.spec = spec
        self.batch_size = batch_size
        self.device = int(device)
        self.max_pixels = max_pixels
        self.workers = workers or cpu_cores()
        self.inflate = inflate
        self.output_dtype = output_dtype
        self.host_output = host_output
        self.max_batch_bytes = max_batch_bytes
        self.prefetch_batches = max(1, prefetch_batches)
        self._cp = _import_cupy()
        self._nvcomp = _import_nvcomp() if inflate == "nvcomp" else None
        _check_device(self._cp, self.device)
        self._taps = ClipTapTables() if self._clip else TapTables()
        self.stats = GpuLoaderStats()
        with self._cp.cuda.Device(self.device):
            self._kernels = _Kernels(self._cp, self._clip)
            self._slots = [_Slot(self._cp, self._nvcomp, self.device, batch_size, nvcomp_execution_policy)
                           for _ in range(2)]
            self._clip_table = None
            if self._clip:  # preprocess_clip's own (3, 256) table, or its fp16 roundings: identical by construction
                table = _normalise_table(tuple(spec.mean), tuple(spec.std))
                self._clip_table = self._cp.asarray(np.ascontiguousarray(table.astype(output_dtype)))

    def _fallback_reason(self, info: PngInfo) -> str | None:
        return clip_cpu_fallback_reason(info, self.spec) if self._clip else cpu_fallback_reason(info)

    # ----- host stages (thread pool) -----
    def _read_and_parse(self, item, name: str) -> _Parsed:
        parsed = _Parsed(name)
        t0 = time.perf_counter()
        try:
            parsed.data = bytes(read_input(item, name))
            t1 = time.perf_counter()
            parsed.read = t1 - t0
            parsed.info = parse_png(parsed.data, path=name, max_pixels=self.max_pixels)
            if self.inflate == "host" and self._fallback_reason(parsed.info) is None:
                parsed.inflated = inflate_idat(parsed.info, path=name)
            parsed.decode = time.perf_counter() - t1
        except PngError as e:
            parsed.info, parsed.error = None, str(e)
        except MemoryError:
            parsed.info, parsed.error = None, f"{name}: out of memory while parsing"
        except Exception as e:  # a parser bug must not cost the other images their results
            parsed.info, parsed.error = None, f"{name}: internal error while parsing ({type(e).__name__}: {e})"
        if self._clip and parsed.error is not None and parsed.data is not None:
            # Pillow, not our stricter parser, is the judge of a CLIP input: it may accept the file (a bad
            # IDAT CRC or Adler-32) or reject it with its own reason, as Pipeline A's CPU loader does.
            parsed.inflated, parsed.error, parsed.cpu_reason = None, None, CLIP_PARSER_REJECTED
        return parsed

    def _decode_on_cpu(self, data: bytes, name: str) -> tuple[np.ndarray | None, str | None, StageTimes]:
        """One image by the CPU reference path: Pillow for a CLIP spec, decode_png + preprocess otherwise."""
        out = np.empty(self._item_shape, dtype=np.float32)
        try:
            if self._clip:
                return out, None, load_clip_one(data, name, self.spec, self.max_pixels, out)
            return out, None, load_one(data, name, self.spec, self.max_pixels, out[0])
        except PngError as e:
            return None, str(e), StageTimes()
        except MemoryError:
            return None, f"{name}: out of memory while decoding", StageTimes()
        except Exception as e:
            return None, f"{name}: internal error while decoding ({type(e).__name__}: {e})", StageTimes()

    @staticmethod
    def _copy_into(dst: np.ndarray, offset: int, src) -> None:
        view = memoryview(src).cast("B")
        dst[offset:offset + len(view)] = np.frombuffer(view, np.uint8)

    # ----- device stages -----
    def _launch(self, parsed: list[_Parsed], slot: _Slot, pool: ThreadPoolExecutor,
                copy_pool: ThreadPoolExecutor) -> _InFlight:
        cp = self._cp
        infos = [p.info if p.error is None and p.cpu_reason is None else None for p in parsed]
        plan = plan_batch(infos, self.spec, self._taps, max_batch_bytes=self.max_batch_bytes)
        plan.cpu.update({k: p.cpu_reason for k, p in enumerate(parsed) if p.cpu_reason is not None})
        cpu_futures = {k: pool.submit(self._decode_on_cpu, parsed[k].data, parsed[k].name) for k in plan.cpu}
        times = StageTimes()
        for p in parsed:
            times.read += p.read
            times.decode += p.decode
        redo: dict[int, str] = {}
        keep_alive: list = []
        nvcomp_sizes = None
        with cp.cuda.Device(self.device), slot.stream:
            out = cp.empty((len(parsed), *self._item_shape), dtype=self.output_dtype)
            n = len(plan.gpu)
            if n:
                host_inflate = self.inflate == "host"
                slot.reserve(plan.inflated_bytes if host_inflate else plan.compressed_bytes,
                             0 if host_inflate else plan.compressed_bytes, plan.inflated_bytes, plan.scratch_bytes)
                slot.upload_taps(self._taps)
                # Pack into pinned memory in parallel (large memcpys release the GIL), then one H2D copy.
                if host_inflate:
                    sources = [parsed[k].inflated for k in plan.gpu]
                    offsets = plan.inflated_offsets
                else:
                    sources = [parsed[k].info.deflate for k in plan.gpu]
                    offsets = plan.compressed_offsets
                list(copy_pool.map(self._copy_into, [slot.staging] * n, offsets.tolist(), sources))
                staged = plan.inflated_bytes if host_inflate else plan.compressed_bytes
                target = slot.inflated if host_inflate else slot.compressed
                target[:staged].set(slot.staging[:staged], stream=slot.stream)
                slot.status[:n].fill(0)
                if not host_inflate:
                    failed, nvcomp_sizes = self._inflate_with_nvcomp(plan, slot)
                    redo.update(failed)
                if len(redo) < n:
                    keep_alive = self._run_kernels(plan, slot, out)
                slot.status[:n].get(stream=slot.stream, out=slot.status_host[:n])
        return _InFlight(parsed, plan, slot, out, cpu_futures, redo, times, keep_alive, nvcomp_sizes)

    def _inflate_with_nvcomp(self, plan: BatchPlan, slot: _Slot) -> tuple[dict[int, str], Callable | None]:
        """Batched raw-Deflate inflate into each image's region: (positions to redo on the CPU because nvCOMP
        failed the batch, the function giving the inflated sizes (None then))."""
        slot.inflated[:plan.inflated_bytes].fill(0)  # a short stream leaves zeros, never stale data
        try:
            sizes = nvcomp_inflate(self._nvcomp, slot.codec, slot.compressed, plan.compressed_offsets.tolist(),
                                   plan.compressed_sizes.tolist(), slot.inflated, plan.inflated_offsets.tolist(),
                                   plan.inflated_sizes.tolist(), slot.stream.ptr)
        except Exception as e:  # e.g. a stream longer than its image (ValueError) or a corrupt one
            # Visible, not silent: a systematic failure here would send every image to the CPU.
            warnings.warn(f"nvCOMP could not inflate a batch ({type(e).__name__}: {e}); "
                          f"its {len(plan.gpu)} GPU images are decoded on the CPU instead", RuntimeWarning, stacklevel=2)
            return {k: f"nvCOMP failed the batch ({type(e).__name__})" for k in plan.gpu}, None
        return {}, sizes

    @staticmethod
    def _short_streams(plan: BatchPlan, sizes: Callable[[], list[int]]) -> dict[int, str]:
        """Positions whose stream nvCOMP inflated to another size than the image's (read once the batch is done)."""
        try:
            reported = sizes()
        except Exception as e:  # an error nvCOMP reports only when its results are read
            warnings.warn(f"nvCOMP could not inflate a batch ({type(e).__name__}: {e}); "
                          f"its {len(plan.gpu)} GPU images are decoded on the CPU instead", RuntimeWarning, stacklevel=3)
            return {k: f"nvCOMP failed the batch ({type(e).__name__})" for k in plan.gpu}
        return {k: f"nvCOMP inflated {size} bytes, the image needs {expected}"
                for k, expected, size in zip(plan.gpu, plan.inflated_sizes.tolist(), reported) if size != expected}

    def _run_kernels(self, plan: BatchPlan, slot: _Slot, out) -> list:
        """Adler-32 check, unfilter in place, resize into `out`; returns the job arrays to keep alive."""
        cp, compiled, stream = self._cp, self._kernels, slot.stream
        n = len(plan.gpu)
        count = np.uint32(n)
        adler_jobs = cp.asarray(plan.adler_jobs.view(np.uint8))
        unfilter_jobs = cp.asarray(plan.unfilter_jobs.view(np.uint8))
        # Adler-32 first: it covers the filtered bytes, which the unfilter overwrites in place.
        compiled.adler((n,), (ADLER_THREADS,), (adler_jobs, slot.inflated, slot.status, slot.adler_computed, count),
                      stream=stream)
        compiled.unfilter((n,), (UNFILTER_THREADS,), (unfilter_jobs, slot.inflated, slot.inflated, slot.status, count),
                         stream=stream)
        if self._clip:
            clip_jobs = cp.asarray(plan.clip_jobs.view(np.uint8))
            taps, coeffs = slot.taps
            size = self.spec.size
            compiled.clip_first((math.ceil(plan.max_intermediate / CLIP_THREADS), n), (CLIP_THREADS,),
                                (clip_jobs, count, slot.inflated, taps, coeffs, slot.scratch), stream=stream)
            compiled.clip_second((math.ceil(size * size / CLIP_THREADS), n), (CLIP_THREADS,),
                                 (clip_jobs, count, slot.scratch, taps, coeffs, self._clip_table, out,
                                  np.int32(self.output_dtype == "float16"), np.uint32(size)), stream=stream)
            return [adler_jobs, unfilter_jobs, clip_jobs]
        resize_jobs = cp.asarray(plan.resize_jobs.view(np.uint8))
        h, w = self.spec.size
        i0, i1, w0, w1 = slot.taps
        grid = (math.ceil(h * w / RESIZE_THREADS), n)
        compiled.resize(grid, (RESIZE_THREADS,),
                       (resize_jobs, count, slot.inflated, i0, i1, w0, w1, out,
                        np.int32(self.output_dtype == "float16"), np.uint32(h), np.uint32(w),
                        np.float32(self.spec.mean), np.float32(self.spec.std), _LUMA_SCALE),
                       stream=stream)
        return [adler_jobs, unfilter_jobs, resize_jobs]

    def _finish(self, flight: _InFlight, pool: ThreadPoolExecutor) -> Batch:
        """Wait for the device, redo flagged images on the CPU, fill CPU rows, compact to the ok rows."""
        cp, plan, slot, out = self._cp, flight.plan, flight.slot, flight.out
        errors = {k: p.error for k, p in enumerate(flight.parsed) if p.error is not None}
        t0 = time.perf_counter()
        slot.stream.synchronize()
        waited = time.perf_counter() - t0
        redo = dict(flight.redo_on_cpu)
        if flight.nvcomp_sizes is not None:
            redo.update(self._short_streams(plan, flight.nvcomp_sizes))
        status = slot.status_host[:len(plan.gpu)]
        for j, k in enumerate(plan.gpu):
            if status[j] and k not in redo:
                redo[k] = _status_reason(int(status[j]))
        ok = [k for k in plan.gpu if k not in redo]
        self._count(plan, redo)
        futures = dict(flight.cpu_futures)
        futures.update({k: pool.submit(self._decode_on_cpu, flight.parsed[k].data, flight.parsed[k].name) for k in redo})
        with cp.cuda.Device(self.device), slot.stream:
            for k, future in futures.items():
                pixels, error, t = future.result()
                flight.times.add(t)
                if error is not None:
                    errors[k] = error
                    continue
                out[k].set(pixels.astype(self.output_dtype, copy=False), stream=slot.stream)
                ok.append(k)
            ok.sort()
            self.stats.failed += len(flight.parsed) - len(ok)
            if len(ok) == len(flight.parsed):
                inputs = out
            elif ok:
                inputs = out[cp.asarray(np.array(ok, np.int64))]
            else:
                inputs = out[:0]
            if self.host_output:
                inputs = inputs.get(stream=slot.stream)
            slot.stream.synchronize()  # the caller may read `inputs` on any stream
        flight.times.preprocess += waited  # wall seconds blocked on the device (not CPU seconds)
        flight.keep_alive.clear()
        return Batch(items=[p.name for p in flight.parsed], inputs=inputs, ok=ok, errors=errors, times=flight.times)

    def _count(self, plan: BatchPlan, redo: dict[int, str]) -> None:
        stats = self.stats
        stats.on_gpu += len(plan.gpu) - len(redo)
        stats.routed_to_cpu += len(plan.cpu)
        stats.redone_on_cpu += len(redo)
        for reason in plan.cpu.values():
            stats.cpu_fallback_reasons[reason] = stats.cpu_fallback_reasons.get(reason, 0) + 1
        for reason in redo.values():
            stats.redo_reasons[reason] = stats.redo_reasons.get(reason, 0) + 1

    # ----- the loader protocol -----
    def batches(self, items: Iterable[str | Path | bytes]) -> Iterator[Batch]:
        """Batches in input order. Batch k is handed over while batch k+1 runs on the device."""
        # Two pools: packing into pinned memory must not queue behind the read-ahead.
        with ThreadPoolExecutor(self.workers, thread_name_prefix="iws-gpu-host") as pool, \
                ThreadPoolExecutor(min(4, self.workers), thread_name_prefix="iws-gpu-pack") as copy_pool:
            source = iter(items)
            index = 0
            ahead: deque[list[Future]] = deque()

            def submit_ahead() -> None:
                nonlocal index
                while len(ahead) < self.prefetch_batches:
                    chunk = []
                    for item in source:
                        chunk.append(pool.submit(self._read_and_parse, item, _label(item, index)))
                        index += 1
                        if len(chunk) == self.batch_size:
                            break
                    if not chunk:
                        return
                    ahead.append(chunk)

            submit_ahead()
            in_flight: _InFlight | None = None
            turn = 0
            while ahead:
                parsed = [f.result() for f in ahead.popleft()]
                submit_ahead()
                launched = self._launch(parsed, self._slots[turn], pool, copy_pool)
                turn ^= 1
                if in_flight is not None:
                    yield self._finish(in_flight, pool)
                in_flight = launched
            if in_flight is not None:
                yield self._finish(in_flight, pool)


def decode_scanlines_on_gpu(datas: Sequence[bytes], *, device: int = 0) -> list[np.ndarray]:
    """Unfilter each (non-interlaced) PNG on the GPU; returns its unfiltered scanlines (H, row_bytes).

    zlib inflates on the host: this exercises png_unfilter.cu alone, for tests and debugging.
    """
    if not datas:
        return []
    cp = _import_cupy()
    _check_device(cp, device)
    infos = [parse_png(d) for d in datas]
    raws = [inflate_idat(info) for info in infos]
    offsets = np.cumsum([0] + [_align(len(r)) for r in raws])
    staging = np.zeros(int(offsets[-1]) or 1, np.uint8)
    jobs = np.zeros(len(infos), UNFILTER_JOB)
    for j, (info, raw) in enumerate(zip(infos, raws)):
        if info.interlace:
            raise ValueError("decode_scanlines_on_gpu takes non-interlaced images only")
        staging[offsets[j]:offsets[j] + len(raw)] = np.frombuffer(raw, np.uint8)
        row_bytes = (info.width * info.bits_per_pixel + 7) // 8
        jobs[j] = (offsets[j], offsets[j] + 1, row_bytes, info.height, row_bytes + 1, info.filter_stride)
    with cp.cuda.Device(device):
        kernel = cp.RawModule(code=kernels.source("png_unfilter.cu"), options=KERNEL_OPTIONS).get_function("png_unfilter")
        buffer = cp.asarray(staging)
        status = cp.zeros(max(len(infos), 1), cp.uint32)
        kernel((len(infos),), (UNFILTER_THREADS,), (cp.asarray(jobs.view(np.uint8)), buffer, buffer, status,
                                                     np.uint32(len(infos))))
        host, flags = buffer.get(), status.get()
    results = []
    for j, (info, job) in enumerate(zip(infos, jobs)):
        if flags[j]:
            raise PngError(f"device status {int(flags[j]):#x}")
        rows = host[int(job["src_offset"]):int(job["src_offset"]) + info.raw_size].reshape(info.height, -1)
        results.append(rows[:, 1:].copy())
    return results
