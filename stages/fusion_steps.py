"""The pure steps of fusion (:mod:`stages.fusion`): back-projection, landmark lifting,
RANSAC over landmark pairs, oriented clouds, point-to-plane ICP, the frame checks and the
Poisson surface. Arrays in, arrays out (Open3D clouds where Open3D does the work); Open3D
is imported lazily. The method and its measurements are in docs/fusion.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from rigs.camera import Camera, PinholeIntrinsics
from rigs.geometry import similarity_fit

if TYPE_CHECKING:
    from stages.fusion import FusionConfig

def pixel_rays(intrinsics: PinholeIntrinsics, pixels: np.ndarray) -> np.ndarray:
    """Camera-frame rays with z = 1 through pixels (centres at integers, no distortion).

    Args:
        intrinsics: the pinhole camera.
        pixels: (n, 2) pixel coordinates (u, v).

    Returns:
        (n, 3) float64 rays; a point at depth z is ``z * ray``.
    """
    dirs, _ = Camera(intrinsics).unproject(np.asarray(pixels, np.float64).reshape(-1, 2))
    return dirs / dirs[:, 2:3]


def backproject(depth_mm: np.ndarray, mask: np.ndarray, intrinsics: PinholeIntrinsics,
                depth_unit_m: float = 1e-3) -> np.ndarray:
    """Masked, valid depth pixels as camera-frame points.

    Args:
        depth_mm: (H, W) uint16 depth counts, 0 = invalid.
        mask: (H, W) bool, pixels to use.
        intrinsics: the depth image's pinhole intrinsics (depth registered to them).
        depth_unit_m: metres per depth count.

    Returns:
        (n, 3) float64 points, metres, in row-major pixel order.
    """
    v, u = np.nonzero(np.asarray(mask, bool) & (depth_mm > 0))
    z = depth_mm[v, u].astype(np.float64) * depth_unit_m
    return pixel_rays(intrinsics, np.stack([u, v], 1)) * z[:, None]


def lift_landmarks(points_2d: np.ndarray, depth_mm: np.ndarray, mask: np.ndarray,
                   intrinsics: PinholeIntrinsics, window_px: int,
                   depth_unit_m: float = 1e-3) -> np.ndarray:
    """2D landmarks to camera-frame 3D points by the depth at (or nearest to) each.

    Each landmark takes the depth of the valid masked pixel nearest its sub-pixel
    position within a (2 window_px + 1)^2 window around its rounded pixel, and is
    back-projected along its own sub-pixel ray.

    Args:
        points_2d: (L, 2) pixel coordinates, NaN where missing.
        depth_mm: (H, W) uint16 depth counts, 0 = invalid.
        mask: (H, W) bool, trusted pixels.
        intrinsics: the pinhole intrinsics.
        window_px: half-size of the search window, pixels.
        depth_unit_m: metres per depth count.

    Returns:
        (L, 3) float64 points, metres; NaN rows where the landmark is missing or has
        no valid depth in its window.
    """
    pts = np.asarray(points_2d, np.float64)
    out = np.full((len(pts), 3), np.nan)
    h, w = depth_mm.shape
    good = np.isfinite(pts).all(1)
    if not good.any():
        return out
    p = pts[good]
    r = np.arange(-window_px, window_px + 1)
    offsets = np.stack(np.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)  # (K, 2) (du, dv)
    cand = np.rint(p)[:, None, :].astype(np.int64) + offsets[None]  # (l, K, 2)
    inside = (cand[..., 0] >= 0) & (cand[..., 0] < w) & (cand[..., 1] >= 0) & (cand[..., 1] < h)
    cu, cv = np.clip(cand[..., 0], 0, w - 1), np.clip(cand[..., 1], 0, h - 1)
    valid = inside & np.asarray(mask, bool)[cv, cu] & (depth_mm[cv, cu] > 0)
    dist = np.where(valid, ((cand - p[:, None, :]) ** 2).sum(-1), np.inf)
    best = dist.argmin(1)
    found = np.isfinite(dist[np.arange(len(p)), best])
    rows = np.arange(len(p))[found]
    z = depth_mm[cv[rows, best[found]], cu[rows, best[found]]].astype(np.float64) * depth_unit_m
    lifted = np.full((len(p), 3), np.nan)
    lifted[found] = pixel_rays(intrinsics, p[found]) * z[:, None]
    out[good] = lifted
    return out


def kabsch_batch(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares rigid fits ``dst ~ R src + t`` of many small point sets at once
    (:func:`rigs.geometry.similarity_fit` with ``with_scale=False``, batched).

    Args:
        src: (B, m, 3) points, m >= 3.
        dst: (B, m, 3) corresponding points.

    Returns:
        (R (B, 3, 3) with det +1, t (B, 3)).
    """
    mu_s, mu_d = src.mean(1), dst.mean(1)
    a, b = src - mu_s[:, None], dst - mu_d[:, None]
    u, _, vt = np.linalg.svd(np.swapaxes(b, 1, 2) @ a)  # covariance dst x src
    d = np.sign(np.linalg.det(u @ vt))
    u[:, :, 2] *= np.where(d == 0, 1.0, d)[:, None]  # no reflections
    rot = u @ vt
    return rot, mu_d - np.einsum("bij,bj->bi", rot, mu_s)


