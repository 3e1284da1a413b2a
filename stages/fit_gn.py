"""Levenberg-Marquardt Gauss-Newton inner solver of the joint fit (``fit.solver="gauss_newton"``).

For fixed correspondences the energy of :mod:`stages.fit_solve` is a sum of robust squared
residuals plus quadratic priors. Each step linearises the residuals (IRLS: each residual
weighted by the kernel's derivative at its current value) and solves the normal equations:

- unknowns: the shared identity (k) and per scan ``[weights (e), articulation (j),
  rotation (3, left-multiplied so3 increment), translation (3)]``;
- the Hessian is block-arrow shaped (identity couples every scan; scans are independent
  otherwise), so the identity is solved from the Schur complement and each scan's block
  by back-substitution: cost linear in the number of scans;
- model derivatives come from :func:`rigs.deformable.vertex_jacobian` (a linear model's
  bases; forward-mode JVPs otherwise); residual derivatives are analytic;
- box bounds on the weights by an active set (a weight at a bound whose descent direction
  leaves the box is held) and clamping; a step is kept only if it lowers the true robust
  energy, else the damping grows (Levenberg-Marquardt).

Scans are processed in chunks (a loop over scans, never over vertices) to bound memory.
"""

from __future__ import annotations

import torch

from rigs.deformable import DTYPE, so3_exp, vertex_jacobian
from stages.fit_solve import FitConfig, FitProblem, energy

#: Scans per chunk when forming the normal equations (memory ~ chunk x rows x params).
CHUNK = 8


def robust_weight(x2: torch.Tensor, kind: str) -> torch.Tensor:
    """d rho / d x2 of :func:`stages.fit_solve.robust` (the IRLS weight)."""
    if kind == "geman_mcclure":
        return 1.0 / (1.0 + x2) ** 2
    if kind == "huber":
        return torch.where(x2 <= 1.0, torch.ones_like(x2), 1.0 / torch.sqrt(x2 + 1e-30))
    return torch.ones_like(x2)


def _skew(u: torch.Tensor) -> torch.Tensor:
    """(..., 3) -> (..., 3, 3) cross-product matrices [u]_x."""
    z = torch.zeros_like(u[..., 0])
    x, y, w = u[..., 0], u[..., 1], u[..., 2]
    return torch.stack([z, -w, y, w, z, -x, -y, x, z], -1).reshape(*u.shape, 3)


def _model_jacobian(prob: FitProblem, P: dict[str, torch.Tensor]) -> torch.Tensor:
    """(S' in {1, S}, p, 3, k + e + j) derivatives of the optimisation's vertex set."""
    ids, sub, _ = prob.sets["opt"]
    if sub is not None:
        parts = vertex_jacobian(sub, P["c"], P["w"], P["a"])
    else:
        parts = [J[:, torch.as_tensor(ids)] for J in vertex_jacobian(prob.model, P["c"], P["w"], P["a"])]
    S_ = max(J.shape[0] for J in parts)
    return torch.cat([J.expand(S_, *J.shape[1:]) for J in parts], -1)


def _accumulate(rows_c: torch.Tensor | None, rows_l: torch.Tensor, res: torch.Tensor, weight: torch.Tensor,
                H: dict[str, torch.Tensor], sl: slice) -> None:
    """Adds weighted rows (C, R, .) of one term to the normal equations of scans ``sl``."""
    wl = rows_l * weight[..., None]
    H["ss"][sl] += wl.transpose(1, 2) @ rows_l
    H["gs"][sl] -= (wl * res[..., None]).sum(1)
    if rows_c is not None:
        wc = rows_c * weight[..., None]
        H["cs"][sl] += wc.transpose(1, 2) @ rows_l
        H["cc"] += (wc.transpose(1, 2) @ rows_c).sum(0)
        H["gc"] -= (wc * res[..., None]).sum((0, 1))


