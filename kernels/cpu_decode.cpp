// The CPU decode core (Python module iws_engine.kernels._cpu_decode, wrapped by engine/loaders/native.py):
// inflate -> filter check -> grey detection -> unfilter -> Julia imresize + Gray + normalise, for non-interlaced
// 8/16-bit PNGs, writing the model input straight into the caller's plane (float32, or it rounded to float16 or
// bfloat16 for backends that take those). Also the chunk walk of parse_png (scan_chunks: framing, CRC-32, the IDAT
// bodies joined). The GIL is released while it works, so the CPU loader's decode threads run on every core.
//
// Unfiltering one row is a chain per byte lane (each byte needs its left neighbour): one row at a time is
// latency-bound. Rows sharing a filter type are unfiltered together as a wavefront (unfilter_band: each row one
// pixel behind the row above), 8 or 16 rows' chains in the int16 lanes of SSE2 vectors.
//
// One source for the arithmetic: the per-byte filter reconstruction is kernels/png_filter_math.cuh and the
// per-pixel resize/grey/normalise arithmetic kernels/julia_resize_math.cuh, the same headers the CUDA kernels
// include. The NumPy reference (engine/preprocess.py) is the spec; tests/test_native_decode.py checks bit equality.
//
// Grey detection on the *filtered* bytes: PNG filters work per byte lane with one filter type per row, and the
// reconstruction of a lane reads only that lane. So when, in every row, the R, G and B samples of every pixel are
// identical in the filtered stream, they are identical after unfiltering too, and unfiltering the R lane alone
// gives the whole image (a quarter of the work for RGBA16). Any difference anywhere takes the full path.
//
// Every input is untrusted (this file is fuzzed, tests/fuzz/): sizes are checked against each other before any
// memory is touched; a stream that does not inflate to exactly the expected size with a matching Adler-32 is
// reported, not decoded, and the Python side then names the precise reason with zlib.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/tuple.h>

#include "julia_resize_math.cuh"
#include "png_filter_math.cuh"

#if defined(__SSE2__) && defined(__x86_64__)  // every x86-64 CPU
#include <emmintrin.h>
#define IWS_ROW_PARALLEL_UNFILTER 1
#else
#define IWS_ROW_PARALLEL_UNFILTER 0
#endif

#if IWS_HAVE_LIBDEFLATE
#include <libdeflate.h>
#else
#include <zlib.h>
#endif

namespace nb = nanobind;

namespace {

// Status codes returned to engine/loaders/native.py (mirrored there as STATUS_*).
enum Status : int {
    kGreyLanes = 0,      // decoded; only the grey lane(s) were unfiltered
    kFull = 1,           // decoded; every byte was unfiltered
    kInflateFailed = 2,  // the stream did not inflate to exactly raw_size bytes with the stored Adler-32
    kBadFilter = 3,      // a row's filter type is > 4 (detail: row, value)
    kBadShape = 4,       // inconsistent arguments (a caller bug, never a property of the file)
};

constexpr int kGrey = 0, kRgb = 2, kGreyAlpha = 4, kRgba = 6;

// A growable buffer that is never shrunk or zero-filled: each decode thread keeps its own (thread_local), so the
// hot path allocates nothing once warm.
struct Buffer {
    std::unique_ptr<uint8_t[]> data;
    size_t size = 0;
    uint8_t* get(size_t n) {
        if (n > size) {
            data.reset(new uint8_t[n]);
            size = n;
        }
        return data.get();
    }
};

// The output element types of decode_preprocess: the float32 model input, or it rounded to nearest-even as
// float16 (NumPy's astype(np.float16)) or bfloat16 (torch's .to(torch.bfloat16)), for backends that take those.
enum OutFormat : int { kFloat32 = 0, kFloat16 = 1, kBfloat16 = 2 };

inline uint32_t float_bits(float v) {
    uint32_t f;
    std::memcpy(&f, &v, 4);
    return f;
}

// float32 -> IEEE binary16 bits, round half to even; overflow -> inf, NaN stays NaN (NumPy's
// npy_floatbits_to_halfbits, step for step).
inline uint16_t float16_bits(float v) {
    const uint32_t f = float_bits(v);
    const uint16_t sign = (uint16_t)((f & 0x80000000u) >> 16);
    uint32_t f_exp = f & 0x7f800000u, f_sig = f & 0x007fffffu;
    if (f_exp >= 0x47800000u) {  // overflow, inf or NaN
        if (f_exp == 0x7f800000u && f_sig != 0) {
            uint16_t nan = (uint16_t)(0x7c00u + (f_sig >> 13));
            return (uint16_t)(sign + (nan == 0x7c00u ? nan + 1 : nan));
        }
        return (uint16_t)(sign + 0x7c00u);
    }
    if (f_exp <= 0x38000000u) {  // a subnormal half or a signed zero
        if (f_exp < 0x33000000u) return sign;
        f_exp >>= 23;
        f_sig = 0x00800000u + f_sig;
        f_sig >>= (113 - f_exp);
        if ((f_sig & 0x00003fffu) != 0x00001000u || (f & 0x000007ffu)) f_sig += 0x00001000u;
        return (uint16_t)(sign + (uint16_t)(f_sig >> 13));
    }
    const uint16_t h_exp = (uint16_t)((f_exp - 0x38000000u) >> 13);
    if ((f_sig & 0x00003fffu) != 0x00001000u) f_sig += 0x00001000u;
    return (uint16_t)(sign + (uint16_t)(h_exp + (uint16_t)(f_sig >> 13)));  // a carry may reach inf: correct
}

// float32 -> bfloat16 bits, round half to even; NaN -> 0x7fc0 (c10::BFloat16's round_to_nearest_even).
inline uint16_t bfloat16_bits(float v) {
    if (v != v) return 0x7fc0u;
    const uint32_t f = float_bits(v);
    return (uint16_t)((f + (((f >> 16) & 1u) + 0x7fffu)) >> 16);
}

// iws_code_to_unit of every code 0..peak (it is the same division whatever the image: a table computed once
// replaces a division per tap, the resize's largest cost).
const double* unit_table(unsigned peak_code) {
    static const std::vector<double> tables[2] = {
        [] { std::vector<double> t(256); for (unsigned c = 0; c < 256; ++c) t[c] = iws_code_to_unit(c, 255.0); return t; }(),
        [] { std::vector<double> t(65536); for (unsigned c = 0; c < 65536; ++c) t[c] = iws_code_to_unit(c, 65535.0); return t; }(),
    };
    return tables[peak_code == 255u ? 0 : 1].data();
}

// iws_normalise of every grey code for one (peak, mean, std), kept per thread: a batch shares its spec.
struct NormaliseTable {
    unsigned peak_code = 0;
    uint32_t mean_bits = 0, std_bits = 0;
    std::vector<float> values;
    const float* get(unsigned peak, float mean, float std_dev) {
        if (values.empty() || peak != peak_code || float_bits(mean) != mean_bits || float_bits(std_dev) != std_bits) {
            values.resize((size_t)peak + 1);
            for (unsigned g = 0; g <= peak; ++g) values[g] = iws_normalise(g, peak, mean, std_dev);
            peak_code = peak;
            mean_bits = float_bits(mean);
            std_bits = float_bits(std_dev);
        }
        return values.data();
    }
};

struct ThreadState {
    Buffer raw;       // inflated scanlines (filter bytes included)
    Buffer pixels;    // unfiltered samples
    Buffer rows;      // two horizontally resized rows (doubles)
    NormaliseTable normalise;
#if IWS_HAVE_LIBDEFLATE
    libdeflate_decompressor* inflater = nullptr;
    ~ThreadState() {
        if (inflater) libdeflate_free_decompressor(inflater);
    }
#endif
};

ThreadState& thread_state() {
    thread_local ThreadState state;
    return state;
}

uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t n) {
#if IWS_HAVE_LIBDEFLATE
    return libdeflate_crc32(crc, data, n);
#else
    while (n > 0) {  // zlib takes uInt lengths
        const uInt step = n > (1u << 30) ? (1u << 30) : (uInt)n;
        crc = (uint32_t)::crc32(crc, data, step);
        data += step;
        n -= step;
    }
    return crc;
#endif
}

