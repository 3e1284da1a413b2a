"""Derives the MediaPipe 478-landmark embedding on a face-model template.

Method (run once; the result ships as ``rigs/data/ict_mediapipe_embedding.npz``):
1. Similarity-align MediaPipe's canonical face mesh (468 vertices, cm; vertex i is
   landmark i) to the template with Umeyama on 42 semantic correspondences between
   MediaPipe indices and the template's Multi-PIE 68 landmarks (brows, eyes, nose, lips).
2. Non-rigid registration: alternate closest-point targets on the template's face surface
   with a sparse least-squares solve that keeps the canonical mesh's Laplacian (shape)
   and pins the 42 correspondences, with a stiffness that decreases over iterations.
3. Project each registered vertex onto the face surface: triangle + barycentric.
4. The 10 iris landmarks (468-477) are placed on the template's eyeballs: the iris centre
   straight ahead of the eyeball centre, the four boundary points at the iris radius
   toward +x, up, -x and down, so they rotate with gaze.

The residual of the 42 correspondences after registration (distance between the
embedded point and the template's own landmark vertex) is reported by
:func:`build_mediapipe_embedding` and in ``docs/face-model.md``.

:func:`calibrate_embedding` re-places the surface landmarks where a detector actually
finds them on images of known meshes (synthetic subjects with their truth): each
detection's camera ray is cast onto the true mesh, the hit is carried to the template by
its (triangle, barycentric), and each landmark takes the median of its hits
(``workflows/calibrate_embedding.py`` runs it on MediaPipe; docs/refine.md has why).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from rigs.face_model import FaceModel, LandmarkEmbedding, load_ict_face_model
from rigs.geometry import ClosestPoints, graph_laplacian, read_obj, similarity_fit
from rigs.rig import gaze_rotation

#: (MediaPipe index, Multi-PIE 68 index) pairs of the same anatomical point.
MP_TO_68 = (
    (70, 17), (63, 18), (105, 19), (66, 20), (107, 21),
    (336, 22), (296, 23), (334, 24), (293, 25), (300, 26),
    (168, 27), (197, 28), (5, 29), (4, 30),
    (33, 36), (160, 37), (158, 38), (133, 39), (153, 40), (144, 41),
    (362, 42), (385, 43), (387, 44), (263, 45), (373, 46), (380, 47),
    (61, 48), (37, 50), (0, 51), (267, 52), (291, 54), (314, 56), (17, 57), (84, 58),
    (78, 60), (82, 61), (13, 62), (312, 63), (308, 64), (317, 65), (14, 66), (87, 67),
)
#: Iris landmarks: (centre, +x, up, -x, down) for the right eye, then the left eye.
IRIS = {"right": (468, 469, 470, 471, 472), "left": (473, 474, 475, 476, 477)}
#: Iris half-angle seen from the eyeball centre (about 6 mm on a 12 mm radius eye).
IRIS_HALF_ANGLE = np.deg2rad(30.0)
FACE_SURFACE_PARTS = ("face", "head_neck")
#: MediaPipe's surface landmarks (468-477 are the irises, which follow gaze).
N_SURFACE = 468


def _iris_points(model: FaceModel, eye: str) -> np.ndarray:
    """(5, 3) target points of one eye's iris landmarks on the rest-pose eyeball."""
    centre = model.eye_centres[0 if eye == "left" else 1].astype(np.float64)
    ids = model.part_vertices(f"eyeball_{eye}")
    radius = np.linalg.norm(model.neutral[ids] - centre, axis=1).max()
    a = IRIS_HALF_ANGLE
    directions = [(0.0, 0.0), (a, 0.0), (0.0, a), (-a, 0.0), (0.0, -a)]  # (yaw, pitch)
    fwd = np.array([0.0, 0.0, 1.0])
    return np.stack([centre + radius * gaze_rotation(y, p) @ fwd for y, p in directions])


