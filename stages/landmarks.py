"""Landmarks and face mask per phone frame (SPEC §3 item 1).

Three detectors behind one interface (:class:`LandmarkDetector`):
- ``mediapipe``: MediaPipe face mesh (478 points with irises; models bundled in the
  pinned 0.10.21 wheel), confidence = MediaPipe's face-detection score (a frame the face
  detector misses is rejected, whatever the mesh found);
- ``face_alignment``: face-alignment's 2D FAN (68 points) as a user-supplied local
  TorchScript file, never downloaded, run on a square crop around MediaPipe's face
  detection and decoded at sub-pixel precision;
- ``precomputed``: landmark files a user produced elsewhere
  (``<dir>/<expression>/<index>.npz`` with ``points (P, 2)`` and ``confidence ()``).
Every detector returns pixel coordinates with pixel centres at integers (OpenCV, as
``rigs.camera``); docs/face-model.md states each detector's conversion.
The face mask is the filled convex hull of the face-oval landmarks. A frame without a
face is a :class:`Detection` with ``found=False`` and a reason, never an exception.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from pipeline.config import check_fields, path_field
from pipeline.errors import ConfigError

#: MediaPipe face-oval landmark indices, in order around the face.
FACE_OVAL = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377,
    152, 148, 176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109,
)
#: Multi-PIE 68 jaw line (0-16) and brows (17-26) bound the face for 68-point detectors.
OVAL_68 = tuple(range(17)) + tuple(range(26, 16, -1))
#: Points per landmark scheme.
SCHEME_POINTS = {"mediapipe478": 478, "multipie68": 68}
#: FAN's input crop and heatmap sizes, and its crop rule (face-alignment's): the crop is
#: centred on the box, moved up by 0.12 of the box height, with side 200 * (w + h) / 195.
FAN_INPUT, FAN_HEATMAP = 256, 64
FAN_REFERENCE_SCALE, FAN_SHIFT_UP = 195.0, 0.12


def normalized_to_pixels(xy: np.ndarray, width: int, height: int) -> np.ndarray:
    """MediaPipe's normalised image coordinates -> pixels with centres at integers.

    ``x * W`` is already the OpenCV coordinate (pixel i's centre at ``i / W``), not the
    pixel-edge one (``(i + 0.5) / W``): measured by running MediaPipe on frames and on
    their nearest-neighbour 2x and 3x enlargements, where a centre coordinate x must
    become ``s x + (s - 1) / 2``; the fitted offset is 0.0 +- 0.1 px, against the -0.5 px
    an edge convention would give (docs/face-model.md, tests/test_landmarks.py).

    Args:
        xy: (..., 2) normalised (x, y).
        width: image width W, pixels.
        height: image height H, pixels.

    Returns:
        (..., 2) float32 pixel coordinates, OpenCV convention.
    """
    return (np.asarray(xy, np.float64) * np.array([width, height])).astype(np.float32)


#: Landmark detectors by config name.
DetectorName = Literal["mediapipe", "face_alignment", "precomputed"]


@dataclass(frozen=True)
class LandmarksConfig:
    """Landmarks and face mask per phone frame (SPEC §3 item 1)."""

    detector: DetectorName = "mediapipe"
    """mediapipe, face_alignment (needs ``weights``) or precomputed (needs ``precomputed_dir``)."""
    weights: str = path_field(kind="file")
    """Local face-alignment weights file; never downloaded. Its bytes enter the cache key."""
    precomputed_dir: str = path_field(kind="folder")
    """Folder of precomputed landmark files, ``<expression>/<index:06d>.npz``; its files enter the cache key."""
    min_confidence: float = 0.5
    """Frames whose detection confidence is below this are rejected; in [0, 1]."""

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0.0 <= self.min_confidence <= 1.0:
            raise ConfigError(f"landmarks.min_confidence must be in [0, 1], got {self.min_confidence}")
        if self.detector == "face_alignment" and not self.weights:
            raise ConfigError("landmarks.detector=face_alignment needs landmarks.weights (a local file)")
        if self.detector == "precomputed" and not self.precomputed_dir:
            raise ConfigError("landmarks.detector=precomputed needs landmarks.precomputed_dir")


@dataclass(frozen=True, eq=False)
class Detection:
    """Landmarks of one image.

    Attributes:
        found: whether a face was found.
        points: (P, 2) float32 pixel coordinates (empty when not found).
        confidence: in [0, 1]; 0 when not found.
        reason: why nothing was found ("" when found).
        scheme: landmark set, "mediapipe478" or "multipie68".
    """

    found: bool
    points: np.ndarray
    confidence: float
    reason: str = ""
    scheme: str = "mediapipe478"

    @staticmethod
    def missing(reason: str, scheme: str = "mediapipe478") -> Detection:
        return Detection(False, np.zeros((0, 2), np.float32), 0.0, reason, scheme)


class LandmarkDetector(Protocol):
    """Detects one face's landmarks in an RGB image."""

    scheme: str

    def detect(self, rgb: np.ndarray, key: tuple[str, int] | None = None) -> Detection:
        """rgb: (H, W, 3) uint8 RGB. key: (expression, frame index), for file-based detectors."""


class MediaPipeFaceBoxes:
    """MediaPipe's short-range face detector: the best face's score and box."""

    def __init__(self, min_detection_confidence: float = 0.25):
        import mediapipe as mp

        self._faces = mp.solutions.face_detection.FaceDetection(
            model_selection=0, min_detection_confidence=min_detection_confidence
        )

    def best(self, rgb: np.ndarray) -> tuple[float, np.ndarray] | None:
        """(score, box (x0, y0, x1, y1) in pixel-edge coordinates) of the best face, or None."""
        h, w = rgb.shape[:2]
        faces = self._faces.process(np.ascontiguousarray(rgb)).detections
        if not faces:
            return None
        face = max(faces, key=lambda d: d.score[0])
        box = face.location_data.relative_bounding_box
        corners = [[box.xmin, box.ymin], [box.xmin + box.width, box.ymin + box.height]]
        edges = normalized_to_pixels(corners, w, h).ravel() + 0.5  # centres -> edges
        return float(face.score[0]), edges.astype(np.float64)

    def __call__(self, rgb: np.ndarray) -> np.ndarray | None:
        """The best face's box, or None: a ``face_box`` for :class:`FaceAlignmentDetector`."""
        best = self.best(rgb)
        return None if best is None else best[1]

    def close(self) -> None:
        self._faces.close()


class MediaPipeDetector:
    """MediaPipe face mesh in static-image mode, with iris refinement."""

    scheme = "mediapipe478"

    def __init__(self, min_detection_confidence: float = 0.5):
        import mediapipe as mp

        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True, refine_landmarks=True, max_num_faces=1,
            min_detection_confidence=min_detection_confidence,
        )
        self._faces = MediaPipeFaceBoxes(min_detection_confidence * 0.5)

    def detect(self, rgb: np.ndarray, key: tuple[str, int] | None = None) -> Detection:
        h, w = rgb.shape[:2]
        result = self._mesh.process(np.ascontiguousarray(rgb))
        if not result.multi_face_landmarks:
            return Detection.missing("MediaPipe face mesh found no face")
        lm = result.multi_face_landmarks[0].landmark
        points = normalized_to_pixels([[p.x, p.y] for p in lm], w, h)
        best = self._faces.best(rgb)
        if best is None:
            # The mesh has no score of its own; without a detection there is no confidence
            # to pass the stage's threshold, so the frame is rejected, not guessed at.
            return Detection.missing("MediaPipe face detection found no face (the face mesh did)")
        return Detection(True, points, best[0])

    def close(self) -> None:
        self._mesh.close()
        self._faces.close()


