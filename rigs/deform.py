"""Regularised Laplacian deformation of a template mesh toward a scan (issue 7 step 3).

The unknowns are the displacements ``d = x - x_fit`` of the *free* vertices (the
deformable region); every other vertex keeps its fitted position exactly (eyeballs,
teeth, gums: rigid). Each iteration minimises

    alpha_k |L d|^2 + beta |d|^2 + w sum_{i in data} |d_i - t_i|^2

where ``L`` is the template's graph Laplacian (:func:`rigs.geometry.graph_laplacian`)
restricted to the free columns, and ``t_i`` is a data vertex's target displacement:

* an accepted correspondence (the nearest scan vertex to the vertex's current position,
  within the iteration's distance, with a compatible normal, off the scan's border and
  outside the template's mouth and eye openings) targets the projection of the *fitted*
  vertex onto the scan's tangent plane there: point-to-plane in the normal direction,
  while the tangential position stays the fit's (a smooth scan holds no information about
  sliding along it; letting vertices slide raised the tangential error on the tiny
  subject from 0.09 to 0.12 mm);
* a data vertex without one (outside the scan, in a hole, across an opening) targets
  the fit (zero displacement): the scan's displacement is not extrapolated into regions
  it does not see (extrapolating raised the error there from 0.19 to 0.21 mm).

Because every data vertex keeps the same weight ``w``, the normal matrix depends only on
``alpha_k``: :class:`LaplacianSystem` factorises it once per stiffness (SuperLU, symmetric
mode) and reuses it for every iteration and every expression of a subject; an iteration
is then one correspondence query and one triangular solve with three right-hand sides.

Openings: Poisson fills the open mouth (and the eye openings) with a membrane. The
template's openings are the boundary loops of its skin part where it meets the mouth and
eye sockets (:func:`opening_loops`); scan points whose projection along the head's +z
axis falls inside such a loop of the fitted mesh (shrunk by a margin) are never targets,
so lips are not pulled onto the membrane nor welded together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from pipeline.errors import ModelError
from rigs.geometry import graph_laplacian
from rigs.raycast import vertex_normals

# ---------------------------------------------------------------------------- topology


def boundary_loops(triangles: np.ndarray, keep: np.ndarray | None = None) -> list[np.ndarray]:
    """Ordered boundary loops of a set of consistently oriented triangles.

    Args:
        triangles: (m, 3) int vertex indices.
        keep: optional (m,) bool, the triangles forming the surface (all by default).

    Returns:
        One (k,) int64 array of vertex ids per loop, in the half-edge direction.

    Raises:
        ModelError: the boundary is not manifold (a vertex with two outgoing border edges).
    """
    t = np.asarray(triangles, np.int64)
    if keep is not None:
        t = t[np.asarray(keep, bool)]
    half = np.concatenate([t[:, [0, 1]], t[:, [1, 2]], t[:, [2, 0]]])
    n = int(t.max()) + 1 if len(t) else 0
    key = half[:, 0] * n + half[:, 1]
    border = half[~np.isin(key, half[:, 1] * n + half[:, 0])]
    if len(np.unique(border[:, 0])) != len(border):
        raise ModelError("boundary is not manifold: a vertex has two outgoing border edges")
    succ = dict(zip(border[:, 0].tolist(), border[:, 1].tolist(), strict=True))
    loops, seen = [], set()
    for start in border[:, 0].tolist():
        if start in seen:
            continue
        loop, v = [], start
        while v not in seen:
            seen.add(v)
            loop.append(v)
            v = succ[v]
        loops.append(np.asarray(loop, np.int64))
    return loops


def opening_loops(triangles: np.ndarray, vertex_part: np.ndarray, part_names: Sequence[str],
                  skin: str = "face",
                  sockets: Sequence[str] = ("mouth_socket", "eye_socket_left", "eye_socket_right"),
                  ) -> dict[str, np.ndarray]:
    """The template's openings: loops of the skin part's border that face a socket part.

    Args:
        triangles: (m, 3) template triangles.
        vertex_part: (n,) part index of each vertex.
        part_names: the parts' names.
        skin: the part whose border holds the openings.
        sockets: the parts seen through the openings.

    Returns:
        socket name -> (k,) int64 ordered loop of skin vertices around that opening;
        sockets missing from the model are left out.
    """
    t = np.asarray(triangles, np.int64)
    part = np.asarray(vertex_part)
    if skin not in part_names:
        return {}
    skin_id = list(part_names).index(skin)
    loops = boundary_loops(t, (part[t] == skin_id).all(1))
    edges = np.concatenate([t[:, [0, 1]], t[:, [1, 2]], t[:, [2, 0]]])
    out: dict[str, np.ndarray] = {}
    for name in sockets:
        if name not in part_names:
            continue
        sid = list(part_names).index(name)
        touching = np.unique(edges[part[edges[:, 1]] == sid, 0])
        best = max(loops, key=lambda lp: np.isin(lp, touching).sum(), default=None)
        if best is not None and np.isin(best, touching).mean() > 0.5:
            out[name] = best
    return out


def border_vertices(n: int, triangles: np.ndarray) -> np.ndarray:
    """(n,) bool, vertices on a border edge (an edge of exactly one triangle)."""
    t = np.asarray(triangles, np.int64)
    e = np.sort(np.concatenate([t[:, [0, 1]], t[:, [1, 2]], t[:, [2, 0]]]), axis=1)
    uniq, count = np.unique(e[:, 0] * n + e[:, 1], return_counts=True)
    once = uniq[count == 1]
    out = np.zeros(n, bool)
    out[once // n] = True
    out[once % n] = True
    return out


def inside_polygon(points: np.ndarray, polygon: np.ndarray, margin: float = 0.0) -> np.ndarray:
    """Points strictly inside a closed 2D polygon and farther than ``margin`` from its edges.

    Args:
        points: (p, 2) query points.
        polygon: (k, 2) vertices of a closed polygon (any orientation, may self-touch).
        margin: inward shrink, same unit as the points; >= 0.

    Returns:
        (p,) bool (even-odd rule).
    """
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    a = np.asarray(polygon, np.float64).reshape(-1, 2)
    out = np.zeros(len(pts), bool)
    if len(a) < 3 or len(pts) == 0:
        return out
    lo, hi = a.min(0), a.max(0)
    idx = np.flatnonzero(((pts >= lo) & (pts <= hi)).all(1))  # only the bounding box is tested
    if len(idx) == 0:
        return out
    p = pts[idx][:, None, :]  # (q, 1, 2)
    b = np.roll(a, -1, axis=0)
    a_, b_ = a[None], b[None]  # (1, k, 2)
    crosses = (a_[..., 1] > p[..., 1]) != (b_[..., 1] > p[..., 1])
    with np.errstate(divide="ignore", invalid="ignore"):
        x_at = a_[..., 0] + (p[..., 1] - a_[..., 1]) * (b_[..., 0] - a_[..., 0]) / (b_[..., 1] - a_[..., 1])
    inside = (crosses & (p[..., 0] < x_at)).sum(1) % 2 == 1
    if margin > 0:
        e = b_ - a_
        length2 = np.maximum((e**2).sum(-1), 1e-30)
        s = np.clip(((p - a_) * e).sum(-1) / length2, 0.0, 1.0)
        dist = np.linalg.norm(p - (a_ + s[..., None] * e), axis=-1).min(1)
        inside &= dist > margin
    out[idx] = inside
    return out


# ------------------------------------------------------------------------------ solver


class LaplacianSystem:
    """The factorised normal equations of the deformation for one template and free set.

    Args:
        n_vertices: template vertex count n.
        triangles: (m, 3) template triangles.
        free: (f,) int vertex ids that may move (the deformable region); all others keep
            their fitted position.
        data: (d,) int vertex ids, a subset of ``free``, that take scan correspondences.
        data_weight: w, weight of a data vertex's target term.
        anchor_weight: beta, weight of |x - x_fit|^2 on every free vertex (> 0: makes the
            system definite where the region has no fixed boundary).

    Raises:
        ModelError: ids out of range, or ``data`` not inside ``free``.
    """

    def __init__(self, n_vertices: int, triangles: np.ndarray, free: np.ndarray, data: np.ndarray,
                 data_weight: float = 1.0, anchor_weight: float = 1e-3) -> None:
        self.n = int(n_vertices)
        self.free = np.unique(np.asarray(free, np.int64))
        self.data = np.unique(np.asarray(data, np.int64))
        if len(self.free) == 0 or self.free[0] < 0 or self.free[-1] >= self.n:
            raise ModelError(f"free vertex ids must be a non-empty subset of 0..{self.n - 1}")
        if not np.isin(self.data, self.free).all():
            raise ModelError("data vertices must be free vertices")
        if not (data_weight > 0 and anchor_weight > 0):
            raise ModelError("data_weight and anchor_weight must be > 0")
        self.triangles = np.asarray(triangles, np.int64)
        self.data_weight, self.anchor_weight = float(data_weight), float(anchor_weight)
        lap = graph_laplacian(self.n, self.triangles)[:, self.free]
        self._ltl = (lap.T @ lap).tocsc()
        self._data_in_free = np.searchsorted(self.free, self.data)
        diag = np.full(len(self.free), self.anchor_weight)
        diag[self._data_in_free] += self.data_weight
        self._diag = sp.diags(diag).tocsc()
        self._factors: dict[float, object] = {}
        # Sums of the incident triangles' area vectors at the data vertices: their normals
        # in one sparse product (np.add.at over the whole mesh is ~10x slower).
        t = self.triangles
        hit = np.isin(t, self.data)
        rows = np.searchsorted(self.data, t[hit])
        self._incidence = sp.csr_matrix((np.ones(len(rows)), (rows, np.nonzero(hit)[0])),
                                        shape=(len(self.data), len(t)))

    def data_normals(self, vertices: np.ndarray) -> np.ndarray:
        """(d, 3) float64 unit area-weighted normals of the data vertices at ``vertices`` (n, 3)."""
        corners = vertices[self.triangles]
        area = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
        nrm = self._incidence @ area
        return nrm / np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-20)

    def factor(self, stiffness: float):
        """The SuperLU factorisation of ``stiffness L'L + diag``, cached per stiffness."""
        from scipy.sparse.linalg import splu

        key = float(stiffness)
        if key not in self._factors:
            a = (key * self._ltl + self._diag).tocsc()
            # Symmetric mode with a minimum-degree ordering: ~0.15 s for 14k unknowns.
            self._factors[key] = splu(a, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                                      options={"SymmetricMode": True})
        return self._factors[key]

    def solve(self, stiffness: float, target: np.ndarray) -> np.ndarray:
        """Displacements of the free vertices for data-vertex target displacements.

        Args:
            stiffness: alpha, the Laplacian weight.
            target: (d, 3) target displacement of each data vertex (``self.data`` order).

        Returns:
            (f, 3) float64 displacements of the free vertices (``self.free`` order).
        """
        rhs = np.zeros((len(self.free), 3))
        rhs[self._data_in_free] = self.data_weight * np.asarray(target, np.float64)
        return self.factor(stiffness).solve(rhs)


