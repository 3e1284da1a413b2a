"""Face mask refined with depth (issue 7 step 1; SPEC §3 items 1-2).

The landmark stage's mask is the convex hull of the face-oval landmarks: it holds
background, hair and neck at its rim, and the depth there has flying pixels (values
between the face and the wall behind it). This stage keeps, inside the oval extended
upward over the forehead, only the pixels that

1. have depth inside a band around the face depth, estimated as the median depth at the
   inner-face landmarks (the oval's own landmarks sit on the silhouette and are left out);
2. pass a depth-edge test: the depth range (max - min) of the valid depths in a small
   window, relative to the pixel's depth, is at most a threshold (flying pixels and the
   pixels next to a silhouette fail it);
3. belong to the largest connected part of what is left (the face; islands of in-band
   pixels, e.g. a shoulder edge or stray flying pixels, are dropped).

A frame where the landmark stage found no face has no mask and its depth is not read;
it is a rejection record with a reason, as is a frame whose landmarks have too little
valid depth or whose refined mask keeps too little of the oval (docs/phone-chain.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import check_fields, config_section
from pipeline.errors import ConfigError, StageError
from stages.landmarks import FACE_OVAL, OVAL_68

#: Per-frame counts, in the order of the ``counts_<expression>`` columns. Over the
#: candidate region (oval + forehead extension) every pixel is counted exactly once:
#: kept + no_depth + band + edge + component = oval + forehead.
COUNT_NAMES = (
    "oval", "forehead", "kept", "kept_forehead",
    "dropped_no_depth", "dropped_band", "dropped_edge", "dropped_component",
    "landmarks_with_depth",
)
#: Rejection reasons (the record's text starts with one of these).
REASON_NO_FACE = "no face"
REASON_NO_DEPTH = "too few landmarks with depth"
REASON_TOO_SMALL = "refined mask too small"


@dataclass(frozen=True)
class FaceMaskConfig:
    """Face mask refined with depth (issue 7 step 1)."""

    band_front_m: float = 0.06
    """Keep pixels up to this far in front of the face depth estimate, metres (> 0). The
    estimate is a median over inner-face landmarks, about the eyes' depth; the nose tip
    is 2-4 cm in front of it."""
    band_back_m: float = 0.10
    """Keep pixels up to this far behind the face depth estimate, metres (> 0). The
    cheeks and temples at the silhouette are 6-9 cm behind the eyes; the wall, a
    shoulder or the far neck are further."""
    edge_window_px: int = 3
    """Side of the square window of the depth-edge test, pixels (odd, >= 3)."""
    edge_rel_threshold: float = 0.05
    """Drop a pixel whose window's depth range exceeds this fraction of its depth (> 0).
    A face side seen at the steepest angle that still returns depth (cos 0.2) spans
    about 4.7 % over a 3-pixel window at 1.6 mm/pixel; a face-to-wall jump spans > 100 %."""
    forehead_fraction: float = 0.25
    """Extend the oval upward by this fraction of its height, for the forehead (>= 0)."""
    min_depth_landmarks: int = 20
    """Reject a frame with fewer inner-face landmarks on valid depth than this (>= 1)."""
    min_kept_fraction: float = 0.3
    """Reject a frame whose refined mask keeps fewer pixels than this fraction of the
    oval, in [0, 1]."""

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("band_front_m", "band_back_m", "edge_rel_threshold"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"face_mask.{name} must be > 0, got {getattr(self, name)}")
        if self.edge_window_px < 3 or self.edge_window_px % 2 == 0:
            raise ConfigError(f"face_mask.edge_window_px must be odd and >= 3, got {self.edge_window_px}")
        if self.forehead_fraction < 0:
            raise ConfigError(f"face_mask.forehead_fraction must be >= 0, got {self.forehead_fraction}")
        if self.min_depth_landmarks < 1:
            raise ConfigError(f"face_mask.min_depth_landmarks must be >= 1, got {self.min_depth_landmarks}")
        if not 0.0 <= self.min_kept_fraction <= 1.0:
            raise ConfigError(f"face_mask.min_kept_fraction must be in [0, 1], got {self.min_kept_fraction}")


@dataclass(frozen=True)
class MaskInfo:
    """What :func:`refine_face_mask` did to one frame.

    Attributes:
        face_depth_m: the face depth estimate, metres (NaN when not estimated).
        counts: pixel and landmark counts, keyed by :data:`COUNT_NAMES`.
        reason: why the frame is rejected ("" when it is not).
    """

    face_depth_m: float
    counts: Mapping[str, int]
    reason: str = ""

    @property
    def rejected(self) -> bool:
        return bool(self.reason)


def inner_landmarks(n_points: int) -> np.ndarray:
    """Indices of the inner-face landmarks (all but the oval) of a 478- or 68-point set."""
    oval = {478: FACE_OVAL, 68: OVAL_68}.get(n_points)
    if oval is None:
        raise StageError(f"landmarks must be 478 (MediaPipe) or 68 (Multi-PIE) points, got {n_points}")
    return np.setdiff1d(np.arange(n_points), oval)


def _check_inputs(depth_mm: np.ndarray, oval_mask: np.ndarray, points_px: np.ndarray, intrinsics: Any) -> None:
    if depth_mm.ndim != 2 or depth_mm.dtype != np.uint16:
        raise StageError(f"depth_mm must be (H, W) uint16, got {depth_mm.shape} {depth_mm.dtype}")
    if oval_mask.shape != depth_mm.shape or oval_mask.dtype != bool:
        raise StageError(f"oval_mask must be (H, W) = {depth_mm.shape} bool, got {oval_mask.shape} {oval_mask.dtype}")
    if points_px.ndim != 2 or points_px.shape[1] != 2:
        raise StageError(f"points_px must be (P, 2), got {points_px.shape}")
    if (intrinsics.height, intrinsics.width) != depth_mm.shape:
        raise StageError(f"intrinsics are {intrinsics.width} x {intrinsics.height}, depth is "
                         f"{depth_mm.shape[1]} x {depth_mm.shape[0]}")


def face_depth(depth_m: np.ndarray, points_px: np.ndarray) -> tuple[float, int]:
    """Median depth at the inner-face landmarks that fall on valid depth.

    Args:
        depth_m: (H, W) float depth, metres, 0 = invalid.
        points_px: (P, 2) landmark pixels (OpenCV centres), P = 478 or 68; NaN allowed.

    Returns:
        (median depth in metres or NaN, number of landmarks with valid depth).
    """
    h, w = depth_m.shape
    pts = points_px[inner_landmarks(len(points_px))]
    pts = pts[np.isfinite(pts).all(1)]
    ij = np.round(pts[:, ::-1]).astype(np.int64)
    ij = ij[(ij[:, 0] >= 0) & (ij[:, 0] < h) & (ij[:, 1] >= 0) & (ij[:, 1] < w)]
    z = depth_m[ij[:, 0], ij[:, 1]]
    z = z[z > 0]
    return (float(np.median(z)) if len(z) else float("nan")), len(z)


def depth_edges(depth_m: np.ndarray, window: int, rel_threshold: float) -> np.ndarray:
    """(H, W) bool: pixels whose window's valid-depth range exceeds ``rel_threshold`` x depth.

    Holes (depth 0) take no part: a pixel next to a hole is not an edge for that reason.
    """
    import cv2

    valid = depth_m > 0
    kernel = np.ones((window, window), np.uint8)
    # Invalid pixels must lose both the max and the min: 0 for the max, +inf for the min.
    hi = cv2.dilate(np.where(valid, depth_m, 0).astype(np.float32), kernel)
    lo = cv2.erode(np.where(valid, depth_m, np.inf).astype(np.float32), kernel)
    return valid & (hi - lo > rel_threshold * depth_m)


def extend_upward(mask: np.ndarray, rows: int) -> np.ndarray:
    """(H, W) bool: ``mask`` plus every pixel at most ``rows`` above a mask pixel."""
    import cv2

    if rows <= 0:
        return mask.copy()
    # Anchor at the kernel's top: dst(y) = max src(y .. y + rows), a one-sided upward dilation.
    kernel = np.ones((rows + 1, 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel, anchor=(0, 0)).astype(bool)


def _empty_counts(oval: int = 0, landmarks: int = 0) -> dict[str, int]:
    counts = dict.fromkeys(COUNT_NAMES, 0)
    counts.update(oval=oval, landmarks_with_depth=landmarks)
    return counts


def refine_face_mask(
    depth_mm: np.ndarray, oval_mask: np.ndarray, points_px: np.ndarray, intrinsics: Any, cfg: FaceMaskConfig
) -> tuple[np.ndarray, MaskInfo]:
    """Refines one frame's landmark oval mask with its depth.

    Args:
        depth_mm: (H, W) uint16 depth, millimetres, 0 = invalid.
        oval_mask: (H, W) bool face-oval mask of the landmark stage.
        points_px: (P, 2) float landmark pixels (OpenCV centres), P = 478 or 68; all NaN
            when no face was found.
        intrinsics: the frame's intrinsics (``width``, ``height``, ``depth_unit_m``
            metres per count, default 0.001).
        cfg: the section's config.

    Returns:
        (mask (H, W) bool, info). A rejected frame has an all-False mask and
        ``info.reason``; a frame without a face reads no depth at all.

    Raises:
        StageError: inputs of the wrong shape or dtype.
    """
    depth_mm, oval_mask = np.asarray(depth_mm), np.asarray(oval_mask)
    points_px = np.asarray(points_px, np.float64)
    _check_inputs(depth_mm, oval_mask, points_px, intrinsics)
    empty = np.zeros(depth_mm.shape, bool)
    n_oval = int(oval_mask.sum())
    if n_oval == 0 or not np.isfinite(points_px).any():
        return empty, MaskInfo(float("nan"), _empty_counts(), f"{REASON_NO_FACE}: the landmark stage found no face")

    depth_m = depth_mm.astype(np.float32) * np.float32(getattr(intrinsics, "depth_unit_m", 0.001))
    z_face, n_depth = face_depth(depth_m, points_px)
    if n_depth < cfg.min_depth_landmarks:
        return empty, MaskInfo(z_face, _empty_counts(n_oval, n_depth),
                               f"{REASON_NO_DEPTH}: {n_depth} inner-face landmarks on valid depth "
                               f"(< {cfg.min_depth_landmarks})")

    rows = np.flatnonzero(oval_mask.any(1))
    lift = int(round(cfg.forehead_fraction * (rows[-1] - rows[0] + 1)))
    region = extend_upward(oval_mask, lift)
    forehead = region & ~oval_mask
    valid = depth_m > 0
    in_band = (depth_m >= z_face - cfg.band_front_m) & (depth_m <= z_face + cfg.band_back_m)
    edge = depth_edges(depth_m, cfg.edge_window_px, cfg.edge_rel_threshold)
    candidate = region & valid & in_band & ~edge
    mask = _largest_component(candidate)

    counts = {
        "oval": n_oval, "forehead": int(forehead.sum()),
        "kept": int(mask.sum()), "kept_forehead": int((mask & forehead).sum()),
        "dropped_no_depth": int((region & ~valid).sum()),
        "dropped_band": int((region & valid & ~in_band).sum()),
        "dropped_edge": int((region & valid & in_band & edge).sum()),
        "dropped_component": int((candidate & ~mask).sum()),
        "landmarks_with_depth": n_depth,
    }
    if counts["kept"] < cfg.min_kept_fraction * n_oval:
        reason = (f"{REASON_TOO_SMALL}: keeps {counts['kept']} pixels, "
                  f"< {cfg.min_kept_fraction:g} of the oval's {n_oval}")
        return empty, MaskInfo(z_face, counts, reason)
    return mask, MaskInfo(z_face, counts)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of ``mask`` (all False when it is empty)."""
    import cv2

    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if n <= 1:
        return np.zeros_like(mask)
    return labels == 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))


