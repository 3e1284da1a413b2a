"""Pinhole cameras with OpenCV radial-tangential distortion.

Pixel centres sit at integer coordinates (OpenCV). Camera axes follow OpenCV: x right,
y down, z forward. ``R_world_from_camera``/``t_world_from_camera`` place the camera in
whatever frame its owner uses (head frame for phone cameras, headset frame for HMCs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import ModelError


@dataclass(frozen=True)
class PinholeIntrinsics:
    """A pinhole camera (no distortion) in pixels.

    Attributes:
        width: image width in pixels.
        height: image height in pixels.
        fx: focal length along x, pixels.
        fy: focal length along y, pixels.
        cx: principal point x, pixels (OpenCV: pixel centres at integers).
        cy: principal point y, pixels.
    """

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float

    @property
    def K(self) -> np.ndarray:
        """The (3, 3) float64 camera matrix [[fx, 0, cx], [0, fy, cy], [0, 0, 1]]."""
        return np.array(
            [[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]],
            dtype=np.float64,
        )

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return (self.width, self.height)


@dataclass(frozen=True, eq=False)
class Camera:
    """A calibrated camera.

    Attributes:
        intrinsics: image size and pinhole parameters in pixels.
        distortion: (5,) OpenCV [k1, k2, p1, p2, k3].
        R_world_from_camera: (3, 3) rotation.
        t_world_from_camera: (3,) camera centre in the world frame, metres.
    """

    intrinsics: PinholeIntrinsics
    distortion: np.ndarray = field(default_factory=lambda: np.zeros(5))
    R_world_from_camera: np.ndarray = field(default_factory=lambda: np.eye(3))
    t_world_from_camera: np.ndarray = field(default_factory=lambda: np.zeros(3))

    width = property(lambda self: self.intrinsics.width)
    height = property(lambda self: self.intrinsics.height)
    fx = property(lambda self: self.intrinsics.fx)
    fy = property(lambda self: self.intrinsics.fy)
    cx = property(lambda self: self.intrinsics.cx)
    cy = property(lambda self: self.intrinsics.cy)

    def __post_init__(self) -> None:
        if np.shape(self.distortion) != (5,):
            raise ModelError(f"distortion must be (5,), got {np.shape(self.distortion)}")
        r = np.asarray(self.R_world_from_camera)
        if r.shape != (3, 3) or not np.allclose(r @ r.T, np.eye(3), atol=1e-6):
            raise ModelError("R_world_from_camera must be a (3, 3) rotation")

    @classmethod
    def look_at(
        cls,
        position: np.ndarray,
        target: np.ndarray,
        up: np.ndarray,
        *,
        width: int,
        height: int,
        focal: float,
        distortion: np.ndarray | None = None,
    ) -> Camera:
        """A camera at ``position`` looking at ``target`` with image-up along ``up``."""
        z = np.asarray(target, float) - np.asarray(position, float)
        z /= np.linalg.norm(z)
        x = np.cross(z, np.asarray(up, float))  # OpenCV: x = y cross z with y = -up
        x /= np.linalg.norm(x)
        y = np.cross(z, x)
        return cls(
            PinholeIntrinsics(width, height, focal, focal, (width - 1) / 2, (height - 1) / 2),
            np.zeros(5) if distortion is None else np.asarray(distortion, float),
            np.stack([x, y, z], 1), np.asarray(position, float),
        )

    @property
    def K(self) -> np.ndarray:
        return self.intrinsics.K

    def scaled(self, factor: float) -> Camera:
        """The same camera with an image ``factor`` times the size (intrinsics scaled)."""
        w, h = round(self.width * factor), round(self.height * factor)
        intr = PinholeIntrinsics(
            w, h, self.fx * factor, self.fy * factor,
            (self.cx + 0.5) * factor - 0.5, (self.cy + 0.5) * factor - 0.5,
        )
        return Camera(
            intr, self.distortion, self.R_world_from_camera, self.t_world_from_camera,
        )

    def moved(self, R: np.ndarray, t: np.ndarray) -> Camera:
        """The camera expressed in another frame: world' = R world + t."""
        return Camera(
            self.intrinsics, self.distortion, R @ self.R_world_from_camera, R @ self.t_world_from_camera + t,
        )

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) world points -> (..., 3) camera-frame points."""
        return (np.asarray(points) - self.t_world_from_camera) @ self.R_world_from_camera

    def distort(self, xy: np.ndarray) -> np.ndarray:
        """(..., 2) normalised undistorted coordinates -> distorted normalised ones."""
        k1, k2, p1, p2, k3 = self.distortion
        x, y = xy[..., 0], xy[..., 1]
        r2 = x * x + y * y
        radial = 1 + r2 * (k1 + r2 * (k2 + r2 * k3))
        xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
        yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y
        return np.stack([xd, yd], -1)

    def undistort(self, xyd: np.ndarray, iterations: int = 40) -> np.ndarray:
        """Inverse of :meth:`distort` by fixed-point iteration (moderate distortion)."""
        xy = xyd.copy()
        for _ in range(iterations):
            xy = xy + (xyd - self.distort(xy))
        return xy

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Projects world points to pixels.

        Args:
            points: (..., 3) world points.

        Returns:
            (pixels (..., 2), depth (...,)), depth = camera z (negative = behind).
        """
        pc = self.to_camera(points)
        z = pc[..., 2]
        xy = self.distort(pc[..., :2] / np.where(np.abs(z) < 1e-12, 1e-12, z)[..., None])
        return np.stack([self.fx * xy[..., 0] + self.cx, self.fy * xy[..., 1] + self.cy], -1), z

    def pixel_rays(self, pixels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """World rays through pixels (all pixel centres by default).

        Returns:
            (origins (..., 3), unit directions (..., 3)); (H, W, 3) for the full image.
        """
        if pixels is None:
            v, u = np.mgrid[0 : self.height, 0 : self.width].astype(np.float64)
            pixels = np.stack([u, v], -1)
        xyd = np.stack([(pixels[..., 0] - self.cx) / self.fx, (pixels[..., 1] - self.cy) / self.fy], -1)
        xy = self.undistort(xyd)
        d = np.concatenate([xy, np.ones_like(xy[..., :1])], -1)
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        d = d @ self.R_world_from_camera.T
        return np.broadcast_to(self.t_world_from_camera, d.shape).copy(), d