@dataclass(frozen=True, eq=False)
class DeformResult:
    """A template refined toward a scan.

    Attributes:
        vertices: (n, 3) float64 refined vertices (non-free vertices are the input's).
        accepted: (d,) bool, data vertices with an accepted correspondence at the last
            iteration (``LaplacianSystem.data`` order).
        accepted_per_iteration: (iterations,) int64 accepted correspondences per iteration.
        residual: (d,) float64 point-to-plane distance to the scan at the last iteration's
            correspondences, metres; NaN where none was accepted.
    """

    vertices: np.ndarray
    accepted: np.ndarray
    accepted_per_iteration: np.ndarray
    residual: np.ndarray


def oriented_normals(vertices: np.ndarray, triangles: np.ndarray, viewpoint: np.ndarray) -> np.ndarray:
    """(V, 3) float64 unit vertex normals of a scan, flipped as a whole to face ``viewpoint``.

    A fused scan is seen from its camera, so most of its surface faces it; the majority
    decides, which keeps a consistently oriented mesh consistent.
    """
    nrm = vertex_normals(np.asarray(vertices, np.float64), np.asarray(triangles)).astype(np.float64)
    facing = np.einsum("ij,ij->i", nrm, np.asarray(viewpoint, np.float64) - vertices)
    return -nrm if np.median(facing) < 0 else nrm


