"""Synthetic IWS-like Sentinel-1 Wave-mode SAR vignettes (PNG) with ground-truth labels.

Used to train the engine's embedded default SAR_CNN model, to benchmark the loaders and in tests.
An image is a quicklook of a simulated normalised radar cross-section (NRCS): a smooth ocean
background (mean level, swell, wind streaks), optional internal-wave packets (positives: rank-
ordered trains of sech² solitons seen as bright/dark pairs), optional look-alikes (rain cells,
fronts, surfactant slicks, ships, atmospheric gravity waves), multiplicative Gamma speckle, and a
power-law quicklook scaling into [0, 1].

Sizes are given as (width, height), like the CLI's ``--size 539x528`` (width 539, height 528) and
like real IWS vignettes; arrays are (height, width). Image ``i`` of a run depends only on
``(seed, i)`` and its label, so the output is identical whatever the number of workers.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

FORMATS = ("rgba16", "gray8", "gray16", "rgb8")
DEFAULT_SIZE = (539, 528)  # (width, height) of real IWS vignettes
LABELS_FILE = "labels.csv"
LOOKALIKES = ("rain", "front", "slick", "ship", "atmospheric_gravity_wave")

# Probability that a negative image contains each look-alike; positives get a fraction of it.
_LOOKALIKE_PROBABILITY = {
    "rain": 0.3,
    "front": 0.3,
    "slick": 0.3,
    "ship": 0.25,
    "atmospheric_gravity_wave": 0.25,
}
_POSITIVE_LOOKALIKE_FACTOR = 0.4
_SECOND_PACKET_PROBABILITY = 0.25
_FAINT_PACKET_PROBABILITY = 0.2

# PNG row filters. Real IWS files have mostly Paeth rows, so Paeth is the default; libpng's
# adaptive heuristic ("adaptive") picks Average for ~97% of rows of these speckled images.
ROW_FILTERS = {
    "paeth": cv2.IMWRITE_PNG_FILTER_PAETH,
    "adaptive": cv2.IMWRITE_PNG_ALL_FILTERS,
    "none": cv2.IMWRITE_PNG_FILTER_NONE,
    "sub": cv2.IMWRITE_PNG_FILTER_SUB,
    "up": cv2.IMWRITE_PNG_FILTER_UP,
    "average": cv2.IMWRITE_PNG_FILTER_AVG,
}
# Fast deflate with run-length matches only (OpenCV's default): it does not exploit R=G=B
# repeats, so an RGBA16 539×528 vignette is ~1.9 MB, like the real ~1.85–2 MB files (the default
# strategy would halve that).
_PNG_DEFLATE = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]

Spectrum = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (|k|, angle of k) -> power

_LUT_STEP = 0.25  # px; sampling step of 1-D profiles looked up per pixel
_SECH2_TANH_PEAK = 4.0 / (3.0 * math.sqrt(3.0))  # max of 2·sech²(u)·tanh(u), at tanh(u) = 1/√3


@dataclass(frozen=True)
class PacketInfo:
    """One internal-wave packet as drawn (pixel units at full resolution)."""

    direction_deg: float  # propagation direction, image x towards image y (down)
    n_solitons: int
    contrast: float  # peak relative NRCS modulation of the lead soliton
    lead_width_px: float
    lead_spacing_px: float
    crest_length_px: float


@dataclass(frozen=True)
class SceneInfo:
    """What a rendered vignette contains: its ground truth and its nuisances."""

    positive: bool
    packets: tuple[PacketInfo, ...]
    lookalikes: tuple[str, ...]
    looks: float  # equivalent number of looks of the speckle


class _Grid:
    """Pixel-centre coordinates of a full-resolution image, and of its half-resolution version
    expressed in full-resolution pixels (smooth components are synthesised at half resolution)."""

    def __init__(self, height: int, width: int):
        self.height, self.width = height, width
        self.xs = np.arange(width, dtype=np.float32)
        self.ys = np.arange(height, dtype=np.float32)
        self.half_height, self.half_width = (height + 1) // 2, (width + 1) // 2
        self.half_xs = (np.arange(self.half_width, dtype=np.float32) + 0.5) * (width / self.half_width) - 0.5
        self.half_ys = (np.arange(self.half_height, dtype=np.float32) + 0.5) * (height / self.half_height) - 0.5

    @property
    def size(self) -> float:
        return float(max(self.height, self.width))

    def random_point(self, rng: np.random.Generator, margin: float = 0.0) -> tuple[float, float]:
        """A uniform point in the frame grown (margin > 0) or shrunk (< 0) by margin × size."""
        m = margin * self.size
        return rng.uniform(-m, self.width + m), rng.uniform(-m, self.height + m)


# ---------- geometry helpers ----------
def _crest_coordinates(
    xs: np.ndarray, ys: np.ndarray, origin: tuple[float, float], direction: float, curvature: float
) -> tuple[np.ndarray, np.ndarray]:
    """(s, t): distance along `direction` from `origin`, bent by curvature·t² (parabolic crests
    whose ends trail for curvature > 0), and distance along the crest."""
    nx, ny = math.cos(direction), math.sin(direction)
    dx, dy = xs - np.float32(origin[0]), ys - np.float32(origin[1])
    s = dx[None, :] * np.float32(nx) + dy[:, None] * np.float32(ny)
    t = dy[:, None] * np.float32(nx) - dx[None, :] * np.float32(ny)
    if curvature:
        s += np.float32(curvature) * (t * t)
    return s, t


def _lookup(coordinate: np.ndarray, start: float, profile: np.ndarray) -> np.ndarray:
    """profile sampled at `coordinate` (nearest sample, step _LUT_STEP from `start`); beyond
    either end the end value holds. Far cheaper than evaluating sech/tanh per pixel."""
    index = (coordinate - np.float32(start)) * np.float32(1.0 / _LUT_STEP) + np.float32(0.5)
    np.clip(index, 0, len(profile) - 1, out=index)
    return profile[index.astype(np.intp)]


def _crest_envelope(rng: np.random.Generator, t_min: float, t_max: float, length: float) -> tuple[float, np.ndarray]:
    """Along-crest amplitude: a smooth window of `length` centred at t=0, with a gentle ripple
    so crests are not perfectly uniform. Returns (start, profile) for `_lookup`."""
    t = np.arange(t_min, t_max + _LUT_STEP, _LUT_STEP, dtype=np.float64)
    taper = max(0.15 * length, 8.0)
    window = 0.5 * (1.0 - np.tanh((np.abs(t) - 0.5 * length) / (0.5 * taper)))
    ripple_wavelength = rng.uniform(0.3, 1.0) * max(length, 50.0)
    ripple = 1.0 + rng.uniform(0.0, 0.3) * np.sin(2 * np.pi * t / ripple_wavelength + rng.uniform(0, 2 * np.pi))
    return t_min, (window * ripple).astype(np.float32)


def _banded_feature(
    grid_xs: np.ndarray,
    grid_ys: np.ndarray,
    origin: tuple[float, float],
    direction: float,
    curvature: float,
    s_start: float,
    s_profile: np.ndarray,
    rng: np.random.Generator,
    crest_length: float,
) -> np.ndarray:
    """A modulation that varies across crests as `s_profile` and along them as a crest window."""
    s, t = _crest_coordinates(grid_xs, grid_ys, origin, direction, curvature)
    across = _lookup(s, s_start, s_profile)
    t_start, t_profile = _crest_envelope(rng, float(t.min()), float(t.max()), crest_length)
    across *= _lookup(t, t_start, t_profile)
    return across


# ---------- ocean background (half resolution, one FFT) ----------
def _angle_to(phi: np.ndarray, axis: float) -> np.ndarray:
    """Angular distance of wavevector angles to an axis, modulo π (a real field's spectrum is
    symmetric)."""
    return np.mod(phi - axis + np.pi / 2, np.pi) - np.pi / 2


def _spectral_field(rng: np.random.Generator, grid: _Grid, spectra: Sequence[tuple[float, Spectrum]]) -> np.ndarray:
    """Gaussian random field at half resolution with the weighted sum of the given spectra,
    each normalised so that its weight is its variance; returns the field (std ≈ √Σweights)."""
    fy = np.fft.fftfreq(grid.half_height, d=grid.height / grid.half_height)[:, None]  # cycles / full px
    fx = np.fft.rfftfreq(grid.half_width, d=grid.width / grid.half_width)[None, :]
    k = np.hypot(fx, fy)
    phi = np.arctan2(fy, fx)
    power = np.zeros(k.shape)
    for variance, spectrum in spectra:
        p = spectrum(k, phi)
        p[0, 0] = 0.0
        power += variance * p / p.sum()
    noise = rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape)
    field = np.fft.irfft2(noise * np.sqrt(power), s=(grid.half_height, grid.half_width))
    total = sum(v for v, _ in spectra)
    field *= math.sqrt(total) / max(field.std(), 1e-12)
    return field.astype(np.float32)


def _swell_spectrum(rng: np.random.Generator) -> Spectrum:
    wavelength = rng.uniform(15.0, 60.0)  # 100–300 m at ~5 m pixels
    direction = rng.uniform(0, np.pi)
    k0 = 1.0 / wavelength
    k_spread, angle_spread = rng.uniform(0.08, 0.18) * k0, np.radians(rng.uniform(8.0, 25.0))

    def spectrum(k: np.ndarray, phi: np.ndarray) -> np.ndarray:
        return np.exp(-0.5 * ((k - k0) / k_spread) ** 2 - 0.5 * (_angle_to(phi, direction) / angle_spread) ** 2)

    return spectrum


def _wind_streak_spectrum(wind_direction: float, rng: np.random.Generator) -> Spectrum:
    # Streaks are long along the wind, so their energy lies across it, at 40–150 px spacing.
    across = wind_direction + np.pi / 2
    k0 = 1.0 / rng.uniform(40.0, 150.0)
    angle_spread = np.radians(rng.uniform(3.0, 8.0))

    def spectrum(k: np.ndarray, phi: np.ndarray) -> np.ndarray:
        logk = np.log(np.maximum(k, 1e-6) / k0)
        return np.exp(-0.5 * (logk / 0.5) ** 2 - 0.5 * (_angle_to(phi, across) / angle_spread) ** 2)

    return spectrum


def _large_scale_spectrum(rng: np.random.Generator) -> Spectrum:
    k0 = 1.0 / rng.uniform(200.0, 600.0)
    return lambda k, phi: np.exp(-0.5 * (k / k0) ** 2)


def _ocean_background(rng: np.random.Generator, grid: _Grid, wind_direction: float) -> np.ndarray:
    """Relative NRCS modulation of the sea surface at half resolution: swell (one or two
    systems), wind streaks, a large-scale level variation and an incidence-like ramp."""
    spectra = [
        (rng.uniform(0.03, 0.13) ** 2, _swell_spectrum(rng)),
        (rng.uniform(0.02, 0.06) ** 2, _wind_streak_spectrum(wind_direction, rng)),
        (rng.uniform(0.02, 0.08) ** 2, _large_scale_spectrum(rng)),
    ]
    if rng.random() < 0.3:
        spectra.append((rng.uniform(0.02, 0.07) ** 2, _swell_spectrum(rng)))
    field = _spectral_field(rng, grid, spectra)
    ramp = rng.uniform(-0.1, 0.1) * (grid.half_xs / grid.width - 0.5)
    field += ramp[None, :].astype(np.float32)
    return field


# ---------- internal waves ----------
def _soliton_profile(
    positions: np.ndarray, amplitudes: np.ndarray, widths: np.ndarray, bright_ahead: bool, trough_weight: float
) -> tuple[float, np.ndarray]:
    """SAR signature across a packet: Σ aⱼ·(∓d/du sech²(u) normalised to ±1, plus a small
    sech² term), u = (s − sⱼ)/wⱼ. The derivative makes each soliton a bright/dark pair
    (convergence ahead of the trough roughens the sea, divergence behind smooths it)."""
    start = float(positions.min() - 6 * widths.max())
    s = np.arange(start, float(positions.max() + 6 * widths.max()), _LUT_STEP)
    profile = np.zeros_like(s)
    sign = 1.0 if bright_ahead else -1.0
    for position, amplitude, width in zip(positions, amplitudes, widths):
        u = np.clip((s - position) / width, -40.0, 40.0)  # cosh overflows beyond ~710
        sech2 = 1.0 / np.cosh(u) ** 2
        profile += amplitude * (sign * 2.0 * sech2 * np.tanh(u) / _SECH2_TANH_PEAK - trough_weight * sech2)
    profile[[0, -1]] = 0.0
    return start, profile.astype(np.float32)


def _soliton_train(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(positions, relative amplitudes, widths) of a rank-ordered train of 2–8 solitons: the lead
    at s = 0 has amplitude 1, amplitude and spacing decrease backwards, and larger solitons are
    narrower (KdV: width ∝ amplitude^-½), 3–12 px."""
    n = int(rng.integers(2, 9))
    decay = rng.uniform(0.55, 0.88)
    amplitudes = decay ** np.arange(n)
    lead_width = rng.uniform(3.0, 7.0)
    widths = np.minimum(lead_width / np.sqrt(amplitudes), min(2.0 * lead_width, 12.0))
    spacings = rng.uniform(30.0, 80.0) * rng.uniform(0.65, 0.92) ** np.arange(n - 1)
    # Keep neighbours apart (3 widths) without breaking the rank order: a gap is at least any gap behind it.
    spacings = np.maximum(spacings, 3.0 * widths[1:])
    spacings = np.maximum.accumulate(spacings[::-1])[::-1]
    positions = -np.concatenate([[0.0], np.cumsum(spacings)])  # trailing solitons behind the lead
    return positions, amplitudes, widths