uint32_t adler32_of(const uint8_t* data, size_t n) {
#if IWS_HAVE_LIBDEFLATE
    return libdeflate_adler32(1, data, n);
#else
    uLong a = ::adler32(0L, Z_NULL, 0);
    while (n > 0) {
        const uInt step = n > (1u << 30) ? (1u << 30) : (uInt)n;
        a = ::adler32(a, data, step);
        data += step;
        n -= step;
    }
    return (uint32_t)a;
#endif
}

// Raw deflate `in` -> exactly `need` bytes at `out`, the whole input consumed. False on any other outcome.
bool inflate_exact(ThreadState& st, const uint8_t* in, size_t in_size, uint8_t* out, size_t need) {
#if IWS_HAVE_LIBDEFLATE
    if (!st.inflater) st.inflater = libdeflate_alloc_decompressor();
    if (!st.inflater) return false;
    size_t in_used = 0, out_made = 0;
    const libdeflate_result r =
        libdeflate_deflate_decompress_ex(st.inflater, in, in_size, out, need, &in_used, &out_made);
    return r == LIBDEFLATE_SUCCESS && in_used == in_size && out_made == need;
#else
    (void)st;
    if (in_size > 0xffffffffu || need > 0xffffffffu) return false;  // zlib counts in uInt
    z_stream z;
    std::memset(&z, 0, sizeof z);
    if (inflateInit2(&z, -15) != Z_OK) return false;
    z.next_in = const_cast<Bytef*>(in);
    z.avail_in = (uInt)in_size;
    z.next_out = out;
    z.avail_out = (uInt)need;
    const int r = inflate(&z, Z_FINISH);  // everything at once: Z_STREAM_END only if the stream ended in `need`
    const bool ok = r == Z_STREAM_END && z.avail_in == 0 && z.avail_out == 0;
    inflateEnd(&z);
    return ok;
#endif
}

// R == G == B in every pixel of every row of the filtered stream: one load per pixel (BPP bytes, little-endian), the
// R sample compared with G and G with B by one shift and xor (SB = bytes per sample); for 4- and 8-byte pixels 16
// bytes at a time with SSE2.
template <size_t BPP, size_t SB>
bool filtered_lanes_grey_t(const uint8_t* raw, size_t height, size_t row_bytes) {
    const size_t width = row_bytes / BPP;
    constexpr uint64_t rgb_mask = SB == 2 ? 0xffffffffull : 0xffffull;  // R^G and G^B, alpha excluded
    for (size_t y = 0; y < height; ++y) {
        const uint8_t* p = raw + y * (row_bytes + 1) + 1;
        uint64_t diff = 0;
        size_t x = 0;
#if IWS_ROW_PARALLEL_UNFILTER
        if (16 % BPP == 0) {  // RGBA8, RGBA16: 16 bytes at a time, each byte xor the one a sample further, masked
            alignas(16) uint8_t mask_bytes[16];
            for (size_t i = 0; i < 16; ++i) mask_bytes[i] = i % BPP < 2 * SB ? 0xff : 0;
            const __m128i mask = _mm_load_si128(reinterpret_cast<const __m128i*>(mask_bytes));
            __m128i acc = _mm_setzero_si128();
            for (; (x + 16 / BPP) * BPP + SB <= row_bytes; x += 16 / BPP) {  // the shifted load stays in the row
                const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + x * BPP));
                const __m128i next = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p + x * BPP + SB));
                acc = _mm_or_si128(acc, _mm_and_si128(_mm_xor_si128(v, next), mask));
            }
            diff = (uint64_t)_mm_movemask_epi8(_mm_cmpeq_epi8(acc, _mm_setzero_si128())) ^ 0xffffu;
        }
