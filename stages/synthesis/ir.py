"""IR image formation of the synthetic headset cameras: LED shading, sensor noise, response.

Default model: each camera carries a co-located near-IR LED, so brightness falls with the
square of the distance and with the angle to the surface normal (Lambert plus an ambient
floor); skin is bright and even in near-IR, the pupil dark (:func:`ir_albedo`); then cos^4
vignetting, read and shot noise, gamma 2.2 and 8-bit quantisation. :class:`IrShading` and
:class:`SensorNoise` carry every figure, so a generator variant can change the image
formation (an offset LED, another falloff, a sheen lobe, another response, fixed-pattern
noise).

Speed (docs/synthetic-data.md has the figures): the cameras are fixed in the headset frame,
so all their pixel rays form one constant ray batch, cast once per frame into the posed
mesh; shading runs on the pixels that hit the face only, channel-major (long contiguous
NumPy loops), one camera per thread on as many threads as there are cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rigs.camera import Camera
from rigs.raycast import Scene
from stages.synthesis.texture import PhotoTexture, sample_image


@dataclass(frozen=True)
class IrShading:
    """How a camera's near-IR LED lights the face and how the sensor responds.

    radiance = gain * (albedo * (ambient + (1 - ambient) cos) + sheen * cos_h^sheen_exponent)
    * (reference_m / d)^falloff_power * cos_axis^vignette_power, where cos is between the
    normal and the direction to the LED, d the LED-to-surface distance, cos_h the
    Blinn-Phong half-vector cosine and cos_axis the ray's angle to the optical axis.
    Pixel = 255 * (black_level + (1 - black_level) * radiance^(1 / gamma)), rounded.

    Attributes:
        led_offset_m: LED position in the camera frame (x right, y down, z forward), metres;
            (0, 0, 0) = co-located with the camera.
        ambient: the angle-independent part of the diffuse term, in [0, 1].
        falloff_power: exponent of the distance falloff (2 = inverse square).
        reference_m: distance at which the falloff factor is 1, metres.
        gain: exposure multiplier.
        sheen: strength of a specular sheen lobe added to the diffuse term (0 = matte skin).
        sheen_exponent: Blinn-Phong exponent of the sheen lobe.
        vignette_power: exponent of the cos vignetting.
        background: radiance of pixels that see no face.
        gamma: response exponent (pixel ~ radiance^(1 / gamma)).
        black_level: output of zero radiance, as a fraction of full scale.
    """

    led_offset_m: tuple[float, float, float] = (0.0, 0.0, 0.0)
    ambient: float = 0.15
    falloff_power: float = 2.0
    reference_m: float = 0.05
    gain: float = 0.8
    sheen: float = 0.0
    sheen_exponent: float = 16.0
    vignette_power: float = 4.0
    background: float = 0.01
    gamma: float = 2.2
    black_level: float = 0.0


@dataclass(frozen=True)
class SensorNoise:
    """Sensor noise, in linear radiance units (full scale = 1).

    Attributes:
        read_std: standard deviation of the signal-independent read noise.
        shot_gain: shot-noise variance per unit radiance (variance = read_std^2 + shot_gain * radiance).
        prnu_std: fixed-pattern gain: each pixel's gain is 1 + N(0, prnu_std^2), drawn once per
            camera and subject (0 = none).
        column_std: fixed-pattern offset: each column gets N(0, column_std^2), drawn once per
            camera and subject (0 = none).
    """

    read_std: float = 0.02
    shot_gain: float = 0.004
    prnu_std: float = 0.0
    column_std: float = 0.0


#: Near-IR luminance weights of linear RGB albedo.
IR_LUMA = np.array([0.3, 0.5, 0.2], np.float32)


def ir_albedo_of_luminance(lum: np.ndarray) -> np.ndarray:
    """Near-IR albedo of a luminance (:data:`IR_LUMA` of linear RGB albedo), float32.

    Skin reflects near-IR strongly and evenly, so contrast is compressed (square root of
    luminance) while the pupil, brows and mouth interior stay darker than skin.
    """
    return (0.1 + 0.85 * np.sqrt(np.clip(lum, 0, 1))).astype(np.float32)


def ir_albedo(rgb_albedo: np.ndarray) -> np.ndarray:
    """(..., 3) linear RGB albedo -> (...) near-IR albedo."""
    return ir_albedo_of_luminance(rgb_albedo @ IR_LUMA)


def vertex_normal_operator(triangles: np.ndarray, n_vertices: int):
    """Sparse (n_vertices, m) incidence matrix: vertex normals = operator @ face normals."""
    from scipy.sparse import csr_matrix

    rows = np.asarray(triangles).T.ravel()
    cols = np.tile(np.arange(len(triangles)), 3)
    return csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_vertices, len(triangles)))


def fast_vertex_normals(vertices: np.ndarray, triangles: np.ndarray, operator) -> np.ndarray:
    """(n, 3) float32 unit area-weighted vertex normals (as :func:`rigs.raycast.vertex_normals`)."""
    v = np.asarray(vertices)[triangles]  # float32 cross products, as rigs.raycast.vertex_normals
    n = operator @ np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    return (n / np.maximum(np.linalg.norm(n, axis=1, keepdims=True), 1e-20)).astype(np.float32)


def interpolate(values: np.ndarray, corners: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """(C, p) float32 barycentric interpolation of channel-major per-vertex ``values`` (C, n).

    Args:
        corners: (3, p) vertex ids of each point's triangle corners.
        bary: (3, p) float32 weights.
    """
    out = np.take(values, corners[0], axis=1)
    out *= bary[0]
    for k in (1, 2):
        out += np.take(values, corners[k], axis=1) * bary[k]
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    """Columns of (3, p) scaled to unit length."""
    return v / np.maximum(np.sqrt((v * v).sum(0)), 1e-9)


@dataclass(frozen=True, eq=False)
class _Hits:
    """One frame's ray-cast results over all cameras' rays (N = C * H * W)."""

    t: np.ndarray  # (N,) float32, inf where no hit
    triangle: np.ndarray  # (N,) uint32
    uv: np.ndarray  # (N, 2) float32: barycentrics of corners 1 and 2
    normals: np.ndarray  # (3, n) float32 vertex normals of the posed mesh


class IrRenderer:
    """Renders all rig cameras of a frame with one ray cast.

    Args:
        cameras: the rig's cameras in the headset frame (all of one image size).
        texture: the skin texture (its untinted albedo is used).
        triangles: (m, 3) mesh triangles.
        shading, noise: the image formation.
        pattern_rng: draws the fixed-pattern noise (only when ``noise`` has some).
        threads: cameras shaded at once (default: the cores this process may use).
    """

    def __init__(
        self,
        cameras: dict[str, Camera],
        texture: PhotoTexture,
        triangles: np.ndarray,
        shading: IrShading = IrShading(),
        noise: SensorNoise = SensorNoise(),
        pattern_rng: np.random.Generator | None = None,
        threads: int | None = None,
    ):
        import open3d as o3d

        from pipeline.cluster import cpu_count

        self.cameras, self.texture, self.triangles = cameras, texture, np.asarray(triangles)
        self.shading, self.noise = shading, noise
        self.threads = threads or min(cpu_count(), len(cameras))
        sizes = {(c.height, c.width) for c in cameras.values()}
        if len(sizes) != 1:
            raise ValueError(f"the cameras must share one image size, got {sorted(sizes)}")
        (self.shape,) = sizes
        rays, axis_cos, leds = [], [], []
        for cam in cameras.values():
            o, d = cam.pixel_rays()
            rays.append(np.concatenate([o, d], -1).reshape(-1, 6))
            axis_cos.append((d @ cam.R_world_from_camera)[..., 2].reshape(-1))
            leds.append(cam.t_world_from_camera + cam.R_world_from_camera @ np.asarray(shading.led_offset_m, float))
        rays = np.concatenate(rays).astype(np.float32)
        self._rays = o3d.core.Tensor(rays)
        self._origins = np.ascontiguousarray(rays[:, :3].T)  # (3, N)
        self._dirs = np.ascontiguousarray(rays[:, 3:].T)  # (3, N) unit
        self._vignette = (np.concatenate(axis_cos) ** shading.vignette_power).astype(np.float32)
        self._leds = np.array(leds, np.float32) if any(shading.led_offset_m) else None
        self._corners = np.ascontiguousarray(self.triangles.T)  # (3, m)
        # The IR albedo needs the albedo's luminance only, which is linear in the texture:
        # sample one luminance channel and interpolate 4 attributes instead of 3 + 6.
        attrs = texture.vertex_attributes
        self._attributes = np.ascontiguousarray(np.concatenate([attrs[:, :3].T, (attrs[:, 3:6] @ IR_LUMA)[None]]))
        self._photo_luminance = np.ascontiguousarray(texture.photo_linear @ IR_LUMA)
        self._normal_operator = vertex_normal_operator(self.triangles, len(attrs))
        self._gain, self._offset = self._fixed_pattern(noise, pattern_rng, len(cameras))

    @property
    def pixels(self) -> int:
        return self.shape[0] * self.shape[1]

    def _fixed_pattern(self, noise: SensorNoise, rng, n_cameras: int) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Per-pixel gain (N,) and per-column offset (N,) of every ray, or None when absent."""
        h, w = self.shape
        gain = offset = None
        if (noise.prnu_std > 0 or noise.column_std > 0) and rng is None:
            raise ValueError("fixed-pattern noise needs a pattern_rng")
        if noise.prnu_std > 0:
            gain = (1 + rng.normal(size=n_cameras * h * w) * noise.prnu_std).astype(np.float32)
        if noise.column_std > 0:
            columns = rng.normal(size=(n_cameras, 1, w)) * noise.column_std
            offset = np.broadcast_to(columns, (n_cameras, h, w)).reshape(-1).astype(np.float32)
        return gain, offset

    def _cast(self, vertices: np.ndarray) -> tuple[_Hits, Scene]:
        scene = Scene(vertices, self.triangles)
        res = scene.scene.cast_rays(self._rays)
        normals = fast_vertex_normals(vertices, self.triangles, self._normal_operator)
        hits = _Hits(res["t_hit"].numpy(), res["primitive_ids"].numpy(), res["primitive_uvs"].numpy(), np.ascontiguousarray(normals.T))
        return hits, scene

    def _radiance(self, hits: _Hits, rays: slice) -> np.ndarray:
        """(len(rays),) float32 noise-free radiance of a range of rays."""
        s = self.shading
        t = hits.t[rays]
        hit = np.flatnonzero(np.isfinite(t))
        idx = hit + rays.start
        corners = np.take(self._corners, hits.triangle[rays][hit], axis=1)
        uv = hits.uv[rays][hit].T
        bary = np.stack([1.0 - (uv[0] + uv[1]), uv[0], uv[1]])
        n = _unit(interpolate(hits.normals, corners, bary))
        photo_x, photo_y, weight, fallback = interpolate(self._attributes, corners, bary)
        lum = weight * sample_image(self._photo_luminance, photo_x, photo_y) + (1 - weight) * fallback
        view = -np.take(self._dirs, idx, axis=1)
        dist = t[hit]
        if self._leds is None:
            light = view
        else:
            camera = idx // self.pixels
            points = np.take(self._origins, idx, axis=1) - view * dist
            to_led = self._leds[camera].T - points
            dist = np.sqrt((to_led * to_led).sum(0))
            light = to_led / dist
        shade = ir_albedo_of_luminance(lum) * (s.ambient + (1 - s.ambient) * np.clip((n * light).sum(0), 0, 1))
        if s.sheen > 0:
            shade += s.sheen * np.clip((n * _unit(light + view)).sum(0), 0, 1) ** s.sheen_exponent
        out = np.full(len(t), s.background, np.float32)
        out[hit] = shade * (s.reference_m / dist) ** s.falloff_power * s.gain * self._vignette[idx]
        return out

    def _image(self, hits: _Hits, camera: int, noise: np.ndarray | None) -> np.ndarray:
        """(H, W) uint8 image of one camera; ``noise`` holds its standard-normal draws."""
        rays = slice(camera * self.pixels, (camera + 1) * self.pixels)
        radiance = self._radiance(hits, rays)
        if self._gain is not None:
            radiance *= self._gain[rays]
        if self._offset is not None:
            radiance += self._offset[rays]
        if noise is not None:
            sigma = np.sqrt(np.float32(self.noise.read_std**2) + np.float32(self.noise.shot_gain) * np.clip(radiance, 0, None))
            radiance += noise.astype(np.float32) * sigma
        s = self.shading
        level = np.clip(radiance, 0, 1) ** np.float32(1 / s.gamma)
        if s.black_level:
            level = s.black_level + (1 - s.black_level) * level
        return (level * 255 + 0.5).astype(np.uint8).reshape(self.shape)

    def render(self, vertices: np.ndarray, rng: np.random.Generator | None) -> tuple[dict[str, np.ndarray], Scene]:
        """IR images (uint8, H x W) of posed ``vertices`` (headset frame), and the scene.

        ``rng=None`` renders without the temporal noise (the fixed pattern stays: it is
        part of the sensor). The noise is one float64 standard-normal draw per pixel,
        cameras in rig order: the stream of the renderer before the batched one.
        """
        from concurrent.futures import ThreadPoolExecutor

        hits, scene = self._cast(np.asarray(vertices, np.float32))
        noise = None if rng is None else rng.normal(size=len(self.cameras) * self.pixels)
        cams = range(len(self.cameras))
        draws = [None if noise is None else noise[c * self.pixels : (c + 1) * self.pixels] for c in cams]
        with ThreadPoolExecutor(self.threads) as pool:  # NumPy and OpenCV release the GIL
            images = list(pool.map(self._image, [hits] * len(cams), cams, draws))
        return dict(zip(self.cameras, images, strict=True)), scene
