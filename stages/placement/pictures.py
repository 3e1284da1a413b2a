"""Heat-map pictures: each camera's view of the mean face, coloured by visibility.

The face drawn is the population's identity 0 (the mean face by default), neutral, at
the nominal donning, ray-cast at ``scale`` x the camera's resolution. A pixel on a region
takes the population-mean ``cosine x visible`` weight (the V_occ summand) of the region's
sample point nearest to it on the template (colour map ``inferno``, 0 black .. 1 yellow);
elsewhere the face is grey, shaded by the angle between the ray and the surface.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rigs.camera import Camera
from stages.placement.population import Population

CMAP = "inferno"


def vertex_heat(population: Population, point_weight: np.ndarray) -> np.ndarray:
    """(n_subset,) heat per posed vertex: its region's nearest sample's weight, NaN off regions.

    Args:
        point_weight: (P,) per sample point.
    """
    regions, subset, template = population.regions, population.subset, population.model.neutral
    heat = np.full(len(subset.vertex_ids), np.nan)
    position = {v: i for i, v in enumerate(subset.vertex_ids)}
    for r, members in enumerate(regions.vertices):
        own = np.flatnonzero(regions.sample_region == r)
        d = np.linalg.norm(template[members][:, None] - template[regions.samples[own]][None], axis=-1)
        rows = [position[v] for v in members if v in position]
        keep = [k for k, v in enumerate(members) if v in position]
        heat[rows] = point_weight[own[d[keep].argmin(1)]]
    return heat


def heat_view(camera: Camera, population: Population, point_weight: np.ndarray, scale: float = 0.5) -> np.ndarray:
    """(H, W, 3) uint8 RGB of ``camera``'s (headset frame) view with the heat map."""
    import matplotlib

    from rigs.raycast import Scene, vertex_normals

    verts, _, _ = population.posed(0)
    neutral = verts[0]  # head frame = headset frame at the nominal donning
    tris = population.subset.triangles
    view = camera.scaled(scale)
    gbuf = Scene(neutral, tris).render(view)
    normals = vertex_normals(neutral.astype(np.float64), tris)
    n = gbuf.interpolate(tris, normals)
    shade = 0.25 + 0.6 * np.abs((n * gbuf.directions).sum(-1)) / np.maximum(np.linalg.norm(n, axis=-1), 1e-9)
    heat = gbuf.interpolate(tris, vertex_heat(population, point_weight)[:, None], np.nan)[..., 0]
    rgb = np.repeat(np.where(gbuf.hit, shade, 0.08)[..., None], 3, -1)
    on = gbuf.hit & np.isfinite(heat)
    rgb[on] = matplotlib.colormaps[CMAP](np.clip(heat[on], 0, 1))[:, :3] * (0.55 + 0.45 * shade[on, None])
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def write_heat_mosaic(path: Path, names: Sequence[str], cameras: Sequence[Camera], population: Population,
                      point_weight: np.ndarray, title: str, columns: int = 5, scale: float = 0.5) -> Path:
    """Writes one PNG: every camera's heat view, labelled, with a colour bar.

    Args:
        point_weight: (C, P) per camera and sample point.
    """
    import cv2
    import matplotlib

    tiles = []
    for name, cam, w in zip(names, cameras, point_weight, strict=True):
        tile = np.ascontiguousarray(heat_view(cam, population, w, scale))
        cv2.putText(tile, name, (5, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (80, 255, 80), 1, cv2.LINE_AA)
        tiles.append(tile)
    h, w = max(t.shape[0] for t in tiles), max(t.shape[1] for t in tiles)
    rows = -(-len(tiles) // columns)
    mosaic = np.zeros((rows * h + 44, columns * w, 3), np.uint8)
    for k, tile in enumerate(tiles):
        r, c = divmod(k, columns)
        mosaic[r * h : r * h + tile.shape[0], c * w : c * w + tile.shape[1]] = tile
    bar = matplotlib.colormaps[CMAP](np.linspace(0, 1, columns * w - 120))[:, :3]
    mosaic[-16:-4, 60 : 60 + len(bar)] = (bar * 255).astype(np.uint8)[None]
    cv2.putText(mosaic, "0", (45, mosaic.shape[0] - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
    cv2.putText(mosaic, "1", (62 + len(bar), mosaic.shape[0] - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1)
    cv2.putText(mosaic, title, (5, mosaic.shape[0] - 26), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), mosaic[:, :, ::-1])
    return path
