"""Pictures of round-0 labels (QA report, docs/img/): the labelled rig over the HMC views
for the best and worst frames by pixel residual, and blendshape curves against the truth
with the recording's segments drawn as bands.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from workflows.dashboard.overlay import mask_and_facing, tint

#: Band colours of the segment kinds (SPEC §2.3), matplotlib names.
SEGMENT_COLOURS = {"neutral": "tab:gray", "peak": "tab:orange", "blink": "tab:blue", "wink": "tab:cyan",
                   "mouth_closed": "tab:green", "speech": "tab:purple"}


def overlay_rows(capture: Any, labels: Any, rig: Any, rows: np.ndarray, max_side: int = 160) -> list[np.ndarray]:
    """One picture per label row: every camera's IR image with the labelled rig drawn over it.

    Args:
        capture: the opened capture.
        labels: the :class:`~stages.selfsup.stage.SelfSupLabels`.
        rig: the rendered personal rig (a :class:`~rigs.rig.BlendshapeRig`).
        rows: label rows to draw.
        max_side: each camera tile's largest side, pixels (the render's resolution).

    Returns:
        (H, C * W, 3) uint8 RGB per row, cameras side by side.
    """
    import torch

    from rigs.camera import rig_cameras
    from rigs.geometry import rotation_from_quat
    from rigs.render import HmcRenderer, RigState

    names = labels.cameras
    width = capture.rig.camera(names[0]).intrinsics.width
    scale = min(1.0, max_side / width)
    renderer = HmcRenderer.from_rig(rig, rig_cameras(capture.rig), scale=scale, names=names)
    rotation = rotation_from_quat(labels.head_quat[rows]).as_matrix()
    state = RigState(torch.as_tensor(labels.b[rows]), torch.as_tensor(labels.gaze[rows]),
                     torch.as_tensor(rotation, dtype=torch.float32), torch.as_tensor(labels.head_t[rows]))
    with torch.no_grad():
        mask, facing = mask_and_facing(renderer.render(state))
    pictures = []
    for i, row in enumerate(rows):
        recording, frame = _recording_frame(labels, int(row))
        rec = capture.recording(recording)
        tiles = []
        for c, name in enumerate(names):
            ir = cv2.resize(rec.read_frame(name, frame), mask.shape[2:][::-1], interpolation=cv2.INTER_AREA)
            tiles.append(tint(np.repeat(ir[..., None], 3, -1), mask[i, c], facing[i, c]))
        pictures.append(np.hstack(tiles))
    return pictures


def _recording_frame(labels: Any, row: int) -> tuple[str, int]:
    offsets = np.cumsum((0,) + tuple(labels.frame_counts))
    i = int(np.searchsorted(offsets, row, side="right") - 1)
    return labels.recordings[i], row - int(offsets[i])


def best_and_worst_rows(labels: Any, count: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The ``count`` ok frames with the lowest and the highest pixel residual."""
    ok = np.flatnonzero((labels.status == "ok") & np.isfinite(labels.residual_photometric))
    order = ok[np.argsort(labels.residual_photometric[ok], kind="stable")]
    return order[:count], order[::-1][:count]


def write_overlay_figure(path: Path, capture: Any, labels: Any, rig: Any, count: int = 2) -> Path:
    """The best and worst frames by pixel residual, the labelled rig over every HMC view."""
    best, worst = best_and_worst_rows(labels, count)
    rows = np.concatenate([best, worst])
    pictures = overlay_rows(capture, labels, rig, rows)
    captioned = []
    for row, picture, kind in zip(rows, pictures, ["best"] * len(best) + ["worst"] * len(worst), strict=True):
        recording, frame = _recording_frame(labels, int(row))
        text = f"{kind}: {recording} frame {frame}, pixel rms {labels.residual_photometric[row] * 255:.1f} grey levels"
        band = np.full((22, picture.shape[1], 3), 255, np.uint8)
        cv2.putText(band, text, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        captioned.append(np.vstack([band, picture]))
    return _save(path, np.vstack(captioned))


def write_curves_figure(path: Path, labels: Any, truth_b: np.ndarray | None, segments: list, recording: str,
                        names: tuple[str, ...] | None = None, count: int = 6, fps: float | None = None) -> Path:
    """Blendshape curves of one recording: labels (solid) against the truth (dashed), the
    segments as coloured bands. Shows ``names``, else the ``count`` bases the truth (or the
    labels) moves most.

    Args:
        truth_b: (T, K_all) true coefficients of the recording, or None.
        segments: the recording's segments (``kind``, ``start``, ``end`` in frames).
        fps: frame rate for a time axis in seconds; frames when None.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = labels.rows(recording)
    est = labels.b[rows]
    reference = truth_b if truth_b is not None else est
    if names is None:
        order = np.argsort(-np.percentile(reference, 95, axis=0), kind="stable")[:count]
        names = tuple(labels.blendshape_names[k] for k in order)
    index = [labels.blendshape_names.index(n) for n in names]
    x = np.arange(len(est)) / (fps or 1.0)
    fig, axes = plt.subplots(len(index), 1, figsize=(11, 1.35 * len(index) + 0.6), sharex=True, squeeze=False)
    for ax, k, name in zip(axes[:, 0], index, names, strict=True):
        for seg in segments:
            ax.axvspan(seg.start / (fps or 1.0), seg.end / (fps or 1.0), color=SEGMENT_COLOURS.get(seg.kind, "w"),
                       alpha=0.18, lw=0)
        ax.plot(x, est[:, k], color="tab:red", lw=1.2, label="round 0")
        if truth_b is not None:
            ax.plot(x, truth_b[:, k], color="k", lw=1.0, ls="--", label="truth")
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
        ax.tick_params(labelsize=7)
    handles = [matplotlib.patches.Patch(color=c, alpha=0.3, label=k) for k, c in SEGMENT_COLOURS.items()
               if any(s.kind == k for s in segments)]
    line_handles, _ = axes[0, 0].get_legend_handles_labels()
    axes[0, 0].legend(handles=line_handles + handles, ncol=8, fontsize=7, loc="lower left", bbox_to_anchor=(0, 1.02))
    axes[-1, 0].set_xlabel("seconds" if fps else "frame")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _save(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), rgb[:, :, ::-1])
    return path
