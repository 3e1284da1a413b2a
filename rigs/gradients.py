"""Per-triangle deformation gradients and the sparse Poisson solve that integrates them.

A triangle's deformation gradient ``S`` (3, 3) maps its rest frame to its deformed frame
(Sumner & Popovic 2004): with edges ``e1 = v1 - v0``, ``e2 = v2 - v0`` and the scaled
normal ``n = (e1 x e2) / sqrt(|e1 x e2|)``, ``S = [e1' e2' n'] [e1 e2 n]^-1``. Rigging works
with the *relative* gradient ``M = S - I`` (zero where nothing moves), so blendshapes add.

Vertex positions come back from gradients by a Poisson solve (Botsch et al. 2006): with
``G`` (3m, n) the gradient operator of the rest mesh's piecewise-linear hat functions and
``A`` the triangle areas, the deltas ``D`` (n, 3) of a mesh whose triangle ``t`` should
deform by ``I + M_t`` minimise

    sum_t A_t |G_t D - P_t M_t^T|_F^2,        P_t = I - n_t n_t^T (tangent projector)

with the anchored vertices' deltas given. ``G^T A G`` is the cotangent Laplacian of the rest
mesh: it depends on the rest mesh and the anchor set only, so :class:`PoissonSystem`
factorises it once (CHOLMOD through scikit-sparse where that imports, else SuperLU) and
every basis and every iteration of the rigging solves against that one factor.
A gradient field of a real mesh is integrable, so the solve reproduces that mesh exactly.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from pipeline.errors import ModelError

#: Shapes solved per batch of right-hand sides (3 columns each): bounds the temporaries.
SOLVE_CHUNK = 8
#: Threads that solve batches at once.
THREADS = 2


def triangle_frames(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """Sumner frames ``[e1 e2 n]`` (as columns) of every triangle.

    Args:
        vertices: (..., n, 3) vertex positions (any leading batch shape).
        triangles: (m, 3) int vertex ids.

    Returns:
        (..., m, 3, 3) float64 frames; column 2 is ``e1 x e2 / sqrt(|e1 x e2|)``.
    """
    v = np.asarray(vertices, np.float64)
    t = np.asarray(triangles, np.int64)
    v0 = v[..., t[:, 0], :]
    e1, e2 = v[..., t[:, 1], :] - v0, v[..., t[:, 2], :] - v0
    nrm = np.cross(e1, e2)
    length = np.sqrt(np.linalg.norm(nrm, axis=-1, keepdims=True))
    nrm = nrm / np.maximum(length, 1e-300)
    return np.stack([e1, e2, nrm], axis=-1)


def inverse_frames(rest: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(m, 3, 3) inverses of the rest mesh's frames (rest must have no degenerate triangle)."""
    return np.linalg.inv(triangle_frames(rest, triangles))


def deformation_gradients(
    rest: np.ndarray, deformed: np.ndarray, triangles: np.ndarray, rest_inverse: np.ndarray | None = None
) -> np.ndarray:
    """Relative deformation gradients ``M = S - I`` from a rest mesh to deformed meshes.

    Args:
        rest: (n, 3) rest vertices.
        deformed: (..., n, 3) deformed vertices, one or a batch of meshes.
        triangles: (m, 3) int vertex ids.
        rest_inverse: optional (m, 3, 3) :func:`inverse_frames` of ``rest`` (reuse it when
            many batches share one rest mesh).

    Returns:
        (..., m, 3, 3) float64 relative gradients.
    """
    inv = inverse_frames(rest, triangles) if rest_inverse is None else rest_inverse
    grad = triangle_frames(deformed, triangles) @ inv
    grad[..., [0, 1, 2], [0, 1, 2]] -= 1.0
    return grad


