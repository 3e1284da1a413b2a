"""The subject's personal rig by example-based rigging (issue 8; REFA section 6.1.2).

Inputs are the generic rig (the embedded ICT neutral and shapes on the mean identity) and
the ``refine`` stage's meshes: the subject's neutral and one example per refined prompt,
all in the template topology and the head frame. :func:`rigs.personal_rig.build_example_rig`
does the work (deformation transfer, then alternating gradient, vertex and weight steps).

Rejections are data: a prompt the chain upstream rejected is a ``rows`` record with the
upstream reason, and the rig is built from the rest. What cannot give a sound rig raises
:class:`~pipeline.errors.StageError` with the names: too few examples, a malformed mesh,
degenerate or flipped triangles, examples that contradict their priors. The method and
its measured accuracy are in docs/rigging.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.config import config_section
from pipeline.errors import StageError
from rigs.example_rig import ExampleRigConfig
from rigs.personal_rig import ExampleRigResult, build_example_rig
from rigs.rig import BlendshapeRig

#: Version of the personal-rig artifact's layout (arrays and meta keys below).
ARTIFACT_FORMAT = 1

#: Columns of the ``rows`` table, with their Arrow types.
ROW_COLUMNS = (("subject_id", "string"), ("expression", "string"), ("status", "string"),
               ("reason", "string"), ("residual_mean_mm", "float64"), ("residual_max_mm", "float64"),
               ("weight_prior_mad", "float64"))


@dataclass(frozen=True, eq=False)
class RiggedSubject:
    """The ``rig`` stage's artifact.

    Attributes:
        subject_id: the subject.
        result: the personal rig and how it was fitted
            (:class:`rigs.personal_rig.ExampleRigResult`: rig, transferred deltas, examples,
            priors, weights, residuals, history).
        rejected: prompt -> why it is not an example.
        neutral_source: where the neutral came from (the refine stage's ``neutral_source``).
    """

    subject_id: str
    result: ExampleRigResult
    rejected: dict[str, str]
    neutral_source: str

    def rows(self) -> Any:
        """One record per prompt: ``example`` with its residual, or ``rejected`` with why."""
        import pyarrow as pa

        cols: dict[str, list] = {name: [] for name, _ in ROW_COLUMNS}
        nan = float("nan")
        r = self.result
        index = {e: j for j, e in enumerate(r.example_names)}
        for e in (*r.example_names, *self.rejected):
            j = index.get(e)
            values = {
                "subject_id": self.subject_id, "expression": e,
                "status": "example" if j is not None else "rejected", "reason": self.rejected.get(e, ""),
                "residual_mean_mm": float(r.residual_mean_mm[j]) if j is not None else nan,
                "residual_max_mm": float(r.residual_max_mm[j]) if j is not None else nan,
                "weight_prior_mad": float(np.abs(r.weights[j] - r.prior[j]).mean()) if j is not None else nan,
            }
            for name, value in values.items():
                cols[name].append(value)
        return pa.table(cols, schema=pa.schema([(n, getattr(pa, t)()) for n, t in ROW_COLUMNS]))

    def to_output(self) -> Any:
        """A :class:`pipeline.serialize.StageOutput`; ``neutral``/``deltas`` as in ``BlendshapeRig.save``."""
        from pipeline.serialize import StageOutput

        r = self.result
        d = r.rig.definition
        arrays = {
            "neutral": np.asarray(r.rig.neutral, np.float32), "deltas": np.asarray(r.rig.deltas, np.float32),
            "transferred": np.asarray(r.transferred, np.float32), "prior": np.asarray(r.prior, np.float32),
            "weights": np.asarray(r.weights, np.float32),
            "residual_mean_mm": np.asarray(r.residual_mean_mm, np.float64),
            "residual_max_mm": np.asarray(r.residual_max_mm, np.float64),
        }
        meta = {
            "format": ARTIFACT_FORMAT, "subject_id": self.subject_id, "rig_name": d.name, "rig_version": d.version,
            "blendshape_names": list(d.blendshape_names), "model_version": r.rig.model.version,
            "examples": list(r.example_names), "rejected": dict(self.rejected), "history": r.history,
            "converged": r.converged, "neutral_source": self.neutral_source,
        }
        return StageOutput(arrays=arrays, meta=meta, tables={"rows": self.rows()})

    @classmethod
    def from_output(cls, output: Any) -> RiggedSubject:
        """Inverse of :meth:`to_output`, on the embedded face model and rig definition.

        Raises:
            StageError: a part is missing, or the artifact is of another format or rig.
        """
        from rigs.definition import load_default_rig_definition
        from rigs.face_model import load_ict_face_model

        meta, arrays = output.meta, output.arrays
        missing = sorted(({"format", "subject_id", "rig_name", "rig_version", "blendshape_names", "examples",
                           "rejected", "history", "converged", "neutral_source"} - set(meta))
                         | ({"neutral", "deltas", "transferred", "prior", "weights", "residual_mean_mm",
                             "residual_max_mm"} - set(arrays)))
        if missing:
            raise StageError(f"rig output lacks {', '.join(missing)}")
        if meta["format"] != ARTIFACT_FORMAT:
            raise StageError(f"rig output format {meta['format']} is not {ARTIFACT_FORMAT}: rerun the rig stage")
        definition = load_default_rig_definition()
        if tuple(meta["blendshape_names"]) != definition.blendshape_names:
            raise StageError(f"rig output's blendshapes differ from rig {definition.name} {definition.version}")
        rig = BlendshapeRig(definition, np.asarray(arrays["neutral"]), np.asarray(arrays["deltas"]),
                            load_ict_face_model())
        result = ExampleRigResult(rig, np.asarray(arrays["transferred"]), tuple(str(e) for e in meta["examples"]),
                                  np.asarray(arrays["prior"]), np.asarray(arrays["weights"]),
                                  np.asarray(arrays["residual_mean_mm"]), np.asarray(arrays["residual_max_mm"]),
                                  list(meta["history"]), bool(meta["converged"]))
        return cls(str(meta["subject_id"]), result, {str(k): str(v) for k, v in meta["rejected"].items()},
                   str(meta["neutral_source"]))


def rig_from_run(outputs: Any, subject: str) -> BlendshapeRig | None:
    """The personal rig that a run's rig stage made for ``subject``, or None when no run
    in the output root finished it.

    Args:
        outputs: a :class:`pipeline.outputs.RunOutputs`, or an output root path.
    """
    from pipeline.outputs import RunOutputs

    if not isinstance(outputs, RunOutputs):
        outputs = RunOutputs(str(outputs))
    if not outputs.has("rig", subject):
        return None
    return RiggedSubject.from_output(outputs.load("rig", subject)).result.rig


def rig_subject(refined: Any, cfg: ExampleRigConfig, generic: BlendshapeRig | None = None,
                order: tuple[str, ...] | None = None) -> RiggedSubject:
    """The personal rig of one subject from its refined meshes.

    Args:
        refined: the refine stage's :class:`stages.refine.RefinedSubject`.
        cfg: the ``rig`` section.
        generic: the generic rig (the embedded ICT rig on the mean identity by default).
        order: prompts in capture order (the refined ones then the rejected by default).

    Raises:
        StageError: the rig cannot be sound (see the module docstring).
    """
    if generic is None:
        from rigs.definition import load_default_rig_definition
        from rigs.face_model import load_ict_face_model

        generic = BlendshapeRig.generic(load_ict_face_model(), load_default_rig_definition())
    prompts = {p.name for p in generic.definition.prompts}
    order = order or (*refined.expressions, *refined.rejected)
    rejected: dict[str, str] = {}
    examples: dict[str, np.ndarray] = {}
    for e in order:
        if e not in prompts:
            rejected[e] = f"not a prompt of rig {generic.definition.name}"
        elif e in refined.refined:
            examples[e] = refined.refined[e].vertices
        else:
            rejected[e] = f"not refined: {refined.rejected.get(e, 'absent from the refine stage')}"
    if len(examples) < cfg.min_examples:
        why = "; ".join(f"{e}: {r}" for e, r in rejected.items())
        raise StageError(f"subject {refined.subject_id}: {len(examples)} example meshes, rigging needs at least "
                         f"{cfg.min_examples}" + (f" (rejected: {why})" if why else ""))
    try:
        result = build_example_rig(generic, refined.neutral, examples, cfg)
    except StageError as err:
        raise StageError(f"subject {refined.subject_id}: {err}") from err
    return RiggedSubject(refined.subject_id, result, rejected, refined.neutral_source)


def rig_capture(capture: Any, refine: Any, config: Any = None) -> Any:
    """Stage ``rig``: the subject's personal 53-blendshape rig from its refined meshes.

    Args:
        capture: the capture folder (the engine's ``"capture"`` input) or an opened Capture;
            it gives the prompts' capture order.
        refine: the ``refine`` stage's loaded artifact.
        config: the engine's config view declaring ``rig``, or an :class:`ExampleRigConfig`.

    Returns:
        ``RiggedSubject.to_output()``.
    """
    from stages.refine import RefinedSubject
    from storage.capture import Capture

    cap = Capture.of(capture)
    refined = RefinedSubject.from_output(refine)
    cfg = config_section(config, "rig", ExampleRigConfig)
    known = set(refined.order)
    order = tuple(e for e in cap.phone_expressions if e in known)
    order += tuple(e for e in refined.order if e not in order)
    return rig_subject(refined, cfg, order=order).to_output()