def normal_equations(prob: FitProblem, cfg: FitConfig, P: dict[str, torch.Tensor], corr: tuple[torch.Tensor, ...],
                     sigma: float, rigid_only: bool) -> dict[str, torch.Tensor]:
    """The IRLS Gauss-Newton system at ``P``: blocks cc (k, k), cs (S, k, m), ss (S, m, m)
    and right-hand sides gc (k,), gs (S, m) (minus the gradient, factor 2 dropped)."""
    model, S = prob.model, prob.S
    k = 0 if rigid_only else model.n_identity
    q_local = 0 if rigid_only else model.n_expression + model.n_articulation
    m = q_local + 6
    H = {"cc": torch.zeros(k, k, dtype=DTYPE), "gc": torch.zeros(k, dtype=DTYPE),
         "cs": torch.zeros(S, k, m, dtype=DTYPE), "ss": torch.zeros(S, m, m, dtype=DTYPE),
         "gs": torch.zeros(S, m, dtype=DTYPE)}
    v = prob.local_vertices(P["c"], P["w"], P["a"])  # (S, p, 3) head frame
    Jm = None if rigid_only else _model_jacobian(prob, P)  # (S', p, 3, k + q_local)
    tgt, nrm, valid = corr
    f = torch.as_tensor(prob.fit_local)
    use_lm = len(prob.lm_ids) > 0 and cfg.landmark_weight > 0
    if use_lm:
        corners = torch.as_tensor(prob.lm_tris)  # (L, 3) into the vertex set
        bary = torch.as_tensor(prob.lm_emb.barycentric, dtype=DTYPE)  # (L, 3)
        n_lm = prob.lm_mask.sum((1, 2)).clamp(min=1.0)
    n_scan = valid.sum(1).clamp(min=1.0)
    if Jm is not None:  # the rows the terms read, gathered once (shared by all scans for a linear model)
        Jm_f = Jm[:, f]  # (S', f, 3, k + q)
        Jm_L = (Jm[:, corners] * bary[None, :, :, None, None]).sum(2) if use_lm else None  # (S', L, 3, k + q)
    for lo in range(0, S, CHUNK):
        sl = slice(lo, min(lo + CHUNK, S))
        R, t = P["R"][sl], P["t"][sl]
        u = v[sl] @ R.transpose(-1, -2)  # (C, p, 3) rotated head-frame vertices
        Jf = JLh = None
        if Jm is not None:
            Jf = Jm_f if Jm.shape[0] == 1 else Jm_f[sl]
            JLh = None if Jm_L is None else (Jm_L if Jm.shape[0] == 1 else Jm_L[sl])
        # scan term: r = n . (u + t - p) / sigma
        n = nrm[sl]
        uf = u[:, f]
        r = ((uf + t[:, None] - tgt[sl]) * n).sum(-1) / sigma
        wgt = valid[sl] * robust_weight(r * r, cfg.distance_loss) / n_scan[sl, None]
        pose = torch.cat([torch.cross(uf, n, dim=-1), n], -1) / sigma  # (C, f, 6)
        rows_c = None
        if Jf is None:
            rows_l = pose
        else:
            nR = n @ R / sigma  # (C, f, 3) = (R^T n)^T / sigma
            # (C, f, k + q): one batched product (4x faster than summing the 3 broadcasts)
            dm = torch.einsum("cfi,fiq->cfq", nR, Jf[0]) if Jf.shape[0] == 1 else torch.einsum("cfi,cfiq->cfq", nR, Jf)
            rows_c, rows_l = dm[..., :k], torch.cat([dm[..., k:], pose], -1)
        _accumulate(rows_c, rows_l, r, wgt, H, sl)
        if not use_lm:
            continue
        # landmark term: e = (pi(K (A L + a)) - uv) * z / (f sigma_lm), L = sum_b b (u + t)
        uL = (u[:, corners] * bary[..., None]).sum(-2)  # (C, L, 3)
        A, a = prob.cam_from_ref[sl, :, :3, :3], prob.cam_from_ref[sl, :, :3, 3]  # (C, F, 3, 3), (C, F, 3)
        K = prob.K[sl][:, None]  # (C, 1, 3, 3)
        Pc = (uL + t[:, None])[:, None] @ A.transpose(-1, -2) + a[:, :, None]  # (C, F, L, 3)
        h = Pc @ K.transpose(-1, -2)  # (C, F, L, 3)
        scale = Pc[..., 2] / (prob.focal[sl, None, None] * cfg.landmark_sigma_mm * 1e-3)  # (C, F, L)
        e = (h[..., :2] / h[..., 2:] - prob.uv[sl]) * scale[..., None]  # (C, F, L, 2)
        lw = prob.lm_mask[sl] * robust_weight((e * e).sum(-1), cfg.distance_loss) * cfg.landmark_weight / n_lm[sl, None, None]
        zero = torch.zeros_like(h[..., 0])
        D = torch.stack([1 / h[..., 2], zero, -h[..., 0] / h[..., 2] ** 2,
                         zero, 1 / h[..., 2], -h[..., 1] / h[..., 2] ** 2], -1).reshape(*h.shape[:-1], 2, 3)
        G = D @ (K @ A)[:, :, None] * scale[..., None, None]  # (C, F, L, 2, 3) d e / d L
        # The F frames' 2F rows of a landmark all act through its 3D point L: fold them into
        # 3 rows, M = sum_f w G^T G = C^T C and C^T r = sum_f w G^T e (same normal equations,
        # 3 rows per landmark instead of 2F).
        Gw = G * lw[..., None, None]
        M = (G.transpose(-1, -2) @ Gw).sum(1)  # (C, L, 3, 3)
        b = (Gw.transpose(-1, -2) @ e[..., None]).sum(1)[..., 0]  # (C, L, 3)
        lam, U = torch.linalg.eigh(M)
        lam = lam.clamp(min=0.0)
        root = lam.sqrt()
        fold = root[..., None] * U.transpose(-1, -2)  # (C, L, 3, 3): C
        inv = torch.where(lam > 1e-12 * lam.amax(-1, keepdim=True).clamp(min=1e-300), 1.0 / root.clamp(min=1e-300), 0.0)
        res = inv * (U.transpose(-1, -2) @ b[..., None])[..., 0]  # (C, L, 3)
        eye = torch.eye(3, dtype=DTYPE).expand(*uL.shape[:2], 3, 3)
        pose_l = fold @ torch.cat([-_skew(uL), eye], -1)  # (C, L, 3, 6)
        C, L = uL.shape[:2]
        if JLh is None:
            rows_l = pose_l.reshape(C, L * 3, 6)
            rows_c = None
        else:
            dm = (fold @ (R[:, None] @ JLh)).reshape(C, L * 3, -1)  # d L / d params, folded
            rows_c, rows_l = dm[..., :k], torch.cat([dm[..., k:], pose_l.reshape(C, L * 3, 6)], -1)
        _accumulate(rows_c, rows_l, res.reshape(C, -1), torch.ones(C, L * 3, dtype=DTYPE), H, sl)
    if not rigid_only:  # priors
        H["cc"] += cfg.identity_prior * torch.eye(k, dtype=DTYPE)
        H["gc"] -= cfg.identity_prior * P["c"]
        ne, nj = model.n_expression, model.n_articulation
        idx = torch.arange(ne)
        H["ss"][:, idx, idx] += cfg.expression_prior
        H["gs"][:, :ne] -= cfg.expression_prior * (P["w"] - prob.prior)
        idx = torch.arange(ne, ne + nj)
        H["ss"][:, idx, idx] += cfg.articulation_prior
        H["gs"][:, ne:ne + nj] -= cfg.articulation_prior * P["a"]
    return H


