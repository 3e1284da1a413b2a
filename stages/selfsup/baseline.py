"""The per-frame baseline: the self-supervision energy minimised frame by frame, no network.

Optimisation trackers (metrical-tracker, VHAP) label a video this way: each frame's state
is fitted by gradient descent on the render-and-compare energy, warm-started from the
previous frame's result. It is the reference the amortised network must beat on speed at
equal or better accuracy (issue 9). The appearance is held fixed: the one fitted on the
neutral frames (``fit_initial_appearance``), as a tracker calibrates it once per subject.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rigs.render.posing import rotvec_to_matrix
from stages.selfsup.energy import Energy
from stages.selfsup.stage import FramePool


@dataclass(frozen=True)
class BaselineConfig:
    """How each frame is fitted."""

    first_steps: int = 120
    """Adam steps on a recording's first frame (cold start: neutral, nominal donning)."""
    steps: int = 30
    """Adam steps on every later frame (warm-started from the previous one)."""
    lr_b: float = 0.03
    """Learning rate of the regressed weights (kept in [0, 1])."""
    lr_gaze: float = 0.02
    """Learning rate of the gaze angles (radians)."""
    lr_rotation: float = 3e-3
    """Learning rate of the head rotation update (radians)."""
    lr_translation_mm: float = 0.2
    """Learning rate of the head translation (millimetres)."""
    use_keypoints: bool = True
    """Use the detector keypoints."""


@dataclass
class BaselineStates:
    """Per-frame fitted states of the pool (N frames) and their residuals."""

    b: np.ndarray
    gaze: np.ndarray
    rotation: np.ndarray
    translation: np.ndarray
    pixel_rms: np.ndarray
    keypoint_px: np.ndarray
    seconds: float


def state_optimizer(b: torch.Tensor, gaze: torch.Tensor, rotvec: torch.Tensor, t_mm: torch.Tensor,
                    cfg: Any) -> torch.optim.Adam:
    """Adam over frames' own state variables, each group at ``cfg``'s rate (``lr_b``,
    ``lr_gaze``, ``lr_rotation``, ``lr_translation_mm``)."""
    return torch.optim.Adam([{"params": [b], "lr": cfg.lr_b}, {"params": [gaze], "lr": cfg.lr_gaze},
                             {"params": [rotvec], "lr": cfg.lr_rotation},
                             {"params": [t_mm], "lr": cfg.lr_translation_mm}])


def fit_frame(energy: Energy, data, start: tuple[torch.Tensor, ...], steps: int, cfg: BaselineConfig
              ) -> tuple[tuple[torch.Tensor, ...], object]:
    """Fits one frame's (b, gaze, R, t) from ``start``; returns the state and its energy terms."""
    b0, gaze0, r0, t0 = start
    b = b0.clone().requires_grad_(True)
    gaze = gaze0.clone().requires_grad_(True)
    rotvec = torch.zeros(1, 3, requires_grad=True)
    t_mm = (t0 * 1000).clone().requires_grad_(True)
    opt = state_optimizer(b, gaze, rotvec, t_mm, cfg)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        terms = energy(b.clamp(0, 1), gaze, rotvec_to_matrix(rotvec) @ r0, t_mm / 1000, data)
        terms.total.backward()
        opt.step()
    with torch.no_grad():
        state = (b.clamp(0, 1).detach(), gaze.detach(), (rotvec_to_matrix(rotvec) @ r0).detach(), (t_mm / 1000).detach())
        terms = energy(*state, data, residuals=True)
    return state, terms


def track(energy: Energy, pool: FramePool, cfg: BaselineConfig = BaselineConfig(), frames: np.ndarray | None = None,
          donning: tuple[torch.Tensor, torch.Tensor] | None = None) -> BaselineStates:
    """Fits every frame of the pool (or ``frames``, pool rows) in order, warm-starting each
    from the previous row of the same recording; a recording's first frame starts at rest
    at ``donning`` (R (3, 3), t (3,): the estimated head pose; the nominal one when None)."""
    import time

    rows = np.arange(len(pool)) if frames is None else np.asarray(frames)
    starts = set(np.cumsum([0] + [c.frame_count for c in pool.clips]).tolist())
    k = len(energy.definition.regressed)
    r0, t0 = donning if donning is not None else (torch.eye(3), torch.zeros(3))
    rest = (torch.zeros(1, k), torch.zeros(1, 4), r0[None].clone(), t0[None].clone())
    out = {key: [] for key in ("b", "gaze", "R", "t", "rms", "kp")}
    state, previous = rest, None
    t0 = time.perf_counter()
    for row in rows:
        first = previous is None or row != previous + 1 or row in starts  # a recording's first frame
        data = pool.data(np.array([row]), cfg.use_keypoints)
        state, terms = fit_frame(energy, data, rest if first else state, cfg.first_steps if first else cfg.steps, cfg)
        for key, value in zip(("b", "gaze", "R", "t"), state, strict=True):
            out[key].append(value.numpy())
        out["rms"].append(terms.frame_pixel_rms.numpy())
        out["kp"].append(terms.frame_keypoint_px.numpy())
        previous = row
    cat = {key: np.concatenate(v) for key, v in out.items()}
    return BaselineStates(cat["b"], cat["gaze"], cat["R"], cat["t"], cat["rms"], cat["kp"], time.perf_counter() - t0)
