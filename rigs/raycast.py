"""The rasterizer: per-pixel triangle ids, barycentrics and depth by ray casting.

Open3D's ``RaycastingScene`` builds a BVH over the posed mesh once per frame; every camera
of that frame then casts its pixel rays into it. Shaders (``rigs/shading.py``) turn the
resulting :class:`GBuffer` into images: renderer = rasterizer + shader.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rigs.camera import Camera


@dataclass(frozen=True, eq=False)
class GBuffer:
    """What each pixel sees.

    Attributes:
        triangle: (H, W) int64 triangle id, -1 where the ray hit nothing of the mesh.
        barycentric: (H, W, 3) float32 weights of the triangle's corners.
        distance: (H, W) float32 ray length to the hit (inf where none), metres.
        depth: (H, W) float32 camera-z of the hit (inf where none), metres.
        points: (H, W, 3) float32 world position of the hit (nan where none).
        directions: (H, W, 3) float32 unit ray directions (world).
        geometry: (H, W) int64 which added geometry was hit (0 = the mesh), -1 none.
    """

    triangle: np.ndarray
    barycentric: np.ndarray
    distance: np.ndarray
    depth: np.ndarray
    points: np.ndarray
    directions: np.ndarray
    geometry: np.ndarray

    @property
    def hit(self) -> np.ndarray:
        return self.triangle >= 0

    def interpolate(self, triangles: np.ndarray, vertex_values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Interpolates per-vertex values over the image.

        Args:
            triangles: (m, 3) triangles of the mesh (geometry 0).
            vertex_values: (n, C) per-vertex values.
            fill: value where the mesh was not hit.

        Returns:
            (H, W, C) float32.
        """
        out = np.full((*self.triangle.shape, vertex_values.shape[1]), fill, np.float32)
        mask = self.hit
        corners = vertex_values[triangles[self.triangle[mask]]]  # (p, 3, C)
        out[mask] = np.einsum("pkc,pk->pc", corners, self.barycentric[mask])
        return out


class Scene:
    """A posed triangle mesh (plus optional static extras such as a wall) ready for rays."""

    def __init__(self, vertices: np.ndarray, triangles: np.ndarray, extras: list[tuple[np.ndarray, np.ndarray]] = ()):
        import open3d as o3d

        self._o3d = o3d
        self.vertices = np.asarray(vertices, np.float32)
        self.triangles = np.asarray(triangles)
        self.scene = o3d.t.geometry.RaycastingScene()
        self.scene.add_triangles(o3d.core.Tensor(self.vertices), o3d.core.Tensor(self.triangles.astype(np.uint32)))
        for v, t in extras:
            self.scene.add_triangles(
                o3d.core.Tensor(np.asarray(v, np.float32)), o3d.core.Tensor(np.asarray(t, np.uint32))
            )

    def cast(self, origins: np.ndarray, directions: np.ndarray) -> dict[str, np.ndarray]:
        """Casts rays (..., 3) + (..., 3). Returns t, triangle, barycentric, geometry arrays."""
        shape = origins.shape[:-1]
        rays = np.concatenate([origins, directions], -1).reshape(-1, 6).astype(np.float32)
        res = self.scene.cast_rays(self._o3d.core.Tensor(rays))
        t = res["t_hit"].numpy().reshape(shape)
        geometry = res["geometry_ids"].numpy().astype(np.int64).reshape(shape)
        prim = res["primitive_ids"].numpy().astype(np.int64).reshape(shape)
        uv = res["primitive_uvs"].numpy().reshape(*shape, 2)
        invalid = np.uint32(self._o3d.t.geometry.RaycastingScene.INVALID_ID)
        none = res["geometry_ids"].numpy().reshape(shape) == invalid
        geometry[none] = -1
        bary = np.concatenate([1.0 - uv.sum(-1, keepdims=True), uv], -1).astype(np.float32)
        triangle = np.where(geometry == 0, prim, -1)
        return {"t": t, "triangle": triangle, "barycentric": bary, "geometry": geometry}

    def render(self, camera: Camera) -> GBuffer:
        """Ray-casts every pixel of ``camera`` (its world frame = the mesh's frame)."""
        origins, dirs = camera.pixel_rays()
        return make_gbuffer(camera, origins, dirs, self.cast(origins, dirs))


def make_gbuffer(camera: Camera, origins: np.ndarray, dirs: np.ndarray, hit: dict[str, np.ndarray]) -> GBuffer:
    """Assembles a :class:`GBuffer` from :meth:`Scene.cast` results of ``camera``'s pixel rays."""
    t = hit["t"].astype(np.float32)
    found = np.isfinite(t)
    points = np.full(origins.shape, np.nan, np.float32)
    points[found] = origins[found] + dirs[found] * t[found, None]
    depth = np.full(t.shape, np.inf, np.float32)
    depth[found] = camera.to_camera(points[found])[:, 2]
    return GBuffer(hit["triangle"], hit["barycentric"], t, depth, points, dirs.astype(np.float32), hit["geometry"])


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(n, 3) unit area-weighted vertex normals."""
    v = vertices[triangles]
    fn = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    n = np.zeros_like(vertices, dtype=np.float64)
    for k in range(3):
        np.add.at(n, triangles[:, k], fn)
    return (n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-20)).astype(np.float32)