def ransac_rigid(src: np.ndarray, dst: np.ndarray, threshold: float, iterations: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Robust rigid fit ``dst ~ R src + t`` by RANSAC over minimal 3-point Kabsch fits.

    The sample with the most inliers wins (the first drawn among equals); the pose is then
    refit on its inliers and refit once more on the refit's inliers. The minimal samples
    are fitted and scored all at once (:func:`kabsch_batch`).

    Args:
        src: (n, 3) points, n >= 3.
        dst: (n, 3) corresponding points.
        threshold: inlier distance, same unit as the points.
        iterations: number of minimal samples.
        rng: the random generator.

    Returns:
        (T (4, 4) float64, inliers (n,) bool).
    """
    n = len(src)
    samples = np.array([rng.choice(n, 3, replace=False) for _ in range(iterations)])  # (B, 3)
    a, b, c = np.moveaxis(src[samples], 1, 0)
    fine = np.linalg.norm(np.cross(b - a, c - a), axis=1) >= 1e-2 * threshold**2  # not (near-)collinear
    best = np.zeros(n, bool)
    if fine.any():
        rot, t = kabsch_batch(src[samples[fine]], dst[samples[fine]])
        inliers = np.linalg.norm(np.einsum("bij,nj->bni", rot, src) + t[:, None] - dst, axis=2) < threshold
        count = inliers.sum(1)
        if count.max() > 0:
            best = inliers[int(np.argmax(count))]
    T = np.full((4, 4), np.nan)
    for _ in range(2):
        if best.sum() < 3:
            return T, best
        _, rot1, t1 = similarity_fit(src[best], dst[best], with_scale=False)
        best = np.linalg.norm(src @ rot1.T + t1 - dst, axis=1) < threshold
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = rot1, t1
    return T, best


@contextmanager
def open3d_single_thread() -> Iterator[None]:
    """Runs Open3D on one thread inside the block (restored after).

    One thread makes its ICP and Poisson reproducible (their parallel reductions sum in a
    varying order) and costs no CPU time; the stage spreads expressions over processes
    instead (``fusion.workers``).
    """
    import open3d as o3d

    before = o3d.utility.get_max_threads()
    o3d.utility.set_max_threads(1)
    try:
        yield
    finally:
        o3d.utility.set_max_threads(before)


def point_cloud(points: np.ndarray, cfg: FusionConfig):
    """An Open3D cloud of a frame's points, voxel-downsampled to ``cfg.frame_voxel_mm``,
    with normals oriented toward the camera.

    The normals are estimated on the downsampled points: their neighbourhood
    (``normal_max_nn`` points within ``normal_radius_mm``) then spans millimetres rather
    than the ~0.6 mm pixel footprint, so the 1 mm depth steps average out, at a sixth of
    the cost.

    Args:
        points: (n, 3) points, metres, in their camera's frame (camera at the origin).
        cfg: the voxel size and the normal-estimation settings.
    """
    import open3d as o3d

    pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(np.asarray(points, np.float64)))
    if cfg.frame_voxel_mm > 0:
        pcd = pcd.voxel_down_sample(cfg.frame_voxel_mm * 1e-3)
    pcd.estimate_normals(o3d.geometry.KDTreeSearchParamHybrid(cfg.normal_radius_mm * 1e-3, cfg.normal_max_nn))
    pcd.orient_normals_towards_camera_location(np.zeros(3))
    return pcd


def _kernel(name: str, scale: float):
    import open3d as o3d

    reg = o3d.pipelines.registration
    return {"none": lambda: None, "tukey": lambda: reg.TukeyLoss(k=scale),
            "huber": lambda: reg.HuberLoss(k=scale)}[name]()


def icp_refine(source, target, init: np.ndarray, cfg: FusionConfig,
               points: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """Coarse-to-fine rigid point-to-plane ICP of ``source`` onto ``target``.

    Args:
        source: Open3D point cloud of the frame (its camera frame; :func:`point_cloud`).
        target: Open3D point cloud of the reference, with normals.
        init: (4, 4) initial target-from-source transform.
        cfg: distances, iterations, kernel.
        points: (n, 3) the frame's full-resolution points for the checks; the source's
            points when None.

    Returns:
        (T (4, 4), fitness, point-to-plane RMSE in metres), both measured by
        :func:`overlap` of ``points`` against ``target`` at the finest distance.
    """
    import open3d as o3d

    reg = o3d.pipelines.registration
    T = np.asarray(init, np.float64)
    for dist in cfg.icp_distances_m:
        kernel = _kernel(cfg.robust_kernel, float(dist) / 2)
        est = reg.TransformationEstimationPointToPlane(kernel) if kernel else reg.TransformationEstimationPointToPlane()
        result = reg.registration_icp(
            source, target, float(dist), T, est,
            reg.ICPConvergenceCriteria(relative_fitness=1e-7, relative_rmse=1e-7, max_iteration=cfg.icp_iterations),
        )
        T = np.asarray(result.transformation)
    checked = np.asarray(source.points) if points is None else points
    return T, *overlap(checked, target, T, float(cfg.icp_distances_m[-1]))


def overlap(points: np.ndarray, target, T: np.ndarray, max_distance: float) -> tuple[float, float]:
    """Overlap and point-to-plane residual of posed points against a reference cloud.

    Point-to-plane, not Open3D's point-to-point inlier RMSE: the latter is dominated by
    the sampling spacing (about half a pixel's footprint, ~0.8 mm at 0.45 m), not by
    misregistration.

    Args:
        points: (n, 3) frame points, metres.
        target: Open3D reference cloud with normals.
        T: (4, 4) target-from-frame transform.
        max_distance: correspondence distance, metres.

    Returns:
        (fitness: fraction of points with a reference point within ``max_distance``,
        RMS point-to-plane distance of those points in metres; NaN when none).
    """
    from scipy.spatial import cKDTree

    posed = points @ T[:3, :3].T + T[:3, 3]
    tpts, tnrm = np.asarray(target.points), np.asarray(target.normals)
    dist, idx = cKDTree(tpts).query(posed, distance_upper_bound=max_distance)
    hit = np.isfinite(dist)
    if not hit.any():
        return 0.0, float("nan")
    res = np.einsum("ij,ij->i", posed[hit] - tpts[idx[hit]], tnrm[idx[hit]])
    return float(hit.mean()), float(np.sqrt(np.mean(res**2)))


def poisson_mesh(cloud, cfg: FusionConfig) -> tuple[np.ndarray, np.ndarray]:
    """Poisson surface of an oriented cloud, density-trimmed and cropped to the cloud.

    Args:
        cloud: Open3D point cloud with normals (metres).
        cfg: depth, samples per node, density quantile, crop margin.

    Returns:
        (vertices (V, 3) float32, triangles (F, 3) int32).
    """
    import open3d as o3d

    mesh, density = o3d.geometry.TriangleMesh.create_from_point_cloud_poisson(
        cloud, depth=cfg.poisson_depth, samples_per_node=cfg.poisson_samples_per_node, n_threads=1)
    density = np.asarray(density)
    verts = np.asarray(mesh.vertices)
    pts = np.asarray(cloud.points)
    margin = cfg.crop_margin_mm * 1e-3
    lo, hi = pts.min(0) - margin, pts.max(0) + margin
    drop = (density < np.quantile(density, cfg.density_quantile)) | ((verts < lo) | (verts > hi)).any(1)
    mesh.remove_vertices_by_mask(drop)
    mesh.remove_degenerate_triangles()
    mesh.remove_unreferenced_vertices()
    return np.asarray(mesh.vertices, np.float32), np.asarray(mesh.triangles, np.int32)
