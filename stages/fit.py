"""Stage ``fit``: the joint morphable-model fit of a subject's fused scans (issue 7 step 3).

Every fused expression of the subject is fitted at once (:func:`stages.fit_solve.fit_scans`):
one identity, per-scan expression weights (the rig definition's 53 generic shapes in
[0, 1], the prompt's art prior as a soft prior) and a rigid head pose per scan, against the
fused mesh (robust point-to-plane) and the landmark stage's 2D points in every used frame.
An expression fusion rejected is a record (reason copied), not a fit; too few usable
expressions, or no usable neutral, stops the subject with the missing prompts named.

Output :class:`FittedSubject` (keys: docs/fit.md): the identity, the identity-only neutral,
and per fitted expression its weights, ``scan_from_head`` (the fusion reference camera
from the head frame) and mesh (head frame, template topology), plus a ``rows`` table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from pipeline.config import config_section
from pipeline.errors import StageError
from stages.fit_config import FitConfig
from stages.flame_mode import load_fit_model, topology_arrays

__all__ = ["FitConfig", "FitRecord", "FittedSubject", "fit_capture", "fit_subject",
           "observation_from_fusion"]

#: Columns of the ``rows`` table.
ROW_FIELDS = ("subject_id", "expression", "status", "reason", "scan_median_mm", "scan_p90_mm", "landmark_px")


@dataclass(frozen=True)
class FitRecord:
    """One expression's outcome.

    Attributes:
        expression: the prompt.
        status: "fitted" or "rejected".
        reason: why it was rejected ("" when fitted).
        scan_median_mm, scan_p90_mm: scan-to-model distance of the fused scan's vertices, mm
            (NaN when not fitted).
        landmark_px: RMS landmark reprojection error over the used frames, px (NaN if none).
    """

    expression: str
    status: str
    reason: str = ""
    scan_median_mm: float = float("nan")
    scan_p90_mm: float = float("nan")
    landmark_px: float = float("nan")


@dataclass(frozen=True, eq=False)
class FittedSubject:
    """A subject's fitted identity and expressions (the ``fit`` artifact).

    Attributes:
        subject_id: the subject.
        model: the face model's name and version.
        neutral_expression: the prompt used as neutral.
        identity: (k,) float32 identity coefficients.
        neutral: (n, 3) float32 identity-only mesh (zero expression), head frame, metres.
        weights: expression -> (e,) float32 coefficients (rig definition order).
        scan_from_head: expression -> (4, 4) float64, ``x_refcam = R x_head + t``.
        vertices: expression -> (n, 3) float32 fitted mesh, head frame.
        records: one per expression of the capture, in capture order.
        articulation: expression -> (j,) float32 joint axis-angles (FLAME: neck, jaw, eyes,
            12); empty for a model without joints (ICT).
        topology: the model's topology when it is not the rig's (FLAME): ``model.triangles``
            and the landmark embedding (:mod:`stages.flame_mode`); empty for ICT.
    """

    subject_id: str
    model: str
    neutral_expression: str
    identity: np.ndarray
    neutral: np.ndarray
    weights: dict[str, np.ndarray]
    scan_from_head: dict[str, np.ndarray]
    vertices: dict[str, np.ndarray]
    records: tuple[FitRecord, ...]
    articulation: dict[str, np.ndarray] = field(default_factory=dict)
    topology: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def expressions(self) -> list[str]:
        """Fitted expressions, capture order."""
        return [r.expression for r in self.records if r.status == "fitted"]

    @property
    def rejected(self) -> dict[str, str]:
        """Expression -> reason, for those not fitted."""
        return {r.expression: r.reason for r in self.records if r.status != "fitted"}

    def rows(self) -> Any:
        """The per-expression records as a ``pyarrow.Table`` (columns :data:`ROW_FIELDS`)."""
        import pyarrow as pa

        schema = pa.schema([("subject_id", pa.string()), ("expression", pa.string()), ("status", pa.string()),
                            ("reason", pa.string()), ("scan_median_mm", pa.float64()),
                            ("scan_p90_mm", pa.float64()), ("landmark_px", pa.float64())])
        cols = {f: [self.subject_id if f == "subject_id" else getattr(r, f) for r in self.records] for f in ROW_FIELDS}
        return pa.table(cols, schema=schema)

    def to_output(self) -> Any:
        """A :class:`pipeline.serialize.StageOutput` with the contract's keys (docs/fit.md)."""
        from pipeline.serialize import StageOutput

        arrays: dict[str, np.ndarray] = {
            "identity": np.asarray(self.identity, np.float32), "neutral": np.asarray(self.neutral, np.float32)}
        for e in self.expressions:
            arrays[f"{e}.weights"] = np.asarray(self.weights[e], np.float32)
            arrays[f"{e}.scan_from_head"] = np.asarray(self.scan_from_head[e], np.float64)
            arrays[f"{e}.vertices"] = np.asarray(self.vertices[e], np.float32)
            if e in self.articulation:
                arrays[f"{e}.articulation"] = np.asarray(self.articulation[e], np.float32)
        arrays.update(self.topology)
        meta = {"subject_id": self.subject_id, "model": self.model, "expressions": self.expressions,
                "rejected": self.rejected, "neutral_expression": self.neutral_expression}
        return StageOutput(arrays=arrays, meta=meta, tables={"rows": self.rows()})

    @classmethod
    def from_output(cls, output: Any) -> FittedSubject:
        """Inverse of :meth:`to_output`.

        Raises:
            StageError: a part is missing.
        """
        meta, arrays = output.meta, output.arrays
        need_meta = {"subject_id", "model", "expressions", "rejected", "neutral_expression"}
        missing = sorted(need_meta - set(meta)) + sorted({"identity", "neutral"} - set(arrays))
        missing += [] if "rows" in output.tables else ["rows"]
        fitted = list(meta.get("expressions", []))
        missing += [f"{e}.{k}" for e in fitted for k in ("weights", "scan_from_head", "vertices")
                    if f"{e}.{k}" not in arrays]
        if missing:
            raise StageError(f"fit output lacks {', '.join(missing)}")
        records = tuple(FitRecord(str(r["expression"]), str(r["status"]), str(r["reason"]),
                                  *(float("nan") if r[k] is None else float(r[k])
                                    for k in ("scan_median_mm", "scan_p90_mm", "landmark_px")))
                        for r in output.tables["rows"].to_pylist())
        return cls(
            subject_id=str(meta["subject_id"]), model=str(meta["model"]),
            neutral_expression=str(meta["neutral_expression"]),
            identity=np.asarray(arrays["identity"]), neutral=np.asarray(arrays["neutral"]),
            weights={e: np.asarray(arrays[f"{e}.weights"]) for e in fitted},
            scan_from_head={e: np.asarray(arrays[f"{e}.scan_from_head"]) for e in fitted},
            vertices={e: np.asarray(arrays[f"{e}.vertices"]) for e in fitted},
            records=records,
            articulation={e: np.asarray(arrays[f"{e}.articulation"]) for e in fitted if f"{e}.articulation" in arrays},
            topology={k: np.asarray(v) for k, v in arrays.items() if k.startswith("model.")},
        )


