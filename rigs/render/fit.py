"""Fitting through the renderer: appearance for a known rig state, and a rig state for
known appearance (one step each of the self-supervision's alternation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rigs.render.appearance import ALBEDO, ALBEDO_MAP, CAMERA, LIGHT, AppearanceModel
from rigs.render.cameras import CameraBatch
from rigs.render.losses import keypoint_l2, masked_l2
from rigs.render.posing import RigState, rotvec_to_matrix
from rigs.render.renderer import HmcRenderer
from rigs.render.surface import Surface

#: The parameters every appearance fit frees: light, camera response, the seed's map.
GLOBAL = LIGHT + CAMERA + ALBEDO_MAP


@dataclass(frozen=True)
class AppearanceFitConfig:
    """How :func:`fit_appearance` runs: initialise, L-BFGS on the global parameters, then
    (with ``albedo``) Adam on the per-texel albedo and an L-BFGS refinement of everything."""

    steps: int = 60
    """L-BFGS iterations on the light, camera and global albedo parameters (a smooth least
    squares in a few dozen parameters: strong-Wolfe line search)."""
    albedo: bool = False
    """Also fit the per-texel albedo (UV residual, vertex albedo off the atlas)."""
    albedo_steps: int = 100
    """Adam steps on the per-texel albedo alone (Adam's per-parameter scaling suits
    texels seen by few pixels, where L-BFGS crawls)."""
    albedo_lr: float = 0.02
    """Adam learning rate of the per-texel albedo (albedo units)."""
    refine_steps: int = 40
    """L-BFGS iterations on everything after the albedo stage."""
    smoothness: float = 1.0
    """Weight of the albedo residual's finite-difference prior (with ``albedo``)."""
    confidence: float = 0.01
    """Weight of the albedo residual's confidence-weighted L2 prior (with ``albedo``)."""
    fixed: tuple[str, ...] = ()
    """Parameter names (see :mod:`rigs.render.appearance`) held at their current values."""
    initialise: bool = True
    """First solve :func:`initialise_log_linear` (the exponents and gains from a linear
    least squares in the log domain; from generic values the joint fit stalls in poor
    minima: 11-15 grey levels rms in our trials on the generator test, 1.3 with it) and set each camera's
    background level to the median observed off the mask."""


def fit_appearance(renderer: HmcRenderer, appearance: AppearanceModel, state: RigState,
                   images: torch.Tensor, valid: torch.Tensor | None = None,
                   config: AppearanceFitConfig = AppearanceFitConfig()) -> list[float]:
    """Fits the appearance to observed images with the rig state held fixed (masked L2).

    The geometry pass runs once (the state does not change), so each step is shading only.

    Args:
        renderer: the renderer (its cameras are the images' cameras, same resolution).
        appearance: the model to fit, in place.
        state: the rig state of the F frames (not modified, no gradient).
        images: (F, C, H, W) observed intensities in [0, 1].
        valid: (F, C, H, W) bool observed pixels to use (all by default); the loss is
            over ``valid`` and the rendered mask.
        config: the stages and their lengths.

    Returns:
        The data loss (mean squared intensity error) at every evaluation; the last entry
        is the loss at the returned parameters.
    """
    with torch.no_grad():
        vertices = renderer.rig(state)
        s = renderer.surface(vertices, renderer.visibility(vertices))
    mask = s.mask if valid is None else s.mask & valid
    tris, cams = renderer.rig.triangles, renderer.cameras
    if config.initialise:
        initialise_log_linear(appearance, s, cams, images, fixed=config.fixed)
        _match_background(appearance, s, cams, images)
    history: list[float] = []

    def closure_for(opt: torch.optim.Optimizer, prior: bool):
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = masked_l2(appearance(s, tris, cams), images, mask)
            history.append(float(loss.detach()))
            total = loss + (appearance.prior_loss(config.smoothness, config.confidence) if prior else 0.0)
            total.backward()
            return total
        return closure

    def free(*names: str) -> list[torch.nn.Parameter]:
        return appearance.groups(*(n for n in names if n not in config.fixed))

    def lbfgs(params: list[torch.nn.Parameter], steps: int, prior: bool) -> None:
        if params and steps:
            opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps, history_size=20, tolerance_grad=1e-12,
                                    tolerance_change=1e-14, line_search_fn="strong_wolfe")
            opt.step(closure_for(opt, prior))

    lbfgs(free(*GLOBAL), config.steps, False)
    if config.albedo:
        params = free(*ALBEDO)
        if params and config.albedo_steps:
            opt = torch.optim.Adam(params, lr=config.albedo_lr)
            closure = closure_for(opt, True)
            for _ in range(config.albedo_steps):
                opt.step(closure)
        lbfgs(free(*GLOBAL, *ALBEDO), config.refine_steps, True)
    with torch.no_grad():  # the last closure call may be a rejected line-search trial
        history.append(float(masked_l2(appearance(s, tris, cams), images, mask)))
    return history


