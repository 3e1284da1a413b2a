"""Fusion of one expression's phone RGB-D burst into one mesh (SPEC §3 item 2, issue 7).

Per expression (a burst of frames of a still face seen from slightly different angles):

1. back-project each frame's masked depth into its camera frame (metres) and estimate
   normals (Open3D, oriented toward the camera);
2. lift the 2D landmarks to 3D with the depth at (or nearest valid depth near) each one;
   landmarks without valid masked depth are rejected;
3. initialise each frame's pose into the reference frame (the frame with the most lifted
   landmarks) by Kabsch (:func:`rigs.geometry.similarity_fit`, no scale) inside RANSAC;
4. refine with Open3D rigid point-to-plane ICP, coarse to fine, with a robust kernel;
5. reject frames whose overlap (ICP fitness) or inlier RMSE is poor, with the reason;
6. merge the accepted frames' points and normals, Poisson-reconstruct, trim low-density
   vertices and crop to the input points' bounding box plus a margin.

Poses map a frame's camera coordinates into the reference frame's camera coordinates:
``x_ref = R x_frame + t`` (4x4, metres). Rejections are data (:class:`FrameRejection`,
:attr:`FusedExpression.reason`); an exception is raised only for malformed input arrays.
The method, config and measured accuracy are in docs/fusion.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipeline.config import check_fields, config_section
from pipeline.errors import ConfigError, StageError
from rigs.camera import PinholeIntrinsics
from stages.fusion_steps import (  # noqa: F401 - the steps are part of this module's interface
    backproject,
    icp_refine,
    lift_landmarks,
    open3d_single_thread,
    overlap,
    pixel_rays,
    point_cloud,
    poisson_mesh,
    ransac_rigid,
)

#: Robust kernels of the ICP, by config name.
RobustKernel = Literal["none", "tukey", "huber"]
#: Why a frame was not used.
RejectionCode = Literal[
    "no_face", "no_depth", "few_landmarks", "landmark_ransac", "icp_fitness", "icp_rmse"
]
#: Number of MediaPipe landmarks with irises.
N_LANDMARKS = 478


@dataclass(frozen=True)
class FusionConfig:
    """Fusion of each expression's burst into one mesh (SPEC §3 item 2)."""

    landmark_window_px: int = 2
    """A landmark takes the depth of the nearest valid masked pixel within this many pixels
    (Chebyshev) of its rounded position; a landmark with none is rejected. >= 0."""
    min_landmarks: int = 20
    """Frames with fewer landmarks lifted to 3D (and shared with the reference) are rejected. >= 3."""
    ransac_iterations: int = 300
    """Minimal 3-landmark Kabsch samples drawn per frame. >= 1."""
    ransac_threshold_mm: float = 4.0
    """A landmark pair is a RANSAC inlier when it lands within this distance, mm. > 0."""
    min_landmark_inliers: int = 12
    """Frames whose best RANSAC pose has fewer landmark inliers are rejected. >= 3."""
    seed: int = 0
    """Seed of the RANSAC sampling (results are deterministic). >= 0."""
    normal_radius_mm: float = 5.0
    """Neighbourhood radius of the normal estimation, mm. > 0."""
    normal_max_nn: int = 30
    """At most this many neighbours per normal. >= 3."""
    frame_voxel_mm: float = 1.5
    """Each frame's points are voxel-downsampled to this size (0 = none), mm, >= 0, before
    their normals are estimated; the ICP and the Poisson input use these points, the frame
    checks (fitness, RMSE) the full-resolution ones against them."""
    icp_max_distance_mm: float = 10.0
    """Largest (first) ICP max correspondence distance, mm. > 0."""
    icp_min_distance_mm: float = 2.0
    """Smallest (last) ICP max correspondence distance, mm; fitness and RMSE are measured at it. > 0."""
    icp_levels: int = 3
    """Number of ICP runs, with distances spaced geometrically from max to min. >= 1."""
    icp_iterations: int = 30
    """Iterations of each ICP run. >= 1."""
    robust_kernel: RobustKernel = "tukey"
    """Robust loss of the point-to-plane ICP; its scale is each run's correspondence distance."""
    min_fitness: float = 0.7
    """Frames whose final ICP fitness (fraction of their points with a reference point within
    ``icp_min_distance_mm``) is below this are rejected; in [0, 1]."""
    max_rmse_mm: float = 1.0
    """Frames whose final ICP inlier RMSE is above this are rejected, mm. > 0."""
    min_frames: int = 2
    """An expression with fewer accepted frames (reference included) is rejected. >= 1."""
    fusion_voxel_mm: float = 1.5
    """Merged points are voxel-downsampled to this size before Poisson (0 = none), mm. >= 0.
    Poisson's cost grows with its input; 1.5 mm keeps the fused surface's median error at
    0.05 mm on standard subjects (1.0 mm: 0.04-0.05 mm at 1.4x the time; 0.5 mm: 0.04 mm at
    2.2x; docs/fusion.md)."""
    poisson_depth: int = 8
    """Octree depth of the Poisson reconstruction; in [5, 12]. Depth 8 (about 1 mm cells on
    a face) measured 0.04-0.05 mm median, 0.12-0.17 mm p90 to the true surface on standard
    subjects at a third of depth 9's time; depth 7 is faster again but 0.5 mm p90 at an open
    mouth."""
    poisson_samples_per_node: float = 1.5
    """Poisson's minimum number of input points per octree cell (>= 1; Open3D's default): the
    octree is refined only where the points are at least this dense. 3 takes 45 % of the
    Poisson time at the same fused-scan median (0.046 mm, p90 0.17 mm against 0.15 mm on 8
    standard expressions) but a third of the vertices, and the tiny subject's fit then
    measured 1.44 mm mean per-vertex error instead of 0.93 mm (docs/fusion.md)."""
    density_quantile: float = 0.05
    """Poisson vertices whose density is below this quantile are trimmed; in [0, 1)."""
    crop_margin_mm: float = 2.0
    """The mesh is cropped to the merged points' bounding box grown by this margin, mm. >= 0."""
    workers: int = 0
    """Processes fusing a subject's expressions at once (they are independent): 0 = one per
    available core (``os.sched_getaffinity``), 1 = all in this process. A run that already
    gives each core its own subject should set 1. The output does not depend on it. >= 0."""

    def __post_init__(self) -> None:
        check_fields(self)
        rules = (
            ("landmark_window_px", self.landmark_window_px >= 0, ">= 0"),
            ("min_landmarks", self.min_landmarks >= 3, ">= 3"),
            ("ransac_iterations", self.ransac_iterations >= 1, ">= 1"),
            ("ransac_threshold_mm", self.ransac_threshold_mm > 0, "> 0"),
            ("min_landmark_inliers", self.min_landmark_inliers >= 3, ">= 3"),
            ("seed", self.seed >= 0, ">= 0"),
            ("normal_radius_mm", self.normal_radius_mm > 0, "> 0"),
            ("normal_max_nn", self.normal_max_nn >= 3, ">= 3"),
            ("frame_voxel_mm", self.frame_voxel_mm >= 0, ">= 0"),
            ("icp_max_distance_mm", self.icp_max_distance_mm > 0, "> 0"),
            ("icp_min_distance_mm", 0 < self.icp_min_distance_mm <= self.icp_max_distance_mm,
             "in (0, icp_max_distance_mm]"),
            ("icp_levels", self.icp_levels >= 1, ">= 1"),
            ("icp_iterations", self.icp_iterations >= 1, ">= 1"),
            ("min_fitness", 0.0 <= self.min_fitness <= 1.0, "in [0, 1]"),
            ("max_rmse_mm", self.max_rmse_mm > 0, "> 0"),
            ("min_frames", self.min_frames >= 1, ">= 1"),
            ("fusion_voxel_mm", self.fusion_voxel_mm >= 0, ">= 0"),
            ("poisson_depth", 5 <= self.poisson_depth <= 12, "in [5, 12]"),
            ("poisson_samples_per_node", self.poisson_samples_per_node >= 1, ">= 1"),
            ("density_quantile", 0.0 <= self.density_quantile < 1.0, "in [0, 1)"),
            ("crop_margin_mm", self.crop_margin_mm >= 0, ">= 0"),
            ("workers", self.workers >= 0, ">= 0"),
        )
        for name, ok, rule in rules:
            if not ok:
                raise ConfigError(f"fusion.{name} must be {rule}, got {getattr(self, name)}")

    @property
    def icp_distances_m(self) -> np.ndarray:
        """(icp_levels,) max correspondence distances of the ICP runs, metres, decreasing."""
        return np.geomspace(self.icp_max_distance_mm, self.icp_min_distance_mm, self.icp_levels) * 1e-3


