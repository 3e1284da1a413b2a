"""Geometry accuracy by the NoW protocol (SPEC §5.2): rigid alignment, scan-to-mesh distance.

The reference (a scan point cloud, or the vertices of a true mesh) is rigidly aligned to
the predicted mesh (no scale): first from landmark correspondences when given, then by
point-to-surface ICP. The reported numbers are the median, mean and standard deviation of
the distance from each reference point to the nearest point on the predicted surface, in
millimetres. Moving the reference instead of the mesh gives the same distances and lets
the mesh's search structure be built once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from pipeline.errors import StageError


def rigid_fit(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares rotation and translation (no scale) taking ``src`` onto ``dst`` (Kabsch).

    Args:
        src: (N, 3) points, N >= 3 and not collinear for a unique answer.
        dst: (N, 3) corresponding points.

    Returns:
        (R (3, 3), t (3,)) minimising sum |R src + t - dst|^2, with det R = +1.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3 or src.shape[0] < 3:
        raise StageError(f"rigid_fit needs two (N>=3, 3) arrays, got {src.shape}, {dst.shape}")
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    h = (src - mu_s).T @ (dst - mu_d)
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0  # no reflections
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, mu_d - r @ mu_s


def closest_points_on_triangles(
    p: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray
) -> np.ndarray:
    """Closest point to each p on the triangle (a, b, c), elementwise (Ericson, RTCD 5.1.5).

    Args:
        p: (M, 3) query points.
        a: (M, 3) first corners.
        b: (M, 3) second corners.
        c: (M, 3) third corners.

    Returns:
        (M, 3) closest points.
    """

    def dot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", u, v)

    def div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        # Degenerate triangles give 0/0 only in regions that are not selected.
        return np.divide(num, den, out=np.zeros_like(num), where=den != 0)

    ab, ac, ap = b - a, c - a, p - a
    d1, d2 = dot(ab, ap), dot(ac, ap)
    bp = p - b
    d3, d4 = dot(ab, bp), dot(ac, bp)
    cp = p - c
    d5, d6 = dot(ab, cp), dot(ac, cp)
    va, vb, vc = d3 * d6 - d5 * d4, d5 * d2 - d1 * d6, d1 * d4 - d3 * d2
    den = va + vb + vc
    out = a + ab * div(vb, den)[:, None] + ac * div(vc, den)[:, None]  # face interior
    # Assign the Voronoi regions from last to first so the earlier tests win.
    edge_bc = (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0)
    w = div(d4 - d3, (d4 - d3) + (d5 - d6))
    out[edge_bc] = (b + (c - b) * w[:, None])[edge_bc]
    edge_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    out[edge_ac] = (a + ac * div(d2, d2 - d6)[:, None])[edge_ac]
    corner_c = (d6 >= 0) & (d5 <= d6)
    out[corner_c] = c[corner_c]
    edge_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    out[edge_ab] = (a + ab * div(d1, d1 - d3)[:, None])[edge_ab]
    corner_b = (d3 >= 0) & (d4 <= d3)
    out[corner_b] = b[corner_b]
    corner_a = (d1 <= 0) & (d2 <= 0)
    out[corner_a] = a[corner_a]
    return out


class MeshSurface:
    """Exact nearest-point queries on a triangle mesh.

    A KD-tree over triangle centroids gives the k nearest triangles; their best exact
    distance d0 is the true nearest distance once d0 <= (k-th centroid distance) - r_max,
    where r_max is the largest centroid-to-corner distance of any triangle (no triangle
    outside the k can then be closer). Points that miss the test are retried with 4k.

    Args:
        vertices: (n, 3) vertex positions.
        faces: (F, 3) vertex indices of the triangles.
        k: triangles tested first.
    """

    def __init__(self, vertices: np.ndarray, faces: np.ndarray, k: int = 16) -> None:
        vertices = np.asarray(vertices, dtype=np.float64)
        faces = np.asarray(faces, dtype=np.int64)
        if vertices.ndim != 2 or vertices.shape[1] != 3:
            raise StageError(f"vertices must be (n, 3), got {vertices.shape}")
        if faces.ndim != 2 or faces.shape[1] != 3 or faces.shape[0] == 0:
            raise StageError(f"faces must be (F>0, 3), got {faces.shape}")
        if faces.min() < 0 or faces.max() >= vertices.shape[0]:
            raise StageError("faces index vertices that do not exist")
        self.tri = vertices[faces]  # (F, 3, 3)
        normal = np.cross(self.tri[:, 1] - self.tri[:, 0], self.tri[:, 2] - self.tri[:, 0])
        length = np.linalg.norm(normal, axis=1, keepdims=True)
        self.normals = np.divide(normal, length, out=np.zeros_like(normal), where=length > 0)
        centroids = self.tri.mean(axis=1)
        self.r_max = float(np.linalg.norm(self.tri - centroids[:, None], axis=2).max())
        self.tree = cKDTree(centroids)
        self.n_faces = faces.shape[0]
        self.k = min(k, self.n_faces)

    def _nearest_of(
        self, p: np.ndarray, idx: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Best of the candidate triangles idx (m, k) for points p (m, 3)."""
        m, k = idx.shape
        rep = np.repeat(p, k, axis=0)
        t = self.tri[idx.ravel()]
        q = closest_points_on_triangles(rep, t[:, 0], t[:, 1], t[:, 2])
        d = np.linalg.norm(q - rep, axis=1).reshape(m, k)
        best = np.argmin(d, axis=1)
        rows = np.arange(m)
        return d[rows, best], q.reshape(m, k, 3)[rows, best], idx[rows, best]

    def closest(
        self, points: np.ndarray, chunk: int = 8192
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest surface point of each query point.

        Args:
            points: (N, 3) query points.
            chunk: points per batch at the first k (batches shrink as k grows, so that
                points x candidates stays below 500k pairs and memory stays bounded).

        Returns:
            (distance (N,), closest point (N, 3), triangle index (N,)).
        """
        points = np.asarray(points, dtype=np.float64)
        dist = np.empty(points.shape[0])
        near = np.empty_like(points)
        face = np.empty(points.shape[0], dtype=np.int64)
        todo, k = np.arange(points.shape[0]), self.k
        while todo.size:
            batch = max(1, min(chunk, 500_000 // k))
            undone = []
            for s in range(0, todo.size, batch):
                part = todo[s : s + batch]
                dk, idx = self.tree.query(points[part], k=k)
                dk, idx = dk.reshape(part.size, -1), idx.reshape(part.size, -1)
                d0, q0, f0 = self._nearest_of(points[part], idx)
                done = (d0 <= dk[:, -1] - self.r_max) | (k >= self.n_faces)
                hit = part[done]
                dist[hit], near[hit], face[hit] = d0[done], q0[done], f0[done]
                undone.append(part[~done])
            todo = np.concatenate(undone)
            k = min(4 * k, self.n_faces)
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


def _rotation_from_vector(w: np.ndarray) -> np.ndarray:
    """Rotation matrix of the axis-angle vector w (Rodrigues)."""
    angle = float(np.linalg.norm(w))
    if angle < 1e-15:
        return np.eye(3)
    x, y, z = w / angle
    k = np.array([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]])
    return np.eye(3) + math.sin(angle) * k + (1.0 - math.cos(angle)) * (k @ k)


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
    r = _rotation_from_vector(x[:3])
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