@dataclass(frozen=True, eq=False)
class ExpressionMasks:
    """One expression's refined masks.

    Attributes:
        shape: (H, W) of the frames.
        masks: (frames, ceil(H*W/8)) uint8 bit-packed masks (``np.packbits`` of the
            row-major (H, W) bool mask, as the landmark stage); all zero where rejected.
        face_depth_m: (frames,) float32 face depth estimate, NaN where not estimated.
        counts: (frames, len(COUNT_NAMES)) int32, columns as :data:`COUNT_NAMES`.
        reasons: per frame, the rejection reason or "".
    """

    shape: tuple[int, int]
    masks: np.ndarray
    face_depth_m: np.ndarray
    counts: np.ndarray
    reasons: tuple[str, ...]

    def mask(self, frame: int) -> np.ndarray:
        """(H, W) bool refined mask of ``frame``."""
        h, w = self.shape
        return np.unpackbits(self.masks[frame], count=h * w).reshape(h, w).astype(bool)

    def count(self, name: str) -> np.ndarray:
        """(frames,) int32 counts of ``name`` (one of :data:`COUNT_NAMES`)."""
        return self.counts[:, COUNT_NAMES.index(name)]


@dataclass(frozen=True, eq=False)
class RefinedMasks:
    """The stage's typed output: refined masks and rejection records per expression.

    Attributes:
        subject_id: the subject.
        expressions: expression name -> :class:`ExpressionMasks`, in capture order.
    """

    subject_id: str
    expressions: Mapping[str, ExpressionMasks]

    @property
    def rejections(self) -> list[tuple[str, int, str]]:
        """(expression, frame index, reason) of every rejected frame."""
        return [(name, i, r) for name, e in self.expressions.items() for i, r in enumerate(e.reasons) if r]

    def to_output(self):
        """The artifact: arrays ``mask_/face_depth_/counts_<expression>``, table ``rows``
        (one record per frame, status ok or rejected with its reason) and meta."""
        import pyarrow as pa

        from pipeline.serialize import StageOutput

        arrays: dict[str, np.ndarray] = {}
        rows: dict[str, list] = {k: [] for k in ("subject_id", "expression", "frame_index", "status",
                                                 "reason", "face_depth_m", *COUNT_NAMES)}
        for name, e in self.expressions.items():
            arrays[f"mask_{name}"] = e.masks
            arrays[f"face_depth_{name}"] = e.face_depth_m
            arrays[f"counts_{name}"] = e.counts
            for i, reason in enumerate(e.reasons):
                for key, value in (("subject_id", self.subject_id), ("expression", name), ("frame_index", i),
                                   ("status", "rejected" if reason else "ok"), ("reason", reason),
                                   ("face_depth_m", float(e.face_depth_m[i]))):
                    rows[key].append(value)
                for k, c in zip(COUNT_NAMES, e.counts[i], strict=True):
                    rows[k].append(int(c))
        schema = pa.schema([("subject_id", pa.string()), ("expression", pa.string()), ("frame_index", pa.int32()),
                            ("status", pa.string()), ("reason", pa.string()), ("face_depth_m", pa.float32()),
                            *[(k, pa.int32()) for k in COUNT_NAMES]])
        table = pa.table(rows, schema=schema)
        meta = {
            "subject_id": self.subject_id, "count_names": list(COUNT_NAMES),
            "expressions": {name: {"shape": list(e.shape), "reasons": list(e.reasons)}
                            for name, e in self.expressions.items()},
            "frames": table.num_rows, "rejected": len(self.rejections),
        }
        return StageOutput(arrays=arrays, meta=meta, tables={"rows": table})

    @classmethod
    def from_output(cls, output) -> RefinedMasks:
        """Reads :meth:`to_output`'s artifact back.

        Raises:
            StageError: the artifact is not this stage's, or its count columns differ.
        """
        meta = output.meta
        if list(meta.get("count_names", ())) != list(COUNT_NAMES):
            raise StageError("face_mask artifact: its count columns differ from this code's; rerun the stage")
        try:
            expressions = {
                name: ExpressionMasks(
                    tuple(info["shape"]), output.arrays[f"mask_{name}"], output.arrays[f"face_depth_{name}"],
                    output.arrays[f"counts_{name}"], tuple(info["reasons"]))
                for name, info in meta["expressions"].items()
            }
        except KeyError as exc:
            raise StageError(f"face_mask artifact lacks {exc}") from None
        return cls(meta["subject_id"], expressions)