@dataclass(frozen=True)
class FrameRejection:
    """A frame left out of an expression's fusion.

    Attributes:
        frame: the frame's id (its index in the burst).
        code: the kind of failure (:data:`RejectionCode`).
        reason: what was wrong, in words, with the measured value and the limit.
    """

    frame: int
    code: str
    reason: str


@dataclass(frozen=True, eq=False)
class FusedExpression:
    """One expression's fused mesh and the record of how it was made.

    Attributes:
        expression: the expression (prompt) name.
        vertices: (V, 3) float32 mesh vertices in the reference frame's camera frame,
            metres; (0, 3) when the expression was rejected.
        triangles: (F, 3) int32 vertex indices; (0, 3) when rejected.
        frame_ids: (N,) int64 ids of the burst's frames, in input order.
        poses: (N, 4, 4) float64 reference-from-frame rigid transforms; NaN where no
            pose was estimated (frame rejected before registration).
        fitness: (N,) float64 final ICP fitness (overlap fraction); NaN where not run.
        rmse: (N,) float64 final ICP inlier RMSE, metres; NaN where not run.
        landmarks_lifted: (N,) int64 landmarks with valid depth per frame.
        landmark_inliers: (N,) int64 RANSAC landmark inliers; -1 where not run.
        reference: id of the reference frame, -1 when none.
        frames_used: (k,) int64 ids of the frames fused (reference included).
        rejected: the frames left out, with reasons.
        reason: why the whole expression was rejected; "" when fused.
    """

    expression: str
    vertices: np.ndarray
    triangles: np.ndarray
    frame_ids: np.ndarray
    poses: np.ndarray
    fitness: np.ndarray
    rmse: np.ndarray
    landmarks_lifted: np.ndarray
    landmark_inliers: np.ndarray
    reference: int
    frames_used: np.ndarray
    rejected: tuple[FrameRejection, ...]
    reason: str = ""

    @property
    def ok(self) -> bool:
        """Whether a mesh was made."""
        return not self.reason

    _ARRAYS = ("vertices", "triangles", "frame_ids", "poses", "fitness", "rmse",
               "landmarks_lifted", "landmark_inliers", "frames_used")

    def to_output(self) -> Any:
        """The artifact form: a :class:`pipeline.serialize.StageOutput` (arrays + meta)."""
        from pipeline.serialize import StageOutput

        return StageOutput(
            arrays={name: np.asarray(getattr(self, name)) for name in self._ARRAYS},
            meta={
                "expression": self.expression, "reference": self.reference, "reason": self.reason,
                "rejected": [{"frame": r.frame, "code": r.code, "reason": r.reason} for r in self.rejected],
            },
        )

    @classmethod
    def from_output(cls, output: Any) -> FusedExpression:
        """Inverse of :meth:`to_output`.

        Raises:
            StageError: a part is missing.
        """
        missing = (set(cls._ARRAYS) - set(output.arrays)) | (
            {"expression", "reference", "reason", "rejected"} - set(output.meta)
        )
        if missing:
            raise StageError(f"fusion output lacks {', '.join(sorted(missing))}")
        m = output.meta
        return cls(
            expression=str(m["expression"]),
            rejected=tuple(FrameRejection(int(r["frame"]), str(r["code"]), str(r["reason"])) for r in m["rejected"]),
            reference=int(m["reference"]), reason=str(m["reason"]),
            **{name: np.asarray(output.arrays[name]) for name in cls._ARRAYS},
        )


