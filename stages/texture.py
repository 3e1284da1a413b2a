"""The subject's UV texture: phone RGB fused into the template's UV atlas (issue 7 step 5).

For each refined expression mesh (head frame) and each frame fusion registered, the
texels of the atlas (:mod:`rigs.uv_raster`) are placed on the mesh, projected into the
frame, tested for visibility against the mesh's own depth rendered from that camera, and
bilinearly sample the frame's RGB in linear light. Each observation is weighted by
``cos(view angle) ** angle_power``; the texture is the weighted mean over all frames of all
expressions (UVs correspond across expressions), optionally after a per-frame exposure
gain is solved from the face's vertices. Texels that no frame sees have confidence 0 and
alpha 0 in the RGBA PNG. The method, config and measured accuracy are in docs/texture.md.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.config import check_fields, config_section
from pipeline.errors import ConfigError, StageError
from rigs.camera import Camera, PinholeIntrinsics
from rigs.raycast import Scene, vertex_normals
from rigs.uv_raster import UvRaster, model_uv_raster

#: Which model parts own texels. ICT maps each eyeball onto its own full unit square,
#: on top of the face tile, so eyeballs never own texels (they still occlude).
Atlas = Literal["head", "head_mouth"]
ATLAS_PARTS: dict[str, tuple[str, ...]] = {
    "head": ("face", "head_neck", "mouth_socket", "eye_socket_left", "eye_socket_right"),
    "head_mouth": ("face", "head_neck", "mouth_socket", "eye_socket_left", "eye_socket_right",
                   "gums_tongue", "teeth"),
}
#: PNG compression level of the texture (fixed: the bytes are reproducible).
PNG_COMPRESSION = 6


@dataclass(frozen=True)
class TextureConfig:
    """The UV texture baked from the phone frames (issue 7 step 5)."""

    resolution: int = 512
    """Texels per UV tile side; the atlas is resolution x (tiles * resolution). A 480 x 640
    phone frame at 0.3-0.38 m puts about 400 pixels across the face, which the face tile
    at 512 matches. In [64, 4096]."""
    atlas: Atlas = "head_mouth"
    """Parts that own texels: "head" (face, head and neck, eye and mouth sockets: 2 tiles)
    or "head_mouth" (plus gums, tongue and teeth: 4 tiles). Eyeballs never do (their UVs
    overlap the face tile)."""
    angle_power: float = 2.0
    """An observation weighs cos(view angle) ** angle_power (0 = all visible views equal). >= 0."""
    min_cos: float = 0.3
    """Observations whose cos(view angle) (texel normal vs direction to the camera) is
    below this are dropped: grazing views smear and their depth test is weak. In (0, 1)."""
    depth_tolerance_mm: float = 1.0
    """A texel is visible when the mesh depth at the 4 pixels around its projection is its
    own depth within this tolerance plus the depth change of its tilted surface over 1.5
    pixels (so silhouettes and occluders are kept out of the bilinear sample), mm. > 0."""
    max_frames_per_expression: int = 2
    """Use at most this many registered frames of each expression, the most frontal first
    (0 = all). Each frame costs ~60 ms of one core at 480 x 640 and 512 texels per tile;
    2 of the standard subject's 4 keep the stage near 15 s. >= 0."""
    exposure_compensation: bool = True
    """Solve one gain per frame (phone auto-exposure) from the face vertices the frames
    share, and divide it out before averaging."""
    gutter_texels: int = 4
    """The PNG's colour is grown this many texels into the unseen texels around seen ones
    (alpha stays 0 there), so that filtered look-ups at island borders do not fetch black. >= 0."""

    def __post_init__(self) -> None:
        check_fields(self)
        rules = (
            ("resolution", 64 <= self.resolution <= 4096, "in [64, 4096]"),
            ("angle_power", self.angle_power >= 0, ">= 0"),
            ("min_cos", 0 < self.min_cos < 1, "in (0, 1)"),
            ("depth_tolerance_mm", self.depth_tolerance_mm > 0, "> 0"),
            ("max_frames_per_expression", self.max_frames_per_expression >= 0, ">= 0"),
            ("gutter_texels", self.gutter_texels >= 0, ">= 0"),
        )
        for name, ok, rule in rules:
            if not ok:
                raise ConfigError(f"texture.{name} must be {rule}, got {getattr(self, name)}")

    @property
    def parts(self) -> tuple[str, ...]:
        """The model parts that own texels."""
        return ATLAS_PARTS[self.atlas]