#endif
        for (; x < width; ++x) {
            uint64_t v = 0;
            std::memcpy(&v, p + x * BPP, BPP);
            diff |= (v ^ (v >> (8 * SB))) & rgb_mask;
        }
        if (diff) return false;
    }
    return true;
}

bool filtered_lanes_grey(const uint8_t* raw, size_t height, size_t row_bytes, size_t bpp) {
    switch (bpp) {  // RGB8, RGBA8, RGB16, RGBA16
        case 3: return filtered_lanes_grey_t<3, 1>(raw, height, row_bytes);
        case 4: return filtered_lanes_grey_t<4, 1>(raw, height, row_bytes);
        case 6: return filtered_lanes_grey_t<6, 2>(raw, height, row_bytes);
        case 8: return filtered_lanes_grey_t<8, 2>(raw, height, row_bytes);
        default: return false;
    }
}

// Unfilter one row of LANES bytes per pixel, taken from pixels of `src_stride` bytes in the filtered row and written
// compactly (LANES bytes per pixel) to `out`; `prev` is the previous output row (nullptr for row 0). The filter type
// and the lane count are template parameters, so each loop inlines its own predictor from png_filter_math.cuh and
// keeps the left (a) and upper-left (c) bytes of every lane in registers: the LANES chains run interleaved.
template <unsigned FILTER, size_t LANES>
void unfilter_row_t(const uint8_t* src, size_t src_stride, size_t width, const uint8_t* prev, uint8_t* out) {
    unsigned a[LANES] = {}, c[LANES] = {};
    if (!prev) {  // above the first row everything is 0: Up = None, Average = Sub/2, Paeth = Sub
        for (size_t x = 0; x < width; ++x, src += src_stride, out += LANES)
#pragma GCC unroll 8
            for (size_t k = 0; k < LANES; ++k) a[k] = out[k] = (uint8_t)iws_unfilter_byte(FILTER, src[k], a[k], 0u, 0u);
        return;
    }
    for (size_t x = 0; x < width; ++x, src += src_stride, out += LANES, prev += LANES) {
#pragma GCC unroll 8
        for (size_t k = 0; k < LANES; ++k) {
            const unsigned b = prev[k];
            a[k] = out[k] = (uint8_t)iws_unfilter_byte(FILTER, src[k], a[k], b, c[k]);
            c[k] = b;
        }
    }
}

template <size_t LANES>
void unfilter_row_lanes(unsigned filter, const uint8_t* src, size_t src_stride, size_t width, const uint8_t* prev,
                        uint8_t* out) {
    switch (filter) {
        case IWS_FILTER_NONE:
            if (src_stride == LANES) {
                std::memcpy(out, src, width * LANES);
                return;
            }
            unfilter_row_t<IWS_FILTER_NONE, LANES>(src, src_stride, width, prev, out);
            return;
        case IWS_FILTER_SUB: unfilter_row_t<IWS_FILTER_SUB, LANES>(src, src_stride, width, prev, out); return;
        case IWS_FILTER_UP: unfilter_row_t<IWS_FILTER_UP, LANES>(src, src_stride, width, prev, out); return;
        case IWS_FILTER_AVERAGE: unfilter_row_t<IWS_FILTER_AVERAGE, LANES>(src, src_stride, width, prev, out); return;
        default: unfilter_row_t<IWS_FILTER_PAETH, LANES>(src, src_stride, width, prev, out); return;
    }
}

void unfilter_row(unsigned filter, const uint8_t* src, size_t src_stride, size_t lanes, size_t width,
                  const uint8_t* prev, uint8_t* out) {
    switch (lanes) {  // the pixel sizes PNG has (1 also for sub-byte depths)
        case 1: unfilter_row_lanes<1>(filter, src, src_stride, width, prev, out); return;
        case 2: unfilter_row_lanes<2>(filter, src, src_stride, width, prev, out); return;
        case 3: unfilter_row_lanes<3>(filter, src, src_stride, width, prev, out); return;
        case 4: unfilter_row_lanes<4>(filter, src, src_stride, width, prev, out); return;
        case 6: unfilter_row_lanes<6>(filter, src, src_stride, width, prev, out); return;
        default: unfilter_row_lanes<8>(filter, src, src_stride, width, prev, out); return;
    }
}

// First row whose filter byte is > 4, or -1.
long first_bad_filter(const uint8_t* raw, size_t height, size_t row_bytes) {
    for (size_t y = 0; y < height; ++y)
        if (raw[y * (row_bytes + 1)] > 4) return (long)y;
    return -1;
}

#if IWS_ROW_PARALLEL_UNFILTER
// Row-parallel unfilter of the pixels' LANES bytes (1 to 8; 1 or 2 are the hot path: a grey image, or the grey
// lanes of an R=G=B one).
// Each byte lane of a row is a chain (a pixel needs its left neighbour), so one row at a time is latency-bound.
// Rows sharing a filter type are processed together as a wavefront: row r of a band runs one pixel behind row
// r - 1, so at each step every row's up (b) and up-left (c) bytes are what the row above produced in the previous
// two steps. The 16 int16 lanes of two SSE2 vectors hold the byte lanes of R = 16 / LANES rows (lane r*LANES + k =
// byte k of row r; 16 / 3 and 16 / 6 leave lanes unused) and iws_unfilter_byte_t (png_filter_math.cuh) runs on them
// as on ints.
using I16x8 = int16_t __attribute__((vector_size(16)));