# ---------------------------------------------------------------------------- entry point


def _check_inputs(frames_depth, masks, landmarks, intrinsics, frame_ids) -> np.ndarray:
    n = len(frames_depth)
    if len(masks) != n or len(landmarks) != n:
        raise StageError(f"fusion needs one mask and one landmark set per frame: "
                         f"{n} depth, {len(masks)} masks, {len(landmarks)} landmark sets")
    shape = (intrinsics.height, intrinsics.width)
    for i in range(n):
        d = np.asarray(frames_depth[i])
        if d.shape != shape or d.dtype != np.uint16:
            raise StageError(f"frame {i}: depth must be {shape} uint16, got {d.shape} {d.dtype}")
        if masks[i] is not None and np.shape(masks[i]) != shape:
            raise StageError(f"frame {i}: mask must be {shape}, got {np.shape(masks[i])}")
        if landmarks[i] is not None and np.shape(landmarks[i]) != (N_LANDMARKS, 2):
            raise StageError(f"frame {i}: landmarks must be ({N_LANDMARKS}, 2), got {np.shape(landmarks[i])}")
    ids = np.arange(n, dtype=np.int64) if frame_ids is None else np.asarray(frame_ids, np.int64)
    if ids.shape != (n,) or len(set(ids.tolist())) != n:
        raise StageError(f"frame_ids must be {n} distinct ints")
    return ids


