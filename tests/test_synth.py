"""Synthetic IWS vignettes: determinism, PNG formats, labels, realistic sizes and statistics,
and physics checks that the internal-wave packets are there, oriented and rank-ordered."""

from __future__ import annotations

import csv
import math

import cv2
import numpy as np
import pytest

from iws_engine.export import synth

HEIGHT, WIDTH = 528, 539  # the default --size 539x528 is width × height


def _scene(seed: int, index: int, positive: bool) -> tuple[np.ndarray, synth.SceneInfo]:
    return synth.render_scene(np.random.default_rng([seed, index]), positive, HEIGHT, WIDTH)


def _decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def _dir_bytes(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


# ---------- determinism ----------
def test_same_seed_same_bytes_whatever_the_workers(tmp_path):
    a = synth.generate(tmp_path / "a", 6, seed=11, workers=1)
    b = synth.generate(tmp_path / "b", 6, seed=11, workers=2)
    assert a == b
    assert _dir_bytes(tmp_path / "a") == _dir_bytes(tmp_path / "b")


def test_different_seed_different_images(tmp_path):
    synth.generate(tmp_path / "a", 4, seed=0, workers=1, size=(96, 80))
    synth.generate(tmp_path / "b", 4, seed=1, workers=1, size=(96, 80))
    a, b = _dir_bytes(tmp_path / "a"), _dir_bytes(tmp_path / "b")
    assert all(a[name] != b[name] for name in a if name.endswith(".png"))


def test_render_depends_only_on_rng():
    first = synth.render_vignette(np.random.default_rng([3, 5]), True, 64, 72)
    again = synth.render_vignette(np.random.default_rng([3, 5]), True, 64, 72)
    np.testing.assert_array_equal(first, again)


# ---------- formats ----------
@pytest.mark.parametrize(
    "fmt, dtype, channels",
    [("rgba16", np.uint16, 4), ("gray8", np.uint8, 1), ("gray16", np.uint16, 1), ("rgb8", np.uint8, 3)],
)
def test_format_decodes_with_its_depth_channels_and_values(fmt, dtype, channels):
    field = synth.render_vignette(np.random.default_rng(0), True, 100, 120)
    image = _decode(synth.encode_png(field, fmt))
    assert image.dtype == dtype
    assert image.shape == ((100, 120) if channels == 1 else (100, 120, channels))
    full_scale = np.iinfo(dtype).max
    grey = image if channels == 1 else image[..., 0]
    np.testing.assert_array_equal(grey, np.rint(field * full_scale).astype(dtype))
    if channels > 1:
        np.testing.assert_array_equal(image[..., 1], grey)  # R=G=B
        np.testing.assert_array_equal(image[..., 2], grey)
    if channels == 4:
        assert (image[..., 3] == full_scale).all()


def test_formats_tuple_and_bad_arguments(tmp_path):
    assert synth.FORMATS == ("rgba16", "gray8", "gray16", "rgb8")
    with pytest.raises(ValueError):
        synth.encode_png(np.zeros((4, 4)), "rgb16")
    with pytest.raises(ValueError):
        synth.encode_png(np.zeros((4, 4)), "gray8", row_filter="best")
    with pytest.raises(ValueError):
        synth.generate(tmp_path, 2, fmt="jpeg")
    with pytest.raises(ValueError):
        synth.generate(tmp_path, 2, positive_fraction=1.5)


def test_size_is_width_by_height(tmp_path):
    synth.generate(tmp_path, 1, size=(70, 50), fmt="gray8", workers=1)
    assert _decode((tmp_path / "iws_000000.png").read_bytes()).shape == (50, 70)


@pytest.mark.parametrize("row_filter", ["paeth", "adaptive", "sub"])
def test_row_filters_round_trip(row_filter):
    field = synth.render_vignette(np.random.default_rng(1), False, 40, 48)
    image = _decode(synth.encode_png(field, "gray16", row_filter=row_filter))
    np.testing.assert_array_equal(image, np.rint(field * 65535).astype(np.uint16))


def test_default_rgba16_vignette_has_a_realistic_file_size():
    data = synth.encode_png(_scene(0, 0, True)[0], "rgba16")
    assert 1_000_000 < len(data) < 3_000_000  # real IWS files: ~1.85–2 MB


# ---------- labels ----------
def test_labels_csv_ids_and_exact_positive_count(tmp_path):
    calls: list[int] = []
    rows = synth.generate(tmp_path, 10, positive_fraction=0.3, size=(64, 48), seed=4, workers=2, progress=calls.append)
    assert [r[0] for r in rows] == [f"iws_{i:06d}" for i in range(10)]
    assert sum(label for _, label in rows) == 3
    with open(tmp_path / "labels.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["id", "ground_truth"]
    assert [(vid, int(gt)) for vid, gt in table[1:]] == rows
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [f"{vid}.png" for vid, _ in rows]
    assert sorted(calls) == list(range(1, 11))


@pytest.mark.parametrize("n, fraction", [(0, 0.5), (1, 0.5), (7, 0.5), (101, 0.25), (50, 0.0), (50, 1.0)])
def test_label_count_is_rounded_fraction(n, fraction):
    labels = synth.vignette_labels(n, fraction, seed=9)
    assert labels.sum() == round(n * fraction) and len(labels) == n
    np.testing.assert_array_equal(labels, synth.vignette_labels(n, fraction, seed=9))


def test_labels_are_shuffled():
    labels = synth.vignette_labels(200, 0.5, seed=0)
    assert 0 < labels[:100].sum() < 100
    assert not np.array_equal(labels, synth.vignette_labels(200, 0.5, seed=1))


def test_ids_widen_for_large_sets():
    assert synth.vignette_ids(3) == ["iws_000000", "iws_000001", "iws_000002"]
    assert synth.vignette_ids(1_000_001)[-1] == "iws_1000000"


# ---------- statistics ----------
@pytest.fixture(scope="module")
def scenes() -> list[tuple[np.ndarray, synth.SceneInfo]]:
    """20 positives and 20 negatives at the default size."""
    return [_scene(7, i, positive=i % 2 == 0) for i in range(40)]


def test_intensity_statistics_like_the_real_training_set(scenes):
    means = np.array([field.mean() for field, _ in scenes])
    stds = np.array([field.std() for field, _ in scenes])
    for field, _ in scenes:
        assert field.dtype == np.float64 and field.shape == (HEIGHT, WIDTH)
        assert field.min() >= 0.0 and field.max() <= 1.0
    assert ((means > 0.30) & (means < 0.48)).all(), means
    assert ((stds > 0.08) & (stds < 0.25)).all(), stds
    # Real IWS training set: mean 0.380, std 0.156.
    assert 0.35 < means.mean() < 0.42
    assert 0.12 < stds.mean() < 0.18


# ---------- physics ----------
def _band_energy_along(field: np.ndarray, direction: float, size: int = 256) -> float:
    """Energy of the soliton-scale band of the image projected on `direction`, as the model sees it
    (bilinear 256×256), relative to the image variance. Averaging along crests removes speckle;
    the band (DoG, 1–5 px at 256) keeps soliton widths and spacings and drops large scales."""
    img = cv2.resize(field, (size, size), interpolation=cv2.INTER_LINEAR)
    img = img - img.mean()
    rows, cols = np.mgrid[0:size, 0:size]
    # Project in full-resolution geometry so `direction` means what it meant in the scene.
    x, y = cols * (field.shape[1] / size), rows * (field.shape[0] / size)
    s = np.rint((x * math.cos(direction) + y * math.sin(direction)) * (size / field.shape[1])).astype(np.intp).ravel()
    s -= s.min()
    counts = np.bincount(s)
    profile = np.bincount(s, weights=img.ravel())[counts >= size // 4] / counts[counts >= size // 4]

    def smooth(v: np.ndarray, sigma: float) -> np.ndarray:
        r = int(4 * sigma) + 1
        kernel = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
        return np.convolve(np.pad(v, r, mode="edge"), kernel / kernel.sum(), mode="valid")

    band = smooth(profile, 1.0) - smooth(profile, 5.0)
    return float(np.mean(band**2) / img.var())


def test_packets_put_soliton_scale_energy_across_their_crests(scenes):
    positives = [(f, info) for f, info in scenes if info.positive]
    negatives = [f for f, info in scenes if not info.positive]
    directions = [math.radians(info.packets[0].direction_deg) for _, info in positives]
    along = np.array([_band_energy_along(f, d) for (f, _), d in zip(positives, directions)])
    perpendicular = np.array([_band_energy_along(f, d + math.pi / 2) for (f, _), d in zip(positives, directions)])
    # Negatives projected on the same directions: what speckle, swell and look-alikes give.
    negative = np.array([_band_energy_along(f, d) for f, d in zip(negatives, directions)])
    # Measured: along/negative ≈ 3.5–4.4, along/perpendicular similar, on several seeds.
    assert along.mean() > 2.0 * negative.mean(), (along.mean(), negative.mean())
    assert along.mean() > 2.0 * perpendicular.mean(), (along.mean(), perpendicular.mean())
    assert np.mean(along[:, None] > negative[None, :]) > 0.75  # AUC of this crude detector


def test_soliton_trains_are_rank_ordered():
    rng = np.random.default_rng(0)
    for _ in range(300):
        positions, amplitudes, widths = synth._soliton_train(rng)
        gaps = -np.diff(positions)
        assert 2 <= len(positions) <= 8 and positions[0] == 0.0
        assert (np.diff(amplitudes) < 0).all()  # lead soliton strongest
        assert (np.diff(gaps) <= 1e-9).all()  # spacing shrinks from the lead backwards
        assert widths.min() >= 3.0 and widths.max() <= 12.0
        assert (gaps >= 3.0 * widths[1:] - 1e-9).all()


def test_soliton_signature_is_a_bright_dark_pair():
    start, profile = synth._soliton_profile(
        np.array([0.0]), np.array([0.5]), np.array([5.0]), bright_ahead=True, trough_weight=0.0
    )
    s = start + synth._LUT_STEP * np.arange(len(profile))
    assert profile.max() == pytest.approx(0.5, rel=0.01) and profile.min() == pytest.approx(-0.5, rel=0.01)
    assert s[profile.argmax()] > 0 > s[profile.argmin()]  # bright ahead, dark behind


def test_positives_have_packets_and_negatives_have_lookalikes(scenes):
    positives = [info for _, info in scenes if info.positive]
    negatives = [info for _, info in scenes if not info.positive]
    assert all(1 <= len(info.packets) <= 2 for info in positives)
    assert all(not info.packets for info in negatives)
    assert all(0.3 * WIDTH <= p.crest_length_px and 3.0 <= p.lead_width_px <= 7.0 for i in positives for p in i.packets)
    assert np.mean([bool(info.lookalikes) for info in negatives]) >= 0.5
    more = [_scene(8, i, positive=False)[1] for i in range(40)]  # scene info is cheap to check
    seen = {name for info in negatives + more for name in info.lookalikes}
    assert seen == set(synth.LOOKALIKES)
    assert np.mean([len(i.lookalikes) for i in positives]) < np.mean([len(i.lookalikes) for i in negatives])
