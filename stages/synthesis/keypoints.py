"""Simulated external-detector keypoints on the HMC embedded cameras.

A real landmark detector is not the truth plus white noise. It has:
- a per-point bias: its definition of a point differs from ours and depends on the view,
  so each (camera, point) of a subject gets one fixed offset;
- per-frame jitter of a few pixels;
- a few gross outliers (a lip corner snapped to a shadow), reported with ordinary
  confidence, since detectors are confidently wrong;
- dropouts: no point where the surface point is hidden (the first ray hit is another
  surface) or too close to the image border for the detector's crop.

A dropped point follows the keypoints contract (docs/capture-format.md): NaN pixels and
confidence 0. Pixel figures are given at the 400 px reference width and scale with the
image width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Image width at which the detector's pixel figures are given.
REFERENCE_WIDTH_PX = 400


@dataclass(frozen=True)
class KeypointDetector:
    """Error model of the simulated detector (pixels at 400 px width).

    Attributes:
        bias_px: standard deviation, per axis, of each (camera, point)'s fixed offset;
            drawn once per subject, shared by its recordings.
        noise_px: standard deviation, per axis, of the per-frame jitter.
        noise_tail_dof: 0 for Gaussian jitter; otherwise the degrees of freedom of a
            Student-t jitter scaled to the same standard deviation (heavier tails).
        outlier_rate: fraction of detected points that are gross outliers.
        outlier_px: (min, max) distance of an outlier from the true point, uniform,
            in a uniformly random direction (bias and jitter are not added).
        border_margin_px: a point whose true pixel lies closer than this to the image
            border is dropped.
        confidence: (min, max) of the uniform confidence of a detected point.
    """

    bias_px: float = 2.0
    noise_px: float = 1.5
    noise_tail_dof: float = 0.0
    outlier_rate: float = 0.01
    outlier_px: tuple[float, float] = (15.0, 40.0)
    border_margin_px: float = 6.0
    confidence: tuple[float, float] = (0.7, 1.0)

    def __post_init__(self) -> None:
        from pipeline.errors import ConfigError

        if self.noise_tail_dof != 0 and self.noise_tail_dof <= 2:
            raise ConfigError(f"noise_tail_dof must be 0 (Gaussian) or > 2 (finite variance), got {self.noise_tail_dof}")
        if not 0 <= self.outlier_rate <= 1:
            raise ConfigError(f"outlier_rate must be in [0, 1], got {self.outlier_rate}")


def draw_bias(detector: KeypointDetector, rng: np.random.Generator, cameras: int, points: int, width: int) -> np.ndarray:
    """(cameras, points, 2) float64 fixed offsets, pixels at ``width``."""
    return rng.normal(size=(cameras, points, 2)) * detector.bias_px * width / REFERENCE_WIDTH_PX


def near_border(pixels: np.ndarray, width: int, height: int, margin_px: float) -> np.ndarray:
    """(...,) whether pixels (..., 2) lie within ``margin_px`` of the image border (or outside).

    Pixel centres are integers, so the image spans [-0.5, width - 0.5].
    """
    x, y = pixels[..., 0], pixels[..., 1]
    return (x < margin_px - 0.5) | (x > width - 0.5 - margin_px) | (y < margin_px - 0.5) | (y > height - 0.5 - margin_px)


def _jitter(detector: KeypointDetector, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Unit-variance jitter: Gaussian, or Student-t with ``noise_tail_dof`` > 2."""
    dof = detector.noise_tail_dof
    if dof:
        return rng.standard_t(dof, size=shape) * np.sqrt((dof - 2) / dof)
    return rng.normal(size=shape)


def detect_keypoints(
    truth_px: np.ndarray,
    visible: np.ndarray,
    bias_px: np.ndarray,
    width: int,
    height: int,
    detector: KeypointDetector,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """One camera's detector output for a recording.

    Args:
        truth_px: (T, P, 2) true pixels of the points.
        visible: (T, P) whether each point's surface point is the first hit of its ray
            (and in front of the camera).
        bias_px: (P, 2) this camera's fixed offsets (:func:`draw_bias`).
        width, height: image size, pixels.
        detector: the error model.
        rng: random stream.

    Returns:
        (points (T, P, 2) float32, NaN where dropped; confidence (T, P) float32, 0 where dropped).
    """
    scale = width / REFERENCE_WIDTH_PX
    found = visible & ~near_border(truth_px, width, height, detector.border_margin_px * scale)
    jitter = _jitter(detector, rng, truth_px.shape) * detector.noise_px * scale
    points = truth_px + bias_px[None] + jitter
    outlier = rng.uniform(size=found.shape) < detector.outlier_rate
    angle = rng.uniform(0, 2 * np.pi, found.shape)
    radius = rng.uniform(*detector.outlier_px, found.shape) * scale
    gross = truth_px + (radius[..., None] * np.stack([np.cos(angle), np.sin(angle)], -1))
    points = np.where(outlier[..., None], gross, points)
    confidence = rng.uniform(*detector.confidence, found.shape)
    points = np.where(found[..., None], points, np.nan)
    return points.astype(np.float32), np.where(found, confidence, 0.0).astype(np.float32)
