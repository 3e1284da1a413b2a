"""What an HMC keypoint detector's point p means on the template.

The capture contract leaves the meaning of keypoint p to the detector (one detector per
recording), so the labeller is told it by name. Each layout maps its P points to
barycentric points of the template: (P, 3) vertex ids and (P, 3) weights, so posed
keypoints are one gather and a weighted sum, differentiable in the vertices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.errors import ConfigError
from rigs.face_model import FaceModel

#: Layout names. ``iris10+multipie68``: MediaPipe's 10 iris points (landmarks 468-477,
#: through the template's MediaPipe embedding) then the 68 Multi-PIE points.
LAYOUTS = ("iris10+multipie68", "multipie68", "mediapipe478")


@dataclass(frozen=True)
class KeypointLayout:
    """Keypoints as barycentric template points.

    Attributes:
        name: the layout's name.
        vertex_ids: (P, 3) int64 template vertex ids.
        weights: (P, 3) float64 barycentric weights (rows sum to 1).
    """

    name: str
    vertex_ids: np.ndarray
    weights: np.ndarray

    @property
    def size(self) -> int:
        return int(self.vertex_ids.shape[0])

    def points(self, vertices: torch.Tensor) -> torch.Tensor:
        """(F, n, 3) posed vertices -> (F, P, 3) keypoints."""
        ids = torch.as_tensor(self.vertex_ids, device=vertices.device)
        w = torch.as_tensor(self.weights, dtype=vertices.dtype, device=vertices.device)
        return (vertices[:, ids] * w[None, :, :, None]).sum(-2)

    def compact(self) -> tuple[np.ndarray, KeypointLayout]:
        """(the (m,) template vertices the points use, the same layout over those m only):
        ``compact.points(posed[:, used])`` equals ``points(posed)``."""
        used, local = np.unique(self.vertex_ids, return_inverse=True)
        return used.astype(np.int64), KeypointLayout(self.name, local.reshape(self.vertex_ids.shape).astype(np.int64),
                                                     self.weights)


def _embedded(model: FaceModel, name: str, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    emb = model.embeddings[name]
    tri = np.asarray(model.triangles)[np.asarray(emb.triangle)[rows]]
    return tri.astype(np.int64), np.asarray(emb.barycentric, np.float64)[rows]


def _vertices(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = np.asarray(ids, np.int64)
    w = np.zeros((len(ids), 3))
    w[:, 0] = 1.0
    return np.repeat(ids[:, None], 3, 1), w


def keypoint_layout(name: str, model: FaceModel) -> KeypointLayout:
    """The named layout on ``model``'s template.

    Raises:
        ConfigError: an unknown name, or the model lacks the embedding it needs.
    """
    if name not in LAYOUTS:
        raise ConfigError(f"unknown keypoint layout {name!r}; known: {', '.join(LAYOUTS)}")
    if ("mediapipe" in name or "iris" in name) and "mediapipe478" not in model.embeddings:
        raise ConfigError(f"keypoint layout {name!r} needs the face model's mediapipe478 embedding")
    parts = []
    if name == "mediapipe478":
        parts.append(_embedded(model, "mediapipe478", np.arange(478)))
    if name.startswith("iris10"):
        parts.append(_embedded(model, "mediapipe478", np.arange(468, 478)))
    if name.endswith("multipie68"):
        parts.append(_vertices(model.landmarks68))
    ids = np.concatenate([p[0] for p in parts])
    weights = np.concatenate([p[1] for p in parts])
    return KeypointLayout(name, ids, weights)