@dataclass(frozen=True, eq=False)
class ScanTargets:
    """A scan's usable vertices, ready for correspondence queries.

    Attributes:
        points: (u, 3) float64 usable scan vertices, head frame, metres.
        normals: (u, 3) float64 their unit normals, facing out of the face.
        tree: a ``scipy.spatial.cKDTree`` over ``points``.
    """

    points: np.ndarray
    normals: np.ndarray
    tree: object

    @classmethod
    def build(cls, vertices: np.ndarray, triangles: np.ndarray, viewpoint: np.ndarray,
              excluded: np.ndarray | None = None) -> ScanTargets:
        """The usable part of a scan mesh: its vertices off the border and not excluded.

        Args:
            vertices: (V, 3) scan vertices, head frame.
            triangles: (F, 3) scan triangles.
            viewpoint: (3,) the scan camera's centre in the head frame (orients normals).
            excluded: optional (V,) bool, vertices never to use (e.g. seen through an opening).

        Raises:
            ModelError: malformed arrays.
        """
        from scipy.spatial import cKDTree

        v = np.asarray(vertices, np.float64)
        t = np.asarray(triangles, np.int64)
        if v.ndim != 2 or v.shape[1] != 3 or t.ndim != 2 or t.shape[1] != 3:
            raise ModelError(f"a scan needs (V, 3) vertices and (F, 3) triangles, got {v.shape}, {t.shape}")
        if len(t) and (t.min() < 0 or t.max() >= len(v)):
            raise ModelError("scan triangles index vertices that do not exist")
        use = np.zeros(len(v), bool)
        nrm = np.zeros_like(v)
        if len(t):
            nrm = oriented_normals(v, t, viewpoint)
            use[np.unique(t)] = True
            use &= ~border_vertices(len(v), t)  # a border point is where the scan stops
        if excluded is not None:
            use &= ~np.asarray(excluded, bool)
        return cls(v[use], nrm[use], cKDTree(v[use]))


