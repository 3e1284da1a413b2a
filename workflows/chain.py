"""The product's chain: the one list a new stage is appended to.

Adding a stage is a local change: write its module under ``stages/`` with a module-level
function, then append one :class:`~pipeline.stage.Stage` to :data:`STAGES`.
The chain lives above the engine (``pipeline/`` never imports ``stages/`` or ``workflows/``).
Stages are listed in execution order: each input names ``"capture"`` or an earlier stage.
"""

from __future__ import annotations

from pipeline.stage import Chain, Publish, Stage
from stages.face_mask import refine_masks_for_capture
from stages.fit import fit_capture
from stages.fusion import fuse_capture
from stages.landmarks import detect_landmarks_for_capture
from stages.refine import refine_capture
from stages.rigging import rig_capture
from stages.selfsup.stage import selfsup_capture
from stages.texture import texture_capture
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
    Stage(
        name="face_mask", version="1", fn=refine_masks_for_capture, inputs=("capture", "landmarks"),
        config_fields=("face_mask",), outputs=("rows",),
        description="face mask refined with depth: depth band, depth-edge test, forehead",
        library_versions=("opencv-contrib-python",),
    ),
    Stage(
        name="fusion", version="1", fn=fuse_capture, inputs=("capture", "landmarks", "face_mask"),
        config_fields=("fusion",), outputs=("rows",),
        description="landmark-initialised RANSAC + point-to-plane ICP, Poisson mesh per expression",
        library_versions=("open3d",),
    ),
    Stage(
        name="fit", version="1", fn=fit_capture, inputs=("capture", "landmarks", "fusion"),
        config_fields=("fit",), outputs=("rows",),
        description="joint morphable-model fit: shared identity, expression and head pose per scan",
        library_versions=("torch", "scipy", "opencv-contrib-python"),
    ),
    Stage(
        name="refine", version="1", fn=refine_capture, inputs=("capture", "fusion", "fit"),
        config_fields=("refine",), outputs=("rows",),
        description="Laplacian non-rigid refinement of each expression toward its scan",
        library_versions=("scipy",),
    ),
    Stage(
        name="texture", version="1", fn=texture_capture, inputs=("capture", "fusion", "refine"),
        config_fields=("texture",), outputs=("rows",),
        description="phone RGB fused into the template's UV atlas, with per-texel confidence",
        library_versions=("opencv-contrib-python",),
    ),
    Stage(
        name="rig", version="1", fn=rig_capture, inputs=("capture", "refine"),
        config_fields=("rig",), outputs=("rows",),
        description="personal 53-blendshape rig by example-based rigging of the refined expressions",
        library_versions=("scipy",),
    ),
    Stage(
        name="selfsup", version="1", fn=selfsup_capture, inputs=("capture", "texture", "rig"),
        config_fields=("selfsup",), resumable=True,
        description="round-0 labels: per-subject network trained through the differentiable HMC renderer",
        library_versions=("torch", "open3d"),
    ),
]


def default_chain() -> Chain:
    """The product chain built from :data:`STAGES` (validated)."""
    return Chain(tuple(STAGES))