# ------------------------------------------------------------------------ inputs


def boundary_vertices(n: int, triangles: np.ndarray) -> np.ndarray:
    """(n,) bool: vertices on an edge used by exactly one triangle (the mesh's border)."""
    t = np.asarray(triangles, np.int64)
    edges = np.sort(np.concatenate([t[:, [0, 1]], t[:, [1, 2]], t[:, [2, 0]]]), axis=1)
    # one int64 key per edge: a 1-D unique is ~15x faster than np.unique(axis=0)
    uniq, count = np.unique(edges[:, 0] * max(n, 1) + edges[:, 1], return_counts=True)
    once = uniq[count == 1]
    out = np.zeros(n, bool)
    out[once // max(n, 1)] = True
    out[once % max(n, 1)] = True
    return out


def observation_from_fusion(fused: Any, points_2d: np.ndarray, K: np.ndarray, prior: np.ndarray) -> Any:
    """The fit's view of one fused expression.

    Args:
        fused: a :class:`stages.fusion.FusedExpression` that is ``ok``.
        points_2d: (N, 478, 2) the landmark stage's points of the burst, NaN = missing.
        K: (3, 3) intrinsics of the burst.
        prior: (e,) the prompt's expression prior.

    Raises:
        StageError: the landmarks disagree with the burst's frames.
    """
    from rigs.raycast import vertex_normals
    from stages.fit_solve import ScanObservation

    ids = list(np.asarray(fused.frame_ids).tolist())
    if len(points_2d) != len(ids):
        raise StageError(f"{fused.expression}: {len(points_2d)} landmark sets for {len(ids)} frames")
    used = [ids.index(f) for f in np.asarray(fused.frames_used).tolist()]
    verts = np.asarray(fused.vertices, np.float64)
    tris = np.asarray(fused.triangles, np.int64)
    return ScanObservation(
        expression=fused.expression, points=verts, normals=vertex_normals(verts, tris).astype(np.float64),
        boundary=boundary_vertices(len(verts), tris), K=np.asarray(K, np.float64),
        landmarks_2d=np.asarray(points_2d, np.float64)[used], ref_from_frame=np.asarray(fused.poses)[used],
        reference=used.index(ids.index(fused.reference)), prior=np.asarray(prior, np.float64))


@lru_cache(maxsize=1)
def default_model() -> Any:
    """The embedded ICT model with the default rig definition's 53 shapes."""
    from rigs.definition import load_default_rig_definition
    from rigs.deformable import LinearFaceModel
    from rigs.face_model import load_ict_face_model

    return LinearFaceModel(load_ict_face_model(), load_default_rig_definition())


def calibrated_model(path: str) -> Any:
    """The embedded ICT model (default rig definition) with the landmark embedding of
    ``path`` (``fit.landmark_embedding``).

    Raises:
        ConfigError: the file does not exist.
        ModelError: it is not a 478-landmark embedding on the ICT triangles (named).
    """
    from pathlib import Path

    from pipeline.errors import ConfigError, ModelError
    from rigs.definition import load_default_rig_definition
    from rigs.deformable import LinearFaceModel
    from rigs.face_model import load_ict_face_model
    from rigs.flame import load_flame_landmarks

    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"config option fit.landmark_embedding: {path}: no such file")
    face = load_ict_face_model()
    try:
        embedding = load_flame_landmarks(file, face.triangles)
    except ModelError as exc:
        raise ModelError(f"fit.landmark_embedding: {exc}") from exc
    return LinearFaceModel(face.with_embedding(embedding), load_default_rig_definition())


