"""L-BFGS-B inner solver of the joint fit (``fit.solver="lbfgs"``).

scipy's L-BFGS-B on torch autograd gradients of :func:`stages.fit_solve.energy`, with exact
box bounds on the weights. The parameters are preconditioned (:class:`Packing`): each
scaled so that a unit step moves the fitting vertices about 1 cm RMS, the identity
whitened on the fitting vertices. Slower and less exact than the Gauss-Newton solver on the
same data (docs/fit.md), kept for models whose derivatives the Gauss-Newton solver cannot
take cheaply and as a cross-check.
"""

from __future__ import annotations

import numpy as np
import torch

from rigs.deformable import DTYPE, so3_exp
from stages.fit_solve import FitConfig, FitProblem, energy


class Packing:
    """Flat float64 parameter vector <-> named tensors, diagonally preconditioned.

    Parameter ``i`` is stored divided by ``scale[i]``, chosen so that a unit step of any
    parameter moves the fitting vertices by about :data:`STEP_M` (RMS): L-BFGS then sees
    a problem whose curvatures differ by the modes' correlations only, not by their sizes.
    """

    STEP_M = 0.01

    def __init__(self, k: int, S: int, e: int, j: int) -> None:
        self.sizes = {"c": k, "w": S * e, "a": S * j, "r": S * 3, "t": S * 3}
        self.shapes = {"c": (k,), "w": (S, e), "a": (S, j), "r": (S, 3), "t": (S, 3)}
        self.offsets = dict(zip(self.sizes, np.cumsum([0, *self.sizes.values()])[:-1].tolist(), strict=True))
        self.n = sum(self.sizes.values())
        self.scale = np.ones(self.n)
        self.scale[self.slice("r")] = 0.1  # 0.1 rad moves face points ~1 cm
        self.scale[self.slice("t")] = self.STEP_M
        self._scale_t = torch.as_tensor(self.scale, dtype=DTYPE)

    def slice(self, name: str) -> slice:
        return slice(self.offsets[name], self.offsets[name] + self.sizes[name])

    def set_scale(self, name: str, per_unit_rms: np.ndarray) -> None:
        """Scales group ``name`` so a unit step moves vertices STEP_M; ``per_unit_rms`` is
        the RMS vertex motion (metres) of a unit change of each of its parameters (tiled
        over scans for per-scan groups)."""
        rms = np.resize(np.asarray(per_unit_rms, np.float64), self.sizes[name])
        self.scale[self.slice(name)] = self.STEP_M / np.maximum(rms, 1e-6)
        self._scale_t = torch.as_tensor(self.scale, dtype=DTYPE)

    def whiten_identity(self, fields: np.ndarray) -> None:
        """Makes the identity parameters orthonormal on the fitting vertices.

        ``c = P z`` with ``P = U diag(STEP_M / sqrt(lambda))`` from the eigen-decomposition
        of the modes' Gram matrix ``G = U diag(lambda) U^T`` (mean over vertices): a unit
        step of any z moves the vertices by STEP_M RMS, and different z move them
        orthogonally, so the identity block of the data Hessian is ~ the identity matrix.

        Args:
            fields: (k, f, 3) vertex motion per unit of each identity coefficient, metres.
        """
        flat = fields.reshape(len(fields), -1)
        gram = flat @ flat.T / fields.shape[1]
        lam, u = np.linalg.eigh(gram)
        lam = np.maximum(lam, 1e-12)  # modes moving the fitting vertices < 1 um per unit
        self._whiten = u * (self.STEP_M / np.sqrt(lam))
        self._whiten_t = torch.as_tensor(self._whiten, dtype=DTYPE)
        self.scale[self.slice("c")] = 1.0
        self._scale_t = torch.as_tensor(self.scale, dtype=DTYPE)

    _whiten: np.ndarray | None = None

    def unpack(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x * self._scale_t
        p = {k: x[self.slice(k)].reshape(self.shapes[k]) for k in self.sizes}
        if self._whiten is not None:
            p["c"] = self._whiten_t @ p["c"]
        return p

    def pack(self, c, w, a, r, t) -> np.ndarray:
        if self._whiten is not None:
            c = np.linalg.solve(self._whiten, np.ravel(c))
        return np.concatenate([np.ravel(v) for v in (c, w, a, r, t)]) / self.scale


def _sensitivity(prob: FitProblem, w0: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Motion of the fitting vertices per unit of each parameter, by finite differences at
    the start (one scan's prior): the identity's (k, f, 3) fields, and the RMS per unit of
    each expression and articulation parameter."""
    k, e, j = prob.model.n_identity, prob.model.n_expression, prob.model.n_articulation
    h = 1e-3
    with torch.no_grad():
        c0 = torch.zeros(k, dtype=DTYPE)
        w = torch.as_tensor(w0[:1], dtype=DTYPE)
        a0 = torch.zeros(1, j, dtype=DTYPE)
        base = prob.local_vertices(c0, w, a0)[:, prob.fit_local]

        def rms(v: torch.Tensor) -> np.ndarray:
            return ((v - base) ** 2).sum(-1).mean(-1).sqrt().numpy() / h

        eye = torch.eye(k, dtype=DTYPE)
        ident = np.stack([(prob.local_vertices(c0 + h * eye[i], w, a0)[0, prob.fit_local] - base[0]).numpy() / h
                          for i in range(k)])
        expr = rms(prob.local_vertices(c0, w + h * torch.eye(e, dtype=DTYPE), a0.expand(e, j))[:, prob.fit_local])
        art = (rms(prob.local_vertices(c0, w.expand(j, e), h * torch.eye(j, dtype=DTYPE))[:, prob.fit_local])
               if j else np.zeros(0))
    return ident, {"w": expr, "a": art}


def lbfgs(prob: FitProblem, cfg: FitConfig, P: dict[str, torch.Tensor], corr: tuple[torch.Tensor, ...],
          sigma: float, rigid_only: bool) -> dict[str, torch.Tensor]:
    """``cfg.lbfgs_steps`` of scipy's L-BFGS-B on torch gradients (exact box bounds on the
    weights), preconditioned by :class:`Packing`; poses as axis-angle."""
    from scipy.optimize import minimize
    from scipy.spatial.transform import Rotation

    model = prob.model
    S, k, e, j = prob.S, model.n_identity, model.n_expression, model.n_articulation
    pk = Packing(k, S, e, j)
    if prob.whitening is None:
        prob.whitening = _sensitivity(prob, P["w"].numpy())
    fields, rms = prob.whitening
    for name, value in rms.items():
        pk.set_scale(name, value)
    pk.whiten_identity(fields)
    x0 = pk.pack(P["c"].numpy(), P["w"].numpy(), P["a"].numpy(), Rotation.from_matrix(P["R"].numpy()).as_rotvec(),
                 P["t"].numpy())
    bounds = [(None, None)] * pk.n
    if model.expression_bounds is not None:
        lo, hi = model.expression_bounds
        for i in range(pk.slice("w").start, pk.slice("w").stop):
            bounds[i] = (lo / pk.scale[i], hi / pk.scale[i])
    free = np.r_[pk.slice("r"), pk.slice("t")] if rigid_only else np.arange(pk.n)
    shape = None
    if rigid_only:  # the head-frame vertices do not change: evaluate them once
        with torch.no_grad():
            shape = prob.local_vertices(P["c"], P["w"], P["a"])
    fixed, free_t = torch.as_tensor(x0, dtype=DTYPE), torch.as_tensor(free)

    def physical(z: torch.Tensor) -> dict[str, torch.Tensor]:
        xt = fixed.clone()
        xt[free_t] = z
        q = pk.unpack(xt)
        return {"c": q["c"], "w": q["w"], "a": q["a"], "R": so3_exp(q["r"]), "t": q["t"]}

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        zt = torch.as_tensor(z, dtype=DTYPE).requires_grad_(True)
        value = energy(prob, cfg, physical(zt), corr, sigma, shape)
        (grad,) = torch.autograd.grad(value, zt)
        return float(value.detach()), grad.numpy().astype(np.float64)

    res = minimize(fun, x0[free], jac=True, method="L-BFGS-B", bounds=[bounds[i] for i in free],
                   options={"maxiter": cfg.lbfgs_steps, "maxcor": cfg.lbfgs_memory})
    with torch.no_grad():
        return {name: value.detach() for name, value in physical(torch.as_tensor(res.x, dtype=DTYPE)).items()}


