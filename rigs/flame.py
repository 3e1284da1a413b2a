"""FLAME (or another user morphable model) from a user-supplied file, never unpickled blindly.

FLAME ships as a Python pickle (``generic_model.pkl``) that may hold chumpy objects. A
pickle can run arbitrary code, so :func:`convert_flame_pickle` reads it once through a
restricted unpickler that only resolves numpy, scipy.sparse and chumpy array types (each
mapped to a plain array holder) and refuses everything else, then writes an ``.npz``.
:func:`load_flame_arrays` reads that ``.npz`` with ``allow_pickle=False`` and checks every
array's shape; :class:`rigs.flame_lbs.FlameModel` poses it (linear blend skinning).
:func:`load_flame_npz` gives the linear part as a :class:`FaceModel`.

Landmarks: :func:`load_flame_landmarks` reads either FLAME 2023's
``mediapipe_landmark_embedding.npz`` (``lmk_face_idx``, ``lmk_b_coords``,
``landmark_indices``: a subset of the 478 MediaPipe points) or this product's
``mediapipe478_triangle``/``_barycentric`` pair, as a 478-row embedding whose missing
landmarks have NaN barycentrics (their points are NaN: "missing", as in the landmark
stage's arrays).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ModelError
from rigs.face_model import FaceModel, LandmarkEmbedding

#: (module, name) pairs the restricted unpickler resolves.
_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"), ("scipy.sparse.csc", "csc_matrix"),
    ("scipy.sparse._csc", "csc_matrix"), ("scipy.sparse.csr", "csr_matrix"),
    ("scipy.sparse._csr", "csr_matrix"),
    ("_codecs", "encode"),  # how protocol-2 pickles store bytes; it only encodes a str
}
#: FLAME's expression space: shapedirs columns 300.. are expression, ..300 identity.
FLAME_N_SHAPE = 300
#: Number of MediaPipe face-mesh landmarks (with irises).
N_MEDIAPIPE = 478
#: Arrays of a FLAME model file, as :func:`convert_flame_pickle` keeps them.
FLAME_KEYS = ("v_template", "f", "shapedirs", "J_regressor", "weights", "kintree_table", "posedirs")


class _ChumpyArray:
    """Stands in for chumpy.Ch: keeps the wrapped array from the pickled state."""

    def __setstate__(self, state: dict) -> None:
        self.array = np.asarray(state.get("x", state.get("r")))


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # noqa: D102
        if module.startswith("chumpy"):
            return _ChumpyArray
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a model file")


def _plain(value: object) -> np.ndarray:
    if isinstance(value, _ChumpyArray):
        return value.array
    if hasattr(value, "toarray"):
        return value.toarray()
    return np.asarray(value)


def _read_pickle(src: Path) -> object:
    try:
        with open(src, "rb") as fh:
            return _RestrictedUnpickler(fh, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError) as exc:
        raise ModelError(f"{src}: cannot read FLAME model: {exc}") from exc


def convert_flame_pickle(
    src: str | Path,
    dst: str | Path,
    *,
    n_shape: int | None = None,
    masks: str | Path | None = None,
    face_region: str = "face",
) -> Path:
    """One-time conversion of a FLAME ``.pkl`` to a safe ``.npz``.

    Keeps ``v_template (n,3)``, ``f (m,3)``, ``shapedirs (n,3,k)``, and, when present,
    ``J_regressor`` (dense (J, n)), ``weights (n,J)``, ``kintree_table (2,J)``,
    ``posedirs (n,3,P)``.

    Args:
        src: the FLAME pickle (e.g. ``generic_model.pkl``, ``flame2023.pkl``).
        dst: the ``.npz`` to write.
        n_shape: identity columns of ``shapedirs`` (the rest are expression); stored in
            the file so the loader needs no argument. None = FLAME's 300.
        masks: optional ``FLAME_masks.pkl`` (read through the same restricted unpickler);
            its ``face_region`` vertex list is stored as ``fitting_vertices``.
        face_region: the key of ``masks`` used as the fitting region.

    Raises:
        ModelError: naming the file, if it is not a FLAME pickle, holds other objects, or
            the result fails :func:`load_flame_arrays`' shape checks.
    """
    src, dst = Path(src), Path(dst)
    raw = _read_pickle(src)
    if not isinstance(raw, dict) or not {"v_template", "f", "shapedirs"} <= set(raw):
        raise ModelError(f"{src}: not a FLAME model (needs v_template, f, shapedirs)")
    arrays = {k: _plain(raw[k]) for k in FLAME_KEYS if k in raw}
    if n_shape is not None:
        arrays["n_shape"] = np.int64(n_shape)
    if masks is not None:
        region = _read_pickle(Path(masks))
        if not isinstance(region, dict) or face_region not in region:
            raise ModelError(f"{masks}: not a FLAME masks file with a {face_region!r} region")
        arrays["fitting_vertices"] = _plain(region[face_region]).astype(np.int64).ravel()
    np.savez_compressed(dst, **arrays)
    try:
        with np.load(dst, allow_pickle=False) as npz:  # skinning is checked when posed
            _validate(dict(npz), dst, skinning=False)
    except ModelError as exc:
        raise ModelError(f"{src}: {exc}") from exc
    return dst


@dataclass(frozen=True, eq=False)
class FlameArrays:
    """The arrays of a converted FLAME file, shapes checked (metres, FLAME's head frame).

    Attributes:
        v_template: (n, 3) float64 mean template.
        triangles: (m, 3) int64.
        shapedirs: (n, 3, k) float64; columns ``[:n_shape]`` identity, the rest expression.
        n_shape: number of identity columns.
        J_regressor: (J, n) float64 joint regressor, or None (no skinning data).
        weights: (n, J) float64 skinning weights (rows sum to 1), or None.
        parents: (J,) int64 parent of each joint, -1 for the root, or None.
        posedirs: (n, 3, 9 (J - 1)) float64 pose-corrective blendshapes, or None.
        fitting_vertices: (f,) int64 face-region vertices (all vertices if the file has none).
    """

    v_template: np.ndarray
    triangles: np.ndarray
    shapedirs: np.ndarray
    n_shape: int
    J_regressor: np.ndarray | None
    weights: np.ndarray | None
    parents: np.ndarray | None
    posedirs: np.ndarray | None
    fitting_vertices: np.ndarray

    @property
    def has_skinning(self) -> bool:
        return self.J_regressor is not None


def _validate(
    data: dict[str, np.ndarray], path: Path, n_shape: int | None = None, skinning: bool = True
) -> FlameArrays:
    """Shape checks of every array of a converted FLAME file; errors name ``path``.

    ``skinning=False`` checks (and keeps) only the linear part: v_template, f, shapedirs.
    """

    def need(ok: bool, problem: str) -> None:
        if not ok:
            raise ModelError(f"{path}: {problem}")

    missing = [k for k in ("v_template", "f", "shapedirs") if k not in data]
    need(not missing, f"not a converted FLAME model (lacks {', '.join(missing)})")
    v = np.asarray(data["v_template"], np.float64)
    need(v.ndim == 2 and v.shape[1] == 3 and len(v) >= 3, f"v_template must be (n, 3), got {v.shape}")
    n = len(v)
    f = np.asarray(data["f"]).astype(np.int64)
    need(f.ndim == 2 and f.shape[1] == 3, f"f must be (m, 3), got {f.shape}")
    need(f.size == 0 or (f.min() >= 0 and f.max() < n), f"f indexes vertices outside [0, {n})")
    dirs = np.asarray(data["shapedirs"], np.float64)
    need(dirs.ndim == 3 and dirs.shape[:2] == (n, 3), f"shapedirs must be (n, 3, k) with n={n}, got {dirs.shape}")
    if n_shape is None:
        n_shape = int(data["n_shape"]) if "n_shape" in data else FLAME_N_SHAPE
    need(0 <= n_shape <= dirs.shape[2], f"n_shape {n_shape} must be in [0, {dirs.shape[2]}] (shapedirs columns)")
    need(all(np.isfinite(a).all() for a in (v, dirs)), "v_template and shapedirs must be finite")
    fit = np.asarray(data.get("fitting_vertices", np.arange(n))).astype(np.int64).ravel()
    need(len(fit) > 0 and fit.min() >= 0 and fit.max() < n, f"fitting_vertices must index [0, {n})")
    lbs = ("J_regressor", "weights", "kintree_table", "posedirs")
    present = [k for k in lbs if k in data]
    if not present or not skinning:
        return FlameArrays(v, f, dirs, n_shape, None, None, None, None, fit)
    need(len(present) == len(lbs), f"skinning needs all of {', '.join(lbs)}; has only {', '.join(present)}")
    jreg = np.asarray(data["J_regressor"], np.float64)
    need(jreg.ndim == 2 and jreg.shape[1] == n and jreg.shape[0] >= 1, f"J_regressor must be (J, {n}), got {jreg.shape}")
    j = len(jreg)
    weights = np.asarray(data["weights"], np.float64)
    need(weights.shape == (n, j), f"weights must be ({n}, {j}), got {weights.shape}")
    need(np.allclose(weights.sum(1), 1.0, atol=1e-4) and (weights >= -1e-6).all(),
         "weights must be non-negative and sum to 1 per vertex")
    kin = np.asarray(data["kintree_table"]).astype(np.int64)
    need(kin.shape == (2, j), f"kintree_table must be (2, {j}), got {kin.shape}")
    need((kin[1] == np.arange(j)).all(), "kintree_table row 1 must list the joints 0..J-1 in order")
    parents = kin[0].copy()
    parents[0] = -1  # FLAME stores the root's parent as 2**32 - 1
    need(all(0 <= parents[i] < i for i in range(1, j)), "kintree_table: every joint's parent must precede it")
    posedirs = np.asarray(data["posedirs"], np.float64)
    need(posedirs.shape == (n, 3, 9 * (j - 1)), f"posedirs must be ({n}, 3, {9 * (j - 1)}), got {posedirs.shape}")
    need(all(np.isfinite(a).all() for a in (jreg, weights, posedirs)), "skinning arrays must be finite")
    return FlameArrays(v, f, dirs, n_shape, jreg, weights, parents, posedirs, fit)


def load_flame_arrays(path: str | Path, n_shape: int | None = None, *, skinning: bool = True) -> FlameArrays:
    """The checked arrays of a converted FLAME ``.npz`` (see :class:`FlameArrays`).

    Args:
        path: written by :func:`convert_flame_pickle`.
        n_shape: identity columns of ``shapedirs``; None = the file's ``n_shape`` or 300.
        skinning: check and keep the skinning arrays (False: the linear part only).

    Raises:
        ModelError: naming the file and the array at fault.
    """
    path = Path(path)
    return _validate(_read_npz(path, "not a converted FLAME model"), path, n_shape, skinning)


def _read_npz(path: Path, problem: str) -> dict[str, np.ndarray]:
    """Every array of an ``.npz`` (nothing unpickled); ModelError naming the file otherwise."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            return dict(npz)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: {problem}: {exc}") from exc


