"""Rasterisation of a mesh's UV layout: which triangle and where, for every texel.

The atlas is a strip of ``tiles`` UDIM-style unit squares side by side: a texture of
``(resolution, tiles * resolution)`` texels whose column ``j`` and row ``i`` sit at

    u = (j + 0.5) / resolution,   v = 1 - (i + 0.5) / resolution,

so tile ``k`` holds ``u`` in ``[k, k + 1)``, ``v`` grows upward (OBJ convention: row 0 is
the top of the image) and texel centres are at integer texel coordinates
``x = u * resolution - 0.5``, ``y = (1 - v) * resolution - 0.5`` (the OpenCV pixel
convention of ``rigs/camera.py``).

:func:`rasterize_uv` is pure numpy and vectorised over triangles and texels (no Python
loop over either); :func:`model_uv_raster` caches it per model, resolution and parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pipeline.errors import ModelError


@dataclass(frozen=True, eq=False)
class UvRaster:
    """The covered texels of a UV atlas, each with its triangle and barycentrics.

    Attributes:
        shape: (H, W) of the atlas, ``H = resolution``, ``W = tiles * resolution``.
        resolution: texels per unit of UV (per tile side).
        texel: (k,) int64 flat (row-major) indices of the covered texels, increasing.
        triangle: (k,) int64 mesh triangle covering each texel.
        barycentric: (k, 3) float32 weights of the triangle's corners at the texel centre
            (each >= 0 up to rounding, summing to 1).
    """

    shape: tuple[int, int]
    resolution: int
    texel: np.ndarray
    triangle: np.ndarray
    barycentric: np.ndarray

    @property
    def rows(self) -> np.ndarray:
        """(k,) int64 texel rows."""
        return self.texel // self.shape[1]

    @property
    def cols(self) -> np.ndarray:
        """(k,) int64 texel columns."""
        return self.texel % self.shape[1]

    def scatter(self, values: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """Per-covered-texel values as an image.

        Args:
            values: (k,) or (k, C) values, one per covered texel.
            fill: value of the texels no triangle covers.

        Returns:
            (H, W) or (H, W, C) array of ``values``' dtype.
        """
        values = np.asarray(values)
        if len(values) != len(self.texel):
            raise ValueError(f"need {len(self.texel)} values, got {len(values)}")
        out = np.full((self.shape[0] * self.shape[1], *values.shape[1:]), fill, values.dtype)
        out[self.texel] = values
        return out.reshape(*self.shape, *values.shape[1:])

    def interpolate(self, triangles: np.ndarray, vertex_values: np.ndarray,
                    texels: np.ndarray | None = None) -> np.ndarray:
        """Per-vertex values interpolated at the covered texels.

        Args:
            triangles: (m, 3) mesh triangles (vertex indices), the ones rasterised.
            vertex_values: (n, C) per-vertex values (positions, normals, ...).
            texels: (s,) int indices into the covered texels to interpolate at; all by default.

        Returns:
            (k, C) (or (s, C)) array of ``vertex_values``' float dtype.
        """
        values = np.asarray(vertex_values)
        if not np.issubdtype(values.dtype, np.floating):
            values = values.astype(np.float64)
        tri = self.triangle if texels is None else self.triangle[texels]
        bary = (self.barycentric if texels is None else self.barycentric[texels]).astype(values.dtype)
        corners = values[np.asarray(triangles)[tri]]  # (s, 3, C)
        return np.einsum("kjc,kj->kc", corners, bary)


def uv_to_texel(uv: np.ndarray, resolution: int) -> np.ndarray:
    """UV coordinates -> continuous texel coordinates (x = column, y = row; centres at integers).

    Args:
        uv: (..., 2) texture coordinates.
        resolution: texels per unit of UV.

    Returns:
        (..., 2) float64 ``(u * resolution - 0.5, (1 - v) * resolution - 0.5)``.
    """
    uv = np.asarray(uv, np.float64)
    return np.stack([uv[..., 0] * resolution - 0.5, (1.0 - uv[..., 1]) * resolution - 0.5], -1)


def rasterize_uv(uv: np.ndarray, triangle_uv: np.ndarray, resolution: int, tiles: int,
                 triangle_ids: np.ndarray | None = None, eps: float = 1e-7) -> UvRaster:
    """Rasterises triangles in UV space: per covered texel its triangle and barycentrics.

    A texel is covered when its centre lies inside (or on the edge of) a triangle; a texel
    inside several (shared edges, overlapping islands) goes to the triangle it lies
    deepest inside (largest smallest barycentric), ties to the lower triangle id.
    Triangles with (near-)zero UV area are skipped.

    Args:
        uv: (u, 2) texture coordinates.
        triangle_uv: (m, 3) int indices into ``uv`` per triangle corner.
        resolution: texels per unit of UV, >= 1.
        tiles: number of unit tiles along u in the atlas, >= 1; parts of triangles
            outside ``[0, tiles) x [0, 1]`` are clipped.
        triangle_ids: (t,) int ids of the triangles to rasterise; all by default.
        eps: inside tolerance on the barycentrics.

    Returns:
        The :class:`UvRaster` of the ``(resolution, tiles * resolution)`` atlas.

    Raises:
        ModelError: bad shapes, indices or sizes.
    """
    uv = np.asarray(uv, np.float64)
    tuv = np.asarray(triangle_uv)
    if uv.ndim != 2 or uv.shape[1] != 2 or tuv.ndim != 2 or tuv.shape[1] != 3:
        raise ModelError(f"uv must be (u, 2) and triangle_uv (m, 3), got {uv.shape} and {tuv.shape}")
    if resolution < 1 or tiles < 1:
        raise ModelError(f"resolution and tiles must be >= 1, got {resolution}, {tiles}")
    if tuv.size and (tuv.min() < 0 or tuv.max() >= len(uv)):
        raise ModelError("triangle_uv indexes past the uv array")
    ids = np.arange(len(tuv)) if triangle_ids is None else np.asarray(triangle_ids, np.int64)
    h, w = resolution, tiles * resolution
    corners = uv_to_texel(uv[tuv[ids]], resolution)  # (t, 3, 2)
    kept, owner, texel, bary = triangle_pixels(corners, w, h, eps)
    ids = ids[kept]
    depth = bary.min(1)
    inside = depth >= -eps
    texel, owner, bary, depth = texel[inside], owner[inside], bary[inside], depth[inside]
    # one triangle per texel: deepest inside first, then the lowest triangle id
    order = np.lexsort((ids[owner], -depth, texel))
    texel, owner, bary = texel[order], owner[order], bary[order]
    first = np.r_[True, texel[1:] != texel[:-1]]
    bary = np.clip(bary[first], 0.0, None)
    bary /= bary.sum(1, keepdims=True)
    return UvRaster((h, w), int(resolution), texel[first], ids[owner[first]], bary.astype(np.float32))


def triangle_pixels(corners: np.ndarray, w: int, h: int, eps: float = 0.0
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every pixel centre of every triangle's bounding box, with its barycentrics.

    Pixel centres sit at integer coordinates. Degenerate (zero-area) triangles are dropped.

    Args:
        corners: (t, 3, 2) float triangle corners in pixels.
        w, h: image size.
        eps: the bounding boxes grow by this many pixels.

    Returns:
        (kept (t',) indices of the non-degenerate triangles into ``corners``;
        owner (q,) index into ``kept`` of each candidate; pixel (q,) flat index y * w + x;
        bary (q, 3) float64 barycentrics, negative outside the triangle).
    """
    a, e1, e2 = corners[:, 0], corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
    det = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]
    kept = np.flatnonzero(np.abs(det) > 1e-12)
    corners, a, e1, e2, det = corners[kept], a[kept], e1[kept], e2[kept], det[kept]
    lo = np.clip(np.ceil(corners.min(1) - eps), 0, [w, h]).astype(np.int64)  # first pixel centre
    hi = np.clip(np.floor(corners.max(1) + eps), -1, [w - 1, h - 1]).astype(np.int64)  # last
    size = np.maximum(hi - lo + 1, 0)  # (t, 2) bbox width, height in pixels
    count = size[:, 0] * size[:, 1]
    owner = np.repeat(np.arange(len(kept)), count)
    local = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    x = lo[owner, 0] + local % size[owner, 0]
    y = lo[owner, 1] + local // size[owner, 0]
    px, py = x - a[owner, 0], y - a[owner, 1]
    b1 = (px * e2[owner, 1] - py * e2[owner, 0]) / det[owner]
    b2 = (e1[owner, 0] * py - e1[owner, 1] * px) / det[owner]
    return kept, owner, y * w + x, np.stack([1.0 - b1 - b2, b1, b2], 1)


