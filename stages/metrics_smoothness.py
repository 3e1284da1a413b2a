"""Smoothness, the one label metric over the whole recording (SPEC §5.1, REFA 8.1).

x = mean |b(t+1) - 2 b(t) + b(t-1)| at 30 Hz over frames and blendshapes, never across a
gap; score = exp(-x / 0.02). docs/metrics.md states the conventions.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from stages.metrics_common import (
    SMOOTHNESS,
    Failure,
    MetricParams,
    MetricResult,
    PreparedLabels,
    prepare_labels,
)


def score_smoothness(rec: PreparedLabels, fps: float, p: MetricParams) -> MetricResult:
    """:func:`smoothness` on prepared labels, with parameters from ``p``."""
    fi, t = rec.frame_index, rec.b.shape[0]
    cols = np.array([k for k, nm in enumerate(rec.names) if nm not in p.smooth_exclude],
                    dtype=np.int64)
    if t < 3 or cols.size == 0:
        return MetricResult(SMOOTHNESS, None, 0)
    # A step between consecutive rows is usable when the frames are adjacent, both
    # labelled, and the clock did not stall or go backwards.
    step_ok = (np.diff(fi) == 1) & rec.usable[:-1] & rec.usable[1:]
    if rec.timestamp_ns is not None:
        dt = np.diff(rec.timestamp_ns)
        step_ok &= (dt > 0) & (dt <= p.gap_factor * 1e9 / fps)
    centres = np.nonzero(step_ok[:-1] & step_ok[1:])[0] + 1
    if centres.size == 0:
        return MetricResult(SMOOTHNESS, None, 0)
    bc = rec.b[:, cols]
    d2 = np.abs(bc[centres + 1] - 2.0 * bc[centres] + bc[centres - 1])
    # Second differences scale with dt^2: express them per (1/30 s)^2 at any rate.
    d2 *= (fps / p.smooth_reference_hz) ** 2
    x = float(d2.mean())
    per_frame = d2.mean(axis=1)
    worst = np.argsort(-per_frame, kind="stable")[: max(p.smooth_top_k, 0)]
    failures = tuple(
        Failure(None, rec.names[cols[int(np.argmax(d2[w]))]], int(fi[centres[w]]) - 1,
                int(fi[centres[w]]) + 2, float(per_frame[w]), None,
                "large second difference (mean over blendshapes)")
        for w in worst
        if per_frame[w] > 0
    )
    return MetricResult(SMOOTHNESS, math.exp(-x / p.smooth_scale), int(centres.size),
                        None, failures)


def smoothness(
    b: np.ndarray,
    names: Sequence[str],
    frame_index: np.ndarray,
    timestamp_ns: np.ndarray | None,
    *,
    status: Sequence[Any] | None = None,
    fps: float = 30.0,
    scale: float = 0.02,
    reference_hz: float = 30.0,
    gap_factor: float = 1.5,
    exclude: Collection[str] = frozenset(),
    top_k: int = 20,
) -> MetricResult:
    """Smoothness: exp(-x / scale), x = mean |b(t+1) - 2 b(t) + b(t-1)| at 30 Hz.

    x is the mean over every frame t whose neighbours t-1 and t+1 are present
    (consecutive frame indices), usable (status ok, finite) and within ``gap_factor``
    frame periods in time (a step <= 0 ns also breaks), and over the blendshapes not in
    ``exclude``. At another rate the second differences are multiplied by
    (fps / reference_hz)^2, i.e. expressed per (1/30 s)^2 (see docs/metrics.md).

    Args:
        b: (T, K) coefficients, columns in ``names`` order.
        names: (K,) blendshape names.
        frame_index: (T,) frame indices.
        timestamp_ns: (T,) timestamps, or None to use frame indices only.
        status: (T,) per-frame status, or None.
        fps: the recording's nominal frame rate.
        scale: the decay constant (0.02).
        reference_hz: the rate second differences are expressed at (30).
        gap_factor: timestamp step in frame periods above which there is a gap (1.5).
        exclude: blendshapes left out (none by SPEC).
        top_k: how many worst frames to report as failures.

    Returns:
        The result; n_items = frames with a second difference; failures = the top_k
        frames with the largest mean |second difference| (value at 30 Hz).
    """
    rec = prepare_labels(b, names, frame_index, timestamp_ns, status)
    params = MetricParams(smooth_scale=scale, smooth_reference_hz=reference_hz,
                          gap_factor=gap_factor, smooth_exclude=frozenset(exclude),
                          smooth_top_k=top_k)
    return score_smoothness(rec, fps, params)
