"""A subject's personal rig from the generic rig and the subject's example meshes.

The rig-level entry point of example-based rigging (:mod:`rigs.example_rig`): it reads
the names, art priors and constraints from the generic rig's definition, checks the
inputs, solves, and returns the personal rig in the :class:`~rigs.rig.BlendshapeRig`
format together with the recovered weights, per-example residuals and convergence history.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import StageError
from rigs.deformation_transfer import model_domain
from rigs.example_rig import ExampleRigConfig, RigProblem, RigSolution, solve_example_rig
from rigs.rig import BlendshapeRig


@dataclass(frozen=True, eq=False)
class ExampleRigResult:
    """A personal rig and how it was fitted.

    Attributes:
        rig: the personal rig (subject neutral, personal deltas, the generic definition).
        transferred: (K, n, 3) float32 deformation-transfer deltas (the initial shapes).
        example_names: (J,) prompt names of the examples, in ``weights`` row order.
        prior: (J, K) float32 art priors.
        weights: (J, K) float32 recovered weights.
        residual_mean_mm: (J,) float64 mean per-vertex distance of each example to its fit.
        residual_max_mm: (J,) float64 largest per-vertex distance.
        history: one dict per iteration (objective terms, seconds per step).
        converged: the tolerance stop fired before the iteration limit.
    """

    rig: BlendshapeRig
    transferred: np.ndarray
    example_names: tuple[str, ...]
    prior: np.ndarray
    weights: np.ndarray
    residual_mean_mm: np.ndarray
    residual_max_mm: np.ndarray
    history: list[dict[str, float]]
    converged: bool

    def summary(self) -> dict[str, Any]:
        """JSON-ready record: per-example residuals and weights by name, and the history."""
        names = self.rig.definition.blendshape_names
        return {
            "rig_name": self.rig.definition.name,
            "rig_version": self.rig.definition.version,
            "iterations": len(self.history),
            "converged": self.converged,
            "residual_mean_mm": float(self.residual_mean_mm.mean()),
            "examples": {
                e: {"residual_mean_mm": float(self.residual_mean_mm[j]), "residual_max_mm": float(self.residual_max_mm[j]),
                    "weights": {names[k]: round(float(w), 4) for k, w in enumerate(self.weights[j]) if w > 0}}
                for j, e in enumerate(self.example_names)
            },
            "history": self.history,
        }


def rig_problem(
    generic: BlendshapeRig,
    subject_neutral: np.ndarray,
    examples: Mapping[str, np.ndarray | None],
    priors: Mapping[str, np.ndarray] | None = None,
) -> RigProblem:
    """The array problem of a subject.

    Args:
        generic: the generic rig.
        subject_neutral: (n, 3) the subject's neutral, metres, head frame.
        examples: prompt name -> (n, 3) example mesh in the neutral's frame; None marks a
            prompt whose mesh is missing.
        priors: optional prompt name -> (K,) prior weights; by default the definition's
            art prior of the prompt.

    Raises:
        StageError: a missing mesh, a name with no prior, or a mesh of the wrong shape.
    """
    d = generic.definition
    missing = sorted(name for name, mesh in examples.items() if mesh is None)
    if missing:
        raise StageError(f"example mesh missing for {', '.join(missing)}")
    names = tuple(examples)
    known = {p.name for p in d.prompts} if priors is None else set(priors)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise StageError(f"examples with no prior (not prompts of rig {d.name}): {', '.join(unknown)}")
    shape = generic.neutral.shape
    wrong = [f"{n} {np.shape(m)}" for n, m in examples.items() if np.shape(m) != shape]
    if wrong or np.shape(subject_neutral) != shape:
        raise StageError(f"meshes must be {shape}: " + ", ".join(wrong or [f"neutral {np.shape(subject_neutral)}"]))
    prior = np.stack([d.art_prior_vector(n) if priors is None else np.asarray(priors[n], np.float64) for n in names]) \
        if names else np.zeros((0, d.size))
    return RigProblem(
        neutral=np.asarray(subject_neutral, np.float64),
        generic_neutral=np.asarray(generic.neutral, np.float64),
        generic_deltas=generic.deltas,
        examples=np.stack([np.asarray(examples[n], np.float32) for n in names]) if names else np.zeros((0, *shape)),
        example_names=names,
        prior=prior.astype(np.float64),
        domain=model_domain(generic.model, generic.deltas),
        fixed_shapes=np.isin(np.array(d.blendshape_names), d.eye_following),
        at_most=_pairs(d, d.at_most),
        antagonistic=_pairs(d, d.antagonistic_pairs),
        shape_names=d.blendshape_names,
    )


def _pairs(definition, pairs) -> np.ndarray:
    return np.array([[definition.index(a), definition.index(b)] for a, b in pairs], np.int64).reshape(-1, 2)


def build_example_rig(
    generic: BlendshapeRig,
    subject_neutral: np.ndarray,
    examples: Mapping[str, np.ndarray | None],
    config: ExampleRigConfig | None = None,
    priors: Mapping[str, np.ndarray] | None = None,
) -> ExampleRigResult:
    """The subject's personal rig by example-based rigging (see :func:`rig_problem`).

    Raises:
        StageError: too few examples, a missing or malformed mesh, degenerate or flipped
            triangles (the mesh named, with the count), or examples that contradict their
            priors (named, with their residuals).
    """
    problem = rig_problem(generic, subject_neutral, examples, priors)
    solution: RigSolution = solve_example_rig(problem, config or ExampleRigConfig())
    rig = BlendshapeRig(generic.definition, problem.neutral.astype(np.float32),
                        solution.deltas.astype(np.float32), generic.model)
    return ExampleRigResult(
        rig=rig,
        transferred=solution.transferred.astype(np.float32),
        example_names=problem.example_names,
        prior=problem.prior.astype(np.float32),
        weights=solution.weights.astype(np.float32),
        residual_mean_mm=solution.residual_mean_mm,
        residual_max_mm=solution.residual_max_mm,
        history=solution.history,
        converged=solution.converged,
    )
