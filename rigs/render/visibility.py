"""Visibility backends: which triangle each pixel sees (the non-differentiable pass).

A backend answers one question: for every frame, camera and pixel centre, the id of the
first triangle hit (-1 for background). Everything differentiable happens afterwards in
:mod:`rigs.render.shading`, with these ids held fixed, so a backend may be anything fast.

Two are built in:

* :class:`RaycastBackend` (default): Open3D's BVH ray caster (:class:`rigs.raycast.Scene`)
  along each pixel's exact ray (lens distortion inverted by :mod:`rigs.lens`), so it
  agrees with the generator and with the shading pass's ray-triangle intersection.
* :class:`ZBufferBackend`: a vectorised numpy z-buffer over the projected (distorted)
  vertices. Triangle edges are straight in the distorted image, so along silhouettes it
  may differ from the ray caster by sub-pixel amounts where the lens bends the edges.

Another rasteriser plugs in by implementing :class:`VisibilityBackend` (see
docs/renderer.md): e.g. nvdiffrast's ``rasterize`` (its output's last channel is
triangle id + 1) or PyTorch3D's ``MeshRasterizer`` (``fragments.pix_to_face``), run in
the undistorted pinhole image of a slightly wider field of view and resampled at each
pixel's undistorted position (``CameraBatch.rays``), because neither models lens
distortion.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import torch

from pipeline.errors import ModelError
from rigs.render.cameras import CameraBatch
from rigs.uv_raster import triangle_pixels


def _check_finite(vertices: torch.Tensor) -> None:
    """Raises ModelError on NaN/inf vertices (a diverged fit; Open3D would crash on them)."""
    if not bool(torch.isfinite(vertices).all()):
        raise ModelError("cannot render non-finite vertices (did a fit diverge?)")


@runtime_checkable
class VisibilityBackend(Protocol):
    """Per-pixel triangle ids of posed meshes."""

    def triangle_ids(self, vertices: torch.Tensor, triangles: torch.Tensor, cameras: CameraBatch) -> torch.Tensor:
        """First triangle hit along each pixel's ray.

        Args:
            vertices: (F, n, 3) posed vertices in the cameras' world frame (no grad needed).
            triangles: (m, 3) int64 vertex ids.
            cameras: the C cameras, H x W pixels each.

        Returns:
            (F, C, H, W) int64 triangle ids, -1 where no triangle is hit, on
            ``vertices``' device.
        """
        ...


class RaycastBackend:
    """Open3D ray casting along the exact pixel rays (one BVH per frame, all cameras)."""

    def triangle_ids(self, vertices: torch.Tensor, triangles: torch.Tensor, cameras: CameraBatch) -> torch.Tensor:
        from rigs.raycast import Scene

        _check_finite(vertices)
        tris = triangles.cpu().numpy()
        dirs = cameras.rays.detach().cpu().numpy().astype(np.float64)
        origins = np.broadcast_to(cameras.centre.detach().cpu().numpy()[:, None, None], dirs.shape)
        out = [Scene(v, tris).cast(origins, dirs)["triangle"] for v in vertices.detach().cpu().numpy()]
        return torch.as_tensor(np.stack(out), device=vertices.device)


class ZBufferBackend:
    """A numpy z-buffer of the projected triangles (nearest by perspective-correct depth).

    Attributes:
        near: triangles with a corner closer than this (camera z, metres) are skipped.
    """

    def __init__(self, near: float = 1e-3):
        self.near = near

    def triangle_ids(self, vertices: torch.Tensor, triangles: torch.Tensor, cameras: CameraBatch) -> torch.Tensor:
        _check_finite(vertices)
        tris = triangles.cpu().numpy()
        verts = vertices.detach().cpu().numpy().astype(np.float64)
        out = np.stack([
            np.stack([self._one(cam.project(v), tris, cam.width, cam.height) for cam in cameras.cameras])
            for v in verts
        ])
        return torch.as_tensor(out, device=vertices.device)

    def _one(self, projected: tuple[np.ndarray, np.ndarray], tris: np.ndarray, w: int, h: int) -> np.ndarray:
        """(H, W) ids for one camera from its (pixels (n, 2), depth (n,)) of the vertices."""
        pix, z = projected
        ids = np.flatnonzero((z[tris] > self.near).all(1))
        corners, inv_z = pix[tris[ids]], 1.0 / z[tris[ids]]  # (t, 3, 2), (t, 3)
        kept, owner, pixel, bary = triangle_pixels(corners, w, h)
        ids, inv_z = ids[kept], inv_z[kept]
        inside = bary.min(1) >= 0
        owner, bary, pixel = owner[inside], bary[inside], pixel[inside]
        closeness = (bary * inv_z[owner]).sum(1)  # 1/z is affine in the pinhole image
        order = np.lexsort((ids[owner], -closeness, pixel))
        pixel, owner = pixel[order], owner[order]
        first = np.r_[True, pixel[1:] != pixel[:-1]]
        image = np.full(h * w, -1, np.int64)
        image[pixel[first]] = ids[owner[first]]
        return image.reshape(h, w)
