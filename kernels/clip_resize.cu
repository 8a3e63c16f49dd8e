// Unfiltered PNG scanlines -> Pipeline A's EVA02 input (N, 3, S, S), bit for bit as
// engine/preprocess_clip.py's Pillow reference makes it:
//
//   Image.open(f).convert("RGB") -> resize(shorter edge, Image.BICUBIC) -> centre crop S x S -> /255 -> CLIP mean/std
//
// Integer arithmetic only, so exactness is a matter of doing the same operations, not of rounding:
//
// 1. Pillow's RGB conversion, per source sample: 8-bit samples as stored; 16-bit colour and
//    grey+alpha samples by their high byte (the first, big-endian); 16-bit grey (Pillow's "I;16")
//    clamped at 255; grey replicated to R, G and B; alpha never read.
// 2. Pillow's ImagingResample for 8-bit images, two separable passes. Each output byte is
//        clip8((1 << 21) + sum_k sample[start + k] * tap[k]),   clip8(s) = clamp(s >> 22, 0, 255)
//    with 32-bit sums (the taps' positive part is below 1.25 * 2^22, so |s| < 2^31: no overflow).
//    The taps are *inputs*: the host computes them once per axis (engine/pillow_resample.py's
//    pillow_taps: Pillow's precompute_coeffs in double precision + normalize_coeffs_8bpc), the
//    same integers the NumPy transcription uses. The first pass writes 8-bit RGB into a scratch
//    buffer (packed R | G << 8 | B << 16 in one u32), exactly like Pillow's intermediate image.
//    Pass order: horizontal first, except where Pillow >= 13 runs the vertical pass first (the
//    host decides per image, `vertical_first`). An axis Pillow does not resample has identity taps.
// 3. Only what the centre crop keeps is computed: the second pass for the S x S kept outputs, the
//    first pass for the intermediate samples those read (Pillow itself computes only the rows its
//    vertical pass reads; every intermediate byte depends on one source line, so restricting the
//    range changes no value).
// 4. ToTensor + Normalize: a lookup in a 3 x 256 table computed on the host by preprocess_clip's
//    own float32 expression (fp32 values, or their fp16 roundings), so it is identical by construction.
//
// Mapping: grid.y = image; grid.x * blockDim.x covers the image's first-pass samples (pass 1) or
// its S x S outputs (pass 2); one thread per sample/output computes all three channels.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define CLIP_PRECISION_BITS 22
// How a source pixel becomes RGB (engine/loaders/gpu.py's CLIP_SOURCE_*).
#define CLIP_SOURCE_RGB 0u     // RGB or RGBA: three samples, alpha ignored
#define CLIP_SOURCE_GREY 1u    // 8-bit grey, or grey+alpha (8 or 16 bits): one sample, replicated
#define CLIP_SOURCE_GREY16 2u  // 16-bit grey without alpha: Pillow's "I;16" -> "RGB" clamps at 255

struct ClipJob {
    u64 src_offset;      // byte offset of row 0's first sample in `pixels` (unfiltered scanlines)
    u64 scratch_offset;  // byte offset of this image's intermediate samples in `scratch` (a multiple of 4)
    u32 src_pitch;       // bytes from one source row to the next
    u32 pixel_bytes;     // bytes per stored pixel, alpha included
    u32 sample_bytes;    // 1 or 2 (16-bit samples are big-endian)
    u32 source;          // CLIP_SOURCE_*
    u32 vertical_first;  // 0: horizontal pass first (scratch rows = source rows), 1: vertical first
    u32 first_taps;      // tap index of the first pass's output for crop position 0
    u32 second_taps;     // tap index of the second pass's output for crop position 0
    u32 inter_first;     // first source row (horizontal first) or column (vertical first) in scratch
    u32 inter_rows;      // scratch rows: source rows read (horizontal first) or S (vertical first)
    u32 inter_cols;      // scratch columns: S (horizontal first) or source columns read (vertical first)
    u32 out_index;       // image index in the output batch
    u32 reserved;
};
static_assert(sizeof(ClipJob) == 64, "ClipJob layout is mirrored by CLIP_JOB in engine/loaders/gpu.py");

struct PillowTap {
    int start;   // first input read
    int count;   // inputs read
    u32 coeffs;  // index of the first fixed-point weight in `coeffs`
    u32 reserved;
};
static_assert(sizeof(PillowTap) == 16, "PillowTap layout is mirrored by PILLOW_TAP in engine/loaders/gpu.py");

__device__ __forceinline__ u32 clip8(int sum) {
    const int v = sum >> CLIP_PRECISION_BITS;  // arithmetic shift, as Pillow's clip8 table index
    return (u32)min(max(v, 0), 255);
}

__device__ __forceinline__ u32 pack_rgb(u32 r, u32 g, u32 b) { return r | (g << 8) | (b << 16); }

