"""The FLAME option through the fit and refine stages (issue 7 step 4, docs/flame.md).

With ``fit.flame_model`` set, the fit stage fits a :class:`rigs.flame_lbs.FlameModel`
instead of the embedded ICT model, and its artifact carries the FLAME topology
(:data:`TRIANGLES`, and the landmark embedding :data:`LANDMARK_TRIANGLE` /
:data:`LANDMARK_BARYCENTRIC` when one was configured) next to the FLAME-topology meshes.
The refine stage then registers the rig's template onto those meshes
(:func:`rigs.flame_register.rig_meshes_from_flame`, deformed by the refinement's own
Laplacian solver, :func:`refinement_deformer`), moves each pose into the rig's head frame
(``scan_from_head @ flame_from_rig``) and refines as always, so every later stage sees
the rig's topology.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, ModelError, StageError
from rigs.face_model import FaceModel, LandmarkEmbedding
from rigs.flame_register import Deformer, FlameRegistrationConfig, rig_meshes_from_flame

#: Fit artifact keys present only when the fitted meshes are not in the rig's topology.
TRIANGLES = "model.triangles"
LANDMARK_TRIANGLE = "model.landmarks.triangle"
LANDMARK_BARYCENTRIC = "model.landmarks.barycentric"
#: Prefix of the fit's ``model`` meta for a FLAME fit (``FlameModel.name``).
FLAME_PREFIX = "flame"
#: The FLAME surface handed to the Laplacian solver is cropped to triangles this close to
#: the rig's face region: a whole head has no majority of normals facing one viewpoint,
#: and the solver orients a scan's normals by majority.
CROP_MM = 10.0
#: The deformer's virtual camera sits this far in front of the face (+z), metres.
VIEW_DISTANCE_M = 0.5


# ------------------------------------------------------------------------------- the fit


def load_fit_model(flame_model: str, flame_landmarks: str = "") -> Any:
    """The FLAME model the fit section names, or None for the embedded ICT model.

    Args:
        flame_model: ``fit.flame_model`` (a converted ``.npz``; "" = not set).
        flame_landmarks: ``fit.flame_landmarks`` (embedding file; "" = none).

    Raises:
        ConfigError: a named file does not exist.
        ModelError: a file is not a usable FLAME model or embedding (the message names it).
    """
    if not flame_model:
        return None
    from rigs.flame_lbs import FlameModel

    for field, path in (("fit.flame_model", flame_model), ("fit.flame_landmarks", flame_landmarks)):
        if path and not Path(path).expanduser().is_file():
            raise ConfigError(f"config option {field}: {path}: no such file")
    try:
        return FlameModel.from_npz(Path(flame_model).expanduser(),
                                   Path(flame_landmarks).expanduser() if flame_landmarks else None)
    except ModelError as exc:
        raise ModelError(f"fit.flame_model: {exc}") from exc


def topology_arrays(model: Any) -> dict[str, np.ndarray]:
    """The fit artifact's topology keys for a FLAME model; {} for the rig's own model."""
    if not str(model.name).startswith(FLAME_PREFIX):
        return {}
    out = {TRIANGLES: np.asarray(model.triangles, np.int32)}
    if model.landmarks is not None:
        out[LANDMARK_TRIANGLE] = np.asarray(model.landmarks.triangle, np.int64)
        out[LANDMARK_BARYCENTRIC] = np.asarray(model.landmarks.barycentric, np.float64)
    return out


# ---------------------------------------------------------------------------- the refine


def needs_registration(fit_output: Any, fitted_vertex_count: int | None, face_model: FaceModel) -> bool:
    """Whether the fit's meshes are FLAME's (``model`` meta) or of another vertex count."""
    flame = str(fit_output.meta.get("model", "")).startswith(FLAME_PREFIX)
    return flame or (fitted_vertex_count is not None and fitted_vertex_count != face_model.n_vertices)


def refinement_deformer(face_model: FaceModel, cfg: Any, crop_mm: float = CROP_MM) -> Deformer:
    """The refinement's Laplacian solver (:func:`stages.refine.refine_expression`) as a
    :data:`rigs.flame_register.Deformer`.

    The FLAME surface, cropped to the triangles within ``crop_mm`` of the rig mesh's face
    region, is the "scan" of a virtual camera :data:`VIEW_DISTANCE_M` in front of the face
    (``scan_from_head = [I | (0, 0, -d)]``), so the solver's rigid parts, openings and
    stiffness schedule all apply.

    Args:
        face_model: the rig's face model.
        cfg: the refine section (:class:`stages.refine.RefineConfig`).
        crop_mm: crop distance, mm.
    """
    from scipy.spatial import cKDTree

    from stages.refine import refine_expression

    def deform(mesh: np.ndarray, flame_vertices: np.ndarray, flame_triangles: np.ndarray) -> np.ndarray:
        centres = flame_vertices[flame_triangles].mean(1)
        near = cKDTree(mesh[face_model.fitting_vertices]).query(centres)[0] < crop_mm * 1e-3
        view = np.eye(4)
        view[2, 3] = -VIEW_DISTANCE_M
        result, _ = refine_expression(mesh, flame_vertices + view[:3, 3], flame_triangles[near], view,
                                      face_model, cfg)
        return result.vertices

    return deform


def register_rig(fit_output: Any, fit: Any, face_model: FaceModel, cfg: Any,
                 registration: FlameRegistrationConfig | None = None) -> Any:
    """The fit's FLAME-topology meshes as rig-topology meshes (a new ``FitInput``).

    Every fitted expression's mesh is registered at once (shared rig identity); each
    result's ``scan_from_head`` becomes ``scan_from_head_flame @ flame_from_rig`` (the
    fusion reference camera from the RIG head frame). A surface the registration rejects
    becomes a rejected expression whose reason starts with ``"flame registration: "``.
    When every surface is rejected together (one bad surface among few pulls the shared
    identity), each is registered alone, so the good ones still go on.
    The identity-only mesh is dropped (FLAME topology; the neutral comes from the
    registered neutral expression).

    Args:
        fit_output: the fit stage's artifact (for the topology keys).
        fit: its :class:`stages.refine.FitInput`.
        face_model: the rig's face model.
        cfg: the refine section (the deformer's solver settings).
        registration: the registration's options; None = defaults.

    Raises:
        StageError: the artifact lacks the FLAME triangles, or they do not fit the meshes.
    """
    arrays = fit_output.arrays
    if TRIANGLES not in arrays:
        raise StageError(f"fit output of model {fit_output.meta.get('model')!r} is not in the rig's topology "
                         f"({face_model.n_vertices} vertices) and lacks {TRIANGLES}")
    triangles = np.asarray(arrays[TRIANGLES], np.int64)
    landmarks = None
    if LANDMARK_TRIANGLE in arrays and LANDMARK_BARYCENTRIC in arrays:
        landmarks = LandmarkEmbedding("mediapipe478", np.asarray(arrays[LANDMARK_TRIANGLE], np.int64),
                                      np.asarray(arrays[LANDMARK_BARYCENTRIC], np.float64))
    expressions = list(fit.expressions)
    if not expressions:
        return fit
    surfaces = np.stack([np.asarray(fit.vertices[e], np.float64) for e in expressions])
    deform = refinement_deformer(face_model, cfg)

    def register(ids: list[int]) -> Any:
        try:
            return rig_meshes_from_flame(surfaces[ids], triangles, face_model, flame_landmarks=landmarks,
                                         deform=deform, config=registration)
        except ModelError as exc:
            raise StageError(f"refine: the fit's FLAME meshes cannot be registered: {exc}") from exc

    reg = register(list(range(len(expressions))))
    results = [(reg, s) for s in range(len(expressions))]
    if len(expressions) > 1 and not reg.ok.any():
        # the identity is shared: one bad surface among few can pull every fit past the
        # gate, so each surface gets a chance alone before the subject loses them all
        results = [(register([s]), 0) for s in range(len(expressions))]
    rejected = dict(fit.rejected)
    vertices, poses = {}, {}
    for e, (r, s) in zip(expressions, results, strict=True):
        if r.reasons[s]:
            rejected[e] = f"flame registration: {r.reasons[s]}"
        else:
            vertices[e] = r.vertices[s]
            poses[e] = np.asarray(fit.scan_from_head[e], np.float64) @ r.flame_from_rig[s]
    return replace(fit, expressions=tuple(e for e in expressions if e in vertices), rejected=rejected,
                   vertices=vertices, scan_from_head=poses, identity_neutral=None)
