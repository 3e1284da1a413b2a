"""The four window metrics that need no ground truth (SPEC §5.1, REFA 8.1).

Semantic Accuracy, Neutralness, Eye Closure and Mouth Closure test the labels inside
annotated segments. Each scores one recording in [0, 1], higher is better, and returns
None where the recording has no segment of the kind it needs (skipped, not zero).
docs/metrics.md states every formula and convention; the defaults of the keyword
arguments are SPEC's thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.errors import StageError
from stages.metrics_common import (
    EYE_CLOSURE,
    MOUTH_CLOSURE,
    NEUTRALNESS,
    SEMANTIC_ACCURACY,
    Failure,
    LipGap,
    MetricParams,
    MetricResult,
    PreparedLabels,
    Skip,
    pass_fraction,
    prepare_labels,
    segment_field,
    segments_of,
    window_percentile,
)

# --- Semantic Accuracy ----------------------------------------------------------------


def score_semantic_accuracy(
    rec: PreparedLabels,
    segments: Sequence[Any],
    art_priors: Mapping[str, Mapping[str, float]],
    p: MetricParams,
) -> MetricResult:
    """:func:`semantic_accuracy` on prepared labels, with thresholds from ``p``."""
    n = passed = 0
    failures: list[Failure] = []
    skipped: list[Skip] = []
    for i, seg, start, end in segments_of(segments, ("peak",)):
        prompt = segment_field(seg, "prompt")
        if prompt not in art_priors:
            raise StageError(f"peak segment {i}: prompt {prompt!r} has no art prior")
        prior = {k: float(v) for k, v in art_priors[prompt].items() if float(v) > 0}
        if not prior:
            continue
        rows = rec.window_rows(start, end)
        if rows.size == 0:
            skipped.append(Skip(i, "no usable frames in the window"))
            continue
        # Rig order, so failures list the same way whatever order the prior came in.
        for name in sorted(prior, key=rec.column):
            value = window_percentile(rec.b[rows, rec.column(name)], p.percentile)
            threshold = p.semantic_ratio * prior[name]
            n += 1
            if value >= threshold:
                passed += 1
            else:
                failures.append(
                    Failure(i, name, start, end, value, threshold,
                            f"p{p.percentile:g} below {p.semantic_ratio:g} x art prior")
                )
    return pass_fraction(SEMANTIC_ACCURACY, n, passed, failures, skipped)


def semantic_accuracy(
    b: np.ndarray,
    names: Sequence[str],
    frame_index: np.ndarray,
    segments: Sequence[Any],
    art_priors: Mapping[str, Mapping[str, float]],
    *,
    status: Sequence[Any] | None = None,
    ratio: float = 0.75,
    percentile: float = 90.0,
) -> MetricResult:
    """Semantic Accuracy: share of (peak window, prior blendshape) pairs that fire enough.

    For each ``peak`` segment with prompt p and each blendshape i with art prior
    a_i > 0: pass if the ``percentile``-th percentile of b_i over the window's usable
    frames is >= ``ratio`` * a_i. Score = passed / total.

    Args:
        b: (T, K) coefficients, columns in ``names`` order.
        names: (K,) blendshape names.
        frame_index: (T,) frame indices.
        segments: objects or mappings with kind, start, end, prompt.
        art_priors: prompt -> {blendshape: prior} (sparse).
        status: (T,) per-frame status, or None when all frames are labelled.
        ratio: the fraction of the prior to reach (0.75).
        percentile: the percentile tested (90).

    Returns:
        The result; value None when no peak window has a positive prior.

    Raises:
        StageError: a peak's prompt has no art prior or names an unknown blendshape.
    """
    rec = prepare_labels(b, names, frame_index, None, status)
    params = MetricParams(percentile=percentile, semantic_ratio=ratio)
    return score_semantic_accuracy(rec, segments, art_priors, params)


# --- Neutralness ------------------------------------------------------------------------


def _runs(frames: np.ndarray) -> list[tuple[int, int]]:
    """Splits sorted frame indices into runs of consecutive values: [(first, last+1)]."""
    if frames.size == 0:
        return []
    breaks = np.nonzero(np.diff(frames) != 1)[0]
    firsts = np.concatenate([[0], breaks + 1])
    lasts = np.concatenate([breaks, [frames.size - 1]])
    return [(int(frames[a]), int(frames[z]) + 1) for a, z in zip(firsts, lasts, strict=True)]


def score_neutralness(
    rec: PreparedLabels,
    segments: Sequence[Any],
    eye_following: Collection[str],
    fps: float,
    p: MetricParams,
) -> MetricResult:
    """:func:`neutralness` on prepared labels, with thresholds from ``p``."""
    if not any(True for _ in segments_of(segments, ("neutral",))):
        return MetricResult(NEUTRALNESS, None, 0)
    excluded = set(eye_following)
    cols = np.array([k for k, nm in enumerate(rec.names) if nm not in excluded], dtype=np.int64)
    if cols.size == 0:
        raise StageError("Neutralness needs at least one blendshape that is not eye-following")
    trim = int(math.floor(p.neutral_trim_s * fps + 0.5))  # round half up, not to even
    min_len = p.neutral_min_window_s * fps
    counted = np.zeros(rec.b.shape[0], dtype=bool)  # overlapping windows count a frame once
    n = passed = 0
    failures: list[Failure] = []
    skipped: list[Skip] = []
    for i, _, start, end in segments_of(segments, ("neutral",)):
        if end - start < min_len:
            skipped.append(Skip(i, f"window shorter than {p.neutral_min_window_s:g} s"))
            continue
        rows = rec.window_rows(start + trim, end - trim)
        rows = rows[~counted[rows]]
        if rows.size == 0:
            skipped.append(Skip(i, "no usable frames after trimming (or all in an earlier window)"))
            continue
        counted[rows] = True
        values = rec.b[np.ix_(rows, cols)]
        largest = values.max(axis=1)
        ok = largest < p.neutral_max
        n += rows.size
        passed += int(ok.sum())
        bad = rows[~ok]
        for first, stop in _runs(rec.frame_index[bad]):
            run = bad[(rec.frame_index[bad] >= first) & (rec.frame_index[bad] < stop)]
            run_vals = rec.b[np.ix_(run, cols)]
            r, c = np.unravel_index(np.argmax(run_vals), run_vals.shape)
            failures.append(
                Failure(i, rec.names[cols[c]], first, stop, float(run_vals[r, c]),
                        p.neutral_max, "largest coefficient not below the neutral threshold")
            )
    return pass_fraction(NEUTRALNESS, n, passed, failures, skipped)


def neutralness(
    b: np.ndarray,
    names: Sequence[str],
    frame_index: np.ndarray,
    segments: Sequence[Any],
    eye_following: Collection[str],
    *,
    status: Sequence[Any] | None = None,
    fps: float = 30.0,
    trim_s: float = 0.5,
    min_window_s: float = 1.0,
    max_coefficient: float = 0.15,
) -> MetricResult:
    """Neutralness: share of neutral frames whose largest coefficient stays small.

    Frames of ``neutral`` segments, ``trim_s * fps`` frames (rounded half up) trimmed at
    each end; a window with ``end - start < min_window_s * fps`` frames contributes
    nothing. A frame passes when max over the non-eye-following blendshapes is
    < ``max_coefficient``.
    Score = passing frames / frames (a frame in two windows counts once).

    Args:
        b: (T, K) coefficients, columns in ``names`` order.
        names: (K,) blendshape names.
        frame_index: (T,) frame indices.
        segments: objects or mappings with kind, start, end.
        eye_following: names excluded from the test.
        status: (T,) per-frame status, or None.
        fps: the recording's frame rate, which converts seconds to frames.
        trim_s: seconds trimmed at each end (0.5).
        min_window_s: shortest window that counts (1.0 s).
        max_coefficient: the threshold (0.15).

    Returns:
        The result; failures are runs of consecutive failing frames per window.
    """
    rec = prepare_labels(b, names, frame_index, None, status)
    params = MetricParams(neutral_trim_s=trim_s, neutral_min_window_s=min_window_s,
                          neutral_max=max_coefficient)
    return score_neutralness(rec, segments, eye_following, fps, params)


# --- Eye Closure ------------------------------------------------------------------------


def score_eye_closure(
    rec: PreparedLabels, segments: Sequence[Any], p: MetricParams
) -> MetricResult:
    """:func:`eye_closure` on prepared labels, with thresholds from ``p``."""
    events = list(segments_of(segments, ("eye_closure", "wink")))
    if not events:
        return MetricResult(EYE_CLOSURE, None, 0)
    left, right = rec.column(p.blink_left), rec.column(p.blink_right)
    n = passed = 0
    failures: list[Failure] = []
    skipped: list[Skip] = []
    for i, seg, start, end in events:
        if segment_field(seg, "kind") == "eye_closure":
            closed, opened = [left, right], None
        else:
            eye = segment_field(seg, "eye")
            if eye not in ("left", "right"):
                raise StageError(f"wink segment {i} has eye {eye!r}, not 'left' or 'right'")
            closed, opened = ([left], right) if eye == "left" else ([right], left)
        rows = rec.window_rows(start, end)
        if rows.size == 0:
            skipped.append(Skip(i, "no usable frames in the event"))
            continue
        event_failures = []
        for c in closed:
            value = window_percentile(rec.b[rows, c], p.percentile)
            if not value >= p.eye_closed_min:
                event_failures.append(
                    Failure(i, rec.names[c], start, end, value, p.eye_closed_min,
                            f"closed eye's blink p{p.percentile:g} below threshold"))
        if opened is not None:
            value = float(rec.b[rows, opened].max())
            if not value < p.wink_open_max:
                event_failures.append(
                    Failure(i, rec.names[opened], start, end, value, p.wink_open_max,
                            "open eye's blink max not below threshold"))
        n += 1
        passed += not event_failures
        failures += event_failures
    return pass_fraction(EYE_CLOSURE, n, passed, failures, skipped)


def eye_closure(
    b: np.ndarray,
    names: Sequence[str],
    frame_index: np.ndarray,
    segments: Sequence[Any],
    *,
    status: Sequence[Any] | None = None,
    percentile: float = 90.0,
    closed_min: float = 0.8,
    open_max: float = 0.3,
    blink_left: str = "eyeBlink_L",
    blink_right: str = "eyeBlink_R",
) -> MetricResult:
    """Eye Closure: share of eye-closure and wink events the labels close.

    ``eye_closure`` (both eyes): pass if the ``percentile``-th percentile of both
    blink_left and blink_right over the event is >= ``closed_min``. ``wink`` with
    eye = the closed eye: pass if that eye's blink percentile is >= ``closed_min`` and
    the open eye's blink max over the event is < ``open_max``. Score = passed / events.

    Args:
        b: (T, K) coefficients, columns in ``names`` order.
        names: (K,) blendshape names.
        frame_index: (T,) frame indices.
        segments: objects or mappings with kind, start, end, eye.
        status: (T,) per-frame status, or None.
        percentile: the percentile tested on a closed eye (90).
        closed_min: the closed eye's threshold (0.8).
        open_max: the open eye's threshold (0.3).
        blink_left: the left eye's blink coefficient.
        blink_right: the right eye's blink coefficient.

    Returns:
        The result; one failure per failing check (an event may fail two).
    """
    rec = prepare_labels(b, names, frame_index, None, status)
    params = MetricParams(percentile=percentile, eye_closed_min=closed_min,
                          wink_open_max=open_max, blink_left=blink_left,
                          blink_right=blink_right)
    return score_eye_closure(rec, segments, params)


# --- Mouth Closure ----------------------------------------------------------------------


def score_mouth_closure(
    rec: PreparedLabels, segments: Sequence[Any], lip_gap: LipGap | None, p: MetricParams
) -> MetricResult:
    """:func:`mouth_closure` on prepared labels, with thresholds from ``p``."""
    windows = list(segments_of(segments, ("mouth_closed",)))
    if not windows:
        return MetricResult(MOUTH_CLOSURE, None, 0)
    if lip_gap is None:
        raise StageError("Mouth Closure needs the labelled rig's inner-lip gap (lip_gap)")
    jaw = rec.column(p.jaw_open)
    gaps_sorted = None
    if not callable(lip_gap):
        gaps = np.asarray(lip_gap, dtype=np.float64)
        if gaps.shape != (rec.b.shape[0],):
            raise StageError(f"lip_gap must be ({rec.b.shape[0]},), got {gaps.shape}")
        gaps_sorted = gaps[rec.order]
    n = passed = 0
    failures: list[Failure] = []
    skipped: list[Skip] = []
    for i, _, start, end in windows:
        rows = rec.window_rows(start, end)
        if rows.size == 0:
            skipped.append(Skip(i, "no usable frames in the window"))
            continue
        if gaps_sorted is not None:
            gap = gaps_sorted[rows]
        else:
            gap = np.asarray(lip_gap(rec.b[rows]), dtype=np.float64).reshape(-1)
            if gap.shape != rows.shape:
                raise StageError(f"lip_gap function returned {gap.shape}, want {rows.shape}")
        window_failures = []
        jaw_p = window_percentile(rec.b[rows, jaw], p.percentile)
        if not jaw_p <= p.jaw_open_max:
            window_failures.append(Failure(i, rec.names[jaw], start, end, jaw_p, p.jaw_open_max,
                                           f"jawOpen p{p.percentile:g} above threshold"))
        gap_p = window_percentile(gap, p.percentile)
        if not gap_p <= p.lip_gap_max_m:
            window_failures.append(Failure(i, None, start, end, gap_p, p.lip_gap_max_m,
                                           f"inner-lip gap p{p.percentile:g} above threshold (m)"))
        n += 1
        passed += not window_failures
        failures += window_failures
    return pass_fraction(MOUTH_CLOSURE, n, passed, failures, skipped)


def mouth_closure(
    b: np.ndarray,
    names: Sequence[str],
    frame_index: np.ndarray,
    segments: Sequence[Any],
    lip_gap: LipGap | None,
    *,
    status: Sequence[Any] | None = None,
    percentile: float = 90.0,
    jaw_open_max: float = 0.1,
    lip_gap_max_m: float = 0.001,
    jaw_open: str = "jawOpen",
) -> MetricResult:
    """Mouth Closure: share of mouth-closed windows where the labelled mouth is closed.

    Per ``mouth_closed`` window: pass if the ``percentile``-th percentile of jawOpen over
    the window is <= ``jaw_open_max`` and the ``percentile``-th percentile of the
    per-frame inner-lip gap is <= ``lip_gap_max_m``. Score = passed / windows.

    Args:
        b: (T, K) coefficients, columns in ``names`` order.
        names: (K,) blendshape names.
        frame_index: (T,) frame indices.
        segments: objects or mappings with kind, start, end.
        lip_gap: (T,) gaps in metres aligned with the given rows, or a function
            b (n, K) -> (n,) metres called with each window's usable rows (float64,
            columns in ``names`` order). Needed only when there is a mouth_closed window.
        status: (T,) per-frame status, or None.
        percentile: the percentile tested (90).
        jaw_open_max: jawOpen threshold (0.1).
        lip_gap_max_m: inner-lip gap threshold (0.001 m = 1 mm).
        jaw_open: name of the jaw-open coefficient.

    Returns:
        The result; one failure per failing check (an inner-lip failure has
        blendshape None and value in metres).

    Raises:
        StageError: there is a mouth_closed window but no lip_gap.
    """
    rec = prepare_labels(b, names, frame_index, None, status)
    params = MetricParams(percentile=percentile, jaw_open_max=jaw_open_max,
                          lip_gap_max_m=lip_gap_max_m, jaw_open=jaw_open)
    return score_mouth_closure(rec, segments, lip_gap, params)