template <size_t LANES>
struct RowBand {
    static constexpr size_t kRows = 16 / LANES;
    const uint8_t* src;    // filtered bytes of the band's first row (after its filter byte)
    uint8_t* dst;          // unfiltered output of the band's first row (LANES bytes per pixel)
    const uint8_t* above;  // the unfiltered row above the band, nullptr above the first row
    size_t rows, width, src_stride;
    size_t src_skew;  // src_row_pitch - src_stride: row r's pixel t - r is at src + t * src_stride + r * src_skew
    size_t dst_skew;  // dst_row_pitch - LANES, likewise for dst
};

// Lane l of a band (of 16) is byte l % LANES of row l / LANES; lanes past the band's rows are unused.
template <size_t LANES>
constexpr bool lane_used(size_t l) {
    return l / LANES < RowBand<LANES>::kRows;
}

// The 16 filtered bytes of step t (pixel t - r of row r) as int16 lanes; rows outside the image (pixel < 0 or
// >= width, or r >= rows) give 0. CHECKED = false: every row is inside (the band's steady state).
template <size_t LANES, bool CHECKED>
inline void gather_step(const RowBand<LANES>& band, size_t t, __m128i& lo, __m128i& hi) {
    const uint8_t* p = band.src + t * band.src_stride;
    auto inside = [&](size_t r) { return !CHECKED || (r < band.rows && t - r < band.width); };  // t - r wraps below 0
    uint16_t w[8];  // word j: lanes 2j, 2j + 1
#pragma GCC unroll 8
    for (size_t j = 0; j < 8; ++j) {
        uint16_t v = 0;
        if (LANES % 2 == 0) {  // both bytes from one row: one 2-byte load
            const size_t r = 2 * j / LANES, k = 2 * j % LANES;
            if (lane_used<LANES>(2 * j) && inside(r)) std::memcpy(&v, p + r * band.src_skew + k, 2);
        } else {
#pragma GCC unroll 2
            for (size_t h = 0; h < 2; ++h) {
                const size_t l = 2 * j + h, r = l / LANES, k = l % LANES;
                if (lane_used<LANES>(l) && inside(r)) v |= (uint16_t)(p[r * band.src_skew + k] << (8 * h));
            }
        }
        w[j] = v;
    }
    const __m128i words = _mm_set_epi16((short)w[7], (short)w[6], (short)w[5], (short)w[4], (short)w[3], (short)w[2],
                                        (short)w[1], (short)w[0]);
    const __m128i zero = _mm_setzero_si128();
    lo = _mm_unpacklo_epi8(words, zero);
    hi = _mm_unpackhi_epi8(words, zero);
}

template <size_t LANES, bool CHECKED>
inline void scatter_step(const RowBand<LANES>& band, size_t t, __m128i lo, __m128i hi) {
    const __m128i packed = _mm_packus_epi16(lo, hi);  // lane i -> byte i (values are 0..255)
    const uint64_t half[2] = {(uint64_t)_mm_cvtsi128_si64(packed),
                              (uint64_t)_mm_cvtsi128_si64(_mm_unpackhi_epi64(packed, packed))};
    uint8_t* p = band.dst + t * LANES;
    auto inside = [&](size_t r) { return !CHECKED || (r < band.rows && t - r < band.width); };
#pragma GCC unroll 16
    for (size_t l = 0; l < 16; l += (LANES % 2 == 0 ? 2 : 1)) {
        const size_t r = l / LANES, k = l % LANES;
        if (!lane_used<LANES>(l) || !inside(r)) continue;
        const uint64_t bits = half[l / 8] >> (8 * (l % 8));
        if (LANES % 2 == 0) {
            const uint16_t v = (uint16_t)bits;
            std::memcpy(p + r * band.dst_skew + k, &v, 2);
        } else {
            p[r * band.dst_skew + k] = (uint8_t)bits;
        }
    }
}

template <unsigned FILTER, size_t LANES>
void unfilter_band(const RowBand<LANES>& band) {
    constexpr size_t kRows = RowBand<LANES>::kRows;
    // Rows that have not started (step t < r) stay 0: their inputs are all 0, and so is every predictor of zeros.
    __m128i out_lo = _mm_setzero_si128(), out_hi = out_lo;  // the previous step's output: a, and b one row down
    __m128i b_lo = out_lo, b_hi = out_lo;                   // the previous step's b: c
    const size_t steps = band.width + band.rows - 1;
    auto step = [&](size_t t, auto checked) {
        constexpr bool kChecked = decltype(checked)::value;
        __m128i x_lo, x_hi;
        gather_step<LANES, kChecked>(band, t, x_lo, x_hi);
        uint64_t up = 0;  // row 0's b: the row above the band at pixel t, its LANES bytes in lanes 0..LANES-1
        if (band.above && (!kChecked || t < band.width)) std::memcpy(&up, band.above + t * LANES, LANES);
        const __m128i up_lanes = _mm_unpacklo_epi8(_mm_cvtsi64_si128((long long)up), _mm_setzero_si128());
        const __m128i nb_lo = _mm_or_si128(_mm_slli_si128(out_lo, 2 * LANES), up_lanes);
        const __m128i nb_hi = _mm_or_si128(_mm_slli_si128(out_hi, 2 * LANES), _mm_srli_si128(out_lo, 16 - 2 * LANES));
        I16x8 lo = iws_unfilter_byte_t<I16x8>(FILTER, (I16x8)x_lo, (I16x8)out_lo, (I16x8)nb_lo, (I16x8)b_lo);
        I16x8 hi = iws_unfilter_byte_t<I16x8>(FILTER, (I16x8)x_hi, (I16x8)out_hi, (I16x8)nb_hi, (I16x8)b_hi);
        out_lo = (__m128i)lo;
        out_hi = (__m128i)hi;
        b_lo = nb_lo;
        b_hi = nb_hi;
        scatter_step<LANES, kChecked>(band, t, out_lo, out_hi);
    };
    size_t t = 0;
    if (band.rows == kRows && band.width >= kRows) {
        for (; t < kRows - 1; ++t) step(t, std::true_type{});
        for (; t < band.width; ++t) step(t, std::false_type{});
    }
    for (; t < steps; ++t) step(t, std::true_type{});
}

