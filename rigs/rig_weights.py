"""The weight step of example-based rigging: bounded, prior-regularised blend weights.

For every example ``j`` (all at once, one row each) it minimises

    f(a_j) = 1/2 a_j^T Q a_j - b_j^T a_j + gamma/2 |a_j - p_j|^2

over ``0 <= a <= 1`` and the rig definition's constraints, where ``Q = D D^T / f`` and
``b_j = D r_j / f`` come from the shapes' deltas ``D`` (K, 3f) and the example's offset
``r_j`` (3f,) over ``f`` fitting vertices (so ``f`` is a mean squared per-vertex distance),
and ``p_j`` is the prior (the prompt's art prior). The solver is accelerated projected
gradient (FISTA with adaptive restart), vectorised over examples:

* ``at_most`` pairs (a, b): ``a_a <= a_b``; the projection onto ``0 <= x <= y <= 1`` is
  exact (clip when ordered, else the clipped midpoint on the diagonal);
* ``antagonistic`` pairs may not both be active: not convex, so after a solve the smaller
  weight of every active pair is pinned to 0 and the solve repeats (warm started) until
  no pair is active.
"""

from __future__ import annotations

import numpy as np

#: A weight above this counts as active for the antagonistic rule.
ACTIVE = 1e-3


def project(alpha: np.ndarray, at_most: np.ndarray, zero: np.ndarray) -> np.ndarray:
    """Projects rows of weights onto the box, the at-most pairs and the pinned zeros.

    Args:
        alpha: (J, K) weights (modified in place and returned).
        at_most: (P, 2) int pairs (a, b) meaning ``alpha[:, a] <= alpha[:, b]``; pairs
            should not share a weight (then the projection is exact).
        zero: (J, K) bool, weights pinned to 0.

    Returns:
        (J, K) the projected weights.
    """
    np.clip(alpha, 0.0, 1.0, out=alpha)
    for a, b in at_most:
        x, y = alpha[:, a], alpha[:, b]
        mid = np.clip(0.5 * (x + y), 0.0, 1.0)
        bad = x > y
        alpha[bad, a], alpha[bad, b] = mid[bad], mid[bad]
    alpha[zero] = 0.0
    return alpha


def solve_weights(
    gram: np.ndarray,
    linear: np.ndarray,
    prior: np.ndarray,
    gamma: float,
    start: np.ndarray,
    at_most: np.ndarray,
    antagonistic: np.ndarray,
    tol: float = 1e-7,
    max_steps: int = 5000,
) -> tuple[np.ndarray, int]:
    """Constrained weights of all examples.

    Args:
        gram: (K, K) ``Q``, symmetric positive semi-definite.
        linear: (J, K) ``b``.
        prior: (J, K) ``p``.
        gamma: prior weight (> 0 keeps the problem strictly convex).
        start: (J, K) warm start.
        at_most: (P, 2) int at-most pairs.
        antagonistic: (Q, 2) int antagonistic pairs (empty: none enforced).
        tol: stop when no weight moves more than this in a step.
        max_steps: most gradient steps per solve.

    Returns:
        ((J, K) weights, total gradient steps taken).
    """
    hess = gram + gamma * np.eye(len(gram))
    c = linear + gamma * prior
    step = 1.0 / np.linalg.eigvalsh(hess)[-1]
    zero = np.zeros(start.shape, bool)
    alpha = project(np.array(start, np.float64), at_most, zero)
    steps = 0
    for _ in range(len(antagonistic) + 1):
        alpha, n = _fista(hess, c, alpha, step, at_most, zero, tol, max_steps)
        steps += n
        if not len(antagonistic):
            break
        both = (alpha[:, antagonistic[:, 0]] > ACTIVE) & (alpha[:, antagonistic[:, 1]] > ACTIVE)
        if not both.any():
            break
        rows, pairs = np.nonzero(both)
        first_smaller = alpha[rows, antagonistic[pairs, 0]] <= alpha[rows, antagonistic[pairs, 1]]
        zero[rows, np.where(first_smaller, antagonistic[pairs, 0], antagonistic[pairs, 1])] = True
        alpha = project(alpha, at_most, zero)
    return alpha, steps


def _fista(hess, c, alpha, step, at_most, zero, tol, max_steps):
    """Accelerated projected gradient with gradient-based restart, per row."""
    prev, y = alpha.copy(), alpha.copy()
    t = np.ones(len(alpha))
    for n in range(1, max_steps + 1):
        x = project(y - step * (y @ hess - c), at_most, zero)
        moved = x - prev
        if np.abs(moved).max() < tol:
            return x, n
        restart = np.einsum("jk,jk->j", y - x, moved) > 0
        t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        momentum = np.where(restart, 0.0, (t - 1.0) / t_next)
        t = np.where(restart, 1.0, t_next)
        y = x + momentum[:, None] * moved
        prev = x
    return prev, max_steps


def objective(gram: np.ndarray, linear: np.ndarray, const: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(J,) data term ``a^T Q a - 2 b^T a + r^T r / f`` (mean squared distance) per example."""
    return np.einsum("jk,kl,jl->j", alpha, gram, alpha) - 2.0 * np.einsum("jk,jk->j", linear, alpha) + const