def load_flame_landmarks(path: str | Path, triangles: np.ndarray) -> LandmarkEmbedding:
    """The ``"mediapipe478"`` embedding of a FLAME model, 478 rows in MediaPipe order.

    Reads FLAME 2023's ``mediapipe_landmark_embedding.npz`` (``lmk_face_idx (L,)``
    triangle ids, ``lmk_b_coords (L, 3)``, ``landmark_indices (L,)`` MediaPipe ids) or
    ``mediapipe478_triangle (478,)`` / ``mediapipe478_barycentric (478, 3)``. MediaPipe
    ids the file lacks get triangle 0 and NaN barycentrics: their points are NaN, and a
    fit must leave them out of its landmark term (:func:`embedded_ids`).

    Raises:
        ModelError: naming the file, for unknown keys, bad shapes, triangle ids outside
            ``triangles`` or MediaPipe ids outside [0, 478).
    """
    path = Path(path)
    data = _read_npz(path, "cannot read landmark embedding")
    if {"lmk_face_idx", "lmk_b_coords", "landmark_indices"} <= set(data):
        tri = np.asarray(data["lmk_face_idx"]).astype(np.int64).ravel()
        bary = np.asarray(data["lmk_b_coords"], np.float64)
        ids = np.asarray(data["landmark_indices"]).astype(np.int64).ravel()
    elif {"mediapipe478_triangle", "mediapipe478_barycentric"} <= set(data):
        tri = np.asarray(data["mediapipe478_triangle"]).astype(np.int64).ravel()
        bary = np.asarray(data["mediapipe478_barycentric"], np.float64)
        ids = np.arange(len(tri))
    else:
        raise ModelError(f"{path}: needs lmk_face_idx/lmk_b_coords/landmark_indices or "
                         f"mediapipe478_triangle/_barycentric; has {', '.join(sorted(data))}")
    if bary.shape != (len(tri), 3) or ids.shape != tri.shape:
        raise ModelError(f"{path}: {len(tri)} triangles need ({len(tri)}, 3) barycentrics and "
                         f"{len(tri)} landmark ids, got {bary.shape} and {ids.shape}")
    if len(tri) and (tri.min() < 0 or tri.max() >= len(triangles)):
        raise ModelError(f"{path}: landmark triangles outside the model's {len(triangles)}")
    if len(ids) and (ids.min() < 0 or ids.max() >= N_MEDIAPIPE or len(np.unique(ids)) != len(ids)):
        raise ModelError(f"{path}: landmark ids must be distinct and in [0, {N_MEDIAPIPE})")
    if not np.isfinite(bary).all():
        raise ModelError(f"{path}: landmark barycentrics must be finite")
    full_tri = np.zeros(N_MEDIAPIPE, np.int64)
    full_bary = np.full((N_MEDIAPIPE, 3), np.nan)
    full_tri[ids], full_bary[ids] = tri, bary
    return LandmarkEmbedding("mediapipe478", full_tri, full_bary)