def initialise_log_linear(appearance: AppearanceModel, s: Surface, cameras: CameraBatch,
                          images: torch.Tensor, lo: float = 0.02, hi: float = 0.98,
                          fixed: Sequence[str] = ()) -> None:
    """Initial exponents and gains from a log-domain linear least squares.

    With the bias, ambient term, wrap and albedo offset at zero, the model's log intensity
    is linear in ``log gain_c``, ``g``, ``g p``, ``g e_a`` and ``g k_c`` given the
    per-pixel features ``log seed``, ``log cos``, ``log(d_ref / d)`` and ``log cos(theta)``.
    Solved over the atlas hits observed strictly inside (lo, hi) (not clipped). The
    exponents are then clamped to physically sensible ranges and the gains re-solved
    with them held, so that a clamp never leaves a gain that belongs to other exponents
    (an unclamped flat-seed solve gave log gain 39,000 on the tiny subject). The seed's
    exponent is held where it is ``fixed`` or the seed is flat (a constant seed cannot
    tell it from the gain). Sets log_gain, log_response, log_falloff, off_axis and (unless
    held) log_albedo_exponent; zeroes bias, albedo_offset, vignette.
    """
    from rigs.render.appearance import D_REF

    with torch.no_grad():
        observed = images.reshape(-1)[s.index]
        index = appearance.camera_index(cameras)
        to_light = cameras.centre[s.camera] - s.point
        dist = to_light.norm(dim=-1)
        cos = (s.normal * to_light).sum(-1) / dist
        cos_axis = (s.ray * cameras.R[s.camera, :, 2]).sum(-1)
        seed = appearance.sample_map(s, appearance.albedo_seed)
        use = (appearance.in_atlas[s.triangle] & (observed > lo) & (observed < hi) & (cos > 0.05)
               & (seed > 1e-3) & (cos_axis > 1e-3))
        if use.sum() < 100:
            return
        c = len(cameras)
        cam = s.camera[use]
        log_seed, log_cos = seed[use].log().double(), cos[use].log().double()
        log_near, log_axis = (D_REF / dist[use]).log().double(), cos_axis[use].log().double()
        target = observed[use].log().double()
        hold_seed = "log_albedo_exponent" in fixed or float(log_seed.std()) < 1e-6
        e_a = float(appearance.log_albedo_exponent.exp())
        # The response g multiplies the cosine's log (plus the seed's when its exponent is held).
        shading = log_cos + e_a * log_seed if hold_seed else log_cos
        onehot = torch.nn.functional.one_hot(cam, c).to(torch.float64)
        columns = [onehot, shading[:, None], log_near[:, None], onehot * log_axis[:, None]]
        if not hold_seed:
            columns.append(log_seed[:, None])
        coef = torch.linalg.lstsq(torch.cat(columns, 1), target[:, None], driver="gelsd").solution[:, 0]
        g = float(np.clip(float(coef[c]), 0.2, 3.0))
        p = float(np.clip(float(coef[c + 1]) / g, 0.5, 4.0))
        k = (coef[c + 2:2 * c + 2] / g).clamp(-2.0, 8.0)
        if not hold_seed:
            e_a = float(np.clip(float(coef[2 * c + 2]) / g, 0.1, 5.0))
            shading = log_cos + e_a * log_seed
        # Each camera's gain given the clamped exponents: the mean log residual of its pixels.
        residual = target - g * (shading + p * log_near + k[cam] * log_axis)
        counts = torch.bincount(cam, minlength=c).double()
        log_gain = torch.zeros(c, dtype=torch.float64).index_add_(0, cam, residual) / counts.clamp_min(1)
        seen = counts > 0
        appearance.log_response.fill_(float(np.log(g)))
        appearance.log_falloff.fill_(float(np.log(p)))
        appearance.log_albedo_exponent.fill_(float(np.log(e_a)))
        appearance.off_axis[index[seen]] = k[seen].to(appearance.off_axis.dtype)
        appearance.log_gain[index[seen]] = log_gain[seen].clamp(-10.0, 10.0).to(appearance.log_gain.dtype)
        appearance.bias.zero_()
        appearance.albedo_offset.zero_()
        appearance.vignette.zero_()


