"""Shared geometry: similarity fits, closest points on a mesh, rotations, mesh graphs, OBJ.

One implementation of each, used by the rig builders (``rigs/``), the synthetic data
generator and the metrics (``stages/``).

Quaternion convention of the product (docs/contracts.md, docs/storage.md): (w, x, y, z),
scalar first, unit norm, w >= 0 (q and -q are the same rotation; w >= 0 picks one). The
rotation of a quaternion maps head-frame points to the headset frame. SciPy's
:class:`~scipy.spatial.transform.Rotation` is scalar-last by default, so every conversion
goes through :func:`rotation_from_quat` and :func:`quat_from_rotation`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import laplacian
from scipy.spatial.transform import Rotation

from pipeline.errors import ModelError

# ---------------------------------------------------------------------------- rotations


def rotation_from_quat(q: np.ndarray) -> Rotation:
    """Rotation(s) of (w, x, y, z) quaternions (..., 4); normalised by SciPy."""
    return Rotation.from_quat(np.asarray(q, dtype=np.float64), scalar_first=True)


def quat_from_rotation(rot: Rotation) -> np.ndarray:
    """(w, x, y, z) unit quaternions of ``rot``, (4,) or (N, 4), with w >= 0."""
    return rot.as_quat(canonical=True, scalar_first=True)


# --------------------------------------------------------------------------------- fits


def similarity_fit(
    src: np.ndarray,
    dst: np.ndarray,
    *,
    with_scale: bool = True,
    weights: np.ndarray | None = None,
) -> tuple[float, np.ndarray, np.ndarray]:
    """Least-squares similarity (Umeyama 1991) or rigid (Kabsch, ``with_scale=False``) fit.

    Args:
        src: (N, 3) points, N >= 3 and not collinear for a unique answer.
        dst: (N, 3) corresponding points.
        with_scale: fit a uniform scale too; False fixes s = 1.
        weights: optional (N,) non-negative weights of the pairs.

    Returns:
        (s, R (3, 3), t (3,)) minimising sum w |s R src + t - dst|^2, with det R = +1.

    Raises:
        ModelError: shapes do not match, fewer than 3 pairs, or weights not usable.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3 or src.shape[0] < 3:
        raise ModelError(f"a fit needs two (N>=3, 3) arrays, got {src.shape}, {dst.shape}")
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(src),) or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ModelError(f"weights must be {len(src)} finite non-negative numbers, not all 0")
    w = w / w.sum()
    mu_s, mu_d = w @ src, w @ dst
    a, b = src - mu_s, dst - mu_d
    u, sig, vt = np.linalg.svd((b * w[:, None]).T @ a)  # covariance dst x src
    d = np.diag([1.0, 1.0, np.sign(np.linalg.det(u @ vt)) or 1.0])  # no reflections
    rot = u @ d @ vt
    scale = float(np.trace(np.diag(sig) @ d) / (w @ (a**2).sum(1))) if with_scale else 1.0
    return scale, rot, mu_d - scale * rot @ mu_s


# ------------------------------------------------------------------------------- meshes


