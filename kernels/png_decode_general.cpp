// The general PNG decoder's native half (engine/loaders/png.py, decode_parsed): inflated scanlines -> the decoded
// (H, W, C) sample array, for every bit depth (1/2/4/8/16), colour type (0/2/3/4/6) and both interlace methods.
// It unfilters each (Adam7 sub-)image row by row, then scatters the row into the output, unpacking sub-byte samples
// and applying the colour handling png.py defines: 1/2/4-bit grey scaled to 8 bits (x255/x85/x17), palette indices
// expanded through a 256-entry RGB(A) table, a grey/RGB tRNS key turned into an alpha channel, and a gamma table on
// the colour samples. png.py builds those tables (libpng's rules live there, once); this file only applies them.
//
// One source for the arithmetic: the per-byte filter reconstruction is kernels/png_filter_math.cuh, as for the hot
// path (kernels/cpu_decode.cpp) and the CUDA kernel. The NumPy unfilter in png.py is the spec; tests/test_png.py and
// tests/test_native_decode.py check this file against it bit for bit. Compiled into the same module as
// cpu_decode.cpp, which calls iws_register_general_decode from its NB_MODULE.
//
// Every input is untrusted (fuzzed, tests/fuzz/): sizes are checked against each other before memory is touched,
// and the GIL is released while it works.

#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>

#include "png_filter_math.cuh"

namespace nb = nanobind;