template <size_t LANES>
void unfilter_band_dispatch(unsigned filter, const RowBand<LANES>& band) {
    switch (filter) {
        case IWS_FILTER_NONE: unfilter_band<IWS_FILTER_NONE, LANES>(band); return;
        case IWS_FILTER_SUB: unfilter_band<IWS_FILTER_SUB, LANES>(band); return;
        case IWS_FILTER_UP: unfilter_band<IWS_FILTER_UP, LANES>(band); return;
        case IWS_FILTER_AVERAGE: unfilter_band<IWS_FILTER_AVERAGE, LANES>(band); return;
        default: unfilter_band<IWS_FILTER_PAETH, LANES>(band); return;
    }
}

// unfilter_image with the band loop: bands of up to 16 / LANES consecutive rows with one filter type.
template <size_t LANES>
void unfilter_image_banded(const uint8_t* raw, size_t height, size_t row_bytes, size_t stride, uint8_t* pixels) {
    RowBand<LANES> band;
    band.width = row_bytes / stride;
    band.src_stride = stride;
    const size_t pitch = band.width * LANES;
    band.src_skew = row_bytes + 1 - stride;
    band.dst_skew = pitch - LANES;
    for (size_t y = 0; y < height;) {
        const unsigned filter = raw[y * (row_bytes + 1)];
        size_t n = 1;
        while (n < RowBand<LANES>::kRows && y + n < height && raw[(y + n) * (row_bytes + 1)] == filter) ++n;
        const uint8_t* prev = y ? pixels + (y - 1) * pitch : nullptr;
        if (n == 1) {  // a lone row: the plain row loop
            unfilter_row(filter, raw + y * (row_bytes + 1) + 1, stride, LANES, band.width, prev, pixels + y * pitch);
        } else {
            band.src = raw + y * (row_bytes + 1) + 1;
            band.dst = pixels + y * pitch;
            band.above = prev;
            band.rows = n;
            unfilter_band_dispatch<LANES>(filter, band);
        }
        y += n;
    }
}
#endif

// All rows: filtered `raw` (filter byte + row_bytes per row) -> `pixels`, `lanes` of every `stride` bytes kept.
void unfilter_image(const uint8_t* raw, size_t height, size_t row_bytes, size_t stride, size_t lanes,
                    uint8_t* pixels) {
#if IWS_ROW_PARALLEL_UNFILTER
    switch (lanes) {
        case 1: return unfilter_image_banded<1>(raw, height, row_bytes, stride, pixels);
        case 2: return unfilter_image_banded<2>(raw, height, row_bytes, stride, pixels);
        case 3: return unfilter_image_banded<3>(raw, height, row_bytes, stride, pixels);
        case 4: return unfilter_image_banded<4>(raw, height, row_bytes, stride, pixels);
        case 6: return unfilter_image_banded<6>(raw, height, row_bytes, stride, pixels);
        case 8: return unfilter_image_banded<8>(raw, height, row_bytes, stride, pixels);
        default: break;
    }
#endif
    const size_t width = row_bytes / stride;
    const size_t pitch = width * lanes;
    for (size_t y = 0; y < height; ++y) {
        const uint8_t* row = raw + y * (row_bytes + 1);
        unfilter_row(row[0], row + 1, stride, lanes, width, y ? pixels + (y - 1) * pitch : nullptr,
                     pixels + y * pitch);
    }
}

inline unsigned sample_at(const uint8_t* p, size_t sb) { return sb == 2 ? (unsigned)p[0] << 8 | p[1] : p[0]; }

using I64Array = nb::ndarray<const int64_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using F64Array = nb::ndarray<const double, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using OutPlane = nb::ndarray<nb::ndim<2>, nb::c_contig, nb::device::cpu>;
using Bytes = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using BytesOut = nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

struct Taps {
    const int64_t* i0;
    const int64_t* i1;
    const double* w0;
    const double* w1;
    size_t n;
};

bool taps_valid(const Taps& t, size_t n_in) {
    for (size_t i = 0; i < t.n; ++i)
        if (t.i0[i] < 0 || t.i1[i] < 0 || (size_t)t.i0[i] >= n_in || (size_t)t.i1[i] >= n_in) return false;
    return true;
}

