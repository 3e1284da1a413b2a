"""Blendshape rigs: a neutral, K named deltas, and eyeballs that rotate with gaze.

The generic rig is the face model's expression shapes on some identity; a personal rig
(ground truth, or the output of example-based rigging) has the same structure with its
own neutral and deltas. Both are :class:`BlendshapeRig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ModelError
from rigs.definition import RigDefinition, load_default_rig_definition
from rigs.face_model import FaceModel

#: Multi-PIE 68 pair across the inner lips at the midline (upper, lower). The corner pairs
#: are left out: ICT's neutral corners already sit 1.2 mm apart with the lips closed.
INNER_LIP_PAIRS = ((62, 66),)
#: Multi-PIE 68 pairs across each eye's lids (upper, lower); 42-47 is the subject's left.
EYELID_PAIRS = {"left": ((43, 47), (44, 46)), "right": ((37, 41), (38, 40))}


def gaze_rotation(yaw: np.ndarray, pitch: np.ndarray) -> np.ndarray:
    """Eyeball rotation for a gaze direction.

    The rest gaze is +z; yaw > 0 turns toward +x, pitch > 0 up, so the gaze direction is
    ``(cos p sin y, sin p, cos p cos y)`` = ``R @ (0, 0, 1)``.

    Args:
        yaw: (...,) radians.
        pitch: (...,) radians.

    Returns:
        (..., 3, 3) rotation matrices ``R_y(yaw) @ R_x(-pitch)``.
    """
    yaw, pitch = np.asarray(yaw, np.float64), np.asarray(pitch, np.float64)
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    zero = np.zeros_like(yaw)
    rows = [
        [cy, -sy * sp, sy * cp],
        [zero, cp, sp],
        [-sy, -cy * sp, cy * cp],
    ]
    return np.stack([np.stack(r, -1) for r in rows], -2)


@dataclass(frozen=True, eq=False)
class BlendshapeRig:
    """A posable blendshape rig.

    Attributes:
        definition: names, order, version and prompts.
        neutral: (n, 3) float32 neutral vertices, metres, head frame.
        deltas: (K, n, 3) float32 per-shape offsets, in definition order.
        model: the face model whose topology, parts and landmarks the rig uses.
    """

    definition: RigDefinition
    neutral: np.ndarray
    deltas: np.ndarray
    model: FaceModel

    def __post_init__(self) -> None:
        n, k = self.model.n_vertices, self.definition.size
        if self.neutral.shape != (n, 3):
            raise ModelError(f"rig neutral must be ({n}, 3), got {self.neutral.shape}")
        if self.deltas.shape != (k, n, 3):
            raise ModelError(f"rig deltas must be ({k}, {n}, 3), got {self.deltas.shape}")

    @classmethod
    def generic(
        cls,
        model: FaceModel,
        definition: RigDefinition | None = None,
        identity: np.ndarray | None = None,
    ) -> BlendshapeRig:
        """The face model's expression shapes on an identity (the mean one by default)."""
        definition = definition or load_default_rig_definition()
        missing = [n for n in definition.blendshape_names if n not in model.expression_names]
        if missing:
            raise ModelError(f"face model {model.name} lacks shapes {missing}")
        order = [model.expression_names.index(n) for n in definition.blendshape_names]
        neutral = model.neutral if identity is None else model.identity_shape(identity)
        return cls(definition, neutral.astype(np.float32), model.expression_basis[order], model)

    @property
    def eyeball_vertices(self) -> tuple[np.ndarray, np.ndarray]:
        return self.model.part_vertices("eyeball_left"), self.model.part_vertices("eyeball_right")

    def eye_centres(self) -> np.ndarray:
        """(2, 3) eyeball centres of this rig's neutral ([left, right])."""
        offset = self.neutral - self.model.neutral  # identity moves the eyeballs rigidly
        return np.stack([
            self.model.eye_centres[i] + offset[ids].mean(0)
            for i, ids in enumerate(self.eyeball_vertices)
        ])

    def pose(self, b: np.ndarray, gaze: np.ndarray | None = None) -> np.ndarray:
        """Posed vertices for one frame or a batch.

        Args:
            b: (K,) or (T, K) activations in [0, 1], definition order (eye-following
                entries included, as given).
            gaze: (4,) or (T, 4) [left yaw, left pitch, right yaw, right pitch] radians;
                rotates the eyeballs about their centres. None leaves them at rest.

        Returns:
            (n, 3) or (T, n, 3) float32 vertices, metres, head frame.
        """
        b = np.asarray(b, np.float32)
        single = b.ndim == 1
        b2 = b[None] if single else b
        if b2.ndim != 2 or b2.shape[1] != self.definition.size:
            raise ModelError(f"b must be (K,) or (T, K) with K={self.definition.size}, got {b.shape}")
        verts = self.neutral[None] + np.tensordot(b2, self.deltas, axes=1)
        if gaze is not None:
            g = np.asarray(gaze, np.float64).reshape(-1, 4)
            if len(g) != len(b2):
                raise ModelError(f"gaze must match b's frames, got {np.shape(gaze)} for {b.shape}")
            centres = self.eye_centres()
            for eye, ids in enumerate(self.eyeball_vertices):
                rot = gaze_rotation(g[:, 2 * eye], g[:, 2 * eye + 1]).astype(np.float32)
                local = verts[:, ids] - centres[eye]
                verts[:, ids] = np.einsum("tij,tvj->tvi", rot, local) + centres[eye]
        return verts[0] if single else verts

    def landmarks68(self, vertices: np.ndarray) -> np.ndarray:
        """(..., 68, 3) Multi-PIE landmarks of posed vertices."""
        return vertices[..., self.model.landmarks68, :]

    def inner_lip_gap(self, b: np.ndarray) -> np.ndarray:
        """Largest distance across the inner lips (metres), per frame.

        Only the lip landmarks are posed, so this is cheap enough for metrics over long
        recordings.

        Args:
            b: (K,) or (T, K) activations.

        Returns:
            () or (T,) float64 metres.
        """
        return self._landmark_gap(b, INNER_LIP_PAIRS).max(-1)

    def eyelid_gap(self, b: np.ndarray, eye: str) -> np.ndarray:
        """Mean distance between upper and lower lid of ``eye`` ("left"/"right"), metres."""
        return self._landmark_gap(b, EYELID_PAIRS[eye]).mean(-1)

    def _landmark_gap(self, b: np.ndarray, pairs: tuple[tuple[int, int], ...]) -> np.ndarray:
        b = np.asarray(b, np.float64)
        upper = self.model.landmarks68[[p[0] for p in pairs]]
        lower = self.model.landmarks68[[p[1] for p in pairs]]
        diff_neutral = self.neutral[upper] - self.neutral[lower]  # (P, 3)
        diff_deltas = self.deltas[:, upper] - self.deltas[:, lower]  # (K, P, 3)
        diff = diff_neutral + np.tensordot(b, diff_deltas, axes=1)
        return np.linalg.norm(diff, axis=-1)

    def save(self, path: str | Path) -> None:
        """Writes neutral and deltas (float32) with the definition's name and version.

        The bytes depend on the content only (no zip dates), and the write is atomic.
        """
        from storage.capture_files import atomic_write_bytes, encode_npz

        arrays = {
            "rig_name": np.array(self.definition.name),
            "rig_version": np.array(self.definition.version),
            "blendshape_names": np.array(self.definition.blendshape_names),
            "model_version": np.array(self.model.version),
            "neutral": self.neutral.astype(np.float32),
            "deltas": self.deltas.astype(np.float32),
        }
        atomic_write_bytes(Path(path), encode_npz(arrays, compress=True))

    @classmethod
    def load(cls, path: str | Path, model: FaceModel, definition: RigDefinition | None = None) -> BlendshapeRig:
        """Reads a rig written by :meth:`save`; checks names against the definition."""
        definition = definition or load_default_rig_definition()
        data = np.load(path, allow_pickle=False)
        names = tuple(str(n) for n in data["blendshape_names"])
        if names != definition.blendshape_names:
            raise ModelError(f"{path}: blendshape names differ from rig {definition.name}")
        return cls(definition, data["neutral"], data["deltas"], model)


@dataclass(frozen=True, eq=False)
class ExpressionSpace:
    """A linear expression space for morphable-model fits, derived from rig shapes.

    Attributes:
        basis: (k, n, 3) float32 orthogonal modes, scaled so coefficients are ~unit size.
        singular_values: (k,) the modes' singular values.
    """

    basis: np.ndarray
    singular_values: np.ndarray

    @classmethod
    def from_rig(cls, rig: BlendshapeRig, energy: float = 0.999) -> ExpressionSpace:
        """Principal modes of the rig's regressed shapes keeping ``energy`` of their variance.

        The eye-following shapes are excluded: gaze is fitted separately.
        """
        ids = rig.definition.indices(rig.definition.regressed)
        mat = rig.deltas[ids].reshape(len(ids), -1).astype(np.float64)
        _, s, vt = np.linalg.svd(mat, full_matrices=False)
        keep = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), energy) + 1)
        scale = s[:keep] / np.sqrt(len(ids))
        basis = (vt[:keep] * scale[:, None]).reshape(keep, -1, 3).astype(np.float32)
        return cls(basis, s[:keep])
