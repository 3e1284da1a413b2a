"""Differentiable posing of a blendshape rig in the headset frame (torch).

The torch twin of :meth:`rigs.rig.BlendshapeRig.pose`: vertices are ``neutral + b @
deltas``, each eyeball turns rigidly about its centre with gaze (the rotation of
:func:`rigs.rig.gaze_rotation`), then the head is placed in the headset frame by
``x_headset = R x_head + t`` (the generator's convention for head pose / headset slip).
Everything is differentiable in (b, gaze, R, t) and follows the device and dtype of the
rig's tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rigs.rig import BlendshapeRig


@dataclass
class RigState:
    """The state of the rig for F frames (torch tensors on one device).

    Attributes:
        b: (F, K) blendshape activations, definition order.
        gaze: (F, 4) [left yaw, left pitch, right yaw, right pitch] radians.
        R: (F, 3, 3) head rotation, head frame -> headset frame.
        t: (F, 3) head translation in the headset frame, metres.
    """

    b: torch.Tensor
    gaze: torch.Tensor
    R: torch.Tensor
    t: torch.Tensor

    @property
    def frames(self) -> int:
        return int(self.b.shape[0])

    @classmethod
    def rest(cls, frames: int, k: int, dtype: torch.dtype = torch.float32,
             device: torch.device | str = "cpu") -> RigState:
        """Neutral expression, gaze ahead, head at the nominal donning (R = I, t = 0)."""
        z = dict(dtype=dtype, device=device)
        return cls(torch.zeros(frames, k, **z), torch.zeros(frames, 4, **z),
                   torch.eye(3, **z).expand(frames, 3, 3).clone(), torch.zeros(frames, 3, **z))


def gaze_rotation(yaw: torch.Tensor, pitch: torch.Tensor) -> torch.Tensor:
    """(..., 3, 3) eyeball rotations ``R_y(yaw) @ R_x(-pitch)`` (as :func:`rigs.rig.gaze_rotation`)."""
    cy, sy, cp, sp = torch.cos(yaw), torch.sin(yaw), torch.cos(pitch), torch.sin(pitch)
    zero = torch.zeros_like(yaw)
    rows = [
        torch.stack([cy, -sy * sp, sy * cp], -1),
        torch.stack([zero, cp, sp], -1),
        torch.stack([-sy, -cy * sp, cy * cp], -1),
    ]
    return torch.stack(rows, -2)


def quaternion_to_matrix(q: torch.Tensor) -> torch.Tensor:
    """(..., 4) quaternions (w, x, y, z), any norm -> (..., 3, 3) rotation matrices."""
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    rows = [
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)], -1),
        torch.stack([2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)], -1),
        torch.stack([2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1),
    ]
    return torch.stack(rows, -2)


def rotvec_to_matrix(v: torch.Tensor) -> torch.Tensor:
    """(..., 3) rotation vectors (axis * angle, radians) -> (..., 3, 3), Rodrigues.

    Smooth at zero (series for the small-angle coefficients), so it can parametrise a
    rotation update that starts at zero.
    """
    theta2 = (v * v).sum(-1, keepdim=True)[..., None]  # (..., 1, 1)
    small = theta2 < 1e-8
    safe = torch.where(small, torch.ones_like(theta2), theta2)
    theta = safe.sqrt()
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / safe)
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([torch.stack([zero, -z, y], -1), torch.stack([z, zero, -x], -1),
                     torch.stack([-y, x, zero], -1)], -2)
    eye = torch.eye(3, dtype=v.dtype, device=v.device).expand_as(k)
    return eye + a * k + b * (k @ k)


class TorchRig(torch.nn.Module):
    """A :class:`BlendshapeRig` as tensors (buffers: ``.to(device)`` moves it).

    Attributes:
        neutral: (n, 3) neutral vertices, head frame, metres.
        deltas: (K, n, 3) blendshape offsets.
        triangles: (m, 3) int64 vertex ids.
        eye_ids: (2, e) int64 eyeball vertex ids [left, right] (equal sizes: ICT's are).
        eye_centres: (2, 3) eyeball rotation centres of this rig's neutral.
    """

    def __init__(self, rig: BlendshapeRig, dtype: torch.dtype = torch.float32):
        super().__init__()
        left, right = rig.eyeball_vertices
        self.register_buffer("neutral", torch.as_tensor(rig.neutral, dtype=dtype))
        self.register_buffer("deltas", torch.as_tensor(rig.deltas, dtype=dtype))
        self.register_buffer("triangles", torch.as_tensor(rig.model.triangles, dtype=torch.int64))
        self.register_buffer("eye_left", torch.as_tensor(left, dtype=torch.int64))
        self.register_buffer("eye_right", torch.as_tensor(right, dtype=torch.int64))
        self.register_buffer("eye_centres", torch.as_tensor(rig.eye_centres(), dtype=dtype))
        self.definition = rig.definition
        self.model = rig.model
        self.correction = None  # a NeutralCorrection (rigs/render/correction.py) when learnt

    @property
    def size(self) -> int:
        """K, the number of blendshapes."""
        return int(self.deltas.shape[0])

    def expression(self, b: torch.Tensor, gaze: torch.Tensor | None = None,
                   vertices: torch.Tensor | None = None) -> torch.Tensor:
        """(F, n, 3) head-frame vertices for b (F, K) and gaze (F, 4) (None: at rest); with
        ``vertices`` ((m,) int64 ids) only those, (F, m, 3): posing a few points (keypoints)
        then costs a few points, not the mesh."""
        neutral = self.neutral if self.correction is None else self.neutral + self.correction.offset()
        deltas = self.deltas
        if vertices is not None:
            neutral, deltas = neutral.index_select(0, vertices), deltas.index_select(1, vertices)
        verts = neutral + torch.einsum("fk,knc->fnc", b.to(deltas.dtype), deltas)
        if gaze is None:
            return verts
        positions, parts = [], []
        for eye, ids in enumerate((self.eye_left, self.eye_right)):
            if vertices is not None:  # where this eye's vertices sit among ``vertices``
                ids = torch.nonzero(torch.isin(vertices, ids)).squeeze(1)
                if not len(ids):
                    continue
            rot = gaze_rotation(gaze[:, 2 * eye], gaze[:, 2 * eye + 1]).to(verts.dtype)  # (F, 3, 3)
            centre = self.eye_centres[eye]
            parts.append(torch.einsum("fij,fvj->fvi", rot, verts[:, ids] - centre) + centre)
            positions.append(ids)
        if not parts:
            return verts
        return verts.index_copy(1, torch.cat(positions), torch.cat(parts, 1))

    def forward(self, state: RigState, vertices: torch.Tensor | None = None) -> torch.Tensor:
        """(F, n, 3) vertices in the headset frame: ``R (neutral + b deltas, eyes turned) + t``;
        with ``vertices`` only those ids, (F, m, 3)."""
        verts = self.expression(state.b, state.gaze, vertices)
        return torch.einsum("fij,fvj->fvi", state.R.to(verts.dtype), verts) + state.t.to(verts.dtype)[:, None]