// Julia imresize (+ Gray + normalise) of unfiltered samples: `channels` colour channels (1 or 3) at byte offsets
// k * sb within pixels of `pixel_bytes`, rows `pitch` bytes apart; out(i, v) stores output element i.
template <typename Store>
void resize_grey_normalise(const uint8_t* pixels, size_t h_in, size_t w_in, size_t pitch, size_t pixel_bytes,
                           size_t sb, size_t channels, const Taps& cols, const Taps& rows, const float* normalised,
                           Buffer& scratch, Store out) {
    const size_t h_out = rows.n, w_out = cols.n;
    const unsigned peak_code = sb == 2 ? 65535u : 255u;
    const double peak = (double)peak_code;
    const double* unit = unit_table(peak_code);
    const float luma_scale = 0.001f;  // preprocess._LUMA_SCALE
    auto grey_of = [&](const unsigned* codes) {
        return channels == 1 ? codes[0] : iws_luma_grey(codes[0], codes[1], codes[2], luma_scale);
    };
    if (h_in == h_out && w_in == w_out) {  // julia_imresize returns the codes unchanged
        for (size_t y = 0; y < h_out; ++y)
            for (size_t x = 0; x < w_out; ++x) {
                unsigned codes[3];
                for (size_t c = 0; c < channels; ++c)
                    codes[c] = sample_at(pixels + y * pitch + x * pixel_bytes + c * sb, sb);
                out(y * w_out + x, normalised[std::min(grey_of(codes), peak_code)]);
            }
        return;
    }
    // The horizontal pass of a source row (w_out x channels doubles), for the two rows an output row needs; output
    // rows read source rows in non-decreasing order, so two slots hold everything.
    double* slot[2];
    double* base = reinterpret_cast<double*>(scratch.get(2 * w_out * channels * sizeof(double)));
    slot[0] = base;
    slot[1] = base + w_out * channels;
    long held[2] = {-1, -1};
    auto horizontal = [&](long y, long keep) -> const double* {
        if (held[0] == y) return slot[0];
        if (held[1] == y) return slot[1];
        const int victim = held[0] == keep ? 1 : held[1] == keep ? 0 : (held[0] < held[1] ? 0 : 1);
        double* dst = slot[victim];
        const uint8_t* src = pixels + (size_t)y * pitch;
        if (channels == 1 && sb == 2) {  // the hot case (grey lanes of 16-bit images), its loads specialised
            for (size_t x = 0; x < w_out; ++x) {
                const uint8_t* p0 = src + (size_t)cols.i0[x] * pixel_bytes;
                const uint8_t* p1 = src + (size_t)cols.i1[x] * pixel_bytes;
                dst[x] = iws_two_tap(cols.w0[x], unit[(unsigned)p0[0] << 8 | p0[1]], cols.w1[x],
                                     unit[(unsigned)p1[0] << 8 | p1[1]]);
            }
        } else {
            for (size_t x = 0; x < w_out; ++x) {
                const uint8_t* p0 = src + (size_t)cols.i0[x] * pixel_bytes;
                const uint8_t* p1 = src + (size_t)cols.i1[x] * pixel_bytes;
                for (size_t c = 0; c < channels; ++c)
                    dst[x * channels + c] = iws_two_tap(cols.w0[x], unit[sample_at(p0 + c * sb, sb)], cols.w1[x],
                                                        unit[sample_at(p1 + c * sb, sb)]);
            }
        }
        held[victim] = y;
        return dst;
    };
    for (size_t y = 0; y < h_out; ++y) {
        const long y0 = (long)rows.i0[y], y1 = (long)rows.i1[y];
        const double* top = horizontal(y0, y1);
        const double* bottom = horizontal(y1, y0);
        const double rw0 = rows.w0[y], rw1 = rows.w1[y];
        const size_t row = y * w_out;
        if (channels == 1) {
            for (size_t x = 0; x < w_out; ++x)
                out(row + x, normalised[std::min(iws_unit_to_code(iws_two_tap(rw0, top[x], rw1, bottom[x]), peak), peak_code)]);
            continue;
        }
        for (size_t x = 0; x < w_out; ++x) {
            unsigned codes[3];
            for (size_t c = 0; c < channels; ++c)
                codes[c] = iws_unit_to_code(iws_two_tap(rw0, top[x * channels + c], rw1, bottom[x * channels + c]), peak);
            out(row + x, normalised[std::min(grey_of(codes), peak_code)]);
        }
    }
}

