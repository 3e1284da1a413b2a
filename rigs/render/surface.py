"""The differentiable pass: with triangle ids fixed, where each pixel's ray meets its triangle.

For every hit pixel the ray (camera centre, the pixel's exact undistorted direction) is
intersected with its triangle in 3D (Moller-Trumbore). The barycentrics, the ray length
and the point are smooth functions of the triangle's vertices, so depth, normals, UVs and
any shading built on them carry gradients to the vertices and, through posing, to
(b, gaze, R, t). The mask has no gradient (the silhouette moves only through the
visibility pass); keypoint losses supply that signal.

Pixels are handled as a flat list of hits (``P`` of them over all frames and cameras),
which keeps memory proportional to the face area rather than to F x C x H x W.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rigs.render.cameras import CameraBatch


@dataclass
class Surface:
    """What each hit pixel sees (flat over frames, cameras and pixels).

    Attributes:
        shape: (F, C, H, W) of the images.
        index: (P,) int64 flat index into F*C*H*W of each hit pixel.
        frame: (P,) int64 frame of each hit.
        camera: (P,) int64 camera (batch position) of each hit.
        triangle: (P,) int64 triangle hit.
        barycentric: (P, 3) weights of the triangle's corners at the hit.
        point: (P, 3) hit point, world (headset) frame.
        distance: (P,) ray length from the camera centre, metres.
        depth: (P,) camera z of the hit, metres.
        normal: (P, 3) unit interpolated vertex normal.
        uv: (P, 2) interpolated texture coordinates.
        ray: (P, 3) unit direction of the pixel's ray, world frame (constant).
        radius: (P,) the pixel's radius from the principal point over the image's
            half-diagonal (the vignetting variable).
    """

    shape: tuple[int, int, int, int]
    index: torch.Tensor
    frame: torch.Tensor
    camera: torch.Tensor
    triangle: torch.Tensor
    barycentric: torch.Tensor
    point: torch.Tensor
    distance: torch.Tensor
    depth: torch.Tensor
    normal: torch.Tensor
    uv: torch.Tensor
    ray: torch.Tensor
    radius: torch.Tensor

    def image(self, values: torch.Tensor, fill: float | torch.Tensor = 0.0) -> torch.Tensor:
        """Per-hit values (P, ...) -> (F, C, H, W, ...) images, ``fill`` elsewhere.

        ``fill`` may be a (C,) tensor (one background level per camera, differentiable).
        """
        f, c, h, w = self.shape
        if torch.is_tensor(fill) and fill.dim() == 1:
            base = fill.to(values.dtype)[None, :, None, None].expand(f, c, h, w).reshape(-1)
            base = base.reshape(-1, *([1] * (values.dim() - 1))).expand(-1, *values.shape[1:])
        else:
            base = torch.full((f * c * h * w, *values.shape[1:]), float(fill), dtype=values.dtype, device=values.device)
        return base.index_put((self.index,), values).reshape(f, c, h, w, *values.shape[1:])

    @property
    def mask(self) -> torch.Tensor:
        """(F, C, H, W) bool, True where the mesh is hit."""
        f, c, h, w = self.shape
        out = torch.zeros(f * c * h * w, dtype=torch.bool, device=self.index.device)
        out[self.index] = True
        return out.reshape(f, c, h, w)


def vertex_normals(vertices: torch.Tensor, triangles: torch.Tensor) -> torch.Tensor:
    """(F, n, 3) unit area-weighted vertex normals of (F, n, 3) vertices."""
    v0, v1, v2 = (vertices.index_select(1, triangles[:, k]) for k in range(3))
    face = torch.cross(v1 - v0, v2 - v0, dim=-1)
    n = torch.zeros_like(vertices).index_add(1, triangles.T.reshape(-1), face.repeat(1, 3, 1))
    return n / n.norm(dim=-1, keepdim=True).clamp_min(1e-20)


def intersect(origin: torch.Tensor, direction: torch.Tensor, corners: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ray-triangle intersection on the triangle's plane (Moller-Trumbore, no inside test).

    Args:
        origin: (P, 3) ray origins.
        direction: (P, 3) unit ray directions.
        corners: (P, 3, 3) triangle corners [v0, v1, v2].

    Returns:
        (barycentric (P, 3) [1 - u - v, u, v], distance (P,) along the ray).
    """
    v0 = corners[:, 0]
    e1, e2 = corners[:, 1] - v0, corners[:, 2] - v0
    p = torch.cross(direction, e2, dim=-1)
    det = (e1 * p).sum(-1)
    det = torch.where(det.abs() < 1e-30, torch.full_like(det, 1e-30), det)
    s = origin - v0
    u = (s * p).sum(-1) / det
    q = torch.cross(s, e1, dim=-1)
    v = (direction * q).sum(-1) / det
    dist = (e2 * q).sum(-1) / det
    return torch.stack([1 - u - v, u, v], -1), dist


def surface(vertices: torch.Tensor, triangles: torch.Tensor, corner_uv: torch.Tensor,
            triangle_ids: torch.Tensor, cameras: CameraBatch, normal_triangles: torch.Tensor | None = None) -> Surface:
    """The differentiable surface samples of every hit pixel.

    Args:
        vertices: (F, n, 3) posed vertices, world frame (differentiable).
        triangles: (m, 3) int64.
        corner_uv: (m, 3, 2) texture coordinates of each triangle corner.
        triangle_ids: (F, C, H, W) int64 from a visibility backend (-1 = background).
        cameras: the C cameras the ids were computed for.
        normal_triangles: (m', 3) the triangles whose areas weight the vertex normals
            (default ``triangles``); a potentially visible set that holds every triangle
            around each hit gives the same normals for less work.

    Returns:
        The :class:`Surface`.
    """
    shape = tuple(triangle_ids.shape)
    flat = triangle_ids.reshape(-1)
    index = torch.nonzero(flat >= 0).squeeze(1)
    tri = flat[index]
    h, w = shape[2], shape[3]
    frame = index // (shape[1] * h * w)
    camera = (index // (h * w)) % shape[1]
    pixel = index % (h * w)
    in_batch = camera * (h * w) + pixel  # flat (camera, pixel): one index_select, not fancy indexing
    direction = cameras.rays.reshape(-1, 3).index_select(0, in_batch).to(vertices.dtype)
    origin = cameras.centre.index_select(0, camera).to(vertices.dtype)
    n = vertices.shape[1]
    flat_corner = (frame[:, None] * n + triangles.index_select(0, tri)).reshape(-1)  # (3P,)
    corners = vertices.reshape(-1, 3).index_select(0, flat_corner).reshape(-1, 3, 3)
    bary, dist = intersect(origin, direction, corners)
    point = origin + direction * dist[:, None]
    depth = ((point - origin) * cameras.R[:, :, 2].index_select(0, camera).to(vertices.dtype)).sum(-1)
    shaded = triangles if normal_triangles is None else normal_triangles
    normals = vertex_normals(vertices, shaded).reshape(-1, 3).index_select(0, flat_corner).reshape(-1, 3, 3)
    normal = (bary[..., None] * normals).sum(1)
    normal = normal / normal.norm(dim=-1, keepdim=True).clamp_min(1e-20)
    uv = (bary[..., None] * corner_uv.index_select(0, tri).to(vertices.dtype)).sum(1)
    radius = cameras.radius.reshape(-1).index_select(0, in_batch).to(vertices.dtype)
    return Surface(shape, index, frame, camera, tri, bary, point, dist, depth, normal, uv, direction, radius)