# ------------------------------------------------------------------------ colour


def srgb_to_linear(srgb: np.ndarray) -> np.ndarray:
    """sRGB-encoded values in [0, 1] -> linear light (IEC 61966-2-1), float32."""
    s = np.asarray(srgb, np.float32)
    return np.where(s <= 0.04045, s / 12.92, ((s + 0.055) / 1.055) ** 2.4).astype(np.float32)


def linear_to_srgb(linear: np.ndarray) -> np.ndarray:
    """Linear light -> sRGB-encoded values in [0, 1] (clipped), float32."""
    c = np.clip(np.asarray(linear, np.float32), 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055).astype(np.float32)


_SRGB8_TO_LINEAR = srgb_to_linear(np.arange(256) / 255.0)


def _encode8(linear: np.ndarray) -> np.ndarray:
    return np.round(linear_to_srgb(linear) * 255.0).astype(np.uint8)


# ------------------------------------------------------------------------ the artifact


@dataclass(frozen=True, eq=False)
class UvTexture:
    """A subject's baked UV texture and how confident each texel is.

    Attributes:
        subject_id: the subject.
        model: face model name and version, e.g. "ict-face-model-light/ict-1".
        resolution: texels per UV tile side.
        atlas: the :data:`Atlas` choice (which parts own texels).
        rgba: (H, W, 4) uint8 sRGB texture; alpha 255 where a frame saw the texel, 0
            where none did (there the colour is the gutter fill near seen texels, else 0).
        weight: (H, W) float32 summed observation weight (0 = unseen): the confidence.
        frames: (H, W) uint16 number of frames that saw each texel.
        covered: (H, W) bool texels some atlas triangle covers (the UV islands).
        rows: one record per phone frame (see :meth:`table`).
        skipped: {expression: reason} for expressions that gave no observation.
    """

    subject_id: str
    model: str
    resolution: int
    atlas: str
    rgba: np.ndarray
    weight: np.ndarray
    frames: np.ndarray
    covered: np.ndarray
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def seen(self) -> np.ndarray:
        """(H, W) bool texels at least one frame saw."""
        return self.rgba[..., 3] > 0

    def image(self, linear: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """The texture as a float image and its confidence.

        Args:
            linear: linear light (for shading and appearance models) or sRGB-encoded.

        Returns:
            (rgb (H, W, 3) float32 in [0, 1], 0 where unseen; weight (H, W) float32,
            the summed observation weight, 0 where unseen).
        """
        rgb = self.rgba[..., :3]
        out = _SRGB8_TO_LINEAR[rgb] if linear else rgb.astype(np.float32) / 255.0
        return np.where(self.seen[..., None], out, 0.0).astype(np.float32), self.weight

    def coverage(self, mask: np.ndarray | None = None) -> float:
        """Fraction of covered texels (inside ``mask`` (H, W) bool if given) that were seen."""
        inside = self.covered if mask is None else self.covered & mask
        return float(self.seen[inside].mean()) if inside.any() else 0.0

    def png(self) -> bytes:
        """The RGBA texture as PNG bytes (reproducible: fixed encoder settings)."""
        import cv2

        ok, buf = cv2.imencode(".png", np.ascontiguousarray(self.rgba[..., [2, 1, 0, 3]]),
                               [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
        if not ok:
            raise StageError("OpenCV could not encode the texture PNG")
        return buf.tobytes()

    def table(self) -> Any:
        """Per phone frame: status ("used"/"skipped"), reason, texels seen, mean cos, gain."""
        import pyarrow as pa

        schema = pa.schema([
            ("subject_id", pa.string()), ("expression", pa.string()), ("frame_index", pa.int32()),
            ("status", pa.string()), ("reason", pa.string()), ("texels", pa.int64()),
            ("mean_cos", pa.float64()), ("gain", pa.float64())])
        return pa.Table.from_pylist([{"subject_id": self.subject_id, **r} for r in self.rows], schema=schema)

    def to_output(self) -> Any:
        """A :class:`pipeline.serialize.StageOutput`: arrays ``texture_png`` (the PNG's bytes
        as uint8), ``weight``, ``frames``, ``covered``; meta; table ``rows``."""
        from pipeline.serialize import StageOutput

        seen = self.seen
        return StageOutput(
            arrays={"texture_png": np.frombuffer(self.png(), np.uint8).copy(), "weight": self.weight,
                    "frames": self.frames, "covered": self.covered},
            meta={"subject_id": self.subject_id, "model": self.model, "resolution": self.resolution,
                  "atlas": self.atlas, "shape": list(self.weight.shape), "colour": "sRGB",
                  "alpha": "255 = seen by >= 1 frame, 0 = unseen", "skipped": dict(self.skipped),
                  "coverage": round(self.coverage(), 6), "texels_seen": int(seen.sum())},
            tables={"rows": self.table()},
        )

    @classmethod
    def from_output(cls, output: Any) -> UvTexture:
        """Inverse of :meth:`to_output`.

        Raises:
            StageError: a part is missing or the PNG does not decode to the stored shape.
        """
        import cv2

        missing = ({"texture_png", "weight", "frames", "covered"} - set(output.arrays)) | (
            {"subject_id", "model", "resolution", "atlas", "skipped"} - set(output.meta))
        if missing:
            raise StageError(f"texture output lacks {', '.join(sorted(missing))}")
        bgra = cv2.imdecode(np.asarray(output.arrays["texture_png"], np.uint8), cv2.IMREAD_UNCHANGED)
        weight = np.asarray(output.arrays["weight"], np.float32)
        if bgra is None or bgra.shape != (*weight.shape, 4):
            raise StageError(f"texture PNG does not decode to {(*weight.shape, 4)}")
        m = output.meta
        rows = output.tables["rows"].drop(["subject_id"]).to_pylist() if "rows" in output.tables else []
        return cls(str(m["subject_id"]), str(m["model"]), int(m["resolution"]), str(m["atlas"]),
                   np.ascontiguousarray(bgra[..., [2, 1, 0, 3]]), weight,
                   np.asarray(output.arrays["frames"], np.uint16), np.asarray(output.arrays["covered"], bool),
                   rows, dict(m["skipped"]))


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


def sample_vertices(texture: UvTexture, model: Any, linear: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The texture's colour at every vertex of the face model.

    A vertex on a UV seam has several UVs; their samples are averaged, weighted by
    confidence. Vertices of parts outside the atlas (the eyeballs) get confidence 0.

    Args:
        texture: the baked texture.
        model: the :class:`rigs.face_model.FaceModel` it was baked for.
        linear: linear-light colours (default) or sRGB-encoded ones.

    Returns:
        (rgb (n, 3) float32, 0 where unseen; confidence (n,) float32, 0 where unseen).
    """
    from rigs.uv_raster import part_triangles, uv_to_texel

    rgb, weight = texture.image(linear)
    tris = part_triangles(model, ATLAS_PARTS[texture.atlas])
    vid = np.asarray(model.triangles)[tris].ravel()
    uid = np.asarray(model.triangle_uv)[tris].ravel()
    pairs = np.unique(np.stack([vid, uid], 1), axis=0)  # each (vertex, uv) once
    vals, conf = sample_texture(rgb, weight, uv_to_texel(model.uv[pairs[:, 1]], texture.resolution))
    n = model.n_vertices
    wsum = np.bincount(pairs[:, 0], conf, n)
    out = np.stack([np.bincount(pairs[:, 0], conf * vals[:, c], n) for c in range(3)], 1)
    out = np.where(wsum[:, None] > 0, out / np.maximum(wsum, 1e-12)[:, None], 0.0)
    count = np.bincount(pairs[:, 0], minlength=n)
    return out.astype(np.float32), (wsum / np.maximum(count, 1)).astype(np.float32)


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


def observe(points: np.ndarray, normals: np.ndarray, scene: Scene, camera: Camera,
            rgb_linear: np.ndarray, cfg: TextureConfig) -> Observations:
    """What one frame sees of a set of surface points (texels) and their colours there.

    A point is observed when it faces the camera (cos >= ``cfg.min_cos``), projects
    inside the image with its 4 bilinear neighbours, and the mesh depth rendered at those
    4 pixels is its own depth within ``depth_tolerance_mm`` plus its surface's depth
    change over 1.5 pixels (nothing in front, no silhouette inside the sample).

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
    bx0, by0 = int(x0.min()), int(y0.min())
    depth = mesh_depth(scene, camera, bx0, by0, int(x0.max()) + 1, int(y0.max()) + 1)
    c = cos[idx]
    slope = np.sqrt(np.maximum(1 - c**2, 0)) / c  # tan(view angle)
    tol = cfg.depth_tolerance_mm * 1e-3 + 1.5 * z / (0.5 * (camera.fx + camera.fy)) * slope
    # the 4 bilinear neighbours, as flat indices into the depth window and the image
    dx, dy = np.array([0, 1, 0, 1]), np.array([0, 0, 1, 1])
    win = (y0 - by0)[:, None] + dy
    win = win * depth.shape[1] + (x0 - bx0)[:, None] + dx
    ok = (np.abs(depth.ravel()[win] - z[:, None]) <= tol[:, None]).all(1)
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


def bake(raster: UvRaster, triangles: np.ndarray,
         expressions: Iterable[tuple[str, np.ndarray, list[View]]], cfg: TextureConfig
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Bakes frames of posed meshes into the raster's texels.

    Args:
        raster: the atlas's covered texels (:func:`rigs.uv_raster.model_uv_raster`).
        triangles: (m, 3) the mesh's triangles (the raster's triangle ids index them);
            every triangle takes part in the depth test, texel owner or not.
        expressions: (name, vertices (n, 3) head frame metres, views) per expression.
        cfg: the texture config.

    Returns:
        (colour (k, 3) float64 linear weighted mean, 0 where unseen; weight (k,) summed
        weights; count (k,) int64 frames that saw each texel; one row per view:
        expression, frame_index, status, reason, texels, mean_cos, gain).
    """
    sums = _Sums.zeros(len(raster.texel))
    rows: list[dict[str, Any]] = []
    gains: list[float] = []
    triangles = np.asarray(triangles)
    for name, vertices, views in expressions:
        vertices = np.asarray(vertices, np.float64)
        scene = Scene(vertices, triangles)
        sub = _candidate_texels(raster, triangles, vertices, views, cfg)
        geometry = raster.interpolate(triangles, np.concatenate(
            [vertices, vertex_normals(vertices, triangles)], 1).astype(np.float32), sub)
        points, normals = geometry[:, :3], geometry[:, 3:]
        normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
        for view in views:
            rgb = view.rgb() if callable(view.rgb) else view.rgb
            obs = observe(points, normals, scene, view.camera, _SRGB8_TO_LINEAR[np.asarray(rgb, np.uint8)], cfg)
            obs = Observations(sub[obs.texel], obs.colour, obs.cos)
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


# ------------------------------------------------------------------------ the stage


@dataclass(frozen=True, eq=False)
class RefinedMeshes:
    """The keys of the refine stage's ``RefinedSubject`` artifact this stage reads.

    Attributes:
        subject_id: the subject.
        vertices: expression -> (n, 3) refined mesh, head frame, metres (capture order).
        scan_from_head: expression -> (4, 4) reference-camera-from-head pose.
        rejected: expression -> why refine left it out.
    """

    subject_id: str
    vertices: dict[str, np.ndarray]
    scan_from_head: dict[str, np.ndarray]
    rejected: dict[str, str]

    @classmethod
    def from_output(cls, output: Any) -> RefinedMeshes:
        """Reads meta ``expressions``/``rejected``/``subject_id`` and arrays
        ``<expr>.vertices``, ``<expr>.scan_from_head``.

        Raises:
            StageError: a listed expression lacks an array, or an array has a bad shape.
        """
        meta = output.meta
        if "expressions" not in meta:
            raise StageError("refine output lacks its expression list")
        verts, poses = {}, {}
        for e in meta["expressions"]:
            v, T = output.arrays.get(f"{e}.vertices"), output.arrays.get(f"{e}.scan_from_head")
            if v is None or T is None:
                raise StageError(f"refine output lacks {e}.vertices or {e}.scan_from_head")
            if np.ndim(v) != 2 or np.shape(v)[1] != 3 or np.shape(T) != (4, 4):
                raise StageError(f"refine output {e}: vertices must be (n, 3) and scan_from_head (4, 4), "
                                 f"got {np.shape(v)} and {np.shape(T)}")
            verts[str(e)], poses[str(e)] = np.asarray(v), np.asarray(T, np.float64)
        return cls(str(meta.get("subject_id", "")), verts, poses,
                   {str(k): str(r) for k, r in dict(meta.get("rejected", {})).items()})


def select_views(capture: Any, expression: str, fused: Any, scan_from_head: np.ndarray,
                 cfg: TextureConfig) -> tuple[list[View], list[dict[str, Any]]]:
    """The frames of one expression to bake (registered by fusion, the most frontal first,
    at most ``max_frames_per_expression``), and a row for each frame left out."""
    intr = capture.phone_intrinsics(expression)
    views, rows = [], []
    ids = fused.frame_ids.tolist()
    for f in ids:
        if f not in set(fused.frames_used.tolist()):
            rows.append({"expression": expression, "frame_index": int(f), "status": "skipped",
                         "reason": "not registered by fusion", "texels": 0, "mean_cos": float("nan"),
                         "gain": float("nan")})
            continue
        pose = fused.poses[ids.index(f)]
        cam = camera_from_pose(intr, np.linalg.inv(pose) @ scan_from_head)
        views.append(View(int(f), cam, lambda e=expression, i=int(f): capture.read_phone_frame(e, i).rgb))
    views.sort(key=lambda v: (-frontalness(v.camera), v.frame))
    keep = cfg.max_frames_per_expression or len(views)
    for v in views[keep:]:
        rows.append({"expression": expression, "frame_index": v.frame, "status": "skipped",
                     "reason": f"not among the {keep} most frontal frames (max_frames_per_expression)",
                     "texels": 0, "mean_cos": float("nan"), "gain": float("nan")})
    return views[:keep], rows


def make_texture(subject_id: str, model: Any, raster: UvRaster, colour: np.ndarray, weight: np.ndarray,
                 count: np.ndarray, rows: list[dict[str, Any]], skipped: dict[str, str],
                 cfg: TextureConfig) -> UvTexture:
    """Assembles the :class:`UvTexture` from :func:`bake`'s per-texel results."""
    seen = raster.scatter(weight > 0, False)
    linear = fill_gutter(raster.scatter(colour.astype(np.float32)), seen, cfg.gutter_texels)
    rgba = np.concatenate([_encode8(linear), np.where(seen, 255, 0).astype(np.uint8)[..., None]], -1)
    return UvTexture(subject_id, f"{model.name}/{model.version}", cfg.resolution, cfg.atlas, rgba,
                     raster.scatter(weight.astype(np.float32)),
                     raster.scatter(np.minimum(count, np.iinfo(np.uint16).max).astype(np.uint16)),
                     raster.scatter(np.ones(len(raster.texel), bool), False), rows, skipped)


def texture_subject(capture: Any, fused: Any, refined: RefinedMeshes, cfg: TextureConfig,
                    model: Any = None) -> UvTexture:
    """Bakes the UV texture of one subject from its refined meshes and phone frames.

    Args:
        capture: an opened :class:`storage.capture.Capture`.
        fused: the fusion stage's :class:`stages.fusion.FusedScans`.
        refined: the refined meshes and poses.
        cfg: the texture section.
        model: the face model whose topology the meshes have; the embedded ICT model by default.

    Raises:
        StageError: the meshes do not have the model's topology, or no frame saw any texel.
    """
    from rigs.face_model import load_ict_face_model

    model = model or load_ict_face_model()
    raster = model_uv_raster(model, cfg.resolution, cfg.parts)
    skipped = {e: f"refine: {r}" for e, r in refined.rejected.items()}
    rows: list[dict[str, Any]] = []
    work = []
    for e in capture.phone_expressions:
        f = fused.expressions.get(e)
        if e not in refined.vertices or f is None or not f.ok:
            if e in refined.vertices:
                skipped[e] = "fusion: " + (f.reason if f is not None else "no fused scan")
            skipped.setdefault(e, "no refined mesh")
            rows += [{"expression": e, "frame_index": i, "status": "skipped", "reason": f"expression skipped: {skipped[e]}",
                      "texels": 0, "mean_cos": float("nan"), "gain": float("nan")}
                     for i in range(capture.phone_frame_count(e))]
            continue
        if refined.vertices[e].shape != (model.n_vertices, 3):
            raise StageError(f"refined mesh of {e!r} has {refined.vertices[e].shape[0]} vertices; "
                             f"the face model {model.name} has {model.n_vertices}")
        views, left_out = select_views(capture, e, f, refined.scan_from_head[e], cfg)
        rows += left_out
        work.append((e, refined.vertices[e], views))
    colour, weight, count, baked = bake(raster, np.asarray(model.triangles), work, cfg)
    if not (weight > 0).any():
        raise StageError(f"no phone frame of subject {capture.subject_id!r} saw any texel "
                         f"(skipped: {skipped or 'none'})")
    for e, _, _views in work:
        if not any(r["expression"] == e and r["status"] == "used" for r in baked):
            skipped[e] = "no frame saw any texel"
    order = {e: i for i, e in enumerate(capture.phone_expressions)}
    rows = sorted(rows + baked, key=lambda r: (order[r["expression"]], r["frame_index"]))
    return make_texture(capture.subject_id, model, raster, colour, weight, count, rows, skipped, cfg)


def texture_capture(capture: Any, fusion: Any, refine: Any, config: Any = None) -> Any:
    """Stage ``texture``: the phone RGB fused into the template's UV atlas.

    Args:
        capture: the capture folder (the engine's ``"capture"`` input) or an opened Capture.
        fusion: the ``fusion`` stage's loaded artifact.
        refine: the ``refine`` stage's loaded artifact (``RefinedSubject``).
        config: the engine's config view declaring ``texture``, or a :class:`TextureConfig`.

    Returns:
        ``UvTexture.to_output()``.
    """
    from stages.fusion import FusedScans
    from storage.capture import Capture

    cap = Capture.open(capture) if isinstance(capture, str | os.PathLike) else capture
    cfg = config_section(config, "texture", TextureConfig)
    return texture_subject(cap, FusedScans.from_output(fusion), RefinedMeshes.from_output(refine), cfg).to_output()