def _match_background(appearance: AppearanceModel, s: Surface, cameras: CameraBatch, images: torch.Tensor) -> None:
    """Each camera's background level: the median observed intensity off the mask."""
    with torch.no_grad():
        index = appearance.camera_index(cameras)
        for c in range(len(cameras)):
            off = images[:, c][~s.mask[:, c]]
            if off.numel():
                appearance.background[index[c]] = off.median()


@dataclass(frozen=True)
class StateFitConfig:
    """How :func:`fit_state` runs: ``rounds`` of (visibility pass, then L-BFGS with the
    triangle ids held fixed)."""

    rounds: int = 4
    """Visibility passes; each starts an L-BFGS run (the ids change as the face moves)."""
    steps: int = 15
    """L-BFGS iterations per round (strong-Wolfe line search). Rotation and translation
    are strongly coupled (a head rotation about the neck moves the face), which the
    quasi-Newton curvature handles and Adam does not."""
    pixel_weight: float = 300.0
    """Weight of the masked pixel L2 (intensities in [0, 1]) against the keypoint L2 (px^2).
    On the generator test with 68 keypoints at 0.3 px noise, 300 recovered the brow
    coefficient to 0.03 and 3000 to 0.12 (the held-out appearance error biases it)."""
    keypoint_weight: float = 1.0
    """Weight of the keypoint reprojection L2."""


def fit_state(renderer: HmcRenderer, appearance: AppearanceModel, images: torch.Tensor, start: RigState,
              free_b: Sequence[int], keypoints: torch.Tensor | None = None,
              keypoint_vertices: torch.Tensor | None = None,
              config: StateFitConfig = StateFitConfig()) -> RigState:
    """Fits head pose (R, t) and the coefficients ``free_b`` to images (and keypoints).

    Args:
        renderer: the renderer (cameras at the images' resolution).
        appearance: the IR appearance (held fixed; freeze it with ``requires_grad_(False)``).
        images: (F, C, H, W) observed intensities in [0, 1].
        start: the initial state; gaze and the other coefficients stay as given.
        free_b: indices of the coefficients to fit (clamped to [0, 1]).
        keypoints: (F, C, L, 2) observed keypoints at render resolution (NaN = missing:
            points behind the camera or outside the image must be NaN).
        keypoint_vertices: (L,) vertex ids whose projections the keypoints observe.
        config: rounds, iterations, weights.

    Returns:
        The fitted :class:`RigState` (detached).
    """
    dtype, device = start.b.dtype, start.b.device
    free = torch.as_tensor(list(free_b), device=device, dtype=torch.int64)
    # Units of the unknowns: L-BFGS's first step has an l1 norm of at most 1, i.e. at most
    # 0.01 rad (0.6 deg), 1 mm or 0.1 of a coefficient; wilder trial states push keypoints
    # behind the cameras.
    rot = torch.zeros(start.frames, 3, dtype=dtype, device=device, requires_grad=True)
    dt_mm = torch.zeros(start.frames, 3, dtype=dtype, device=device, requires_grad=True)
    b_free = (start.b[:, free] * 10).clone().requires_grad_(True)

    def current() -> RigState:
        b = start.b.index_copy(1, free, (b_free / 10).clamp(0, 1))
        return RigState(b, start.gaze, rotvec_to_matrix(rot / 100) @ start.R, start.t + dt_mm / 1000)

    def energy(ids: torch.Tensor) -> torch.Tensor:
        vertices = renderer.rig(current())
        s = renderer.surface(vertices, ids)
        ir = appearance(s, renderer.rig.triangles, renderer.cameras)
        loss = config.pixel_weight * masked_l2(ir, images, s.mask)
        if keypoints is not None and keypoint_vertices is not None:
            pixels, _ = renderer.project(vertices[:, keypoint_vertices])
            loss = loss + config.keypoint_weight * keypoint_l2(pixels, keypoints)
        return loss

    for _ in range(config.rounds):
        with torch.no_grad():
            ids = renderer.visibility(renderer.rig(current()))
        opt = torch.optim.LBFGS([rot, dt_mm, b_free], lr=1.0, max_iter=config.steps, history_size=20,
                                line_search_fn="strong_wolfe")

        def closure(opt: torch.optim.Optimizer = opt, ids: torch.Tensor = ids) -> torch.Tensor:
            opt.zero_grad()
            loss = energy(ids)
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        final = current()
    return RigState(final.b.detach(), final.gaze.detach(), final.R.detach(), final.t.detach())