def _solve(H: dict[str, torch.Tensor], damping: float, held: torch.Tensor,
           fixed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta identity (k,), delta per scan (S, m)) of the damped system; entries where
    ``held`` (S, m) is True are fixed to ``fixed`` (S, m)."""
    eye_s = torch.eye(H["ss"].shape[-1], dtype=DTYPE)
    ss = H["ss"] + damping * (torch.diagonal(H["ss"], dim1=-2, dim2=-1)[..., None] * eye_s + 1e-12 * eye_s)
    keep = (~held).to(DTYPE)
    d0 = fixed * (1.0 - keep)
    gs = H["gs"] - (ss @ d0[..., None])[..., 0]  # the held part moved to the right-hand side
    gc = H["gc"] - (H["cs"] @ d0[..., None])[..., 0].sum(0)
    ss = ss * keep[:, :, None] * keep[:, None, :] + torch.diag_embed(1.0 - keep)
    cs, gs = H["cs"] * keep[:, None, :], gs * keep
    k = H["cc"].shape[0]
    if k == 0:
        return torch.zeros(0, dtype=DTYPE), torch.linalg.solve(ss, gs) + d0
    cc = H["cc"] + damping * torch.diag(torch.diagonal(H["cc"])) + 1e-12 * torch.eye(k, dtype=DTYPE)
    inv_sc = torch.linalg.solve(ss, cs.transpose(1, 2))  # (S, m, k)
    inv_g = torch.linalg.solve(ss, gs)  # (S, m)
    schur = cc - (cs @ inv_sc).sum(0)
    rhs = gc - (cs @ inv_g[..., None]).sum(0)[:, 0]
    dc = torch.linalg.solve(schur, rhs)
    return dc, inv_g - (inv_sc @ dc) + d0


def _bounded_solve(prob: FitProblem, P: dict[str, torch.Tensor], H: dict[str, torch.Tensor], damping: float,
                   rigid_only: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_solve` with the weights' box bounds by an active set: a weight at a bound
    whose descent leaves the box is held there; a weight the step carries past a bound is
    pinned to it and the rest re-solved (a few rounds)."""
    model = prob.model
    held = torch.zeros_like(H["gs"], dtype=torch.bool)
    fixed = torch.zeros_like(H["gs"])
    if rigid_only or model.expression_bounds is None:
        return _solve(H, damping, held, fixed)
    lo, hi = model.expression_bounds
    ne = model.n_expression
    w, g = P["w"], H["gs"][:, :ne]
    held[:, :ne] = ((w <= lo + 1e-9) & (g < 0)) | ((w >= hi - 1e-9) & (g > 0))
    for _ in range(6):
        dc, ds = _solve(H, damping, held, fixed)
        target = w + ds[:, :ne]
        out = ~held[:, :ne] & ((target < lo) | (target > hi))
        if not out.any():
            break
        held[:, :ne] |= out
        fixed[:, :ne] = torch.where(out, target.clamp(lo, hi) - w, fixed[:, :ne])
    return dc, ds


