"""The face model: template topology, parts, UVs, landmark sets and shape spaces.

A :class:`FaceModel` is plain arrays in metres in the head frame (+y up, face toward +z,
+x toward the subject's left). The embedded default is ICT Face Model Light
(:func:`load_ict_face_model`); any user model with the same fields loads from an ``.npz``
with :func:`load_face_model_npz` (``allow_pickle=False``: nothing is ever unpickled).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.errors import ModelError

DATA_DIR = Path(__file__).parent / "data"


@dataclass(frozen=True, eq=False)
class LandmarkEmbedding:
    """Landmarks as barycentric points on template triangles.

    Attributes:
        name: the landmark set, e.g. ``"mediapipe478"``.
        triangle: (L,) int, template triangle of each landmark.
        barycentric: (L, 3) float, weights of the triangle's corners (sum to 1).
    """

    name: str
    triangle: np.ndarray
    barycentric: np.ndarray

    def points(self, vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
        """Landmark positions on posed vertices.

        Args:
            vertices: (..., n, 3) posed vertices.
            triangles: (m, 3) template triangles.

        Returns:
            (..., L, 3) landmark positions.
        """
        corners = vertices[..., triangles[self.triangle], :]  # (..., L, 3, 3)
        return np.einsum("...lkc,lk->...lc", corners, self.barycentric)


@dataclass(frozen=True, eq=False)
class FaceModel:
    """A morphable head model with a fixed topology.

    Attributes:
        name: model name, e.g. ``"ict-face-model-light"``.
        version: data version; part of every downstream cache key.
        neutral: (n, 3) float32, mean neutral vertices, metres.
        triangles: (m, 3) int32 vertex indices.
        identity_basis: (k, n, 3) float32, identity modes in metres per unit coefficient
            (coefficients ~ N(0, 1)).
        expression_basis: (e, n, 3) float32, generic expression deltas in metres.
        expression_names: (e,) names of the expression deltas.
        vertex_part: (n,) int8 index into ``part_names``.
        part_names: name of each part.
        uv: (u, 2) float32 texture coordinates.
        triangle_uv: (m, 3) int32 indices into ``uv``.
        landmarks68: (68,) int32 vertex ids of the Multi-PIE 68-point set.
        eye_centres: (2, 3) float32 eyeball rotation centres, [left, right].
        fitting_vertices: (f,) int32 vertices used by shape fits (the face region).
        embeddings: named landmark embeddings, e.g. ``"mediapipe478"``.
    """

    name: str
    version: str
    neutral: np.ndarray
    triangles: np.ndarray
    identity_basis: np.ndarray
    expression_basis: np.ndarray
    expression_names: tuple[str, ...]
    vertex_part: np.ndarray
    part_names: tuple[str, ...]
    uv: np.ndarray
    triangle_uv: np.ndarray
    landmarks68: np.ndarray
    eye_centres: np.ndarray
    fitting_vertices: np.ndarray
    embeddings: dict[str, LandmarkEmbedding] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.neutral)
        _check(self.neutral.shape == (n, 3), f"neutral must be (n, 3), got {self.neutral.shape}")
        _check(self.triangles.ndim == 2 and self.triangles.shape[1] == 3, "triangles must be (m, 3)")
        _check(int(self.triangles.max()) < n, "triangles index past the last vertex")
        for label, basis in (("identity", self.identity_basis), ("expression", self.expression_basis)):
            _check(basis.ndim == 3 and basis.shape[1:] == (n, 3), f"{label} basis must be (k, {n}, 3), got {basis.shape}")
        _check(len(self.expression_names) == len(self.expression_basis), "one name per expression delta")
        _check(self.vertex_part.shape == (n,), "vertex_part must be (n,)")
        _check(self.eye_centres.shape == (2, 3), "eye_centres must be (2, 3)")
        _check(self.triangle_uv.shape == self.triangles.shape, "triangle_uv must match triangles")

    @property
    def n_vertices(self) -> int:
        return len(self.neutral)

    def part_vertices(self, *names: str) -> np.ndarray:
        """(p,) int vertex ids of the named parts."""
        ids = [self.part_names.index(n) for n in names]
        return np.flatnonzero(np.isin(self.vertex_part, ids))

    def part_triangle_mask(self, *names: str) -> np.ndarray:
        """(m,) bool, triangles whose first corner lies in one of the named parts."""
        ids = [self.part_names.index(n) for n in names]
        return np.isin(self.vertex_part[self.triangles[:, 0]], ids)

    def identity_shape(self, coefficients: np.ndarray) -> np.ndarray:
        """Neutral face of an identity.

        Args:
            coefficients: (k',) identity coefficients, k' <= k (missing ones are 0).

        Returns:
            (n, 3) float64 vertices in metres.
        """
        c = np.asarray(coefficients, np.float64)
        _check(c.ndim == 1 and len(c) <= len(self.identity_basis), f"need at most {len(self.identity_basis)} identity coefficients, got {c.shape}")
        return self.neutral + np.tensordot(c, self.identity_basis[: len(c)], axes=1)

    def with_embedding(self, embedding: LandmarkEmbedding) -> FaceModel:
        """A copy with one more landmark embedding."""
        return replace(self, embeddings={**self.embeddings, embedding.name: embedding})


def _check(ok: bool, problem: str) -> None:
    if not ok:
        raise ModelError(problem)


@lru_cache(maxsize=1)
def load_ict_face_model() -> FaceModel:
    """The embedded ICT Face Model Light (MIT), reduced as ``rigs/ict_build.py`` says."""
    mesh = np.load(DATA_DIR / "ict_mesh.npz")
    expr = np.load(DATA_DIR / "ict_expressions.npz")
    ident = np.load(DATA_DIR / "ict_identity.npz")
    model = FaceModel(
        name="ict-face-model-light",
        version="ict-1",
        neutral=mesh["neutral"],
        triangles=mesh["triangles"],
        identity_basis=ident["modes_q"].astype(np.float32) * ident["scale"][:, None, None],
        expression_basis=expr["deltas"].astype(np.float32),
        expression_names=tuple(str(n) for n in expr["names"]),
        vertex_part=mesh["vertex_part"],
        part_names=tuple(str(n) for n in mesh["part_names"]),
        uv=mesh["uv"],
        triangle_uv=mesh["triangle_uv"],
        landmarks68=mesh["landmarks68"],
        eye_centres=mesh["eye_centres"],
        fitting_vertices=mesh["fitting_vertices"],
    )
    embedding_path = DATA_DIR / "ict_mediapipe_embedding.npz"
    if embedding_path.exists():
        e = np.load(embedding_path)
        model = model.with_embedding(LandmarkEmbedding("mediapipe478", e["triangle"], e["barycentric"]))
    return model


#: Fields of a user model file, with the shape each must have (n vertices, m triangles).
NPZ_FIELDS = ("neutral", "triangles", "identity_basis", "expression_basis", "expression_names")


def load_face_model_npz(path: str | Path, name: str | None = None) -> FaceModel:
    """Loads a user face model from an ``.npz`` holding the fields of :class:`FaceModel`.

    Required: ``neutral (n,3)`` metres, ``triangles (m,3)``, ``identity_basis (k,n,3)``,
    ``expression_basis (e,n,3)``, ``expression_names (e,)``. Optional: ``vertex_part``,
    ``part_names``, ``uv``/``triangle_uv``, ``landmarks68``, ``eye_centres``,
    ``fitting_vertices``, and ``<set>_triangle``/``<set>_barycentric`` embedding pairs.
    Nothing is unpickled.

    Raises:
        ModelError: naming the file and the missing or malformed field.
    """
    path = Path(path)
    try:
        data = dict(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: cannot read face model: {exc}") from exc
    missing = [f for f in NPZ_FIELDS if f not in data]
    if missing:
        raise ModelError(f"{path}: face model lacks {', '.join(missing)}")
    neutral = data["neutral"].astype(np.float32)
    triangles = data["triangles"].astype(np.int32)
    n = len(neutral)
    try:
        model = FaceModel(
            name=name or str(data.get("name", path.stem)),
            version=str(data.get("version", "user-1")),
            neutral=neutral,
            triangles=triangles,
            identity_basis=data["identity_basis"].astype(np.float32),
            expression_basis=data["expression_basis"].astype(np.float32),
            expression_names=tuple(str(s) for s in data["expression_names"]),
            vertex_part=data.get("vertex_part", np.zeros(n, np.int8)).astype(np.int8),
            part_names=tuple(str(s) for s in data.get("part_names", np.array(["face"]))),
            uv=data.get("uv", np.zeros((1, 2), np.float32)),
            triangle_uv=data.get("triangle_uv", np.zeros_like(triangles)),
            landmarks68=data.get("landmarks68", np.zeros(0, np.int32)).astype(np.int32),
            eye_centres=data.get("eye_centres", np.zeros((2, 3), np.float32)).astype(np.float32),
            fitting_vertices=data.get("fitting_vertices", np.arange(n, dtype=np.int32)),
        )
    except ModelError as exc:
        raise ModelError(f"{path}: {exc}") from exc
    for key in data:
        if key.endswith("_triangle") and key.replace("_triangle", "_barycentric") in data:
            set_name = key[: -len("_triangle")]
            model = model.with_embedding(
                LandmarkEmbedding(set_name, data[key], data[f"{set_name}_barycentric"])
            )
    return model


def save_face_model_npz(model: FaceModel, path: str | Path) -> None:
    """Writes ``model`` in the format :func:`load_face_model_npz` reads."""
    extra = {}
    for emb in model.embeddings.values():
        extra[f"{emb.name}_triangle"] = emb.triangle
        extra[f"{emb.name}_barycentric"] = emb.barycentric
    np.savez_compressed(
        path,
        name=np.array(model.name),
        version=np.array(model.version),
        neutral=model.neutral,
        triangles=model.triangles,
        identity_basis=model.identity_basis,
        expression_basis=model.expression_basis,
        expression_names=np.array(model.expression_names),
        vertex_part=model.vertex_part,
        part_names=np.array(model.part_names),
        uv=model.uv,
        triangle_uv=model.triangle_uv,
        landmarks68=model.landmarks68,
        eye_centres=model.eye_centres,
        fitting_vertices=model.fitting_vertices,
        **extra,
    )