def build_mediapipe_embedding(
    canonical_obj: Path, model: FaceModel | None = None, iterations: int = 12
) -> tuple[LandmarkEmbedding, dict]:
    """Registers MediaPipe's canonical mesh to ``model`` and embeds the 478 landmarks.

    Returns:
        The embedding and a facts dict (correspondence residuals in mm).
    """
    model = model or load_ict_face_model()
    mp_verts, mp_tris = read_obj(canonical_obj)
    mp_verts = mp_verts * 0.01  # cm -> m
    mp_idx = np.array([p[0] for p in MP_TO_68])
    target_lm = model.neutral[model.landmarks68[[p[1] for p in MP_TO_68]]].astype(np.float64)

    s, rot, t = similarity_fit(mp_verts[mp_idx], target_lm)
    x0 = (s * (rot @ mp_verts.T)).T + t
    rigid_residual = np.linalg.norm(x0[mp_idx] - target_lm, axis=1)

    face_tris = np.flatnonzero(model.part_triangle_mask(*FACE_SURFACE_PARTS))
    proj = ClosestPoints(model.neutral.astype(np.float64), model.triangles, face_tris)
    n = len(mp_verts)
    lap = graph_laplacian(n, mp_tris)
    anchor = sp.csr_matrix((np.ones(len(mp_idx)), (np.arange(len(mp_idx)), mp_idx)), shape=(len(mp_idx), n))
    delta0 = lap @ x0
    x = x0.copy()
    for it in range(iterations):
        stiffness = 10.0 * 0.6**it
        target = proj.query(x)[0]
        # Least squares: |x - target|^2 + k |L x - L x0|^2 + 10 |x_a - lm_a|^2
        a = sp.vstack([sp.identity(n), np.sqrt(stiffness) * lap, np.sqrt(10.0) * anchor]).tocsr()
        b = np.vstack([target, np.sqrt(stiffness) * delta0, np.sqrt(10.0) * target_lm])
        x = np.column_stack([spla.lsqr(a, b[:, c], x0=x[:, c], atol=1e-10, btol=1e-10)[0] for c in range(3)])
    surface, _, tri, bary = proj.query(x)

    eye_tris = {
        eye: np.flatnonzero(model.part_triangle_mask(f"eyeball_{eye}")) for eye in ("left", "right")
    }
    tri_all = np.zeros(478, np.int64)
    bary_all = np.zeros((478, 3))
    tri_all[:468], bary_all[:468] = tri, bary
    for eye, ids in IRIS.items():
        eye_proj = ClosestPoints(model.neutral.astype(np.float64), model.triangles, eye_tris[eye])
        _, _, t_ids, b_ids = eye_proj.query(_iris_points(model, eye))
        tri_all[list(ids)], bary_all[list(ids)] = t_ids, b_ids

    residual = np.linalg.norm(surface[mp_idx] - target_lm, axis=1)
    facts = {
        "correspondences": len(mp_idx),
        "similarity_scale": s,
        "rigid_residual_mm": {"median": float(np.median(rigid_residual) * 1e3), "max": float(rigid_residual.max() * 1e3)},
        "registered_residual_mm": {
            "median": float(np.median(residual) * 1e3),
            "mean": float(residual.mean() * 1e3),
            "max": float(residual.max() * 1e3),
        },
        "surface_gap_mm": {"mean": float(np.linalg.norm(surface - x, axis=1).mean() * 1e3)},
    }
    return LandmarkEmbedding("mediapipe478", tri_all, bary_all), facts


@dataclass(frozen=True, eq=False)
class DetectionView:
    """A detector's landmarks on one image of a known mesh (a synthetic frame and its truth).

    Attributes:
        vertices: (n, 3) the mesh the image shows, template topology, head frame, metres.
        camera_from_head: (3, 4) or (4, 4) rigid ``x_cam = R x_head + t``.
        K: (3, 3) pinhole intrinsics (pixel centres at integers).
        points: (478, 2) detected pixels; NaN rows = not detected.
    """

    vertices: np.ndarray
    camera_from_head: np.ndarray
    K: np.ndarray
    points: np.ndarray


