"""Builds a small FLAME-structured model file from the ICT face model (``make_flame``).

No FLAME file exists here (it is licensed), so tests build one with FLAME's structure:

- surface: ICT's ``face`` part and two eyeballs, each decimated (quadric, Open3D) to a
  few thousand vertices in all; every vertex is then put back exactly on the ICT
  surface (closest point), so the FLAME template lies on ICT's neutral;
- shapedirs (n, 3, k + e): the first ``n_identity`` ICT identity modes and the named ICT
  expression shapes, interpolated at those closest points (barycentric);
- 5 joints in FLAME's kintree order (global, neck, jaw, left eye, right eye) with a
  sparse ``J_regressor`` (averages of vertex groups: the lowest neck ring, the jaw-hinge
  regions, each eyeball);
- skinning weights: eyeballs fully on their eye joint; the jaw weight follows the size
  of ICT's ``jawOpen`` delta (1 on the chin); the rest splits between root (the neck's
  lower end) and neck joint by height;
- posedirs (n, 3, 36): smooth random correctives of the neck and jaw, each restricted
  to its joint's weighted vertices; none for the eyes, so the eyeballs stay rigid;
- the pickle holds ``v_template``, ``shapedirs`` and ``posedirs`` wrapped in a stand-in
  ``chumpy.ch.Ch`` class (as FLAME's own files do), a ``scipy.sparse`` J_regressor and a
  uint32 ``f``, and is read by the real :func:`rigs.flame.convert_flame_pickle`;
- a FLAME-2023-style ``mediapipe_landmark_embedding.npz`` (``lmk_face_idx``,
  ``lmk_b_coords``, ``landmark_indices``) carrying 105 of ICT's MediaPipe landmarks over
  (:data:`LANDMARK_IDS`; FLAME's file places 105, no irises), and a ``FLAME_masks.pkl``
  with a ``face`` region (the non-eyeball vertices).
"""

from __future__ import annotations

import pickle
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from rigs.face_model import FaceModel, load_ict_face_model
from rigs.geometry import ClosestPoints

#: ICT expression shapes used as the factory's expression space (no jaw: FLAME's jaw is a joint).
EXPRESSIONS = (
    "browInnerUp_L", "browInnerUp_R", "browDown_L", "browDown_R", "eyeBlink_L", "eyeBlink_R",
    "mouthSmile_L", "mouthSmile_R", "mouthPucker", "cheekPuff_L", "cheekPuff_R", "noseSneer_L",
)
#: MediaPipe ids the factory's landmark file places: 105 (as many as FLAME 2023's file),
#: evenly spread over the 468 surface points; the other 373 are missing (NaN).
LANDMARK_IDS = np.linspace(0, 467, 105).round().astype(np.int64)
#: FLAME's root-parent marker in kintree_table (2**32 - 1).
NO_PARENT = 4294967295


@dataclass(frozen=True)
class MadeFlame:
    """What :func:`make_flame` wrote and how it relates to ICT.

    Attributes:
        pickle_path: the FLAME-structured ``.pkl``.
        landmarks_path: FLAME-2023-style ``mediapipe_landmark_embedding.npz``.
        masks_path: ``FLAME_masks.pkl`` with a ``face`` region.
        n_identity: identity columns (= ICT identity modes 0..n_identity-1).
        expressions: ICT expression names of the expression columns, in order.
        eyeballs: ((l,), (r,)) vertex ids of the left and right eyeball.
        source: (n, 3) float64 closest points on ICT's neutral each vertex came from,
            as (triangle (n,), barycentric (n, 3)) of ``ict.triangles``.
        arrays: the raw arrays written (plain numpy).
    """

    pickle_path: Path
    landmarks_path: Path
    masks_path: Path
    n_identity: int
    expressions: tuple[str, ...]
    eyeballs: tuple[np.ndarray, np.ndarray]
    source: tuple[np.ndarray, np.ndarray]
    arrays: dict[str, np.ndarray]


class _Ch:
    """Pickles like a chumpy array: class ``chumpy.ch.Ch`` with the array in state ``x``."""

    def __init__(self, array: np.ndarray) -> None:
        self.x = array