class ClosestPoints:
    """Exact closest points on a triangle mesh (Open3D's ray-casting scene, a BVH).

    Open3D finds the closest triangle (in float32, so coordinates are taken relative to
    the mesh's centre); the point on that triangle is then computed in float64, because
    float32 alone leaves errors of ~1e-7 of the triangle's size (3e-9 m on 1 cm
    triangles), above the ICP's 1e-9 m stopping tolerance. trimesh's point-triangle
    routine is not used for that: its absolute tolerances misplace points on
    sub-millimetre triangles in metres.

    Args:
        vertices: (n, 3) vertex positions.
        triangles: (m, 3) vertex indices.
        triangle_ids: optional subset of the triangles to search; ids returned are still
            indices into ``triangles``.
    """

    def __init__(
        self, vertices: np.ndarray, triangles: np.ndarray, triangle_ids: np.ndarray | None = None
    ) -> None:
        import open3d as o3d

        self.vertices = np.asarray(vertices, dtype=np.float64)
        self.triangles = np.asarray(triangles, dtype=np.int64)
        self.triangle_ids = (
            np.arange(len(self.triangles)) if triangle_ids is None else np.asarray(triangle_ids)
        )
        self._centre = self.vertices.mean(axis=0)
        self._scene = o3d.t.geometry.RaycastingScene()
        self._scene.add_triangles(
            o3d.core.Tensor((self.vertices - self._centre).astype(np.float32)),
            o3d.core.Tensor(self.triangles[self.triangle_ids].astype(np.uint32)),
        )

    def query(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Closest surface point of each query point.

        Args:
            points: (p, 3) query points.

        Returns:
            (closest points (p, 3), distances (p,), triangle ids (p,), barycentrics (p, 3)
            of the triangle's three corners).
        """
        import open3d as o3d

        points = np.asarray(points, dtype=np.float64)
        res = self._scene.compute_closest_points(
            o3d.core.Tensor((points - self._centre).astype(np.float32))
        )
        tri = self.triangle_ids[res["primitive_ids"].numpy().astype(np.int64)]
        near = _closest_on_triangle(self.vertices[self.triangles[tri]], points)
        bary = _barycentric(self.vertices[self.triangles[tri]], near)
        return near, np.linalg.norm(points - near, axis=1), tri, bary


def _closest_on_triangle(corners: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Closest point on each triangle (p, 3, 3) to each point (p, 3), float64.

    The best of the foot of the perpendicular (when inside) and the closest points of
    the three edges; no Voronoi-region case analysis to get wrong.
    """
    a, b, c = corners[:, 0], corners[:, 1], corners[:, 2]
    candidates = []
    for u, v in ((a, b), (b, c), (c, a)):  # clamp the projection onto each edge
        e = v - u
        length2 = np.einsum("ij,ij->i", e, e)
        t = np.divide(np.einsum("ij,ij->i", points - u, e), length2, out=np.zeros_like(length2), where=length2 > 0)
        candidates.append(u + np.clip(t, 0.0, 1.0)[:, None] * e)
    bary = _barycentric(corners, points)  # of the foot of the perpendicular
    foot = np.einsum("pkc,pk->pc", corners, bary)
    inside = np.isfinite(bary).all(1) & (bary >= 0).all(1)
    candidates.append(np.where(inside[:, None], foot, candidates[0]))
    stack = np.stack(candidates, 1)  # (p, 4, 3)
    best = np.linalg.norm(stack - points[:, None], axis=2).argmin(1)
    return stack[np.arange(len(points)), best]


def _barycentric(corners: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(p, 3) barycentrics of each point's projection onto its triangle's plane (NaN if flat)."""
    v0, v1, v2 = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], points - corners[:, 0]
    d00, d01, d11 = (np.einsum("ij,ij->i", x, y) for x, y in ((v0, v0), (v0, v1), (v1, v1)))
    d20, d21 = np.einsum("ij,ij->i", v2, v0), np.einsum("ij,ij->i", v2, v1)
    with np.errstate(divide="ignore", invalid="ignore"):
        den = d00 * d11 - d01 * d01
        v, w = (d11 * d20 - d01 * d21) / den, (d00 * d21 - d01 * d20) / den
    return np.stack([1.0 - v - w, v, w], 1)


def graph_laplacian(n: int, triangles: np.ndarray) -> sp.csr_matrix:
    """Uniform (random-walk) graph Laplacian I - D^-1 A (n, n) of a triangle mesh's edges."""
    t = np.asarray(triangles)
    edges = np.concatenate([t[:, [0, 1]], t[:, [1, 2]], t[:, [2, 0]]])
    adj = sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    adj = ((adj + adj.T) > 0).astype(np.float64)
    lap = laplacian(adj.tocsr())  # D - A
    return (sp.diags(1.0 / lap.diagonal()) @ lap).tocsr()


def read_obj(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (n, 3) float64 and triangles (m, 3) int64 of an OBJ, in file order (trimesh).

    trimesh splits a quad (a, b, c, d) into (a, b, c), (c, d, a); texture coordinates and
    normals are dropped.

    Raises:
        ModelError: the file is not one mesh, or its texture seams make trimesh split
            vertices (then vertex i would no longer be the file's vertex i).
    """
    import trimesh

    path = Path(path)
    try:
        mesh = trimesh.load(path, force="mesh", process=False, maintain_order=True, skip_materials=True)
    except (ValueError, IndexError) as e:
        raise ModelError(f"{path}: not a readable OBJ mesh ({type(e).__name__})") from None
    with open(path, "rb") as f:
        n_file = sum(line.startswith(b"v ") for line in f)
    if len(mesh.vertices) != n_file:
        raise ModelError(
            f"{path}: trimesh split its {n_file} vertices into {len(mesh.vertices)} at "
            "texture seams, so the file's vertex order cannot be kept"
        )
    return np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces, dtype=np.int64)
