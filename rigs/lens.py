"""OpenCV's two lens distortion models, their exact inverses, and where they are invertible.

A lens maps a camera-frame direction (X, Y, Z) (OpenCV axes: x right, y down, z forward)
to *distorted normalised coordinates* (xd, yd); the pixel is then (fx xd + cx, fy yd + cy)
with pixel centres at integer coordinates.

``opencv`` (radial-tangential; coefficients k1, k2, p1, p2, k3; ``cv2.projectPoints``)::

    x = X / Z, y = Y / Z, r^2 = x^2 + y^2
    radial = 1 + k1 r^2 + k2 r^4 + k3 r^6
    xd = x radial + 2 p1 x y + p2 (r^2 + 2 x^2)
    yd = y radial + p1 (r^2 + 2 y^2) + 2 p2 x y

``opencv_fisheye`` (Kannala-Brandt; coefficients k1, k2, k3, k4; ``cv2.fisheye``)::

    theta = atan2(sqrt(X^2 + Y^2), Z)            (angle from the optical axis)
    theta_d = theta (1 + k1 theta^2 + k2 theta^4 + k3 theta^6 + k4 theta^8)
    (xd, yd) = theta_d (X, Y) / sqrt(X^2 + Y^2)

Both radial maps are odd polynomials g(t) = t (1 + c1 t^2 + c2 t^4 + ...) of t = r (opencv)
or t = theta (fisheye). **Valid region**: the lens is invertible where g is increasing,
i.e. for t < t_max, the first positive root of g'(t) (infinite when there is none), and
for the fisheye also theta <= pi. A distorted radius sqrt(xd^2 + yd^2) >= g(t_max) has no
pre-image on that branch: such pixels are reported invalid (``undistort``) or rejected
with :class:`LensInversionError` (``Camera.pixel_rays``). The fisheye covers directions up
to theta = t_max, past 90 degrees (behind the image plane) when t_max allows; the opencv
model only covers the front half-space (Z > 0). A rig is checked over its whole image by
:func:`inversion_problem`.

The inverse is a bracketed Newton solve of the radial equation, then (opencv, tangential
terms) a Newton solve of the 2-D map with its analytic 2x2 Jacobian, each iterated until
its residual is at rounding level; a pixel that does not converge is invalid, never a
silently wrong ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import ModelError

if TYPE_CHECKING:
    from rigs.camera import PinholeIntrinsics

#: Lens model name -> number of distortion coefficients (their order is OpenCV's).
LENS_MODELS: dict[str, int] = {"opencv": 5, "opencv_fisheye": 4}
DEFAULT_LENS_MODEL = "opencv"
#: Residual (normalised units, relative to max(1, radius)) at which a solve has converged;
#: 1e-12 is 1e-8 px at a 10 000 px focal length.
CONVERGED = 1e-12
_MAX_ITERATIONS = 100


class LensInversionError(ModelError):
    """Pixels lie where the lens model cannot be inverted (outside its monotonic region)."""


def _radial(c: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """g(t) = t (1 + sum c_i t^2i) and g'(t), by Horner in s = t^2."""
    s = t * t
    p = np.zeros_like(t)
    dp = np.zeros_like(t)
    for i in range(len(c), 0, -1):  # p = sum c_i s^i, dp = sum (2i+1) c_i s^i
        p = (p + c[i - 1]) * s
        dp = (dp + (2 * i + 1) * c[i - 1]) * s
    return t * (1.0 + p), 1.0 + dp


