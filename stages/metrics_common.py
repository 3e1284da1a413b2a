"""Shared result types and input handling for the label metrics (SPEC §5, docs/metrics.md).

Every metric function takes a recording's labels as plain arrays. They are validated and
put in frame order once (:func:`prepare_labels`), so a label table read in any row order
gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import StageError

#: The one status value whose frames count as labelled (label table contract).
STATUS_OK = "ok"

SEMANTIC_ACCURACY = "semantic_accuracy"
NEUTRALNESS = "neutralness"
SMOOTHNESS = "smoothness"
EYE_CLOSURE = "eye_closure"
MOUTH_CLOSURE = "mouth_closure"
#: The five metrics of SPEC §5.1, in REFA Table 1 order.
NO_GT_METRICS = (SEMANTIC_ACCURACY, NEUTRALNESS, SMOOTHNESS, EYE_CLOSURE, MOUTH_CLOSURE)

#: ``lip_gap``: per-frame inner-lip gaps (T,) in metres aligned with the given rows, or a
#: function b (n, K) -> (n,) metres (columns in ``names`` order), e.g. the labelled rig's
#: ``inner_lip_gap``.
LipGap = Callable[[np.ndarray], np.ndarray] | np.ndarray


@dataclass(frozen=True)
class MetricParams:
    """Thresholds and conventions of SPEC §5.1; the defaults are SPEC's values.

    Attributes:
        percentile: the percentile used by the window tests (90).
        semantic_ratio: a peak passes a blendshape when its percentile >= ratio * prior.
        neutral_trim_s: seconds trimmed at each end of a neutral window.
        neutral_min_window_s: neutral windows shorter than this contribute nothing.
        neutral_max: a neutral frame passes when its largest coefficient is below this.
        smooth_scale: Smoothness = exp(-x / smooth_scale).
        smooth_reference_hz: the rate at which second differences are expressed.
        gap_factor: a timestamp step above gap_factor frame periods is a gap.
        smooth_exclude: blendshapes left out of Smoothness (none by SPEC).
        smooth_top_k: how many worst frames Smoothness reports.
        eye_closed_min: a closed eye passes when its blink percentile reaches this.
        wink_open_max: a wink's open eye must keep its blink below this (max over event).
        jaw_open_max: a mouth-closed window passes when jawOpen's percentile is <= this.
        lip_gap_max_m: ... and the inner-lip gap's percentile is <= this (metres).
        blink_left: name of the left eye's blink coefficient.
        blink_right: name of the right eye's blink coefficient.
        jaw_open: name of the jaw-open coefficient.
    """

    percentile: float = 90.0
    semantic_ratio: float = 0.75
    neutral_trim_s: float = 0.5
    neutral_min_window_s: float = 1.0
    neutral_max: float = 0.15
    smooth_scale: float = 0.02
    smooth_reference_hz: float = 30.0
    gap_factor: float = 1.5
    smooth_exclude: frozenset[str] = frozenset()
    smooth_top_k: int = 20
    eye_closed_min: float = 0.8
    wink_open_max: float = 0.3
    jaw_open_max: float = 0.1
    lip_gap_max_m: float = 0.001
    blink_left: str = "eyeBlink_L"
    blink_right: str = "eyeBlink_R"
    jaw_open: str = "jawOpen"


DEFAULT_PARAMS = MetricParams()


@dataclass(frozen=True)
class Failure:
    """One item behind a bad number, so a QA dashboard can show the frames behind it.

    Attributes:
        segment: index into the recording's segment sequence, or None for items not tied
            to a segment (Smoothness).
        blendshape: the coefficient that failed the test, or None.
        frame_start: first frame_index of the frames behind the failure (inclusive).
        frame_end: frame_index one past the last frame behind the failure (exclusive).
        value: the statistic that was tested (e.g. the 90th percentile over the window).
        threshold: the threshold the value missed, or None where the metric has none.
        reason: what failed, in words.
    """

    segment: int | None
    blendshape: str | None
    frame_start: int
    frame_end: int
    value: float
    threshold: float | None
    reason: str


@dataclass(frozen=True)
class Skip:
    """A segment that contributed nothing to a metric, and why.

    Attributes:
        segment: index into the recording's segment sequence.
        reason: why it was skipped, in words.
    """

    segment: int
    reason: str


@dataclass(frozen=True)
class MetricResult:
    """One metric of one recording.

    Attributes:
        name: metric name (e.g. ``"semantic_accuracy"``).
        value: the score, or None where the metric does not apply (skipped, not zero).
        n_items: the denominator: (window, blendshape) pairs, frames, second-difference
            frames, events or windows, depending on the metric; 0 when skipped.
        n_passed: the numerator for pass/fail metrics, None otherwise.
        failures: the items behind the failures (for Smoothness: the worst frames).
        skipped: segments that contributed nothing, with the reason.
    """

    name: str
    value: float | None
    n_items: int
    n_passed: int | None = None
    failures: tuple[Failure, ...] = ()
    skipped: tuple[Skip, ...] = ()


def scalar_result(name: str, value: float | None, n_items: int) -> MetricResult:
    """Wraps a plain number (e.g. a ground-truth error) as a :class:`MetricResult`.

    Args:
        name: metric name.
        value: the number, or None when it does not apply.
        n_items: how many items it averages over.

    Returns:
        The result, with no failures.
    """
    return MetricResult(name, None if value is None else float(value), int(n_items))


def per_basis_results(name: str, value: float | None, n_items: int,
                      per_basis: Mapping[str, float | None], basis_items: Mapping[str, int]
                      ) -> dict[str, MetricResult]:
    """``{name: value, "name/<basis>": ...}`` for the metrics table: an overall number and
    one per basis, each with how many items it averages over."""
    out = {name: scalar_result(name, value, n_items)}
    for basis, v in per_basis.items():
        out[f"{name}/{basis}"] = scalar_result(f"{name}/{basis}", v, basis_items[basis])
    return out


def pass_fraction(
    name: str,
    n_items: int,
    n_passed: int,
    failures: list[Failure],
    skipped: list[Skip],
) -> MetricResult:
    """Builds a pass/fail result: passed / items, or None when there are no items."""
    value = n_passed / n_items if n_items else None
    return MetricResult(name, value, n_items, n_passed, tuple(failures), tuple(skipped))


@dataclass(frozen=True)
class PreparedLabels:
    """A recording's labels validated and sorted by frame index.

    Attributes:
        b: (T, K) float64 coefficients, rows in increasing frame_index order.
        names: (K,) blendshape names of the columns of ``b``.
        frame_index: (T,) int64, strictly increasing.
        timestamp_ns: (T,) int64, or None when not given.
        usable: (T,) bool; True where status is "ok" (or no status was given) and every
            coefficient is finite.
        order: (T,) int64 permutation with ``sorted = given[order]``; used to reorder
            caller arrays that are aligned with the given rows.
    """

    b: np.ndarray
    names: tuple[str, ...]
    frame_index: np.ndarray
    timestamp_ns: np.ndarray | None
    usable: np.ndarray
    order: np.ndarray

    def column(self, name: str) -> int:
        """Column of blendshape ``name``; StageError when the labels do not have it."""
        try:
            return self.names.index(name)
        except ValueError:
            raise StageError(f"labels have no blendshape {name!r}") from None

    def window_rows(self, start: int, end: int) -> np.ndarray:
        """Rows of usable frames with ``start <= frame_index < end``.

        Args:
            start: first frame index (inclusive).
            end: end frame index (exclusive).

        Returns:
            (n,) int64 row indices into ``b``, in frame order.
        """
        lo, hi = np.searchsorted(self.frame_index, [start, end], side="left")
        rows = np.arange(lo, hi, dtype=np.int64)
        return rows[self.usable[rows]]


def prepare_labels(
    b: np.ndarray,
    names: Sequence[str],
    frame_index: np.ndarray,
    timestamp_ns: np.ndarray | None = None,
    status: Sequence[Any] | np.ndarray | None = None,
) -> PreparedLabels:
    """Validates a recording's labels and sorts them by frame index.

    Args:
        b: (T, K) coefficients, columns in ``names`` order.
        names: (K,) blendshape names, unique.
        frame_index: (T,) integer frame indices, unique.
        timestamp_ns: (T,) integer timestamps, or None.
        status: (T,) status strings (``"ok"`` | ``"rejected"`` | ``"failed"``; None counts
            as not ok), or None when every frame is labelled.

    Returns:
        The prepared labels.

    Raises:
        StageError: on shape mismatches, duplicate names or duplicate frame indices.
    """
    b = np.asarray(b, dtype=np.float64)
    names = tuple(str(n) for n in names)
    if b.ndim != 2 or b.shape[1] != len(names):
        raise StageError(f"labels must be (T, {len(names)}), got {b.shape}")
    if len(set(names)) != len(names):
        raise StageError("blendshape names are not unique")
    t = b.shape[0]
    fi = np.asarray(frame_index)
    if fi.shape != (t,) or (t and not np.issubdtype(fi.dtype, np.integer)):
        raise StageError(f"frame_index must be ({t},) integers, got {fi.shape} {fi.dtype}")
    fi = fi.astype(np.int64)
    order = np.argsort(fi, kind="stable")
    fi = fi[order]
    if t > 1 and np.any(np.diff(fi) == 0):
        raise StageError("duplicate frame_index in one recording")
    ts = None
    if timestamp_ns is not None:
        ts = np.asarray(timestamp_ns)
        if ts.shape != (t,):
            raise StageError(f"timestamp_ns must be ({t},), got {ts.shape}")
        ts = ts.astype(np.int64)[order]
    b = b[order]
    usable = np.all(np.isfinite(b), axis=1)
    if status is not None:
        st = np.asarray(status, dtype=object)
        if st.shape != (t,):
            raise StageError(f"status must be ({t},), got {st.shape}")
        usable &= st[order] == STATUS_OK
    return PreparedLabels(b, names, fi, ts, usable, order)


def segment_field(segment: Any, name: str) -> Any:
    """Reads ``name`` from a segment object (attribute) or mapping (key); None if absent."""
    if isinstance(segment, Mapping):
        return segment.get(name)
    return getattr(segment, name, None)


def segment_bounds(segment: Any, index: int) -> tuple[int, int]:
    """The (start, end) frame indices of a segment; StageError when they are not integers."""
    start, end = segment_field(segment, "start"), segment_field(segment, "end")
    try:
        return int(start), int(end)
    except (TypeError, ValueError):
        raise StageError(f"segment {index} has bad bounds {start!r}, {end!r}") from None


def window_percentile(x: np.ndarray, q: float) -> float:
    """The q-th percentile of ``x`` with linear interpolation (numpy's default method)."""
    return float(np.percentile(x, q))


def segments_of(
    segments: Sequence[Any], kinds: Collection[str]
) -> Iterator[tuple[int, Any, int, int]]:
    """Yields (index, segment, start, end) for the segments of the given kinds."""
    for i, seg in enumerate(segments):
        if segment_field(seg, "kind") in kinds:
            start, end = segment_bounds(seg, i)
            yield i, seg, start, end