def _apply(prob: FitProblem, P: dict[str, torch.Tensor], dc: torch.Tensor, ds: torch.Tensor,
           rigid_only: bool) -> dict[str, torch.Tensor]:
    model = prob.model
    out = dict(P)
    if not rigid_only:
        ne, nj = model.n_expression, model.n_articulation
        out["c"] = P["c"] + dc
        w = P["w"] + ds[:, :ne]
        out["w"] = w.clamp(*model.expression_bounds) if model.expression_bounds is not None else w
        out["a"] = P["a"] + ds[:, ne:ne + nj]
    out["R"] = so3_exp(ds[:, -6:-3]) @ P["R"]
    out["t"] = P["t"] + ds[:, -3:]
    return out


def gauss_newton(prob: FitProblem, cfg: FitConfig, P: dict[str, torch.Tensor], corr: tuple[torch.Tensor, ...],
                 sigma: float, rigid_only: bool) -> dict[str, torch.Tensor]:
    """``cfg.gn_steps`` damped Gauss-Newton steps (rigid ones: poses only) for fixed
    correspondences; returns the new parameters (never with a higher energy)."""
    with torch.no_grad():
        current = float(energy(prob, cfg, P, corr, sigma))
        damping = 1e-4
        for _ in range(cfg.gn_steps):
            H = normal_equations(prob, cfg, P, corr, sigma, rigid_only)
            for _ in range(8):
                dc, ds = _bounded_solve(prob, P, H, damping, rigid_only)
                trial = _apply(prob, P, dc, ds, rigid_only)
                value = float(energy(prob, cfg, trial, corr, sigma))
                if value <= current:
                    P, current, damping = trial, value, max(damping / 4.0, 1e-8)
                    break
                damping *= 8.0
            else:
                break  # no step lowers the energy: converged for these correspondences
    return P
