"""FLAME (or another user morphable model) from a user-supplied file, never unpickled blindly.

FLAME ships as a Python pickle (``generic_model.pkl``) that may hold chumpy objects. A
pickle can run arbitrary code, so :func:`convert_flame_pickle` reads it once through a
restricted unpickler that only resolves numpy, scipy.sparse and chumpy array types (each
mapped to a plain array holder) and refuses everything else, then writes an ``.npz``.
:func:`load_flame_npz` reads that ``.npz`` with ``allow_pickle=False``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from pipeline.errors import ModelError
from rigs.face_model import FaceModel

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


def convert_flame_pickle(src: str | Path, dst: str | Path) -> Path:
    """One-time conversion of a FLAME ``.pkl`` to a safe ``.npz``.

    Keeps ``v_template (n,3)``, ``f (m,3)``, ``shapedirs (n,3,k)``, and, when present,
    ``J_regressor``, ``weights``, ``kintree_table``, ``posedirs``.

    Raises:
        ModelError: naming the file, if it is not a FLAME pickle or holds other objects.
    """
    src = Path(src)
    try:
        with open(src, "rb") as fh:
            raw = _RestrictedUnpickler(fh, encoding="latin1").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as exc:
        raise ModelError(f"{src}: cannot read FLAME model: {exc}") from exc
    if not isinstance(raw, dict) or not {"v_template", "f", "shapedirs"} <= set(raw):
        raise ModelError(f"{src}: not a FLAME model (needs v_template, f, shapedirs)")
    keep = ("v_template", "f", "shapedirs", "J_regressor", "weights", "kintree_table", "posedirs")
    arrays = {k: _plain(raw[k]) for k in keep if k in raw}
    np.savez_compressed(dst, **arrays)
    return Path(dst)


def load_flame_npz(path: str | Path, n_shape: int = FLAME_N_SHAPE, landmarks: str | Path | None = None) -> FaceModel:
    """A :class:`FaceModel` from a converted FLAME ``.npz`` (metres, as FLAME).

    FLAME's shape columns ``[:n_shape]`` are the identity basis and the rest the
    expression basis (named ``flame_expr_000``...). FLAME has no part labels, UVs or
    eye centres in this file; they default to one "face" part and zeros.

    Args:
        landmarks: optional ``.npz`` with ``mediapipe478_triangle``/``_barycentric``.
    """
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        v = data["v_template"].astype(np.float32)
        f = data["f"].astype(np.int32)
        dirs = data["shapedirs"].astype(np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise ModelError(f"{path}: not a converted FLAME model: {exc}") from exc
    if dirs.ndim != 3 or dirs.shape[:2] != v.shape:
        raise ModelError(f"{path}: shapedirs must be (n, 3, k) with n={len(v)}, got {dirs.shape}")
    basis = np.moveaxis(dirs, 2, 0)  # (k, n, 3)
    identity, expression = basis[:n_shape], basis[n_shape:]
    model = FaceModel(
        name="flame", version=f"flame-{path.stem}", neutral=v, triangles=f,
        identity_basis=identity, expression_basis=expression,
        expression_names=tuple(f"flame_expr_{i:03d}" for i in range(len(expression))),
        vertex_part=np.zeros(len(v), np.int8), part_names=("face",),
        uv=np.zeros((1, 2), np.float32), triangle_uv=np.zeros_like(f),
        landmarks68=np.zeros(0, np.int32), eye_centres=np.zeros((2, 3), np.float32),
        fitting_vertices=np.arange(len(v), dtype=np.int32),
    )
    if landmarks is not None:
        from rigs.face_model import LandmarkEmbedding

        lm = np.load(landmarks, allow_pickle=False)
        model = model.with_embedding(LandmarkEmbedding("mediapipe478", lm["mediapipe478_triangle"], lm["mediapipe478_barycentric"]))
    return model
