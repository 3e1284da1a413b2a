"""Geometry accuracy by the NoW protocol (SPEC §5.2): rigid alignment, scan-to-mesh distance.

The reference (a scan point cloud, or the vertices of a true mesh) is rigidly aligned to
the predicted mesh (no scale): first from landmark correspondences when given, then by
point-to-surface ICP. The reported numbers are the median, mean and standard deviation of
the distance from each reference point to the nearest point on the predicted surface, in
millimetres. Moving the reference instead of the mesh gives the same distances and lets
the mesh's search structure be built once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from pipeline.errors import ModelError, StageError
from rigs.geometry import ClosestPoints, similarity_fit


def rigid_fit(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares rotation and translation (no scale) taking ``src`` onto ``dst`` (Kabsch).

    Args:
        src: (N, 3) points, N >= 3 and not collinear for a unique answer.
        dst: (N, 3) corresponding points.

    Returns:
        (R (3, 3), t (3,)) minimising sum |R src + t - dst|^2, with det R = +1.
    """
    try:
        _, r, t = similarity_fit(src, dst, with_scale=False)
    except ModelError as e:
        raise StageError(f"rigid_fit: {e}") from None
    return r, t


class MeshSurface:
    """Exact nearest-point queries on a triangle mesh (:class:`rigs.geometry.ClosestPoints`).

    Args:
        vertices: (n, 3) vertex positions.
        faces: (F, 3) vertex indices of the triangles.
    """

    def __init__(self, vertices: np.ndarray, faces: np.ndarray) -> None:
        vertices = np.asarray(vertices, dtype=np.float64)
        faces = np.asarray(faces, dtype=np.int64)
        if vertices.ndim != 2 or vertices.shape[1] != 3:
            raise StageError(f"vertices must be (n, 3), got {vertices.shape}")
        if faces.ndim != 2 or faces.shape[1] != 3 or faces.shape[0] == 0:
            raise StageError(f"faces must be (F>0, 3), got {faces.shape}")
        if faces.min() < 0 or faces.max() >= vertices.shape[0]:
            raise StageError("faces index vertices that do not exist")
        tri = vertices[faces]  # (F, 3, 3)
        normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        length = np.linalg.norm(normal, axis=1, keepdims=True)
        self.normals = np.divide(normal, length, out=np.zeros_like(normal), where=length > 0)
        self._query = ClosestPoints(vertices, faces)

    def closest(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest surface point of each query point.

        Args:
            points: (N, 3) query points.

        Returns:
            (distance (N,), closest point (N, 3), triangle index (N,)).
        """
        near, dist, face, _ = self._query.query(points)
        return dist, near, face


@dataclass(frozen=True)
class NowResult:
    """Scan-to-mesh accuracy after rigid alignment (NoW protocol).

    Attributes:
        median_mm: median distance, mm.
        mean_mm: mean distance, mm.
        std_mm: standard deviation of the distances (ddof 0), mm.
        distances_mm: (N,) per reference point, mm.
        rotation: (3, 3) R of the alignment: aligned reference = R p + t.
        translation: (3,) t of the alignment, metres.
        iterations: ICP iterations run.
    """

    median_mm: float
    mean_mm: float
    std_mm: float
    distances_mm: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    iterations: int


def _gauss_newton_step(p: np.ndarray, d: np.ndarray, q: np.ndarray, n_face: np.ndarray):
    """One linearised step on sum d(R p + t)^2: rotation R_inc and translation t_inc.

    The gradient of the distance to the surface at p is (p - q) / d; on the surface
    (d = 0) the triangle normal stands in. The step solves the small-angle least squares
    sum (n . (w x p + t) + d)^2 for (w, t).
    """
    with np.errstate(invalid="ignore", divide="ignore"):
        n = np.where(d[:, None] > 1e-12, (p - q) / d[:, None], n_face)
    c = p.mean(axis=0)  # rotate about the centroid: better conditioned than the origin
    a = np.concatenate([np.cross(p - c, n), n], axis=1)  # n . (w x p) = w . (p x n)
    x = np.linalg.lstsq(a, -np.einsum("ij,ij->i", n, p - q), rcond=None)[0]
    r = Rotation.from_rotvec(x[:3]).as_matrix()
    return r, c - r @ c + x[3:]


def now_scan_to_mesh(
    vertices: np.ndarray,
    faces: np.ndarray,
    reference: np.ndarray,
    *,
    mesh_landmarks: np.ndarray | None = None,
    reference_landmarks: np.ndarray | None = None,
    max_iterations: int = 100,
    tolerance_m: float = 1e-9,
) -> NowResult:
    """NoW geometry error: rigidly align ``reference`` to the mesh, then scan-to-mesh distance.

    Alignment: Kabsch on the landmark pairs when given (else identity), then ICP on the
    point-to-surface distance: every iteration finds each reference point's nearest point
    on the mesh surface (point-to-triangle, exact) and takes a Gauss-Newton step on the
    sum of squared distances (point-to-plane linearisation), or, if that does not lower
    the RMS distance, the point-to-point rigid re-fit to those nearest points. A step is
    only taken when it lowers the RMS; ICP stops when the RMS improves by less than
    ``tolerance_m``, when no step improves, or after ``max_iterations``. No scale.

    Args:
        vertices: (n, 3) predicted mesh vertices, metres.
        faces: (F, 3) predicted mesh triangles.
        reference: (N, 3) scan points (or a true mesh's vertices), metres.
        mesh_landmarks: (L, 3) landmark positions on the predicted mesh, L >= 3.
        reference_landmarks: (L, 3) the same landmarks on the reference.
        max_iterations: ICP iteration limit (0 = landmarks only).
        tolerance_m: RMS improvement below which ICP stops, metres.

    Returns:
        The distances and the alignment.
    """
    reference = np.asarray(reference, dtype=np.float64)
    if reference.ndim != 2 or reference.shape[1] != 3 or reference.shape[0] == 0:
        raise StageError(f"reference must be (N>0, 3), got {reference.shape}")
    surface = MeshSurface(vertices, faces)
    r, t = np.eye(3), np.zeros(3)
    if (mesh_landmarks is None) != (reference_landmarks is None):
        raise StageError("give both mesh_landmarks and reference_landmarks, or neither")
    if mesh_landmarks is not None:
        r, t = rigid_fit(reference_landmarks, mesh_landmarks)

    def evaluate(r_: np.ndarray, t_: np.ndarray) -> tuple:
        aligned_ = reference @ r_.T + t_
        d_, q_, f_ = surface.closest(aligned_)
        return r_, t_, aligned_, d_, q_, f_, float(np.sqrt(np.mean(d_**2)))

    r, t, aligned, dist, near, face, rms = evaluate(r, t)
    it = 0
    while it < max_iterations:
        it += 1
        # Gauss-Newton on the point-to-surface distance converges in few steps; the
        # point-to-point re-fit to the current closest points never increases the RMS,
        # so it is the fallback when a Gauss-Newton step does not improve.
        r_inc, t_inc = _gauss_newton_step(aligned, dist, near, surface.normals[face])
        cand = evaluate(r_inc @ r, r_inc @ t + t_inc)
        if not cand[-1] < rms:
            cand = evaluate(*rigid_fit(reference, near))
        if not cand[-1] < rms:
            break
        improvement = rms - cand[-1]
        r, t, aligned, dist, near, face, rms = cand
        if improvement < tolerance_m:
            break
    mm = dist * 1000.0
    return NowResult(float(np.median(mm)), float(mm.mean()), float(mm.std()), mm, r, t, it)
