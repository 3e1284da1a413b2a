"""The rig's template (ICT topology) registered onto FLAME-fitted surfaces.

With a FLAME file configured the fit works in FLAME's topology; later stages need the
rig's. :func:`rig_meshes_from_flame` turns each FLAME surface into a rig-topology mesh:

1. **Initial pose** per surface: the rig's embedded MediaPipe landmarks (mean shape) to
   the same landmarks on the FLAME surface (Kabsch, no scale: both are metric); without
   landmarks, the centroids of the two face regions.
2. **Joint fit** of the rig's linear model to all surfaces at once: identity shared,
   expression weights per surface in the model's bounds [0, 1], a rigid pose per surface
   (``flame_from_rig``). Gauss-Newton on point-to-plane distances from the rig's fitting
   vertices to their closest FLAME points (pairs farther than a shrinking distance, or
   with normals more than ``max_normal_angle_deg`` apart, are dropped), plus
   point-to-point landmark pairs as a guide, plus ridge priors. The per-surface blocks
   are eliminated (Schur complement), so one iteration costs one (k, k) solve; the
   weight bounds are kept by an active set (weights at a bound stay fixed while the
   gradient pushes them outward).
3. **Deformation** of each fitted mesh onto its FLAME surface by ``deform`` (the
   refinement's Laplacian solver, ``rigs/deform.py``), which keeps the rig's topology
   and its rigid parts.

Meshes are returned in the rig's head frame; ``flame_from_rig[s]`` maps them into the
FLAME head frame, so a scan pose of the FLAME fit becomes the rig's by
``scan_from_head_rig = scan_from_head_flame @ flame_from_rig[s]``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.spatial.transform import Rotation

from pipeline.config import check_fields
from pipeline.errors import ConfigError, ModelError
from rigs.face_model import FaceModel, LandmarkEmbedding
from rigs.geometry import ClosestPoints, similarity_fit

#: deform(mesh (n, 3), target vertices (p, 3), target triangles (q, 3)) -> (n, 3): moves a
#: rig-topology mesh onto a target surface (all in the same frame, metres).
Deformer = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
#: MediaPipe iris landmarks: on the eyeballs, which FLAME rotates by joints.
_IRIS = np.arange(468, 478)


@dataclass(frozen=True)
class FlameRegistrationConfig:
    """The rig template's fit to FLAME surfaces (:func:`rig_meshes_from_flame`)."""

    iterations: int = 12
    """Gauss-Newton iterations (closest points re-found each time). >= 1."""
    max_vertices: int = 3000
    """At most this many rig fitting vertices (evenly strided) enter the fit. >= 100."""
    max_distance_mm: float = 10.0
    """Pairs farther apart are dropped in the first iteration, mm. > 0."""
    min_distance_mm: float = 2.0
    """... shrinking geometrically to this in the last, mm. In (0, max_distance_mm]."""
    max_normal_angle_deg: float = 60.0
    """Pairs whose normals differ by more are dropped (lips vs teeth, lid vs eyeball); in (0, 180]."""
    landmark_weight: float = 0.1
    """Weight of a landmark pair relative to a surface pair (the embeddings of two models
    differ by millimetres, so a guide). >= 0."""
    identity_prior: float = 1e-3
    """Ridge weight on the identity coefficients (N(0, 1) units, per mm^2 of residual). >= 0."""
    expression_prior: float = 1e-3
    """Ridge weight on the expression weights. >= 0."""
    min_pairs: int = 100
    """A surface with fewer accepted pairs in an iteration is rejected (left out). >= 10."""
    max_fit_median_mm: float = 1.0
    """A surface the fit lies farther from (median over the fitting vertices) is rejected, mm. > 0."""

    def __post_init__(self) -> None:
        check_fields(self)
        rules = (
            ("iterations", self.iterations >= 1, ">= 1"),
            ("max_vertices", self.max_vertices >= 100, ">= 100"),
            ("max_distance_mm", self.max_distance_mm > 0, "> 0"),
            ("min_distance_mm", 0 < self.min_distance_mm <= self.max_distance_mm, "in (0, max_distance_mm]"),
            ("max_normal_angle_deg", 0 < self.max_normal_angle_deg <= 180, "in (0, 180]"),
            ("landmark_weight", self.landmark_weight >= 0, ">= 0"),
            ("identity_prior", self.identity_prior >= 0, ">= 0"),
            ("expression_prior", self.expression_prior >= 0, ">= 0"),
            ("min_pairs", self.min_pairs >= 10, ">= 10"),
            ("max_fit_median_mm", self.max_fit_median_mm > 0, "> 0"),
        )
        for name, ok, rule in rules:
            if not ok:
                raise ConfigError(f"flame_registration.{name} must be {rule}")