namespace {

using GeneralBytes = nb::ndarray<const uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using GeneralBytesOut = nb::ndarray<uint8_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;
using GeneralU16 = nb::ndarray<const uint16_t, nb::ndim<1>, nb::c_contig, nb::device::cpu>;

// Adam7 passes as (x0, y0, dx, dy); a plain image is the single pass (0, 0, 1, 1).
constexpr size_t kAdam7[7][4] = {{0, 0, 8, 8}, {4, 0, 8, 8}, {0, 4, 4, 8}, {2, 0, 4, 4},
                                 {0, 2, 2, 4}, {1, 0, 2, 2}, {0, 1, 1, 2}};
constexpr size_t kPlain[1][4] = {{0, 0, 1, 1}};

size_t pass_extent(size_t size, size_t start, size_t step) {
    return size > start ? (size - start + step - 1) / step : 0;
}

// One row of BPP-byte pixels (BPP = 1 also for sub-byte depths): the filter type and pixel size are template
// parameters, so the predictor from png_filter_math.cuh inlines and the BPP byte chains run interleaved.
template <unsigned FILTER, size_t BPP>
void unfilter_row_general_t(const uint8_t* src, size_t row_bytes, const uint8_t* prev, uint8_t* out) {
    unsigned a[BPP] = {}, c[BPP] = {};
    for (size_t i = 0; i < row_bytes; i += BPP) {
        for (size_t k = 0; k < BPP; ++k) {
            const unsigned b = prev[i + k];
            a[k] = out[i + k] = (uint8_t)iws_unfilter_byte(FILTER, src[i + k], a[k], b, c[k]);
            c[k] = b;
        }
    }
}

template <size_t BPP>
void unfilter_row_general_bpp(unsigned filter, const uint8_t* src, size_t row_bytes, const uint8_t* prev,
                              uint8_t* out) {
    switch (filter) {
        case IWS_FILTER_NONE: std::memcpy(out, src, row_bytes); return;
        case IWS_FILTER_SUB: unfilter_row_general_t<IWS_FILTER_SUB, BPP>(src, row_bytes, prev, out); return;
        case IWS_FILTER_UP: unfilter_row_general_t<IWS_FILTER_UP, BPP>(src, row_bytes, prev, out); return;
        case IWS_FILTER_AVERAGE: unfilter_row_general_t<IWS_FILTER_AVERAGE, BPP>(src, row_bytes, prev, out); return;
        default: unfilter_row_general_t<IWS_FILTER_PAETH, BPP>(src, row_bytes, prev, out); return;
    }
}

// `prev` is the previous unfiltered row of the same (sub-)image, all zeros for its first row.
void unfilter_row_general(unsigned filter, size_t bpp, const uint8_t* src, size_t row_bytes, const uint8_t* prev,
                          uint8_t* out) {
    switch (bpp) {  // row_bytes is a multiple of bpp for every PNG format
        case 1: unfilter_row_general_bpp<1>(filter, src, row_bytes, prev, out); return;
        case 2: unfilter_row_general_bpp<2>(filter, src, row_bytes, prev, out); return;
        case 3: unfilter_row_general_bpp<3>(filter, src, row_bytes, prev, out); return;
        case 4: unfilter_row_general_bpp<4>(filter, src, row_bytes, prev, out); return;
        case 6: unfilter_row_general_bpp<6>(filter, src, row_bytes, prev, out); return;
        default: unfilter_row_general_bpp<8>(filter, src, row_bytes, prev, out); return;
    }
}

// What the output holds and how an unfiltered row becomes output pixels.
struct Layout {
    size_t width = 0, height = 0;
    int bit_depth = 0, color_type = 0;
    size_t channels = 0;      // samples per stored pixel (1 for a palette index)
    size_t out_channels = 0;  // samples per output pixel
    size_t colour = 0;        // leading output channels the gamma table applies to
    const uint8_t* palette = nullptr;  // 256 * out_channels entries, palette images only
    const uint16_t* trns_key = nullptr;  // `channels` values, grey/RGB with tRNS only
    const uint16_t* gamma = nullptr;     // 256 (8-bit and below) or 65536 (16-bit) entries, or none
};

// Sample k of a sub-byte row (depth 1, 2 or 4), most significant bits first.
inline unsigned packed_sample(const uint8_t* row, size_t k, int depth) {
    const size_t bit = k * (size_t)depth;
    return (unsigned)(row[bit >> 3] >> (8 - depth - (int)(bit & 7))) & ((1u << depth) - 1u);
}

template <size_t OC, typename T>
void palette_row(const Layout& L, const uint8_t* row, size_t count, T* dst, size_t step) {
    for (size_t x = 0; x < count; ++x, dst += step) {
        const unsigned index = L.bit_depth == 8 ? row[x] : packed_sample(row, x, L.bit_depth);
        for (size_t k = 0; k < OC; ++k) dst[k] = L.palette[index * OC + k];
    }
}

// Pixels x0, x0 + dx, ... of output row y from one unfiltered row of `count` pixels.
template <typename T>
void emit_row(const Layout& L, const uint8_t* row, size_t count, size_t y, size_t x0, size_t dx, T* out) {
    const size_t oc = L.out_channels;
    T* dst = out + (y * L.width + x0) * oc;
    const size_t step = dx * oc;
    if (L.color_type == 3) {  // palette: indices (any depth) through the table; gamma is in the table already
        if (oc == 3)
            palette_row<3>(L, row, count, dst, step);
        else
            palette_row<4>(L, row, count, dst, step);
        return;
    }
    const size_t ch = L.channels;
    T sample[4];
    for (size_t x = 0; x < count; ++x, dst += step) {
        if (L.bit_depth == 16) {
            const uint8_t* p = row + 2 * x * ch;
            for (size_t k = 0; k < ch; ++k) sample[k] = (T)((unsigned)p[2 * k] << 8 | p[2 * k + 1]);
        } else if (L.bit_depth == 8) {
            for (size_t k = 0; k < ch; ++k) sample[k] = row[x * ch + k];
        } else {  // grey only: scaled to 8 bits as libpng expands it
            sample[0] = (T)(packed_sample(row, x, L.bit_depth) * (255u / ((1u << L.bit_depth) - 1u)));
        }
        size_t n = ch;
        if (L.trns_key) {  // alpha from the colour key, compared before gamma (on the stored, scaled values)
            bool match = true;
            for (size_t k = 0; k < ch; ++k) match &= sample[k] == L.trns_key[k];
            sample[n++] = match ? (T)0 : (T)(sizeof(T) == 2 ? 65535u : 255u);
        }
        if (L.gamma)
            for (size_t k = 0; k < L.colour; ++k) sample[k] = (T)L.gamma[sample[k]];
        for (size_t k = 0; k < n; ++k) dst[k] = sample[k];
    }
}

// The common case without any transformation: a plain 8/16-bit row is the output row (16-bit byte-swapped).
bool emit_row_plain(const Layout& L, const uint8_t* row, size_t count, size_t y, size_t dx, uint8_t* out) {
    if (dx != 1 || L.color_type == 3 || L.bit_depth < 8 || L.trns_key || L.gamma) return false;
    const size_t n = count * L.channels;
    if (L.bit_depth == 8) {
        std::memcpy(out + y * n, row, n);
    } else {
        uint16_t* dst = reinterpret_cast<uint16_t*>(out) + y * n;
        for (size_t k = 0; k < n; ++k) dst[k] = (uint16_t)((unsigned)row[2 * k] << 8 | row[2 * k + 1]);
    }
    return true;
}

// raw: the inflated scanlines (filter byte + row per row, Adam7 passes one after another); out: the (H, W, C)
// output as bytes (16-bit samples in native byte order). palette: 256 x C table (palette images), else empty;
// trns_key: one value per stored channel (grey/RGB with tRNS), else empty; gamma: 256 or 65536 entries, or empty.
// Returns (pass, row, value, refusal): the first invalid filter type (pass: the Adam7 pass 1..7, 0 when not
// interlaced), or pass -1 when the image was decoded; refusal names inconsistent arguments (a caller bug, nothing
// decoded; pass -2). Not an exception: the fuzzing build's ASan runtime cannot intercept a C++ throw there.
using GeneralResult = std::tuple<int, long, int, std::string>;

GeneralResult refused(const char* why) { return {-2, 0, 0, why}; }

GeneralResult decode_general(GeneralBytes raw, size_t width, size_t height, int bit_depth, int color_type,
                             int interlace, GeneralBytes palette, GeneralU16 trns_key, GeneralU16 gamma,
                             GeneralBytesOut out) {
    Layout L;
    L.width = width;
    L.height = height;
    L.bit_depth = bit_depth;
    L.color_type = color_type;
    const bool sub_byte = bit_depth == 1 || bit_depth == 2 || bit_depth == 4;
    bool depth_ok;
    switch (color_type) {
        case 0: L.channels = 1; depth_ok = sub_byte || bit_depth == 8 || bit_depth == 16; break;
        case 2: L.channels = 3; depth_ok = bit_depth == 8 || bit_depth == 16; break;
        case 3: L.channels = 1; depth_ok = sub_byte || bit_depth == 8; break;
        case 4: L.channels = 2; depth_ok = bit_depth == 8 || bit_depth == 16; break;
        case 6: L.channels = 4; depth_ok = bit_depth == 8 || bit_depth == 16; break;
        default: return refused("decode_general: invalid colour type");
    }
    if (!depth_ok) return refused("decode_general: invalid bit depth for the colour type");
    if (interlace != 0 && interlace != 1) return refused("decode_general: invalid interlace method");
    if (width == 0 || height == 0 || width > 0x7fffffffu || height > 0x7fffffffu)
        return refused("decode_general: width and height must be 1..2^31-1");
    const bool has_alpha = color_type == 4 || color_type == 6;
    if (color_type == 3) {
        if (palette.shape(0) != 256 * 3 && palette.shape(0) != 256 * 4)
            return refused("decode_general: a palette image needs a 256 x 3 or 256 x 4 table");
        L.out_channels = palette.shape(0) / 256;
        L.palette = palette.data();
        if (trns_key.shape(0) != 0 || gamma.shape(0) != 0)
            return refused("decode_general: palette images take tRNS and gamma in the table");
    } else {
        if (palette.shape(0) != 0) return refused("decode_general: a table for a non-palette image");
        if (trns_key.shape(0) != 0) {
            if ((color_type != 0 && color_type != 2) || trns_key.shape(0) != L.channels)
                return refused("decode_general: a tRNS key needs grey or RGB and one value per channel");
            L.trns_key = trns_key.data();
        }
        L.out_channels = L.channels + (L.trns_key ? 1 : 0);
        L.colour = L.out_channels - ((has_alpha || L.trns_key) ? 1 : 0);
        if (gamma.shape(0) != 0) {
            if (gamma.shape(0) != (bit_depth == 16 ? 65536u : 256u))
                return refused("decode_general: the gamma table needs 256 (65536 for 16-bit) entries");
            L.gamma = gamma.data();
        }
    }
    if (L.trns_key) {  // a key no sample can reach would still be fine, but one past the sample type is a caller bug
        for (size_t k = 0; k < L.channels; ++k)
            if (bit_depth <= 8 && L.trns_key[k] > 255)
                return refused("decode_general: tRNS key beyond the sample range");
    }
    if (L.gamma && bit_depth <= 8) {
        for (size_t k = 0; k < 256; ++k)
            if (L.gamma[k] > 255) return refused("decode_general: gamma table beyond 8 bits");
    }

    const size_t bits_per_pixel = L.channels * (size_t)bit_depth;
    const size_t bpp = bits_per_pixel >= 8 ? bits_per_pixel / 8 : 1;
    const size_t sample_bytes = bit_depth == 16 ? 2 : 1;
    // Sizes: every product below is at most (2^31)^2 * 8 bytes of output or (2^31) * (2^31 * 8 + 1) raw, which
    // may overflow size_t only on 32-bit hosts; checked there as everywhere.
    const size_t pixels = width * height;
    if (pixels / width != height || pixels > SIZE_MAX / (L.out_channels * sample_bytes) ||
        out.shape(0) != pixels * L.out_channels * sample_bytes)
        return refused("decode_general: the output is not H * W * C samples");
    const size_t npasses = interlace ? 7 : 1;
    size_t raw_size = 0, widest = 0;
    for (size_t p = 0; p < npasses; ++p) {
        const size_t* pass = interlace ? kAdam7[p] : kPlain[0];
        const size_t pw = pass_extent(width, pass[0], pass[2]), ph = pass_extent(height, pass[1], pass[3]);
        if (!pw || !ph) continue;
        const size_t row_bytes = (pw * bits_per_pixel + 7) / 8;  // pw <= 2^31, bits_per_pixel <= 64
        if (ph > (SIZE_MAX - raw_size) / (row_bytes + 1)) return refused("decode_general: too large");
        raw_size += ph * (row_bytes + 1);
        widest = row_bytes > widest ? row_bytes : widest;
    }
    if (raw.shape(0) != raw_size) return refused("decode_general: raw is not the image's scanlines");

    const uint8_t* src = raw.data();
    uint8_t* dst = out.data();
    nb::gil_scoped_release unlocked;
    thread_local std::vector<uint8_t> rows;  // the current row and the previous one, reused by each decode thread
    if (rows.size() < 2 * widest) rows.resize(2 * widest);
    size_t pos = 0;
    for (size_t p = 0; p < npasses; ++p) {
        const size_t* pass = interlace ? kAdam7[p] : kPlain[0];
        const size_t pw = pass_extent(width, pass[0], pass[2]), ph = pass_extent(height, pass[1], pass[3]);
        if (!pw || !ph) continue;  // an empty pass has no filter bytes at all
        const size_t row_bytes = (pw * bits_per_pixel + 7) / 8;
        uint8_t* cur = rows.data();
        uint8_t* prev = rows.data() + widest;
        std::memset(prev, 0, row_bytes);
        for (size_t r = 0; r < ph; ++r, pos += row_bytes + 1) {
            const unsigned filter = src[pos];
            if (filter > 4) return {interlace ? (int)p + 1 : 0, (long)r, (int)filter, std::string()};
            unfilter_row_general(filter, bpp, src + pos + 1, row_bytes, prev, cur);
            const size_t y = pass[1] + r * pass[3];
            if (!emit_row_plain(L, cur, pw, y, pass[2], dst)) {
                if (sample_bytes == 2)
                    emit_row(L, cur, pw, y, pass[0], pass[2], reinterpret_cast<uint16_t*>(dst));
                else
                    emit_row(L, cur, pw, y, pass[0], pass[2], dst);
            }
            std::swap(cur, prev);
        }
    }
    return {-1, 0, 0, std::string()};
}

}  // namespace

// Called from cpu_decode.cpp's NB_MODULE: one extension module holds both decoders.
void iws_register_general_decode(nb::module_& m) {
    m.def("decode_general", &decode_general, nb::arg("raw"), nb::arg("width"), nb::arg("height"),
          nb::arg("bit_depth"), nb::arg("color_type"), nb::arg("interlace"), nb::arg("palette"), nb::arg("trns_key"),
          nb::arg("gamma"), nb::arg("out"),
          "Inflated PNG scanlines -> the (H, W, C) decoded samples in `out` (see kernels/png_decode_general.cpp).");
}
