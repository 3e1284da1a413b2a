"""Reads a synthetic subject's ground truth (for tests, benchmarks and §5.2 metrics only)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rigs.face_model import load_ict_face_model
from rigs.geometry import rotation_from_quat
from rigs.rig import BlendshapeRig


@dataclass(frozen=True, eq=False)
class SubjectTruth:
    """A subject's truth folder, opened.

    Attributes:
        root: ``ground_truth/<subject>``.
        meta: subject.json.
        rig: the true personal rig.
    """

    root: Path
    meta: dict
    rig: BlendshapeRig

    @classmethod
    def open(cls, root: str | Path) -> SubjectTruth:
        root = Path(root)
        meta = json.loads((root / "subject.json").read_text())
        rig = BlendshapeRig.load(root / "rig.npz", load_ict_face_model())
        return cls(root, meta, rig)

    def hmc(self, recording: str) -> dict[str, np.ndarray]:
        """Per-frame truth of a recording (see stages/synthesis/generate.py)."""
        with np.load(self.root / "hmc" / f"{recording}.npz", allow_pickle=False) as d:
            return {k: d[k] for k in d.files}

    def phone(self, prompt: str) -> dict[str, np.ndarray]:
        with np.load(self.root / "phone" / f"{prompt}.npz", allow_pickle=False) as d:
            return {k: d[k] for k in d.files}

    def expressions(self) -> dict[str, np.ndarray]:
        with np.load(self.root / "expressions.npz", allow_pickle=False) as d:
            return {k: d[k] for k in d.files}

    def hmc_vertices(self, recording: str, frame: int) -> np.ndarray:
        """(n, 3) true mesh of an HMC frame in the headset frame."""
        t = self.hmc(recording)
        head = self.rig.pose(t["b"][frame], t["gaze"][frame])
        q = t["head_quat"][frame]
        return rotation_from_quat(q).apply(head) + t["head_t"][frame]
