"""PNG parsing, validation and fast CPU decoding for IWS vignettes.

`parse_png` is the pure-Python host side: it walks the chunks, checks framing, CRCs, the IHDR
rules, chunk order and the zlib header, guards against decompression bombs, and hands back the
joined IDAT stream (and its raw deflate body) for a CPU or GPU inflater. `decode_png` then
returns the pixels as Julia's PNGFiles.jl (libpng) would load them. Every rejection is a
`PngError` naming the file and the reason.

Decoding design: we inflate the IDAT stream ourselves (libdeflate through the native core, zlib
naming what is wrong) so that a stream that is too short, too long, truncated, or fails its
Adler-32 is always an error (libpng only warns about surplus data, and Pillow accepts short data).
The verified scanlines are then unfiltered, de-interlaced, unpacked and colour-handled (palette,
tRNS, sub-byte scaling, gamma) by the native general decoder (kernels/png_decode_general.cpp) in
one GIL-free call, or, where the native core is not built, by the NumPy code below, which is its
spec: the tables (palette, tRNS key, gamma) are built here once for both. Non-interlaced 8/16-bit
files without gamma have a faster route still, straight to the model input (loaders/native.py).
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

try:  # optional: a faster inflate (libdeflate); zlib is the fallback and the error reporter
    import deflate as _libdeflate
except ImportError:  # pragma: no cover - depends on the install
    _libdeflate = None

try:  # the native core (kernels/cpu_decode.cpp): CRC-32 (libdeflate's, ~10x zlib's on a vignette; same values as
    # zlib.crc32) and an inflate that also checks the stream ends exactly at the Adler-32 trailer
    from iws_engine.kernels._cpu_decode import crc32 as _crc32
    from iws_engine.kernels._cpu_decode import inflate_into as _native_inflate_into
    from iws_engine.kernels._cpu_decode import scan_chunks as _native_scan_chunks
except ImportError:  # pragma: no cover - depends on the install
    _crc32 = zlib.crc32
    _native_inflate_into = None
    _native_scan_chunks = None

__all__ = ["PngError", "PngInfo", "png_dimensions", "parse_png", "inflate_idat", "decode_png", "decode_parsed", "decode_png_file"]

try:  # the native general decoder (kernels/png_decode_general.cpp), in the same module; else the NumPy spec decodes
    from iws_engine.kernels._cpu_decode import decode_general as _native_decode_general
except ImportError:  # pragma: no cover - depends on the install
    _native_decode_general = None

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_UINT31 = 2**31 - 1
DEFAULT_MAX_PIXELS = 64_000_000

GREY, RGB, PALETTE, GREY_ALPHA, RGBA = 0, 2, 3, 4, 6
_CHANNELS = {GREY: 1, RGB: 3, PALETTE: 1, GREY_ALPHA: 2, RGBA: 4}
_ALLOWED_DEPTHS = {
    GREY: (1, 2, 4, 8, 16),
    RGB: (8, 16),
    PALETTE: (1, 2, 4, 8),
    GREY_ALPHA: (8, 16),
    RGBA: (8, 16),
}
_COLOUR_NAMES = {GREY: "greyscale", RGB: "RGB", PALETTE: "palette", GREY_ALPHA: "grey+alpha", RGBA: "RGBA"}

# Adam7 passes as (x0, y0, dx, dy).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))

# libpng's screen gamma for PNG_DEFAULT_sRGB (what PNGFiles.jl passes), in 1e-5 units.
_SCREEN_GAMMA_FIXED = 220_000
# libpng's PNG_GAMMA_THRESHOLD_FIXED: correction only when |file * screen - 1| > 0.05.
_GAMMA_THRESHOLD_FIXED = 5_000


class PngError(ValueError):
    """A PNG was rejected; `reason` says why, `path` which file (when known)."""

    def __init__(self, reason: str, path: str | os.PathLike[str] | None = None) -> None:
        self.reason = reason
        self.path = None if path is None else os.fspath(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)

    def __reduce__(self):  # keep reason/path when crossing process boundaries (data loaders)
        return (type(self), (self.reason, self.path))


@dataclass(frozen=True, eq=False)
class PngInfo:
    """What `parse_png` learned about one file; `idat`/`deflate` feed a CPU or GPU inflater."""

    width: int
    height: int
    bit_depth: int
    color_type: int
    interlace: int
    channels: int  # samples per pixel as stored: 1, 3, 1 (palette index), 2 or 4
    palette: np.ndarray | None  # (N, 3) uint8, palette images only
    trns: bytes | None  # raw tRNS payload when it is valid for this colour type
    gamma: float | None  # gAMA / 100000
    srgb: bool
    idat: bytes = field(repr=False)  # the concatenated zlib stream
    deflate: memoryview = field(repr=False)  # idat minus 2-byte zlib header and 4-byte Adler-32
    adler32: int
    raw_size: int  # filtered bytes the image needs (one filter byte per row, per Adam7 pass)
    gamma_fixed: int | None = field(default=None, repr=False)  # gAMA as stored (1e-5 units)
    sbit: bytes | None = field(default=None, repr=False)  # valid sBIT payload (used by 16-bit gamma)

    @property
    def bits_per_pixel(self) -> int:
        return self.channels * self.bit_depth

    @property
    def filter_stride(self) -> int:
        """Bytes between a byte and its 'left' neighbour in the PNG filters."""
        return max(1, self.bits_per_pixel // 8)


def _row_bytes(width: int, bits_per_pixel: int) -> int:
    return (width * bits_per_pixel + 7) // 8


def _pass_sizes(width: int, height: int, interlace: int) -> list[tuple[int, int]]:
    """(width, height) of each non-empty sub-image: one for plain images, up to seven for Adam7."""
    if not interlace:
        return [(width, height)]
    sizes = []
    for x0, y0, dx, dy in _ADAM7:
        pass_w = (width - x0 + dx - 1) // dx if width > x0 else 0
        pass_h = (height - y0 + dy - 1) // dy if height > y0 else 0
        if pass_w and pass_h:  # empty passes carry no filter bytes at all
            sizes.append((pass_w, pass_h))
    return sizes


def _raw_size(width: int, height: int, bits_per_pixel: int, interlace: int) -> int:
    return sum(h * (1 + _row_bytes(w, bits_per_pixel)) for w, h in _pass_sizes(width, height, interlace))


def png_dimensions(data: bytes | memoryview) -> tuple[int, int] | None:
    """(width, height) from a PNG's leading IHDR without parsing further, or None when `data` does not start
    like a PNG (then decode_png says what is wrong). For cheap request-level limits (iws_engine.serve)."""
    head = bytes(data[:24])
    if len(head) < 24 or head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", head[16:24])
    return width, height


def _check_ihdr(body: memoryview, max_pixels: int, path) -> tuple[int, int, int, int, int]:
    if len(body) != 13:
        raise PngError(f"IHDR chunk is {len(body)} bytes, expected 13", path)
    width, height, bit_depth, color_type, compression, filter_method, interlace = struct.unpack(">IIBBBBB", body)
    for name, value in (("width", width), ("height", height)):
        if value == 0 or value > MAX_UINT31:
            raise PngError(f"invalid image {name} {value} (must be 1..2^31-1)", path)
    if color_type not in _ALLOWED_DEPTHS:
        raise PngError(f"invalid colour type {color_type}", path)
    if bit_depth not in _ALLOWED_DEPTHS[color_type]:
        allowed = "/".join(map(str, _ALLOWED_DEPTHS[color_type]))
        raise PngError(
            f"invalid bit depth {bit_depth} for colour type {color_type} "
            f"({_COLOUR_NAMES[color_type]} allows {allowed})",
            path,
        )
    if compression != 0:
        raise PngError(f"unknown compression method {compression}", path)
    if filter_method != 0:
        raise PngError(f"unknown filter method {filter_method}", path)
    if interlace not in (0, 1):
        raise PngError(f"unknown interlace method {interlace}", path)
    if width * height > max_pixels:
        raise PngError(
            f"image is {width}x{height} = {width * height} pixels, above the limit of "
            f"max_pixels={max_pixels} (decompression-bomb guard)",
            path,
        )
    return width, height, bit_depth, color_type, interlace


def _check_zlib_header(idat: bytes, path) -> None:
    if len(idat) < 6:  # 2-byte header + 4-byte Adler-32 at the very least
        raise PngError(f"IDAT zlib stream is only {len(idat)} bytes", path)
    cmf, flg = idat[0], idat[1]
    if cmf & 0x0F != 8:
        raise PngError(f"IDAT zlib stream: compression method {cmf & 0x0F}, expected 8 (deflate)", path)
    if cmf >> 4 > 7:
        raise PngError(f"IDAT zlib stream: window size field CINFO={cmf >> 4} exceeds 7", path)
    if (cmf << 8 | flg) % 31:
        raise PngError("IDAT zlib stream: header check bits (FCHECK) are wrong", path)
    if flg & 0x20:
        raise PngError("IDAT zlib stream: preset dictionary (FDICT) is not allowed in PNG", path)


def _walk_chunks(buf: memoryview, path, verify_crc: bool):
    """(pos, length, type, body) of each chunk after the signature, its framing and (verify_crc) CRC checked.

    The native core (scan_chunks) walks as far as every check passes, joining each run of consecutive IDAT chunks
    into one record whose body is the joined bytes; this loop then goes on from where it stopped, so a failing
    chunk is reported here, in these words, either way. The caller stops at IEND.
    """
    size = len(buf)
    pos = 8
    if _native_scan_chunks is not None:
        records, pos = _native_scan_chunks(np.frombuffer(buf, np.uint8), pos, verify_crc)
        for start, length, ctype, idat in records:
            yield start, length, ctype, buf[start + 8 : start + 8 + length] if idat is None else idat
    while True:
        if pos + 8 > size:
            if pos == size:
                raise PngError(f"missing IEND chunk (file ends at byte {size})", path)
            raise PngError(f"truncated file: chunk header at byte {pos} is cut short", path)
        length = int.from_bytes(buf[pos : pos + 4], "big")
        ctype = bytes(buf[pos + 4 : pos + 8])
        name = ctype.decode("latin-1")
        if not ctype.isalpha():  # bytes.isalpha: ASCII letters only
            raise PngError(f"invalid chunk type {ctype!r} at byte {pos}", path)
        if length > MAX_UINT31:
            raise PngError(f"{name} chunk at byte {pos} declares length {length} > 2^31-1", path)
        end = pos + 12 + length
        if end > size:
            raise PngError(
                f"truncated file: {name} chunk at byte {pos} declares {length} data bytes "
                f"but only {max(size - pos - 12, 0)} remain",
                path,
            )
        body = buf[pos + 8 : pos + 8 + length]
        if verify_crc:
            stored = int.from_bytes(buf[end - 4 : end], "big")
            actual = _crc32(body, _crc32(ctype))
            if stored != actual:
                reason = f"CRC mismatch in {name} chunk at byte {pos} (stored {stored:08x}, computed {actual:08x})"
                raise PngError(reason, path)
        yield pos, length, ctype, body
        pos = end


def parse_png(
    data: bytes | bytearray | memoryview,
    *,
    path: str | os.PathLike[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    verify_crc: bool = True,
) -> PngInfo:
    """Validate the container and return the header facts and the joined IDAT stream.

    Critical-chunk problems are errors. Invalid *ancillary* chunks that matter for decoding
    (tRNS, gAMA, sRGB with a wrong length, value or position) are ignored, as libpng does.
    """
    buf = memoryview(data)
    if buf.ndim != 1 or buf.itemsize != 1:  # e.g. a NumPy array: view it as plain bytes
        buf = buf.cast("B") if buf.c_contiguous else memoryview(buf.tobytes())
    size = len(buf)
    if size < 8 or buf[:8] != PNG_SIGNATURE:
        raise PngError("not a PNG file (bad 8-byte signature)", path)

    ihdr: tuple[int, int, int, int, int] | None = None
    palette: np.ndarray | None = None
    trns: bytes | None = None
    gamma_fixed: int | None = None
    srgb = False
    sbit: bytes | None = None
    seen_plte = False
    idat_parts: list[memoryview] = []
    idat_done = False  # a non-IDAT chunk followed the IDAT run
    for pos, length, ctype, body in _walk_chunks(buf, path, verify_crc):
        name = ctype.decode("latin-1")
        if ihdr is None and ctype != b"IHDR":
            raise PngError(f"first chunk is {name}, expected IHDR", path)
        if ctype == b"IHDR":
            if ihdr is not None:
                raise PngError("duplicate IHDR chunk", path)
            ihdr = _check_ihdr(body, max_pixels, path)
            color_type, bit_depth = ihdr[3], ihdr[2]
        elif ctype == b"IDAT":
            if idat_done:
                raise PngError(f"IDAT chunks are not consecutive (another IDAT at byte {pos})", path)
            if color_type == PALETTE and not seen_plte:
                raise PngError("palette image (colour type 3) has no PLTE chunk before IDAT", path)
            idat_parts.append(body)
        elif ctype == b"IEND":
            break
        else:
            if idat_parts:
                idat_done = True
            if ctype == b"PLTE":
                if seen_plte:
                    raise PngError("duplicate PLTE chunk", path)
                seen_plte = True
                # Palette images reach this before any IDAT (checked there). For other colour types
                # PLTE is only a suggestion, and libpng ignores one that is misplaced or malformed.
                if color_type == PALETTE:
                    palette = _check_plte(body, bit_depth, path)
            elif ctype == b"tRNS":
                if trns is None and not idat_parts and _trns_valid(body, color_type, palette):
                    trns = bytes(body)
            elif ctype == b"gAMA":
                # libpng: gAMA must precede PLTE and IDAT and lie in its accepted range.
                if gamma_fixed is None and not seen_plte and not idat_parts and length == 4:
                    value = int.from_bytes(body, "big")
                    if 16 <= value <= 625_000_000:
                        gamma_fixed = value
            elif ctype == b"sRGB":
                if not seen_plte and not idat_parts and length == 1 and body[0] <= 3:
                    srgb = True
            elif ctype == b"sBIT":
                if sbit is None and not seen_plte and not idat_parts and _sbit_valid(body, color_type, bit_depth):
                    sbit = bytes(body)
            elif ctype[0:1].isupper():
                raise PngError(f"unknown critical chunk {name} at byte {pos}", path)

    if not idat_parts:
        raise PngError("no IDAT chunk", path)
    width, height, bit_depth, color_type, interlace = ihdr
    # The single copy of the compressed data: a GPU inflater gets one contiguous buffer.
    idat = b"".join(idat_parts)
    _check_zlib_header(idat, path)
    channels = _CHANNELS[color_type]
    return PngInfo(
        width=width,
        height=height,
        bit_depth=bit_depth,
        color_type=color_type,
        interlace=interlace,
        channels=channels,
        palette=palette,
        trns=trns,
        gamma=None if gamma_fixed is None else gamma_fixed / 100_000,
        srgb=srgb,
        idat=idat,
        deflate=memoryview(idat)[2:-4],
        adler32=int.from_bytes(idat[-4:], "big"),
        raw_size=_raw_size(width, height, channels * bit_depth, interlace),
        gamma_fixed=gamma_fixed,
        sbit=sbit,
    )


def _check_plte(body: memoryview, bit_depth: int, path) -> np.ndarray:
    if len(body) % 3:
        raise PngError(f"PLTE chunk length {len(body)} is not a multiple of 3", path)
    entries = len(body) // 3
    if entries == 0:
        raise PngError("PLTE chunk is empty", path)
    if entries > 1 << bit_depth:
        raise PngError(f"PLTE has {entries} entries, more than 2^{bit_depth} for a {bit_depth}-bit palette image", path)
    palette = np.frombuffer(body, np.uint8).reshape(entries, 3).copy()
    palette.flags.writeable = False
    return palette


def _trns_valid(body: memoryview, color_type: int, palette: np.ndarray | None) -> bool:
    """libpng's acceptance rule; an invalid tRNS is ignored rather than fatal."""
    if color_type == GREY:
        return len(body) == 2
    if color_type == RGB:
        return len(body) == 6
    if color_type == PALETTE:  # must follow PLTE and not be longer than it
        return palette is not None and 0 < len(body) <= len(palette)
    return False  # colour types with an alpha channel


