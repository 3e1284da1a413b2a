"""The bake behind the texture stage: what each phone frame sees of the UV atlas.

Pure functions, arrays in and arrays out: cameras from poses, the per-frame observation
(view angle, projection, depth test against the mesh ray-cast from the camera, bilinear
colour in linear light), the exposure gain, the weighted accumulation over frames, and
texture look-ups that ignore unseen texels. ``stages/texture.py`` holds the config, the
artifact and the stage; docs/texture.md the method and measurements.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import StageError
from rigs.camera import Camera, PinholeIntrinsics
from rigs.raycast import Scene, vertex_normals
from rigs.uv_raster import UvRaster

if TYPE_CHECKING:
    from stages.texture import TextureConfig


# ------------------------------------------------------------------------ colour


def srgb_to_linear(srgb: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear light (IEC 61966-2-1), float32."""
    s = np.asarray(srgb, np.float32)
    return np.where(s <= 0.04045, s / 12.92, ((s + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    """Linear light -> sRGB-encoded values in [0, 1] (clipped), float32."""
    c = np.clip(np.asarray(linear, np.float32), 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055).astype(np.float32)


#: (256,) float32 linear value of each 8-bit sRGB code.
SRGB8_TO_LINEAR = srgb_to_linear(np.arange(256) / 255.0)


def encode_srgb8(linear: np.ndarray) -> np.ndarray:
    """Linear light -> (..., 3) uint8 sRGB, rounded."""
    return np.round(linear_to_srgb(linear) * 255.0).astype(np.uint8)


def sample_texture(rgb: np.ndarray, weight: np.ndarray, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear look-up of a texture that ignores unseen texels.

    The four texels around each point are blended with bilinear weights times "seen"
    (``weight > 0``), renormalised, so island borders do not pull in unseen colour.

    Args:
        rgb: (H, W, C) float texture.
        weight: (H, W) confidence, 0 = unseen.
        xy: (p, 2) texel coordinates (x = column, y = row; centres at integers).

    Returns:
        (values (p, C) float32, 0 where no neighbour was seen; confidence (p,) float32,
        the bilinear blend of ``weight``, 0 where none was seen).
    """
    h, w = weight.shape
    xy = np.asarray(xy, np.float64)
    x0 = np.floor(xy[:, 0]).astype(np.int64)
    y0 = np.floor(xy[:, 1]).astype(np.int64)
    fx, fy = xy[:, 0] - x0, xy[:, 1] - y0
    acc = np.zeros((len(xy), rgb.shape[2]))
    wsum, conf = np.zeros(len(xy)), np.zeros(len(xy))
    for dx, dy, bw in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xs, ys = x0 + dx, y0 + dy
        ok = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
        xs, ys = np.clip(xs, 0, w - 1), np.clip(ys, 0, h - 1)
        c = np.where(ok, weight[ys, xs], 0.0)
        b = bw * (c > 0)
        acc += b[:, None] * rgb[ys, xs]
        wsum += b
        conf += bw * c
    vals = np.where(wsum[:, None] > 0, acc / np.maximum(wsum, 1e-12)[:, None], 0.0)
    return vals.astype(np.float32), conf.astype(np.float32)


# ------------------------------------------------------------------------ baking


@dataclass(frozen=True, eq=False)
class View:
    """One phone frame to bake.

    Attributes:
        frame: the frame's id in its burst.
        camera: the frame's camera with the head frame as its world frame
            (``camera_from_head = inv(fusion.poses[f]) @ scan_from_head``).
        rgb: (H, W, 3) uint8 sRGB image, or a callable returning it (read when used).
    """

    frame: int
    camera: Camera
    rgb: Any


@dataclass(frozen=True, eq=False)
class Observations:
    """What one frame saw of the atlas.

    Attributes:
        texel: (p,) int64 indices into the raster's covered texels.
        colour: (p, 3) float32 linear RGB, bilinearly sampled.
        cos: (p,) float32 cos of the view angle.
    """

    texel: np.ndarray
    colour: np.ndarray
    cos: np.ndarray


def camera_from_pose(intrinsics: PinholeIntrinsics, camera_from_head: np.ndarray) -> Camera:
    """A pinhole :class:`Camera` placed in the head frame from a (4, 4) or (3, 4) camera-from-head.

    The rotation is projected onto SO(3) (products of float poses drift by ~1e-12).

    Raises:
        StageError: the pose is not finite or its rotation is far from orthonormal.
    """
    T = np.asarray(camera_from_head, np.float64)
    if T.shape not in ((4, 4), (3, 4)) or not np.isfinite(T).all():
        raise StageError(f"camera_from_head must be a finite (4, 4) or (3, 4) pose, got shape {T.shape}")
    u, s, vt = np.linalg.svd(T[:3, :3])
    if np.abs(s - 1).max() > 1e-4 or np.linalg.det(u @ vt) < 0:
        raise StageError(f"camera_from_head's rotation is not a rotation (singular values {s})")
    rot = u @ vt
    pin = PinholeIntrinsics(intrinsics.width, intrinsics.height, intrinsics.fx, intrinsics.fy,
                            intrinsics.cx, intrinsics.cy)
    return Camera(pin, R_world_from_camera=rot.T, t_world_from_camera=-rot.T @ T[:3, 3])


def frontalness(camera: Camera) -> float:
    """cos of the angle between the camera's optical axis and the face's -z (1 = frontal)."""
    return float(-camera.R_world_from_camera[2, 2])


def mesh_depth(scene: Scene, camera: Camera, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    """Camera-z depth of the mesh at the pixel centres of a window (inclusive bounds).

    The rays are cast with camera-frame directions ``((u - cx) / fx, (v - cy) / fy, 1)``,
    unnormalised, so the hit parameter is the camera z itself (pinhole cameras only: the
    phone's images are undistorted).

    Args:
        scene: the posed mesh (head frame).
        camera: the pinhole camera (head frame as world).
        x0, y0, x1, y1: the window's first and last pixel column and row.

    Returns:
        (y1 - y0 + 1, x1 - x0 + 1) float32 depth, metres; inf where no triangle is hit.
    """
    v, u = np.mgrid[y0:y1 + 1, x0:x1 + 1].astype(np.float32)
    d = np.stack([(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, np.ones_like(u)], -1)
    d = d @ camera.R_world_from_camera.T.astype(np.float32)
    return scene.cast(np.broadcast_to(camera.t_world_from_camera.astype(np.float32), d.shape), d)["t"]


#: Adjacent pixels whose mesh depths differ by more than this are on either side of a
#: silhouette (the steepest skin the view-angle limit lets through changes by < 3 mm
#: per pixel at 0.4 m), metres.
DEPTH_EDGE_M = 0.01


def near_silhouette(depth: np.ndarray, margin_px: int) -> np.ndarray:
    """Pixels within ``margin_px`` (Chebyshev) of a silhouette of the rendered mesh.

    A pixel is on a silhouette when its ray misses the mesh or its 3 x 3 neighbourhood
    spans more than :data:`DEPTH_EDGE_M` of depth (both sides of an occluding edge).

    Args:
        depth: (h, w) float32 depth, inf where the mesh is missed.
        margin_px: the margin, pixels, >= 0.

    Returns:
        (h, w) bool.
    """
    import cv2

    finite = np.isfinite(depth)
    box = np.ones((3, 3), np.uint8)
    hi = cv2.dilate(np.where(finite, depth, 0).astype(np.float32), box, borderType=cv2.BORDER_REPLICATE)
    lo = cv2.erode(np.where(finite, depth, np.float32(1e6)).astype(np.float32), box, borderType=cv2.BORDER_REPLICATE)
    edge = (~finite | (hi - lo > DEPTH_EDGE_M)).astype(np.uint8)
    return cv2.dilate(edge, np.ones((2 * margin_px + 1,) * 2, np.uint8)) > 0


def observe(points: np.ndarray, normals: np.ndarray, scene: Scene, camera: Camera,
            rgb_linear: np.ndarray, cfg: TextureConfig) -> Observations:
    """What one frame sees of a set of surface points (texels) and their colours there.

    A point is observed when it faces the camera (cos >= ``cfg.min_cos``), projects
    inside the image with its 4 bilinear neighbours, and the mesh depth rendered at those
    4 pixels is its own depth within ``depth_tolerance_mm`` plus its surface's depth
    change over 1.5 pixels (nothing in front, no silhouette inside the sample), and none
    of them lies within ``silhouette_margin_px`` of a silhouette of the mesh (where a mesh
    a little off the true head would sample the background or the occluder).

    Args:
        points: (p, 3) points on the mesh, head frame, metres.
        normals: (p, 3) unit outward normals.
        scene: the mesh the points lie on, for the depth test.
        camera: the frame's pinhole camera (head frame as world).
        rgb_linear: (H, W, 3) float32 linear image.
        cfg: the texture config.

    Returns:
        :class:`Observations` with indices into ``points``.
    """
    if camera.model != "opencv" or np.any(np.asarray(camera.distortion) != 0):
        raise StageError("texture baking needs a pinhole (undistorted) camera")
    to_cam = camera.t_world_from_camera.astype(points.dtype) - points
    cos = np.einsum("ij,ij->i", normals, to_cam) / np.sqrt(np.einsum("ij,ij->i", to_cam, to_cam))
    idx = np.flatnonzero(cos >= cfg.min_cos)
    # pinhole projection (checked above): the camera's own transform, then K
    pc = camera.to_camera(points[idx])
    z = pc[:, 2]
    pix = np.stack([camera.fx * pc[:, 0] / z + camera.cx, camera.fy * pc[:, 1] / z + camera.cy], 1)
    h, w = rgb_linear.shape[:2]
    inside = (z > 0) & (pix[:, 0] >= 0) & (pix[:, 0] < w - 1) & (pix[:, 1] >= 0) & (pix[:, 1] < h - 1)
    idx, pix, z = idx[inside], pix[inside], z[inside]
    if not len(idx):
        return Observations(np.zeros(0, np.int64), np.zeros((0, 3), np.float32), np.zeros(0, np.float32))
    x0, y0 = np.floor(pix[:, 0]).astype(np.int64), np.floor(pix[:, 1]).astype(np.int64)
    m = cfg.silhouette_margin_px
    bx0, by0 = max(int(x0.min()) - m, 0), max(int(y0.min()) - m, 0)
    depth = mesh_depth(scene, camera, bx0, by0, min(int(x0.max()) + 1 + m, w - 1), min(int(y0.max()) + 1 + m, h - 1))
    c = cos[idx]
    slope = np.sqrt(np.maximum(1 - c**2, 0)) / c  # tan(view angle)
    tol = cfg.depth_tolerance_mm * 1e-3 + 1.5 * z / (0.5 * (camera.fx + camera.fy)) * slope
    # the 4 bilinear neighbours, as flat indices into the depth window and the image
    dx, dy = np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])
    win = (y0 - by0)[:, None] + dy
    win = win * depth.shape[1] + (x0 - bx0)[:, None] + dx
    ok = (np.abs(depth.ravel()[win] - z[:, None]) <= tol[:, None]).all(1)
    if m > 0:
        ok &= ~near_silhouette(depth, m).ravel()[win].any(1)
    img = (y0[ok, None] + dy) * w + x0[ok, None] + dx  # (q, 4)
    fx, fy = (pix[ok, 0] - x0[ok]).astype(np.float32), (pix[ok, 1] - y0[ok]).astype(np.float32)
    bw = np.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], 1)
    colour = np.einsum("qkc,qk->qc", rgb_linear.reshape(-1, 3)[img], bw)
    return Observations(idx[ok], colour.astype(np.float32), c[ok].astype(np.float32))


@dataclass
class _Sums:
    """Running weighted sums over the raster's covered texels."""

    weight: np.ndarray
    colour: np.ndarray
    count: np.ndarray

    @classmethod
    def zeros(cls, k: int) -> _Sums:
        return cls(np.zeros(k), np.zeros((k, 3)), np.zeros(k, np.int64))

    def mean(self) -> np.ndarray:
        """(k, 3) weighted mean colour, 0 where unseen."""
        return np.where(self.weight[:, None] > 0, self.colour / np.maximum(self.weight, 1e-30)[:, None], 0.0)


#: Texels a frame must share with what was already baked before its gain is estimated.
MIN_GAIN_TEXELS = 200


def exposure_gain(sums: _Sums, obs: Observations) -> float:
    """A frame's exposure relative to the texture baked so far: the median, over the
    texels both saw, of the frame's luminance over the texture's (1 when they share
    fewer than :data:`MIN_GAIN_TEXELS` texels or the ratio is not finite)."""
    step = max(1, len(obs.texel) // (20 * MIN_GAIN_TEXELS))  # a median needs no more
    texel, colour = obs.texel[::step], obs.colour[::step]
    prior = sums.weight[texel] > 0
    if prior.sum() < MIN_GAIN_TEXELS:
        return 1.0
    ref = sums.colour[texel[prior]].sum(1) / sums.weight[texel[prior]]
    lum = colour[prior].sum(1)
    bright = ref > 0.03  # dark texels: sensor noise dominates the ratio
    if bright.sum() < MIN_GAIN_TEXELS:
        return 1.0
    gain = float(np.median(lum[bright] / ref[bright]))
    return gain if np.isfinite(gain) and gain > 0 else 1.0


#: Triangles whose face normal misses min_cos by more than this for every view of an
#: expression are not interpolated (vertex normals inside a triangle differ from its
#: face normal by less than this on the template, except at creases the depth test drops).
CULL_MARGIN = 0.3


def _candidate_texels(raster: UvRaster, triangles: np.ndarray, vertices: np.ndarray,
                      views: list[View], cfg: TextureConfig) -> np.ndarray:
    """(s,) indices of the texels whose triangle faces at least one view's camera."""
    corners = vertices[triangles]
    normal = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-20)
    centre = corners.mean(1)
    facing = np.zeros(len(triangles), bool)
    for view in views:
        to_cam = view.camera.t_world_from_camera - centre
        cos = np.einsum("ij,ij->i", normal, to_cam) / np.linalg.norm(to_cam, axis=1)
        facing |= cos >= cfg.min_cos - CULL_MARGIN
    return np.flatnonzero(facing[raster.triangle])


def observe_expression(shared: tuple[UvRaster, np.ndarray, TextureConfig],
                       item: tuple[str, np.ndarray, list[View]]) -> list[Observations]:
    """What each view of one posed mesh sees of the atlas (:func:`observe` per view).

    Args:
        shared: (the raster, its mesh's (m, 3) triangles, the config).
        item: (expression, vertices (n, 3) head frame metres, views).

    Returns:
        One :class:`Observations` per view, texels as indices into the raster's texels.
    """
    raster, triangles, cfg = shared
    _, vertices, views = item
    vertices = np.asarray(vertices, np.float64)
    scene = Scene(vertices, triangles)
    sub = _candidate_texels(raster, triangles, vertices, views, cfg)
    geometry = raster.interpolate(triangles, np.concatenate(
        [vertices, vertex_normals(vertices, triangles)], 1).astype(np.float32), sub)
    points, normals = geometry[:, :3], geometry[:, 3:]
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    out = []
    for view in views:
        rgb = view.rgb() if callable(view.rgb) else view.rgb
        obs = observe(points, normals, scene, view.camera, SRGB8_TO_LINEAR[np.asarray(rgb, np.uint8)], cfg)
        out.append(Observations(sub[obs.texel], obs.colour, obs.cos))
    return out


def bake(raster: UvRaster, triangles: np.ndarray,
         expressions: Iterable[tuple[str, np.ndarray, list[View]]], cfg: TextureConfig
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Bakes frames of posed meshes into the raster's texels.

    The expressions are observed ``cfg.workers`` at a time (:func:`observe_expression` in
    worker processes, :func:`stages.parallel.process_map`); the observations are
    accumulated here in expression and view order (each frame's exposure gain depends on
    what was baked before it), so the result does not depend on the worker count.

    Args:
        raster: the atlas's covered texels (:func:`rigs.uv_raster.model_uv_raster`).
        triangles: (m, 3) the mesh's triangles (the raster's triangle ids index them);
            every triangle takes part in the depth test, texel owner or not.
        expressions: (name, vertices (n, 3) head frame metres, views) per expression;
            the views' images must be picklable (arrays, or callables such as
            :class:`stages.texture.PhoneRgb`) when ``cfg.workers`` is not 1.
        cfg: the texture config.

    Returns:
        (colour (k, 3) float64 linear weighted mean, 0 where unseen; weight (k,) summed
        weights; count (k,) int64 frames that saw each texel; one row per view:
        expression, frame_index, status, reason, texels, mean_cos, gain).
    """
    from stages.parallel import process_map

    sums = _Sums.zeros(len(raster.texel))
    rows: list[dict[str, Any]] = []
    gains: list[float] = []
    expressions = list(expressions)
    seen = process_map(observe_expression, expressions, cfg.workers, shared=(raster, np.asarray(triangles), cfg))
    for (name, _, views), observations in zip(expressions, seen, strict=True):
        for view, obs in zip(views, observations, strict=True):
            row = {"expression": name, "frame_index": int(view.frame), "texels": len(obs.texel),
                   "mean_cos": float(obs.cos.mean()) if len(obs.texel) else float("nan"), "gain": float("nan")}
            if not len(obs.texel):
                rows.append({**row, "status": "skipped", "reason": "no texel visible: the mesh is outside "
                             "the image, faces away or is occluded"})
                continue
            gain = exposure_gain(sums, obs) if cfg.exposure_compensation else 1.0
            gains.append(gain)
            w = obs.cos.astype(np.float64) ** cfg.angle_power
            sums.weight[obs.texel] += w
            sums.colour[obs.texel] += w[:, None] * obs.colour / gain
            sums.count[obs.texel] += 1
            rows.append({**row, "status": "used", "reason": "", "gain": gain})
    # express the texture at the median exposure rather than the first frame's
    scale = float(np.median(gains)) if gains else 1.0
    return sums.mean() * scale, sums.weight, sums.count, rows


def fill_gutter(linear: np.ndarray, seen: np.ndarray, texels: int) -> np.ndarray:
    """Grows seen colour into unseen texels, ``texels`` rings deep (mean of filled 3x3 neighbours).

    Args:
        linear: (H, W, 3) colour, valid where ``seen``.
        seen: (H, W) bool.
        texels: number of rings.

    Returns:
        (H, W, 3) float32 colour, 0 where neither seen nor filled.
    """
    import cv2

    filled = seen.copy()
    out = np.where(seen[..., None], linear, 0.0).astype(np.float32)
    for _ in range(texels):
        s = cv2.boxFilter(out, -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
        n = cv2.boxFilter(filled.astype(np.float32), -1, (3, 3), normalize=False, borderType=cv2.BORDER_CONSTANT)
        grow = ~filled & (n > 0)
        if not grow.any():
            break
        out[grow] = s[grow] / n[grow, None]
        filled |= grow
    return out