def fan_crop(box: np.ndarray) -> tuple[float, float, float]:
    """FAN's square crop around a face box.

    Args:
        box: (4,) face box (x0, y0, x1, y1) in pixel-edge coordinates (the image spans
            [0, W] x [0, H]; pixel i covers [i, i + 1)).

    Returns:
        (left, top, side) of the square crop, pixel-edge coordinates.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    side = 200.0 * ((x1 - x0) + (y1 - y0)) / FAN_REFERENCE_SCALE
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 - FAN_SHIFT_UP * (y1 - y0)
    return cx - side / 2, cy - side / 2, side


def crop_square(rgb: np.ndarray, left: float, top: float, side: float, size: int) -> np.ndarray:
    """Resamples the square [left, left + side) x [top, top + side) (pixel edges) to size x size.

    Output pixel u's centre (edge coordinate u + 0.5) samples the input at edge coordinate
    ``left + (u + 0.5) * side / size``; outside the image is black.
    """
    import cv2

    a = side / size
    # dst -> src in OpenCV (centre) coordinates: x_src = a * u + left + 0.5 * a - 0.5.
    m = np.array([[a, 0.0, left + 0.5 * a - 0.5], [0.0, a, top + 0.5 * a - 0.5]])
    return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def decode_heatmaps(heat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FAN's sub-pixel heatmap decode.

    The argmax cell, moved a quarter cell toward the larger neighbour on each axis (where
    both neighbours exist), taken at the cell's centre: cell j spans [j, j + 1) in
    heatmap-edge coordinates, so an unmoved peak is at j + 0.5.

    Args:
        heat: (P, h, w) heatmaps.

    Returns:
        (P, 2) float64 peak (x, y) in heatmap-edge coordinates, and (P,) peak values.
    """
    heat = np.asarray(heat, np.float64)
    p, h, w = heat.shape
    flat = heat.reshape(p, -1)
    idx = flat.argmax(1)
    ys, xs = np.divmod(idx, w)
    out = np.c_[xs, ys].astype(np.float64) + 0.5
    rows = np.arange(p)
    inner_x = (xs > 0) & (xs < w - 1)
    inner_y = (ys > 0) & (ys < h - 1)
    xr, xl = np.minimum(xs + 1, w - 1), np.maximum(xs - 1, 0)
    yd, yu = np.minimum(ys + 1, h - 1), np.maximum(ys - 1, 0)
    out[:, 0] += np.where(inner_x, 0.25 * np.sign(heat[rows, ys, xr] - heat[rows, ys, xl]), 0.0)
    out[:, 1] += np.where(inner_y, 0.25 * np.sign(heat[rows, yd, xs] - heat[rows, yu, xs]), 0.0)
    return out, flat[rows, idx]