def _sbit_valid(body: memoryview, color_type: int, bit_depth: int) -> bool:
    """libpng's rule: one byte per stored channel (3 for palette), each 1..sample depth."""
    expected = 3 if color_type == PALETTE else _CHANNELS[color_type]
    depth = 8 if color_type == PALETTE else bit_depth
    return len(body) == expected and all(1 <= b <= depth for b in body)


def inflate_idat(info: PngInfo, *, path: str | os.PathLike[str] | None = None) -> bytes:
    """Inflate the IDAT stream into exactly `info.raw_size` filtered bytes, checking the Adler-32.

    Bounded: never produces more than raw_size + 1 bytes, whatever the stream claims.
    Inflate is the CPU decoder's largest cost: libdeflate (through the native core, else the `deflate`
    package) does it ~1.6x faster than zlib on IWS vignettes. Its answer is taken only when the output
    has exactly the size the image needs, the stream ends where the Adler-32 trailer begins (native
    core only) and the Adler-32 matches; anything else goes through zlib, which says precisely what
    is wrong.
    """
    if _native_inflate_into is not None:
        raw = bytearray(info.raw_size)
        if _native_inflate_into(np.frombuffer(info.deflate, np.uint8), info.adler32, np.frombuffer(raw, np.uint8)):
            return bytes(raw)
        return _inflate_idat_zlib(info, path=path)
    if _libdeflate is not None:  # libdeflate's Python binding cannot tell whether bytes follow the stream
        try:
            raw = _libdeflate.deflate_decompress(info.deflate, info.raw_size + 1)
        except _libdeflate.DeflateError:
            raw = None
        if raw is not None and len(raw) == info.raw_size and zlib.adler32(raw) == info.adler32:
            return raw
    return _inflate_idat_zlib(info, path=path)


