"""Seeding the IR albedo map from the phone's UV texture.

The near-IR albedo of skin is not the visible one, but it is ordered like it (brows,
lips and shadows of the texture stay darker), so the seed is the texture's luminance
(Rec. 709 weights of linear RGB, a generic choice, not the headset's) and the appearance
model fits a monotone map from it (:mod:`rigs.render.appearance`). Texels no phone frame
saw are filled smoothly from the seen ones (pull-push), and carry confidence 0.
"""

from __future__ import annotations

import numpy as np

#: Rec. 709 luminance of linear RGB: only the seed; the IR response to it is fitted.
REC709 = np.array([0.2126, 0.7152, 0.0722])


def pull_push_fill(values: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Fills texels of zero weight smoothly from weighted ones.

    Pull: halve the resolution with weighted means until every texel has support; push:
    each level's holes take the (nearest-upsampled) coarser level's value.

    Args:
        values: (H, W) float values, meaningful where ``weight`` > 0.
        weight: (H, W) float >= 0.

    Returns:
        (H, W) float64: ``values`` where weight > 0, the fill elsewhere (all zeros if
        no texel has weight).
    """
    v, w = np.asarray(values, np.float64), np.asarray(weight, np.float64)
    if not (w > 0).any():
        return np.zeros_like(v)
    if (w > 0).all() or min(v.shape) <= 1:
        return np.where(w > 0, v, (v * w).sum() / w.sum())
    h, wd = v.shape
    pad = ((0, h % 2), (0, wd % 2))
    vp, wp = np.pad(v * w, pad), np.pad(w, pad)
    sv = vp.reshape(vp.shape[0] // 2, 2, vp.shape[1] // 2, 2).sum((1, 3))
    sw = wp.reshape(wp.shape[0] // 2, 2, wp.shape[1] // 2, 2).sum((1, 3))
    coarse = pull_push_fill(np.divide(sv, sw, out=np.zeros_like(sv), where=sw > 0), sw)
    up = np.repeat(np.repeat(coarse, 2, 0), 2, 1)[:h, :wd]
    return np.where(w > 0, v, up)


def resize_mean(image: np.ndarray, weight: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Weighted box-downsampling of (H, W) ``image`` to ``shape`` (an integer factor of it).

    Returns:
        (values, weight) at ``shape``; the weight is the block mean of ``weight``.
    """
    fy, fx = image.shape[0] // shape[0], image.shape[1] // shape[1]
    if fy * shape[0] != image.shape[0] or fx * shape[1] != image.shape[1]:
        raise ValueError(f"cannot box-resize {image.shape} to {shape}")
    sv = (image * weight).reshape(shape[0], fy, shape[1], fx).sum((1, 3))
    sw = weight.reshape(shape[0], fy, shape[1], fx).sum((1, 3))
    return np.divide(sv, sw, out=np.zeros_like(sv), where=sw > 0), sw / (fy * fx)


def luminance_seed(rgb_linear: np.ndarray, confidence: np.ndarray, resolution: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """The albedo seed and its confidence from a linear RGB UV texture.

    Args:
        rgb_linear: (H, W, 3) linear RGB in [0, 1] (e.g. ``UvTexture.image(linear=True)[0]``).
        confidence: (H, W) >= 0 observation weight, 0 = unseen.
        resolution: texels per UV tile side of the result (H must be a multiple of it);
            the texture's own by default.

    Returns:
        (seed (h, w) float32 luminance, filled where unseen; confidence (h, w) float32 in
        [0, 1], the weight over its 95th percentile among seen texels, clipped).
    """
    lum = np.asarray(rgb_linear, np.float64) @ REC709
    conf = np.asarray(confidence, np.float64)
    if resolution is not None and resolution != lum.shape[0]:
        tiles = lum.shape[1] // lum.shape[0]
        lum, conf = resize_mean(lum, conf, (resolution, tiles * resolution))
    seen = conf > 0
    scale = np.percentile(conf[seen], 95) if seen.any() else 1.0
    filled = pull_push_fill(lum, conf)
    return filled.astype(np.float32), np.clip(conf / max(scale, 1e-12), 0, 1).astype(np.float32)