def fuse_expression(
    frames_depth: Sequence[np.ndarray],
    masks: Sequence[np.ndarray | None],
    landmarks: Sequence[np.ndarray | None],
    intrinsics: PinholeIntrinsics,
    cfg: FusionConfig = FusionConfig(),
    *,
    expression: str = "",
    frame_ids: Sequence[int] | None = None,
) -> FusedExpression:
    """Registers and fuses one expression's burst into one mesh.

    Args:
        frames_depth: N (H, W) uint16 depth images, 0 = invalid, registered to RGB.
        masks: N (H, W) bool face masks (the depth-refined mask); None or all-False
            where no face was found.
        landmarks: N (478, 2) pixel landmarks (centres at integers), NaN where missing;
            None where no face was found.
        intrinsics: the burst's intrinsics (``depth_unit_m`` is honoured when present).
        cfg: the fusion config.
        expression: the expression's name, recorded in the output.
        frame_ids: the frames' ids (burst indices); 0..N-1 by default.

    Returns:
        The fused mesh with per-frame poses, residuals and rejections; when fewer than
        ``cfg.min_frames`` frames survive, an empty mesh and ``reason`` set.

    Raises:
        StageError: the inputs are malformed (counts, shapes, dtypes).
    """
    ids = _check_inputs(frames_depth, masks, landmarks, intrinsics, frame_ids)
    with open3d_single_thread():
        return _fuse(frames_depth, masks, landmarks, intrinsics, cfg, expression, ids)


def _fuse(frames_depth, masks, landmarks, intrinsics, cfg: FusionConfig, expression: str,
          ids: np.ndarray) -> FusedExpression:
    import open3d as o3d

    n = len(ids)
    unit = float(getattr(intrinsics, "depth_unit_m", 1e-3))
    poses = np.full((n, 4, 4), np.nan)
    fitness, rmse = np.full(n, np.nan), np.full(n, np.nan)
    lifted_count, inlier_count = np.zeros(n, np.int64), np.full(n, -1, np.int64)
    rejected: dict[int, FrameRejection] = {}

    def reject(i: int, code: str, reason: str) -> None:
        rejected[i] = FrameRejection(int(ids[i]), code, reason)

    clouds: dict[int, Any] = {}
    lifted: dict[int, np.ndarray] = {}
    for i in range(n):
        mask = None if masks[i] is None else np.asarray(masks[i], bool)
        lm = None if landmarks[i] is None else np.asarray(landmarks[i], np.float64)
        if mask is None or not mask.any() or lm is None or not np.isfinite(lm).all(1).any():
            reject(i, "no_face", "no face: no mask or no landmarks")
            continue
        pts = backproject(frames_depth[i], mask, intrinsics, unit)
        if len(pts) < cfg.normal_max_nn:
            reject(i, "no_depth", f"{len(pts)} valid depth pixels in the face mask")
            continue
        lifted[i] = lift_landmarks(lm, frames_depth[i], mask, intrinsics, cfg.landmark_window_px, unit)
        lifted_count[i] = int(np.isfinite(lifted[i]).all(1).sum())
        if lifted_count[i] < cfg.min_landmarks:
            reject(i, "few_landmarks", f"{lifted_count[i]} landmarks with valid depth < min_landmarks={cfg.min_landmarks}")
            continue
        clouds[i] = pts

    reference = max(clouds, key=lambda i: (lifted_count[i], -i)) if clouds else -1
    if reference >= 0:
        rng = np.random.default_rng(cfg.seed)
        target = point_cloud(clouds[reference], cfg)
        poses[reference], fitness[reference], rmse[reference] = np.eye(4), 1.0, 0.0
        inlier_count[reference] = lifted_count[reference]
        ref_ok = np.isfinite(lifted[reference]).all(1)
        merged = [target]
        for i in sorted(clouds):
            if i == reference:
                continue
            shared = ref_ok & np.isfinite(lifted[i]).all(1)
            if shared.sum() < cfg.min_landmarks:
                reject(i, "few_landmarks", f"{int(shared.sum())} landmarks shared with the reference frame "
                       f"< min_landmarks={cfg.min_landmarks}")
                continue
            init, inl = ransac_rigid(lifted[i][shared], lifted[reference][shared],
                                     cfg.ransac_threshold_mm * 1e-3, cfg.ransac_iterations, rng)
            inlier_count[i] = int(inl.sum())
            if inl.sum() < cfg.min_landmark_inliers:
                reject(i, "landmark_ransac", f"{int(inl.sum())} landmark inliers within {cfg.ransac_threshold_mm} mm "
                       f"< min_landmark_inliers={cfg.min_landmark_inliers}")
                continue
            source = point_cloud(clouds[i], cfg)
            poses[i], fitness[i], rmse[i] = icp_refine(source, target, init, cfg, clouds[i])
            if fitness[i] < cfg.min_fitness:
                reject(i, "icp_fitness", f"ICP fitness {fitness[i]:.3f} < min_fitness={cfg.min_fitness}")
            elif not rmse[i] * 1e3 <= cfg.max_rmse_mm:  # NaN (no overlap) fails too
                reject(i, "icp_rmse", f"ICP inlier RMSE {rmse[i] * 1e3:.3f} mm > max_rmse_mm={cfg.max_rmse_mm}")
            else:
                merged.append(source.transform(poses[i]))

    used = np.array(sorted(i for i in clouds if i not in rejected), np.int64)
    reason = ""
    if len(used) < cfg.min_frames:
        reason = (f"{len(used)} usable frame{'s' if len(used) != 1 else ''} of {n} "
                  f"< min_frames={cfg.min_frames}")
        if len(used) == 0 and n and all(r.code in ("no_face", "no_depth") for r in rejected.values()):
            reason += ": no frame has a face with valid depth"
    verts, tris = np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int32)
    if not reason:
        cloud = o3d.geometry.PointCloud()
        for c in merged:
            cloud += c
        if cfg.fusion_voxel_mm > 0:
            cloud = cloud.voxel_down_sample(cfg.fusion_voxel_mm * 1e-3)
        verts, tris = poisson_mesh(cloud, cfg)
        if len(tris) == 0:
            reason = "Poisson reconstruction left no triangles after trimming and cropping"
    return FusedExpression(
        expression=expression, vertices=verts, triangles=tris, frame_ids=ids, poses=poses,
        fitness=fitness, rmse=rmse, landmarks_lifted=lifted_count, landmark_inliers=inlier_count,
        reference=int(ids[reference]) if reference >= 0 else -1, frames_used=ids[used],
        rejected=tuple(rejected[i] for i in sorted(rejected)), reason=reason,
    )