def _inflate_idat_zlib(info: PngInfo, *, path: str | os.PathLike[str] | None = None) -> bytes:
    """The reference inflate: zlib, with a precise reason for every way a stream can be wrong."""
    need = info.raw_size
    inflater = zlib.decompressobj(-15)  # raw deflate: we check the trailer ourselves, precisely
    stream = memoryview(info.idat)[2:]
    try:
        raw = inflater.decompress(stream, need)
        if len(raw) == need and not inflater.eof:
            # Full image received; the stream may still hold its end-of-block code, or surplus pixels.
            if inflater.decompress(inflater.unconsumed_tail, 1):
                reason = f"IDAT data too long: inflates to more than the {need} bytes a {_describe(info)} needs"
                raise PngError(reason, path)
    except zlib.error as exc:
        raise PngError(f"corrupt IDAT deflate data ({exc})", path) from None
    if not inflater.eof:
        raise PngError(
            f"truncated IDAT zlib stream: it stops after {len(raw)} of {need} bytes without a final block",
            path,
        )
    if len(raw) < need:
        raise PngError(f"IDAT data too short: inflates to {len(raw)} bytes, a {_describe(info)} needs {need}", path)
    trailer = inflater.unused_data
    if len(trailer) < 4:
        raise PngError("IDAT zlib stream lacks its 4-byte Adler-32 trailer", path)
    if len(trailer) > 4:
        raise PngError(f"IDAT has {len(trailer) - 4} bytes of extra data after the zlib stream", path)
    stored = int.from_bytes(trailer, "big")
    actual = zlib.adler32(raw)
    if stored != actual:
        raise PngError(f"IDAT Adler-32 mismatch (stored {stored:08x}, computed {actual:08x})", path)
    return raw


