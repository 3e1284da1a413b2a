"""The product's chain: the one list a new stage is appended to.

Adding a stage is a local change: write its module under ``stages/`` with a module-level
function, then append one :class:`~pipeline.stage.Stage` to :data:`STAGES`.
The chain lives above the engine (``pipeline/`` never imports ``stages/`` or ``workflows/``).
Stages are listed in execution order: each input names ``"capture"`` or an earlier stage.
"""

from __future__ import annotations

from pipeline.stage import Chain, Publish, Stage
from stages.landmarks import detect_landmarks_for_capture
from stages.validation import validate_capture_stage

#: The default chain, in order. Later issues append their stages here.
STAGES: list[Stage] = [
    Stage(
        name="validate", version="2", fn=validate_capture_stage, inputs=("capture",),
        config_fields=("validate.deep",), description="check the capture contract",
    ),
    Stage(
        name="landmarks", version="1", fn=detect_landmarks_for_capture, inputs=("capture", "validate"),
        config_fields=("landmarks.detector", "landmarks.weights", "landmarks.precomputed_dir", "landmarks.min_confidence"),
        outputs=("rows",), publish=Publish(table="landmarks", predicate_columns=("subject_id",)),
        description="MediaPipe landmarks, confidence and face mask per phone frame",
        library_versions=("mediapipe", "opencv-contrib-python"),
    ),
]


def default_chain() -> Chain:
    """The product chain built from :data:`STAGES` (validated)."""
    return Chain(tuple(STAGES))
