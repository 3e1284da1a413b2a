"""Visibility V (REFA eq. 1) and range of motion M (REFA eq. 2) of cameras over a population.

For a camera with optical axis o (unit, head frame) and a sample point with unit normal n:

* cosine term ``c = clip(-n . o, 0, 1)`` (REFA's n^T o with the axis pointing away from
  the camera, so a surface facing the camera scores 1; clipped: a surface turned away
  scores 0, which keeps V in [0, 1] as REFA says);
* the point is *visible* when it projects inside the image through the lens (in front of
  the camera, inside the lens's invertible region, pixel inside the image), faces the
  camera (n . (camera - point) > 0), and the ray from the camera centre meets nothing
  (face or headset proxy) more than ``occlusion_tolerance_mm`` before it.

Per region, ``V_cos`` = mean of c over the region's points (REFA's plain form) and
``V_occ`` = mean of c x visible (the occlusion-aware form: a hidden point counts 0);
``coverage`` = fraction of visible points. ``M`` of a region = for each expression the
RMS pixel displacement, neutral to expression, of the region's keypoints visible in both
(0 when none is), then the mean over expressions; RMS = REFA's Frobenius norm divided by
sqrt(number of keypoints), so that regions with different keypoint counts compare.
V figures are means over the neutral and the expressions; every figure is one number per
(camera, identity, donning), and tables give the population's mean and 10th percentile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.config import check_fields
from pipeline.errors import ConfigError
from rigs.camera import Camera
from rigs.raycast import Scene
from stages.placement.population import Population

#: A triangle mesh: ((n, 3) vertices, (m, 3) triangles), headset frame.
Mesh = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class ScoreConfig:
    """How a camera's view of the population is scored."""

    occlusion: bool = True
    """Ray-cast each candidate point against the posed face (and the headset proxy); off,
    V_occ counts every in-view, camera-facing point."""
    occlusion_tolerance_mm: float = 1.0
    """A hit this close before the point still counts as the point itself, millimetres (> 0)."""
    virtual_cameras_per_batch: int = 16
    """Camera x donning combinations projected together (memory vs. fewer ray casts), >= 1."""

    def __post_init__(self) -> None:
        check_fields(self)
        if self.occlusion_tolerance_mm <= 0 or self.virtual_cameras_per_batch < 1:
            raise ConfigError("ScoreConfig: occlusion_tolerance_mm must be > 0 and virtual_cameras_per_batch >= 1")


@dataclass(frozen=True)
class ViewTerms:
    """Per-point terms of one camera's view of T poses of P points.

    Attributes:
        pixels: (T, P, 2) projected pixels (meaningless where not in_view).
        in_view: (T, P) bool, inside the image through the lens.
        facing: (T, P) bool, the surface faces the camera centre.
        cosine: (T, P) clip(-n . o, 0, 1).
    """

    pixels: np.ndarray
    in_view: np.ndarray
    facing: np.ndarray
    cosine: np.ndarray


def view_terms(camera: Camera, points: np.ndarray, normals: np.ndarray) -> ViewTerms:
    """Projection, field of view with distortion, facing and cosine terms.

    Args:
        camera: the camera in the points' frame.
        points: (T, P, 3) positions.
        normals: (T, P, 3) unit normals.
    """
    local = camera.to_camera(points)
    xy = camera.lens.distort(local)
    pixels = np.stack([camera.fx * xy[..., 0] + camera.cx, camera.fy * xy[..., 1] + camera.cy], -1)
    radius = np.hypot(local[..., 0], local[..., 1])
    if camera.model == "opencv_fisheye":
        inside_lens = np.arctan2(radius, local[..., 2]) < camera.lens.t_max
    else:
        z = local[..., 2]
        inside_lens = (z > 0) & (radius < camera.lens.t_max * np.where(z > 0, z, 1.0))
    in_image = ((pixels >= -0.5) & (pixels <= np.array([camera.width, camera.height]) - 0.5)).all(-1)
    axis = camera.R_world_from_camera[:, 2]
    to_camera = camera.t_world_from_camera - points
    facing = np.einsum("tpk,tpk->tp", normals, to_camera) > 0
    cosine = np.clip(-normals @ axis, 0.0, 1.0)
    return ViewTerms(pixels, inside_lens & in_image, facing, cosine)