@dataclass(frozen=True, eq=False)
class RigRegistration:
    """Rig-topology meshes of FLAME surfaces. Rows of rejected surfaces are NaN.

    Attributes:
        vertices: (S, n, 3) float32 rig meshes in the rig's head frame (deformed when a
            deformer was given, else the fit).
        fitted: (S, n, 3) float32 the rig model's fit before deformation, same frame.
        flame_from_rig: (S, 4, 4) float64 rigid maps rig head frame -> FLAME head frame.
        identity: (k,) float32 rig identity coefficients.
        weights: (S, e) float32 rig expression weights in [0, 1] (the face model's order).
        fit_median_mm, fit_p90_mm: (S,) distance of the rig's fitting vertices to the
            FLAME surface after the fit, mm.
        median_mm, p90_mm: (S,) the same for ``vertices``.
        reasons: (S,) why each surface was rejected; "" = registered.
    """

    vertices: np.ndarray
    fitted: np.ndarray
    flame_from_rig: np.ndarray
    identity: np.ndarray
    weights: np.ndarray
    fit_median_mm: np.ndarray
    fit_p90_mm: np.ndarray
    median_mm: np.ndarray
    p90_mm: np.ndarray
    reasons: tuple[str, ...]

    @property
    def ok(self) -> np.ndarray:
        """(S,) bool, registered surfaces."""
        return np.array([not r for r in self.reasons], bool)


def _check_inputs(flame_vertices: np.ndarray, flame_triangles: np.ndarray) -> None:
    if flame_vertices.ndim != 3 or flame_vertices.shape[2] != 3 or len(flame_vertices) == 0:
        raise ModelError(f"flame_vertices must be (S>=1, n, 3), got {flame_vertices.shape}")
    if flame_triangles.ndim != 2 or flame_triangles.shape[1] != 3:
        raise ModelError(f"flame_triangles must be (m, 3), got {flame_triangles.shape}")
    if flame_triangles.min() < 0 or flame_triangles.max() >= flame_vertices.shape[1]:
        raise ModelError("flame_triangles index past the FLAME vertices")
    if not np.isfinite(flame_vertices).all():
        raise ModelError("flame_vertices must be finite")


