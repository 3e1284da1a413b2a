"""Fitting through the renderer: appearance for a known rig state, and a rig state for
known appearance (one step each of the self-supervision's alternation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rigs.render.appearance import ALBEDO, CAMERA, LIGHT, AppearanceModel
from rigs.render.cameras import CameraBatch
from rigs.render.losses import keypoint_l2, masked_l2
from rigs.render.posing import RigState, rotvec_to_matrix
from rigs.render.renderer import HmcRenderer
from rigs.render.surface import Surface


@dataclass(frozen=True)
class AppearanceFitConfig:
    """How :func:`fit_appearance` runs."""

    steps: int = 300
    """Adam steps."""
    lr: float = 0.03
    """Adam learning rate (parameters are O(1): logs, offsets, polynomial coefficients)."""
    albedo: bool = False
    """Also fit the albedo (exponent, offset, UV residual, eyeball vertex albedo)."""
    smoothness: float = 1.0
    """Weight of the albedo residual's finite-difference prior (with ``albedo``)."""
    confidence: float = 0.01
    """Weight of the albedo residual's confidence-weighted L2 prior (with ``albedo``)."""
    init_levels: bool = True
    """First set each camera's gain so that its median rendered intensity matches the
    median observed one over the mask, and its background level to the median observed
    off the mask (a data-driven start for any image scale)."""


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
        config: steps, learning rate and which groups.

    Returns:
        The loss after each step (mean squared intensity error).
    """
    with torch.no_grad():
        vertices = renderer.rig(state)
        s = renderer.surface(vertices, renderer.visibility(vertices))
    mask = s.mask if valid is None else s.mask & valid
    tris, cams = renderer.rig.triangles, renderer.cameras
    if config.init_levels:
        _match_levels(appearance, s, tris, cams, images)
    names = LIGHT + CAMERA + (ALBEDO if config.albedo else ())
    opt = torch.optim.Adam(appearance.groups(*names), lr=config.lr)
    history = []
    for _ in range(config.steps):
        opt.zero_grad()
        loss = masked_l2(appearance(s, tris, cams), images, mask)
        total = loss + (appearance.prior_loss(config.smoothness, config.confidence) if config.albedo else 0.0)
        total.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history


def _match_levels(appearance: AppearanceModel, s: Surface, triangles: torch.Tensor, cameras: CameraBatch,
                  images: torch.Tensor) -> None:
    """Per camera: log gain += log(median observed / median rendered) over the hit pixels;
    background = median observed over the others."""
    with torch.no_grad():
        rendered = appearance.intensity(s, triangles, cameras)
        observed = images.reshape(-1)[s.index]
        index = appearance.camera_index(cameras)
        mask = s.mask
        for c in range(len(cameras)):
            sel = s.camera == c
            if sel.any():
                ratio = observed[sel].median().clamp_min(1e-3) / rendered[sel].median().clamp_min(1e-6)
                appearance.log_gain[index[c]] += ratio.log()
            background = images[:, c][~mask[:, c]]
            if background.numel():
                appearance.background[index[c]] = background.median()


@dataclass(frozen=True)
class StateFitConfig:
    """How :func:`fit_state` runs."""

    steps: int = 150
    """Adam steps."""
    lr_rotation: float = 2e-3
    """Learning rate of the head rotation update (radians)."""
    lr_translation: float = 0.1
    """Learning rate of the head translation update (millimetres)."""
    lr_b: float = 0.02
    """Learning rate of the free blendshape coefficients."""
    pixel_weight: float = 1000.0
    """Weight of the masked pixel L2 (intensities in [0, 1]) against the keypoint L2 (px^2)."""
    keypoint_weight: float = 1.0
    """Weight of the keypoint reprojection L2."""
    visibility_every: int = 5
    """Recompute the (non-differentiable) visibility every this many steps."""


def fit_state(renderer: HmcRenderer, appearance: AppearanceModel, images: torch.Tensor, start: RigState,
              free_b: Sequence[int], keypoints: torch.Tensor | None = None,
              keypoint_vertices: torch.Tensor | None = None,
              config: StateFitConfig = StateFitConfig()) -> RigState:
    """Fits head pose (R, t) and the coefficients ``free_b`` to images (and keypoints).

    Args:
        renderer: the renderer (cameras at the images' resolution).
        appearance: the IR appearance (held fixed).
        images: (F, C, H, W) observed intensities in [0, 1].
        start: the initial state; gaze and the other coefficients stay as given.
        free_b: indices of the coefficients to fit (kept in [0, 1]).
        keypoints: (F, C, L, 2) observed keypoints at render resolution (NaN = missing).
        keypoint_vertices: (L,) vertex ids whose projections the keypoints observe.
        config: steps, rates, weights.

    Returns:
        The fitted :class:`RigState` (detached).
    """
    dtype, device = start.b.dtype, start.b.device
    free = torch.as_tensor(list(free_b), device=device, dtype=torch.int64)
    rot = torch.zeros(start.frames, 3, dtype=dtype, device=device, requires_grad=True)
    dt_mm = torch.zeros(start.frames, 3, dtype=dtype, device=device, requires_grad=True)
    b_free = start.b[:, free].clone().requires_grad_(True)
    opt = torch.optim.Adam([{"params": [rot], "lr": config.lr_rotation},
                            {"params": [dt_mm], "lr": config.lr_translation},
                            {"params": [b_free], "lr": config.lr_b}])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config.steps)

    def current() -> RigState:
        b = start.b.index_copy(1, free, b_free.clamp(0, 1))
        return RigState(b, start.gaze, rotvec_to_matrix(rot) @ start.R, start.t + dt_mm / 1000)

    ids = None
    for step in range(config.steps):
        opt.zero_grad()
        state = current()
        vertices = renderer.rig(state)
        if step % config.visibility_every == 0:
            ids = renderer.visibility(vertices)
        s = renderer.surface(vertices, ids)
        loss = config.pixel_weight * masked_l2(appearance(s, renderer.rig.triangles, renderer.cameras), images, s.mask)
        if keypoints is not None and keypoint_vertices is not None:
            pixels, _ = renderer.project(vertices[:, keypoint_vertices])
            loss = loss + config.keypoint_weight * keypoint_l2(pixels, keypoints)
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        final = current()
    return RigState(final.b.detach(), final.gaze.detach(), final.R.detach(), final.t.detach())
