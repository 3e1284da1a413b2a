"""Landmarks and face mask per phone frame (SPEC §3 item 1).

Three detectors behind one interface (:class:`LandmarkDetector`):
- ``mediapipe``: MediaPipe face mesh (478 points with irises; models bundled in the
  pinned 0.10.21 wheel), confidence = MediaPipe's face-detection score;
- ``face_alignment``: the face-alignment package (68 points) from a user-supplied local
  weights file, never downloaded;
- ``precomputed``: landmark files a user produced elsewhere
  (``<dir>/<expression>/<index>.npz`` with ``points (P, 2)`` and ``confidence ()``).
The face mask is the filled convex hull of the face-oval landmarks. A frame without a
face is a :class:`Detection` with ``found=False`` and a reason, never an exception.
"""

from __future__ import annotations

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


class MediaPipeDetector:
    """MediaPipe face mesh in static-image mode, with iris refinement."""

    scheme = "mediapipe478"

    def __init__(self, min_detection_confidence: float = 0.5):
        import mediapipe as mp

        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True, refine_landmarks=True, max_num_faces=1,
            min_detection_confidence=min_detection_confidence,
        )
        self._faces = mp.solutions.face_detection.FaceDetection(
            model_selection=0, min_detection_confidence=min_detection_confidence * 0.5
        )

    def detect(self, rgb: np.ndarray, key: tuple[str, int] | None = None) -> Detection:
        h, w = rgb.shape[:2]
        result = self._mesh.process(np.ascontiguousarray(rgb))
        if not result.multi_face_landmarks:
            return Detection.missing("MediaPipe face mesh found no face")
        lm = result.multi_face_landmarks[0].landmark
        points = np.array([[p.x * w, p.y * h] for p in lm], np.float32)
        faces = self._faces.process(np.ascontiguousarray(rgb)).detections
        confidence = float(max(d.score[0] for d in faces)) if faces else 0.5
        return Detection(True, points, confidence)

    def close(self) -> None:
        self._mesh.close()
        self._faces.close()


class FaceAlignmentDetector:
    """face-alignment's 2D FAN from a local weights file (never downloaded)."""

    scheme = "multipie68"

    def __init__(self, weights: str | Path, device: str = "cpu"):
        weights = Path(weights)
        if not weights.is_file():
            raise ConfigError(f"{weights}: face-alignment weights file not found")
        try:
            import face_alignment  # noqa: F401
            import torch
        except ImportError as exc:
            raise ConfigError("face-alignment is not installed: pip install 'hmc-pgt[face-alignment]'") from exc
        self._model = torch.jit.load(str(weights), map_location=device)
        self._device = device

    def detect(self, rgb: np.ndarray, key: tuple[str, int] | None = None) -> Detection:
        import cv2
        import torch

        # FAN expects a 256 x 256 face crop; use the whole frame's centred square.
        h, w = rgb.shape[:2]
        side = min(h, w)
        y0, x0 = (h - side) // 2, (w - side) // 2
        crop = cv2.resize(rgb[y0 : y0 + side, x0 : x0 + side], (256, 256)).astype(np.float32) / 255.0
        with torch.no_grad():
            heat = self._model(torch.from_numpy(crop).permute(2, 0, 1)[None].to(self._device))[0].cpu().numpy()
        flat = heat.reshape(len(heat), -1)
        idx = flat.argmax(1)
        ys, xs = np.divmod(idx, heat.shape[2])
        scale = side / heat.shape[2]
        points = np.c_[xs * scale + x0, ys * scale + y0].astype(np.float32)
        confidence = float(np.clip(flat.max(1).mean(), 0, 1))
        if confidence < 0.2:
            return Detection.missing("face-alignment heatmaps too weak", self.scheme)
        return Detection(True, points, confidence, scheme=self.scheme)


class PrecomputedDetector:
    """Reads landmarks produced elsewhere: ``<root>/<expression>/<index:06d>.npz``."""

    def __init__(self, root: str | Path, scheme: str = "mediapipe478"):
        self.root, self.scheme = Path(root), scheme

    def detect(self, rgb: np.ndarray, key: tuple[str, int] | None = None) -> Detection:
        if key is None:
            raise ConfigError("precomputed landmarks need the frame's (expression, index)")
        path = self.root / key[0] / f"{key[1]:06d}.npz"
        if not path.is_file():
            return Detection.missing(f"{path}: no precomputed landmarks", self.scheme)
        with np.load(path, allow_pickle=False) as data:
            points = np.asarray(data["points"], np.float32)
            confidence = float(data["confidence"]) if "confidence" in data else 1.0
        if points.ndim != 2 or points.shape[1] != 2 or not np.isfinite(points).all():
            return Detection.missing(f"{path}: points must be finite (P, 2)", self.scheme)
        return Detection(True, points, confidence, scheme=self.scheme)


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
            n_points = 478 if detector.scheme == "mediapipe478" else 68
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
