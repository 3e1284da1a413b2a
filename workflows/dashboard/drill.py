"""Frame drill-down: which frames are worst, and their overlay pictures.

The labelled rig of a subject is the run's ``rig`` stage output when the run has one,
else the subject's true rig (synthetic data), else the generic rig on the mean identity
(then the picture says so: it shows the labels' motion, not the subject's shape).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from workflows.dashboard.data import DashboardData, FrameData
from workflows.dashboard.overlay import FramePose, OverlayConfig, encode_jpeg, frame_overlay


@dataclass(frozen=True)
class SubjectRig:
    """A subject's rig for the overlay, and where it came from ("run", "truth", "generic")."""

    rig: Any
    origin: str


def worst_frames(frames: FrameData, truth_b: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray, str]:
    """The ``n`` worst frames of a recording, worst first.

    Worst by the mean |b - b_true| over the blendshapes when the truth is given (rows
    aligned with the labels), else by lowest confidence, else by the largest mean
    |second difference| (jitter). Frames whose status is not ``ok`` come first.

    Returns:
        (frame indices (n,), scores (n,), what the score is).
    """
    labels = frames.labels
    if truth_b is not None:
        score, what = np.nanmean(np.abs(labels.b - truth_b), axis=1), "mean |b - truth|"
    elif np.isfinite(frames.confidence).any() and np.nanstd(frames.confidence) > 0:
        score, what = -np.nan_to_num(frames.confidence, nan=-np.inf), "-confidence"
    else:
        jerk = np.zeros(len(labels.b))
        jerk[1:-1] = np.abs(labels.b[2:] - 2 * labels.b[1:-1] + labels.b[:-2]).mean(axis=1)
        score, what = jerk, "mean |second difference|"
    score = np.nan_to_num(np.asarray(score, float), nan=np.inf)
    if labels.status is not None:
        score = np.where(labels.status != "ok", np.inf, score)
    order = np.argsort(-score, kind="stable")[:n]
    return labels.frame_index[order], score[order], what


class FrameDrill:
    """Overlay pictures of any frame, with the rigs, captures and truth opened once.

    Args:
        data: the dashboard's queries (sources: captures, truth, run output).
        config: how pictures are drawn.
    """

    def __init__(self, data: DashboardData, config: OverlayConfig | None = None) -> None:
        self.data = data
        self.config = config or OverlayConfig()
        self._rigs: dict[str, SubjectRig] = {}
        self._truth: dict[str, Any] = {}

    def rig(self, subject: str) -> SubjectRig:
        """The subject's labelled rig (see the module docstring)."""
        if subject not in self._rigs:
            self._rigs[subject] = self._find_rig(subject)
        return self._rigs[subject]

    def _find_rig(self, subject: str) -> SubjectRig:
        from pipeline.errors import PgtError
        from rigs.face_model import load_ict_face_model
        from rigs.rig import BlendshapeRig
        from stages.rigging import rig_from_run

        try:
            rig = rig_from_run(self.data.sources.out, subject)
            if rig is not None:
                return SubjectRig(rig, "run")
        except (PgtError, OSError, ValueError, KeyError):
            pass  # no readable run output for this subject: the truth's or the generic rig
        truth = self.truth(subject)
        if truth is not None:
            return SubjectRig(truth.rig, "truth")
        return SubjectRig(BlendshapeRig.generic(load_ict_face_model()), "generic")

    def truth(self, subject: str) -> Any:
        """The subject's :class:`SubjectTruth`, or None without a truth folder."""
        if not self.data.sources.truth:
            return None
        if subject not in self._truth:
            from stages.synthesis.truth import SubjectTruth

            root = Path(self.data.sources.truth) / subject
            self._truth[subject] = SubjectTruth.open(root) if (root / "subject.json").is_file() else None
        return self._truth[subject]

    def truth_curves(self, subject: str, recording: str, frames: FrameData) -> np.ndarray | None:
        """(T, K) true blendshapes at the labelled frames, in the labels' column order, or None."""
        truth = self.truth(subject)
        if truth is None or not (truth.root / "hmc" / f"{recording}.npz").is_file():
            return None
        t = truth.hmc(recording)
        rows = np.searchsorted(t["frame_index"], frames.labels.frame_index)
        rows = np.minimum(rows, len(t["frame_index"]) - 1)
        names = list(truth.rig.definition.blendshape_names)
        order = [names.index(n) for n in frames.labels.names]
        out = t["b"][rows][:, order].astype(float)
        out[t["frame_index"][rows] != frames.labels.frame_index] = np.nan
        return out

    def overlay(self, subject: str, recording: str, frame: int, frames: FrameData) -> bytes | None:
        """JPEG bytes of the labelled rig over the frame's views, or None without the capture."""
        from storage.capture import Capture

        path = self.data.capture_path(subject)
        if path is None:
            return None
        labels = frames.labels
        row = int(np.searchsorted(labels.frame_index, frame))
        subject_rig = self.rig(subject)
        names = list(subject_rig.rig.definition.blendshape_names)
        b = labels.b[row][[list(labels.names).index(n) for n in names]]
        pose = FramePose(b, *(None if a is None else a[row] for a in (labels.gaze, labels.head_q, labels.head_t)))
        truth = self.truth(subject)
        true_vertices = None
        if truth is not None and (truth.root / "hmc" / f"{recording}.npz").is_file():
            true_vertices = truth.hmc_vertices(recording, int(frame))
        picture = frame_overlay(Capture.open(path).recording(recording), int(frame), subject_rig.rig, pose,
                                true_vertices, self.config)
        return encode_jpeg(picture, self.config.jpeg_quality)