def part_triangles(model, parts: tuple[str, ...]) -> np.ndarray:
    """(t,) int64 ids of ``model``'s triangles whose first corner lies in one of ``parts``.

    Raises:
        ModelError: an unknown part name.
    """
    unknown = sorted(set(parts) - set(model.part_names))
    if unknown:
        raise ModelError(f"unknown face model part(s) {unknown}; the model has {list(model.part_names)}")
    return np.flatnonzero(model.part_triangle_mask(*parts))


def atlas_tiles(model, parts: tuple[str, ...]) -> int:
    """Number of unit UV tiles along u that ``parts``' triangles span (>= 1)."""
    ids = part_triangles(model, parts)
    if not len(ids):
        return 1
    return max(1, int(np.ceil(float(model.uv[model.triangle_uv[ids]][..., 0].max()) - 1e-9)))


@lru_cache(maxsize=4)
def model_uv_raster(model, resolution: int, parts: tuple[str, ...]) -> UvRaster:
    """The cached :func:`rasterize_uv` of a face model's ``parts`` (per model object).

    Args:
        model: a :class:`rigs.face_model.FaceModel` (hashed by identity; the embedded
            model is itself cached, so repeated calls hit the cache).
        resolution: texels per UV tile side.
        parts: the model parts whose triangles own texels.
    """
    return rasterize_uv(model.uv, model.triangle_uv, resolution, atlas_tiles(model, parts),
                        part_triangles(model, parts))
