"""Phone RGBD frames: textured RGB and TrueDepth-like depth of a posed subject.

The head stays in its own frame; the phone moves around it (slight head angles seen from
the camera). Depth noise follows the structured-light model: sigma grows with depth
squared, holes appear in blobs and at grazing angles, and pixels at depth discontinuities
become "flying pixels" between foreground and background.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import binary_dilation, gaussian_filter, maximum_filter, minimum_filter

from rigs.camera import Camera
from rigs.raycast import Scene, vertex_normals
from stages.synthesis.texture import PhotoTexture

FACE_CENTRE = np.array([0.0, 0.01, 0.06])
#: Depth noise sigma = DEPTH_NOISE_K * z^2 (metres): 0.35 mm at 0.37 m, 3.6 mm at 1.2 m.
DEPTH_NOISE_K = 0.0025
#: A pixel whose 3 x 3 neighbourhood spans more than this depth (m) is at a discontinuity...
FLYING_EDGE_M = 0.05
#: ... and becomes a flying pixel (uniform between the two surfaces) with this probability.
FLYING_PIXEL_RATE = 0.5
#: Specular dropouts: each pixel seeds a hole with this probability; a seed grows by
#: HOLE_DILATION cross-shaped dilations (a 13-pixel diamond), so a pixel away from the
#: border is a hole with probability 1 - (1 - HOLE_SEED_RATE) ** 13 (~1.0 %).
HOLE_SEED_RATE = 0.0008
HOLE_DILATION = 2
#: Face pixels whose |cos(view angle)| is below this return no depth (grazing angles).
GRAZING_COS = 0.2


@dataclass(frozen=True, eq=False)
class PhoneShot:
    """One rendered phone frame and its truth.

    Attributes:
        rgb: (H, W, 3) uint8.
        depth_mm: (H, W) uint16, 0 = invalid.
        camera: the phone camera in the head frame.
    """

    rgb: np.ndarray
    depth_mm: np.ndarray
    camera: Camera


def phone_camera(
    width: int,
    hfov_deg: float,
    rng: np.random.Generator,
    distance: tuple[float, float],
    yaw_deg: float = 18.0,
    pitch_deg: float = 10.0,
) -> Camera:
    """A portrait phone camera at a random angle around the face.

    Yaw and pitch are uniform in +-``yaw_deg`` and +-``pitch_deg``; roll in +-4 degrees.
    """
    height = width * 4 // 3
    focal = (width / 2) / np.tan(np.deg2rad(hfov_deg) / 2)
    yaw, pitch = np.deg2rad(rng.uniform(-yaw_deg, yaw_deg)), np.deg2rad(rng.uniform(-pitch_deg, pitch_deg))
    d = rng.uniform(*distance)
    direction = np.array([np.cos(pitch) * np.sin(yaw), np.sin(pitch), np.cos(pitch) * np.cos(yaw)])
    roll = np.deg2rad(rng.uniform(-4, 4))
    up = np.array([np.sin(roll), np.cos(roll), 0.0])
    return Camera.look_at(FACE_CENTRE + d * direction, FACE_CENTRE, up, width=width, height=height, focal=focal)


def _wall(camera: Camera, distance: float) -> tuple[np.ndarray, np.ndarray]:
    """A 4 m square behind the head, facing the camera (vertices (4,3), triangles (2,3))."""
    axis = camera.R_world_from_camera[:, 2]
    centre = camera.t_world_from_camera + axis * distance
    x, y = camera.R_world_from_camera[:, 0] * 2, camera.R_world_from_camera[:, 1] * 2
    verts = np.stack([centre - x - y, centre + x - y, centre + x + y, centre - x + y])
    return verts, np.array([[0, 1, 2], [0, 2, 3]])


def render_phone(
    vertices: np.ndarray,
    triangles: np.ndarray,
    camera: Camera,
    texture: PhotoTexture,
    tint: np.ndarray,
    rng: np.random.Generator,
    *,
    noise: bool = True,
) -> PhoneShot:
    """Renders one RGBD frame of posed ``vertices`` (head frame) seen by ``camera``.

    ``noise=False`` skips the RGB sensor noise (tests compare against it).
    """
    wall_distance = float(rng.uniform(0.9, 1.4))
    scene = Scene(vertices, triangles, extras=[_wall(camera, wall_distance)])
    g = scene.render(camera)
    wall = g.geometry == 1

    normals = g.interpolate(triangles, vertex_normals(vertices, triangles))
    normals /= np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-9)
    key = camera.R_world_from_camera @ np.array([-0.4, -0.6, -1.0])  # above-left of the lens
    key /= np.linalg.norm(key)
    lambert = np.clip((normals * key).sum(-1), 0, 1)
    view = -g.directions
    half = (key + view) / np.linalg.norm(key + view, axis=-1, keepdims=True)
    specular = 0.08 * np.clip((normals * half).sum(-1), 0, 1) ** 24
    albedo = texture.albedo(g, triangles, tint)
    img = albedo * (0.35 + 0.75 * lambert)[..., None] + specular[..., None]

    # Background wall: soft low-frequency pattern, lit by the ambient light only.
    pattern = gaussian_filter(rng.uniform(0.25, 0.6, g.triangle.shape), sigma=g.triangle.shape[1] / 12)
    wall_rgb = pattern[..., None] * np.array([0.9, 0.92, 1.0])
    img[wall] = wall_rgb[wall]
    img = img * rng.uniform(0.85, 1.1)
    if noise:
        img = img + rng.normal(0, 0.01, img.shape)
    rgb = (np.clip(img, 0, 1) ** (1 / 2.2) * 255 + 0.5).astype(np.uint8)
    return PhoneShot(rgb, truedepth(g.depth, g.directions, normals, g.hit, rng), camera)


def truedepth(depth: np.ndarray, directions: np.ndarray, normals: np.ndarray, face: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Ideal camera-z depth (H, W) metres -> noisy uint16 millimetres with holes.

    ``face`` (H, W) marks pixels on the head mesh (the rest hit the wall or nothing).
    """
    z = np.where(np.isfinite(depth), depth, 0.0).astype(np.float64)
    valid = np.isfinite(depth)
    # Flying pixels: near a depth jump, a pixel takes a value between the two surfaces.
    near, far = minimum_filter(np.where(valid, z, np.inf), 3), maximum_filter(np.where(valid, z, 0), 3)
    edge = valid & (far - near > FLYING_EDGE_M)
    fly = edge & (rng.uniform(size=z.shape) < FLYING_PIXEL_RATE)
    z = np.where(fly, near + (far - near) * rng.uniform(size=z.shape), z)
    z = z + rng.normal(size=z.shape) * DEPTH_NOISE_K * z**2
    # Holes: grazing angles (weak return) and random blobs (specular dropouts).
    facing = np.abs((normals * directions).sum(-1))
    grazing = (facing < GRAZING_COS) & face
    blobs = binary_dilation(rng.uniform(size=z.shape) < HOLE_SEED_RATE, iterations=HOLE_DILATION)
    valid &= ~grazing & ~blobs
    valid &= (z > 0.1) & (z < 3.0)
    return np.where(valid, np.round(z * 1000), 0).astype(np.uint16)
