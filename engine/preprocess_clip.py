"""Pipeline A preprocessing: the paper's Pillow load + timm's eval transform for EVA02-L/14-448.

The IWS paper's script did `Image.open(f).convert("RGB")` and applied timm's eval transform for
`eva02_large_patch14_448.mim_m38m_ft_in1k` (pretrained_cfg: input 448, crop_pct 1.0,
crop_mode "center", interpolation "bicubic", OpenAI CLIP mean/std). That transform is
torchvision `Resize(448)` (shorter edge → 448; on PIL images it calls Pillow's antialiasing
`Image.resize(..., BICUBIC)`), `CenterCrop(448)`, `ToTensor` and `Normalize`. This module
reproduces it bit for bit without torchvision, and is the reference every faster path is tested
against. Pillow's loading semantics differ from `iws_engine.loaders.png.decode_png` (PNGFiles):
16-bit RGB(A) keeps only the high byte of each sample, 16-bit grey saturates at 255 (mode
"I;16" → "RGB"), alpha is dropped without compositing, and gAMA chunks are ignored.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image

#: timm.data.constants OPENAI_CLIP_MEAN / OPENAI_CLIP_STD (the EVA02 pretrained_cfg's mean/std).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PIL_BICUBIC = "pil-bicubic"  # Pillow Image.BICUBIC: antialiasing (support scales with the downscale factor)
CENTER_CROP = "center"  # timm crop_mode "center": aspect kept, shorter edge resized, centre cropped
PILLOW_CONVERT_RGB = "pillow-convert-rgb"  # Image.open(f).convert("RGB")

ImageSource = bytes | bytearray | memoryview | str | os.PathLike | Image.Image


@dataclass(frozen=True)
class ClipPreprocessSpec:
    """How Pipeline A's EVA02 wants its input made from a PNG file; stored with its artefacts."""

    size: int = 448  # output height and width
    crop_pct: float = 1.0
    crop_mode: str = CENTER_CROP
    interpolation: str = PIL_BICUBIC
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    loader: str = PILLOW_CONVERT_RGB
    channels: int = 3
    dtype: str = "float32"
    layout: str = "NCHW"
    notes: str = field(default="", compare=False)

    def __post_init__(self):
        supported = (CENTER_CROP, PIL_BICUBIC, PILLOW_CONVERT_RGB, 3, "float32", "NCHW")
        got = (self.crop_mode, self.interpolation, self.loader, self.channels, self.dtype, self.layout)
        if got != supported:
            raise ValueError(
                f"unsupported CLIP preprocessing spec (crop_mode, interpolation, loader, channels, dtype, layout) "
                f"= {got}; this engine implements {supported}"
            )
        if not (0.0 < self.crop_pct <= 1.0):
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.size < 1:
            raise ValueError(f"invalid size {self.size}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise ValueError(f"invalid normalisation mean={self.mean} std={self.std}")

    @property
    def scale_size(self) -> int:
        """The shorter edge before cropping: timm's `math.floor(img_size / crop_pct)`."""
        return math.floor(self.size / self.crop_pct)

    def to_json(self) -> str:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ClipPreprocessSpec":
        d = json.loads(text)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


#: Pipeline A's spec (eva02_large_patch14_448.mim_m38m_ft_in1k).
EVA02_L448_SPEC = ClipPreprocessSpec(
    notes="Image.open(f).convert('RGB') -> Resize(448, PIL bicubic, shorter edge) -> CenterCrop(448) "
    "-> ToTensor -> Normalize(OpenAI CLIP mean/std); timm eval transform of eva02_large_patch14_448.mim_m38m_ft_in1k",
)


def shorter_edge_resize(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(new_width, new_height) of torchvision `Resize(shorter)`: `_compute_resized_output_size` rounding.

    The shorter edge becomes `shorter`; the longer becomes int(shorter * long / short), truncated
    (539×528 → 457×448). Ties (square images) count as "width is the shorter edge", as torchvision does.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shorter, int(shorter * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_offsets(width: int, height: int, crop: int) -> tuple[int, int]:
    """(left, top) of torchvision `CenterCrop(crop)`: int(round((edge - crop) / 2.0)), half to even (9 → 4)."""
    if width < crop or height < crop:
        raise ValueError(f"cannot centre-crop {crop}×{crop} from {width}×{height} (torchvision would pad)")
    return int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0))


def clip_geometry(width: int, height: int, spec: ClipPreprocessSpec = EVA02_L448_SPEC
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resized_width, resized_height), (left, top)) of `resize_and_crop` for a width x height image."""
    resized = shorter_edge_resize(width, height, spec.scale_size)
    return resized, center_crop_offsets(*resized, spec.size)


def load_rgb(source: ImageSource) -> Image.Image:
    """Pillow's `Image.open(f).convert("RGB")` on PNG bytes, a path, or an opened image."""
    if isinstance(source, Image.Image):
        return source.convert("RGB")
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    with Image.open(source) as img:
        return img.convert("RGB")