class _LinearRig:
    """The rig's linear model (neutral + identity + expression), with its landmarks.

    Inside the fit only a local set of vertices is evaluated: the (strided) fitting
    vertices, the corners of the triangles around them (for their normals) and the
    landmark triangles' corners.
    """

    def __init__(self, face_model: FaceModel, flame_landmarks: LandmarkEmbedding | None, max_vertices: int) -> None:
        self.model = face_model
        fit = face_model.fitting_vertices
        self.fit_ids = fit[:: max(1, -(-len(fit) // max_vertices))]
        self.neutral = face_model.neutral.astype(np.float64)
        self.b_id = face_model.identity_basis.astype(np.float64)  # (k, n, 3)
        self.b_ex = face_model.expression_basis.astype(np.float64)  # (e, n, 3)
        tris = np.asarray(face_model.triangles, np.int64)
        around = tris[np.isin(tris, self.fit_ids).any(1)]
        rig = face_model.embeddings.get("mediapipe478")
        self.landmark_ids, corners = None, np.zeros((0, 3), np.int64)
        if rig is not None and flame_landmarks is not None:
            both = np.isfinite(flame_landmarks.barycentric).all(1) & np.isfinite(rig.barycentric).all(1)
            both[_IRIS] = False  # FLAME turns its eyeballs by joints, the rig by blendshapes
            if both.sum() >= 3:
                self.landmark_ids = np.flatnonzero(both)
                corners = tris[rig.triangle[self.landmark_ids]]  # (L, 3)
                self.bary = rig.barycentric[self.landmark_ids]
                self.lmk_id = np.einsum("klqc,lq->klc", self.b_id[:, corners], self.bary)  # (k, L, 3)
                self.lmk_ex = np.einsum("elqc,lq->elc", self.b_ex[:, corners], self.bary)
        self.local = np.unique(np.concatenate([self.fit_ids, around.ravel(), corners.ravel()]))
        self.fit_local = np.searchsorted(self.local, self.fit_ids)
        self.corners_local = np.searchsorted(self.local, corners)
        self.tris_local = np.searchsorted(self.local, around)
        t = len(around)  # vertex-triangle incidence: vertex normals as one sparse product
        self.incidence = sp.csr_matrix((np.ones(3 * t), (self.tris_local.T.ravel(), np.tile(np.arange(t), 3))),
                                       shape=(len(self.local), t))[self.fit_local]
        self.loc_neutral = self.neutral[self.local]
        # contiguous copies: a fancy-indexed middle axis is strided, and tensordot would copy it each call
        self.loc_id = np.ascontiguousarray(self.b_id[:, self.local])
        self.loc_ex = np.ascontiguousarray(self.b_ex[:, self.local])
        # (f, 3, k + e): the basis at the fitting vertices, vertex-major for row selection
        self.fit_basis = np.ascontiguousarray(np.concatenate(
            [self.loc_id[:, self.fit_local], self.loc_ex[:, self.fit_local]]).transpose(1, 2, 0))

    def mesh(self, identity: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(..., n, 3) whole meshes of identity (k,) and weights (..., e)."""
        return self.neutral + np.tensordot(identity, self.b_id, 1) + np.tensordot(weights, self.b_ex, 1)

    def local_mesh(self, identity: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """(v, 3) the local vertices of one mesh."""
        return self.loc_neutral + np.tensordot(identity, self.loc_id, 1) + np.tensordot(weights, self.loc_ex, 1)

    def fit_normals(self, local: np.ndarray) -> np.ndarray:
        """(f, 3) unit area-weighted normals at the fitting vertices of a local mesh."""
        v = local[self.tris_local]
        n = self.incidence @ np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
        return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-20)

    def landmarks(self, local: np.ndarray) -> np.ndarray:
        """(L, 3) landmark points of a local mesh."""
        return np.einsum("lkc,lk->lc", local[self.corners_local], self.bary)


def _initial_pose(rig: _LinearRig, surface: np.ndarray, targets: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(R, t) rig -> FLAME: Kabsch on the landmarks, else the face regions' centroids."""
    if targets is not None:
        _, rot, trans = similarity_fit(rig.landmarks(rig.loc_neutral), targets, with_scale=False)
        return rot, trans
    return np.eye(3), surface.mean(0) - rig.neutral[rig.fit_ids].mean(0)


def _surface_rows(
    rig: _LinearRig, mesh: np.ndarray, rot: np.ndarray, trans: np.ndarray,
    tree: ClosestPoints, tri_normals: np.ndarray, max_dist: float, cos_max: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Linearised point-to-plane rows (p, k + e + 6) and residuals (p,), mm, of one surface.

    ``mesh`` is the local mesh (:meth:`_LinearRig.local_mesh`). Columns: identity,
    expression, rotation (small angle, FLAME frame), translation.
    """
    normals = rig.fit_normals(mesh) @ rot.T
    y = mesh[rig.fit_local] @ rot.T + trans
    near, dist, tri, _ = tree.query(y)
    nrm = tri_normals[tri]
    keep = (dist < max_dist) & (np.einsum("ij,ij->i", nrm, normals) > cos_max)
    n_rig = nrm[keep] @ rot  # the normals in the rig frame, for the basis columns
    rows = np.concatenate([
        np.einsum("fck,fc->fk", rig.fit_basis[keep], n_rig),
        np.cross(y[keep], nrm[keep]), nrm[keep],  # d(n . (w x y)) / dw = y x n
    ], 1)
    return rows * 1e3, np.einsum("ij,ij->i", y[keep] - near[keep], nrm[keep]) * 1e3


def _landmark_rows(rig: _LinearRig, mesh: np.ndarray, rot: np.ndarray, trans: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linearised point-to-point landmark rows (3 L, k + e + 6) and residuals (3 L,), mm."""
    lm = rig.landmarks(mesh) @ rot.T + trans
    rows, res = [], []
    for c in range(3):  # d y_c = R[c] . d x + (w x y)_c + dt_c
        cross = np.stack([np.cross(np.eye(3)[j], lm)[:, c] for j in range(3)], 1)
        rows.append(np.concatenate([
            np.einsum("klc,c->lk", rig.lmk_id, rot[c]), np.einsum("elc,c->le", rig.lmk_ex, rot[c]),
            cross, np.tile(np.eye(3)[c], (len(lm), 1)),
        ], 1))
        res.append(lm[:, c] - targets[:, c])
    return np.concatenate(rows) * 1e3, np.concatenate(res) * 1e3


def rig_meshes_from_flame(
    flame_vertices: np.ndarray,
    flame_triangles: np.ndarray,
    face_model: FaceModel,
    *,
    flame_landmarks: LandmarkEmbedding | None = None,
    deform: Deformer | None = None,
    config: FlameRegistrationConfig | None = None,
) -> RigRegistration:
    """Fits the rig's model to FLAME surfaces and deforms it onto them (see the module doc).

    Args:
        flame_vertices: (S, n_f, 3) FLAME meshes (e.g. the fit's, one per expression),
            FLAME head frame, metres.
        flame_triangles: (m_f, 3) FLAME triangles.
        face_model: the rig's face model (ICT), with its ``"mediapipe478"`` embedding.
        flame_landmarks: FLAME's ``"mediapipe478"`` embedding (NaN rows = missing);
            None = centroid initialisation and no landmark term.
        deform: the deformation onto each surface (:data:`Deformer`); None returns the fit.
        config: options; None = defaults.

    Returns:
        :class:`RigRegistration` with (S, n, 3) meshes of the rig's topology; a surface
        with too few pairs or too large a residual is a rejection with its reason.

    Raises:
        ModelError: malformed inputs, or a deformer returning the wrong shape.
    """
    cfg = config or FlameRegistrationConfig()
    flame_vertices = np.asarray(flame_vertices, np.float64)
    flame_triangles = np.asarray(flame_triangles, np.int64)
    _check_inputs(flame_vertices, flame_triangles)
    rig = _LinearRig(face_model, flame_landmarks, cfg.max_vertices)
    n_scans = len(flame_vertices)
    trees = [ClosestPoints(v, flame_triangles) for v in flame_vertices]
    tri_normals = [_face_normals(v, flame_triangles) for v in flame_vertices]
    targets = [None] * n_scans
    if rig.landmark_ids is not None:
        targets = list(flame_landmarks.points(flame_vertices, flame_triangles)[:, rig.landmark_ids])
    reasons = [""] * n_scans
    fit = _fit(rig, flame_vertices, trees, tri_normals, targets, reasons, cfg)
    _residual_rejections(rig, fit, trees, reasons, cfg)
    if any(reasons) and not all(reasons):
        # a surface the rig cannot reach has pulled the shared identity: fit the rest again
        fit = _fit(rig, flame_vertices, trees, tri_normals, targets, reasons, cfg)
        _residual_rejections(rig, fit, trees, reasons, cfg)
    return _finish(rig, flame_vertices, flame_triangles, trees, *fit, reasons, deform)


def _fit(
    rig: _LinearRig, flame_vertices: np.ndarray, trees: list[ClosestPoints], tri_normals: list[np.ndarray],
    targets: list[np.ndarray | None], reasons: list[str], cfg: FlameRegistrationConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Gauss-Newton fit of the surfaces whose ``reasons`` are empty (a surface that loses
    its pairs gets a reason here). Returns identity (k,), weights (S, e), R (S, 3, 3), t (S, 3)."""
    n_scans, k, e = len(flame_vertices), len(rig.b_id), len(rig.b_ex)
    poses = [_initial_pose(rig, flame_vertices[s], targets[s]) for s in range(n_scans)]
    rot, trans = np.stack([p[0] for p in poses]), np.stack([p[1] for p in poses])
    ident, weights = np.zeros(k), np.zeros((n_scans, e))
    at_bound = np.zeros((n_scans, e), bool)
    dists = np.geomspace(cfg.max_distance_mm, cfg.min_distance_mm, cfg.iterations) * 1e-3
    cos_max = np.cos(np.deg2rad(cfg.max_normal_angle_deg))
    lmk_w = np.sqrt(cfg.landmark_weight)

    for it in range(cfg.iterations):
        h_cc, g_c = cfg.identity_prior * np.eye(k), -cfg.identity_prior * ident
        blocks = {}
        for s in (s for s in range(n_scans) if not reasons[s]):
            mesh = rig.local_mesh(ident, weights[s])
            jac, r = _surface_rows(rig, mesh, rot[s], trans[s], trees[s], tri_normals[s], dists[it], cos_max)
            if len(r) < cfg.min_pairs:
                reasons[s] = (f"only {len(r)} rig vertices found the FLAME surface within "
                              f"{dists[it] * 1e3:.1f} mm with compatible normals (iteration {it})")
                continue
            if targets[s] is not None and lmk_w > 0:
                lj, lr = _landmark_rows(rig, mesh, rot[s], trans[s], targets[s])
                jac, r = np.concatenate([jac, lmk_w * lj]), np.concatenate([r, lmk_w * lr])
            free = np.concatenate([np.ones(k, bool), ~at_bound[s], np.ones(6, bool)])
            held = jac * free  # weights held at a bound do not move
            h, g = held.T @ held, -held.T @ r
            h[k: k + e, k: k + e] += np.diag(np.where(free[k: k + e], cfg.expression_prior, 1.0))
            g[k: k + e] -= np.where(free[k: k + e], cfg.expression_prior * weights[s], 0.0)
            push = jac[:, k: k + e].T @ r + cfg.expression_prior * weights[s]  # gradient on the weights
            blocks[s] = (h, g, push)
            # eliminate the surface's own unknowns (Schur complement onto the identity)
            coupling = h[:k, k:] @ np.linalg.inv(h[k:, k:])
            h_cc += h[:k, :k] - coupling @ h[k:, :k]
            g_c += g[:k] - coupling @ g[k:]
        if not blocks:
            break
        d_c = np.linalg.solve(h_cc, g_c)
        ident = ident + d_c
        for s, (h, g, push) in blocks.items():
            d_s = np.linalg.solve(h[k:, k:], g[k:] - h[k:, :k] @ d_c)
            # a weight held at a bound is released when the gradient pulls it inside
            release = at_bound[s] & (((weights[s] <= 0) & (push < 0)) | ((weights[s] >= 1) & (push > 0)))
            weights[s] = np.clip(weights[s] + d_s[:e], 0.0, 1.0)
            at_bound[s] = ((weights[s] <= 0) | (weights[s] >= 1)) & ~release
            step = Rotation.from_rotvec(d_s[e: e + 3]).as_matrix()
            rot[s], trans[s] = step @ rot[s], step @ trans[s] + d_s[e + 3:]
    return ident, weights, rot, trans


def _residual_rejections(
    rig: _LinearRig, fit: tuple[np.ndarray, ...], trees: list[ClosestPoints], reasons: list[str],
    cfg: FlameRegistrationConfig,
) -> None:
    """Rejects (in ``reasons``) surfaces the fit lies too far from."""
    ident, weights, rot, trans = fit
    face = rig.model.fitting_vertices
    for s in (s for s in range(len(trees)) if not reasons[s]):
        mesh = rig.mesh(ident, weights[s])[face] @ rot[s].T + trans[s]
        median = float(np.median(trees[s].query(mesh)[1])) * 1e3
        if median > cfg.max_fit_median_mm:
            reasons[s] = f"the rig's fit lies a median {median:.2f} mm from the FLAME surface (> {cfg.max_fit_median_mm} mm)"


def _finish(
    rig: _LinearRig, flame_vertices: np.ndarray, flame_triangles: np.ndarray, trees: list[ClosestPoints],
    ident: np.ndarray, weights: np.ndarray, rot: np.ndarray, trans: np.ndarray, reasons: list[str],
    deform: Deformer | None,
) -> RigRegistration:
    """Full meshes and residuals; the deformation of the surfaces not rejected."""
    face = rig.model.fitting_vertices
    n_scans = len(flame_vertices)
    fitted = rig.mesh(ident, weights)  # (S, n, 3), rig frame
    in_flame = np.einsum("sij,snj->sni", rot, fitted) + trans[:, None]
    fit_d = np.stack([trees[s].query(in_flame[s][face])[1] for s in range(n_scans)]) * 1e3
    final = np.full_like(in_flame, np.nan)
    for s in (s for s in range(n_scans) if not reasons[s]):
        final[s] = in_flame[s] if deform is None else np.asarray(
            deform(in_flame[s], flame_vertices[s], flame_triangles), np.float64)
        if final[s].shape != in_flame[s].shape:
            raise ModelError(f"deform returned {final[s].shape}, expected {in_flame[s].shape}")
    fin_d = np.full_like(fit_d, np.nan)
    for s in (s for s in range(n_scans) if not reasons[s]):
        fin_d[s] = trees[s].query(final[s][face])[1] * 1e3
    rejected = np.array([bool(r) for r in reasons])
    fitted[rejected], fit_d[rejected] = np.nan, np.nan
    flame_from_rig = np.tile(np.eye(4), (n_scans, 1, 1))
    flame_from_rig[:, :3, :3], flame_from_rig[:, :3, 3] = rot, trans
    flame_from_rig[rejected] = np.nan
    return RigRegistration(
        vertices=np.einsum("sji,snj->sni", rot, final - trans[:, None]).astype(np.float32),  # R^T (x - t)
        fitted=fitted.astype(np.float32), flame_from_rig=flame_from_rig,
        identity=ident.astype(np.float32), weights=np.where(rejected[:, None], np.nan, weights).astype(np.float32),
        fit_median_mm=np.median(fit_d, 1), fit_p90_mm=np.percentile(fit_d, 90, 1),
        median_mm=np.median(fin_d, 1), p90_mm=np.percentile(fin_d, 90, 1), reasons=tuple(reasons),
    )


def _face_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(m, 3) unit triangle normals."""
    v = vertices[triangles]
    n = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    return n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-20)
