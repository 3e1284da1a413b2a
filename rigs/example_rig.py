"""Example-based facial rigging (Li, Weise & Pauly, SIGGRAPH 2010): a personal rig from examples.

Unknowns: per-triangle relative gradients ``M^k`` (K, m, 3, 3) of the personal shapes
(:mod:`rigs.gradients`) and per-example weights ``alpha_j`` in [0, 1]^K. Starting from
the art priors, the solver alternates:

1. **gradient step**, per triangle: minimise
   ``sum_j |M_j - sum_k alpha_jk M^k|^2 + beta sum_k w_k |M^k - M*^k|^2`` where ``M_j`` is
   example j's gradient against the subject neutral, ``M*^k`` the generic shape's
   transferred gradient and ``w_k = ((1 + |M*^k|) / (kappa + |M*^k|))^theta``: shapes stay
   near deformation transfer where the generic shape barely moves (w up to 100) and follow
   the examples where it moves. The normal matrix ``A^T A + beta diag(w_t)`` (A = the
   (J, K) weights) is KxK with 9 right-hand sides per triangle; all triangles are solved
   as one stacked batch (in chunks that bound memory);
2. **vertex step**: every shape's deltas from one factorised Poisson system (anchors keep
   the transferred deltas);
3. **weight step** (:mod:`rigs.rig_weights`): per example, the mean squared per-vertex
   distance (mm^2) over the fitting vertices plus ``gamma |alpha_j - prior_j|^2``, bounded
   to [0, 1] with the rig definition's at-most and antagonistic constraints.

It stops (keeping the best iterate) when the weight step's objective rises or changes by
less than ``tolerance`` (relative), or
after ``max_iterations``. Rigid parts (eyeballs, teeth, gums) keep the generic deltas, as
in deformation transfer; the eye-following shapes keep their transferred deltas (their
weights are still fitted). The array-level solver is :func:`solve_example_rig`; the rig
level is :func:`rigs.personal_rig.build_example_rig`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import check_fields
from pipeline.errors import ConfigError, StageError
from rigs.deformation_transfer import GradientDomain, check_mesh, transfer_gradients
from rigs.gradients import PoissonSystem, deformation_gradients, inverse_frames, run_chunks
from rigs.rig_weights import objective, solve_weights

#: Triangles per stacked batch of the gradient step (bounds its (c, K, K) temporaries).
TRIANGLE_CHUNK = 2048
MM = 1000.0


@dataclass(frozen=True)
class ExampleRigConfig:
    """Example-based rigging of the subject's personal rig (the ``rig`` section; issue 8)."""

    beta_start: float = 0.05
    """Regularisation weight toward the transferred gradients at the first iteration ..."""
    beta_end: float = 0.01
    """... falling linearly to this over ``anneal_iterations`` (the paper: 0.5 -> 0.1)."""
    anneal_iterations: int = 3
    """Iterations over which beta anneals; the tolerance stop waits for them."""
    kappa: float = 0.1
    """kappa of the magnitude-dependent weights (paper: 0.1)."""
    theta: float = 2.0
    """theta of the magnitude-dependent weights (paper: 2)."""
    gamma: float = 0.05
    """Prior weight of the weight step, mm^2 per unit weight^2."""
    tolerance: float = 5e-3
    """Stop when the weight step's objective changes by less than this (relative), or rises."""
    max_iterations: int = 20
    """Most alternations (the C++ peer always runs 10)."""
    min_examples: int = 5
    """Fewest examples (each must activate its shapes for them to move off the prior)."""
    outlier_factor: float = 4.0
    """An example whose mean (or max) per-vertex residual exceeds this multiple of the
    examples' median mean (or max) residual ..."""
    outlier_floor_mm: float = 0.5
    """... and this many millimetres (mean) ..."""
    outlier_max_floor_mm: float = 2.0
    """... or this many (max: a local error is diluted in the mean) contradicts its prior."""
    max_prior_deviation: float = 0.6
    """An example whose recovered weight of a shape its prior activates differs from the
    prior by more than this contradicts its prior too (the synthetic performances stay
    within 0.4 of it)."""
    enforce_antagonistic: bool = True
    """Pin the smaller weight of an active antagonistic pair to 0."""

    def __post_init__(self) -> None:
        check_fields(self)
        checks = {
            "beta_start": self.beta_start > 0, "beta_end": self.beta_end > 0,
            "anneal_iterations": self.anneal_iterations >= 1, "kappa": self.kappa > 0,
            "theta": self.theta >= 0, "gamma": self.gamma > 0, "tolerance": self.tolerance >= 0,
            "max_iterations": self.max_iterations >= 1, "min_examples": self.min_examples >= 1,
            "outlier_factor": self.outlier_factor > 1, "outlier_floor_mm": self.outlier_floor_mm >= 0,
            "outlier_max_floor_mm": self.outlier_max_floor_mm >= 0,
            "max_prior_deviation": 0 < self.max_prior_deviation <= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(f"rig: out of range: {', '.join(f'{k}={getattr(self, k)}' for k in bad)}")

    def beta(self, iteration: int) -> float:
        """Beta at a 0-based iteration."""
        f = min(iteration / max(self.anneal_iterations - 1, 1), 1.0)
        return self.beta_start + f * (self.beta_end - self.beta_start)


@dataclass(frozen=True, eq=False)
class RigProblem:
    """Example-based rigging on arrays, in one topology.

    Attributes:
        neutral: (n, 3) subject neutral, metres.
        generic_neutral: (n, 3) generic rig neutral.
        generic_deltas: (K, n, 3) generic shapes.
        examples: (J, n, 3) example meshes, aligned to the neutral's head frame.
        example_names: (J,) names (prompts) for messages.
        prior: (J, K) prior weights in [0, 1].
        domain: gradient domain, rigid vertices and anchors.
        fixed_shapes: (K,) bool, shapes that keep their transferred deltas.
        at_most: (P, 2) int pairs (a, b): weight a <= weight b.
        antagonistic: (Q, 2) int pairs never active together.
        fit_vertices: (f,) int vertices of the weight step and the residuals (None: the
            gradient domain's vertices).
        shape_names: (K,) names for messages (None: indices).
    """

    neutral: np.ndarray
    generic_neutral: np.ndarray
    generic_deltas: np.ndarray
    examples: np.ndarray
    example_names: tuple[str, ...]
    prior: np.ndarray
    domain: GradientDomain
    fixed_shapes: np.ndarray
    at_most: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    antagonistic: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    fit_vertices: np.ndarray | None = None
    shape_names: tuple[str, ...] | None = None


@dataclass(frozen=True, eq=False)
class RigSolution:
    """The personal rig on arrays.

    Attributes:
        deltas: (K, n, 3) float64 personal deltas, metres.
        transferred: (K, n, 3) float64 deformation-transfer deltas (the initial shapes).
        weights: (J, K) float64 recovered weights.
        residual_mean_mm: (J,) mean per-vertex distance of each example to its fit, mm.
        residual_max_mm: (J,) largest per-vertex distance, mm.
        history: one dict per iteration: beta, gradient_fit, gradient_reg, vertex_fit_mm2,
            prior_term, objective, residual_mean_mm, weight_steps, and the seconds of each
            step (wall and CPU).
        converged: the tolerance stop fired before ``max_iterations``.
        setup_seconds: wall and CPU seconds before the first iteration (checks, transfer,
            factorisation, example gradients).
    """

    deltas: np.ndarray
    transferred: np.ndarray
    weights: np.ndarray
    residual_mean_mm: np.ndarray
    residual_max_mm: np.ndarray
    history: list[dict[str, float]]
    converged: bool
    setup_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def iterations(self) -> int:
        return len(self.history)


def check_problem(p: RigProblem, config: ExampleRigConfig) -> None:
    """Raises StageError when the inputs cannot give a sound rig (named examples, counts)."""
    j = len(p.example_names)
    if j < config.min_examples:
        raise StageError(f"too few examples for example-based rigging: {j}, need at least {config.min_examples}")
    if p.prior.shape != (j, p.generic_deltas.shape[0]):
        raise StageError(f"prior weights must be ({j}, {p.generic_deltas.shape[0]}), got {p.prior.shape}")
    check_mesh("neutral", p.neutral, p.generic_neutral, p.domain.triangles)
    for name, mesh in zip(p.example_names, p.examples, strict=True):
        check_mesh(f"example {name}", mesh, p.neutral, p.domain.triangles)


def _magnitude_weights(mstar: np.ndarray, config: ExampleRigConfig) -> np.ndarray:
    """(K, m) w_k = ((1 + |M*|) / (kappa + |M*|))^theta, |.| the Frobenius norm."""
    norm = np.sqrt(np.einsum("kmi,kmi->km", mstar, mstar))
    return ((1.0 + norm) / (config.kappa + norm)) ** config.theta


def gradient_step(weights: np.ndarray, targets: np.ndarray, mstar: np.ndarray, reg: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-triangle least-squares shape gradients, all triangles as stacked KxK systems.

    Args:
        weights: (J, K) example weights A of the shapes solved for.
        targets: (J, m * 9) example gradients minus the fixed shapes' contribution.
        mstar: (m, K, 9) regularisation targets, triangle-major.
        reg: (m, K) beta * w per triangle and shape.

    Returns:
        ((m, K, 9) gradients M minimising |targets - A M|^2 + sum_k reg_k |M^k - M*^k|^2,
        the fit term |targets - A M|^2 at M).
    """
    m, k = reg.shape
    ata = weights.T @ weights
    atr = (weights.T @ targets).reshape(k, m, 9).transpose(1, 0, 2)  # (m, K, 9) view
    out = np.empty((m, k, 9))
    diag = np.arange(k)

    def solve(sl: slice) -> None:
        lhs = np.repeat(ata[None], sl.stop - sl.start, axis=0)
        lhs[:, diag, diag] += reg[sl]
        out[sl] = np.linalg.solve(lhs, atr[sl] + reg[sl, :, None] * mstar[sl])

    run_chunks(solve, [slice(s, min(s + TRIANGLE_CHUNK, m)) for s in range(0, m, TRIANGLE_CHUNK)])
    # |T - A M|^2 = |T|^2 - 2 <A^T T, M> + <A^T A M, M>, without the (J, 9m) residual.
    fit = np.einsum("ji,ji->", targets, targets) - 2.0 * np.einsum("mkn,mkn->", atr, out) \
        + np.einsum("mkn,mkn->", np.matmul(ata, out), out)
    return out, float(fit)


def solve_example_rig(p: RigProblem, config: ExampleRigConfig = ExampleRigConfig()) -> RigSolution:
    """Example-based rigging of one subject (see the module docstring).

    Raises:
        StageError: too few examples, a bad mesh (named, with its count), or examples whose
            residual is far above the rest (named): they contradict their priors.
    """
    check_problem(p, config)
    clock = _Clock()
    neutral = np.asarray(p.neutral, np.float64)
    tris, k_all = p.domain.triangles, p.generic_deltas.shape[0]
    free = np.flatnonzero(~np.asarray(p.fixed_shapes, bool))
    fixed = np.flatnonzero(np.asarray(p.fixed_shapes, bool))
    system = PoissonSystem(neutral, tris, p.domain.anchors)
    generic = np.asarray(p.generic_deltas, np.float64)
    mstar = transfer_gradients(p.generic_neutral, generic, tris).reshape(k_all, len(tris), 9)
    transferred = system.solve_deltas(mstar.reshape(k_all, -1, 3, 3), generic[:, system.anchors])
    transferred[:, p.domain.rigid] = generic[:, p.domain.rigid]
    inv = inverse_frames(neutral, tris)
    examples = deformation_gradients(neutral, p.examples, tris, inv).reshape(len(p.examples), -1)
    fixed_grads = deformation_gradients(neutral, neutral + transferred[fixed], tris, inv).reshape(len(fixed), 9 * len(tris))
    w = _magnitude_weights(mstar[free], config).T.copy()  # (m, K_free), triangle-major
    mstar_free = mstar[free].transpose(1, 0, 2).copy()  # (m, K_free, 9)
    fit = system.domain if p.fit_vertices is None else np.asarray(p.fit_vertices)
    offsets = (np.asarray(p.examples, np.float64)[:, fit] - neutral[fit]) * MM  # (J, f, 3)
    deltas = transferred.copy()
    alpha = np.clip(np.asarray(p.prior, np.float64), 0.0, 1.0)
    setup: dict[str, float] = {}
    clock.lap("setup", setup)
    history: list[dict[str, float]] = []
    converged, previous, best = False, None, None
    for it in range(config.max_iterations):
        beta = config.beta(it)
        targets = examples - alpha[:, fixed] @ fixed_grads
        grads, fit_term = gradient_step(alpha[:, free], targets, mstar_free, beta * w)
        change = grads - mstar_free
        record = {"iteration": it, "beta": beta, "gradient_fit": fit_term / targets.size * 9,
                  "gradient_reg": beta * float(np.einsum("mk,mki,mki->", w, change, change)) / len(w)}
        del change
        clock.lap("gradient_step", record)
        relative = grads.transpose(1, 0, 2).reshape(len(free), -1, 3, 3)
        deltas[free] = system.solve_deltas(relative, transferred[free][:, system.anchors])
        clock.lap("vertex_step", record)
        alpha, weight_record = _weight_step(deltas[:, fit] * MM, offsets, alpha, p, config)
        record.update(weight_record)
        clock.lap("weight_step", record)
        history.append(record)
        obj = record["objective"]
        annealed = it + 1 >= config.anneal_iterations
        if best is None or obj < best[0]:
            best = (obj, deltas.copy(), alpha.copy())
        if previous is not None and annealed and (obj > previous or abs(previous - obj) <= config.tolerance * abs(previous)):
            # The gradient step minimises a gradient-space energy, not this vertex-space
            # objective, so past its minimum the alternation drifts up (measured on the
            # tiny subject's fitted meshes: lowest at iteration 3, then rising until 19).
            converged = True
            break
        previous = obj
    _, deltas, alpha = best
    deltas[:, p.domain.rigid] = generic[:, p.domain.rigid]
    dist = np.linalg.norm(np.einsum("jk,kfc->jfc", alpha, deltas[:, fit] * MM) - offsets, axis=2)
    solution = RigSolution(deltas, transferred, alpha, dist.mean(1), dist.max(1), history, converged, setup)
    check_outliers(solution, p, config)
    return solution


def _weight_step(deltas_mm: np.ndarray, offsets_mm: np.ndarray, alpha: np.ndarray, p: RigProblem,
                 config: ExampleRigConfig) -> tuple[np.ndarray, dict[str, float]]:
    """New weights of every example against the current shapes (vertex space, mm)."""
    f = deltas_mm.shape[1]
    d = deltas_mm.reshape(len(deltas_mm), -1)
    r = offsets_mm.reshape(len(offsets_mm), -1)
    gram, linear, const = d @ d.T / f, r @ d.T / f, np.einsum("ji,ji->j", r, r) / f
    antagonistic = p.antagonistic if config.enforce_antagonistic else np.zeros((0, 2), np.int64)
    alpha, steps = solve_weights(gram, linear, p.prior, config.gamma, alpha, p.at_most, antagonistic)
    data = objective(gram, linear, const, alpha)
    prior = config.gamma * np.sum((alpha - p.prior) ** 2, axis=1)
    return alpha, {"vertex_fit_mm2": float(data.mean()), "prior_term": float(prior.mean()),
                   "objective": float((data + prior).mean()), "weight_steps": steps}


def check_outliers(solution: RigSolution, p: RigProblem, config: ExampleRigConfig) -> None:
    """Raises StageError naming the examples that contradict their priors.

    An example contradicts its prior when its mean or max residual is far above the
    rest's (``outlier_factor`` times the median and above a floor), or when a shape its
    prior activates ends more than ``max_prior_deviation`` from the prior (the prompt was
    not performed: a frown for a brow raise). Shapes the prior leaves at 0 may rise without
    contradiction: lower-face shapes trade weight with each other (the true meshes of
    standard subject synth-1000-0001's jaw_drop_max recover mouthLowerDown 1.0 against a
    prior and a truth of 0, docs/rigging.md); they are still named in the message.
    """
    names, problems = p.example_names, []
    for label, res, floor in (("mean", solution.residual_mean_mm, config.outlier_floor_mm),
                              ("max", solution.residual_max_mm, config.outlier_max_floor_mm)):
        median = float(np.median(res))
        far = np.flatnonzero((res > config.outlier_factor * median) & (res > floor))
        problems += [f"{names[j]} ({label} residual {res[j]:.2f} mm, median {median:.2f} mm)" for j in far]
    moved = np.abs(solution.weights - p.prior) > config.max_prior_deviation
    for j in np.flatnonzero((moved & (p.prior > 0)).any(1)):
        shapes = ", ".join(
            f"{p.shape_names[k] if p.shape_names else k}: prior {p.prior[j, k]:.2f}, fitted {solution.weights[j, k]:.2f}"
            for k in np.flatnonzero(moved[j])
        )
        problems.append(f"{names[j]} ({shapes})")
    if problems:
        raise StageError("examples contradict their priors: " + "; ".join(problems))


class _Clock:
    """Wall and CPU seconds per step."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def lap(self, name: str, record: dict | None = None) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        if record is not None:
            record[f"{name}_wall_s"], record[f"{name}_cpu_s"] = wall - self.wall, cpu - self.cpu
        self.wall, self.cpu = wall, cpu