// Pass 1: Pillow-converted source pixels -> packed 8-bit RGB intermediate samples.
extern "C" __global__ void clip_resample_first(
    const ClipJob* __restrict__ jobs, u32 n_jobs, const u8* __restrict__ pixels,
    const PillowTap* __restrict__ taps, const int* __restrict__ coeffs, u32* __restrict__ scratch) {
    const u32 image = blockIdx.y;
    if (image >= n_jobs) return;
    const ClipJob job = jobs[image];
    const u64 sample = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (sample >= (u64)job.inter_rows * job.inter_cols) return;
    const u32 i = (u32)(sample / job.inter_cols);
    const u32 j = (u32)(sample % job.inter_cols);

    // Horizontal first: scratch (i, j) = source row inter_first + i filtered along the row for crop column j.
    // Vertical first:   scratch (i, j) = source column inter_first + j filtered down the column for crop row i.
    const bool vertical = job.vertical_first != 0;
    const PillowTap tap = taps[job.first_taps + (vertical ? i : j)];
    const u64 tap_stride = vertical ? job.src_pitch : job.pixel_bytes;
    const u64 other_stride = vertical ? job.pixel_bytes : job.src_pitch;
    const u32 other = job.inter_first + (vertical ? j : i);
    const u8* p = pixels + job.src_offset + (u64)other * other_stride + (u64)tap.start * tap_stride;
    const int* k = coeffs + tap.coeffs;

    const int bias = 1 << (CLIP_PRECISION_BITS - 1);
    u32 packed;
    if (job.source == CLIP_SOURCE_RGB) {
        const u32 g = job.sample_bytes, b = 2 * job.sample_bytes;  // high bytes of the G and B samples
        int s0 = bias, s1 = bias, s2 = bias;
        for (int t = 0; t < tap.count; ++t, p += tap_stride) {
            s0 += (int)p[0] * k[t];
            s1 += (int)p[g] * k[t];
            s2 += (int)p[b] * k[t];
        }
        packed = pack_rgb(clip8(s0), clip8(s1), clip8(s2));
    } else {
        const bool saturate = job.source == CLIP_SOURCE_GREY16;
        int s = bias;
        for (int t = 0; t < tap.count; ++t, p += tap_stride) {
            const int v = saturate ? min(((int)p[0] << 8) | (int)p[1], 255) : (int)p[0];
            s += v * k[t];
        }
        const u32 grey = clip8(s);  // R = G = B: one sum serves the three channels
        packed = pack_rgb(grey, grey, grey);
    }
    scratch[job.scratch_offset / 4 + sample] = packed;
}

__device__ __forceinline__ u16 table_half(const void* table, u32 index) { return ((const u16*)table)[index]; }
__device__ __forceinline__ float table_float(const void* table, u32 index) { return ((const float*)table)[index]; }

// Pass 2: intermediate samples -> the S x S crop, normalised through the table, (3, S, S) per image.
extern "C" __global__ void clip_resample_second_normalise(
    const ClipJob* __restrict__ jobs, u32 n_jobs, const u32* __restrict__ scratch,
    const PillowTap* __restrict__ taps, const int* __restrict__ coeffs, const void* __restrict__ table,
    void* __restrict__ out, int out_fp16, u32 out_size) {
    const u32 image = blockIdx.y;
    const u32 pixel = blockIdx.x * blockDim.x + threadIdx.x;
    if (image >= n_jobs || pixel >= out_size * out_size) return;
    const ClipJob job = jobs[image];
    const u32 y = pixel / out_size;
    const u32 x = pixel % out_size;

    // Horizontal first: filter scratch column x down the rows; vertical first: filter scratch row y along it.
    const bool vertical = job.vertical_first != 0;
    const PillowTap tap = taps[job.second_taps + (vertical ? x : y)];
    const u64 tap_stride = vertical ? 1u : job.inter_cols;
    const u64 first = (u64)(u32)(tap.start - (int)job.inter_first);
    const u32* cell = scratch + job.scratch_offset / 4
                      + (vertical ? (u64)y * job.inter_cols + first : first * job.inter_cols + x);
    const int* k = coeffs + tap.coeffs;

    const int bias = 1 << (CLIP_PRECISION_BITS - 1);
    int s0 = bias, s1 = bias, s2 = bias;
    for (int t = 0; t < tap.count; ++t, cell += tap_stride) {
        const u32 v = *cell;
        s0 += (int)(v & 0xffu) * k[t];
        s1 += (int)((v >> 8) & 0xffu) * k[t];
        s2 += (int)((v >> 16) & 0xffu) * k[t];
    }
    const u32 r = clip8(s0), g = clip8(s1), b = clip8(s2);

    const u64 plane = (u64)out_size * out_size;
    const u64 index = (u64)job.out_index * 3 * plane + (u64)y * out_size + x;
    if (out_fp16) {
        u16* o = (u16*)out;
        o[index] = table_half(table, r);
        o[index + plane] = table_half(table, 256 + g);
        o[index + 2 * plane] = table_half(table, 512 + b);
    } else {
        float* o = (float*)out;
        o[index] = table_float(table, r);
        o[index + plane] = table_float(table, 256 + g);
        o[index + 2 * plane] = table_float(table, 512 + b);
    }
}
