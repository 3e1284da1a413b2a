"""The HMC renderer: posing, visibility, the differentiable surface pass and appearance.

Typical use (training loop of a per-subject network)::

    renderer = HmcRenderer.from_rig(rig, rig_cameras(hmc_rig), scale=0.25)   # 100 px
    out = renderer.render(state, appearance)        # RigState of F frames
    loss = masked_l2(out.ir, images, out.mask) + keypoint_l2(renderer.project(...), ...)
    loss.backward()                                 # gradients to state and appearance

Tensors follow the device of the renderer's buffers (``renderer.to("cuda")``); the only
host round trip is the visibility pass, which carries no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rigs.camera import Camera
from rigs.render.appearance import AppearanceModel
from rigs.render.cameras import CameraBatch
from rigs.render.posing import RigState, TorchRig
from rigs.render.surface import Surface, surface
from rigs.render.visibility import RaycastBackend, VisibilityBackend
from rigs.rig import BlendshapeRig


@dataclass
class RenderOutput:
    """Images of F frames in C cameras (background: 0, or the camera's level for ``ir``).

    Attributes:
        vertices: (F, n, 3) posed vertices, headset frame.
        surface: the per-hit samples (for custom losses).
        mask: (F, C, H, W) bool, the mesh is hit (no gradient).
        depth: (F, C, H, W) camera z, metres.
        normals: (F, C, H, W, 3) unit normals, headset frame.
        uv: (F, C, H, W, 2) texture coordinates.
        ir: (F, C, H, W) IR intensity in [0, 1], None without an appearance model.
    """

    vertices: torch.Tensor
    surface: Surface
    mask: torch.Tensor
    depth: torch.Tensor
    normals: torch.Tensor
    uv: torch.Tensor
    ir: torch.Tensor | None


class HmcRenderer(torch.nn.Module):
    """Renders a posed rig into a batch of calibrated cameras.

    Args:
        rig: the rig as tensors.
        cameras: the cameras (at render resolution).
        backend: the visibility backend; Open3D ray casting by default.
    """

    def __init__(self, rig: TorchRig, cameras: CameraBatch, backend: VisibilityBackend | None = None):
        super().__init__()
        self.rig = rig
        self.cameras = cameras
        self.backend = backend or RaycastBackend()
        model = rig.model
        corner_uv = np.asarray(model.uv)[np.asarray(model.triangle_uv)]
        self.register_buffer("corner_uv", torch.as_tensor(corner_uv, dtype=rig.neutral.dtype))
        self.register_buffer("candidates", None)  # (s,) triangle ids that may be seen; None = all

    def restrict(self, candidates: np.ndarray | torch.Tensor | None) -> None:
        """Renders only the triangles ``candidates`` (a potentially visible set,
        :mod:`rigs.render.visible_set`): the visibility pass and the normals skip the rest.
        Triangle ids stay those of the whole mesh. None renders every triangle again."""
        self.candidates = None if candidates is None else torch.as_tensor(
            np.asarray(candidates), dtype=torch.int64, device=self.rig.triangles.device)

    @classmethod
    def from_rig(cls, rig: BlendshapeRig, cameras: dict[str, Camera], scale: float = 1.0,
                 names: Sequence[str] | None = None, backend: VisibilityBackend | None = None,
                 dtype: torch.dtype = torch.float32) -> HmcRenderer:
        """A renderer of ``rig`` into ``cameras`` (``names`` of them) at ``scale`` x resolution."""
        return cls(TorchRig(rig, dtype), CameraBatch.from_dict(cameras, scale, names, dtype), backend)

    def visibility(self, vertices: torch.Tensor, cameras: CameraBatch | None = None) -> torch.Tensor:
        """(F, C, H, W) triangle ids (-1 background) of (F, n, 3) vertices; no gradient."""
        with torch.no_grad():
            if self.candidates is None:
                return self.backend.triangle_ids(vertices.detach(), self.rig.triangles, cameras or self.cameras)
            ids = self.backend.triangle_ids(vertices.detach(), self.rig.triangles.index_select(0, self.candidates),
                                            cameras or self.cameras)
            return torch.where(ids >= 0, self.candidates[ids.clamp_min(0)], ids)

    def surface(self, vertices: torch.Tensor, triangle_ids: torch.Tensor,
                cameras: CameraBatch | None = None) -> Surface:
        """The differentiable per-hit samples for fixed ``triangle_ids``."""
        shading = None if self.candidates is None else self.rig.triangles.index_select(0, self.candidates)
        return surface(vertices, self.rig.triangles, self.corner_uv, triangle_ids, cameras or self.cameras,
                       normal_triangles=shading)

    def render(self, state: RigState, appearance: AppearanceModel | None = None,
               cameras: CameraBatch | None = None, triangle_ids: torch.Tensor | None = None) -> RenderOutput:
        """Renders F frames.

        Args:
            state: the rig state (b, gaze, R, t), F frames.
            appearance: the IR appearance; None renders geometry only.
            cameras: a subset or other resolution (``self.cameras`` by default).
            triangle_ids: reuse a visibility pass (F, C, H, W); computed when None.

        Returns:
            The :class:`RenderOutput`.
        """
        cameras = cameras or self.cameras
        vertices = self.rig(state)
        ids = self.visibility(vertices, cameras) if triangle_ids is None else triangle_ids
        s = self.surface(vertices, ids, cameras)
        ir = None if appearance is None else appearance(s, self.rig.triangles, cameras)
        return RenderOutput(vertices, s, s.mask, s.image(s.depth), s.image(s.normal), s.image(s.uv), ir)

    def project(self, points: torch.Tensor, cameras: CameraBatch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixels (F, C, P, 2) and depths (F, C, P) of world points (F, P, 3) (keypoints)."""
        return (cameras or self.cameras).project(points)
