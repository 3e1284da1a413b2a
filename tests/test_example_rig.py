"""Deformation gradients, the Poisson solve, deformation transfer and example-based rigging."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ModelError, StageError
from rigs.deformation_transfer import model_domain, transfer_deltas
from rigs.face_model import load_ict_face_model
from rigs.gradients import PoissonSystem, deformation_gradients, gradient_operator
from rigs.rig import BlendshapeRig
from rigs.rig_weights import ACTIVE


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


# ------------------------------------------------------------------ example-based rigging

SHAPES = ("jawOpen", "mouthClose", "mouthSmile_L", "mouthSmile_R", "mouthFrown_L", "browInnerUp_L",
          "eyeBlink_L", "eyeLookUp_L")
#: (prompt, true weights): single shapes at two levels, pairs, and a neutral.
PROMPTS = (
    ("neutral", {}), ("jaw_max", {"jawOpen": 1.0}), ("jaw_half", {"jawOpen": 0.5}),
    ("jaw_close", {"jawOpen": 0.6, "mouthClose": 0.5}), ("smile_l", {"mouthSmile_L": 0.9}),
    ("smile_r", {"mouthSmile_R": 0.8}), ("smile", {"mouthSmile_L": 0.6, "mouthSmile_R": 0.7}),
    ("frown_l", {"mouthFrown_L": 1.0}), ("brow", {"browInnerUp_L": 0.9}),
    ("brow_frown", {"browInnerUp_L": 0.5, "mouthFrown_L": 0.6}), ("blink", {"eyeBlink_L": 1.0}),
    ("look_up", {"eyeLookUp_L": 0.8}), ("smile_jaw", {"mouthSmile_L": 0.7, "jawOpen": 0.4}),
)


@pytest.fixture(scope="module")
def small_generic(model):
    return make_small_generic(model)


@pytest.fixture(scope="module")
def small_truth(small_generic, model):
    return make_small_truth(small_generic, model)


@pytest.fixture(scope="module")
def art_result(small_generic, small_truth):
    """The personal rig fitted with the art priors (1.1x the true weights)."""
    from rigs.personal_rig import build_example_rig

    neutral, _, _, _, examples = small_truth
    return build_example_rig(small_generic, neutral, examples)


def make_small_generic(model):
    """The generic rig restricted to SHAPES, with PROMPTS whose art priors are 1.1x the truth."""
    from rigs.definition import Prompt, RigDefinition

    prompts = tuple(Prompt(name, "", {k: min(1.0, round(v * 1.1, 2)) for k, v in w.items()}) for name, w in PROMPTS)
    definition = RigDefinition("small", "1", SHAPES, ("eyeLookUp_L",), np.deg2rad(30.0),
                               (("mouthSmile_L", "mouthFrown_L"),), (("mouthClose", "jawOpen"),), prompts)
    return BlendshapeRig.generic(model, definition)


def make_small_truth(small_generic, model):
    """A subject, its true personal rig (transfer + smooth direction/extent changes) and examples."""
    rng = np.random.default_rng(7)
    neutral = model.identity_shape(rng.normal(size=100))
    transferred = transfer_deltas(small_generic, neutral).astype(np.float64)
    x = neutral - neutral.mean(0)
    true = transferred.copy()
    domain = model_domain(model, small_generic.deltas)
    for k in range(len(SHAPES) - 1):  # the eye-following shape carries over
        bump = np.exp(-np.sum((x - rng.normal(scale=0.03, size=3)) ** 2, 1) / (2 * 0.04**2))[:, None]
        true[k] = transferred[k] * rng.uniform(0.85, 1.15) + bump * (transferred[k] @ rng.normal(scale=0.3, size=(3, 3)).T)
    true[:, domain.rigid] = small_generic.deltas[:, domain.rigid]
    d = small_generic.definition
    weights = np.array([[w.get(n, 0.0) for n in SHAPES] for _, w in PROMPTS])
    examples = {name: neutral + np.tensordot(weights[j], true, 1) for j, (name, _) in enumerate(PROMPTS)}
    assert d.size == len(SHAPES)
    return neutral, transferred, true, weights, examples


def _basis_error_mm(deltas, true, shapes):
    """Mean per-vertex error (mm) of each basis over the vertices its true delta moves >= 0.5 mm."""
    out = []
    for k in shapes:
        moved = np.linalg.norm(true[k], axis=1) >= 5e-4
        out.append(1000 * np.linalg.norm(deltas[k, moved] - true[k, moved], axis=1).mean())
    return np.array(out)


def test_a_known_rig_is_recovered_from_noise_free_examples(small_generic, small_truth, art_result):
    from rigs.example_rig import ExampleRigConfig
    from rigs.personal_rig import build_example_rig

    neutral, transferred, true, weights, examples = small_truth
    free = range(len(SHAPES) - 1)
    dt_err = _basis_error_mm(transferred, true, free)
    trusted = ExampleRigConfig(gamma=10.0)  # known weights: a prior worth trusting
    known = build_example_rig(small_generic, neutral, examples, trusted,
                              priors={n: weights[j] for j, (n, _) in enumerate(PROMPTS)})
    known_err = _basis_error_mm(known.rig.deltas, true, free)
    art = art_result  # art priors 1.1x the truth
    art_err = _basis_error_mm(art.rig.deltas, true, free)
    # Measured: per basis 0.07-0.49x transfer's error (mouthClose, in one example at 0.5, is
    # the worst), mean 0.29x; weights within 0.019 of the truth.
    assert (known_err <= 0.6 * dt_err).all(), (known_err, dt_err)
    assert known_err.mean() <= 0.4 * dt_err.mean()
    assert np.abs(known.weights - weights).max() < 0.03
    # Art priors 1.1x the truth: the regulariser keeps shapes at the transferred amplitude
    # and the weights absorb the gain (measured mean 0.60x transfer's error, weights 0.10).
    assert art_err.mean() <= 0.75 * dt_err.mean()
    assert np.abs(art.weights - weights).max() < 0.15
    assert known.history[-1]["objective"] < known.history[0]["objective"]


def test_personal_rig_keeps_rigid_parts_eye_following_shapes_and_constraints(small_generic, small_truth, art_result):
    neutral, transferred, _, _, _ = small_truth
    result = art_result
    d, rig = small_generic.definition, result.rig
    assert rig.definition is d and rig.deltas.dtype == np.float32 and np.allclose(rig.neutral, neutral, atol=1e-7)
    rigid = model_domain(small_generic.model, small_generic.deltas).rigid
    assert np.array_equal(rig.deltas[:, rigid], small_generic.deltas[:, rigid])
    look = d.index("eyeLookUp_L")
    assert np.abs(rig.deltas[look] - transferred[look]).max() < 1e-7
    w = result.weights
    assert ((w >= 0) & (w <= 1)).all()
    for a, b in d.at_most:
        assert (w[:, d.index(a)] <= w[:, d.index(b)] + 1e-9).all()
    for a, b in d.antagonistic_pairs:  # never both active
        assert (np.minimum(w[:, d.index(a)], w[:, d.index(b)]) <= ACTIVE).all()
    summary = result.summary()
    assert summary["iterations"] == len(result.history) and set(summary["examples"]) == {n for n, _ in PROMPTS}
    assert summary["examples"]["jaw_max"]["weights"]["jawOpen"] > 0.8


def test_weight_solver_matches_bounded_least_squares():
    from scipy.optimize import lsq_linear

    from rigs.rig_weights import solve_weights

    rng = np.random.default_rng(3)
    d = rng.normal(size=(6, 40))
    d[1] = 0.9 * d[0] + 0.1 * d[1]  # nearly collinear shapes: an ill-conditioned Gram
    r = rng.normal(size=(5, 40)) + rng.uniform(0, 1, (5, 6)) @ d
    prior, gamma = rng.uniform(0, 1, (5, 6)), 0.1
    alpha, _ = solve_weights(d @ d.T / 40, r @ d.T / 40, prior, gamma, prior, np.zeros((0, 2), int), np.zeros((0, 2), int))
    for j in range(5):  # |D^T a - r|^2 / f + gamma |a - p|^2 as one stacked least squares
        lhs = np.vstack([d.T / np.sqrt(40), np.sqrt(gamma) * np.eye(6)])
        rhs = np.concatenate([r[j] / np.sqrt(40), np.sqrt(gamma) * prior[j]])
        assert np.allclose(alpha[j], lsq_linear(lhs, rhs, bounds=(0, 1)).x, atol=1e-5)
    pinned, _ = solve_weights(d @ d.T / 40, r @ d.T / 40, prior, gamma, prior, np.array([[2, 3]]), np.array([[0, 1]]))
    assert (pinned[:, 2] <= pinned[:, 3] + 1e-12).all() and (np.minimum(pinned[:, 0], pinned[:, 1]) <= ACTIVE).all()


def _examples_except(examples, **changes):
    out = dict(examples)
    out.update(changes)
    return out


def test_rigging_rejects_unsound_inputs(small_generic, small_truth):
    from rigs.personal_rig import build_example_rig

    neutral, _, _, _, examples = small_truth
    few = dict(list(examples.items())[:4])
    with pytest.raises(StageError, match="too few examples for example-based rigging: 4, need at least 5"):
        build_example_rig(small_generic, neutral, few)
    with pytest.raises(StageError, match="example mesh missing for brow, smile_l"):
        build_example_rig(small_generic, neutral, _examples_except(examples, smile_l=None, brow=None))
    with pytest.raises(StageError, match=r"meshes must be \(24591, 3\): blink \(10, 3\)"):
        build_example_rig(small_generic, neutral, _examples_except(examples, blink=np.zeros((10, 3))))
    with pytest.raises(StageError, match="examples with no prior .*: grin"):
        build_example_rig(small_generic, neutral, _examples_except(examples, grin=neutral))
    domain = model_domain(small_generic.model, small_generic.deltas)
    collapsed = examples["blink"].copy()
    for tri in domain.triangles[[10, 5000, 9000]]:
        collapsed[tri[1]] = collapsed[tri[0]]
    with pytest.raises(StageError, match=r"mesh example blink: \d+ degenerate triangles"):
        build_example_rig(small_generic, neutral, _examples_except(examples, blink=collapsed))
    scrambled = examples["brow"][np.random.default_rng(1).permutation(len(neutral))]
    with pytest.raises(StageError, match=r"mesh example brow: \d+ of 28068 triangles flipped"):
        build_example_rig(small_generic, neutral, _examples_except(examples, brow=scrambled))
    with pytest.raises(StageError, match=r"mesh neutral: \d+ degenerate"):
        bad = neutral.copy()
        bad[domain.triangles[10, 1]] = bad[domain.triangles[10, 0]]
        build_example_rig(small_generic, bad, examples)


def test_rigging_names_examples_that_contradict_their_priors(small_generic, small_truth):
    from rigs.example_rig import ExampleRigConfig
    from rigs.personal_rig import build_example_rig

    neutral, _, _, _, examples = small_truth
    quick = ExampleRigConfig(max_iterations=3)
    # The frown performed for the brow prompt: the weights leave the prior.
    with pytest.raises(StageError, match=r"contradict their priors: brow \(mouthFrown_L: prior 0.00, fitted 0.\d\d, "
                                         r"browInnerUp_L: prior 0.99, fitted 0.\d\d\)"):
        build_example_rig(small_generic, neutral, _examples_except(examples, brow=examples["frown_l"]), quick)
    # A 4 mm swell on the cheek that no shape makes: its largest residual stands out
    # (measured 2.6 mm against a median of 0.12 mm; its mean is diluted over 14k vertices).
    cheek = neutral[small_generic.model.landmarks68[13]]
    swell = 0.004 * np.exp(-np.sum((neutral - cheek) ** 2, 1) / (2 * 0.015**2))[:, None] * [1.0, 0.0, 0.0]
    with pytest.raises(StageError, match=r"contradict their priors: smile_r \(max residual \d\.\d\d mm, median 0\.\d\d mm\)$"):
        build_example_rig(small_generic, neutral, _examples_except(examples, smile_r=examples["smile_r"] + swell), quick)