def unoccluded(scene: Scene, origin: np.ndarray, points: np.ndarray, tolerance: float) -> np.ndarray:
    """(n,) bool: the segment from ``origin`` (3,) or (n, 3) to each point (n, 3) is free.

    A hit within ``tolerance`` metres of the point is the point's own surface.
    """
    offset = points - origin
    dist = np.linalg.norm(offset, axis=-1)
    dirs = offset / np.maximum(dist, 1e-12)[:, None]
    t = scene.cast(np.broadcast_to(origin, points.shape), dirs)["t"]
    return ~(t < dist - tolerance)


def point_visibility(camera: Camera, points: np.ndarray, normals: np.ndarray, scenes: Sequence[Scene] | None = None,
                     proxy: Scene | None = None, tolerance: float = 1e-3) -> tuple[ViewTerms, np.ndarray]:
    """One camera's view terms and visibility of T poses (what :func:`score_cameras` batches).

    Args:
        camera: the camera in the points' frame.
        points, normals: (T, P, 3).
        scenes: per pose, the occluding mesh's scene (None: no ray casting).
        proxy: a further occluder's scene (same frame), or None.
        tolerance: metres, see :func:`unoccluded`.

    Returns:
        (view terms, visible (T, P) bool).
    """
    terms = view_terms(camera, points, normals)
    visible = (terms.in_view & terms.facing)[None]
    if scenes is not None:
        _apply_occlusion(visible, [camera], points, list(scenes), [proxy], tolerance)
    return terms, visible[0]


def region_means(values: np.ndarray, region: np.ndarray, n_regions: int) -> np.ndarray:
    """(..., P) per-point values -> (..., R) means over each region's points."""
    onehot = np.eye(n_regions)[region]  # (P, R)
    return (values @ onehot) / onehot.sum(0)


def range_of_motion(pixels: np.ndarray, visible: np.ndarray, region: np.ndarray, n_regions: int) -> np.ndarray:
    """REFA eq. 2 per region (RMS form; module docstring).

    Args:
        pixels: (T, ..., P, 2), pose 0 the neutral.
        visible: (T, ..., P) bool.
        region: (P,) region index of each keypoint.

    Returns:
        (..., R) pixels: mean over the T - 1 expressions of each region's RMS displacement
        over keypoints visible in the expression and the neutral (0 where none is).
    """
    both = visible[1:] & visible[:1]
    sq = np.where(both, ((pixels[1:] - pixels[:1]) ** 2).sum(-1), 0.0)
    onehot = np.eye(n_regions)[region]
    count = both.astype(np.float64) @ onehot
    rms = np.sqrt(np.divide(sq @ onehot, count, out=np.zeros_like(count), where=count > 0))
    return rms.mean(0)


def camera_in_head_frame(camera: Camera, rotation: np.ndarray, shift: np.ndarray) -> Camera:
    """A headset-frame camera in the head frame, the head sitting at (rotation, shift)."""
    return camera.moved(rotation.T, -rotation.T @ shift)


def mesh_in_head_frame(mesh: Mesh, rotation: np.ndarray, shift: np.ndarray) -> Mesh:
    """A headset-frame mesh in the head frame (see :func:`camera_in_head_frame`)."""
    return (np.asarray(mesh[0]) - shift) @ rotation, mesh[1]


@dataclass(frozen=True)
class PopulationScores:
    """Scores of C cameras over N identities x D donnings (R regions, P sample points).

    Attributes:
        v_cosine, v_occluded, coverage, motion: (C, N, D, R) per face, see the module docstring.
        point_weight: (C, P) population mean of cosine x visible per sample point.
    """

    v_cosine: np.ndarray
    v_occluded: np.ndarray
    coverage: np.ndarray
    motion: np.ndarray
    point_weight: np.ndarray