def heatmap_to_image(points: np.ndarray, left: float, top: float, side: float, heat_size: int) -> np.ndarray:
    """Heatmap-edge coordinates -> image pixels with centres at integers (OpenCV).

    The heatmap covers the crop [left, left + side) x [top, top + side) (pixel edges).
    """
    scale = side / heat_size
    return (np.asarray(points, np.float64) * scale + np.array([left, top]) - 0.5).astype(np.float32)


class FaceAlignmentDetector:
    """face-alignment's 2D FAN from a local TorchScript weights file (never downloaded).

    The face box comes from ``face_box`` (default: MediaPipe's face detection); the crop
    around it is resized to 256 x 256 RGB in [0, 1]; the model returns (1, 68, 64, 64)
    heatmaps, decoded by :func:`decode_heatmaps` and mapped back by
    :func:`heatmap_to_image`. Confidence = the mean peak value, clipped to [0, 1].
    """

    scheme = "multipie68"

    def __init__(self, weights: str | Path, device: str = "cpu",
                 face_box: Callable[[np.ndarray], np.ndarray | None] | None = None):
        weights = Path(weights)
        if not weights.is_file():
            raise ConfigError(f"{weights}: face-alignment weights file not found")
        import torch

        try:
            self._model = torch.jit.load(str(weights), map_location=device)
        except (RuntimeError, ValueError) as exc:
            raise ConfigError(f"{weights}: not a TorchScript model file ({type(exc).__name__})") from None
        self._device = device
        self._boxes = None
        if face_box is None:
            self._boxes = MediaPipeFaceBoxes()
            face_box = self._boxes
        self._face_box = face_box

    def detect(self, rgb: np.ndarray, key: tuple[str, int] | None = None) -> Detection:
        import torch

        box = self._face_box(rgb)
        if box is None:
            return Detection.missing("no face detection to crop for face-alignment", self.scheme)
        left, top, side = fan_crop(box)
        crop = crop_square(rgb, left, top, side, FAN_INPUT).astype(np.float32) / 255.0
        with torch.no_grad():
            heat = self._model(torch.from_numpy(crop).permute(2, 0, 1)[None].to(self._device))[0].cpu().numpy()
        if heat.ndim != 3 or heat.shape[0] != SCHEME_POINTS[self.scheme] or heat.shape[1] != heat.shape[2]:
            raise ConfigError(f"face-alignment model returned heatmaps {heat.shape}, want (68, n, n)")
        peaks, values = decode_heatmaps(heat)
        points = heatmap_to_image(peaks, left, top, side, heat.shape[2])
        confidence = float(np.clip(values.mean(), 0, 1))
        if confidence < 0.2:
            return Detection.missing("face-alignment heatmaps too weak", self.scheme)
        return Detection(True, points, confidence, scheme=self.scheme)

    def close(self) -> None:
        if self._boxes is not None:
            self._boxes.close()