def _describe(info: PngInfo) -> str:
    kind = "interlaced " if info.interlace else ""
    return f"{info.width}x{info.height} {kind}{info.bit_depth}-bit {_COLOUR_NAMES[info.color_type]} image"


def decode_png(
    data: bytes | bytearray | memoryview,
    *,
    path: str | os.PathLike[str] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode to (H, W, C) uint8 (bit depth <= 8) or uint16 (16-bit), channels R,G,B(,A).

    Matches PNGFiles.jl/ImageIO (libpng) loading:
    - grey -> C=1 (1/2/4-bit scaled to 8 bits: x255, x85, x17); grey+alpha -> C=2;
      RGB -> C=3; RGBA -> C=4; 16-bit files keep all 16 bits;
    - palette -> RGB, or RGBA when a tRNS chunk is present (entries past tRNS are opaque;
      indices past the PLTE are black, as libpng's zero-filled 256-entry palette makes them);
    - tRNS on grey/RGB adds alpha: 0 where the pixel equals the tRNS colour, max elsewhere;
    - gamma: samples are untouched unless the file has gAMA, no sRGB chunk, and
      |gamma_file * 2.2 - 1| > 0.05 (libpng's PNG_GAMMA_THRESHOLD, screen gamma 2.2, which
      PNGFiles.jl passes as PNG_DEFAULT_sRGB). Then colour samples (not alpha) become
      floor(max * (v / max) ** g + 0.5) with g = 1 / (gamma_file * 2.2) rounded to 1e-5 as
      libpng's png_reciprocal2 does; 16-bit samples are first reduced to the significant bits
      of an sBIT chunk, as libpng's 16-bit table does. This follows libpng's formula and could
      not be checked against Julia here; it was checked against libpng 1.6.39 itself, driven
      through ctypes with PNGFiles.jl's call sequence (tests/test_png.py, when libpng16 exists).
    - bKGD, iCCP, cHRM and the other ancillary chunks are ignored (PNGFiles' default).
    """
    return decode_parsed(parse_png(data, path=path, max_pixels=max_pixels), path=path)


def decode_parsed(info: PngInfo, *, path: str | os.PathLike[str] | None = None,
                  native: bool | None = None) -> np.ndarray:
    """decode_png for a file parse_png has already checked.

    `native`: the native core (kernels/png_decode_general.cpp) when built (None, the default, or True), else the
    NumPy spec it is tested against (False; also the fallback where the core is not built). Same arrays either way.
    """
    raw = inflate_idat(info, path=path)
    if max(info.width, info.height) > _LIBPNG_USER_LIMIT:
        raise PngError(f"{_describe(info)}: libpng (PNGFiles.jl) refuses sides over {_LIBPNG_USER_LIMIT} pixels", path)
    if native is None:
        native = _native_decode_general is not None
    if native:
        if _native_decode_general is None:
            raise RuntimeError("native=True, but the native decode core is not built (pip install -e . builds it)")
        return _decode_samples_native(info, raw, path)
    return _to_output(info, _unfilter_numpy(info, raw, path))


def decode_png_file(path: str | os.PathLike[str], **kwargs) -> np.ndarray:
    """Read and decode one file; I/O failures are PngErrors carrying the OS reason."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise PngError(f"cannot read file: {exc.strerror or exc}", path) from None
    return decode_png(data, path=path, **kwargs)


# --- unfiltering: native (kernels/png_decode_general.cpp) or NumPy (the spec) -------------------------------------

_LIBPNG_USER_LIMIT = 1_000_000  # libpng's default PNG_USER_WIDTH_MAX / PNG_USER_HEIGHT_MAX (PNGFiles.jl refuses more)
_NO_BYTES = np.zeros(0, np.uint8)
_NO_WORDS = np.zeros(0, np.uint16)


def _decode_samples_native(info: PngInfo, raw: bytes, path) -> np.ndarray:
    """The native general decoder: unfilter, de-interlace, unpack and the colour handling in one GIL-free call, with
    the tables (palette, tRNS key, gamma) built here so libpng's rules stay in one place."""
    ct = info.color_type
    trns_key = _NO_WORDS
    if ct == PALETTE:
        table = _palette_table(info)
        channels, table_bytes, gamma = table.shape[1], table.reshape(-1), _NO_WORDS
    else:
        table_bytes = _NO_BYTES
        if info.trns is not None:  # parse_png keeps tRNS only where it is valid: grey or RGB here
            trns_key = np.asarray(_trns_key(info), np.uint16)
        channels = info.channels + (info.trns is not None)
        lut = _gamma_lut_for(info)
        gamma = _NO_WORDS if lut is None else lut.astype(np.uint16, copy=False)  # 8-bit: 256 entries
    out = np.empty((info.height, info.width, channels), np.uint16 if info.bit_depth == 16 else np.uint8)
    number, row, value, refusal = _native_decode_general(
        np.frombuffer(raw, np.uint8), info.width, info.height, info.bit_depth, ct, info.interlace, table_bytes,
        trns_key, gamma, out.reshape(-1).view(np.uint8))
    if refusal:  # a bug here, never a property of the file (parse_png and inflate_idat checked it)
        raise RuntimeError(f"{refusal} (a {_describe(info)}, {len(raw)} scanline bytes)")
    if number >= 0:
        raise PngError(_bad_filter_reason(info, number, row, value), path)
    return out


def _bad_filter_reason(info: PngInfo, number: int, row: int, value: int) -> str:
    """libpng stops at a filter byte > 4; name the row (and the Adam7 pass, 1..7) instead."""
    where = f"Adam7 pass {number} row {row}" if info.interlace else f"row {row}"
    return f"invalid filter type {value} on {where}"


def _unfilter_numpy(info: PngInfo, raw: bytes, path) -> np.ndarray:
    """The spec of the native general decoder's unfilter: inflated scanlines -> (H, W, channels) stored sample values
    (uint8, or uint16 for 16-bit; sub-byte samples unpacked, not scaled; palette indices), Adam7 passes scattered to
    their pixels. Pure NumPy, row by row; used where the native core is not built, and by the tests as the oracle."""
    data = np.frombuffer(raw, np.uint8)
    samples = np.empty((info.height, info.width, info.channels), np.uint16 if info.bit_depth == 16 else np.uint8)
    pos = 0
    for number, (x0, y0, dx, dy) in enumerate(_ADAM7 if info.interlace else ((0, 0, 1, 1),), 1):
        pass_w = len(range(x0, info.width, dx))
        pass_h = len(range(y0, info.height, dy))
        if not pass_w or not pass_h:  # an empty pass has no filter bytes at all
            continue
        row_bytes = _row_bytes(pass_w, info.bits_per_pixel)
        block = data[pos : pos + pass_h * (row_bytes + 1)].reshape(pass_h, row_bytes + 1)
        pos += block.size
        bad = np.flatnonzero(block[:, 0] > 4)
        if bad.size:
            raise PngError(_bad_filter_reason(info, number if info.interlace else 0, bad[0], block[bad[0], 0]), path)
        rows = _unfilter_rows(block, info.filter_stride)
        samples[y0::dy, x0::dx] = _unpack_rows(rows, pass_w, info.channels, info.bit_depth)
    return samples


def _unfilter_rows(block: np.ndarray, bpp: int) -> np.ndarray:
    """PNG spec section 9 on (rows, 1 + row_bytes) filtered bytes -> (rows, row_bytes) unfiltered bytes."""
    height, row_bytes = block.shape[0], block.shape[1] - 1
    out = np.empty((height, row_bytes), np.uint8)
    prev = np.zeros(row_bytes, np.uint8)
    for r in range(height):
        ftype, x = int(block[r, 0]), block[r, 1:]
        if ftype == 0:  # None
            line = x.copy()
        elif ftype == 1:  # Sub: a running sum per byte lane, mod 256
            line = x.reshape(-1, bpp).cumsum(axis=0, dtype=np.uint8).reshape(-1)
        elif ftype == 2:  # Up
            line = x + prev
        else:  # Average, Paeth: each byte needs the reconstructed byte to its left
            line, above = x.tolist(), prev.tolist()
            for i in range(row_bytes):
                a = line[i - bpp] if i >= bpp else 0
                b = above[i]
                if ftype == 3:
                    predicted = (a + b) >> 1
                else:
                    c = above[i - bpp] if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    predicted = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[i] = (line[i] + predicted) & 0xFF
            line = np.array(line, np.uint8)
        out[r] = prev = line
    return out


def _unpack_rows(rows: np.ndarray, count: int, channels: int, bit_depth: int) -> np.ndarray:
    """(rows, row_bytes) unfiltered bytes -> (rows, count, channels) samples (16-bit big-endian; sub-byte MSB first)."""
    height = rows.shape[0]
    if bit_depth == 16:
        return rows.view(">u2").reshape(height, count, channels).astype(np.uint16)
    if bit_depth == 8:
        return rows.reshape(height, count, channels)
    bits = np.unpackbits(rows, axis=1)[:, : count * bit_depth].reshape(height, count, bit_depth)
    weights = (1 << np.arange(bit_depth - 1, -1, -1)).astype(np.uint8)
    return (bits * weights).sum(axis=2, dtype=np.uint8)[:, :, None]


def _to_output(info: PngInfo, samples: np.ndarray) -> np.ndarray:
    """Stored samples (_unfilter_numpy) -> (H, W, C) with palette, sub-byte scaling, tRNS and gamma applied: the
    spec of what kernels/png_decode_general.cpp does with the same tables."""
    ct = info.color_type
    if ct == PALETTE:
        return _palette_table(info)[samples[:, :, 0]]
    out = samples
    if info.bit_depth < 8:  # grey: libpng's expansion to 8 bits (x255, x85, x17)
        out = out * np.uint8(255 // ((1 << info.bit_depth) - 1))
    if info.trns is not None:  # only kept for grey and RGB
        out = np.concatenate([out, _trns_alpha(info, out)], axis=2)
    lut = _gamma_lut_for(info)
    if lut is not None:
        colour = out.shape[2] - (ct in (GREY_ALPHA, RGBA) or info.trns is not None)
        out = np.array(out)
        out[:, :, :colour] = lut[out[:, :, :colour]]
    return np.ascontiguousarray(out)


def _trns_key(info: PngInfo) -> list[int]:
    """The grey/RGB tRNS colour key as the decoded samples hold it."""
    # libpng masks the key to the bit depth; sub-byte grey is compared after the x255/x85/x17 scaling.
    maxval = (1 << info.bit_depth) - 1
    key = [int.from_bytes(info.trns[i : i + 2], "big") & maxval for i in range(0, len(info.trns), 2)]
    if info.bit_depth < 8:
        key = [k * (255 // maxval) for k in key]
    return key


def _trns_alpha(info: PngInfo, samples: np.ndarray) -> np.ndarray:
    """Alpha plane from a grey/RGB tRNS colour key, compared on the stored (sub-byte: scaled) sample values."""
    opaque = 65535 if info.bit_depth == 16 else 255
    match = np.all(samples == np.asarray(_trns_key(info), samples.dtype), axis=2, keepdims=True)
    return np.where(match, samples.dtype.type(0), samples.dtype.type(opaque))


def _palette_table(info: PngInfo) -> np.ndarray:
    """256-entry RGB(A) table indexed by the palette index, gamma applied (libpng corrects the palette itself)."""
    channels = 4 if info.trns is not None else 3
    entries = np.zeros((256, channels), np.uint8)  # libpng: missing entries are black...
    entries[:, 3:] = 255  # ...and opaque
    n = len(info.palette)
    entries[:n, :3] = info.palette
    if info.trns is not None:
        entries[: len(info.trns), 3] = np.frombuffer(info.trns, np.uint8)
    lut = _gamma_lut_for(info)
    if lut is not None:
        entries[:, :3] = lut[entries[:, :3]]
    return entries


def _gamma_lut_for(info: PngInfo) -> np.ndarray | None:
    """libpng's gamma table for this file, or None when libpng would leave samples untouched."""
    if info.gamma_fixed is None or info.srgb:
        return None
    # png_gamma_threshold: round(file * screen) in 1e-5 units, compared with 1 +- 0.05
    product = math.floor(info.gamma_fixed * _SCREEN_GAMMA_FIXED / 100_000 + 0.5)
    if abs(product - 100_000) <= _GAMMA_THRESHOLD_FIXED:
        return None
    if info.bit_depth < 16:
        return _gamma_lut(info.gamma_fixed, 8, 0)
    # png_build_gamma_table: 16-bit samples are looked up by their top sBIT bits only.
    significant = 0
    if info.sbit is not None:
        significant = max(info.sbit[:3]) if info.color_type in (RGB, RGBA) else info.sbit[0]
    shift = min(16 - significant, 8) if 0 < significant < 16 else 0
    return _gamma_lut(info.gamma_fixed, 16, shift)


@lru_cache(maxsize=32)
def _gamma_lut(gamma_fixed: int, bits: int, shift: int) -> np.ndarray:
    """png_build_8bit_table / png_build_16bit_table as one vectorised table over every sample value."""
    # png_reciprocal2: the exponent 1 / (file * screen), kept in 1e-5 units like libpng
    exponent = math.floor(1e15 / gamma_fixed / _SCREEN_GAMMA_FIXED + 0.5)
    peak = (1 << bits) - 1
    index = np.arange(peak + 1, dtype=np.int64) >> shift
    top = peak >> shift
    if abs(exponent - 100_000) > _GAMMA_THRESHOLD_FIXED:
        lut = np.floor(peak * (index / top) ** (exponent * 1e-5) + 0.5)
    else:  # libpng flags the transform yet builds a linear table when the exponent itself is ~1
        lut = (index * peak + (top >> 1)) // top
    lut = lut.astype(np.uint16 if bits == 16 else np.uint8)
    lut.flags.writeable = False
    return lut