def triangle_areas(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(..., m) float64 triangle areas of (..., n, 3) vertices."""
    v = np.asarray(vertices, np.float64)
    t = np.asarray(triangles, np.int64)
    v0 = v[..., t[:, 0], :]
    return 0.5 * np.linalg.norm(np.cross(v[..., t[:, 1], :] - v0, v[..., t[:, 2], :] - v0), axis=-1)


def gradient_operator(rest: np.ndarray, triangles: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """The piecewise-linear gradient operator of a rest mesh.

    Row ``3 t + a`` of ``G`` is the a-th component of the gradient on triangle ``t`` of a
    scalar field given at the vertices: ``grad phi_i = n_hat x (opposite edge) / (2 A)``.

    Args:
        rest: (n, 3) rest vertices.
        triangles: (m, 3) int vertex ids.

    Returns:
        (G (3m, n) csr, areas (m,), unit normals (m, 3)).
    """
    v = np.asarray(rest, np.float64)
    t = np.asarray(triangles, np.int64)
    p0, p1, p2 = v[t[:, 0]], v[t[:, 1]], v[t[:, 2]]
    cross = np.cross(p1 - p0, p2 - p0)
    double_area = np.linalg.norm(cross, axis=1)
    unit = cross / double_area[:, None]
    grads = [np.cross(unit, opp) / double_area[:, None] for opp in (p2 - p1, p0 - p2, p1 - p0)]
    m = len(t)
    rows = (3 * np.arange(m)[:, None, None] + np.arange(3)[None, None, :]).repeat(3, 1)  # (m, 3 verts, 3 comps)
    cols = np.broadcast_to(t[:, :, None], (m, 3, 3))
    vals = np.stack(grads, axis=1)  # (m, 3 verts, 3 comps)
    g = sp.csr_matrix((vals.ravel(), (rows.ravel(), cols.ravel())), shape=(3 * m, len(v)))
    return g, 0.5 * double_area, unit


def _check_anchored_components(triangles: np.ndarray, domain: np.ndarray, anchors: np.ndarray) -> None:
    """Raises unless every connected component of the domain holds an anchor (else singular)."""
    from scipy.sparse.csgraph import connected_components

    local = np.searchsorted(domain, triangles)
    edges = np.concatenate([local[:, [0, 1]], local[:, [1, 2]]])
    adj = sp.coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(len(domain),) * 2)
    count, label = connected_components(adj, directed=False)
    loose = count - len(np.unique(label[np.searchsorted(domain, anchors)]))
    if loose:
        raise ModelError(f"Poisson domain has {loose} of {count} connected components without an anchor")


def _factorise(matrix: sp.spmatrix):
    """A solve function of an SPD sparse matrix: CHOLMOD if scikit-sparse imports, else SuperLU."""
    csc = sp.csc_matrix(matrix)
    try:
        from sksparse.cholmod import cholesky
    except ImportError:
        cholesky = None
    if cholesky is not None:
        return cholesky(csc), "cholmod"
    from scipy.sparse.linalg import splu

    # Symmetric mode with a minimum-degree ordering on A + A^T (as rigs/deform.py).
    lu = splu(csc, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0, options={"SymmetricMode": True})
    return lu.solve, "superlu"


class PoissonSystem:
    """The factorised Poisson system of one rest mesh and one anchor set.

    Args:
        rest: (n, 3) rest vertices (n counts every vertex of the mesh; those no triangle
            references come back with zero deltas).
        triangles: (m, 3) int vertex ids of the gradient domain.
        anchors: (a,) distinct int vertex ids whose deltas are given at each solve, in the
            order the solves give them; every connected component of the domain needs one.

    Raises:
        ModelError: no anchors, anchors outside the domain, or degenerate triangles.
    """

    def __init__(self, rest: np.ndarray, triangles: np.ndarray, anchors: np.ndarray) -> None:
        self.n = len(rest)
        self.triangles = np.asarray(triangles, np.int64)
        self.domain = np.unique(self.triangles)
        self.anchors = np.asarray(anchors, np.int64).ravel()  # kept in the caller's order
        if len(self.anchors) == 0 or not np.isin(self.anchors, self.domain).all():
            raise ModelError("Poisson anchors must be a non-empty subset of the domain's vertices")
        if len(np.unique(self.anchors)) != len(self.anchors):
            raise ModelError("Poisson anchors must be distinct")
        self.free = np.setdiff1d(self.domain, self.anchors)
        _check_anchored_components(self.triangles, self.domain, self.anchors)
        g, self.areas, self.normals = gradient_operator(rest, self.triangles)
        if not (np.isfinite(self.areas).all() and self.areas.min() > 0):
            raise ModelError(f"Poisson rest mesh has {int(np.sum(~(self.areas > 0)))} degenerate triangles")
        self.grad = g[:, self.domain]  # (3m, d): columns in domain order
        weighted = sp.diags(np.repeat(self.areas, 3)) @ self.grad
        lap = (self.grad.T @ weighted).tocsr()  # cotangent Laplacian, (d, d)
        self._weighted_t = weighted.T.tocsr()  # (d, 3m): G^T A
        free_local = np.searchsorted(self.domain, self.free)
        anchor_local = np.searchsorted(self.domain, self.anchors)
        self._free_local, self._anchor_local = free_local, anchor_local
        self._lap_fa = lap[free_local][:, anchor_local].tocsr()
        self._solve, self.backend = _factorise(lap[free_local][:, free_local])

    def solve_deltas(self, relative: np.ndarray, anchor_deltas: np.ndarray) -> np.ndarray:
        """Vertex deltas whose gradients best match relative gradients, for many shapes.

        Args:
            relative: (K, m, 3, 3) relative gradients ``M`` per shape and triangle.
            anchor_deltas: (K, a, 3) or (a, 3) deltas of the anchors (``self.anchors`` order).

        Returns:
            (K, n, 3) float64 deltas; zero at vertices outside the domain.
        """
        relative = np.asarray(relative, np.float64)
        k = relative.shape[0]
        anchor_deltas = np.broadcast_to(np.asarray(anchor_deltas, np.float64), (k, len(self.anchors), 3))
        out = np.zeros((k, self.n, 3))
        chunks = [slice(s, min(s + SOLVE_CHUNK, k)) for s in range(0, k, SOLVE_CHUNK)]

        def solve(sl: slice) -> None:
            c = sl.stop - sl.start
            # G_t^T P_t = G_t^T (gradients are tangent), so the target P_t M_t^T needs no
            # projection: the right-hand side is G^T A M^T, M^T laid out as (3m, 3c).
            blocks = relative[sl].transpose(1, 3, 0, 2).reshape(-1, 3 * c)
            fixed = anchor_deltas[sl].transpose(1, 0, 2).reshape(len(self.anchors), 3 * c)
            rhs = (self._weighted_t @ blocks)[self._free_local] - self._lap_fa @ fixed
            sol = np.asarray(self._solve(rhs)).reshape(len(self.free), c, 3)
            out[sl, self.free] = sol.transpose(1, 0, 2)
            out[sl, self.anchors] = anchor_deltas[sl]

        run_chunks(solve, chunks)
        return out


def run_chunks(work, chunks: list, threads: int = THREADS) -> None:
    """Runs ``work(chunk)`` for every chunk, on ``threads`` threads (numpy's batched
    solvers and SuperLU release the GIL; the machine has 2 cores)."""
    if threads <= 1 or len(chunks) <= 1:
        for chunk in chunks:
            work(chunk)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, chunks))
