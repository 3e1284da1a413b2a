"""Tests of the metrics a muted labeller cannot fool, the trivial labellers and the
eye-following convention (stages/metrics_active.py, stages/metrics_trivial.py,
rigs/definition.py; SPEC §3, §5.2; docs/metrics.md §5).

The hand-worked cases use small constructed arrays; the job tests score the tiny
synthetic subject's truth and the two trivial labellers.
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import StageError
from rigs.definition import load_default_rig_definition
from stages.metrics import (
    MeshError,
    active_frames,
    active_mae,
    amplitude_ratio,
    blendshape_mae,
    mesh_error_on_frames,
)
from stages.metrics_trivial import TRIVIAL_PRIOR, TRIVIAL_ZEROS, trivial_coefficients
from stages.synthesis.performance import gaze_for_prior
from tests.test_metrics import Seg

# --- Active MAE ------------------------------------------------------------------------------


def test_active_mae_by_hand():
    names = ("a", "b", "eyeLookUp_L")
    true = np.array([[0.0, 0.05, 0.9], [0.5, 0.1, 0.9], [0.2, 0.0, 0.9]])
    est = np.array([[0.3, 0.0, 0.0], [0.1, 0.4, 0.0], [0.2, 0.2, 0.0]])
    r = active_mae(est, true, names, exclude={"eyeLookUp_L"})
    # Active pairs (true >= 0.1): a@1 |0.1-0.5| = 0.4, a@2 0, b@1 |0.4-0.1| = 0.3.
    assert r.n_pairs == 3 and r.mae == pytest.approx(0.7 / 3)
    assert r.per_basis == pytest.approx({"a": 0.2, "b": 0.3})
    # The inactive pairs' errors (a@0: 0.3, b@0: 0.05, b@2: 0.2) count only in the plain MAE.
    assert blendshape_mae(est, true, names, exclude={"eyeLookUp_L"}).mae == pytest.approx(1.25 / 6)
    zeros = active_mae(np.zeros_like(true), true, names, exclude={"eyeLookUp_L"})
    assert zeros.mae == pytest.approx((0.5 + 0.2 + 0.1) / 3)
    assert active_mae(true, true, names).mae == 0.0
    none = active_mae(est, np.zeros_like(true), names)
    assert none.mae is None and none.per_basis == {"a": None, "b": None, "eyeLookUp_L": None}
    res = r.as_results()
    assert res["active_mae"].value == pytest.approx(0.7 / 3) and res["active_mae"].n_items == 3
    # Truth in another column order gives the same.
    r2 = active_mae(est, true[:, [2, 0, 1]], names, exclude={"eyeLookUp_L"}, names_true=("eyeLookUp_L", "a", "b"))
    assert r2.per_basis == pytest.approx(r.per_basis)
    with pytest.raises(StageError, match="non-finite"):
        active_mae(np.full_like(est, np.nan), true, names)


# --- Amplitude ratio -------------------------------------------------------------------------


def _peaks():
    """20 frames: peak p1 on [0, 10), a neutral gap, peak p2 on [15, 20)."""
    names = ("a", "b", "c")
    true = np.zeros((20, 3))
    true[0:10, 0] = np.linspace(0.1, 1.0, 10)  # a: active in p1 (P90 = 0.91)
    true[15:20, 1] = 0.6  # b: active in p2
    true[0:10, 1] = 0.02  # b: a trace in p1, below the 0.05 rule -> p1 not used for b
    true[10:15, 2] = 0.9  # c: active outside every peak -> not rated
    segs = [Seg("peak", 0, 10, "p1"), Seg("neutral", 10, 15), Seg("peak", 15, 20, "p2")]
    return names, true, np.arange(20), segs


def test_amplitude_ratio_by_hand():
    names, true, fi, segs = _peaks()
    r = amplitude_ratio(true, true, names, fi, segs)
    assert r.per_basis == pytest.approx({"a": 1.0, "b": 1.0}) and r.median == 1.0
    assert r.n_windows == {"a": 1, "b": 1}
    half = amplitude_ratio(0.5 * true, true, names, fi, segs)
    assert half.median == pytest.approx(0.5)
    zero = amplitude_ratio(np.zeros_like(true), true, names, fi, segs)
    assert zero.per_basis == {"a": 0.0, "b": 0.0} and zero.median == 0.0
    # b over p2 only: P90(label) = 0.3 -> 0.5; a doubled but clipped at 1: P90 = 1.0 / 0.91.
    est = true.copy()
    est[:, 0] = np.minimum(2 * true[:, 0], 1.0)
    est[15:20, 1] = 0.3
    est[0:10, 1] = 0.5  # a false activation in p1, which b's ratio does not look at
    r = amplitude_ratio(est, true, names, fi, segs)
    assert r.per_basis["b"] == pytest.approx(0.5)
    assert r.per_basis["a"] == pytest.approx(1.0 / 0.91)
    assert r.median == pytest.approx((0.5 + 1.0 / 0.91) / 2)
    assert r.as_results()["amplitude_ratio"].n_items == 2
    # Rows in another order and a missing frame change nothing but the pool.
    perm = np.random.default_rng(0).permutation(20)
    assert amplitude_ratio(est[perm], true[perm], names, fi[perm], segs).per_basis == pytest.approx(r.per_basis)
    # The rule: a window activates a basis from a true P90 of min_true.
    assert "b" in amplitude_ratio(est, true, names, fi, segs, min_true=0.01).n_windows
    assert amplitude_ratio(est, true, names, fi, segs, min_true=0.01).n_windows["b"] == 2
    assert amplitude_ratio(est, true, names, fi, [Seg("neutral", 0, 20)]).median is None


# --- Expression-mesh error on active frames --------------------------------------------------


def test_mesh_error_on_active_frames_by_hand():
    names = ("a", "eyeLookUp_L")
    b_true = np.array([[0.3, 0.0], [0.29, 1.0], [0.0, 0.0], [1.0, 0.0]])
    active = active_frames(b_true, names, exclude={"eyeLookUp_L"})
    assert active.tolist() == [True, False, False, True]  # gaze-driven shapes do not count
    assert active_frames(b_true, names).tolist() == [True, True, False, True]
    err = MeshError(2.5, np.array([1.0, 2.0, 3.0, 4.0]), np.zeros(5))
    res = mesh_error_on_frames(err, active)["expression_mesh_error_active_mm"]
    assert res.value == pytest.approx(2.5) and res.n_items == 2
    assert mesh_error_on_frames(err, np.zeros(4, bool))["expression_mesh_error_active_mm"].value is None
    with pytest.raises(StageError):
        mesh_error_on_frames(err, np.ones(3, bool))


# --- Eye-following shapes from gaze ------------------------------------------------------------


def test_gaze_from_eye_following_inverts_the_convention():
    d = load_default_rig_definition()
    rng = np.random.default_rng(3)
    gaze = rng.uniform(-1, 1, (50, 4)) * d.gaze_theta_max  # within +-theta_max: no clipping
    act = d.eye_following_from_gaze(gaze)
    np.testing.assert_allclose(d.gaze_from_eye_following(act), gaze, atol=1e-12)
    # The generator's prompt gaze goes through the same definition.
    look = {n: 0.8 for n in ("eyeLookUp_L", "eyeLookUp_R")}
    g = gaze_for_prior(d, look)
    assert g == pytest.approx([0, 0.8 * d.gaze_theta_max, 0, 0.8 * d.gaze_theta_max])
    right = {"eyeLookOut_R": 0.5, "eyeLookIn_L": 0.5}  # both eyes turned toward -x
    assert gaze_for_prior(d, right) == pytest.approx([-0.5 * d.gaze_theta_max, 0, -0.5 * d.gaze_theta_max, 0])


# --- Trivial labellers --------------------------------------------------------------------------


def test_trivial_coefficients_by_hand():
    d = load_default_rig_definition()
    look = next(p for p in d.prompts if any(n in d.eye_following for n in p.art_prior))
    other = next(p for p in d.prompts if p.art_prior and not set(p.art_prior) & set(d.eye_following))
    segs = [Seg("neutral", 0, 5), Seg("peak", 5, 10, other.name), Seg("peak", 12, 15, look.name)]
    fi = np.arange(20)
    b, gaze = trivial_coefficients(TRIVIAL_PRIOR, fi, segs, d)
    np.testing.assert_allclose(b[5:10], np.tile(d.art_prior_vector(other.name), (5, 1)), atol=1e-7)
    np.testing.assert_allclose(b[12:15], np.tile(d.art_prior_vector(look.name), (3, 1)), atol=1e-6)
    assert not b[:5].any() and not b[10:12].any() and not b[15:].any() and not gaze[:12].any()
    # The look prompt's eye-following shapes come from its gaze (SPEC §3).
    np.testing.assert_allclose(b[12:15, d.indices(d.eye_following)], d.eye_following_from_gaze(gaze[12:15]),
                               atol=1e-6)
    zb, zg = trivial_coefficients(TRIVIAL_ZEROS, fi, segs, d)
    assert zb.shape == (20, d.size) and not zb.any() and not zg.any()
    with pytest.raises(StageError, match="trivial labeller"):
        trivial_coefficients("zeros", fi, segs, d)


# --- The metrics job on the tiny subject ----------------------------------------------------------


@pytest.fixture(scope="module")
def scored(tiny_root, tmp_path_factory):
    """The truth table and both trivial labellers scored by the metrics job."""
    from workflows.metrics import MetricsJob, run_metrics

    out = tmp_path_factory.mktemp("active_metrics")
    job = MetricsJob(labels=str(tiny_root / "ground_truth" / "labels"), captures=str(tiny_root / "captures"),
                     truth=str(tiny_root / "ground_truth"), out=str(out / "metrics"))
    return run_metrics(job), out


def _dataset(summary, metric):
    return summary.dataset[metric].value


def test_truth_scores_active_mae_zero_and_amplitude_ratio_one(scored):
    summaries, _ = scored
    (truth,) = summaries.values()
    assert _dataset(truth, "active_mae") == 0.0
    assert _dataset(truth, "amplitude_ratio") == 1.0
    assert _dataset(truth, "expression_mesh_error_active_mm") == pytest.approx(0.0, abs=1e-6)
    assert truth.dataset["expression_mesh_error_active_mm"].n == 1


def test_trivial_labellers_are_scored_beside_the_truth(scored):
    summaries, _ = scored
    zeros, prior = summaries.trivial[TRIVIAL_ZEROS], summaries.trivial[TRIVIAL_PRIOR]
    # A muted labeller: small plain MAE (SPEC: about 0.015 on tiny), large active MAE.
    assert 0.005 < _dataset(zeros, "blendshape_mae") < 0.03
    assert _dataset(zeros, "active_mae") > 0.25
    assert _dataset(zeros, "amplitude_ratio") == 0.0
    assert _dataset(zeros, "expression_mesh_error_active_mm") > 1.5 * _dataset(zeros, "expression_mesh_error_mm")
    # Performances reach 60-100 % of the prior (so the prior overshoots the prompted bases)
    # and co-activate shapes the prior leaves at 0: a median near 1 (1.11 when measured).
    assert 0.7 < _dataset(prior, "amplitude_ratio") < 1.7
    assert _dataset(prior, "active_mae") < _dataset(zeros, "active_mae")
    assert _dataset(prior, "semantic_accuracy") > _dataset(zeros, "semantic_accuracy")
    # Nominal donning and straight-ahead gaze: pose and gaze errors equal the truth's motion.
    assert _dataset(prior, "head_rotation_error_deg") == _dataset(zeros, "head_rotation_error_deg") > 0


def test_trivial_label_tables_are_real_label_tables(scored, tiny_root):
    from storage.label_table import LabelTable, validate_label_table

    _, out = scored
    table = LabelTable(str(out / "trivial_labels")).read()
    validate_label_table(table)
    truth = LabelTable(str(tiny_root / "ground_truth" / "labels")).read()
    assert sorted(set(table.column("label_source").to_pylist())) == sorted([TRIVIAL_PRIOR, TRIVIAL_ZEROS])
    assert table.num_rows == 2 * truth.num_rows and set(table.column("label_round").to_pylist()) == {0}
    assert table.column("head_qw").to_pylist() == [1.0] * table.num_rows
    from storage import delta

    rows = delta.read_rows(str(out / "trivial_metrics"))
    assert set(rows.column("label_source").to_pylist()) == {TRIVIAL_PRIOR, TRIVIAL_ZEROS}
    assert "active_mae" in rows.column("metric").to_pylist()


def test_format_summary_shows_the_result_beside_both_trivial_labellers(scored):
    from workflows.metrics import format_summary

    summaries, _ = scored
    text = format_summary(summaries)
    header = next(line for line in text.splitlines() if "metric" in line and TRIVIAL_ZEROS in line)
    assert header.index("value") < header.index(TRIVIAL_ZEROS) < header.index(TRIVIAL_PRIOR)
    line = next(line for line in text.splitlines() if line.split()[:1] == ["amplitude_ratio"])
    assert line.split()[1:4] == ["1.0000", "0.0000", f"{_dataset(summaries.trivial[TRIVIAL_PRIOR], 'amplitude_ratio'):.4f}"]


def test_eye_following_columns_derived_from_true_gaze_equal_the_truth(tiny_root):
    """SPEC §3: the truth's eyeLook* columns are the convention applied to its gaze."""
    from storage.label_table import GAZE_COLUMNS, LabelTable, blendshape_matrix

    d = load_default_rig_definition()
    table = LabelTable(str(tiny_root / "ground_truth" / "labels")).read()
    gaze = np.column_stack([table.column(c).to_numpy() for c in GAZE_COLUMNS]).astype(np.float64)
    looks = blendshape_matrix(table, d.eye_following)
    assert looks.max() > 0.5, "the tiny subject looks around"
    np.testing.assert_allclose(looks, d.eye_following_from_gaze(gaze), atol=1e-6)