class PrecomputedDetector:
    """Reads landmarks produced elsewhere: ``<root>/<expression>/<index:06d>.npz``."""

    def __init__(self, root: str | Path, scheme: str = "mediapipe478"):
        if scheme not in SCHEME_POINTS:
            raise ConfigError(f"unknown landmark scheme {scheme!r}; choose {', '.join(SCHEME_POINTS)}")
        self.root, self.scheme = Path(root), scheme

    def detect(self, rgb: np.ndarray, key: tuple[str, int] | None = None) -> Detection:
        if key is None:
            raise ConfigError("precomputed landmarks need the frame's (expression, index)")
        path = self.root / key[0] / f"{key[1]:06d}.npz"
        if not path.is_file():
            return Detection.missing(f"{path}: no precomputed landmarks", self.scheme)
        with np.load(path, allow_pickle=False) as data:
            points = np.asarray(data["points"], np.float32)
            confidence = np.asarray(data["confidence"], np.float64) if "confidence" in data else np.float64(1.0)
        n = SCHEME_POINTS[self.scheme]
        if points.shape != (n, 2):
            return Detection.missing(f"{path}: points must be ({n}, 2) for {self.scheme}, got {points.shape}", self.scheme)
        if not np.isfinite(points).all():
            return Detection.missing(f"{path}: points must be finite", self.scheme)
        if confidence.shape != () or not 0.0 <= confidence <= 1.0:
            return Detection.missing(f"{path}: confidence must be a number in [0, 1]", self.scheme)
        return Detection(True, points, float(confidence), scheme=self.scheme)


def make_detector(name: str, *, weights: str | None = None, precomputed_dir: str | None = None) -> LandmarkDetector:
    """A detector by config name: mediapipe, face_alignment or precomputed."""
    if name == "mediapipe":
        return MediaPipeDetector()
    if name == "face_alignment":
        if not weights:
            raise ConfigError("landmarks.detector=face_alignment needs landmarks.weights (a local file)")
        return FaceAlignmentDetector(weights)
    if name == "precomputed":
        if not precomputed_dir:
            raise ConfigError("landmarks.detector=precomputed needs landmarks.precomputed_dir")
        return PrecomputedDetector(precomputed_dir)
    raise ConfigError(f"unknown landmark detector {name!r}; choose mediapipe, face_alignment or precomputed")


