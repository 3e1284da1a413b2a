"""Label metrics against ground truth (SPEC §5.2; synthetic subjects only).

All inputs are row-aligned arrays of the same frames; the caller selects the frames to
compare (e.g. status ``ok``) and every value must be finite. Errors are >= 0, lower is
better, in millimetres or degrees as named. docs/metrics.md states every formula.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import StageError
from rigs.geometry import rotation_from_quat
from stages.metrics_common import MetricResult, per_basis_results, scalar_result
from stages.metrics_geometry import rigid_fit

BLENDSHAPE_MAE = "blendshape_mae"
EXPRESSION_MESH_ERROR = "expression_mesh_error_mm"
HEAD_ROTATION_ERROR = "head_rotation_error_deg"
HEAD_TRANSLATION_ERROR = "head_translation_error_mm"
GAZE_ERROR = "gaze_error_deg"

MeshFn = Callable[[np.ndarray], np.ndarray]

#: Face-model parts the expression-mesh error compares (docs/metrics.md §5): the facial
#: skin surface, which the labels move and the cameras see. Head and neck (scalp and neck
#: barely move and would dilute the mean), the mouth and eye sockets, gums, tongue and
#: teeth (interior, hidden) and the eyeballs (they follow gaze, scored by the gaze error,
#: not by b) are left out.
MESH_ERROR_PARTS = ("face",)


def mesh_error_vertices(model) -> np.ndarray:
    """(n,) int vertex ids of :data:`MESH_ERROR_PARTS` in ``model`` (a ``FaceModel``)."""
    return model.part_vertices(*MESH_ERROR_PARTS)


def _finite(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise StageError(f"{name} has non-finite values; select the frames to compare first")
    return x


# --- Blendshapes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BlendshapeMae:
    """Blendshape mean absolute error.

    Attributes:
        mae: mean |b - b_gt| over frames and compared bases, or None with no frames.
        per_basis: {name: mean over frames of |b_i - b_gt_i|} for the compared bases.
        n_frames: frames compared.
    """

    mae: float | None
    per_basis: dict[str, float | None]
    n_frames: int

    def as_results(self) -> dict[str, MetricResult]:
        """{"blendshape_mae": ..., "blendshape_mae/<name>": ...} for the metrics table."""
        return per_basis_results(BLENDSHAPE_MAE, self.mae, self.n_frames * len(self.per_basis), self.per_basis,
                                 dict.fromkeys(self.per_basis, self.n_frames))


def blendshape_mae(
    b_est: np.ndarray,
    b_true: np.ndarray,
    names: Sequence[str],
    *,
    exclude: Collection[str] = frozenset(),
    names_true: Sequence[str] | None = None,
) -> BlendshapeMae:
    """Mean |b - b_gt| over frames and the regressed bases, and per basis.

    Args:
        b_est: (T, K) labelled coefficients, columns in ``names`` order.
        b_true: (T, K') true coefficients, columns in ``names_true`` order (default
            ``names``).
        names: (K,) names of ``b_est``'s columns.
        exclude: bases not compared (pass the eye-following shapes).
        names_true: (K',) names of ``b_true``'s columns when they differ in order.

    Returns:
        The overall and per-basis MAE over the compared bases, in ``names`` order.
    """
    b_est = _finite("b_est", b_est)
    b_true = _finite("b_true", b_true)
    names = tuple(names)
    names_true = names if names_true is None else tuple(names_true)
    if b_est.ndim != 2 or b_est.shape[1] != len(names):
        raise StageError(f"b_est must be (T, {len(names)}), got {b_est.shape}")
    if b_true.shape != (b_est.shape[0], len(names_true)):
        raise StageError(
            f"b_true must be ({b_est.shape[0]}, {len(names_true)}), got {b_true.shape}"
        )
    compared = [n for n in names if n not in set(exclude)]
    missing = [n for n in compared if n not in names_true]
    if missing:
        raise StageError(f"ground truth lacks blendshapes {missing}")
    est = b_est[:, [names.index(n) for n in compared]]
    true = b_true[:, [names_true.index(n) for n in compared]]
    t = b_est.shape[0]
    if t == 0 or not compared:
        return BlendshapeMae(None, {n: None for n in compared}, t)
    err = np.abs(est - true)
    per = err.mean(axis=0)
    return BlendshapeMae(float(err.mean()), dict(zip(compared, map(float, per), strict=True)), t)


# --- Meshes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MeshError:
    """Per-vertex Euclidean distance between two topology-consistent vertex sequences.

    Attributes:
        mean_mm: mean over frames and (selected) vertices, mm; None with no frames.
        per_frame_mm: (T,) mean over vertices per frame, mm.
        per_vertex_mm: (n_sel,) mean over frames per selected vertex, mm.
    """

    mean_mm: float | None
    per_frame_mm: np.ndarray
    per_vertex_mm: np.ndarray

    def as_results(self, name: str = EXPRESSION_MESH_ERROR) -> dict[str, MetricResult]:
        """{name: mean_mm} for the metrics table (n_items = frames)."""
        return {name: scalar_result(name, self.mean_mm, self.per_frame_mm.size)}


def _select(mask: np.ndarray | None, n: int) -> np.ndarray | slice:
    if mask is None:
        return slice(None)
    mask = np.asarray(mask)
    if mask.dtype == bool:
        if mask.shape != (n,):
            raise StageError(f"vertex mask must be ({n},) bool, got {mask.shape}")
        return np.nonzero(mask)[0]
    return mask.astype(np.int64).reshape(-1)


def _mesh_error(chunks, t: int) -> MeshError:
    per_frame = np.empty(t)
    per_vertex = None
    done = 0
    for est, true in chunks:
        if est.shape != true.shape or est.ndim != 3 or est.shape[2] != 3:
            raise StageError(f"meshes must be two (T, n, 3) arrays, got {est.shape}, {true.shape}")
        d = np.linalg.norm(_finite("estimated mesh", est) - _finite("true mesh", true), axis=2)
        per_frame[done : done + d.shape[0]] = d.mean(axis=1) * 1000.0
        s = d.sum(axis=0)
        per_vertex = s if per_vertex is None else per_vertex + s
        done += d.shape[0]
    if done != t:
        raise StageError(f"mesh functions returned {done} frames, want {t}")
    if t == 0 or per_vertex is None:
        return MeshError(None, per_frame, np.zeros(0))
    per_vertex = per_vertex / t * 1000.0
    return MeshError(float(per_frame.mean()), per_frame, per_vertex)


def expression_mesh_error(
    b_est: np.ndarray,
    b_true: np.ndarray,
    mesh_fn_est: MeshFn,
    mesh_fn_true: MeshFn,
    *,
    vertex_mask: np.ndarray | None = None,
    chunk_frames: int = 64,
) -> MeshError:
    """Mean per-vertex distance (mm, head frame) of the labelled mesh to the true mesh.

    The labelled mesh is ``mesh_fn_est(b_est)`` (estimated rig at estimated b), the true
    mesh ``mesh_fn_true(b_true)`` (true rig at true b), evaluated ``chunk_frames`` frames
    at a time to bound memory.

    Args:
        b_est: (T, K) labelled coefficients in the estimated rig's order.
        b_true: (T, K') true coefficients in the true rig's order.
        mesh_fn_est: b (t, K) -> vertices (t, n, 3) metres.
        mesh_fn_true: b (t, K') -> vertices (t, n, 3) metres, same topology.
        vertex_mask: (n,) bool or vertex indices to compare; None = all.
        chunk_frames: frames per chunk.

    Returns:
        The mesh error.
    """
    b_est = _finite("b_est", b_est)
    b_true = _finite("b_true", b_true)
    if b_est.shape[0] != b_true.shape[0]:
        raise StageError(f"{b_est.shape[0]} estimated frames vs {b_true.shape[0]} true frames")
    t = b_est.shape[0]

    def chunks():
        for s in range(0, t, max(chunk_frames, 1)):
            est = np.asarray(mesh_fn_est(b_est[s : s + chunk_frames]), dtype=np.float64)
            true = np.asarray(mesh_fn_true(b_true[s : s + chunk_frames]), dtype=np.float64)
            sel = _select(vertex_mask, est.shape[1])
            yield est[:, sel], true[:, sel]

    return _mesh_error(chunks(), t)


def vertex_error(
    v_est: np.ndarray,
    v_true: np.ndarray,
    *,
    vertex_mask: np.ndarray | None = None,
    chunk_frames: int = 64,
) -> MeshError:
    """Mean per-vertex distance (mm) between two (T, n, 3) vertex arrays in metres.

    Args:
        v_est: (T, n, 3) estimated vertices (or (n, 3) for one frame).
        v_true: (T, n, 3) true vertices, same topology.
        vertex_mask: (n,) bool or vertex indices to compare; None = all.
        chunk_frames: frames per chunk.

    Returns:
        The mesh error.
    """
    v_est, v_true = np.asarray(v_est), np.asarray(v_true)
    if v_est.ndim == 2:
        v_est, v_true = v_est[None], v_true[None]
    t = v_est.shape[0]
    sel = _select(vertex_mask, v_est.shape[1])
    step = max(chunk_frames, 1)
    chunks = ((v_est[s : s + step][:, sel], v_true[s : s + step][:, sel])
              for s in range(0, t, step))
    return _mesh_error(chunks, t)


@dataclass(frozen=True)
class PerVertexError:
    """Per-vertex error of a fitted mesh or of each personalised blendshape.

    Attributes:
        mean_mm: mean over everything compared, mm.
        per_vertex_mm: (n,) or (K, n) distances, mm.
        per_item_mm: (K,) mean per blendshape for (K, n, 3) inputs, else None.
        rotation: (3, 3) applied to the estimate before comparing (identity unless aligned).
        translation: (3,) applied to the estimate before comparing, metres.
    """

    mean_mm: float
    per_vertex_mm: np.ndarray
    per_item_mm: np.ndarray | None
    rotation: np.ndarray
    translation: np.ndarray


def per_vertex_error(est: np.ndarray, true: np.ndarray, *, align: bool = False) -> PerVertexError:
    """Per-vertex distance (mm) between topology-consistent meshes or blendshape deltas.

    Args:
        est: (n, 3) fitted mesh, or (K, n, 3) personalised blendshape deltas, metres.
        true: the truth, same shape.
        align: for (n, 3) inputs, first rigidly align ``est`` to ``true`` (Kabsch over all
            vertices, no scale). Deltas are never aligned.

    Returns:
        The per-vertex error.
    """
    est, true = _finite("est", est), _finite("true", true)
    if est.shape != true.shape or est.shape[-1] != 3 or est.ndim not in (2, 3):
        raise StageError(f"need two (n, 3) or (K, n, 3) arrays, got {est.shape}, {true.shape}")
    r, t = np.eye(3), np.zeros(3)
    if align:
        if est.ndim != 2:
            raise StageError("align applies to one (n, 3) mesh, not to blendshape deltas")
        r, t = rigid_fit(est, true)
        est = est @ r.T + t
    d = np.linalg.norm(est - true, axis=-1) * 1000.0
    per_item = d.mean(axis=1) if d.ndim == 2 else None
    return PerVertexError(float(d.mean()), d, per_item, r, t)


# --- Head pose and gaze -------------------------------------------------------------------


def rotation_error_deg(q_est: np.ndarray, q_true: np.ndarray) -> np.ndarray:
    """Geodesic angle between rotations given as quaternions (w, x, y, z), degrees.

    Args:
        q_est: (..., 4) quaternions (normalised here; q and -q are the same rotation).
        q_true: (..., 4) quaternions.

    Returns:
        (...) angles in [0, 180] degrees: 2 atan2(|v|, |w|) of q_true^-1 q_est.
    """
    q1 = _finite("q_est", q_est)
    q2 = _finite("q_true", q_true)
    q1, q2 = np.broadcast_arrays(q1, q2)
    if q1.shape[-1:] != (4,) or not (np.linalg.norm(q1, axis=-1) * np.linalg.norm(q2, axis=-1)).all():
        raise StageError(f"need non-zero (..., 4) quaternions, got shape {q1.shape}")
    shape = q1.shape[:-1]
    # SciPy's magnitude is 2 atan2(|v|, |w|), accurate for small angles.
    rel = rotation_from_quat(q2.reshape(-1, 4)).inv() * rotation_from_quat(q1.reshape(-1, 4))
    return np.degrees(rel.magnitude()).reshape(shape)


@dataclass(frozen=True)
class HeadPoseError:
    """Head pose error per frame and on average.

    Attributes:
        rotation_deg: (T,) geodesic rotation angle, degrees.
        translation_mm: (T,) |t_est - t_true|, mm.
        mean_rotation_deg: mean of rotation_deg (None with no frames).
        mean_translation_mm: mean of translation_mm (None with no frames).
    """

    rotation_deg: np.ndarray
    translation_mm: np.ndarray
    mean_rotation_deg: float | None
    mean_translation_mm: float | None

    def as_results(self) -> dict[str, MetricResult]:
        """Rotation and translation errors for the metrics table (n_items = frames)."""
        n = self.rotation_deg.size
        return {
            HEAD_ROTATION_ERROR: scalar_result(HEAD_ROTATION_ERROR, self.mean_rotation_deg, n),
            HEAD_TRANSLATION_ERROR: scalar_result(HEAD_TRANSLATION_ERROR,
                                                  self.mean_translation_mm, n),
        }


def head_pose_error(
    q_est: np.ndarray, t_est: np.ndarray, q_true: np.ndarray, t_true: np.ndarray
) -> HeadPoseError:
    """Head pose error: rotation geodesic angle (degrees) and translation distance (mm).

    Args:
        q_est: (T, 4) estimated rotations (w, x, y, z).
        t_est: (T, 3) estimated translations, metres.
        q_true: (T, 4) true rotations.
        t_true: (T, 3) true translations, metres.

    Returns:
        Per-frame and mean errors.
    """
    q_est, q_true = np.asarray(q_est), np.asarray(q_true)
    t_est, t_true = _finite("t_est", t_est), _finite("t_true", t_true)
    n = q_est.shape[0] if q_est.ndim == 2 else -1
    if not (q_est.shape == q_true.shape == (n, 4) and t_est.shape == t_true.shape == (n, 3)):
        raise StageError("head pose needs (T, 4) quaternions and (T, 3) translations")
    rot = rotation_error_deg(q_est, q_true)
    trans = np.linalg.norm(t_est - t_true, axis=1) * 1000.0
    if n == 0:
        return HeadPoseError(rot, trans, None, None)
    return HeadPoseError(rot, trans, float(rot.mean()), float(trans.mean()))


def gaze_direction(yaw: np.ndarray, pitch: np.ndarray) -> np.ndarray:
    """Unit gaze direction in the head frame: (cos p sin y, sin p, cos p cos y), +z forward.

    Args:
        yaw: (...) radians; > 0 turns toward +x (the subject's left).
        pitch: (...) radians; > 0 looks up (+y).

    Returns:
        (..., 3) unit vectors.
    """
    yaw, pitch = np.asarray(yaw, dtype=np.float64), np.asarray(pitch, dtype=np.float64)
    cp = np.cos(pitch)
    return np.stack([cp * np.sin(yaw), np.sin(pitch), cp * np.cos(yaw)], axis=-1)


def gaze_angle_deg(yaw_pitch_est: np.ndarray, yaw_pitch_true: np.ndarray) -> np.ndarray:
    """Angle between estimated and true gaze directions, degrees.

    Args:
        yaw_pitch_est: (..., 2) (yaw, pitch) radians.
        yaw_pitch_true: (..., 2) (yaw, pitch) radians.

    Returns:
        (...) angles in [0, 180] degrees (atan2(|a x b|, a . b)).
    """
    e, g = _finite("gaze_est", yaw_pitch_est), _finite("gaze_true", yaw_pitch_true)
    if e.shape != g.shape or e.shape[-1] != 2:
        raise StageError(f"gaze must be two (..., 2) arrays, got {e.shape}, {g.shape}")
    a, b = gaze_direction(e[..., 0], e[..., 1]), gaze_direction(g[..., 0], g[..., 1])
    return np.degrees(np.arctan2(np.linalg.norm(np.cross(a, b), axis=-1), np.sum(a * b, axis=-1)))


@dataclass(frozen=True)
class GazeError:
    """Gaze error of both eyes.

    Attributes:
        per_eye_deg: (T, 2) angle per frame for (left, right), degrees.
        mean_deg: mean over frames and both eyes (None with no frames).
    """

    per_eye_deg: np.ndarray
    mean_deg: float | None

    def as_results(self) -> dict[str, MetricResult]:
        """{"gaze_error_deg": mean} for the metrics table (n_items = eye-frames)."""
        return {GAZE_ERROR: scalar_result(GAZE_ERROR, self.mean_deg, self.per_eye_deg.size)}


def gaze_error(gaze_est: np.ndarray, gaze_true: np.ndarray) -> GazeError:
    """Gaze error from label-table gaze columns.

    Args:
        gaze_est: (T, 4) (left yaw, left pitch, right yaw, right pitch) radians.
        gaze_true: (T, 4) the same, true.

    Returns:
        Per-eye angles and their mean.
    """
    e, g = np.asarray(gaze_est), np.asarray(gaze_true)
    if e.ndim != 2 or e.shape[1] != 4 or e.shape != g.shape:
        raise StageError(f"gaze must be two (T, 4) arrays, got {e.shape}, {g.shape}")
    ang = gaze_angle_deg(e.reshape(-1, 2, 2), g.reshape(-1, 2, 2))
    return GazeError(ang, float(ang.mean()) if ang.size else None)