def _internal_wave_packet(rng: np.random.Generator, grid: _Grid, faint: bool) -> tuple[np.ndarray, PacketInfo]:
    """A soliton train along straight or gently curved crests, any direction, centred in the
    frame give or take (it may be partly outside)."""
    positions, amplitudes, widths = _soliton_train(rng)
    contrast = rng.uniform(0.15, 0.3) if faint else rng.uniform(0.35, 0.8)
    start, profile = _soliton_profile(
        positions, contrast * amplitudes, widths, bright_ahead=rng.random() < 0.8, trough_weight=rng.uniform(-0.2, 0.3)
    )

    direction = rng.uniform(0, 2 * np.pi)
    crest_length = rng.uniform(0.3, 1.3) * grid.size  # > 1 frame: spans it
    radius = rng.uniform(0.5, 6.0) * grid.size
    curvature = 0.0 if rng.random() < 0.3 else rng.choice([1.0, 1.0, 1.0, -1.0]) / (2.0 * radius)
    centre_x, centre_y = grid.random_point(rng, margin=-0.2)
    half_length = 0.5 * (positions[0] - positions[-1])
    origin = (centre_x + half_length * math.cos(direction), centre_y + half_length * math.sin(direction))
    field = _banded_feature(grid.xs, grid.ys, origin, direction, curvature, start, profile, rng, crest_length)
    info = PacketInfo(
        direction_deg=math.degrees(direction),
        n_solitons=len(positions),
        contrast=float(contrast),
        lead_width_px=float(widths[0]),
        lead_spacing_px=float(positions[0] - positions[1]),
        crest_length_px=float(crest_length),
    )
    return field, info


