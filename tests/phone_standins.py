"""Stand-ins for the phone chain's artifacts built from a synthetic subject's truth.

The landmark output holds the true MediaPipe landmarks and their face masks; the fused
scans are the true meshes' face region placed in each burst's first camera; the fitted /
refined meshes are the true meshes pushed ``offset_mm`` along their normals, so every
measure has a known answer.
"""

from __future__ import annotations

import numpy as np

from pipeline.serialize import StageOutput
from rigs.raycast import vertex_normals
from stages.fusion import FusedExpression, FusedScans
from stages.geometry_eval import face_region, face_region_triangles, place


def _pose4(pose: np.ndarray) -> np.ndarray:
    return np.r_[np.asarray(pose, np.float64)[:3], [[0.0, 0.0, 0.0, 1.0]]]


def true_landmarks_output(cap, truth, drop: dict[str, list[int]]) -> StageOutput:
    """The landmark stage's output built from the true landmarks; frames in ``drop`` have no face."""
    from stages.landmarks import face_mask

    arrays = {}
    for e in cap.phone_expressions:
        intr = cap.phone_intrinsics(e)
        pts = truth.phone(e)["landmarks_2d"][:, :478].astype(np.float32)
        masks = [face_mask(p, (intr.height, intr.width)) for p in pts]
        for i in drop.get(e, []):
            pts[i] = np.nan
            masks[i] = np.zeros_like(masks[i])
        arrays[f"mask_{e}"] = np.stack([np.packbits(m.ravel()) for m in masks])
        arrays[f"points_{e}"] = pts
    return StageOutput(arrays=arrays)


def fused_standin(truth) -> FusedScans:
    """Every expression "fused" into its true face region, frame 0 as the reference."""
    model = truth.rig.model
    tri = model.triangles[face_region_triangles(model.triangles, face_region(model))]
    used, local = np.unique(tri, return_inverse=True)
    ex = truth.expressions()
    out = {}
    for e, verts in zip([str(p) for p in ex["prompts"]], ex["vertices"], strict=True):
        poses = truth.phone(e)["head_in_camera"]
        n = len(poses)
        ref_from = np.stack([_pose4(poses[0]) @ np.linalg.inv(_pose4(p)) for p in poses])
        out[e] = FusedExpression(
            expression=e, vertices=place(verts[used], poses[0]).astype(np.float32),
            triangles=local.reshape(-1, 3).astype(np.int32), frame_ids=np.arange(n), poses=ref_from,
            fitness=np.ones(n), rmse=np.zeros(n), landmarks_lifted=np.full(n, 478), landmark_inliers=np.full(n, 478),
            reference=0, frames_used=np.arange(n), rejected=())
    return FusedScans(truth.meta["subject_id"], out)


def mesh_standin(truth, offset_mm: float) -> StageOutput:
    """A fit/refine artifact (contract keys) whose meshes are the truth moved along normals."""
    model = truth.rig.model
    ex = truth.expressions()
    prompts = [str(p) for p in ex["prompts"]]

    def moved(v: np.ndarray) -> np.ndarray:
        return (v + vertex_normals(v.astype(np.float64), model.triangles) * offset_mm * 1e-3).astype(np.float32)

    arrays = {"identity": np.zeros(model.identity_basis.shape[0], np.float32), "neutral": moved(truth.rig.neutral)}
    for e, b, v in zip(prompts, ex["b"], ex["vertices"], strict=True):
        arrays[f"{e}.weights"] = b.astype(np.float32)
        arrays[f"{e}.scan_from_head"] = _pose4(truth.phone(e)["head_in_camera"][0])
        arrays[f"{e}.vertices"] = moved(v)
    meta = {"subject_id": truth.meta["subject_id"], "model": f"{model.name}/{model.version}", "expressions": prompts,
            "rejected": {}, "neutral_expression": "neutral"}
    return StageOutput(arrays=arrays, meta=meta)