def face_mask(points: np.ndarray, shape: tuple[int, int], scheme: str = "mediapipe478") -> np.ndarray:
    """(H, W) bool mask: the filled convex hull of the face-oval landmarks."""
    import cv2

    oval = points[list(FACE_OVAL if scheme == "mediapipe478" else OVAL_68)]
    hull = cv2.convexHull(np.round(oval).astype(np.int32))
    mask = np.zeros(shape, np.uint8)
    cv2.fillConvexPoly(mask, hull, 1)
    return mask.astype(bool)


LANDMARK_ROWS_SCHEMA_FIELDS = (
    ("subject_id", "string"), ("expression", "string"), ("frame_index", "int32"),
    ("detector", "string"), ("scheme", "string"), ("status", "string"), ("reason", "string"),
    ("confidence", "float32"), ("mask_pixels", "int32"), ("points", "list<float32>"),
)


def landmark_rows_schema():
    """Arrow schema of the landmark records table (one row per phone frame)."""
    import pyarrow as pa

    types = {"string": pa.string(), "int32": pa.int32(), "float32": pa.float32(), "list<float32>": pa.list_(pa.float32())}
    return pa.schema([(name, types[t]) for name, t in LANDMARK_ROWS_SCHEMA_FIELDS])


def detect_landmarks_for_capture(capture: str, validated: object, config):
    """Stage ``landmarks``: landmarks, confidence and face mask of every phone frame.

    ``validated`` is the ``validate`` stage's output: this stage only runs on a capture
    that passed validation.

    Returns a ``StageOutput`` whose table ``rows`` holds one record per frame (status
    ``ok`` or ``rejected`` with its reason) and whose arrays hold each expression's
    bit-packed face masks ``mask_<expression>`` (frames, packed H*W bits) and landmark
    points ``points_<expression>`` (frames, P, 2; NaN where rejected).
    """
    import pyarrow as pa

    from pipeline.serialize import StageOutput
    from storage.capture import Capture

    cap = Capture.open(capture)
    detector = make_detector(
        config["landmarks.detector"], weights=config["landmarks.weights"] or None,
        precomputed_dir=config["landmarks.precomputed_dir"] or None,
    )
    rows: dict[str, list] = {name: [] for name, _ in LANDMARK_ROWS_SCHEMA_FIELDS}
    arrays: dict[str, np.ndarray] = {}
    for expression in cap.phone_expressions:
        masks, points = [], []
        for frame in cap.iter_phone_frames(expression):
            det = detector.detect(frame.rgb, (expression, frame.index))
            if det.found and det.confidence < config["landmarks.min_confidence"]:
                det = Detection.missing(f"confidence {det.confidence:.2f} below {config['landmarks.min_confidence']}", det.scheme)
            shape = frame.rgb.shape[:2]
            mask = face_mask(det.points, shape, det.scheme) if det.found else np.zeros(shape, bool)
            masks.append(np.packbits(mask.ravel()))
            n_points = SCHEME_POINTS[detector.scheme]
            points.append(det.points if det.found else np.full((n_points, 2), np.nan, np.float32))
            for name, value in (
                ("subject_id", cap.subject_id), ("expression", expression), ("frame_index", frame.index),
                ("detector", config["landmarks.detector"]), ("scheme", det.scheme),
                ("status", "ok" if det.found else "rejected"), ("reason", det.reason),
                ("confidence", det.confidence), ("mask_pixels", int(mask.sum())),
                ("points", det.points.ravel().tolist()),
            ):
                rows[name].append(value)
        arrays[f"mask_{expression}"] = np.stack(masks)
        arrays[f"points_{expression}"] = np.stack(points).astype(np.float32)
    if hasattr(detector, "close"):
        detector.close()
    table = pa.table(rows, schema=landmark_rows_schema())
    meta = {"subject_id": cap.subject_id, "frames": table.num_rows,
            "rejected": int(sum(s != "ok" for s in rows["status"]))}
    return StageOutput(arrays=arrays, meta=meta, tables={"rows": table})
