"""Two trivial labellers that every result is scored beside (SPEC §5.2).

A label result means something only against what a labeller that looks at no image
scores. Both write real label tables (every column of the schema, round 0):

- ``trivial_zeros``: every blendshape 0, gaze 0 (straight ahead), head pose the nominal
  donning (R = I, t = 0: the headset frame is the head frame at the nominal donning);
- ``trivial_prior``: inside each prompted ``peak`` window the prompt's art-prior vector
  from the rig definition (its eye-following part as the gaze that drives it, so the
  eye-following shapes are derived from gaze like every label's), zeros elsewhere, and
  the same gaze and head pose as ``trivial_zeros`` outside the windows.

They read only the capture's frame timestamps and segment annotations and the rig
definition; docs/metrics.md "Trivial labellers" shows their scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.errors import StageError
from rigs.definition import RigDefinition
from stages.metrics_common import segment_field, segments_of

TRIVIAL_ZEROS = "trivial_zeros"
TRIVIAL_PRIOR = "trivial_prior"
#: The trivial labellers' label_source values, in the order reports show them.
TRIVIAL_SOURCES = (TRIVIAL_ZEROS, TRIVIAL_PRIOR)
#: Nominal donning: head rotation (w, x, y, z) and translation (m) in the headset frame.
NOMINAL_HEAD_QUAT = (1.0, 0.0, 0.0, 0.0)
NOMINAL_HEAD_T = (0.0, 0.0, 0.0)


def trivial_coefficients(
    source: str,
    frame_index: np.ndarray,
    segments: Sequence[Any],
    definition: RigDefinition,
) -> tuple[np.ndarray, np.ndarray]:
    """Blendshapes and gaze of a trivial labeller for one recording.

    Args:
        source: :data:`TRIVIAL_ZEROS` or :data:`TRIVIAL_PRIOR`.
        frame_index: (T,) frame indices of the recording.
        segments: the recording's segments (kind, start, end, prompt); ``peak`` windows
            cover ``start <= frame_index < end``.
        definition: the rig definition (names, art priors, eye-following convention).

    Returns:
        (b (T, K) float32 in rig order, gaze (T, 4) float32 radians).
    """
    if source not in TRIVIAL_SOURCES:
        raise StageError(f"trivial labeller {source!r}: expected one of {TRIVIAL_SOURCES}")
    fi = np.asarray(frame_index)
    b = np.zeros((fi.size, definition.size))
    gaze = np.zeros((fi.size, 4))
    if source == TRIVIAL_PRIOR:
        follow = definition.indices(definition.eye_following)
        for _, seg, start, end in segments_of(segments, ("peak",)):
            prior = definition.art_prior_vector(segment_field(seg, "prompt"))
            rows = (fi >= start) & (fi < end)
            b[rows] = prior
            gaze[rows] = definition.gaze_from_eye_following(prior[follow])
        b[:, follow] = definition.eye_following_from_gaze(gaze)
    return b.astype(np.float32), gaze.astype(np.float32)


def trivial_label_table(
    source: str,
    capture,
    definition: RigDefinition,
    *,
    pipeline_version: str,
    run_id: str,
    recordings: Sequence[str] | None = None,
) -> pa.Table:
    """A trivial labeller's label rows for a capture (all its recordings), schema-complete.

    Args:
        source: :data:`TRIVIAL_ZEROS` or :data:`TRIVIAL_PRIOR`.
        capture: a ``storage.capture.Capture`` (frame timestamps and segments are read).
        definition: the rig definition.
        pipeline_version: written into every row.
        run_id: written into every row.
        recordings: the recordings to label (default: all of the capture's).

    Returns:
        The rows (one per HMC frame), label_source ``source``, round 0, status ``ok``,
        confidence 0 (they look at no image), residuals null.
    """
    from storage.label_table import labels_to_arrow

    tables = []
    for rec_id in capture.recordings if recordings is None else recordings:
        rec = capture.recording(rec_id)
        stamps = np.asarray(rec.frame_timestamps_ns, np.int64)
        fi = np.arange(stamps.size)
        b, gaze = trivial_coefficients(source, fi, rec.segments, definition)
        n = fi.size
        tables.append(labels_to_arrow(
            capture.subject_id, rec_id, fi, stamps, b, gaze,
            np.tile(np.asarray(NOMINAL_HEAD_QUAT, np.float32), (n, 1)),
            np.tile(np.asarray(NOMINAL_HEAD_T, np.float32), (n, 1)),
            blendshape_names=definition.blendshape_names,
            confidence=np.zeros(n, np.float32), status="ok",
            label_source=source, label_round=0, pipeline_version=pipeline_version,
            rig_version=definition.version, run_id=run_id,
        ))
    return pa.concat_tables(tables)
