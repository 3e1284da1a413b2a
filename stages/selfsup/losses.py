"""The self-supervision energy's terms, as small pure functions over torch tensors.

Shapes: B frames, C cameras, P keypoints, K regressed bases, S model pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rigs.definition import RigDefinition


@dataclass(frozen=True)
class RigIndex:
    """Index arrays that place regressed and eye-following shapes in rig order.

    Attributes:
        regressed: (K,) rig indices of the regressed shapes, in the network's order.
        eye_following: (E,) rig indices of the eye-following shapes.
        at_most: (Q, 2) positions *in the regressed order*: b[a] <= b[b].
        antagonistic: (R, 2) positions in the regressed order, never active together.
    """

    regressed: np.ndarray
    eye_following: np.ndarray
    at_most: np.ndarray
    antagonistic: np.ndarray

    @classmethod
    def of(cls, definition: RigDefinition) -> RigIndex:
        regressed = list(definition.regressed)

        def pairs(items) -> np.ndarray:
            kept = [(regressed.index(a), regressed.index(b)) for a, b in items if a in regressed and b in regressed]
            return np.array(kept, np.int64).reshape(-1, 2)

        return cls(
            regressed=definition.indices(regressed),
            eye_following=definition.indices(list(definition.eye_following)),
            at_most=pairs(definition.at_most), antagonistic=pairs(definition.antagonistic_pairs),
        )


def eye_following_from_gaze(gaze: torch.Tensor, definition: RigDefinition) -> torch.Tensor:
    """(B, 4) gaze -> (B, E) eye-following activations; torch twin of
    :meth:`RigDefinition.eye_following_from_gaze` (SPEC §3 convention), differentiable."""
    g = gaze / definition.gaze_theta_max
    yl, pl, yr, pr = g.unbind(-1)
    drive = {
        "eyeLookUp_L": pl, "eyeLookDown_L": -pl, "eyeLookOut_L": yl, "eyeLookIn_L": -yl,
        "eyeLookUp_R": pr, "eyeLookDown_R": -pr, "eyeLookOut_R": -yr, "eyeLookIn_R": yr,
    }
    return torch.stack([drive[n] for n in definition.eye_following], -1).clamp(0.0, 1.0)


def full_blendshapes(b: torch.Tensor, gaze: torch.Tensor, definition: RigDefinition, index: RigIndex) -> torch.Tensor:
    """(B, K) regressed weights and (B, 4) gaze -> (B, N) weights of every rig shape, rig order."""
    out = b.new_zeros(b.shape[0], definition.size)
    out = out.index_copy(1, torch.as_tensor(index.regressed, device=b.device), b)
    if len(index.eye_following):
        out = out.index_copy(1, torch.as_tensor(index.eye_following, device=b.device),
                             eye_following_from_gaze(gaze, definition).to(b.dtype))
    return out


def keypoint_loss(
    predicted: torch.Tensor, observed: torch.Tensor, confidence: torch.Tensor, huber_px: float = float("inf")
) -> torch.Tensor:
    """Confidence-weighted mean reprojection error over the detected points.

    Args:
        predicted: (B, C, P, 2) projected model keypoints, pixels.
        observed: (B, C, P, 2) detections, NaN where missing.
        confidence: (B, C, P) in [0, 1]; 0 where missing.
        huber_px: squared error below this distance, linear above (robust to a detector's
            gross outliers); inf = plain l2.

    Returns:
        () the weighted mean of 0.5 * d^2 (Huber-scaled above ``huber_px``); 0 with no points.
    """
    valid = torch.isfinite(observed).all(-1) & (confidence > 0)
    w = torch.where(valid, confidence, torch.zeros_like(confidence))
    diff = torch.where(valid[..., None], predicted - torch.nan_to_num(observed), torch.zeros_like(predicted))
    d2 = (diff**2).sum(-1)
    if np.isfinite(huber_px):
        d = torch.sqrt(d2 + 1e-12)
        rho = torch.where(d <= huber_px, 0.5 * d2, huber_px * (d - 0.5 * huber_px))
    else:
        rho = 0.5 * d2
    return (w * rho).sum() / w.sum().clamp_min(1e-6)


def sparsity_loss(b: torch.Tensor) -> torch.Tensor:
    """() the l1 norm of each frame's (K,) weights, averaged over the (B, K) batch's frames.

    Summed over bases, not averaged: a mean over K would divide each basis's pull toward
    zero by K (~45) and leave it far below the pixel term's, so spurious activations in
    neutral frames would cost almost nothing.
    """
    return b.abs().sum(-1).mean()


def constraint_loss(b: torch.Tensor, index: RigIndex) -> torch.Tensor:
    """() the rig definition's constraints as penalties on (B, K) regressed weights.

    at-most pairs (b_a <= b_b): squared excess; antagonistic pairs: the product b_a * b_b,
    which is zero exactly when one of them is off.
    """
    total = b.new_zeros(())
    if len(index.at_most):
        a, c = index.at_most[:, 0], index.at_most[:, 1]
        total = total + torch.relu(b[:, a] - b[:, c]).pow(2).sum(-1).mean()
    if len(index.antagonistic):
        a, c = index.antagonistic[:, 0], index.antagonistic[:, 1]
        total = total + (b[:, a] * b[:, c]).sum(-1).mean()
    return total