# ---------- look-alikes ----------
def _rain_cells(rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """Roughly circular cells (half resolution): a bright splash area with a darker core
    (attenuation, damped downdraft centre)."""
    field = np.zeros((grid.half_height, grid.half_width), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = grid.random_point(rng, margin=0.05)
        radius = rng.uniform(20.0, 90.0)
        aspect, angle = rng.uniform(0.7, 1.0), rng.uniform(0, np.pi)
        dx, dy = grid.half_xs[None, :] - np.float32(cx), grid.half_ys[:, None] - np.float32(cy)
        u = dx * np.float32(math.cos(angle)) + dy * np.float32(math.sin(angle))
        v = (dy * np.float32(math.cos(angle)) - dx * np.float32(math.sin(angle))) / np.float32(aspect)
        r2 = (u * u + v * v) / np.float32(radius**2)
        field += np.float32(rng.uniform(0.3, 1.0)) * np.exp(-r2)
        field -= np.float32(rng.uniform(0.4, 0.9)) * np.exp(-r2 / np.float32(rng.uniform(0.08, 0.2)))
    return field


def _slicks(rng: np.random.Generator, grid: _Grid, wind_direction: float) -> np.ndarray:
    """Surfactant slicks (half resolution): dark meandering filaments along the wind, drawn as
    the near-zero band of a smooth anisotropic random field, inside a patch."""
    k0 = 1.0 / rng.uniform(100.0, 220.0)
    across = wind_direction + np.pi / 2
    spread = np.radians(rng.uniform(10.0, 30.0))

    def spectrum(k: np.ndarray, phi: np.ndarray) -> np.ndarray:
        return np.exp(-0.5 * ((k - k0) / (0.5 * k0)) ** 2 - 0.5 * (_angle_to(phi, across) / spread) ** 2)

    f = _spectral_field(rng, grid, [(1.0, spectrum)])
    band = np.float32(rng.uniform(0.12, 0.25))
    filaments = np.exp(-((f / band) ** 2))
    cx, cy = grid.random_point(rng)
    rx, ry = rng.uniform(0.2, 0.6, size=2) * grid.size
    dx = (grid.half_xs - np.float32(cx)) / np.float32(rx)
    dy = (grid.half_ys - np.float32(cy)) / np.float32(ry)
    patch = np.exp(-(dx[None, :] ** 2 + dy[:, None] ** 2))
    return -np.float32(rng.uniform(0.3, 0.7)) * filaments * patch


def _front(rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """An oceanic front: one sharp, gently curved brightness step, often with a thin line."""
    width = rng.uniform(1.0, 4.0)
    s = np.arange(-8 * width - 20.0, 8 * width + 20.0, _LUT_STEP)
    profile = rng.uniform(0.08, 0.25) * rng.choice([-1.0, 1.0]) * np.tanh(s / width)
    profile += rng.uniform(-0.3, 0.4) / np.cosh(s / rng.uniform(1.0, 3.0)) ** 2
    radius = rng.uniform(0.4, 4.0) * grid.size
    curvature = rng.choice([-1.0, 1.0]) / (2.0 * radius)
    origin, direction = grid.random_point(rng, margin=-0.15), rng.uniform(0, 2 * np.pi)
    crest_length = rng.uniform(0.8, 2.0) * grid.size
    return _banded_feature(
        grid.xs, grid.ys, origin, direction, curvature, float(s[0]), profile.astype(np.float32), rng, crest_length
    )


def _atmospheric_gravity_waves(rng: np.random.Generator, grid: _Grid) -> np.ndarray:
    """Lee-wave-like bands: broad, sinusoidal, uniform amplitude and spacing (no rank order)."""
    wavelength = rng.uniform(60.0, 160.0)
    n_cycles = rng.uniform(4.0, 10.0)
    half_span = 0.5 * n_cycles * wavelength
    s = np.arange(-half_span - 2 * wavelength, half_span + 2 * wavelength, _LUT_STEP)
    taper = 0.5 * (1.0 - np.tanh((np.abs(s) - half_span) / (0.5 * wavelength)))
    profile = rng.uniform(0.08, 0.2) * np.sin(2 * np.pi * s / wavelength + rng.uniform(0, 2 * np.pi)) * taper
    curvature = rng.uniform(-1.0, 1.0) / (4.0 * grid.size)
    origin, direction = grid.random_point(rng, margin=-0.2), rng.uniform(0, 2 * np.pi)
    crest_length = rng.uniform(1.0, 2.0) * grid.size
    return _banded_feature(
        grid.half_xs, grid.half_ys, origin, direction, curvature, float(s[0]), profile.astype(np.float32), rng,
        crest_length,
    )


def _ships(rng: np.random.Generator, grid: _Grid, relative_nrcs: np.ndarray, targets: np.ndarray) -> None:
    """Ships: a bright point target (added to `targets`, unspeckled) with a dark turbulent wake
    and faint Kelvin arms (multiplied into `relative_nrcs`). Drawn in a bounding box only."""
    for _ in range(int(rng.integers(1, 4))):
        x0, y0 = grid.random_point(rng, margin=-0.05)
        heading = rng.uniform(0, 2 * np.pi)
        wake_length = rng.uniform(40.0, 200.0)
        hx, hy = math.cos(heading), math.sin(heading)
        x_end, y_end = x0 - wake_length * hx, y0 - wake_length * hy
        pad = 0.4 * wake_length + 8
        x_lo, x_hi = max(int(min(x0, x_end) - pad), 0), min(int(max(x0, x_end) + pad) + 1, grid.width)
        y_lo, y_hi = max(int(min(y0, y_end) - pad), 0), min(int(max(y0, y_end) + pad) + 1, grid.height)
        if x_lo >= x_hi or y_lo >= y_hi:
            continue
        dx = grid.xs[x_lo:x_hi][None, :] - np.float32(x0)
        dy = grid.ys[y_lo:y_hi][:, None] - np.float32(y0)
        behind = -(dx * np.float32(hx) + dy * np.float32(hy))  # distance behind the ship
        across = dy * np.float32(hx) - dx * np.float32(hy)
        along = np.clip(behind / np.float32(wake_length), 0, None)
        fade = np.where(behind > 0, np.exp(-along * 2.0), 0.0).astype(np.float32)
        wake_width = rng.uniform(1.5, 4.0) * (1.0 + along)
        wake = -rng.uniform(0.3, 0.6) * np.exp(-((across / wake_width) ** 2)) * fade
        kelvin = np.abs(across) - behind * np.float32(math.tan(math.radians(19.5)))
        wake += rng.uniform(0.0, 0.3) * np.exp(-((kelvin / 1.5) ** 2)) * fade * (behind < 0.6 * wake_length)
        relative_nrcs[y_lo:y_hi, x_lo:x_hi] *= 1.0 + wake
        r2 = dx * dx + dy * dy
        sigma = rng.uniform(0.7, 1.5)
        brightness = rng.uniform(5.0, 40.0)
        point = np.exp(-r2 / np.float32(2 * sigma**2))
        # Azimuth/range sidelobes: a faint, short cross through the target.
        cross = np.exp(-(dx * dx) / np.float32(2 * sigma**2)) + np.exp(-(dy * dy) / np.float32(2 * sigma**2))
        sidelobe_level, sidelobe_length = rng.uniform(0.005, 0.02), rng.uniform(8.0, 25.0)
        point += np.float32(sidelobe_level) * cross * np.exp(-np.sqrt(r2) / np.float32(sidelobe_length))
        targets[y_lo:y_hi, x_lo:x_hi] += np.float32(brightness) * point


# ---------- the vignette ----------
def render_scene(rng: np.random.Generator, positive: bool, height: int, width: int) -> tuple[np.ndarray, SceneInfo]:
    """Render one vignette and describe its contents.

    Returns a float64 (height, width) quicklook intensity in [0, 1] (mean ~0.38, std ~0.15, like
    the real IWS training set) and a `SceneInfo` with the packets and look-alikes drawn.
    """
    grid = _Grid(height, width)
    wind_direction = rng.uniform(0, np.pi)
    looks = rng.uniform(3.0, 5.0)
    lookalike_factor = _POSITIVE_LOOKALIKE_FACTOR if positive else 1.0
    lookalikes = tuple(name for name in LOOKALIKES if rng.random() < _LOOKALIKE_PROBABILITY[name] * lookalike_factor)

    # Smooth, broad components at half resolution, then upsampled once.
    smooth = _ocean_background(rng, grid, wind_direction)
    if "rain" in lookalikes:
        smooth += _rain_cells(rng, grid)
    if "slick" in lookalikes:
        smooth += _slicks(rng, grid, wind_direction)
    if "atmospheric_gravity_wave" in lookalikes:
        smooth += _atmospheric_gravity_waves(rng, grid)
    modulation = cv2.resize(smooth, (width, height), interpolation=cv2.INTER_LINEAR)

    # Sharp components at full resolution.
    packets: list[PacketInfo] = []
    if positive:
        n_packets = 2 if rng.random() < _SECOND_PACKET_PROBABILITY else 1
        for _ in range(n_packets):
            packet, info = _internal_wave_packet(rng, grid, faint=rng.random() < _FAINT_PACKET_PROBABILITY)
            modulation += packet
            packets.append(info)
    if "front" in lookalikes:
        modulation += _front(rng, grid)

    relative_nrcs = np.maximum(modulation + np.float32(1.0), np.float32(0.05))
    targets = np.zeros_like(relative_nrcs)
    if "ship" in lookalikes:
        _ships(rng, grid, relative_nrcs, targets)

    speckle = rng.standard_gamma(looks, size=(height, width), dtype=np.float32)
    intensity = relative_nrcs * speckle  # speckle mean is `looks`: scale cancels below
    intensity += targets * np.float32(looks)

    # Quicklook: power-law compression, mean set per image, clipped to [0, 1].
    exponent = rng.uniform(0.55, 0.9)
    target_mean = rng.uniform(0.34, 0.42)
    quicklook = np.power(intensity, np.float32(exponent))
    quicklook *= np.float32(target_mean / float(quicklook.mean(dtype=np.float64)))
    np.clip(quicklook, 0.0, 1.0, out=quicklook)
    return quicklook.astype(np.float64), SceneInfo(positive, tuple(packets), lookalikes, float(looks))


def render_vignette(rng: np.random.Generator, positive: bool, height: int, width: int) -> np.ndarray:
    """A float64 (height, width) quicklook intensity in [0, 1]; with an internal-wave packet
    when `positive`. See `render_scene` for the description of its contents."""
    return render_scene(rng, positive, height, width)[0]


# ---------- PNG ----------
def encode_png(field: np.ndarray, fmt: str, row_filter: str = "paeth") -> bytes:
    """Quantise an intensity image in [0, 1] and encode it as PNG.

    rgba16: R=G=B=round(65535·v), A=65535, 16 bits per channel (like real IWS files);
    gray8 / gray16: one channel; rgb8: R=G=B at 8 bits. `row_filter` is one of ROW_FILTERS.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if row_filter not in ROW_FILTERS:
        raise ValueError(f"unknown row filter {row_filter!r}; expected one of {tuple(ROW_FILTERS)}")
    if field.ndim != 2:
        raise ValueError(f"expected a 2-D intensity image, got shape {field.shape}")
    deep = fmt.endswith("16")
    full_scale = 65535 if deep else 255
    grey = np.rint(np.clip(field, 0.0, 1.0) * full_scale).astype(np.uint16 if deep else np.uint8)
    if fmt.startswith("gray"):
        image = grey
    else:
        # OpenCV writes channels in B, G, R(, A) order.
        channels = [grey, grey, grey]
        if fmt == "rgba16":
            channels.append(np.full_like(grey, full_scale))
        image = np.stack(channels, axis=-1)
    ok, buffer = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_FILTER, ROW_FILTERS[row_filter], *_PNG_DEFLATE])
    if not ok:
        raise RuntimeError("cv2.imencode failed to encode PNG")
    return buffer.tobytes()


# PNG filter type numbers (PNG spec 9.2) of the row filters encode_png_samples writes; "all" cycles through them.
_FILTER_TYPES = {"none": 0, "sub": 1, "up": 2, "average": 3, "paeth": 4, "all": None}
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


def encode_png_samples(samples: np.ndarray, color_type: int, bit_depth: int, *, interlace: bool = False,
                       palette: np.ndarray | None = None, row_filter: str = "paeth") -> bytes:
    """Any PNG format, written with NumPy: (H, W, C) stored samples (palette indices for colour type 3) -> PNG bytes,
    Adam7-interlaced on request. For the formats OpenCV does not write (palette, 1/2/4-bit, grey+alpha, Adam7): the
    general decoder's tests and benchmark. `row_filter` "all" gives row r of each pass filter type (pass + r) % 5."""
    import struct
    import zlib

    if row_filter not in _FILTER_TYPES:
        raise ValueError(f"unknown row filter {row_filter!r}; expected one of {tuple(_FILTER_TYPES)}")
    height, width, channels = samples.shape
    bpp = max(1, channels * bit_depth // 8)

    def scanlines(sub: np.ndarray) -> np.ndarray:  # (h, w, c) samples -> (h, row_bytes) bytes as PNG stores them
        if bit_depth == 16:
            return np.ascontiguousarray(sub.astype(">u2")).view(np.uint8).reshape(sub.shape[0], -1)
        if bit_depth == 8:
            return np.ascontiguousarray(sub.astype(np.uint8)).reshape(sub.shape[0], -1)
        bits = np.unpackbits(sub.astype(np.uint8).reshape(sub.shape[0], -1, 1), axis=2)[:, :, 8 - bit_depth:]
        return np.packbits(bits.reshape(sub.shape[0], -1), axis=1)

    def filtered(rows: np.ndarray, first: int) -> bytes:  # every row at once: the predictors read unfiltered bytes
        x = rows.astype(np.int32)
        a, b, c = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
        a[:, bpp:], b[1:], c[1:, bpp:] = x[:, :-bpp], x[:-1], x[:-1, :-bpp]
        pa, pb, pc = np.abs(b - c), np.abs(a - c), np.abs(a + b - 2 * c)
        paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        predictors = np.stack([np.zeros_like(x), a, b, (a + b) >> 1, paeth])
        fixed = _FILTER_TYPES[row_filter]
        types = np.array([(first + r) % 5 if fixed is None else fixed for r in range(len(x))], np.int64)
        out = (x - predictors[types, np.arange(len(x))]) & 0xFF
        return np.concatenate([types[:, None], out], axis=1).astype(np.uint8).tobytes()

    if interlace:
        subs = [samples[y0::dy, x0::dx] for x0, y0, dx, dy in _ADAM7]
        raw = b"".join(filtered(scanlines(sub), k) for k, sub in enumerate(subs) if sub.size)
    else:
        raw = filtered(scanlines(samples), 0)

    def chunk(ctype: bytes, body: bytes = b"") -> bytes:
        return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(ctype)))

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, int(interlace))
    plte = b"" if palette is None else chunk(b"PLTE", np.asarray(palette, np.uint8).tobytes())
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + plte + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND"))


# ---------- data sets ----------
def vignette_ids(n: int) -> list[str]:
    """Zero-padded ids (iws_000000, …), wider when n needs it so they sort."""
    digits = max(6, len(str(max(n - 1, 0))))
    return [f"iws_{i:0{digits}d}" for i in range(n)]


def vignette_labels(n: int, positive_fraction: float, seed: int) -> np.ndarray:
    """Exactly round(n·positive_fraction) ones, deterministically shuffled by `seed`."""
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
    labels = np.zeros(n, dtype=np.int64)
    labels[: round(n * positive_fraction)] = 1
    # A stream of its own (spawn key) so it never coincides with an image's default_rng([seed, i]).
    np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0x1ABE15,))).shuffle(labels)
    return labels


