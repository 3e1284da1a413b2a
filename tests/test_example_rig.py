"""Deformation gradients, the Poisson solve, deformation transfer and example-based rigging."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ModelError, StageError
from rigs.deformation_transfer import model_domain, transfer_deltas
from rigs.face_model import load_ict_face_model
from rigs.gradients import PoissonSystem, deformation_gradients, gradient_operator
from rigs.rig import BlendshapeRig


@pytest.fixture(scope="module")
def model():
    return load_ict_face_model()


@pytest.fixture(scope="module")
def generic(model):
    return BlendshapeRig.generic(model)


def _bend(x: np.ndarray) -> np.ndarray:
    """A smooth, strongly non-rigid map of head-frame points (metres)."""
    y = x.copy()
    y[:, 0] += 0.2 * x[:, 1] ** 2 + 0.03 * np.sin(40 * x[:, 2])
    y[:, 1] *= 1.0 + 3.0 * x[:, 0]
    y[:, 2] += 0.5 * x[:, 0] * x[:, 1]
    return y


def test_gradient_operator_is_exact_on_linear_fields(model):
    rest = model.neutral.astype(np.float64)
    g, areas, normals = gradient_operator(rest, model.triangles)
    a = np.array([0.3, -1.2, 2.0])
    tangent = a - normals * (normals @ a)[:, None]  # the linear field's in-plane gradient
    assert np.allclose((g @ (rest @ a)).reshape(-1, 3), tangent, rtol=0, atol=1e-9)
    assert areas.min() > 0


def test_poisson_reproduces_a_mesh_from_its_own_gradients(model):
    rest = model.neutral.astype(np.float64)
    domain = model_domain(model, model.expression_basis)
    deformed = _bend(rest)
    grads = deformation_gradients(rest, deformed[None], domain.triangles)
    system = PoissonSystem(rest, domain.triangles, domain.anchors[:1])  # one anchor: translation
    deltas = system.solve_deltas(grads, (deformed - rest)[domain.anchors[:1]])[0]
    ids = system.domain
    err = np.linalg.norm(deltas[ids] - (deformed - rest)[ids]) / np.linalg.norm((deformed - rest)[ids])
    assert err < 1e-9
    assert not deltas[domain.rigid].any()  # outside the domain: untouched


def test_poisson_on_an_anchored_sub_domain(model):
    rest = model.neutral.astype(np.float64)
    face = model.part_triangle_mask("face") & np.isin(model.triangles, model.part_vertices("face")).all(1)
    tris = model.triangles[face]
    verts = np.unique(tris)
    anchors = verts[np.argsort(rest[verts, 1])[-40:]]  # the forehead's top rows
    deformed = _bend(rest)
    grads = deformation_gradients(rest, deformed[None], tris)
    deltas = PoissonSystem(rest, tris, anchors).solve_deltas(grads, (deformed - rest)[anchors])[0]
    truth = (deformed - rest)[verts]
    assert np.linalg.norm(deltas[verts] - truth) / np.linalg.norm(truth) < 1e-9


def test_transfer_onto_the_generic_neutral_returns_the_generic_deltas(generic):
    deltas = transfer_deltas(generic, generic.neutral)
    assert deltas.shape == generic.deltas.shape and deltas.dtype == np.float32
    assert np.abs(deltas - generic.deltas).max() < 1e-8  # float32 rounding of the Poisson solve


def test_transfer_onto_a_scaled_neutral_scales_the_deltas(generic):
    # Gradients are scale-free, so a uniformly scaled (and moved) face gets scaled deltas;
    # rigid parts keep the generic ones by rule; anchors move < 1 um in every shape.
    scale = 1.15
    subject = generic.neutral * scale + np.array([0.01, -0.02, 0.03], np.float32)
    deltas = transfer_deltas(generic, subject)
    domain = model_domain(generic.model, generic.deltas)
    ids = np.setdiff1d(np.arange(generic.model.n_vertices), domain.rigid)
    assert np.abs(deltas[:, ids] - scale * generic.deltas[:, ids]).max() < 2e-6
    assert np.array_equal(deltas[:, domain.rigid], generic.deltas[:, domain.rigid])


def test_transfer_rejects_a_bad_neutral(generic):
    with pytest.raises(StageError, match=r"subject neutral: shape \(10, 3\)"):
        transfer_deltas(generic, np.zeros((10, 3), np.float32))
    collapsed = generic.neutral.copy()
    tri = model_domain(generic.model, generic.deltas).triangles[100]
    collapsed[tri[1]] = collapsed[tri[0]]
    with pytest.raises(StageError, match=r"subject neutral: \d+ degenerate triangles"):
        transfer_deltas(generic, collapsed)
    scrambled = generic.neutral[np.random.default_rng(0).permutation(len(generic.neutral))]
    with pytest.raises(StageError, match=r"subject neutral: \d+ of \d+ triangles flipped"):
        transfer_deltas(generic, scrambled)


def test_poisson_needs_an_anchor_in_every_component():
    rest = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [5, 0, 0], [6, 0, 0], [5, 1, 0]], np.float64)
    tris = np.array([[0, 1, 2], [3, 4, 5]])
    with pytest.raises(ModelError, match="1 of 2 connected components without an anchor"):
        PoissonSystem(rest, tris, np.array([0]))
    deltas = PoissonSystem(rest, tris, np.array([0, 3])).solve_deltas(np.zeros((1, 2, 3, 3)), np.ones((2, 3)))
    assert np.allclose(deltas, 1.0)  # zero gradients: each component translates with its anchor
