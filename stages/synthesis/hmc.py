"""The headset camera rig and its IR images.

The headset frame coincides with the head frame at the nominal donning (head pose R = I,
t = 0); headset slip moves the head away from it. Five embedded cameras (2 eye, 2 mouth,
1 glabella) sit close to the face at oblique angles, as on a consumer headset; five
ground-truth cameras (2 eye, 2 boom, 1 glabella) see the face more frontally (REFA Fig. 1-2).

The IR images of these cameras are formed in :mod:`stages.synthesis.ir`.
"""

from __future__ import annotations

import numpy as np

from rigs.camera import Camera
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


