"""Frame drill-down picture: the labelled rig drawn over a frame's HMC views.

The rig posed by the frame's labels (blendshapes, gaze, head pose in the headset frame)
is rendered into each calibrated camera by the HMC renderer (rigs/render/: ray-cast
visibility, so what the face hides stays hidden; lens distortion included), shaded by how
squarely each surface point faces the camera and tinted green over the IR image. The 68
landmark vertices are drawn yellow; with a truth folder, the true mesh's 68 landmarks are
drawn magenta, so a label's error is the yellow-to-magenta offset. Views are the embedded
cameras side by side, as stored (not mirrored). ``OverlayConfig.shading = "points"`` draws
the camera-facing face vertices as dots instead (no torch, milliseconds a frame).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Drawn colours (RGB).
MESH_RGB = (60, 220, 90)
LANDMARK_RGB = (255, 220, 0)
TRUTH_RGB = (255, 0, 255)
#: Tint of the rendered rig over the IR image (RGB) and its opacity.
TINT, OPACITY = np.array([80, 255, 120], np.float32), 0.45


@dataclass(frozen=True)
class OverlayConfig:
    """How the drill-down picture is drawn.

    Attributes:
        view_px: each camera view is scaled to this height (pixels).
        max_points: face vertices drawn at most per view (a regular subsample).
        cameras: "embedded" (the consumer headset's), "gt" or "all".
        jpeg_quality: JPEG quality of the encoded picture (the report embeds many).
        shading: "rendered" (the renderer's shaded, occlusion-correct rig) or "points"
            (camera-facing face vertices as dots).
    """

    view_px: int = 144
    max_points: int = 1500
    cameras: str = "embedded"
    jpeg_quality: int = 75
    shading: str = "rendered"


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


def tint(rgb: np.ndarray, mask: np.ndarray, facing: np.ndarray) -> np.ndarray:
    """(h, w, 3) RGB with the rendered rig blended in where ``mask`` (h, w) is set, shaded
    by ``facing`` (h, w) in [0, 1] (1 = the surface faces the camera squarely)."""
    out = rgb.astype(np.float32)
    shade = (0.35 + 0.65 * facing)[..., None] * TINT
    out[mask] = (1 - OPACITY) * out[mask] + OPACITY * shade[mask]
    return out.clip(0, 255).astype(np.uint8)


def mask_and_facing(out: Any) -> tuple[np.ndarray, np.ndarray]:
    """(F, C, h, w) bool mask and facing ratio in [0, 1] of a renderer's RenderOutput
    (1 = the surface faces the camera squarely), as numpy."""
    hits = out.surface
    facing = hits.image((-(hits.normal * hits.ray).sum(-1)).abs().clamp(0, 1))
    return out.mask.numpy(), facing.numpy()


def rendered_views(rig: Any, pose: FramePose, cameras: dict[str, Any], names: list[str],
                   view_px: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(mask, facing) per camera, each (h, w) at ``view_px`` high: the rig posed by
    ``pose`` through the HMC renderer (visibility by ray casting)."""
    import torch

    from rigs.geometry import rotation_from_quat
    from rigs.render import HmcRenderer, RigState, TorchRig
    from rigs.render.cameras import CameraBatch

    def finite(a: np.ndarray | None, default: np.ndarray) -> np.ndarray:
        return default if a is None or not np.all(np.isfinite(a)) else np.asarray(a, np.float64)

    rotation = rotation_from_quat(finite(pose.head_q, np.array([1.0, 0, 0, 0]))).as_matrix()
    state = RigState(torch.as_tensor(np.nan_to_num(pose.b)[None], dtype=torch.float32),
                     torch.as_tensor(finite(pose.gaze, np.zeros(4))[None], dtype=torch.float32),
                     torch.as_tensor(rotation[None], dtype=torch.float32),
                     torch.as_tensor(finite(pose.head_t, np.zeros(3))[None], dtype=torch.float32))
    # One camera at a time: the cameras may differ in size, so each is scaled on its own.
    batches = [CameraBatch.from_dict(cameras, view_px / cameras[n].intrinsics.height, [n]) for n in names]
    renderer = HmcRenderer(TorchRig(rig), batches[0])
    views = []
    with torch.no_grad():
        for batch in batches:
            mask, facing = mask_and_facing(renderer.render(state, cameras=batch))
            views.append((mask[0, 0], facing[0, 0]))
    return views


def overlay_view(image: np.ndarray, camera: Any, vertices: np.ndarray, landmarks: np.ndarray,
                 truth_landmarks: np.ndarray | None, config: OverlayConfig,
                 shading: tuple[np.ndarray, np.ndarray] | None = None,
                 dots: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """One camera's IR image (H, W) uint8 with the rig drawn: (h, w, 3) uint8 RGB, scaled to
    ``config.view_px`` high. ``shading`` is the camera's rendered (mask, facing); ``dots``
    is (face vertex ids, (n, 3) vertex normals), whose camera-facing vertices are drawn."""
    import cv2

    scale = config.view_px / image.shape[0]
    rgb = cv2.resize(np.repeat(image[:, :, None], 3, 2), None, fx=scale, fy=scale,
                     interpolation=cv2.INTER_NEAREST)
    marks = [(landmarks, LANDMARK_RGB, 1)]
    if shading is not None:
        size = (rgb.shape[1], rgb.shape[0])
        mask = cv2.resize(shading[0].astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        rgb = tint(rgb, mask, cv2.resize(shading[1].astype(np.float32), size, interpolation=cv2.INTER_LINEAR))
    if dots is not None:
        face, normals = dots
        toward = camera.t_world_from_camera - vertices[face]
        seen = face[np.einsum("ij,ij->i", normals[face], toward) > 0]
        marks.insert(0, (seen[:: max(1, len(seen) // config.max_points)], MESH_RGB, 0))
    for ids, colour, radius in marks:
        px, depth = camera.project(vertices[ids])
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
    marks = np.asarray(rig.model.landmarks68)
    true_marks = None if truth_vertices is None else np.asarray(truth_vertices)[marks]
    names = [c.name for c in chosen]
    shading: list = [None] * len(names)
    dots = None
    if config.shading == "rendered":
        shading = rendered_views(rig, pose, cameras, names, config.view_px)
    else:
        from rigs.raycast import vertex_normals
        from stages.metrics_gt import mesh_error_vertices

        dots = (mesh_error_vertices(rig.model), vertex_normals(vertices, rig.model.triangles))
    views = [overlay_view(recording.read_frame(name, frame), cameras[name], vertices, marks, true_marks, config,
                          shaded, dots) for name, shaded in zip(names, shading, strict=True)]
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
