"""Per-frame keypoint fits: every frame's state fitted to its detector keypoints alone.

The energy's render-free terms (keypoints, sparsity, rig constraints) are minimised for
every frame of the pool, each frame with its own variables (regressed weights, gaze, head
pose around the estimated donning). Only the keypoints' few hundred vertices are posed:
300 steps over a standard subject's 1,980 frames took 89 CPU-s. With
``SelfSupConfig.keypoint_prefit_steps`` the network's keypoint warm-up also regresses
these fits. Why: on two standard subjects the fits reach amplitude 0.99 where the network
after 1,000 warm-up and 600 whole steps stayed at 0.31 (docs/selfsup.md); a network
trained on the keypoint reprojection alone is slow to learn what the keypoints already
say, and a target in weight space is direct. Its measured cost is neutral frames (the
fits hold the rig's neutral misfit as activations), so it is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import StageError
from rigs.render.posing import rotvec_to_matrix
from stages.selfsup.baseline import state_optimizer
from stages.selfsup.energy import Energy
from stages.selfsup.frames import USABLE
from stages.selfsup.stage import FramePool


@dataclass(frozen=True)
class PrefitConfig:
    """How each frame is fitted (Adam on all frames of a chunk at once; the rates are the
    per-frame baseline's, :class:`stages.selfsup.baseline.BaselineConfig`)."""

    steps: int = 300
    """Adam steps per chunk of frames, from rest at the donning."""
    lr_b: float = 0.03
    """Learning rate of the regressed weights (kept in [0, 1])."""
    lr_gaze: float = 0.02
    """Learning rate of the gaze angles (radians)."""
    lr_rotation: float = 3e-3
    """Learning rate of the head rotation update (radians)."""
    lr_translation_mm: float = 0.2
    """Learning rate of the head translation (millimetres)."""
    chunk: int = 1024
    """Frames fitted together (memory, not results: frames do not interact)."""
    min_points: int = 12
    """A frame with fewer confident keypoints in usable cameras gets no fit (``valid``)."""


@dataclass
class KeypointFits:
    """Per-frame keypoint fits of the pool's N frames.

    Attributes:
        b: (N, K) regressed weights in [0, 1].
        gaze: (N, 4) radians.
        rotation: (N, 3, 3) head rotation (headset frame).
        translation: (N, 3) metres.
        keypoint_px: (N,) mean distance over the frame's points, stored pixels (NaN: none).
        valid: (N,) frames with at least ``min_points`` keypoints (the others' fits are rest).
        seconds: wall seconds of the fit.
    """

    b: np.ndarray
    gaze: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    keypoint_px: np.ndarray
    valid: np.ndarray
    seconds: float


def fit_keypoints(energy: Energy, pool: FramePool, donning: tuple[torch.Tensor, torch.Tensor],
                  cfg: PrefitConfig = PrefitConfig()) -> KeypointFits:
    """Fits every frame of ``pool`` to its keypoints (see the module docstring).

    Args:
        energy: the subject's energy (its keypoint layout, weights and cameras are used).
        pool: the frames; must have keypoints.
        donning: (R (3, 3), t (3,)) the estimated head pose every frame starts from.
        cfg: the fit's settings.

    Returns:
        The fits; frames with too few keypoints are at rest and not ``valid``.
    """
    import time

    if energy.layout is None or pool.keypoints is None:
        raise StageError("fit_keypoints needs keypoints and a keypoint layout")
    t_start = time.perf_counter()
    r0, t0 = donning
    k = len(energy.definition.regressed)
    parts: dict[str, list[np.ndarray]] = {key: [] for key in ("b", "gaze", "R", "t", "kp")}
    for start in range(0, len(pool), cfg.chunk):
        rows = np.arange(start, min(start + cfg.chunk, len(pool)))
        data = pool.data(rows, keypoints=True)
        n = len(rows)
        b = torch.zeros(n, k, requires_grad=True)
        gaze = torch.zeros(n, 4, requires_grad=True)
        rotvec = torch.zeros(n, 3, requires_grad=True)
        t_mm = (t0 * 1000).expand(n, 3).clone().requires_grad_(True)
        opt = state_optimizer(b, gaze, rotvec, t_mm, cfg)
        for _ in range(cfg.steps):
            opt.zero_grad(set_to_none=True)
            # Frames do not interact: the mean over frames only scales each one's gradient.
            terms = energy(b.clamp(0, 1), gaze, rotvec_to_matrix(rotvec) @ r0, t_mm / 1000, data, with_pixels=False)
            (terms.total * n).backward()
            opt.step()
        with torch.no_grad():
            state = (b.clamp(0, 1), gaze, rotvec_to_matrix(rotvec) @ r0, t_mm / 1000)
            terms = energy(*state, data, residuals=True, with_pixels=False)
        for key, value in zip(("b", "gaze", "R", "t", "kp"), (*state, terms.frame_keypoint_px), strict=True):
            parts[key].append(value.detach().numpy())
    conf = pool.confidence * (pool.usability == USABLE)[..., None]
    valid = ((conf > 0) & np.isfinite(pool.keypoints).all(-1)).sum((1, 2)) >= cfg.min_points
    cat = {key: np.concatenate(v) for key, v in parts.items()}
    return KeypointFits(cat["b"], cat["gaze"], cat["R"], cat["t"], cat["kp"], valid, time.perf_counter() - t_start)


def distillation_loss(b: torch.Tensor, gaze: torch.Tensor, fits: KeypointFits, rows: np.ndarray) -> torch.Tensor:
    """Mean over the valid frames among ``rows`` of the squared distance of the network's
    (b (B, K), gaze (B, 4)) to the frames' fits (sum over the weights and gaze radians)."""
    valid = torch.as_tensor(fits.valid[rows])
    if not bool(valid.any()):
        return b.new_zeros(())
    target_b = torch.as_tensor(fits.b[rows], dtype=b.dtype)
    target_gaze = torch.as_tensor(fits.gaze[rows], dtype=gaze.dtype)
    per_frame = ((b - target_b) ** 2).sum(1) + ((gaze - target_gaze) ** 2).sum(1)
    return per_frame[valid].mean()
