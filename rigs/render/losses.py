"""Image and keypoint losses for fitting through the renderer."""

from __future__ import annotations

import torch


def masked_l2(rendered: torch.Tensor, observed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference over ``mask``.

    Args:
        rendered: (F, C, H, W) rendered intensities.
        observed: (F, C, H, W) observed intensities (same scale, e.g. uint8 / 255).
        mask: (F, C, H, W) bool or weights (e.g. the rendered mask, minus saturated or
            invalid observed pixels).

    Returns:
        () the weighted mean of squared differences (0 for an empty mask).
    """
    w = mask.to(rendered.dtype)
    return ((rendered - observed) ** 2 * w).sum() / w.sum().clamp_min(1.0)


def keypoint_l2(projected: torch.Tensor, observed: torch.Tensor, confidence: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared reprojection error (pixels^2) over the observed keypoints.

    Args:
        projected: (F, C, L, 2) projections of the model's keypoints.
        observed: (F, C, L, 2) detections; NaN where missing.
        confidence: (F, C, L) weights; 1 by default (0 where missing either way).

    Returns:
        () the weighted mean of squared distances.
    """
    present = torch.isfinite(observed).all(-1)
    w = present.to(projected.dtype) if confidence is None else confidence.to(projected.dtype) * present
    d2 = ((projected - torch.nan_to_num(observed)) ** 2).sum(-1)
    return torch.where(present, d2 * w, 0.0).sum() / w.sum().clamp_min(1e-12)


def rescale_pixels(pixels: torch.Tensor, factor: float) -> torch.Tensor:
    """Pixel coordinates of an image ``factor`` times the size (centres at integers)."""
    return (pixels + 0.5) * factor - 0.5
