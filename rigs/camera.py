"""Calibrated cameras: pinhole intrinsics, an OpenCV lens model (:mod:`rigs.lens`), a pose.

Pixel centres sit at integer coordinates (OpenCV). Camera axes follow OpenCV: x right,
y down, z forward. ``R_world_from_camera``/``t_world_from_camera`` place the camera in
whatever frame its owner uses (head frame for phone cameras, headset frame for HMCs):
world = R_world_from_camera @ camera + t_world_from_camera. The generator, the renderer
and the fits all project and unproject through this one class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import ModelError
from rigs.lens import DEFAULT_LENS_MODEL, LENS_MODELS, Lens, LensInversionError


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
        distortion: the lens coefficients of ``model``: (5,) [k1, k2, p1, p2, k3] for
            "opencv", (4,) [k1, k2, k3, k4] for "opencv_fisheye".
        R_world_from_camera: (3, 3) rotation.
        t_world_from_camera: (3,) camera centre in the world frame, metres.
        model: the lens model, "opencv" (radial-tangential) or "opencv_fisheye"
            (Kannala-Brandt); see :mod:`rigs.lens` for the formulas and valid region.
    """

    intrinsics: PinholeIntrinsics
    distortion: np.ndarray = field(default_factory=lambda: np.zeros(5))
    R_world_from_camera: np.ndarray = field(default_factory=lambda: np.eye(3))
    t_world_from_camera: np.ndarray = field(default_factory=lambda: np.zeros(3))
    model: str = DEFAULT_LENS_MODEL
    lens: Lens = field(init=False, repr=False)  # built from model + distortion

    width = property(lambda self: self.intrinsics.width)
    height = property(lambda self: self.intrinsics.height)
    fx = property(lambda self: self.intrinsics.fx)
    fy = property(lambda self: self.intrinsics.fy)
    cx = property(lambda self: self.intrinsics.cx)
    cy = property(lambda self: self.intrinsics.cy)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lens", Lens(self.model, self.distortion))  # checks both
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
        model: str = DEFAULT_LENS_MODEL,
    ) -> Camera:
        """A camera at ``position`` looking at ``target`` with image-up along ``up``.

        ``distortion`` defaults to the zero coefficients of ``model`` (no distortion).
        """
        z = np.asarray(target, float) - np.asarray(position, float)
        z /= np.linalg.norm(z)
        x = np.cross(z, np.asarray(up, float))  # OpenCV: x = y cross z with y = -up
        x /= np.linalg.norm(x)
        y = np.cross(z, x)
        return cls(
            PinholeIntrinsics(width, height, focal, focal, (width - 1) / 2, (height - 1) / 2),
            np.zeros(LENS_MODELS.get(model, 0)) if distortion is None else np.asarray(distortion, float),
            np.stack([x, y, z], 1), np.asarray(position, float), model,
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
            intr, self.distortion, self.R_world_from_camera, self.t_world_from_camera, self.model,
        )

    def moved(self, R: np.ndarray, t: np.ndarray) -> Camera:
        """The camera expressed in another frame: world' = R world + t."""
        return Camera(
            self.intrinsics, self.distortion, R @ self.R_world_from_camera,
            R @ self.t_world_from_camera + t, self.model,
        )

    def to_camera(self, points: np.ndarray) -> np.ndarray:
        """(..., 3) world points -> (..., 3) camera-frame points."""
        return (np.asarray(points) - self.t_world_from_camera) @ self.R_world_from_camera

    def project(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Projects world points to pixels.

        Args:
            points: (..., 3) world points.

        Returns:
            (pixels (..., 2), depth (...,)), depth = camera z (negative = behind; a
            fisheye lens also sees some points with z <= 0, up to its valid angle).
        """
        pc = self.to_camera(points)
        xy = self.lens.distort(pc)
        return np.stack([self.fx * xy[..., 0] + self.cx, self.fy * xy[..., 1] + self.cy], -1), pc[..., 2]

    def unproject(self, pixels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Camera-frame unit directions through pixels, with a validity mask.

        Args:
            pixels: (..., 2) pixel coordinates; all pixel centres, (H, W, 2), by default.

        Returns:
            (directions (..., 3), valid (...,)); invalid pixels (outside the lens's
            invertible region, see :mod:`rigs.lens`) hold NaN directions.
        """
        if pixels is None:
            v, u = np.mgrid[0 : self.height, 0 : self.width].astype(np.float64)
            pixels = np.stack([u, v], -1)
        pixels = np.asarray(pixels, dtype=np.float64)
        xd = np.stack([(pixels[..., 0] - self.cx) / self.fx, (pixels[..., 1] - self.cy) / self.fy], -1)
        return self.lens.undistort(xd)

    def pixel_rays(self, pixels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """World rays through pixels (all pixel centres by default).

        Returns:
            (origins (..., 3), unit directions (..., 3)); (H, W, 3) for the full image.

        Raises:
            LensInversionError: a pixel lies outside the lens's invertible region (use
                :meth:`unproject` for a validity mask instead).
        """
        d, valid = self.unproject(pixels)
        if not valid.all():
            raise LensInversionError(
                f"{int((~valid).sum())} of {valid.size} pixels lie outside the invertible "
                f"region of the {self.model} lens (distorted radius >= {self.lens.rho_max:.4g})"
            )
        d = d @ self.R_world_from_camera.T
        return np.broadcast_to(self.t_world_from_camera, d.shape).copy(), d


def rig_cameras(rig) -> dict[str, Camera]:
    """A headset rig's cameras as :class:`Camera` in the headset frame, by name.

    Args:
        rig: a :class:`storage.capture_types.HmcRig` (any object whose ``cameras`` carry
            name, intrinsics, distortion, R/t_headset_from_camera and model).
    """
    return {
        c.name: Camera(c.intrinsics, np.asarray(c.distortion), np.asarray(c.R_headset_from_camera),
                       np.asarray(c.t_headset_from_camera), c.model)
        for c in rig.cameras
    }
