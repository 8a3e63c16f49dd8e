"""engine/preprocess_clip.py: Pipeline A's Pillow + timm eval preprocessing for EVA02-L/14-448.

The module is checked against computations written out here (Pillow for decode and resize, NumPy
and torch for the arithmetic), against facts of Pillow's loading that the paper's results depend
on, and against timm's own transform (timm + torchvision pinned by .ci/setup; tests/timmtools.py).
"""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from iws_engine.preprocess_clip import (
    EVA02_L448_SPEC,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipPreprocessSpec,
    center_crop_offsets,
    load_rgb,
    preprocess_clip_reference,
    shorter_edge_resize,
)
from tests.timmtools import import_timm

MEAN32 = np.asarray(OPENAI_CLIP_MEAN, np.float32)[:, None, None]
STD32 = np.asarray(OPENAI_CLIP_STD, np.float32)[:, None, None]


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG of (H, W) grey or (H, W, 3|4) RGB(A) pixels, uint8 or uint16 (OpenCV writes BGR order)."""
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR if pixels.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
    ok, encoded = cv2.imencode(".png", pixels)
    assert ok
    return encoded.tobytes()


def vignette_rgba16(height: int = 528, width: int = 539, seed: int = 0) -> np.ndarray:
    """An IWS-like RGBA16 quicklook: R=G=B, opaque, smooth structure plus speckle."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    field = 30000 + 12000 * np.sin(x / 17.0) * np.cos(y / 23.0) + rng.normal(0, 4000, (height, width))
    grey = np.clip(field, 0, 65535).astype(np.uint16)
    return np.dstack([grey, grey, grey, np.full_like(grey, 65535)])


def straightforward_reference(png: bytes, resized: tuple[int, int], left: int, top: int) -> np.ndarray:
    """Written out step by step with the sizes and offsets given, float32 as ToTensor/Normalize compute."""
    rgb = Image.open(io.BytesIO(png)).convert("RGB").resize(resized, Image.BICUBIC)
    cropped = np.asarray(rgb)[top : top + 448, left : left + 448]
    scaled = cropped.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    return (scaled - MEAN32) / STD32


def test_spec_is_timms_pretrained_cfg_for_the_paper_model() -> None:
    # timm eva02_large_patch14_448.mim_m38m_ft_in1k: input_size (3, 448, 448), crop_pct 1.0, crop_mode
    # 'center', interpolation 'bicubic', mean/std OPENAI_CLIP_MEAN/STD (timm/data/constants.py)
    assert EVA02_L448_SPEC.size == 448 and EVA02_L448_SPEC.crop_pct == 1.0 and EVA02_L448_SPEC.scale_size == 448
    assert EVA02_L448_SPEC.crop_mode == "center" and EVA02_L448_SPEC.interpolation == "pil-bicubic"
    assert OPENAI_CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert OPENAI_CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


def test_spec_json_round_trip_and_validation() -> None:
    assert ClipPreprocessSpec.from_json(EVA02_L448_SPEC.to_json()) == EVA02_L448_SPEC
    with pytest.raises(ValueError, match="unsupported CLIP preprocessing spec"):
        ClipPreprocessSpec(crop_mode="squash")
    with pytest.raises(ValueError, match="crop_pct"):
        ClipPreprocessSpec(crop_pct=1.2)
    assert ClipPreprocessSpec(size=224, crop_pct=0.875).scale_size == 256  # timm: floor(224 / 0.875)


@pytest.mark.parametrize(
    ("width_height", "expected"),
    [
        ((539, 528), (457, 448)),  # IWS vignette: 448 * 539 / 528 = 457.33 -> 457
        ((528, 539), (448, 457)),
        ((448, 448), (448, 448)),
        ((1000, 449), (997, 448)),  # 997.77 truncates, never rounds up
        ((300, 200), (672, 448)),  # upscaling follows the same rule
        ((2048, 2048), (448, 448)),
    ],
)
def test_shorter_edge_resize_uses_torchvisions_truncation(width_height, expected) -> None:
    assert shorter_edge_resize(*width_height, 448) == expected


def test_center_crop_offsets_round_half_to_even() -> None:
    assert center_crop_offsets(457, 448, 448) == (4, 0)  # 9 / 2 = 4.5 -> 4 (Python round), not 5
    assert center_crop_offsets(459, 448, 448) == (6, 0)  # 5.5 -> 6
    assert center_crop_offsets(448, 997, 448) == (0, 274)  # 274.5 -> 274
    assert center_crop_offsets(448, 448, 448) == (0, 0)
    with pytest.raises(ValueError, match="cannot centre-crop"):
        center_crop_offsets(400, 448, 448)


def test_iws_vignette_against_a_straightforward_computation() -> None:
    png = png_bytes(vignette_rgba16())
    ours = preprocess_clip_reference(png)
    expected = straightforward_reference(png, resized=(457, 448), left=4, top=0)
    assert ours.dtype == np.float32 and ours.shape == (3, 448, 448)
    np.testing.assert_array_equal(ours, expected)
    # the crop really starts at column 4: one column over differs
    assert not np.array_equal(ours, straightforward_reference(png, resized=(457, 448), left=5, top=0))


