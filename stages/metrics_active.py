"""Ground-truth label metrics that a muted labeller cannot fool (SPEC §5.2).

Labels are sparse: most (frame, basis) pairs are 0 in the truth, so the plain blendshape
MAE of an all-zero labeller is already small (about 0.015 on ``tiny`` subjects). The
metrics here look only where the truth moves:

- :func:`active_mae`: the MAE over the (frame, basis) pairs whose true value is >= 0.1;
- :func:`amplitude_ratio`: per basis, the label's 90th percentile over the peak windows
  that activate the basis divided by the truth's (1 = not muted), median over bases;
- :func:`active_frames` / :func:`mesh_error_on_frames`: the expression-mesh error over
  the frames whose largest true coefficient is >= 0.3.

Inputs are row-aligned arrays of the same frames chosen by the caller, as in
``stages.metrics_gt``. docs/metrics.md §5 states every formula and threshold.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import StageError
from stages.metrics_common import MetricResult, per_basis_results, scalar_result, segments_of
from stages.metrics_gt import MeshError

ACTIVE_MAE = "active_mae"
AMPLITUDE_RATIO = "amplitude_ratio"
EXPRESSION_MESH_ERROR_ACTIVE = "expression_mesh_error_active_mm"

#: A (frame, basis) pair is active when its true value is at least this (SPEC §5.2).
ACTIVE_VALUE = 0.1
#: A frame is active for the mesh error when its largest true coefficient is at least this.
ACTIVE_FRAME_VALUE = 0.3
#: A peak window activates a basis when the truth's P90 over the window is at least this;
#: a basis no peak window activates has no amplitude ratio (0/0 says nothing).
AMPLITUDE_MIN_TRUE = 0.05
#: The percentile of the amplitude ratio (SPEC §5.2: the 90th).
AMPLITUDE_PERCENTILE = 90.0


def _compared(
    b_est: np.ndarray,
    b_true: np.ndarray,
    names: Sequence[str],
    exclude: Collection[str],
    names_true: Sequence[str] | None,
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(compared names, est (T, k), true (T, k)): the non-excluded bases, truth reordered."""
    est = np.asarray(b_est, dtype=np.float64)
    true = np.asarray(b_true, dtype=np.float64)
    names = tuple(names)
    names_true = names if names_true is None else tuple(names_true)
    if est.ndim != 2 or est.shape[1] != len(names):
        raise StageError(f"b_est must be (T, {len(names)}), got {est.shape}")
    if true.shape != (est.shape[0], len(names_true)):
        raise StageError(f"b_true must be ({est.shape[0]}, {len(names_true)}), got {true.shape}")
    if not (np.all(np.isfinite(est)) and np.all(np.isfinite(true))):
        raise StageError("labels or truth have non-finite values; select the frames to compare first")
    compared = [n for n in names if n not in set(exclude)]
    missing = [n for n in compared if n not in names_true]
    if missing:
        raise StageError(f"ground truth lacks blendshapes {missing}")
    return (compared, est[:, [names.index(n) for n in compared]],
            true[:, [names_true.index(n) for n in compared]])


# --- Active MAE ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ActiveMae:
    """Blendshape MAE over the active (frame, basis) pairs.

    Attributes:
        mae: mean |b - b_gt| over the pairs with b_gt >= threshold; None without any.
        per_basis: {name: mean over the basis's active frames, None without any}.
        n_pairs: active (frame, basis) pairs.
    """

    mae: float | None
    per_basis: dict[str, float | None]
    n_pairs: int

    def as_results(self) -> dict[str, MetricResult]:
        """{"active_mae": ..., "active_mae/<name>": ...} for the metrics table."""
        return per_basis_results(ACTIVE_MAE, self.mae, self.n_pairs, self.per_basis,
                                 {name: 0 if v is None else 1 for name, v in self.per_basis.items()})


def active_mae(
    b_est: np.ndarray,
    b_true: np.ndarray,
    names: Sequence[str],
    *,
    exclude: Collection[str] = frozenset(),
    names_true: Sequence[str] | None = None,
    threshold: float = ACTIVE_VALUE,
) -> ActiveMae:
    """Mean |b - b_gt| over the (frame, basis) pairs whose true value is >= ``threshold``.

    Args:
        b_est: (T, K) labelled coefficients, columns in ``names`` order.
        b_true: (T, K') true coefficients, columns in ``names_true`` order (default
            ``names``).
        names: (K,) names of ``b_est``'s columns.
        exclude: bases not compared (pass the eye-following shapes).
        names_true: (K',) names of ``b_true``'s columns when they differ in order.
        threshold: the true value from which a pair is active (SPEC: 0.1).

    Returns:
        The mean over all active pairs (every pair weighs the same) and per basis.
    """
    compared, est, true = _compared(b_est, b_true, names, exclude, names_true)
    active = true >= threshold
    err = np.abs(est - true)
    per = {}
    for j, name in enumerate(compared):
        n = int(active[:, j].sum())
        per[name] = float(err[active[:, j], j].mean()) if n else None
    n_pairs = int(active.sum())
    return ActiveMae(float(err[active].mean()) if n_pairs else None, per, n_pairs)


# --- Amplitude ratio -----------------------------------------------------------------------


