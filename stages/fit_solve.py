"""The joint morphable-model fit of a subject's scans (issue 7 step 3): config, energy, driver.

Unknowns: one identity (k) shared by all scans; per scan S expression weights (e, within
the model's bounds), articulation (j) and a rigid pose ``scan_from_head`` (axis-angle +
translation, ``x_scan = R x_head + t``, metres; scale is never free). Energy::

    E = sum_s [ mean_i rho_scan(n_i . (x_i - p_i) / sigma_s)
              + w_lm mean_{f,l} rho_lm(|u_fl - pi(K T_f x_l)| z_fl / (f sigma_lm)) ]
        + l_id |c|^2 + l_expr sum_s |w_s - prior_s|^2 + l_art sum_s |a_s|^2

- scan term: each model fitting vertex x_i to its closest fused-scan point p_i (cKDTree),
  point-to-plane along the scan normal n_i; pairs farther than a distance that shrinks over
  the outer iterations, pairs whose normals disagree and pairs landing on the scan's
  boundary are dropped; the kernel scale ``sigma_s`` shrinks with that distance down to
  ``scan_sigma_mm`` (graduated non-convexity);
- landmark term: the MediaPipe embedding's points (irises and the face oval left out)
  reprojected into every used frame of the burst, the pixel error converted to metres at
  the point's depth so that its scale does not depend on the image resolution;
- priors: identity ~ N(0, I), expression toward the prompt's art prior, articulation to 0.

Each outer iteration re-finds the correspondences and runs the inner solver on all scans:
Levenberg-Marquardt Gauss-Newton (:mod:`stages.fit_gn`, default) or L-BFGS-B on torch
gradients (:mod:`stages.fit_lbfgs`). A rigid stage (poses only) comes first, from a PnP
start (:func:`initial_poses`). Tensors are float64 (:data:`rigs.deformable.DTYPE`).
Method and measured accuracy: docs/fit.md.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from pipeline.errors import StageError
from rigs.deformable import DTYPE, DeformableModel, Subsettable, landmark_points, project
from rigs.face_model import LandmarkEmbedding
from stages.fit_config import DistanceLoss, FitConfig, Solver  # noqa: F401 - re-exported

#: MediaPipe landmarks 468-477 are the irises (they move with gaze, not with the surface).
N_SURFACE_LANDMARKS = 468
#: Scan points sampled per scan for the reported scan-to-model distances.
RESIDUAL_POINTS = 3000


@dataclass(frozen=True, eq=False)
class ScanObservation:
    """One expression's data for the fit, in its fusion reference camera's frame.

    Attributes:
        expression: the prompt's name.
        points: (V, 3) scan points (fused mesh vertices), metres.
        normals: (V, 3) unit scan normals (any consistent orientation; flipped toward the
            camera when most face away).
        boundary: (V,) bool, points on the scan's border (pairs landing there are dropped);
            None = no border known.
        K: (3, 3) intrinsics of the burst.
        landmarks_2d: (F, 478, 2) landmark pixels of the used frames, NaN = missing.
        ref_from_frame: (F, 4, 4) reference-from-frame poses of those frames.
        reference: index (into F) of the reference frame (its pose is the identity).
        prior: (e,) expression prior (the prompt's art prior in rig order, 0 elsewhere).
    """

    expression: str
    points: np.ndarray
    normals: np.ndarray
    boundary: np.ndarray | None
    K: np.ndarray
    landmarks_2d: np.ndarray
    ref_from_frame: np.ndarray
    reference: int
    prior: np.ndarray


@dataclass(frozen=True, eq=False)
class FitResult:
    """The fit of S scans (same order as the observations).

    Attributes:
        identity: (k,) float64.
        weights: (S, e) float64 expression coefficients.
        articulation: (S, j) float64.
        scan_from_head: (S, 4, 4) float64, ``x_scan = R x_head + t``.
        vertices: (S, n, 3) float32 fitted meshes, head frame.
        neutral: (n, 3) float32 identity-only mesh (zero expression and articulation).
        scan_median_mm, scan_p90_mm: (S,) scan-to-model distance of each scan's points, mm.
        landmark_px: (S,) RMS landmark reprojection error over used frames, pixels.
        seconds: wall time of the fit.
    """

    identity: np.ndarray
    weights: np.ndarray
    articulation: np.ndarray
    scan_from_head: np.ndarray
    vertices: np.ndarray
    neutral: np.ndarray
    scan_median_mm: np.ndarray
    scan_p90_mm: np.ndarray
    landmark_px: np.ndarray
    seconds: float


# --------------------------------------------------------------------------- kernels


def robust(x2: torch.Tensor, kind: str) -> torch.Tensor:
    """Robust cost of squared normalised residuals ``x2 = (r / sigma)^2``; all ~x2 near 0.

    geman_mcclure: x2 / (1 + x2); huber: x2 inside |x| <= 1, 2|x| - 1 outside; l2: x2.
    """
    if kind == "geman_mcclure":
        return x2 / (1.0 + x2)
    if kind == "huber":
        x = torch.sqrt(x2 + 1e-30)
        return torch.where(x2 <= 1.0, x2, 2.0 * x - 1.0)
    return x2


# ------------------------------------------------------------------------- the problem


class FitProblem:
    """Constant arrays of a fit (the model's vertex subsets, scan trees, landmark
    observations), shared by the inner solvers."""

    def __init__(self, model: DeformableModel, obs: Sequence[ScanObservation], cfg: FitConfig) -> None:
        from scipy.spatial import cKDTree

        from stages.face_mask import inner_landmarks

        self.model, self.cfg, self.S = model, cfg, len(obs)
        fit_ids = np.asarray(model.fitting_vertices, np.int64)
        emb = model.landmarks
        lm_ids = np.intersect1d(inner_landmarks(478), np.arange(N_SURFACE_LANDMARKS))
        corners = np.zeros((0, 3), np.int64)
        if emb is not None and cfg.landmark_weight > 0:
            lm_ids = lm_ids[lm_ids < len(emb.triangle)]
            # a partial embedding (FLAME's covers ~105 of 478) marks absent landmarks with NaN
            bary, tri = np.asarray(emb.barycentric)[lm_ids], np.asarray(emb.triangle)[lm_ids]
            lm_ids = lm_ids[np.isfinite(bary).all(1) & (tri >= 0) & (tri < len(model.triangles))]
            corners = np.asarray(model.triangles, np.int64)[np.asarray(emb.triangle)[lm_ids]]
        else:
            lm_ids = np.zeros(0, np.int64)
        self.lm_ids = lm_ids
        # Only the vertices the terms read are evaluated: all fitting vertices (and the
        # landmark corners) when re-finding correspondences, a fixed sample of them inside
        # the optimisation (the model has ~150 degrees of freedom, not thousands).
        n_opt = len(fit_ids) if cfg.scan_vertices == 0 else min(cfg.scan_vertices, len(fit_ids))
        self.sample = np.sort(np.random.default_rng(0).choice(len(fit_ids), n_opt, replace=False))
        self.sets = {}
        for which, fit_part in (("all", fit_ids), ("opt", fit_ids[self.sample])):
            ids = np.unique(np.concatenate([fit_part, corners.ravel()]))
            sub = model.subset(ids) if isinstance(model, Subsettable) else None
            self.sets[which] = (ids, sub, np.searchsorted(ids, fit_part))
        self.fit_local = self.sets["opt"][2]
        self.lm_emb = LandmarkEmbedding(
            "local", np.arange(len(lm_ids)),
            np.asarray(emb.barycentric)[lm_ids] if len(lm_ids) else np.zeros((0, 3)))
        self.lm_tris = np.searchsorted(self.sets["opt"][0], corners)
        # model normals at the fitting vertices, from the triangles inside the fitting set
        tris = np.asarray(model.triangles, np.int64)
        local = np.full(int(tris.max()) + 1, -1)
        local[fit_ids[fit_ids <= tris.max()]] = np.flatnonzero(fit_ids <= tris.max())
        inside = (local[tris] >= 0).all(1)
        self.fit_tris = local[tris[inside]]
        # (f, t) sparse sum of each vertex's triangle normals (area-weighted vertex normals)
        t = len(self.fit_tris)
        self.normal_sum = sp.csr_matrix((np.ones(3 * t), (self.fit_tris.T.ravel(), np.tile(np.arange(t), 3))),
                                        shape=(len(fit_ids), t))
        self.trees = [cKDTree(o.points) for o in obs]
        self.points = [np.asarray(o.points, np.float64) for o in obs]
        self.normals = [_oriented(o.points, o.normals) for o in obs]
        self.boundary = [np.zeros(len(o.points), bool) if o.boundary is None else np.asarray(o.boundary, bool) for o in obs]
        # landmark observations padded over frames: (S, F, L, 2), mask (S, F, L)
        F = max(len(o.landmarks_2d) for o in obs)
        L = len(lm_ids)
        uv = np.zeros((self.S, F, L, 2))
        mask = np.zeros((self.S, F, L), bool)
        cam_from_ref = np.tile(np.eye(4), (self.S, F, 1, 1))
        for s, o in enumerate(obs):
            pts = np.asarray(o.landmarks_2d, np.float64)[:, lm_ids]
            ok = np.isfinite(pts).all(-1)
            uv[s, : len(pts)] = np.where(ok[..., None], pts, 0.0)
            mask[s, : len(pts)] = ok
            cam_from_ref[s, : len(pts)] = np.linalg.inv(o.ref_from_frame)
        self.uv = torch.as_tensor(uv, dtype=DTYPE)
        self.lm_mask = torch.as_tensor(mask, dtype=DTYPE)
        self.cam_from_ref = torch.as_tensor(cam_from_ref, dtype=DTYPE)
        self.K = torch.as_tensor(np.stack([o.K for o in obs]), dtype=DTYPE)
        self.focal = torch.as_tensor(np.stack([np.sqrt(o.K[0, 0] * o.K[1, 1]) for o in obs]), dtype=DTYPE)
        self.prior = torch.as_tensor(np.stack([o.prior for o in obs]), dtype=DTYPE)
        self.whitening: tuple | None = None  # the L-BFGS preconditioner, made once

    def local_vertices(self, c: torch.Tensor, w: torch.Tensor, a: torch.Tensor, which: str = "opt") -> torch.Tensor:
        """(S, p, 3) head-frame vertices of the vertex set ``which`` ("opt" or "all")."""
        ids, sub, _ = self.sets[which]
        if sub is not None:
            return sub.vertices(c, w, a)
        return self.model.vertices(c, w, a)[:, torch.as_tensor(ids)]

    def fitting_vertices(self, c: torch.Tensor, w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """(S, f, 3) head-frame positions of all fitting vertices."""
        return self.local_vertices(c, w, a, "all")[:, self.sets["all"][2]]

    def correspondences(self, x_fit: np.ndarray, max_distance: float) -> tuple[np.ndarray, ...]:
        """Closest scan points of the sampled fitting vertices.

        Args:
            x_fit: (S, f, 3) all posed fitting vertices, scan frame (all of them give the
                model's normals).
            max_distance: pairs farther apart are dropped, metres.

        Returns:
            targets (S, f_opt, 3), normals (S, f_opt, 3), valid (S, f_opt) bool.
        """
        S = len(x_fit)
        v = x_fit[:, self.fit_tris]  # (S, t, 3, 3)
        face = np.cross(v[:, :, 1] - v[:, :, 0], v[:, :, 2] - v[:, :, 0])  # (S, t, 3) area-weighted
        mn = np.stack([self.normal_sum @ face[s] for s in range(S)])[:, self.sample]
        mn /= np.maximum(np.linalg.norm(mn, axis=2, keepdims=True), 1e-20)
        x = x_fit[:, self.sample]
        f = x.shape[1]
        targets, normals, valid = np.zeros((S, f, 3)), np.zeros((S, f, 3)), np.zeros((S, f), bool)
        cos_max = np.cos(np.deg2rad(self.cfg.max_normal_angle_deg))
        for s in range(S):  # one KD-tree query per scan, vectorised over vertices
            dist, idx = self.trees[s].query(x[s], distance_upper_bound=max_distance)
            hit = np.isfinite(dist)
            idx = np.where(hit, idx, 0)
            agree = ((mn[s] * self.normals[s][idx]).sum(1) >= cos_max) | (np.abs(mn[s]).sum(1) == 0)
            valid[s] = hit & agree & ~self.boundary[s][idx]
            targets[s], normals[s] = self.points[s][idx], self.normals[s][idx]
        return targets, normals, valid


def _oriented(points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    """Normals flipped, as a whole, to face the camera at the origin if most face away."""
    n = np.asarray(normals, np.float64)
    n = n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-12)
    return -n if np.mean(np.einsum("ij,ij->i", n, -np.asarray(points))) < 0 else n


# ----------------------------------------------------------------------- initialisation


def initial_poses(model: DeformableModel, obs: Sequence[ScanObservation], landmark_init: bool,
                  lm_ids: np.ndarray) -> np.ndarray:
    """(S, 4, 4) starting scan_from_head of each scan.

    With ``landmark_init``: ``cv2.solvePnP`` of the mean model's embedded landmarks (metric)
    against the reference frame's 2D landmarks; a scan with fewer than 6 landmarks there
    falls back to the centroid start. Otherwise the mean face's fitting region is centred
    on the scan's centroid, facing the camera (head +z toward -z of the camera).
    """
    import cv2

    zeros = torch.zeros
    mean = model.vertices(zeros(model.n_identity, dtype=DTYPE), zeros(1, model.n_expression, dtype=DTYPE),
                          zeros(1, model.n_articulation, dtype=DTYPE))[0].numpy()
    facing = np.diag([1.0, -1.0, -1.0])  # head (+x left, +y up, +z face) seen by a camera it faces
    centre = mean[np.asarray(model.fitting_vertices)].mean(0)
    lm3d = None
    if landmark_init and model.landmarks is not None and len(lm_ids):
        lm3d = model.landmarks.points(mean, np.asarray(model.triangles))[lm_ids]
    out = np.tile(np.eye(4), (len(obs), 1, 1))
    for s, o in enumerate(obs):
        out[s, :3, :3], out[s, :3, 3] = facing, np.mean(o.points, 0) - facing @ centre
        if lm3d is None:
            continue
        uv = np.asarray(o.landmarks_2d[o.reference], np.float64)[lm_ids]
        ok = np.isfinite(uv).all(1)
        if ok.sum() < 6:
            continue
        found, rvec, tvec = cv2.solvePnP(lm3d[ok], uv[ok], np.asarray(o.K, np.float64), None,
                                         flags=cv2.SOLVEPNP_EPNP)
        if found:
            found, rvec, tvec = cv2.solvePnP(lm3d[ok], uv[ok], np.asarray(o.K, np.float64), None,
                                             rvec, tvec, True, cv2.SOLVEPNP_ITERATIVE)
        if found and tvec[2, 0] > 0:
            R = cv2.Rodrigues(rvec)[0]
            out[s, :3, :3], out[s, :3, 3] = R, tvec[:, 0] * _depth_correction(
                o, uv[ok], lm3d[ok] @ R.T + tvec[:, 0], float(tvec[2, 0]))
    return out


def _depth_correction(o: ScanObservation, uv: np.ndarray, posed: np.ndarray, origin_z: float) -> float:
    """Factor on a PnP translation that puts the landmarks at the scan's depth.

    PnP of the mean face is metric only as far as the subject's face has the mean size
    (centimetres off in depth for a large or small face). Each landmark takes the depth of
    the scan point projecting nearest to it (within 3 px); the median depth offset moves
    the head along the ray through its origin, which keeps its projection. 1.0 when fewer
    than 6 landmarks find a scan point.
    """
    from scipy.spatial import cKDTree

    pts = np.asarray(o.points, np.float64)
    front = pts[:, 2] > 1e-6
    proj = pts[front] @ np.asarray(o.K, np.float64).T
    dist, idx = cKDTree(proj[:, :2] / proj[:, 2:]).query(uv, distance_upper_bound=3.0)
    hit = np.isfinite(dist)
    if hit.sum() < 6:
        return 1.0
    offset = float(np.median(pts[front][idx[hit], 2] - posed[hit, 2]))
    return 1.0 + offset / origin_z


# ------------------------------------------------------------------------------ solve


def _check(model: DeformableModel, obs: Sequence[ScanObservation]) -> None:
    if not obs:
        raise StageError("the fit needs at least one scan")
    for o in obs:
        v = len(o.points)
        F = len(o.landmarks_2d)
        problems = [
            (np.shape(o.points) == (v, 3) and v >= 3, f"points must be (V>=3, 3), got {np.shape(o.points)}"),
            (np.shape(o.normals) == (v, 3), f"normals must be ({v}, 3), got {np.shape(o.normals)}"),
            (o.boundary is None or np.shape(o.boundary) == (v,), f"boundary must be ({v},)"),
            (np.shape(o.K) == (3, 3), f"K must be (3, 3), got {np.shape(o.K)}"),
            (F >= 1 and np.shape(o.landmarks_2d)[1:] == (478, 2), f"landmarks_2d must be (F>=1, 478, 2), got {np.shape(o.landmarks_2d)}"),
            (np.shape(o.ref_from_frame) == (F, 4, 4) and np.isfinite(o.ref_from_frame).all(),
             f"ref_from_frame must be finite ({F}, 4, 4)"),
            (0 <= o.reference < F, f"reference {o.reference} outside [0, {F})"),
            (np.shape(o.prior) == (model.n_expression,), f"prior must be ({model.n_expression},)"),
        ]
        for ok, problem in problems:
            if not ok:
                raise StageError(f"fit input {o.expression!r}: {problem}")


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Runs torch on ``n`` intra-op threads inside the block (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def single_thread():
    """Runs torch on one intra-op thread inside the block (restored after).

    The fit's tensors are small: extra threads only add synchronisation, and on a busy
    2-core machine torch's default 2 threads made a 3-scan fit 7x slower (62 s vs 8.6 s).
    """
    return torch_threads(1)


def fit_scans(model: DeformableModel, observations: Sequence[ScanObservation], cfg: FitConfig | None = None) -> FitResult:
    """Fits one identity and per-scan expression, articulation and pose to S scans.

    Args:
        model: the deformable model (e.g. :class:`rigs.deformable.LinearFaceModel`).
        observations: the S scans with their landmarks, frames and priors.
        cfg: the fit config (the defaults when None).

    Returns:
        The :class:`FitResult`.

    Raises:
        StageError: malformed observations.
    """
    cfg = cfg or FitConfig()
    with single_thread():
        return _fit_scans(model, observations, cfg)


def _fit_scans(model: DeformableModel, observations: Sequence[ScanObservation], cfg: FitConfig) -> FitResult:
    start = time.perf_counter()
    _check(model, observations)
    prob = FitProblem(model, observations, cfg)
    S, k, j = prob.S, model.n_identity, model.n_articulation
    T0 = initial_poses(model, observations, cfg.landmark_init, prob.lm_ids)
    w0 = prob.prior.clone()
    if model.expression_bounds is not None:
        w0 = w0.clamp(*model.expression_bounds)
    P = {"c": torch.zeros(k, dtype=DTYPE), "w": w0, "a": torch.zeros(S, j, dtype=DTYPE),
         "R": torch.as_tensor(T0[:, :3, :3], dtype=DTYPE), "t": torch.as_tensor(T0[:, :3, 3], dtype=DTYPE)}
    if cfg.solver == "gauss_newton":
        from stages.fit_gn import gauss_newton as step
    else:
        from stages.fit_lbfgs import lbfgs as step
    schedule = [(float(d), True) for d in cfg.distances_m(cfg.rigid_iterations + 1)[:cfg.rigid_iterations]]
    schedule += [(float(d), False) for d in cfg.distances_m(cfg.outer_iterations)]
    for distance, rigid_only in schedule:
        corr = correspondences(prob, P, distance)
        P = step(prob, cfg, P, corr, max(cfg.scan_sigma_mm * 1e-3, distance / 4.0), rigid_only)
    return _result(model, prob, P, observations, start)


def posed(prob: FitProblem, P: dict[str, torch.Tensor], shape: torch.Tensor | None = None) -> torch.Tensor:
    """(S, p, 3) the optimisation's vertex set in each scan's frame (``shape``: head-frame
    vertices when already evaluated)."""
    v = prob.local_vertices(P["c"], P["w"], P["a"]) if shape is None else shape
    return v @ P["R"].transpose(-1, -2) + P["t"][:, None, :]


def correspondences(prob: FitProblem, P: dict[str, torch.Tensor], distance: float) -> tuple[torch.Tensor, ...]:
    """Scan targets, normals and validity (S, f_opt, ...) of the sampled fitting vertices."""
    with torch.no_grad():
        v = prob.fitting_vertices(P["c"], P["w"], P["a"])
        X = (v @ P["R"].transpose(-1, -2) + P["t"][:, None, :]).numpy()
    tgt, nrm, valid = prob.correspondences(X, distance)
    return (torch.as_tensor(tgt, dtype=DTYPE), torch.as_tensor(nrm, dtype=DTYPE), torch.as_tensor(valid, dtype=DTYPE))


def energy(prob: FitProblem, cfg: FitConfig, P: dict[str, torch.Tensor], corr: tuple[torch.Tensor, ...],
           sigma: float, shape: torch.Tensor | None = None) -> torch.Tensor:
    """The fit's energy (module docstring) for fixed correspondences; a 0-d tensor."""
    X = posed(prob, P, shape)  # (S, p, 3) scan frame
    tgt, nrm, valid = corr
    r = ((X[:, prob.fit_local] - tgt) * nrm).sum(-1) / sigma
    total = ((robust(r * r, cfg.distance_loss) * valid).sum(1) / valid.sum(1).clamp(min=1.0)).sum()
    if len(prob.lm_ids) and cfg.landmark_weight > 0:
        L = landmark_points(X, prob.lm_emb, prob.lm_tris)  # (S, L, 3) reference camera
        Lc = L[:, None] @ prob.cam_from_ref[..., :3, :3].transpose(-1, -2) + prob.cam_from_ref[..., None, :3, 3]
        uv = project(Lc, prob.K[:, None, None])  # (S, F, L, 2)
        scale = Lc[..., 2].detach() / (prob.focal[:, None, None] * cfg.landmark_sigma_mm * 1e-3)
        x2 = ((uv - prob.uv) ** 2).sum(-1) * scale**2
        lm = (robust(x2, cfg.distance_loss) * prob.lm_mask).sum((1, 2)) / prob.lm_mask.sum((1, 2)).clamp(min=1.0)
        total = total + cfg.landmark_weight * lm.sum()
    total = total + cfg.identity_prior * (P["c"] ** 2).sum()
    total = total + cfg.expression_prior * ((P["w"] - prob.prior) ** 2).sum()
    return total + cfg.articulation_prior * (P["a"] ** 2).sum()


def _result(model: DeformableModel, prob: FitProblem, p: dict[str, torch.Tensor],
            obs: Sequence[ScanObservation], start: float) -> FitResult:
    from rigs.geometry import ClosestPoints

    with torch.no_grad():
        verts = model.vertices(p["c"], p["w"], p["a"])
        neutral = model.vertices(p["c"], torch.zeros(1, model.n_expression, dtype=DTYPE),
                                 torch.zeros(1, model.n_articulation, dtype=DTYPE))[0]
    S = prob.S
    T = np.tile(np.eye(4), (S, 1, 1))
    T[:, :3, :3], T[:, :3, 3] = p["R"].numpy(), p["t"].numpy()
    med, p90, lm_px = np.full(S, np.nan), np.full(S, np.nan), np.full(S, np.nan)
    tris = np.asarray(model.triangles)
    for s in range(S):
        posed = verts[s].numpy() @ T[s, :3, :3].T + T[s, :3, 3]
        pts = prob.points[s]
        if len(pts) > RESIDUAL_POINTS:  # a fixed sample: the median and p90 do not need all
            pts = pts[np.random.default_rng(s).choice(len(pts), RESIDUAL_POINTS, replace=False)]
        _, dist, _, _ = ClosestPoints(posed, tris).query(pts)
        med[s], p90[s] = np.median(dist) * 1e3, np.percentile(dist, 90) * 1e3
        if len(prob.lm_ids) and model.landmarks is not None:
            lm = model.landmarks.points(posed, tris)[prob.lm_ids]  # (L, 3) reference camera
            o = obs[s]
            cams = np.linalg.inv(o.ref_from_frame)  # (F, 4, 4)
            pc = np.einsum("fij,lj->fli", cams[:, :3, :3], lm) + cams[:, None, :3, 3]
            uv = pc @ o.K.T
            uv = uv[..., :2] / uv[..., 2:]
            err = np.linalg.norm(uv - np.asarray(o.landmarks_2d)[:, prob.lm_ids], axis=-1)
            if np.isfinite(err).any():
                lm_px[s] = float(np.sqrt(np.nanmean(err**2)))
    return FitResult(
        identity=p["c"].numpy().copy(), weights=p["w"].numpy().copy(), articulation=p["a"].numpy().copy(),
        scan_from_head=T, vertices=verts.numpy().astype(np.float32), neutral=neutral.numpy().astype(np.float32),
        scan_median_mm=med, scan_p90_mm=p90, landmark_px=lm_px, seconds=time.perf_counter() - start)
