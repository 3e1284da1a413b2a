"""The estimated IR appearance: albedo in UV, a fitted light, per-camera response.

Nothing here is the generator's image formation: every factor is a parameter with a
generic initial value, fitted to the subject's HMC images (:mod:`rigs.render.fit`).
For a hit pixel with albedo ``a``, surface normal ``n``, light direction ``l`` and light
distance ``d``, seen by camera ``c`` at image radius ``r`` (from the principal point, over
the half-diagonal: ~1 in the corners)::

    a      = offset + seed ** e_a + residual(uv)          (atlas texels; seed from the phone)
    a      = vertex_albedo                                 (triangles outside the atlas: eyes)
    shade  = ambient + max(0, (n.l + wrap) / (1 + wrap)) ** e_l
    L      = a * shade * (d_ref / d) ** p
    V_c(r) = cos(theta) ** k_c * (1 + v1 r^2 + v2 r^4 + v3 r^6)
    I      = clip(gain_c * (L * V_c(r)) ** g + bias_c, 0, 1)  ; background_c off the mesh

where theta is the pixel ray's angle to the optical axis: the exponent k_c of the
off-axis (natural) falloff and the polynomial of the lens's own vignetting are both
fitted per camera, from k_c = 0 and a flat polynomial. The light of camera c sits at the camera centre plus a fitted offset (camera frame): a
co-located LED is the starting guess, not an assumption. ``d_ref`` (0.1 m) only sets the
units of ``gain``. Positive quantities are stored as logs so that Adam can move them freely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from rigs.render.albedo import luminance_seed
from rigs.render.cameras import CameraBatch
from rigs.render.surface import Surface

#: Distance at which the falloff term is 1 (metres); a unit choice, absorbed by the gains.
D_REF = 0.1
#: Parameter groups that :func:`rigs.render.fit.fit_appearance` can free.
LIGHT = ("light_offset", "log_falloff", "log_ambient", "wrap", "log_lambert")
CAMERA = ("log_gain", "bias", "off_axis", "vignette", "log_response", "background")
#: The albedo's global map from the seed (always fitted) and its per-texel parts (optional).
ALBEDO_MAP = ("log_albedo_exponent", "albedo_offset")
ALBEDO = ("albedo_residual", "vertex_albedo")


class AppearanceModel(torch.nn.Module):
    """Per-subject IR appearance (parameters listed in the module docstring).

    Args:
        camera_names: the rig's cameras; per-camera parameters follow this order.
        seed: (h, tiles * h) albedo seed in UV (luminance of the phone texture).
        confidence: (h, tiles * h) seed confidence in [0, 1] (0 = unseen, filled).
        in_atlas: (m,) bool, triangles whose albedo comes from the UV map (the others,
            e.g. eyeballs, use ``vertex_albedo``).
        n_vertices: vertex count of the mesh.
    """

    def __init__(self, camera_names: Sequence[str], seed: np.ndarray, confidence: np.ndarray,
                 in_atlas: np.ndarray, n_vertices: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        c = len(camera_names)
        self.camera_names = tuple(camera_names)
        self.tiles = int(seed.shape[1] // seed.shape[0])
        f = dict(dtype=dtype)

        def param(value: object) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.as_tensor(value, **f).clone())

        self.register_buffer("albedo_seed", torch.as_tensor(seed, **f)[None, None])
        self.register_buffer("albedo_confidence", torch.as_tensor(confidence, **f)[None, None])
        self.register_buffer("in_atlas", torch.as_tensor(in_atlas, dtype=torch.bool))
        seen = confidence > 0
        typical = float(np.median(seed[seen])) if seen.any() else 0.5
        self.albedo_residual = param(np.zeros_like(seed))
        self.log_albedo_exponent = param(0.0)
        self.albedo_offset = param(0.0)
        self.vertex_albedo = param(np.full(n_vertices, typical))
        self.light_offset = param(np.zeros((c, 3)))
        self.log_falloff = param(math.log(2.0))  # a point source's inverse square, to start
        self.log_ambient = param(math.log(0.1))
        self.wrap = param(0.0)
        self.log_lambert = param(0.0)
        self.log_gain = param(np.zeros(c))
        self.bias = param(np.zeros(c))
        self.off_axis = param(np.zeros(c))
        self.vignette = param(np.zeros((c, 3)))
        self.log_response = param(0.0)
        self.background = param(np.zeros(c))

    @classmethod
    def from_texture(cls, camera_names: Sequence[str], rgb_linear: np.ndarray, confidence: np.ndarray,
                     in_atlas: np.ndarray, n_vertices: int, resolution: int | None = 256,
                     dtype: torch.dtype = torch.float32) -> AppearanceModel:
        """Seeds the albedo from a linear RGB UV texture and its confidence.

        Args:
            rgb_linear: (H, tiles * H, 3) linear RGB, e.g. ``UvTexture.image()[0]``.
            confidence: (H, tiles * H) observation weight (``UvTexture.weight``).
            resolution: texels per tile of the albedo map (a divisor of H); None keeps H.
        """
        seed, conf = luminance_seed(rgb_linear, confidence, resolution)
        return cls(camera_names, seed, conf, in_atlas, n_vertices, dtype)

    def groups(self, *names: str) -> list[torch.nn.Parameter]:
        """The parameters called ``names`` (see LIGHT, CAMERA, ALBEDO)."""
        return [getattr(self, n) for n in names]

    def camera_index(self, cameras: CameraBatch) -> torch.Tensor:
        """(C,) positions of ``cameras`` in this model's per-camera parameters."""
        return torch.as_tensor([self.camera_names.index(n) for n in cameras.names], device=self.log_gain.device)

    def sample_map(self, s: Surface, texture: torch.Tensor) -> torch.Tensor:
        """(P,) bilinear look-up of a (1, 1, h, w) UV map at each hit's UV."""
        grid = torch.stack([s.uv[:, 0] / self.tiles * 2 - 1, 1 - 2 * s.uv[:, 1]], -1).to(texture.dtype)
        # A line search can try wild states: NaN or far-out coordinates crash grid_sample's
        # backward, so keep them finite and just outside the map (border value, no gradient).
        grid = torch.nan_to_num(grid, nan=0.0).clamp(-1.1, 1.1)
        return F.grid_sample(texture, grid[None, None], mode="bilinear", padding_mode="border",
                             align_corners=False)[0, 0, 0]

    def albedo(self, s: Surface, triangles: torch.Tensor) -> torch.Tensor:
        """(P,) IR albedo of each hit: the UV map on atlas triangles, vertex values elsewhere."""
        mapped = self.albedo_seed.clamp_min(1e-6) ** self.log_albedo_exponent.exp() + self.albedo_residual
        sampled = self.sample_map(s, mapped) + self.albedo_offset
        corner = self.vertex_albedo[triangles[s.triangle]]  # (P, 3)
        per_vertex = (s.barycentric.to(corner.dtype) * corner).sum(-1)
        return torch.where(self.in_atlas[s.triangle], sampled, per_vertex)

    def intensity(self, s: Surface, triangles: torch.Tensor, cameras: CameraBatch) -> torch.Tensor:
        """(P,) image intensity of each hit before clipping."""
        cam = self.camera_index(cameras)[s.camera]  # per hit, into the parameters
        light = cameras.centre[s.camera] + torch.einsum("pij,pj->pi", cameras.R[s.camera], self.light_offset[cam])
        to_light = light.to(s.point.dtype) - s.point
        dist = to_light.norm(dim=-1).clamp_min(1e-6)
        cos = (s.normal * to_light).sum(-1) / dist
        wrap = self.wrap.clamp(0.0, 1.0)
        lambert = ((cos + wrap) / (1 + wrap)).clamp_min(1e-12) ** self.log_lambert.exp()
        shade = self.log_ambient.exp() + lambert
        radiance = self.albedo(s, triangles) * shade * (D_REF / dist) ** self.log_falloff.exp()
        r2 = s.radius * s.radius
        v = self.vignette[cam]
        cos_axis = (s.ray * cameras.R[s.camera, :, 2]).sum(-1).clamp_min(1e-6)
        vignetting = cos_axis ** self.off_axis[cam] * (1 + r2 * (v[:, 0] + r2 * (v[:, 1] + r2 * v[:, 2])))
        signal = (radiance * vignetting).clamp_min(1e-8) ** self.log_response.exp()
        return self.log_gain[cam].exp() * signal + self.bias[cam]

    def forward(self, s: Surface, triangles: torch.Tensor, cameras: CameraBatch) -> torch.Tensor:
        """(F, C, H, W) IR images in [0, 1]: the mesh shaded, each camera's background elsewhere."""
        background = self.background[self.camera_index(cameras)]
        return s.image(self.intensity(s, triangles, cameras), background).clamp(0.0, 1.0)

    def prior_loss(self, smoothness: float = 1.0, confidence: float = 1.0) -> torch.Tensor:
        """Regulariser of the albedo residual: squared finite differences (smoothness) and
        its size where the phone saw the texel well (confidence-weighted L2)."""
        r = self.albedo_residual
        dx = (r[..., :, 1:] - r[..., :, :-1]).pow(2).mean()
        dy = (r[..., 1:, :] - r[..., :-1, :]).pow(2).mean()
        return smoothness * (dx + dy) + confidence * (self.albedo_confidence * r * r).mean()
