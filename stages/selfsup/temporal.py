"""Temporal smoothing of per-frame labels within a recording.

The network labels every frame on its own, so its labels jitter from frame to frame more
than a face moves: on 3 tiny subjects round 0 scored Smoothness 0.80 where the truth's
own labels score 0.905 (SPEC §5.1; docs/selfsup.md, benchmarks/smooth_labels.py). A Gaussian over time of a
fraction of a frame period removes that jitter and leaves peaks, blinks and closures,
which last many frames, as they were. Frames that are not usable (rejected) neither
take part in their neighbours' values nor are changed: a normalised convolution.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter1d


def smooth_frames(values: np.ndarray, usable: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing along axis 0 over the usable frames only.

    Args:
        values: (T, ...) per-frame values of one recording, in frame order.
        usable: (T,) bool frames that take part; the others are returned unchanged.
        sigma: standard deviation in frames; 0 returns ``values`` unchanged.

    Returns:
        (T, ...) float64 smoothed values.
    """
    x = np.asarray(values, np.float64)
    if sigma <= 0 or len(x) < 2:
        return x.copy()
    w = np.asarray(usable, np.float64).reshape(-1, *([1] * (x.ndim - 1)))
    num = gaussian_filter1d(np.where(w > 0, x, 0.0), sigma, axis=0, mode="nearest")
    den = gaussian_filter1d(np.broadcast_to(w, x.shape).astype(np.float64), sigma, axis=0, mode="nearest")
    out = np.where(den > 1e-12, num / np.maximum(den, 1e-12), x)
    return np.where(w > 0, out, x)


def smooth_quaternions(quat: np.ndarray, usable: np.ndarray, sigma: float) -> np.ndarray:
    """(T, 4) unit quaternions (w, x, y, z) smoothed like :func:`smooth_frames`: signs aligned
    with the previous frame first (q and -q are one rotation), then renormalised, w >= 0."""
    q = np.asarray(quat, np.float64).copy()
    for t in range(1, len(q)):
        if np.dot(q[t], q[t - 1]) < 0:
            q[t] = -q[t]
    q = smooth_frames(q, usable, sigma)
    q /= np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return np.where(q[:, :1] < 0, -q, q)