@dataclass(frozen=True)
class AmplitudeRatio:
    """Label amplitude against the truth's in the peak windows, per basis.

    Attributes:
        median: median over the rated bases of ``per_basis``; None when no basis is rated.
        per_basis: {name: P90(label) / P90(truth)} over the peak windows that activate the
            basis; only bases some window activates.
        n_windows: {name: how many peak windows activate the basis}.
    """

    median: float | None
    per_basis: dict[str, float]
    n_windows: dict[str, int]

    def as_results(self) -> dict[str, MetricResult]:
        """{"amplitude_ratio": median, "amplitude_ratio/<name>": ...} (n_items = bases, windows)."""
        return per_basis_results(AMPLITUDE_RATIO, self.median, len(self.per_basis), self.per_basis, self.n_windows)


def amplitude_ratio(
    b_est: np.ndarray,
    b_true: np.ndarray,
    names: Sequence[str],
    frame_index: np.ndarray,
    segments: Sequence[Any],
    *,
    exclude: Collection[str] = frozenset(),
    names_true: Sequence[str] | None = None,
    min_true: float = AMPLITUDE_MIN_TRUE,
    percentile: float = AMPLITUDE_PERCENTILE,
) -> AmplitudeRatio:
    """Per basis, P90 of the label over its peak windows divided by the truth's P90 there.

    For basis i the windows are the ``peak`` segments whose truth activates i (the truth's
    ``percentile`` of b_i over the window's given frames is >= ``min_true``); the frames of
    those windows are pooled and the ratio is P(label_i) / P(truth_i) over the pool.
    Windows where the truth leaves i at rest are left out, so a basis that one prompt
    moves is not diluted by the others; a basis no window activates is not rated.

    Args:
        b_est: (T, K) labelled coefficients, columns in ``names`` order.
        b_true: (T, K') true coefficients (``names_true`` order, default ``names``).
        names: (K,) names of ``b_est``'s columns.
        frame_index: (T,) frame indices of the rows (segments refer to these).
        segments: the recording's segments (objects or mappings with kind, start, end);
            only ``peak`` ones are used, frames ``start <= frame_index < end``.
        exclude: bases not rated (pass the eye-following shapes).
        names_true: (K',) names of ``b_true``'s columns when they differ in order.
        min_true: the truth's percentile from which a window activates a basis.
        percentile: the percentile compared (SPEC: 90).

    Returns:
        The per-basis ratios and their median (1 = not muted, 0 = all zero).
    """
    compared, est, true = _compared(b_est, b_true, names, exclude, names_true)
    fi = np.asarray(frame_index)
    if fi.shape != (est.shape[0],):
        raise StageError(f"frame_index must be ({est.shape[0]},), got {fi.shape}")
    windows = [(fi >= s) & (fi < e) for _, _, s, e in segments_of(segments, ("peak",))]
    windows = [w for w in windows if w.any()]
    per: dict[str, float] = {}
    n_windows: dict[str, int] = {}
    for j, name in enumerate(compared):
        active = [w for w in windows if np.percentile(true[w, j], percentile) >= min_true]
        if not active:
            continue
        pool = np.logical_or.reduce(active)
        den = np.percentile(true[pool, j], percentile)
        if den > 0:  # always, up to interpolation between the windows' order statistics
            per[name] = float(np.percentile(est[pool, j], percentile) / den)
            n_windows[name] = len(active)
    median = float(np.median(list(per.values()))) if per else None
    return AmplitudeRatio(median, per, n_windows)


# --- Expression-mesh error on active frames ------------------------------------------------


def active_frames(
    b_true: np.ndarray,
    names: Sequence[str],
    *,
    exclude: Collection[str] = frozenset(),
    threshold: float = ACTIVE_FRAME_VALUE,
) -> np.ndarray:
    """(T,) bool: frames whose largest true coefficient (outside ``exclude``) is >= threshold.

    Args:
        b_true: (T, K) true coefficients, columns in ``names`` order.
        names: (K,) names.
        exclude: bases not considered (pass the eye-following shapes: gaze moves them).
        threshold: SPEC: 0.3.
    """
    b_true = np.asarray(b_true, dtype=np.float64)
    names = tuple(names)
    if b_true.ndim != 2 or b_true.shape[1] != len(names):
        raise StageError(f"b_true must be (T, {len(names)}), got {b_true.shape}")
    cols = [k for k, n in enumerate(names) if n not in set(exclude)]
    if not cols:
        return np.zeros(b_true.shape[0], bool)
    return b_true[:, cols].max(axis=1) >= threshold


def mesh_error_on_frames(
    error: MeshError, frames: np.ndarray, name: str = EXPRESSION_MESH_ERROR_ACTIVE
) -> dict[str, MetricResult]:
    """The mean of a mesh error over some frames, e.g. :func:`active_frames`.

    Every frame compares the same vertices, so the mean of the per-frame means is the
    mean over those frames and vertices.

    Args:
        error: the mesh error over all T frames.
        frames: (T,) bool, the frames to average.
        name: the metric's name.

    Returns:
        {name: mean mm over the frames, None without any} (n_items = frames).
    """
    frames = np.asarray(frames, bool)
    if frames.shape != error.per_frame_mm.shape:
        raise StageError(f"frames must be {error.per_frame_mm.shape} bool, got {frames.shape}")
    n = int(frames.sum())
    return {name: scalar_result(name, float(error.per_frame_mm[frames].mean()) if n else None, n)}