def test_tensor_conversion_is_bit_identical_to_torch_totensor_and_normalize() -> None:
    """torchvision ToTensor: uint8 -> float32 .div(255); Normalize: .sub_(mean).div_(std) in float32."""
    rgb = np.random.default_rng(1).integers(0, 256, (448, 448, 3), dtype=np.uint8)
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
    tensor.sub_(torch.tensor(OPENAI_CLIP_MEAN)[:, None, None]).div_(torch.tensor(OPENAI_CLIP_STD)[:, None, None])
    ours = preprocess_clip_reference(Image.fromarray(rgb))
    np.testing.assert_array_equal(ours, tensor.numpy())


def test_portrait_input_crops_vertically() -> None:
    rgb = np.random.default_rng(2).integers(0, 256, (1000, 449, 3), dtype=np.uint8)
    png = png_bytes(rgb)
    expected = straightforward_reference(png, resized=(448, 997), left=0, top=274)
    np.testing.assert_array_equal(preprocess_clip_reference(png), expected)


def test_exact_size_input_is_not_resampled() -> None:
    rgb = np.random.default_rng(3).integers(0, 256, (448, 448, 3), dtype=np.uint8)
    out = preprocess_clip_reference(png_bytes(rgb))
    np.testing.assert_array_equal(out, (rgb.transpose(2, 0, 1).astype(np.float32) / np.float32(255) - MEAN32) / STD32)


def test_downscaling_antialiases() -> None:
    """Pillow's bicubic widens its support when shrinking: a 1-pixel checkerboard averages to grey,
    where point-sampling bicubic (no antialias) would keep full contrast."""
    checker = ((np.indices((896, 896)).sum(axis=0) % 2) * 255).astype(np.uint8)
    out = preprocess_clip_reference(png_bytes(checker))
    pixel = out * STD32 + MEAN32  # back to [0, 1]
    assert np.abs(pixel[:, 8:-8, 8:-8] - 0.5).max() < 0.01


def test_rgba16_becomes_pillows_8_bit_high_byte() -> None:
    """Pillow has no 16-bit colour modes: each RGB(A)16 sample keeps its high byte; alpha is dropped."""
    rng = np.random.default_rng(4)
    rgba16 = rng.integers(0, 65536, (40, 30, 4), dtype=np.uint16)
    rgba16[..., 3] = rng.integers(0, 65536, (40, 30))  # non-trivial alpha: convert('RGB') ignores it
    rgb = np.asarray(load_rgb(png_bytes(rgba16)))
    assert rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb, (rgba16[..., :3] >> 8).astype(np.uint8))


def test_grey16_saturates_in_pillow() -> None:
    """Pillow opens 16-bit grey as mode "I;16"; convert("RGB") clips at 255 (no scaling): values
    above 255 become white. Pillow's semantics, recorded because the paper's pipeline inherits them."""
    grey16 = np.array([[0, 100, 255, 256, 30000, 65535]], np.uint16)
    assert Image.open(io.BytesIO(png_bytes(grey16))).mode == "I;16"
    rgb = np.asarray(load_rgb(png_bytes(grey16)))
    np.testing.assert_array_equal(rgb[..., 0], [[0, 100, 255, 255, 255, 255]])
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_grey_png_gives_three_equal_channels_before_normalisation() -> None:
    grey = np.random.default_rng(5).integers(0, 256, (500, 600), dtype=np.uint8)
    out = preprocess_clip_reference(png_bytes(grey))
    pixel = (out * STD32 + MEAN32) * 255  # undo Normalize and ToTensor
    assert np.abs(pixel[0] - pixel[1]).max() < 1e-3 and np.abs(pixel[0] - pixel[2]).max() < 1e-3
    assert not np.array_equal(out[0], out[1])  # different per-channel statistics, same pixel


def test_every_source_kind_gives_the_same_result(tmp_path) -> None:
    png = png_bytes(vignette_rgba16(120, 200, seed=6))
    path = tmp_path / "v.png"
    path.write_bytes(png)
    expected = preprocess_clip_reference(png)
    for source in (bytearray(png), memoryview(png), str(path), path, Image.open(io.BytesIO(png))):
        np.testing.assert_array_equal(preprocess_clip_reference(source), expected)
    batch = np.zeros((2, 3, 448, 448), np.float32)
    result = preprocess_clip_reference(png, out=batch[1])
    assert result.base is batch or np.shares_memory(result, batch)
    np.testing.assert_array_equal(batch[1], expected)


def test_matches_timms_own_eval_transform() -> None:
    """Bit-exact against timm's transform for the paper's model (timm + torchvision: pinned by .ci/setup).

    The transform on a PIL image is torchvision's Python (Resize calls Pillow's resize; ToTensor and
    Normalize are torch operations): it does not use torchvision's compiled operators, which cannot load on
    the CPU machines (tests/timmtools.py:import_timm)."""
    timm = import_timm()
    import timm.data
    with torch.device("meta"):
        model = timm.create_model("eva02_large_patch14_448.mim_m38m_ft_in1k", pretrained=False)
    config = timm.data.resolve_model_data_config(model)
    assert config["crop_mode"] == "center" and config["crop_pct"] == 1.0 and config["interpolation"] == "bicubic"
    transform = timm.data.create_transform(**config, is_training=False)
    rng = np.random.default_rng(7)
    images = [vignette_rgba16(), rng.integers(0, 256, (1000, 449, 3), dtype=np.uint8),
              rng.integers(0, 256, (300, 200), dtype=np.uint8), rng.integers(0, 400, (460, 455), dtype=np.uint16)]
    for pixels in images:
        png = png_bytes(pixels)
        expected = transform(Image.open(io.BytesIO(png)).convert("RGB")).numpy()
        np.testing.assert_array_equal(preprocess_clip_reference(png), expected)
