"""The headset camera rig and its IR images.

The headset frame coincides with the head frame at the nominal donning (head pose R = I,
t = 0); headset slip moves the head away from it. Five embedded cameras (2 eye, 2 mouth,
1 glabella) sit close to the face at oblique angles, as on a consumer headset; five
ground-truth cameras (2 eye, 2 boom, 1 glabella) see the face more frontally (REFA Fig. 1-2).

IR shading: each camera carries a co-located near-IR LED, so brightness falls with the
square of the distance and with the angle to the surface normal; skin is bright and even
in near-IR, the pupil dark; then vignetting, read and shot noise, 8-bit quantisation.
"""

from __future__ import annotations

import numpy as np

from rigs.camera import Camera
from rigs.raycast import Scene, make_gbuffer, vertex_normals
from stages.synthesis.texture import PhotoTexture
from storage.capture_types import HmcCamera, HmcRig

HMC_SIZE = 400
RIG_VERSION = "synthetic-hmc-1"
UP = np.array([0.0, 1.0, 0.0])
#: name: (role, mirrored, position, look-at target, focal px at 400 px, k1, k2)
CAMERA_LAYOUT: dict[str, tuple[str, bool, tuple, tuple, float, float, float]] = {
    "eye_left": ("embedded", True, (0.037, 0.012, 0.130), (0.031, 0.036, 0.093), 200.0, -0.12, 0.015),
    "eye_right": ("embedded", False, (-0.037, 0.012, 0.130), (-0.031, 0.036, 0.093), 200.0, -0.12, 0.015),
    "mouth_left": ("embedded", True, (0.042, -0.022, 0.142), (0.000, -0.048, 0.115), 165.0, -0.10, 0.010),
    "mouth_right": ("embedded", False, (-0.042, -0.022, 0.142), (0.000, -0.048, 0.115), 165.0, -0.10, 0.010),
    "glabella": ("embedded", False, (0.000, 0.055, 0.135), (0.000, 0.040, 0.105), 190.0, -0.10, 0.010),
    "gt_eye_left": ("gt", False, (0.033, 0.030, 0.150), (0.031, 0.038, 0.093), 260.0, -0.05, 0.0),
    "gt_eye_right": ("gt", False, (-0.033, 0.030, 0.150), (-0.031, 0.038, 0.093), 260.0, -0.05, 0.0),
    "gt_boom_left": ("gt", False, (0.035, -0.050, 0.200), (0.000, -0.045, 0.110), 300.0, -0.04, 0.0),
    "gt_boom_right": ("gt", False, (-0.035, -0.050, 0.200), (0.000, -0.045, 0.110), 300.0, -0.04, 0.0),
    "gt_glabella": ("gt", False, (0.000, 0.065, 0.160), (0.000, 0.045, 0.105), 240.0, -0.05, 0.0),
}


def default_hmc_rig(size: int = HMC_SIZE, fps: float = 30.0) -> HmcRig:
    """The synthetic headset's 10 calibrated cameras at ``size`` x ``size`` pixels, ``fps`` Hz."""
    cameras = []
    for name, (role, mirrored, pos, target, focal, k1, k2) in CAMERA_LAYOUT.items():
        cam = Camera.look_at(
            np.array(pos), np.array(target), UP, width=HMC_SIZE, height=HMC_SIZE, focal=focal,
            distortion=np.array([k1, k2, 0.0, 0.0, 0.0]),
        )
        if size != HMC_SIZE:
            cam = cam.scaled(size / HMC_SIZE)
        cameras.append(HmcCamera(
            name=name, role=role, mirrored=mirrored,
            intrinsics=cam.intrinsics,
            distortion=cam.distortion, R_headset_from_camera=cam.R_world_from_camera,
            t_headset_from_camera=cam.t_world_from_camera,
        ))
    return HmcRig(rig_version=RIG_VERSION, fps=float(fps), cameras=tuple(cameras))


def rig_cameras(rig: HmcRig) -> dict[str, Camera]:
    """The rig's cameras as :class:`rigs.camera.Camera` in the headset frame."""
    return {
        c.name: Camera(
            c.intrinsics, np.asarray(c.distortion),
            np.asarray(c.R_headset_from_camera), np.asarray(c.t_headset_from_camera), c.model,
        )
        for c in rig.cameras
    }


class IrRenderer:
    """Renders all rig cameras of a frame; caches each camera's pixel rays."""

    def __init__(self, cameras: dict[str, Camera], texture: PhotoTexture, triangles: np.ndarray):
        self.cameras = cameras
        self.texture = texture
        self.triangles = triangles
        self._rays = {name: cam.pixel_rays() for name, cam in cameras.items()}
        self._vignette = {}
        for name, cam in cameras.items():
            d = self._rays[name][1] @ cam.R_world_from_camera  # camera-frame directions
            self._vignette[name] = (d[..., 2] ** 4).astype(np.float32)

    def render(
        self, vertices: np.ndarray, rng: np.random.Generator | None
    ) -> tuple[dict[str, np.ndarray], Scene]:
        """IR images (uint8, H x W) of posed ``vertices`` (headset frame), and the scene.

        ``rng=None`` renders without sensor noise (used to check alignment in tests).
        """
        scene = Scene(vertices, self.triangles)
        normals = vertex_normals(vertices, self.triangles)
        images = {}
        for name, cam in self.cameras.items():
            origins, dirs = self._rays[name]
            g = make_gbuffer(cam, origins, dirs, scene.cast(origins, dirs))
            t = g.distance
            n = g.interpolate(self.triangles, normals)
            n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-9)
            albedo = ir_albedo(self.texture.albedo(g, self.triangles))
            cos = np.clip(-(n * dirs).sum(-1), 0, 1)
            dist = np.where(g.hit, t, 1.0)
            radiance = albedo * (0.15 + 0.85 * cos) * (0.05 / dist) ** 2 * 0.8
            radiance = radiance * self._vignette[name]
            radiance = np.where(g.hit, radiance, 0.01)
            noisy = radiance
            if rng is not None:
                noisy = radiance + rng.normal(size=radiance.shape) * np.sqrt(0.0004 + 0.004 * np.clip(radiance, 0, None))
            images[name] = (np.clip(noisy, 0, 1) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8)
        return images, scene


def ir_albedo(rgb_albedo: np.ndarray) -> np.ndarray:
    """(..., 3) linear RGB albedo -> (...) near-IR albedo.

    Skin reflects near-IR strongly and evenly, so contrast is compressed (square root of
    luminance) while the pupil, brows and mouth interior stay darker than skin.
    """
    lum = rgb_albedo @ np.array([0.3, 0.5, 0.2], np.float32)
    return (0.1 + 0.85 * np.sqrt(np.clip(lum, 0, 1))).astype(np.float32)
