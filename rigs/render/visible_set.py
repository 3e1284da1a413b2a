"""The triangles an HMC camera can ever see: a potentially visible set for the renderer.

An HMC camera sits centimetres from the face and sees a fifth of the head's triangles
(8,214 of 48,836 at rest on a `tiny` subject); the back of the head, the ears, the neck and
the inside of the eye sockets never show. Yet the visibility pass builds its BVH over
every triangle each frame, and the normals are computed over every triangle: 32 % and
4 % of a self-supervision step's time (cProfile of 5 steps on the tiny subject). The set here is measured, not
assumed: the triangles hit in renders of the extreme states (rest, each basis at full
activation, the gaze extremes) at a finer resolution than the model's, grown by a few
rings of neighbours so that the motion between those states and any frame's stays inside.
:meth:`rigs.render.renderer.HmcRenderer.restrict` then renders only those.
"""

from __future__ import annotations

import numpy as np
import torch

from rigs.render.cameras import CameraBatch
from rigs.render.posing import RigState


def grow_rings(triangles: np.ndarray, selected: np.ndarray, rings: int) -> np.ndarray:
    """Triangle ids of ``selected`` plus every triangle within ``rings`` vertex rings of it.

    Args:
        triangles: (m, 3) int vertex ids.
        selected: (s,) int triangle ids.
        rings: how many times to add the triangles sharing a vertex with the set.

    Returns:
        (s',) sorted unique triangle ids.
    """
    t = np.asarray(triangles, np.int64)
    keep = np.zeros(len(t), bool)
    keep[np.asarray(selected, np.int64)] = True
    for _ in range(rings):
        touched = np.zeros(int(t.max()) + 1, bool)
        touched[t[keep].ravel()] = True
        keep |= touched[t].any(1)
    return np.flatnonzero(keep)


def extreme_states(k: int, donning: tuple[torch.Tensor, torch.Tensor], gaze_rad: float = 0.5,
                   dtype: torch.dtype = torch.float32) -> RigState:
    """Rest, each of the ``k`` bases alone at 1, and the four gaze extremes, at ``donning``
    (R (3, 3), t (3,)): 1 + k + 4 frames."""
    n = 1 + k + 4
    b = torch.zeros(n, k, dtype=dtype)
    b[1 : 1 + k] = torch.eye(k, dtype=dtype)
    gaze = torch.zeros(n, 4, dtype=dtype)
    for i, (yaw, pitch) in enumerate(((1, 0), (-1, 0), (0, 1), (0, -1))):
        gaze[1 + k + i] = torch.tensor([yaw, pitch, yaw, pitch], dtype=dtype) * gaze_rad
    r, t = donning
    return RigState(b, gaze, r.to(dtype).expand(n, 3, 3).clone(), t.to(dtype).expand(n, 3).clone())


def potentially_visible(renderer: torch.nn.Module, states: RigState, rings: int = 2,
                        supersample: int = 2, batch: int = 8) -> np.ndarray:
    """Triangle ids hit in any camera for any of ``states``, grown by ``rings`` rings.

    Args:
        renderer: an :class:`~rigs.render.renderer.HmcRenderer` (unrestricted).
        states: the states to render (e.g. :func:`extreme_states`).
        rings: vertex rings added around the hit triangles.
        supersample: render at this many times the cameras' resolution, so thin
            triangles between pixel centres are found.
        batch: frames per visibility pass.

    Returns:
        (s,) sorted unique int64 triangle ids.
    """
    cameras = renderer.cameras
    if supersample > 1:
        cameras = CameraBatch([c.scaled(supersample) for c in cameras.cameras], cameras.names,
                              cameras.rays.dtype)
    hit = np.zeros(len(renderer.rig.triangles), bool)
    with torch.no_grad():
        for start in range(0, states.frames, batch):
            part = slice(start, min(start + batch, states.frames))
            sub = RigState(states.b[part], states.gaze[part], states.R[part], states.t[part])
            ids = renderer.backend.triangle_ids(renderer.rig(sub), renderer.rig.triangles, cameras)
            hit[ids[ids >= 0].cpu().numpy()] = True
    return grow_rings(renderer.rig.triangles.cpu().numpy(), np.flatnonzero(hit), rings)