def refine_masks(capture, landmarks, cfg: FaceMaskConfig) -> RefinedMasks:
    """Refines every phone frame's landmark mask of an opened capture.

    Args:
        capture: an opened :class:`storage.capture.Capture`.
        landmarks: the landmark stage's ``StageOutput`` (arrays ``mask_<expression>``
            (frames, packed H*W bits) and ``points_<expression>`` (frames, P, 2), NaN
            where rejected).
        cfg: the section.

    Raises:
        StageError: the landmark artifact lacks an expression or disagrees on its frames.
    """
    out: dict[str, ExpressionMasks] = {}
    for expression in capture.phone_expressions:
        try:
            packed = landmarks.arrays[f"mask_{expression}"]
            points = landmarks.arrays[f"points_{expression}"]
        except KeyError:
            raise StageError(f"landmark artifact has no masks of expression {expression!r}") from None
        n = capture.phone_frame_count(expression)
        if len(packed) != n or len(points) != n:
            raise StageError(f"landmark artifact has {len(packed)} masks for {n} frames of {expression!r}")
        intr = capture.phone_intrinsics(expression)
        h, w = intr.height, intr.width
        masks = np.zeros((n, (h * w + 7) // 8), np.uint8)
        depth = np.full(n, np.nan, np.float32)
        counts = np.zeros((n, len(COUNT_NAMES)), np.int32)
        reasons = []
        for i in range(n):
            oval = np.unpackbits(packed[i], count=h * w).reshape(h, w).astype(bool)
            if not oval.any() or not np.isfinite(points[i]).any():
                # No face: the frame's depth is not even read.
                depth_mm = np.zeros((h, w), np.uint16)
            else:
                depth_mm = capture.read_phone_frame(expression, i).depth_mm
            mask, info = refine_face_mask(depth_mm, oval, points[i], intr, cfg)
            masks[i] = np.packbits(mask.ravel())
            depth[i] = info.face_depth_m
            counts[i] = [info.counts[k] for k in COUNT_NAMES]
            reasons.append(info.reason)
        out[expression] = ExpressionMasks((h, w), masks, depth, counts, tuple(reasons))
    return RefinedMasks(capture.subject_id, out)


def refine_masks_for_capture(capture, landmarks, config: FaceMaskConfig | Mapping[str, Any] | None = None):
    """Stage ``face_mask``: the depth-refined face mask of every phone frame.

    Args:
        capture: the capture folder (the engine's ``"capture"`` input) or an opened Capture.
        landmarks: the ``landmarks`` stage's loaded artifact.
        config: the engine's config view declaring ``face_mask`` (the whole section), or
            a :class:`FaceMaskConfig`.

    Returns:
        ``RefinedMasks.to_output()``: a ``StageOutput`` (see :meth:`RefinedMasks.to_output`).
    """
    from storage.capture import Capture

    cap = Capture.of(capture)
    return refine_masks(cap, landmarks, config_section(config, "face_mask", FaceMaskConfig)).to_output()