# ------------------------------------------------------------------------ the stage


@dataclass(frozen=True, eq=False)
class FusedScans:
    """Every expression of one subject, fused.

    Attributes:
        subject_id: the subject.
        expressions: expression name -> its :class:`FusedExpression` (rejected ones too,
            with their ``reason`` and an empty mesh).
    """

    subject_id: str
    expressions: dict[str, FusedExpression]

    def rows(self) -> Any:
        """One record per phone frame: ``used`` or ``rejected`` with its code and reason."""
        import pyarrow as pa

        cols: dict[str, list] = {k: [] for k in (
            "subject_id", "expression", "frame_index", "status", "code", "reason", "fitness", "rmse_mm")}
        for name, fused in self.expressions.items():
            why = {r.frame: r for r in fused.rejected}
            used = set(fused.frames_used.tolist()) if fused.ok else set()
            for i, frame in enumerate(fused.frame_ids.tolist()):
                r = why.get(frame)
                status = "used" if frame in used else "rejected"
                code = r.code if r else ("" if status == "used" else "expression")
                reason = r.reason if r else ("" if status == "used" else fused.reason)
                for key, value in (("subject_id", self.subject_id), ("expression", name),
                                   ("frame_index", frame), ("status", status), ("code", code),
                                   ("reason", reason), ("fitness", float(fused.fitness[i])),
                                   ("rmse_mm", float(fused.rmse[i]) * 1e3)):
                    cols[key].append(value)
        return pa.table(cols, schema=pa.schema([
            ("subject_id", pa.string()), ("expression", pa.string()), ("frame_index", pa.int32()),
            ("status", pa.string()), ("code", pa.string()), ("reason", pa.string()),
            ("fitness", pa.float64()), ("rmse_mm", pa.float64())]))

    def to_output(self) -> Any:
        """A :class:`pipeline.serialize.StageOutput`: arrays ``<expression>.<part>``, the
        per-expression metadata, and the per-frame ``rows`` table."""
        from pipeline.serialize import StageOutput

        arrays: dict[str, np.ndarray] = {}
        meta: dict[str, Any] = {}
        for name, fused in self.expressions.items():
            part = fused.to_output()
            arrays.update({f"{name}.{k}": v for k, v in part.arrays.items()})
            meta[name] = dict(part.meta)
        return StageOutput(arrays=arrays, meta={"subject_id": self.subject_id, "expressions": meta},
                           tables={"rows": self.rows()})

    @classmethod
    def from_output(cls, output: Any) -> FusedScans:
        """Inverse of :meth:`to_output`.

        Raises:
            StageError: a part is missing.
        """
        from pipeline.serialize import StageOutput

        if "expressions" not in output.meta or "subject_id" not in output.meta:
            raise StageError("fusion output lacks its expression list")
        expressions = {}
        for name, meta in output.meta["expressions"].items():
            prefix = f"{name}."
            arrays = {k[len(prefix):]: v for k, v in output.arrays.items() if k.startswith(prefix)}
            expressions[name] = FusedExpression.from_output(StageOutput(arrays=arrays, meta=meta))
        return cls(str(output.meta["subject_id"]), expressions)