def embedded_ids(embedding: LandmarkEmbedding) -> np.ndarray:
    """(L,) int ids of the landmarks an embedding places (finite barycentrics)."""
    return np.flatnonzero(np.isfinite(embedding.barycentric).all(axis=1))


def load_flame_npz(path: str | Path, n_shape: int | None = None, landmarks: str | Path | None = None) -> FaceModel:
    """The linear part of a converted FLAME ``.npz`` as a :class:`FaceModel` (metres).

    FLAME's shape columns ``[:n_shape]`` are the identity basis and the rest the
    expression basis (named ``flame_expr_000``...). FLAME has no part labels, UVs or
    eye centres in this file; they default to one "face" part and zeros. The skinning
    (jaw, neck, eyes) is :class:`rigs.flame_lbs.FlameModel`'s.

    Args:
        n_shape: identity columns; None = the file's ``n_shape`` or 300.
        landmarks: optional embedding file (:func:`load_flame_landmarks`).
    """
    a = load_flame_arrays(path, n_shape, skinning=False)
    basis = np.moveaxis(a.shapedirs, 2, 0).astype(np.float32)  # (k, n, 3)
    identity, expression = basis[: a.n_shape], basis[a.n_shape:]
    f = a.triangles.astype(np.int32)
    model = FaceModel(
        name="flame", version=f"flame-{Path(path).stem}", neutral=a.v_template.astype(np.float32),
        triangles=f, identity_basis=identity, expression_basis=expression,
        expression_names=tuple(f"flame_expr_{i:03d}" for i in range(len(expression))),
        vertex_part=np.zeros(len(a.v_template), np.int8), part_names=("face",),
        uv=np.zeros((1, 2), np.float32), triangle_uv=np.zeros_like(f),
        landmarks68=np.zeros(0, np.int32), eye_centres=np.zeros((2, 3), np.float32),
        fitting_vertices=a.fitting_vertices.astype(np.int32),
    )
    if landmarks is not None:
        model = model.with_embedding(load_flame_landmarks(landmarks, f))
    return model