def opening_mask(points: np.ndarray, fitted: np.ndarray, loops: dict[str, np.ndarray],
                 margin: float) -> np.ndarray:
    """(p,) bool, head-frame points seen through an opening of the fitted mesh (along z)."""
    out = np.zeros(len(points), bool)
    for loop in loops.values():
        out |= inside_polygon(points[:, :2], fitted[loop, :2], margin)
    return out


def deform_to_scan(
    system: LaplacianSystem,
    fitted: np.ndarray,
    scan: ScanTargets,
    *,
    stiffness: Sequence[float],
    max_distance: Sequence[float],
    max_angle_deg: float,
) -> DeformResult:
    """Refines a fitted template toward a scan (point-to-plane data, Laplacian regulariser).

    Args:
        system: the factorised system of the template and its free/data sets.
        fitted: (n, 3) fitted vertices, head frame, metres.
        scan: the scan's usable points, head frame.
        stiffness: alpha per iteration (decreasing: coarse to fine).
        max_distance: correspondence distance per iteration, metres (same length).
        max_angle_deg: largest angle between a vertex normal and its scan point's normal.

    Returns:
        The refined vertices and the correspondences' record.

    Raises:
        ModelError: shapes or schedules are malformed.
    """
    x_fit = np.asarray(fitted, np.float64)
    if x_fit.shape != (system.n, 3):
        raise ModelError(f"fitted vertices must be ({system.n}, 3), got {x_fit.shape}")
    if len(stiffness) != len(max_distance) or len(stiffness) == 0:
        raise ModelError("stiffness and max_distance need one entry per iteration")
    cos_min = np.cos(np.deg2rad(max_angle_deg))
    x = x_fit.copy()
    d_ids = system.data
    counts = []
    accepted, j = np.zeros(len(d_ids), bool), np.zeros(len(d_ids), np.int64)
    for alpha, limit in zip(stiffness, max_distance, strict=True):
        accepted, j = _correspondences(x, system, scan, limit, cos_min)
        # Point-to-plane, with the tangential position kept from the fit: a smooth scan
        # says nothing about sliding along it, so the fit is the best guess there.
        target = np.zeros((len(d_ids), 3))
        m, q = scan.normals[j[accepted]], scan.points[j[accepted]]
        target[accepted] = -np.einsum("ij,ij->i", x_fit[d_ids[accepted]] - q, m)[:, None] * m
        counts.append(int(accepted.sum()))
        x[system.free] = x_fit[system.free] + system.solve(alpha, target)
    residual = np.full(len(d_ids), np.nan)
    residual[accepted] = np.einsum("ij,ij->i", x[d_ids[accepted]] - scan.points[j[accepted]],
                                   scan.normals[j[accepted]])
    return DeformResult(x, accepted, np.asarray(counts, np.int64), residual)


def _correspondences(x: np.ndarray, system: LaplacianSystem, scan: ScanTargets, limit: float,
                     cos_min: float) -> tuple[np.ndarray, np.ndarray]:
    """(accepted (d,) bool, scan point index (d,)) of the data vertices at positions ``x``:
    the nearest usable scan point within ``limit`` whose normal is within the angle."""
    d_ids = system.data
    if len(scan.points) == 0:
        return np.zeros(len(d_ids), bool), np.zeros(len(d_ids), np.int64)
    dist, j = scan.tree.query(x[d_ids], distance_upper_bound=limit)
    accepted = np.isfinite(dist)
    j = np.where(accepted, j, 0)
    nrm = system.data_normals(x)
    accepted &= np.einsum("ij,ij->i", nrm, scan.normals[j]) >= cos_min
    return accepted, j