def fuse_scans(capture: Any, landmarks: Any, masks: Any, cfg: FusionConfig) -> FusedScans:
    """Fuses every expression of an opened capture, ``cfg.workers`` expressions at a time
    (:func:`stages.parallel.process_map`; the result does not depend on it).

    Args:
        capture: an opened :class:`storage.capture.Capture`.
        landmarks: the landmark stage's ``StageOutput`` (``points_<expression>`` (N, P, 2)).
        masks: the face-mask stage's :class:`stages.face_mask.RefinedMasks`.
        cfg: the fusion section.

    Raises:
        StageError: an upstream artifact lacks an expression or disagrees on its frames.
    """
    from stages.parallel import process_map

    jobs = []
    for expression in capture.phone_expressions:
        points = landmarks.arrays.get(f"points_{expression}")
        refined = masks.expressions.get(expression)
        n = capture.phone_frame_count(expression)
        if points is None or refined is None or len(points) != n or len(refined.masks) != n:
            raise StageError(f"landmark or mask artifact disagrees with the {n} frames of {expression!r}")
        jobs.append((capture, expression, refined, np.asarray(points)))
    fused = process_map(fuse_capture_expression, jobs, cfg.workers, shared=cfg)
    return FusedScans(capture.subject_id, {f.expression: f for f in fused})


def fuse_capture_expression(cfg: FusionConfig, job: tuple[Any, str, Any, np.ndarray]) -> FusedExpression:
    """One expression of a capture fused: ``job`` = (capture, expression, its
    :class:`stages.face_mask.ExpressionMasks`, its landmark points (N, P, 2)).
    Frames without a face are never read: their depth plays no part."""
    capture, expression, refined, points = job
    n = len(points)
    frame_masks = [refined.mask(i) for i in range(n)]
    faces = [m.any() and np.isfinite(points[i]).any() for i, m in enumerate(frame_masks)]
    h, w = refined.shape
    depth = [capture.read_phone_frame(expression, i).depth_mm if faces[i]
             else np.zeros((h, w), np.uint16) for i in range(n)]
    return fuse_expression(
        depth, [m if f else None for m, f in zip(frame_masks, faces, strict=True)],
        [points[i] if faces[i] else None for i in range(n)],
        capture.phone_intrinsics(expression), cfg, expression=expression)


def fuse_capture(capture: Any, landmarks: Any, face_mask: Any, config: Any = None) -> Any:
    """Stage ``fusion``: each expression's burst fused into one mesh.

    Args:
        capture: the capture folder (the engine's ``"capture"`` input) or an opened Capture.
        landmarks: the ``landmarks`` stage's loaded artifact.
        face_mask: the ``face_mask`` stage's loaded artifact.
        config: the engine's config view declaring ``fusion``, or a :class:`FusionConfig`.

    Returns:
        ``FusedScans.to_output()``.
    """

    from stages.face_mask import RefinedMasks
    from storage.capture import Capture

    cap = Capture.of(capture)
    masks = RefinedMasks.from_output(face_mask)
    return fuse_scans(cap, landmarks, masks, config_section(config, "fusion", FusionConfig)).to_output()