def main(argv: list[str] | None = None) -> int:
    """``python -m rigs.flame SRC.pkl DST.npz [--n-shape K] [--masks FLAME_masks.pkl]``.

    Converts once and prints what the file holds; exit 1 (with the message) on a bad file.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m rigs.flame", description="Convert a FLAME .pkl to a safe .npz.")
    parser.add_argument("src", help="FLAME pickle, e.g. generic_model.pkl or flame2023.pkl")
    parser.add_argument("dst", help="the .npz to write")
    parser.add_argument("--n-shape", type=int, default=None, help=f"identity columns of shapedirs (default {FLAME_N_SHAPE})")
    parser.add_argument("--masks", default=None, help="FLAME_masks.pkl: its face region becomes the fitting vertices")
    parser.add_argument("--face-region", default="face", help="the masks' region to fit (default: face)")
    args = parser.parse_args(argv)
    try:
        dst = convert_flame_pickle(args.src, args.dst, n_shape=args.n_shape, masks=args.masks, face_region=args.face_region)
        a = load_flame_arrays(dst)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    j = 0 if a.parents is None else len(a.parents)
    print(f"{dst}: {len(a.v_template)} vertices, {len(a.triangles)} triangles, {a.n_shape} identity + "
          f"{a.shapedirs.shape[2] - a.n_shape} expression columns, {j} joints, "
          f"{len(a.fitting_vertices)} fitting vertices")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
