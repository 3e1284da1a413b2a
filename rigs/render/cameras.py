"""A batch of calibrated cameras as tensors: differentiable projection, fixed pixel rays.

The cameras are :class:`rigs.camera.Camera` objects (pinhole intrinsics plus an OpenCV
lens of :mod:`rigs.lens`), optionally rescaled to a lower render resolution with
:meth:`rigs.camera.Camera.scaled`. Pixel rays depend on the calibration only, so they are
computed once with the exact numpy undistortion of :mod:`rigs.lens` and kept as constant
buffers; projection (for keypoints) is torch and differentiable in the points.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.errors import ModelError
from rigs.camera import Camera


def _opencv_distort(xy: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(..., 2) undistorted normalised coords -> distorted, coefficients (..., 5) k1 k2 p1 p2 k3."""
    k1, k2, p1, p2, k3 = c.unbind(-1)
    x, y = xy.unbind(-1)
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
    return torch.stack([xd, yd], -1)


def _fisheye_distort(p: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(..., 3) camera-frame points -> distorted normalised coords, Kannala-Brandt (..., 4)."""
    r = torch.sqrt(p[..., 0] ** 2 + p[..., 1] ** 2 + 1e-30)
    theta = torch.atan2(r, p[..., 2])
    t2 = theta * theta
    k1, k2, k3, k4 = c.unbind(-1)
    theta_d = theta * (1 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4))))
    return p[..., :2] * (theta_d / r)[..., None]


class CameraBatch(torch.nn.Module):
    """C cameras of equal image size, as buffers.

    Attributes:
        names: camera names, in batch order.
        width, height: image size in pixels (common to all cameras).
        R: (C, 3, 3) world-from-camera rotations.
        centre: (C, 3) camera centres in the world (headset) frame.
        focal: (C, 2) fx, fy.
        principal: (C, 2) cx, cy.
        distortion: (C, 5) opencv or (C, 4) fisheye coefficients.
        rays: (C, H, W, 3) unit world directions through the pixel centres.
        radius: (C, H, W) each pixel's distance from the principal point over the image's
            half-diagonal (about 1 in the corners), the variable of the vignetting polynomial.
    """

    def __init__(self, cameras: Sequence[Camera], names: Sequence[str] | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if not cameras:
            raise ModelError("a camera batch needs at least one camera")
        sizes = {(c.width, c.height) for c in cameras}
        models = {c.model for c in cameras}
        if len(sizes) != 1 or len(models) != 1:
            raise ModelError(f"batched cameras need one image size and lens model, got {sizes}, {models}")
        self.names = tuple(names) if names is not None else tuple(f"cam{i}" for i in range(len(cameras)))
        (self.width, self.height), (self.model,) = sizes.pop(), models
        rays, radius = [], []
        for cam in cameras:
            d_cam, valid = cam.unproject()
            if not valid.all():
                raise ModelError(f"camera {cam}: {int((~valid).sum())} pixels outside the lens's invertible region")
            rays.append(d_cam @ cam.R_world_from_camera.T)
            v, u = np.mgrid[0 : cam.height, 0 : cam.width].astype(np.float64)
            radius.append(np.hypot(u - cam.cx, v - cam.cy) / np.hypot(cam.width / 2, cam.height / 2))
        f = dict(dtype=dtype)
        self.register_buffer("R", torch.as_tensor(np.stack([c.R_world_from_camera for c in cameras]), **f))
        self.register_buffer("centre", torch.as_tensor(np.stack([c.t_world_from_camera for c in cameras]), **f))
        self.register_buffer("focal", torch.as_tensor([[c.fx, c.fy] for c in cameras], **f))
        self.register_buffer("principal", torch.as_tensor([[c.cx, c.cy] for c in cameras], **f))
        self.register_buffer("distortion", torch.as_tensor(np.stack([c.distortion for c in cameras]), **f))
        self.register_buffer("rays", torch.as_tensor(np.stack(rays), **f))
        self.register_buffer("radius", torch.as_tensor(np.stack(radius), **f))
        self.cameras = tuple(cameras)

    @classmethod
    def from_dict(cls, cameras: dict[str, Camera], scale: float = 1.0, names: Sequence[str] | None = None,
                  dtype: torch.dtype = torch.float32) -> CameraBatch:
        """The cameras ``names`` (all, in dict order, by default) at ``scale`` x their resolution."""
        names = list(cameras) if names is None else list(names)
        missing = [n for n in names if n not in cameras]
        if missing:
            raise ModelError(f"no cameras named {missing}; have {list(cameras)}")
        cams = [cameras[n] if scale == 1.0 else cameras[n].scaled(scale) for n in names]
        return cls(cams, names, dtype)

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, names: Sequence[str]) -> CameraBatch:
        """The cameras ``names`` of this batch, same resolution."""
        index = {n: i for i, n in enumerate(self.names)}
        cams = [self.cameras[index[n]] for n in names]
        return CameraBatch(cams, names, self.R.dtype).to(self.R.device)

    def to_camera(self, points: torch.Tensor) -> torch.Tensor:
        """(F, P, 3) world points -> (F, C, P, 3) camera-frame points."""
        return torch.einsum("fpj,cji->fcpi", points, self.R) - torch.einsum("cj,cji->ci", self.centre, self.R)[:, None]

    def project(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Projects world points into every camera, with lens distortion (differentiable).

        Args:
            points: (F, P, 3) world (headset-frame) points.

        Returns:
            (pixels (F, C, P, 2), depth (F, C, P)); depth is camera z (<= 0: behind). The
            opencv model's pixels are finite but meaningless for depth < 1 mm (z is
            clamped there so that gradients stay finite): mask such points by depth.
        """
        pc = self.to_camera(points)
        z = pc[..., 2]
        if self.model == "opencv":
            xd = _opencv_distort(pc[..., :2] / z.clamp_min(1e-3)[..., None], self.distortion[:, None])
        else:
            xd = _fisheye_distort(pc, self.distortion[:, None])
        return xd * self.focal[:, None] + self.principal[:, None], z