// data: the raw deflate stream (is_raw false) or the inflated scanlines (is_raw true).
// Returns (status, detail0, detail1): for kBadFilter (row, filter value).
std::tuple<int, long, long> decode_preprocess(Bytes data, bool is_raw, uint32_t adler32, size_t width, size_t height,
                                              int bit_depth, int color_type, I64Array col_i0, I64Array col_i1,
                                              F64Array col_w0, F64Array col_w1, I64Array row_i0, I64Array row_i1,
                                              F64Array row_w0, F64Array row_w1, float mean, float std_dev,
                                              OutPlane out, bool force_full, int out_format) {
    size_t channels_stored;
    switch (color_type) {
        case kGrey: channels_stored = 1; break;
        case kGreyAlpha: channels_stored = 2; break;
        case kRgb: channels_stored = 3; break;
        case kRgba: channels_stored = 4; break;
        default: return {kBadShape, 0, 0};
    }
    if ((bit_depth != 8 && bit_depth != 16) || width == 0 || height == 0 || width > (1u << 31) ||
        height > (1u << 31))
        return {kBadShape, 0, 0};
    const Taps cols{col_i0.data(), col_i1.data(), col_w0.data(), col_w1.data(), col_i0.shape(0)};
    const Taps rows{row_i0.data(), row_i1.data(), row_w0.data(), row_w1.data(), row_i0.shape(0)};
    if (col_i1.shape(0) != cols.n || col_w0.shape(0) != cols.n || col_w1.shape(0) != cols.n ||
        row_i1.shape(0) != rows.n || row_w0.shape(0) != rows.n || row_w1.shape(0) != rows.n ||
        out.shape(0) != rows.n || out.shape(1) != cols.n || rows.n == 0 || cols.n == 0 || !taps_valid(cols, width) ||
        !taps_valid(rows, height))
        return {kBadShape, 0, 0};
    const bool out_ok = out_format == kFloat32   ? out.dtype() == nb::dtype<float>()
                        : out_format == kFloat16 ? out.dtype() == nb::dlpack::dtype{(uint8_t)nb::dlpack::dtype_code::Float, 16, 1}
                        : out_format == kBfloat16 && out.dtype() == nb::dtype<uint16_t>();
    if (!out_ok) return {kBadShape, 0, 0};
    const size_t sb = (size_t)bit_depth / 8;
    const size_t bpp = channels_stored * sb;
    const size_t row_bytes = width * bpp;
    if (row_bytes / bpp != width || height > SIZE_MAX / (row_bytes + 1)) return {kBadShape, 0, 0};
    const size_t raw_size = height * (row_bytes + 1);
    if (is_raw && data.shape(0) != raw_size) return {kBadShape, 0, 0};

    const uint8_t* in = data.data();
    const size_t in_size = data.shape(0);
    void* dst = out.data();
    nb::gil_scoped_release unlocked;
    ThreadState& st = thread_state();
    const uint8_t* raw = in;
    if (!is_raw) {
        uint8_t* buf = st.raw.get(raw_size);
        if (!inflate_exact(st, in, in_size, buf, raw_size)) return {kInflateFailed, 0, 0};
        if (adler32_of(buf, raw_size) != adler32)
            return {kInflateFailed, 0, 0};
        raw = buf;
    }
    const long bad = first_bad_filter(raw, height, row_bytes);
    if (bad >= 0) return {kBadFilter, bad, (long)raw[(size_t)bad * (row_bytes + 1)]};

    // The channels that reach grey: 1 (grey, grey+alpha, or R of an R=G=B image) or 3 (R, G, B).
    bool lanes_only = channels_stored <= 2;
    if (!lanes_only && !force_full) lanes_only = filtered_lanes_grey(raw, height, row_bytes, bpp);
    const size_t lanes = lanes_only ? sb : bpp;
    uint8_t* pixels = st.pixels.get(height * width * lanes);
    unfilter_image(raw, height, row_bytes, bpp, lanes, pixels);
    const float* normalised = st.normalise.get(sb == 2 ? 65535u : 255u, mean, std_dev);
    auto resize = [&](auto store) {
        resize_grey_normalise(pixels, height, width, width * lanes, lanes, sb, lanes_only ? 1 : 3, cols, rows,
                              normalised, st.rows, store);
    };
    if (out_format == kFloat32)
        resize([dst = static_cast<float*>(dst)](size_t i, float v) { dst[i] = v; });
    else if (out_format == kFloat16)
        resize([dst = static_cast<uint16_t*>(dst)](size_t i, float v) { dst[i] = float16_bits(v); });
    else
        resize([dst = static_cast<uint16_t*>(dst)](size_t i, float v) { dst[i] = bfloat16_bits(v); });
    return {lanes_only ? kGreyLanes : kFull, 0, 0};
}

// Unfilter the rows of one (sub-)image for the general decoder (engine/loaders/png.py): `raw` holds height rows of
// filter byte + row_bytes, `out` receives height * row_bytes unfiltered bytes. Returns (status, row, value).
std::tuple<int, long, long> unfilter(Bytes raw, size_t height, size_t row_bytes, size_t stride, BytesOut out) {
    if ((stride != 1 && stride != 2 && stride != 3 && stride != 4 && stride != 6 && stride != 8) || row_bytes % stride || row_bytes == 0 || height == 0 ||
        height > SIZE_MAX / (row_bytes + 1) || raw.shape(0) < height * (row_bytes + 1) ||
        out.shape(0) < height * row_bytes)
        return {kBadShape, 0, 0};
    const uint8_t* src = raw.data();
    uint8_t* dst = out.data();
    nb::gil_scoped_release unlocked;
    const long bad = first_bad_filter(src, height, row_bytes);
    if (bad >= 0) return {kBadFilter, bad, (long)src[(size_t)bad * (row_bytes + 1)]};
    unfilter_image(src, height, row_bytes, stride, stride, dst);
    return {kFull, 0, 0};
}

// Raw deflate -> exactly out.shape(0) bytes with the given Adler-32; False on any other outcome.
bool inflate_into(Bytes data, uint32_t adler32, BytesOut out) {
    const uint8_t* in = data.data();
    const size_t in_size = data.shape(0), need = out.shape(0);
    uint8_t* dst = out.data();
    nb::gil_scoped_release unlocked;
    ThreadState& st = thread_state();
    return inflate_exact(st, in, in_size, dst, need) && adler32_of(dst, need) == adler32;
}