@dataclass(frozen=True, eq=False)
class Lens:
    """A distortion model and its coefficients.

    Attributes:
        model: "opencv" (k1, k2, p1, p2, k3) or "opencv_fisheye" (k1, k2, k3, k4).
        coefficients: the model's coefficients, in OpenCV's order.
    """

    model: str
    coefficients: np.ndarray

    def __post_init__(self) -> None:
        if self.model not in LENS_MODELS:
            raise ModelError(f"unknown lens model {self.model!r} (known: {', '.join(LENS_MODELS)})")
        c = np.asarray(self.coefficients, dtype=np.float64)
        if c.shape != (LENS_MODELS[self.model],) or not np.isfinite(c).all():
            raise ModelError(
                f"the {self.model} lens needs {LENS_MODELS[self.model]} finite coefficients, "
                f"got shape {c.shape}"
            )
        object.__setattr__(self, "coefficients", c)

    @property
    def radial_coefficients(self) -> np.ndarray:
        """(c1, c2, ...) of the odd radial polynomial g(t) = t (1 + c1 t^2 + c2 t^4 + ...)."""
        c = self.coefficients
        return c[[0, 1, 4]] if self.model == "opencv" else c

    @cached_property
    def t_max(self) -> float:
        """End of the monotonic region of g: radius r (opencv) or angle theta (fisheye)."""
        c = self.radial_coefficients
        # g'(t) = 1 + sum (2i+1) c_i s^i with s = t^2: its smallest positive real root.
        poly = [(2 * i + 1) * c[i - 1] for i in range(len(c), 0, -1)] + [1.0]
        roots = np.roots(np.trim_zeros(np.array(poly), "f"))
        real = roots[(np.abs(roots.imag) <= 1e-9 * np.abs(roots)) & (roots.real > 0)].real
        t = float(np.sqrt(real.min())) if real.size else np.inf
        return min(t, np.pi) if self.model == "opencv_fisheye" else t

    @cached_property
    def rho_max(self) -> float:
        """Largest distorted radius the lens can invert (g(t_max); inf if unbounded)."""
        if not np.isfinite(self.t_max):
            return np.inf
        return float(_radial(self.radial_coefficients, np.array(self.t_max))[0])

    # ------------------------------------------------------------------------- forward

    def distort(self, points: np.ndarray) -> np.ndarray:
        """Camera-frame points or directions (..., 3) -> distorted normalised coords (..., 2).

        The opencv model divides by Z (|Z| clamped at 1e-12, so points behind the camera
        give meaningless coordinates: check the depth); the fisheye uses the angle.
        """
        p = np.asarray(points, dtype=np.float64)
        if self.model == "opencv":
            z = p[..., 2]
            return self.distort_normalised(p[..., :2] / np.where(np.abs(z) < 1e-12, 1e-12, z)[..., None])
        r = np.hypot(p[..., 0], p[..., 1])
        theta_d, _ = _radial(self.coefficients, np.arctan2(r, p[..., 2]))
        scale = np.divide(theta_d, r, out=np.zeros_like(r), where=r > 0)
        return p[..., :2] * scale[..., None]

    def distort_normalised(self, xy: np.ndarray) -> np.ndarray:
        """opencv model: (..., 2) undistorted (X/Z, Y/Z) -> distorted normalised coordinates."""
        k1, k2, p1, p2, k3 = self.coefficients
        x, y = xy[..., 0], xy[..., 1]
        r2 = x * x + y * y
        radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
        xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        return np.stack([xd, yd], -1)

    def jacobian_normalised(self, xy: np.ndarray) -> np.ndarray:
        """opencv model: (..., 2, 2) Jacobian d(xd, yd)/d(x, y) of :meth:`distort_normalised`."""
        k1, k2, p1, p2, k3 = self.coefficients
        x, y = xy[..., 0], xy[..., 1]
        r2 = x * x + y * y
        radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
        d_radial = k1 + r2 * (2 * k2 + 3 * k3 * r2)  # d radial / d r^2
        cross = 2 * x * y * d_radial + 2 * p1 * x + 2 * p2 * y
        j = np.empty((*x.shape, 2, 2))
        j[..., 0, 0] = radial + 2 * x * x * d_radial + 2 * p1 * y + 6 * p2 * x
        j[..., 0, 1] = cross
        j[..., 1, 0] = cross
        j[..., 1, 1] = radial + 2 * y * y * d_radial + 6 * p1 * y + 2 * p2 * x
        return j

    # ------------------------------------------------------------------------- inverse

    def _solve_radial(self, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """t with g(t) = rho on [0, t_max) by bracketed Newton; (t, converged)."""
        c = self.radial_coefficients
        shape, rho = rho.shape, rho.ravel()
        ok = np.isfinite(rho) & (rho >= 0) & (rho < self.rho_max)
        target = np.where(ok, rho, 0.0)
        lo = np.zeros_like(target)
        if np.isfinite(self.t_max):
            hi = np.full_like(target, self.t_max)
        else:  # g' > 0 everywhere, so g is unbounded: double until the root is bracketed
            hi = np.maximum(target, 1.0)
            for _ in range(64):
                short = _radial(c, hi)[0] < target
                if not short.any():
                    break
                hi = np.where(short, 2 * hi, hi)
        t = np.clip(target, lo, hi)
        active = np.flatnonzero(ok)  # the points still iterating
        for _ in range(_MAX_ITERATIONS):
            ta, goal = t[active], target[active]
            g, dg = _radial(c, ta)
            f = g - goal
            with np.errstate(divide="ignore", invalid="ignore"):
                newton = ta - f / dg
            # Done at rounding level: residual tiny, or a step that no longer moves t.
            done = (np.abs(f) <= CONVERGED * 1e-2 * np.maximum(1.0, goal)) | (
                np.abs(newton - ta) <= 4e-16 * np.maximum(ta, 1e-300)
            )
            lo[active] = np.where(f < 0, ta, lo[active])
            hi[active] = np.where(f > 0, ta, hi[active])
            inside = (newton > lo[active]) & (newton < hi[active])  # False for NaN: bisect
            step = np.where(inside, newton, 0.5 * (lo[active] + hi[active]))
            t[active[~done]] = step[~done]
            active = active[~done]
            if not active.size:
                break
        g, _ = _radial(c, t)
        converged = ok & (np.abs(g - target) <= CONVERGED * np.maximum(1.0, target))
        return t.reshape(shape), converged.reshape(shape)

    def undistort(self, xd: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distorted normalised coordinates (..., 2) -> unit camera-frame directions (..., 3).

        Returns:
            (directions (..., 3), valid (...,) bool). Invalid entries (outside the
            monotonic region, or not converged) hold NaN.
        """
        xd = np.asarray(xd, dtype=np.float64)
        rho = np.hypot(xd[..., 0], xd[..., 1])
        t, valid = self._solve_radial(rho)
        unit = np.divide(xd, rho[..., None], out=np.zeros_like(xd), where=rho[..., None] > 0)
        if self.model == "opencv_fisheye":
            d = np.concatenate([unit * np.sin(t)[..., None], np.cos(t)[..., None]], -1)
        else:
            xy = unit * t[..., None]
            if self.coefficients[2] != 0 or self.coefficients[3] != 0:
                xy, valid = self._solve_tangential(xd, xy, valid)
            d = np.concatenate([xy, np.ones_like(xy[..., :1])], -1)
            d /= np.linalg.norm(d, axis=-1, keepdims=True)
        d[~valid] = np.nan
        return d, valid

    def _solve_tangential(
        self, xd: np.ndarray, xy: np.ndarray, valid: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """opencv: damped Newton on distort_normalised(xy) = xd from the radial solution."""
        shape = xd.shape
        xd, xy, valid = xd.reshape(-1, 2), xy.reshape(-1, 2).copy(), valid.ravel()
        scale = np.maximum(1.0, np.abs(xd).max(-1))
        active = np.flatnonzero(valid)  # the points still iterating
        for _ in range(_MAX_ITERATIONS):
            f = self.distort_normalised(xy[active]) - xd[active]
            err = np.abs(f).max(-1)
            keep = err > CONVERGED * 1e-2 * scale[active]
            active, f, err = active[keep], f[keep], err[keep]
            if not active.size:
                break
            j = self.jacobian_normalised(xy[active])
            det = j[:, 0, 0] * j[:, 1, 1] - j[:, 0, 1] * j[:, 1, 0]
            with np.errstate(divide="ignore", invalid="ignore"):
                step = np.stack(
                    [j[:, 1, 1] * f[:, 0] - j[:, 0, 1] * f[:, 1],
                     j[:, 0, 0] * f[:, 1] - j[:, 1, 0] * f[:, 0]], -1,
                ) / det[:, None]  # fmt: skip
            # Halve steps that do not lower the residual; a point whose residual cannot
            # go lower (rounding level, or a fold) stops here and is judged below.
            better = np.zeros(active.size, bool)
            trying = np.arange(active.size)
            for _ in range(30):
                idx = active[trying]
                trial = xy[idx] - step[trying]
                ok = np.abs(self.distort_normalised(trial) - xd[idx]).max(-1) < err[trying]
                better[trying[ok]] = True
                trying = trying[~ok]
                if not trying.size:
                    break
                step[trying] *= 0.5
            xy[active[better]] -= step[better]
            active = active[better]
        j = self.jacobian_normalised(xy)
        det = j[:, 0, 0] * j[:, 1, 1] - j[:, 0, 1] * j[:, 1, 0]
        err = np.abs(self.distort_normalised(xy) - xd).max(-1)
        r = np.hypot(xy[:, 0], xy[:, 1])
        ok = valid & (det > 0) & (r < self.t_max) & (err <= CONVERGED * scale)
        return xy.reshape(shape), ok.reshape(shape[:-1])


def inversion_problem(lens: Lens, intrinsics: PinholeIntrinsics) -> str | None:
    """Why ``lens`` cannot be inverted over the image of ``intrinsics``, or None if it can.

    Checks every border pixel centre (where the distorted radius is largest) and a
    32 x 32 grid of the interior.
    """
    w, h = intrinsics.width, intrinsics.height
    u, v = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
    gu, gv = np.linspace(0, w - 1, 32), np.linspace(0, h - 1, 32)
    us = np.concatenate([u, u, np.zeros(h), np.full(h, w - 1.0), np.repeat(gu, 32)])
    vs = np.concatenate([np.zeros(w), np.full(w, h - 1.0), v, v, np.tile(gv, 32)])
    xd = np.stack([(us - intrinsics.cx) / intrinsics.fx, (vs - intrinsics.cy) / intrinsics.fy], -1)
    _, valid = lens.undistort(xd)
    if valid.all():
        return None
    rho = float(np.hypot(xd[..., 0], xd[..., 1])[~valid].max())
    if rho < lens.rho_max:
        return (
            f"the {lens.model} lens is not invertible over the image: its distortion folds "
            f"over at {int((~valid).sum())} of {valid.size} checked pixels"
        )
    unit = "rad from the axis" if lens.model == "opencv_fisheye" else "(undistorted radius)"
    return (
        f"the {lens.model} lens is not invertible over the image: its radial distortion stops "
        f"increasing at {lens.t_max:.4g} {unit}, i.e. at distorted radius {lens.rho_max:.4g}, "
        f"but the image reaches {rho:.4g} (normalised units)"
    )