def _write_vignette(path: Path, seed: int, index: int, positive: bool, height: int, width: int, fmt: str) -> None:
    field = render_vignette(np.random.default_rng([seed, index]), positive, height, width)
    path.write_bytes(encode_png(field, fmt))


def generate(
    out_dir: str | os.PathLike,
    n: int,
    *,
    fmt: str = "rgba16",
    size: tuple[int, int] = DEFAULT_SIZE,
    seed: int = 0,
    positive_fraction: float = 0.5,
    workers: int | None = None,
    progress: Callable[[int], object] | None = None,
) -> list[tuple[str, int]]:
    """Write n vignettes `out_dir/<id>.png` and `out_dir/labels.csv` (`id,ground_truth`, 1 =
    internal wave present) and return the (id, ground_truth) rows in id order.

    `size` is (width, height). Image i is rendered from `default_rng([seed, i])` and its label, so
    the files are identical whatever `workers` is (None: one per CPU). `progress`, if given, is
    called with the number of images written so far.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    width, height = size
    if width < 8 or height < 8:
        raise ValueError(f"size (width, height) too small: {size}")
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [(vid, int(label)) for vid, label in zip(vignette_ids(n), vignette_labels(n, positive_fraction, seed))]
    jobs = [(out / f"{vid}.png", seed, i, bool(label), height, width, fmt) for i, (vid, label) in enumerate(rows)]

    if workers <= 1:
        for done, job in enumerate(jobs, 1):
            _write_vignette(*job)
            if progress is not None:
                progress(done)
    else:
        # Threads suffice: the big NumPy operations, the Gamma sampler and cv2.imencode release the GIL.
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(_write_vignette, *job) for job in jobs]
            for done, future in enumerate(as_completed(futures), 1):
                future.result()
                if progress is not None:
                    progress(done)

    with open(out / LABELS_FILE, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["id", "ground_truth"])
        writer.writerows(rows)
    return rows