def _dump_with_chumpy(obj: object, path: Path) -> None:
    """Pickles ``obj`` (protocol 2) with :class:`_Ch` named ``chumpy.ch.Ch``."""
    fake = types.ModuleType("chumpy.ch")
    fake.Ch = _Ch
    saved = (_Ch.__module__, _Ch.__qualname__)
    _Ch.__module__, _Ch.__qualname__ = "chumpy.ch", "Ch"
    added = [m for m in ("chumpy", "chumpy.ch") if m not in sys.modules]
    sys.modules.setdefault("chumpy", types.ModuleType("chumpy"))
    sys.modules.setdefault("chumpy.ch", fake)
    try:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    finally:
        _Ch.__module__, _Ch.__qualname__ = saved
        for m in added:
            del sys.modules[m]


def _decimate(vertices: np.ndarray, triangles: np.ndarray, n_triangles: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Quadric decimation to about ``n_triangles``; None keeps the mesh as it is."""
    import open3d as o3d

    if n_triangles is None:
        return vertices, triangles
    mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(vertices), o3d.utility.Vector3iVector(triangles))
    mesh = mesh.simplify_quadric_decimation(n_triangles)
    mesh.remove_unreferenced_vertices()
    return np.asarray(mesh.vertices), np.asarray(mesh.triangles)


def _submesh(model: FaceModel, part: str) -> tuple[np.ndarray, np.ndarray]:
    keep = np.zeros(model.n_vertices, bool)
    keep[model.part_vertices(part)] = True
    tris = model.triangles[keep[model.triangles].all(1)]
    remap = -np.ones(model.n_vertices, np.int64)
    remap[keep] = np.arange(keep.sum())
    return model.neutral[keep].astype(np.float64), remap[tris]


def _interpolate(field: np.ndarray, triangles: np.ndarray, tri: np.ndarray, bary: np.ndarray) -> np.ndarray:
    """(..., n_src, 3) per-vertex field -> (..., p, 3) at (triangle, barycentric) points."""
    return np.einsum("...pkc,pk->...pc", field[..., triangles[tri], :], bary)


def _group_regressor(vertices: np.ndarray, centres: list[np.ndarray], k: int) -> np.ndarray:
    """(n,) weights averaging the k vertices nearest each centre (all groups equally)."""
    row = np.zeros(len(vertices))
    for c in centres:
        near = np.argsort(np.linalg.norm(vertices - c, axis=1))[:k]
        row[near] += 1.0 / (k * len(centres))
    return row


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def make_flame(
    folder: Path,
    *,
    face_triangles: int | None = 4000,
    eye_triangles: int | None = 240,
    n_identity: int = 20,
    expressions: tuple[str, ...] = EXPRESSIONS,
    seed: int = 0,
) -> MadeFlame:
    """Writes a FLAME-structured model built from ICT into ``folder``.

    Args:
        face_triangles, eye_triangles: decimation targets of the face part and each
            eyeball; None keeps ICT's own triangles (the same surface as ICT).
        n_identity: ICT identity modes kept as the identity space.
        expressions: ICT expression shapes kept as the expression space.
        seed: seed of the pose correctives.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ict = load_ict_face_model()
    rng = np.random.default_rng(seed)
    pieces = [_decimate(*_submesh(ict, "face"), face_triangles)]
    pieces += [_decimate(*_submesh(ict, f"eyeball_{side}"), eye_triangles) for side in ("left", "right")]
    offsets = np.cumsum([0] + [len(v) for v, _ in pieces])
    approx = np.concatenate([v for v, _ in pieces])
    f = np.concatenate([t + o for (_, t), o in zip(pieces, offsets, strict=False)]).astype(np.uint32)
    n = len(approx)
    part = np.repeat([0, 1, 2], np.diff(offsets))  # face, eyeball_left, eyeball_right

    # back onto ICT's surface, each piece onto its own part
    tri, bary = np.zeros(n, np.int64), np.zeros((n, 3))
    for p, name in enumerate(("face", "eyeball_left", "eyeball_right")):
        ids = np.flatnonzero(part == p)
        allowed = np.flatnonzero(ict.part_triangle_mask(name))
        _, _, tri[ids], bary[ids] = ClosestPoints(ict.neutral, ict.triangles, allowed).query(approx[ids])
    v_template = _interpolate(ict.neutral.astype(np.float64), ict.triangles, tri, bary)
    expr_ids = [ict.expression_names.index(e) for e in expressions]
    basis = np.concatenate([ict.identity_basis[:n_identity], ict.expression_basis[expr_ids]]).astype(np.float64)
    shapedirs = np.moveaxis(_interpolate(basis, ict.triangles, tri, bary), 0, 2)  # (n, 3, K)

    # joints: root at the neck's lower end, neck higher up, jaw hinges, eyeball centres
    face = np.flatnonzero(part == 0)
    eyes = (np.flatnonzero(part == 1), np.flatnonzero(part == 2))
    low = face[np.argsort(v_template[face, 1])[:30]]
    reg = np.zeros((5, n))
    reg[0, low] = 1.0 / len(low)
    reg[1, face] = _group_regressor(v_template[face], [np.array([s * 0.07, -0.09, -0.01]) for s in (-1, 1)], 12)
    reg[2, face] = _group_regressor(v_template[face], [np.array([s * 0.075, -0.03, 0.0]) for s in (-1, 1)], 12)
    for j, ids in zip((3, 4), eyes, strict=True):
        reg[j, ids] = 1.0 / len(ids)

    # skinning weights
    jaw_delta = np.linalg.norm(_interpolate(ict.expression_basis[ict.expression_names.index("jawOpen")].astype(np.float64),
                                            ict.triangles, tri, bary), axis=1)
    rel = jaw_delta / jaw_delta[face].max()
    w_jaw = _smoothstep((rel - 0.1) / 0.4)  # 0 below 10 % of the chin's motion, 1 above 50 %
    y_low = v_template[low, 1].mean()
    w_neck = _smoothstep((v_template[:, 1] - y_low) / 0.04)  # 0 at the neck's end, 1 4 cm up
    weights = np.zeros((n, 5))
    weights[:, 2] = w_jaw
    weights[:, 1] = (1 - w_jaw) * w_neck
    weights[:, 0] = (1 - w_jaw) * (1 - w_neck)
    for j, ids in zip((3, 4), eyes, strict=True):
        weights[ids] = 0.0
        weights[ids, j] = 1.0

    # pose correctives: smooth fields (low-order polynomials of position) per joint
    posedirs = np.zeros((n, 3, 36))
    centred = (v_template - v_template.mean(0)) / 0.1
    feats = np.concatenate([np.ones((n, 1)), centred, centred**2], 1)  # (n, 7)
    for j in (1, 2):  # neck and jaw; eyeballs stay rigid (no eye correctives)
        coef = rng.normal(scale=0.002, size=(feats.shape[1], 3, 9))  # ~2 mm per unit of (R - I)
        posedirs[:, :, 9 * (j - 1): 9 * j] = np.einsum("nf,fcp->ncp", feats, coef) * weights[:, j, None, None]

    arrays = {
        "v_template": v_template, "f": f, "shapedirs": shapedirs,
        "J_regressor": sp.csc_matrix(reg), "weights": weights,
        "kintree_table": np.array([[NO_PARENT, 0, 1, 1, 1], [0, 1, 2, 3, 4]], np.int64),
        "posedirs": posedirs, "bs_style": "lbs", "bs_type": "lrotmin",
    }
    wrapped = {k: _Ch(v) if k in ("v_template", "shapedirs", "posedirs") else v for k, v in arrays.items()}
    pickle_path = folder / "generic_model.pkl"
    _dump_with_chumpy(wrapped, pickle_path)

    # MediaPipe embedding, FLAME 2023 style: a subset of the ids, no iris points
    emb = ict.embeddings["mediapipe478"]
    points = emb.points(ict.neutral.astype(np.float64), ict.triangles)[LANDMARK_IDS]
    lmk_tri, lmk_bary = ClosestPoints(v_template, f.astype(np.int64), np.flatnonzero(part[f[:, 0]] == 0)).query(points)[2:]
    landmarks_path = folder / "mediapipe_landmark_embedding.npz"
    np.savez(landmarks_path, lmk_face_idx=lmk_tri, lmk_b_coords=lmk_bary, landmark_indices=LANDMARK_IDS)
    masks_path = folder / "FLAME_masks.pkl"
    masks_path.write_bytes(pickle.dumps({"face": face, "eye_region": np.concatenate(eyes)}, protocol=2))
    return MadeFlame(pickle_path, landmarks_path, masks_path, n_identity, tuple(expressions), eyes, (tri, bary),
                     {**arrays, "J_regressor": reg})