def detection_hits(model: FaceModel, view: DetectionView, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where the detections' camera rays meet the view's mesh, in template coordinates.

    Args:
        model: the template (its triangles).
        view: one detection on an image of a known mesh.
        ids: (L,) landmark ids to cast.

    Returns:
        triangle (L,) int64 (-1 = no detection or the ray misses the mesh) and
        barycentric (L, 3) float64 of each hit.
    """
    from rigs.raycast import Scene

    pose = np.asarray(view.camera_from_head, np.float64)
    R, t = pose[:3, :3], pose[:3, 3]
    uv = np.asarray(view.points, np.float64)[ids]
    ok = np.isfinite(uv).all(1)
    pix = np.concatenate([np.where(ok[:, None], uv, 0.0), np.ones((len(uv), 1))], 1)
    d = pix @ np.linalg.inv(np.asarray(view.K, np.float64)).T @ R  # rays in the head frame
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    origins = np.broadcast_to(-R.T @ t, d.shape)
    hit = Scene(np.asarray(view.vertices, np.float64), model.triangles).cast(
        np.ascontiguousarray(origins), np.ascontiguousarray(d))
    tri = np.where(ok, hit["triangle"], -1)
    return tri, hit["barycentric"].astype(np.float64)


def calibrate_embedding(views: Iterable[DetectionView], model: FaceModel | None = None,
                        min_hits: int = 3, max_shift_mm: float = 10.0) -> tuple[LandmarkEmbedding, dict]:
    """The embedding moved to where a detector's landmarks fall on the true surfaces.

    Every detection of a surface landmark (0-467) is cast onto its view's true mesh
    (:func:`detection_hits`; hits on the eyeballs, teeth or sockets are dropped: the
    landmark was occluded there); the hit's (triangle, barycentric) places it on the
    template's neutral, the landmark's new point is the median of those places (robust to
    a detector's occasional miss), projected onto the template's face surface. Landmarks
    with fewer than ``min_hits`` hits, and the irises, keep the model's embedding.

    Args:
        views: detections on images of known meshes (template topology).
        model: the template whose embedding is calibrated (ICT by default).
        min_hits: hits a landmark needs to move.
        max_shift_mm: largest move kept, mm.

    Returns:
        The calibrated ``mediapipe478`` embedding and facts: ``views``, ``moved`` (landmarks
        re-placed), ``shift_mm`` (median, mean, max of the move, template neutral),
        ``spread_mm`` (median over landmarks of the hits' median distance to their median:
        the detector's view-to-view scatter, which calibration cannot remove).
    """
    model = model or load_ict_face_model()
    emb = model.embeddings["mediapipe478"]
    base = np.asarray(model.neutral, np.float64)
    ids = np.arange(N_SURFACE)
    places: list[list[np.ndarray]] = [[] for _ in ids]
    on_face = model.part_triangle_mask(*FACE_SURFACE_PARTS)
    n_views = 0
    for view in views:
        n_views += 1
        tri, bary = detection_hits(model, view, ids)
        pts = np.einsum("lij,li->lj", base[model.triangles[np.maximum(tri, 0)]], bary)
        for i in np.flatnonzero((tri >= 0) & on_face[np.maximum(tri, 0)]):
            places[i].append(pts[i])
    tri_all = np.asarray(emb.triangle, np.int64).copy()
    bary_all = np.asarray(emb.barycentric, np.float64).copy()
    moved = np.asarray([i for i in ids if len(places[i]) >= min_hits], np.int64)
    if len(moved):
        stacks = [np.stack(places[i]) for i in moved]
        target = np.stack([np.median(p, 0) for p in stacks])
        spread = np.asarray([np.median(np.linalg.norm(p - m, axis=1)) for p, m in zip(stacks, target, strict=True)])
        face_tris = np.flatnonzero(model.part_triangle_mask(*FACE_SURFACE_PARTS))
        surface, _, tri, bary = ClosestPoints(base, model.triangles, face_tris).query(target)
        shift = np.linalg.norm(surface - emb.points(base, model.triangles)[moved], axis=1) * 1e3
        keep = shift <= max_shift_mm
        moved, tri, bary, shift, spread = moved[keep], tri[keep], bary[keep], shift[keep], spread[keep]
    if len(moved) == 0:
        return LandmarkEmbedding(emb.name, tri_all, bary_all), {"views": n_views, "moved": 0}
    tri_all[moved], bary_all[moved] = tri, bary
    facts = {"views": n_views, "moved": int(len(moved)),
             "shift_mm": {"median": float(np.median(shift)), "mean": float(shift.mean()), "max": float(shift.max())},
             "spread_mm": float(np.median(spread) * 1e3)}
    return LandmarkEmbedding(emb.name, tri_all, bary_all), facts


def save_embedding(embedding: LandmarkEmbedding, path: str | Path) -> None:
    """Writes an embedding in the format ``fit.landmark_embedding`` reads
    (``mediapipe478_triangle (478,)``, ``mediapipe478_barycentric (478, 3)``)."""
    np.savez_compressed(Path(path), mediapipe478_triangle=np.asarray(embedding.triangle, np.int64),
                        mediapipe478_barycentric=np.asarray(embedding.barycentric, np.float64))


if __name__ == "__main__":
    emb, facts = build_mediapipe_embedding(Path(sys.argv[1]))
    out = Path(sys.argv[2])
    np.savez_compressed(out, triangle=emb.triangle.astype(np.int32), barycentric=emb.barycentric.astype(np.float32))
    (out.parent / "ict_mediapipe_embedding_facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    print(json.dumps(facts, indent=2))
