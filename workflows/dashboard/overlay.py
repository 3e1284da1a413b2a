"""Frame drill-down picture: the labelled rig projected over a frame's HMC views.

Not the differentiable renderer (rigs/render/): a point overlay is enough to see a wrong
label and costs milliseconds. The rig posed by the frame's labels (blendshapes, gaze,
head pose in the headset frame) is projected with each calibrated camera
(rigs/camera.py, lens distortion included); the visible face vertices (normal toward
the camera) are drawn green, the 68 landmark vertices yellow; with a truth folder, the
true mesh's 68 landmarks are drawn magenta, so a label's error is the yellow-to-magenta
offset. Views are the embedded cameras side by side, as stored (not mirrored).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Drawn colours (RGB).
MESH_RGB = (60, 220, 90)
LANDMARK_RGB = (255, 220, 0)
TRUTH_RGB = (255, 0, 255)


@dataclass(frozen=True)
class OverlayConfig:
    """How the drill-down picture is drawn.

    Attributes:
        view_px: each camera view is scaled to this height (pixels).
        max_points: face vertices drawn at most per view (a regular subsample).
        cameras: "embedded" (the consumer headset's), "gt" or "all".
        jpeg_quality: JPEG quality of the encoded picture (the report embeds many).
    """

    view_px: int = 144
    max_points: int = 1500
    cameras: str = "embedded"
    jpeg_quality: int = 75


@dataclass(frozen=True)
class FramePose:
    """What poses the rig for one frame.

    Attributes:
        b: (K,) blendshapes in the rig definition's order.
        gaze: (4,) radians, or None (eyes at rest).
        head_q: (4,) (w, x, y, z) head in the headset frame, or None (identity).
        head_t: (3,) metres, or None (zero).
    """

    b: np.ndarray
    gaze: np.ndarray | None = None
    head_q: np.ndarray | None = None
    head_t: np.ndarray | None = None


def posed_vertices(rig: Any, pose: FramePose) -> np.ndarray:
    """(n, 3) the rig posed by ``pose``, in the headset frame (metres)."""
    from rigs.geometry import rotation_from_quat

    gaze = None if pose.gaze is None or not np.all(np.isfinite(pose.gaze)) else pose.gaze
    head = np.asarray(rig.pose(np.nan_to_num(pose.b), gaze), np.float64)
    if pose.head_q is not None and np.all(np.isfinite(pose.head_q)):
        head = rotation_from_quat(pose.head_q).apply(head)
    if pose.head_t is not None and np.all(np.isfinite(pose.head_t)):
        head = head + pose.head_t
    return head


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    """(n, 3) area-weighted unit vertex normals."""
    v = vertices[triangles]
    face = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    normals = np.zeros_like(vertices)
    for k in range(3):
        np.add.at(normals, triangles[:, k], face)
    return normals / np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)


def _draw(img: np.ndarray, pixels: np.ndarray, rgb: tuple[int, int, int], radius: int) -> None:
    """Draws filled squares of half-size ``radius`` at (P, 2) pixels inside the image."""
    h, w = img.shape[:2]
    inside = np.all(np.isfinite(pixels), axis=1) & np.all(np.abs(pixels) < 1e6, axis=1)
    p = np.round(pixels[inside]).astype(int)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            u, v = p[:, 0] + dx, p[:, 1] + dy
            ok = (u >= 0) & (u < w) & (v >= 0) & (v < h)
            img[v[ok], u[ok]] = rgb


def overlay_view(image: np.ndarray, camera: Any, vertices: np.ndarray, normals: np.ndarray,
                 face: np.ndarray, landmarks: np.ndarray, truth_landmarks: np.ndarray | None,
                 config: OverlayConfig) -> np.ndarray:
    """One camera's IR image (H, W) uint8 with the projection drawn: (h, w, 3) uint8 RGB,
    scaled to ``config.view_px`` high."""
    import cv2

    scale = config.view_px / image.shape[0]
    rgb = cv2.resize(np.repeat(image[:, :, None], 3, 2), None, fx=scale, fy=scale,
                     interpolation=cv2.INTER_NEAREST)
    toward = camera.t_world_from_camera - vertices[face]
    seen = face[np.einsum("ij,ij->i", normals[face], toward) > 0]
    seen = seen[:: max(1, len(seen) // config.max_points)]
    for ids, colour, radius, verts in ((seen, MESH_RGB, 0, vertices), (landmarks, LANDMARK_RGB, 1, vertices)):
        px, depth = camera.project(verts[ids])
        _draw(rgb, (px[depth > 0] + 0.5) * scale - 0.5, colour, radius)
    if truth_landmarks is not None:
        px, depth = camera.project(truth_landmarks)
        _draw(rgb, (px[depth > 0] + 0.5) * scale - 0.5, TRUTH_RGB, 1)
    return rgb


def frame_overlay(recording: Any, frame: int, rig: Any, pose: FramePose,
                  truth_vertices: np.ndarray | None = None, config: OverlayConfig | None = None) -> np.ndarray:
    """The labelled rig over one frame's camera views, side by side.

    Args:
        recording: a :class:`storage.capture.Recording`.
        frame: frame index.
        rig: the labelled :class:`rigs.rig.BlendshapeRig`.
        pose: the frame's labels.
        truth_vertices: (n, 3) the true mesh in the headset frame, or None.
        config: drawing options.

    Returns:
        (h, W, 3) uint8 RGB.
    """
    from rigs.camera import rig_cameras

    config = config or OverlayConfig()
    cameras = rig_cameras(recording.rig)
    chosen = {"embedded": recording.rig.embedded, "gt": recording.rig.ground_truth}.get(config.cameras,
                                                                                        recording.rig.cameras)
    vertices = posed_vertices(rig, pose)
    normals = vertex_normals(vertices, rig.model.triangles)
    from stages.metrics_gt import mesh_error_vertices

    face = mesh_error_vertices(rig.model)
    marks = np.asarray(rig.model.landmarks68)
    true_marks = None if truth_vertices is None else np.asarray(truth_vertices)[marks]
    views = [overlay_view(recording.read_frame(c.name, frame), cameras[c.name], vertices, normals, face,
                          marks, true_marks, config) for c in chosen]
    gap = np.full((views[0].shape[0], 4, 3), 255, np.uint8)
    row: list[np.ndarray] = []
    for v in views:
        row += [v, gap]
    return np.concatenate(row[:-1], axis=1)


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
    """JPEG bytes of an (H, W, 3) uint8 RGB image."""
    import cv2

    ok, data = cv2.imencode(".jpg", np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        from pipeline.errors import StageError

        raise StageError("cannot encode the overlay picture")
    return data.tobytes()
