"""A smooth per-subject correction of a rig's neutral, learnt with the labels.

The personal rig comes from phone scans and carries their error (about 1.5 mm per vertex
on a `tiny` subject, lips 2 mm apart where the truth's are closed; docs/selfsup.md). A
labeller that can only move blendshapes explains that constant misfit with constant
blendshape activations: a squint held through every neutral frame. This module gives the
constant part a place of its own: an offset field added to the neutral before the
blendshapes, the same for every frame, kept small and smooth by its prior so that it
cannot take over what changes from frame to frame. Eyeball vertices never move (they turn
rigidly with gaze).
"""

from __future__ import annotations

import numpy as np
import torch

#: Offsets are ``parameter * SCALE`` metres, so that Adam's step (~learning rate in
#: parameter units) moves a vertex by ~10 micrometres at a learning rate of 1e-3.
SCALE = 0.01


def uniform_laplacian(triangles: np.ndarray, n_vertices: int) -> torch.Tensor:
    """(n, n) sparse uniform graph Laplacian ``x_i - mean of the neighbours of i``.

    Args:
        triangles: (m, 3) int vertex ids.
        n_vertices: n.
    """
    import scipy.sparse as sp

    t = np.asarray(triangles, np.int64)
    i = np.concatenate([t[:, 0], t[:, 1], t[:, 2], t[:, 1], t[:, 2], t[:, 0]])
    j = np.concatenate([t[:, 1], t[:, 2], t[:, 0], t[:, 0], t[:, 1], t[:, 2]])
    adjacency = sp.coo_matrix((np.ones(len(i)), (i, j)), shape=(n_vertices, n_vertices)).tocsr()
    adjacency.data[:] = 1.0
    degree = np.asarray(adjacency.sum(1)).ravel()
    inv = np.where(degree > 0, 1.0 / np.maximum(degree, 1), 0.0)
    lap = (sp.identity(n_vertices) - sp.diags(inv) @ adjacency).tocoo()
    idx = torch.as_tensor(np.vstack([lap.row, lap.col]), dtype=torch.int64)
    return torch.sparse_coo_tensor(idx, torch.as_tensor(lap.data, dtype=torch.float32), lap.shape,
                                   check_invariants=False).coalesce()


class NeutralCorrection(torch.nn.Module):
    """A trainable (n, 3) offset of the rig's neutral, zero on held vertices.

    Args:
        triangles: (m, 3) the rig's triangles (for the smoothness prior).
        n_vertices: n.
        held: vertex ids that never move (eyeballs).
        smoothness: weight of the Laplacian term in :meth:`prior` against the magnitude term.
        freedom: (n,) in [0, 1], how much of its offset each vertex takes (a taper that
            holds a region, e.g. :func:`eyelid_freedom`); None = 1 everywhere.
    """

    def __init__(self, triangles: np.ndarray, n_vertices: int, held: np.ndarray, smoothness: float = 100.0,
                 freedom: np.ndarray | None = None):
        super().__init__()
        self.parameter = torch.nn.Parameter(torch.zeros(n_vertices, 3))
        mask = torch.ones(n_vertices, 1) if freedom is None else torch.as_tensor(
            np.clip(np.asarray(freedom, np.float32), 0.0, 1.0)).reshape(n_vertices, 1).clone()
        mask[torch.as_tensor(np.asarray(held, np.int64))] = 0.0
        self.register_buffer("mask", mask)
        self.laplacian = uniform_laplacian(triangles, n_vertices)
        self.smoothness = smoothness

    def offset(self) -> torch.Tensor:
        """(n, 3) metres."""
        return self.parameter * self.mask * SCALE

    def prior(self) -> torch.Tensor:
        """() mean squared offset in mm^2 plus ``smoothness`` x the mean squared Laplacian."""
        mm = self.offset() * 1000.0
        lap = torch.sparse.mm(self.laplacian.to(device=mm.device, dtype=mm.dtype), mm)
        return (mm**2).sum(-1).mean() + self.smoothness * (lap**2).sum(-1).mean()

    def summary(self) -> dict[str, float]:
        """Mean / max offset length in mm (reported with the labels)."""
        with torch.no_grad():
            length = self.offset().norm(dim=-1) * 1000.0
        return {"neutral_correction_mean_mm": float(length.mean()), "neutral_correction_max_mm": float(length.max())}


def eyelid_freedom(neutral: np.ndarray, lid_vertices: np.ndarray, radius_m: float) -> np.ndarray:
    """(n,) 0 at the eyelids rising linearly to 1 at ``radius_m`` from the nearest lid vertex.

    Blinks live in the lids: a constant offset there can hold an eye half closed in every
    frame, which is what the labels' blendshapes should say.

    Args:
        neutral: (n, 3) the rig's neutral vertices, metres.
        lid_vertices: (p,) vertex ids on the lids (e.g. the 68-point eye contours).
        radius_m: > 0.
    """
    from scipy.spatial import cKDTree

    distance, _ = cKDTree(np.asarray(neutral)[np.asarray(lid_vertices, np.int64)]).query(np.asarray(neutral))
    return np.clip(distance / radius_m, 0.0, 1.0).astype(np.float32)