def score_cameras(
    cameras: Sequence[Camera],
    population: Population,
    config: ScoreConfig | None = None,
    proxies: Sequence[Mesh | None] | None = None,
) -> PopulationScores:
    """Scores headset-frame ``cameras`` over ``population``.

    Args:
        cameras: C cameras in the headset frame.
        population: the faces (poses, donning offsets).
        config: scoring options (defaults without one).
        proxies: per camera, a headset proxy mesh (headset frame) or None.
    """
    config = config or ScoreConfig()
    proxies = list(proxies) if proxies is not None else [None] * len(cameras)
    if len(proxies) != len(cameras):
        raise ConfigError(f"{len(proxies)} proxies for {len(cameras)} cameras")
    n_c, n_d = len(cameras), len(population.shifts)
    n_i, n_r = len(population.identities), len(population.regions.names)
    region = population.regions.sample_region
    out = {k: np.zeros((n_c, n_i, n_d, n_r)) for k in ("v_cosine", "v_occluded", "coverage", "motion")}
    weight = np.zeros((n_c, len(region)))
    combos = [(c, d) for c in range(n_c) for d in range(n_d)]
    proxy_scenes = _proxy_scenes(proxies, population) if config.occlusion else {}
    tol = 1e-3 * config.occlusion_tolerance_mm
    for i in range(n_i):
        verts, normals, scenes = population.posed(i)
        points = verts[:, population.subset.sample_index]
        for start in range(0, len(combos), config.virtual_cameras_per_batch):
            batch = combos[start : start + config.virtual_cameras_per_batch]
            views = [camera_in_head_frame(cameras[c], population.rotations[d], population.shifts[d]) for c, d in batch]
            terms = [view_terms(v, points, normals) for v in views]
            visible = np.stack([t.in_view & t.facing for t in terms])  # (B, T, P)
            if config.occlusion:
                _apply_occlusion(visible, views, points, scenes, [proxy_scenes.get((id(proxies[c]), d)) for c, d in batch], tol)
            cosine = np.stack([t.cosine for t in terms])
            pixels = np.stack([t.pixels for t in terms], 1)  # (T, B, P, 2)
            motion = range_of_motion(pixels, visible.transpose(1, 0, 2), region, n_r)
            for b, (c, d) in enumerate(batch):
                out["v_cosine"][c, i, d] = region_means(cosine[b], region, n_r).mean(0)
                out["v_occluded"][c, i, d] = region_means(cosine[b] * visible[b], region, n_r).mean(0)
                out["coverage"][c, i, d] = region_means(visible[b].astype(float), region, n_r).mean(0)
                out["motion"][c, i, d] = motion[b]
                weight[c] += (cosine[b] * visible[b]).mean(0)
    return PopulationScores(**out, point_weight=weight / (n_i * n_d))


def _proxy_scenes(proxies: list[Mesh | None], population: Population) -> dict[tuple[int, int], Scene]:
    """(id(proxy), donning) -> the proxy's ray-casting scene in the head frame."""
    scenes = {}
    for mesh in proxies:
        if mesh is None or any(key[0] == id(mesh) for key in scenes):
            continue
        for d, (rot, shift) in enumerate(zip(population.rotations, population.shifts, strict=True)):
            scenes[(id(mesh), d)] = Scene(*mesh_in_head_frame(mesh, rot, shift))
    return scenes


def _apply_occlusion(visible: np.ndarray, views: list[Camera], points: np.ndarray, scenes: list[Scene],
                     proxy_scenes: list[Scene | None], tolerance: float) -> None:
    """Clears ``visible`` (B, T, P) where the face (pose t) or a proxy blocks the ray."""
    centres = np.stack([v.t_world_from_camera for v in views])  # (B, 3)
    for t, scene in enumerate(scenes):
        b_idx, p_idx = np.nonzero(visible[:, t])
        if b_idx.size:
            visible[b_idx, t, p_idx] = unoccluded(scene, centres[b_idx], points[t, p_idx], tolerance)
    for b, proxy in enumerate(proxy_scenes):
        if proxy is not None:
            t_idx, p_idx = np.nonzero(visible[b])
            if t_idx.size:
                visible[b, t_idx, p_idx] = unoccluded(proxy, centres[b], points[t_idx, p_idx], 0.0)