// The chunk walk of engine/loaders/png.py:parse_png, from byte `pos`: each chunk's framing (header present, type
// of ASCII letters, length <= 2^31 - 1, body and CRC inside the file) and, when verify_crc, its CRC-32 are checked
// here, and each run of consecutive IDAT chunks is gathered into one bytes object. Returns (records, stop): one
// (pos, length, type, idat) per chunk in file order, a run of IDATs as one record (its first chunk's position, idat
// the joined bodies; None for other chunks), through IEND; or up to the first chunk that fails a check, which is
// left out, `stop` being its position, for parse_png's Python walk to report in its own words. The rules on what
// the chunks contain stay in Python: this only takes the per-chunk loop and the copy of ~2 MB off the interpreter.
nb::tuple scan_chunks(Bytes data, size_t pos, bool verify_crc) {
    struct Record {
        size_t pos, length, first, count;  // first/count: the chunks of an IDAT run
        uint32_t type;
    };
    struct Chunk {
        size_t body, length;
    };
    constexpr uint32_t kIdat = 0x49444154u, kIend = 0x49454e44u;
    const uint8_t* p = data.data();
    const size_t size = data.shape(0);
    std::vector<Record> records;
    std::vector<Chunk> idat_chunks;
    size_t stop = pos;
    {
        nb::gil_scoped_release unlocked;
        auto be32 = [&](size_t at) {
            return (uint32_t)p[at] << 24 | (uint32_t)p[at + 1] << 16 | (uint32_t)p[at + 2] << 8 | p[at + 3];
        };
        auto letter = [](uint8_t c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); };
        while (pos <= size && size - pos >= 8) {
            const size_t length = be32(pos);
            if (!letter(p[pos + 4]) || !letter(p[pos + 5]) || !letter(p[pos + 6]) || !letter(p[pos + 7]) ||
                length > 0x7fffffffu || size - pos - 8 < length + 4)
                break;
            const uint32_t type = be32(pos + 4);
            if (verify_crc && crc32_update(crc32_update(0, p + pos + 4, 4), p + pos + 8, length) !=
                                  be32(pos + 8 + length))
                break;
            if (type == kIdat && !records.empty() && records.back().type == kIdat) {
                records.back().length += length;
                records.back().count += 1;
            } else {
                records.push_back({pos, length, idat_chunks.size(), type == kIdat ? 1u : 0u, type});
            }
            if (type == kIdat) idat_chunks.push_back({pos + 8, length});
            pos += 12 + length;
            if (type == kIend) break;
        }
        stop = pos;
    }
    std::vector<nb::object> runs;  // one bytes object per IDAT run, filled without the GIL
    std::vector<uint8_t*> run_data;
    for (const Record& r : records) {
        if (r.type != kIdat) continue;
        PyObject* bytes = PyBytes_FromStringAndSize(nullptr, (Py_ssize_t)r.length);
        if (!bytes) throw nb::python_error();
        runs.push_back(nb::steal(bytes));
        run_data.push_back(reinterpret_cast<uint8_t*>(PyBytes_AS_STRING(bytes)));
    }
    {
        nb::gil_scoped_release unlocked;
        size_t k = 0;
        for (const Record& r : records) {
            if (r.type != kIdat) continue;
            uint8_t* dst = run_data[k++];
            for (size_t c = r.first; c < r.first + r.count; ++c) {
                std::memcpy(dst, p + idat_chunks[c].body, idat_chunks[c].length);
                dst += idat_chunks[c].length;
            }
        }
    }
    nb::list out;
    size_t k = 0;
    for (const Record& r : records) {
        const char name[4] = {(char)(r.type >> 24), (char)(r.type >> 16), (char)(r.type >> 8), (char)r.type};
        out.append(nb::make_tuple(r.pos, r.length, nb::bytes(name, 4), r.type == kIdat ? runs[k++] : nb::none()));
    }
    return nb::make_tuple(out, stop);
}

// float32 values -> float16 or bfloat16 bits (the rounding decode_preprocess applies), for the inputs that take
// the general decoder and NumPy's reference preprocessing. False for mismatched arguments.
bool round_float32(nb::ndarray<const float, nb::ndim<1>, nb::c_contig, nb::device::cpu> values,
                   nb::ndarray<uint16_t, nb::ndim<1>, nb::c_contig, nb::device::cpu> out, int out_format) {
    const size_t n = values.shape(0);
    if (out.shape(0) != n || (out_format != kFloat16 && out_format != kBfloat16)) return false;
    const float* src = values.data();
    uint16_t* dst = out.data();
    nb::gil_scoped_release unlocked;
    if (out_format == kFloat16)
        for (size_t i = 0; i < n; ++i) dst[i] = float16_bits(src[i]);
    else
        for (size_t i = 0; i < n; ++i) dst[i] = bfloat16_bits(src[i]);
    return true;
}

uint32_t crc32(Bytes data, uint32_t value) {
    const uint8_t* p = data.data();
    const size_t n = data.shape(0);
    nb::gil_scoped_release unlocked;
    return crc32_update(value, p, n);
}

}  // namespace

// kernels/png_decode_general.cpp: the general decoder (every depth, colour type and Adam7), same module.
void iws_register_general_decode(nb::module_& m);

NB_MODULE(_cpu_decode, m) {
    m.doc() = "Native CPU PNG decode core for the IWS preprocessing spec (see kernels/cpu_decode.cpp).";
    m.attr("INFLATER") = IWS_HAVE_LIBDEFLATE ? "libdeflate" : "zlib";
    m.attr("OUT_FLOAT32") = (int)kFloat32;
    m.attr("OUT_FLOAT16") = (int)kFloat16;
    m.attr("OUT_BFLOAT16") = (int)kBfloat16;
    m.attr("STATUS_GREY_LANES") = (int)kGreyLanes;
    m.attr("STATUS_FULL") = (int)kFull;
    m.attr("STATUS_INFLATE_FAILED") = (int)kInflateFailed;
    m.attr("STATUS_BAD_FILTER") = (int)kBadFilter;
    m.attr("STATUS_BAD_SHAPE") = (int)kBadShape;
    m.def("decode_preprocess", &decode_preprocess, nb::arg("data"), nb::arg("is_raw"), nb::arg("adler32"),
          nb::arg("width"), nb::arg("height"), nb::arg("bit_depth"), nb::arg("color_type"), nb::arg("col_i0"),
          nb::arg("col_i1"), nb::arg("col_w0"), nb::arg("col_w1"), nb::arg("row_i0"), nb::arg("row_i1"),
          nb::arg("row_w0"), nb::arg("row_w1"), nb::arg("mean"), nb::arg("std"), nb::arg("out"),
          nb::arg("force_full") = false, nb::arg("out_format") = (int)kFloat32);
    m.def("unfilter", &unfilter, nb::arg("raw"), nb::arg("height"), nb::arg("row_bytes"), nb::arg("stride"),
          nb::arg("out"));
    m.def("inflate_into", &inflate_into, nb::arg("data"), nb::arg("adler32"), nb::arg("out"));
    m.def("scan_chunks", &scan_chunks, nb::arg("data"), nb::arg("pos"), nb::arg("verify_crc"));
    m.def("round_float32", &round_float32, nb::arg("values"), nb::arg("out"), nb::arg("out_format"));
    m.def("crc32", &crc32, nb::arg("data"), nb::arg("value") = 0);
    iws_register_general_decode(m);
}