def _usable_or_fail(expressions: list[str], rejected: dict[str, str], prompts: tuple[str, ...],
                    cfg: FitConfig, stage: str) -> None:
    """Raises StageError when the neutral is unusable or too few expressions remain."""
    usable = [e for e in expressions if e not in rejected]
    absent = [p for p in prompts if p not in expressions]
    why = "; ".join([f"missing prompts: {', '.join(absent)}"] * bool(absent)
                    + ["rejected: " + ", ".join(f"{e} ({r})" for e, r in rejected.items())] * bool(rejected))
    if cfg.neutral_expression not in usable:
        state = f"rejected ({rejected[cfg.neutral_expression]})" if cfg.neutral_expression in rejected else "missing"
        raise StageError(f"{stage}: the neutral prompt {cfg.neutral_expression!r} is {state}; {why}")
    if len(usable) < cfg.min_expressions:
        raise StageError(f"{stage}: {len(usable)} usable expressions < fit.min_expressions="
                         f"{cfg.min_expressions}; {why}")


def fit_subject(subject_id: str, expressions: list[str], fused: dict[str, Any], landmarks: Any,
                intrinsics: dict[str, np.ndarray], cfg: FitConfig, model: Any = None,
                definition: Any = None) -> FittedSubject:
    """Fits every usable expression of a subject.

    Args:
        subject_id: the subject.
        expressions: the capture's expressions, capture order.
        fused: expression -> :class:`stages.fusion.FusedExpression`.
        landmarks: the landmark stage's output (``points_<expression>`` (N, 478, 2)).
        intrinsics: expression -> (3, 3) K.
        cfg: the fit section.
        model: a :class:`rigs.deformable.DeformableModel` (the ICT model by default).
        definition: the rig definition (prompts, art priors); the default one by default.

    Raises:
        StageError: upstream artifacts disagree, the neutral is unusable, or fewer than
            ``cfg.min_expressions`` expressions are usable.
    """
    from rigs.definition import load_default_rig_definition

    model = model or default_model()
    definition = definition or load_default_rig_definition()
    prompts = tuple(p.name for p in definition.prompts)
    rejected: dict[str, str] = {}
    for e in expressions:
        if e not in fused:
            raise StageError(f"fusion artifact lacks expression {e!r}")
        if not fused[e].ok:
            rejected[e] = f"fusion: {fused[e].reason}"
    _usable_or_fail(expressions, rejected, prompts, cfg, "fit")
    obs = {}
    for e in (e for e in expressions if e not in rejected):
        points = landmarks.arrays.get(f"points_{e}")
        if points is None:
            raise StageError(f"landmark artifact lacks points_{e}")
        prior = definition.art_prior_vector(e) if e in prompts else np.zeros(model.n_expression)
        if len(prior) != model.n_expression:
            prior = np.zeros(model.n_expression)  # a model with other expression spaces (FLAME)
        obs[e] = observation_from_fusion(fused[e], points, intrinsics[e], prior)
    from stages.fit_solve import fit_scans

    stats: dict[str, tuple[float, float, float]] = {}
    for _ in range(2):  # a scan the fit rejects is refitted without, once: it biased the identity
        usable = [e for e in obs if e not in rejected]
        result = fit_scans(model, [obs[e] for e in usable], cfg)
        stats.update({e: (result.scan_median_mm[i], result.scan_p90_mm[i], result.landmark_px[i])
                      for i, e in enumerate(usable)})
        bad = {e: (f"fit: median scan-to-model distance {stats[e][0]:.2f} mm > "
                   f"fit.max_scan_median_mm={cfg.max_scan_median_mm}")
               for e in usable if not stats[e][0] <= cfg.max_scan_median_mm}
        rejected.update(bad)
        _usable_or_fail(expressions, rejected, prompts, cfg, "fit residuals")
        if not bad:
            break
    records = tuple(
        FitRecord(e, "rejected" if e in rejected else "fitted", rejected.get(e, ""),
                  *(float(v) for v in stats.get(e, (np.nan,) * 3)))
        for e in expressions)
    index = {e: i for i, e in enumerate(usable) if e not in rejected}
    return FittedSubject(
        subject_id=subject_id, model=model.name, neutral_expression=cfg.neutral_expression,
        identity=result.identity.astype(np.float32), neutral=result.neutral,
        weights={e: result.weights[i].astype(np.float32) for e, i in index.items()},
        scan_from_head={e: result.scan_from_head[i] for e, i in index.items()},
        vertices={e: result.vertices[i] for e, i in index.items()},
        records=records,
        articulation={e: result.articulation[i].astype(np.float32) for e, i in index.items()}
        if model.n_articulation else {},
        topology=topology_arrays(model))


def fit_capture(capture: Any, landmarks: Any, fusion: Any, config: Any = None) -> Any:
    """Stage ``fit``: one identity and every expression of the subject, fitted jointly.

    Args:
        capture: the capture folder (the engine's ``"capture"`` input) or an opened Capture.
        landmarks: the ``landmarks`` stage's loaded artifact.
        fusion: the ``fusion`` stage's loaded artifact.
        config: the engine's config view declaring ``fit``, or a :class:`FitConfig`.

    Returns:
        ``FittedSubject.to_output()``.
    """

    from stages.fusion import FusedScans
    from storage.capture import Capture

    cap = Capture.of(capture)
    scans = FusedScans.from_output(fusion)
    cfg = config_section(config, "fit", FitConfig)
    expressions = list(cap.phone_expressions)
    K = {e: cap.phone_intrinsics(e).K for e in expressions}
    model = load_fit_model(cfg.flame_model, cfg.flame_landmarks)  # None = the embedded ICT model
    if model is None and cfg.landmark_embedding:
        model = calibrated_model(cfg.landmark_embedding)
    return fit_subject(cap.subject_id, expressions, scans.expressions, landmarks, K, cfg, model).to_output()
