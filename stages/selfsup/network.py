"""The per-subject network: HMC views of one frame -> rig state (b, gaze, R, t).

One convolutional encoder, shared by every camera (mirrored cameras arrive flipped, so a
left and a right camera look alike), plus a learned per-camera embedding; the cameras'
features are concatenated and a small MLP regresses the state. Outputs are bounded by
construction: b in [0, 1] (sigmoid), gaze within +-``gaze_limit_rad`` (tanh), the head
rotation as a 6D vector turned into a rotation matrix (Zhou et al. 2019) around the
nominal donning, and the translation within +-``translation_limit_m``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NetworkConfig:
    """Size of the per-subject network."""

    width: int = 16
    """Channels of the encoder's first block; each of the 4 blocks doubles it. >= 4."""
    feature_dim: int = 64
    """Features each camera contributes to the regression head. >= 8."""
    hidden_dim: int = 256
    """Width of the regression head's hidden layer. >= 16."""
    gaze_limit_rad: float = 0.6
    """Largest gaze yaw or pitch the network can output, radians (0.6 = 34 degrees)."""
    translation_limit_m: float = 0.02
    """Largest head translation from the nominal donning per axis, metres."""
    initial_b_logit: float = -3.0
    """Bias of the blendshape outputs at start: sigmoid(-3) = 0.05, near the neutral face."""


@dataclass(frozen=True)
class NetworkOutput:
    """A batch of the network's outputs (the renderer's state is built from them).

    Attributes:
        b: (B, K) weights in [0, 1] of the regressed bases (network order = the definition's regressed order).
        gaze: (B, 4) left yaw, left pitch, right yaw, right pitch, radians.
        rotation: (B, 3, 3) head rotation, head -> headset frame.
        translation: (B, 3) head translation in the headset frame, metres.
    """

    b: torch.Tensor
    gaze: torch.Tensor
    rotation: torch.Tensor
    translation: torch.Tensor


def rotation_from_6d(x: torch.Tensor) -> torch.Tensor:
    """(..., 6) -> (..., 3, 3) rotation matrices by Gram-Schmidt on two column vectors."""
    a, b = x[..., :3], x[..., 3:]
    c1 = nn.functional.normalize(a, dim=-1)
    b = b - (c1 * b).sum(-1, keepdim=True) * c1
    c2 = nn.functional.normalize(b, dim=-1)
    c3 = torch.cross(c1, c2, dim=-1)
    return torch.stack([c1, c2, c3], dim=-1)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.GroupNorm(4, c_out), nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1), nn.GroupNorm(4, c_out), nn.SiLU(),
    )


class StateNetwork(nn.Module):
    """(B, C, S, S) images in [0, 1] -> :class:`NetworkOutput`.

    Args:
        n_cameras: C, the cameras in a fixed order.
        n_bases: K, the regressed blendshapes.
        config: sizes and output limits.
    """

    def __init__(self, n_cameras: int, n_bases: int, config: NetworkConfig = NetworkConfig()):
        super().__init__()
        w = config.width
        self.config = config
        self.encoder = nn.Sequential(
            _block(1, w), _block(w, 2 * w), _block(2 * w, 4 * w), _block(4 * w, 8 * w),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * w * 4, config.feature_dim),
        )
        self.camera_embedding = nn.Parameter(torch.zeros(n_cameras, config.feature_dim))
        self.head = nn.Sequential(
            nn.Linear(n_cameras * config.feature_dim, config.hidden_dim), nn.SiLU(),
            nn.Linear(config.hidden_dim, n_bases + 4 + 6 + 3),
        )
        last = self.head[-1]
        nn.init.zeros_(last.weight)
        with torch.no_grad():
            last.bias.zero_()
            last.bias[:n_bases] = config.initial_b_logit
            # Identity rotation: the 6D vector (1, 0, 0, 0, 1, 0).
            last.bias[n_bases + 4] = 1.0
            last.bias[n_bases + 8] = 1.0
        self.n_bases = n_bases

    def forward(self, images: torch.Tensor) -> NetworkOutput:
        b_, c, s, _ = images.shape
        features = self.encoder(images.reshape(b_ * c, 1, s, s)).reshape(b_, c, -1)
        out = self.head((features + self.camera_embedding).reshape(b_, -1))
        k = self.n_bases
        cfg = self.config
        return NetworkOutput(
            b=torch.sigmoid(out[:, :k]),
            gaze=cfg.gaze_limit_rad * torch.tanh(out[:, k:k + 4]),
            rotation=rotation_from_6d(out[:, k + 4:k + 10]),
            translation=cfg.translation_limit_m * torch.tanh(out[:, k + 10:k + 13]),
        )