def resize_and_crop(img: Image.Image, spec: ClipPreprocessSpec = EVA02_L448_SPEC) -> Image.Image:
    """torchvision `Resize(scale_size, BICUBIC)` + `CenterCrop(size)` on a PIL image."""
    new_size = shorter_edge_resize(img.width, img.height, spec.scale_size)
    if new_size != img.size:  # torchvision returns the image untouched when the size already matches
        img = img.resize(new_size, Image.BICUBIC)
    if img.size == (spec.size, spec.size):
        return img
    left, top = center_crop_offsets(img.width, img.height, spec.size)
    return img.crop((left, top, left + spec.size, top + spec.size))


@lru_cache(maxsize=8)
def _normalise_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: ((v / 255) - mean_c) / std_c with ToTensor/Normalize's float32 operations.

    Each step is one correctly rounded float32 operation, as torch computes it, so looking the
    256 possible values up is bit-identical to converting every pixel.
    """
    codes = np.arange(256, dtype=np.float32) / np.float32(255)
    mean32 = np.asarray(mean, np.float32)[:, None]
    std32 = np.asarray(std, np.float32)[:, None]
    table = (codes[None, :] - mean32) / std32
    table.flags.writeable = False
    return table


def normalise_rgb8(
    rgb: np.ndarray, spec: ClipPreprocessSpec = EVA02_L448_SPEC, out: np.ndarray | None = None
) -> np.ndarray:
    """(H, W, 3) uint8 → (3, H, W) float32 model input (`ToTensor` then `Normalize`)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected (H, W, 3) uint8 pixels, got {rgb.shape} {rgb.dtype}")
    table = _normalise_table(tuple(spec.mean), tuple(spec.std))
    if out is None:
        out = np.empty((3, rgb.shape[0], rgb.shape[1]), np.float32)
    for c in range(3):
        np.take(table[c], rgb[:, :, c], out=out[c])
    return out


def preprocess_clip_reference(
    source: ImageSource, spec: ClipPreprocessSpec = EVA02_L448_SPEC, out: np.ndarray | None = None
) -> np.ndarray:
    """A PNG (bytes, path or PIL image) → float32 (3, size, size), exactly as Pillow + timm make it.

    `out`, when given, is a float32 (3, size, size) array (e.g. a slice of a batch) written in place.
    """
    rgb = np.asarray(resize_and_crop(load_rgb(source), spec))
    return normalise_rgb8(rgb, spec, out)


def preprocess_clip_scanlines(rows: np.ndarray, width: int, color_type: int, bit_depth: int,
                              spec: ClipPreprocessSpec = EVA02_L448_SPEC, out: np.ndarray | None = None) -> np.ndarray:
    """`preprocess_clip_reference` without Pillow, from a PNG's unfiltered scanlines (H, row_bytes).

    Pillow's RGB conversion, resampling and the crop transcribed to NumPy (engine/pillow_resample.py),
    computing only the cropped outputs, as kernels/clip_resize.cu does; then the same normalisation.
    8/16-bit grey, grey+alpha, RGB and RGBA; palette and sub-byte images are Pillow's alone.
    """
    from iws_engine.pillow_resample import pillow_rgb_from_scanlines, resample_crop_rgb8

    rgb = pillow_rgb_from_scanlines(rows, width, color_type, bit_depth)
    resized, (left, top) = clip_geometry(width, rgb.shape[0], spec)
    cropped = resample_crop_rgb8(rgb, resized, (left, top, left + spec.size, top + spec.size))
    return normalise_rgb8(cropped, spec, out)
