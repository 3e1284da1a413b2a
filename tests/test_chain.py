"""The real chain on synthetic captures: DAG, failure isolation, landmarks, truth labels, metrics."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from pipeline.errors import ConfigError
from rigs.definition import load_default_rig_definition
from rigs.face_model import load_ict_face_model
from rigs.rig import BlendshapeRig
from stages.metrics import mesh_error_vertices
from stages.synthesis.generate import landmark_points
from stages.synthesis.truth import SubjectTruth
from storage import delta
from storage.capture import Capture
from storage.label_table import LabelTable, blendshape_matrix
from tests.conftest import quick_config
from tests.test_synthesis import EMBEDDING_MEDIAN_MM, _phone_camera
from workflows.label import backfill, find_captures
from workflows.metrics import MetricsJob, run_metrics, score_recording

#: The chain with a rig stage that stops early (see ``tests/conftest.py``): these tests
#: check the engine, the failure records and the landmarks, not the personal rig.
CONFIG = quick_config()


@pytest.fixture(scope="module")
def backfill_run(tiny_subject, tmp_path_factory):
    """A backfill over the tiny subject plus a copy with one undecodable HMC image."""
    capture, _ = tiny_subject
    root = tmp_path_factory.mktemp("backfill")
    captures = root / "captures"
    shutil.copytree(capture, captures / capture.name)
    broken = captures / "broken-subject"
    shutil.copytree(capture, broken)
    (broken / "capture.json").write_text((broken / "capture.json").read_text().replace(capture.name, "broken-subject"))
    frame = broken / "hmc" / "rec000" / "mouth_left" / "000007.png"
    frame.write_bytes(frame.read_bytes()[:200])  # truncated: the header survives, pixels do not
    summary = backfill(captures, str(root / "out"), CONFIG, workers=1, processes=False, progress=False, report=False)
    return root, summary, capture.name


def test_backfill_isolates_a_corrupt_capture(backfill_run):
    root, summary, good = backfill_run
    assert summary.counts["failed"] == 1
    failures = delta.read_rows(str(root / "out" / "tables" / "failures")).to_pylist()
    assert len(failures) == 1
    (row,) = failures
    assert row["subject"] == "broken-subject" and row["stage"] == "validate"
    assert row["error_type"] == "CaptureError"
    assert "mouth_left/000007.png" in row["message"] and "decode" in row["message"]
    assert summary.states[("landmarks", good)] == "done"
    assert summary.states[("landmarks", "broken-subject")] == "skipped"


def test_unreadable_manifest_fails_validation_once(tiny_subject, tmp_path):
    capture, _ = tiny_subject
    broken = tmp_path / "captures" / "no-manifest"
    shutil.copytree(capture, broken)
    (broken / "capture.json").write_text("{not json")
    summary = backfill(tmp_path / "captures", str(tmp_path / "out"), CONFIG, workers=1, processes=False, progress=False, report=False)
    (row,) = delta.read_rows(str(tmp_path / "out" / "tables" / "failures")).to_pylist()
    assert (row["subject"], row["stage"], row["error_type"]) == ("no-manifest", "validate", "CaptureError")
    assert "capture.json" in row["message"]
    assert row["attempt"] == 1, "a broken capture is not retried: it would fail the same way"
    assert summary.states[("landmarks", "no-manifest")] == "skipped"


def test_landmark_records_cover_every_phone_frame(backfill_run, tiny_subject):
    root, _, good = backfill_run
    capture_dir, truth_dir = tiny_subject
    rows = delta.read_rows(str(root / "out" / "tables" / "landmarks"))
    capture = Capture.open(capture_dir)
    expected = sum(capture.phone_frame_count(e) for e in capture.phone_expressions)
    assert rows.num_rows == expected
    assert set(rows.column("subject_id").to_pylist()) == {good}
    assert all(s == "ok" for s in rows.column("status").to_pylist())
    # The detections agree with the true landmarks to the embedding's accuracy, which is
    # stated in mm on the face (docs/face-model.md): pixel errors are converted to mm at
    # each landmark's depth (error_mm = error_px * z / f) before the bound is applied.
    truth = SubjectTruth.open(truth_dir)
    expressions = truth.expressions()
    prompts = list(expressions["prompts"])
    for r in rows.to_pylist():
        gt = truth.phone(r["expression"])
        k, i = r["frame_index"], prompts.index(r["expression"])
        points = landmark_points(truth, truth.rig.pose(expressions["b"][i], expressions["gaze"][i]))[:478]
        depth = _phone_camera(capture, truth, r["expression"], k).to_camera(points)[:, 2]
        pts = np.asarray(r["points"], np.float32).reshape(-1, 2)
        vis = gt["visible"][k][:478]
        err_px = np.linalg.norm(pts - gt["landmarks_2d"][k][:478], axis=1)
        err_mm = (err_px * depth / capture.phone_intrinsics(r["expression"]).fx * 1000)[vis]
        assert np.median(err_mm) < EMBEDDING_MEDIAN_MM, (r["expression"], k, np.median(err_mm))
        assert 0 < r["confidence"] <= 1 and r["mask_pixels"] > 1000


def test_rerun_resumes_without_recomputing(backfill_run):
    root, first, _ = backfill_run
    again = backfill(root / "captures", str(root / "out"), CONFIG, workers=1, processes=False, progress=False, report=False)
    assert again.counts.get("done", 0) == 0
    assert again.counts["cached"] == first.counts["done"]
    # A failed subject is attempted again on every run (its capture may have been fixed);
    # the failure table logs one row per run.
    failures = delta.read_rows(str(root / "out" / "tables" / "failures")).to_pylist()
    assert [f["run_id"] for f in failures].count(again.run_id) == 1


def test_find_captures_from_listing_file(tmp_path, tiny_subject):
    capture, _ = tiny_subject
    listing = tmp_path / "list.txt"
    listing.write_text(f"# captures\n{capture}\n\nmissing-subject\n")
    assert find_captures(listing) == [capture, tmp_path / "missing-subject"]


# --- truth labels and metrics -------------------------------------------------------------


@pytest.fixture(scope="module")
def truth_labels(tiny_root) -> LabelTable:
    return LabelTable(str(tiny_root / "ground_truth" / "labels"))


def test_synth_writes_truth_labels(truth_labels, tiny_subject):
    capture_dir, truth_dir = tiny_subject
    table = truth_labels.read()
    truth = SubjectTruth.open(truth_dir).hmc("rec000")
    assert table.num_rows == len(truth["b"])
    assert set(table.column("label_source").to_pylist()) == {"ground_truth"}
    names = load_default_rig_definition().blendshape_names
    b = blendshape_matrix(table.sort_by("frame_index"), names)
    np.testing.assert_allclose(b, truth["b"], atol=1e-7)


def test_relabel_replaces_a_subject_round_atomically(truth_labels, tmp_path):
    table = truth_labels.read()
    copy = LabelTable(str(tmp_path / "labels"))
    v0 = copy.write_subject_round(table)
    muted = table.set_column(
        table.schema.get_field_index("bs_jawOpen"), "bs_jawOpen",
        pa.compute.multiply(table["bs_jawOpen"], pa.scalar(0.5, pa.float32())),
    )
    v1 = copy.write_subject_round(muted)
    assert v1 == v0 + 1
    now, before = copy.read(), copy.read(version=v0)
    assert now.num_rows == before.num_rows == table.num_rows
    np.testing.assert_allclose(
        np.asarray(now.sort_by("frame_index")["bs_jawOpen"]), 0.5 * np.asarray(before.sort_by("frame_index")["bs_jawOpen"]), rtol=1e-6
    )


def _score(tiny_subject, table: pa.Table) -> dict:
    from stages.metrics import recordings_from_label_table

    capture_dir, truth_dir = tiny_subject
    truth = SubjectTruth.open(truth_dir)
    (labels,) = recordings_from_label_table(table)
    rec = score_recording(labels, Capture.open(capture_dir), load_default_rig_definition(), truth.rig)
    return {k: v.value for k, v in rec.results.items()}


def _with_b(table: pa.Table, b: np.ndarray) -> pa.Table:
    names = load_default_rig_definition().blendshape_names
    table = table.sort_by("frame_index")
    for k, n in enumerate(names):
        i = table.schema.get_field_index(f"bs_{n}")
        table = table.set_column(i, f"bs_{n}", pa.array(b[:, k].astype(np.float32)))
    return table


def test_truth_scores_high_on_the_closure_metrics(truth_labels, tiny_subject):
    scores = _score(tiny_subject, truth_labels.read())
    assert scores["neutralness"] >= 0.95
    assert scores["eye_closure"] >= 0.95
    assert scores["mouth_closure"] >= 0.95


def test_metrics_react_to_muted_noisy_and_zero_labels(truth_labels, tiny_subject):
    table = truth_labels.read().sort_by("frame_index")
    names = load_default_rig_definition().blendshape_names
    b = blendshape_matrix(table, names)
    base = _score(tiny_subject, table)
    muted = _score(tiny_subject, _with_b(table, b * 0.5))
    assert muted["semantic_accuracy"] < base["semantic_accuracy"]
    noise = np.random.default_rng(0).normal(0, 0.05, b.shape)
    noisy = _score(tiny_subject, _with_b(table, np.clip(b + noise, 0, 1)))
    assert noisy["smoothness"] < base["smoothness"]
    zero = _score(tiny_subject, _with_b(table, np.zeros_like(b)))
    assert zero["eye_closure"] == 0.0


def test_metrics_job_writes_a_versioned_table(tiny_root, tmp_path):
    job = MetricsJob(
        labels=str(tiny_root / "ground_truth" / "labels"), captures=str(tiny_root / "captures"),
        truth=str(tiny_root / "ground_truth"), out=str(tmp_path / "metrics"),
    )
    (summary,) = run_metrics(job).values()
    assert summary.dataset["blendshape_mae"].value == 0.0
    assert summary.dataset["expression_mesh_error_mm"].value == pytest.approx(0.0, abs=1e-6)
    assert summary.dataset["mouth_closure"].value >= 0.95, "scored with the true rig's lip gap"
    run_metrics(job)
    rows = delta.read_rows(str(tmp_path / "metrics"))
    assert delta.table_version(str(tmp_path / "metrics")) == 1
    assert {"recording", "subject", "dataset"} <= set(rows.column("level").to_pylist())
    assert rows.num_rows == delta.read_rows(str(tmp_path / "metrics"), version=0).num_rows


def _relabelled(truth_labels, path, scale: float, source: str) -> tuple[str, np.ndarray]:
    """The truth table with every coefficient times ``scale``, as ``source`` labels at ``path``."""
    table = truth_labels.read().sort_by("frame_index")
    names = load_default_rig_definition().blendshape_names
    b = blendshape_matrix(table, names).astype(np.float64)
    table = _with_b(table, b * scale)
    i = table.schema.get_field_index("label_source")
    table = table.set_column(i, table.schema.field(i), pa.array([source] * table.num_rows, pa.string()))
    LabelTable(str(path)).write_subject_round(table)
    return str(path), b


def test_metrics_job_measures_a_known_error_with_the_true_rig(truth_labels, tiny_root, tiny_subject, tmp_path):
    """Labels at half the true coefficients, from a source other than the truth: the
    blendshape MAE is half the mean true coefficient, and the mesh error is half the mean
    expression displacement of the TRUE rig's face (the rig is linear), so the labels are
    posed on the subject's true rig, not on a generic one."""
    _, truth_dir = tiny_subject
    labels, b = _relabelled(truth_labels, tmp_path / "labels", 0.5, "self_supervision")
    job = MetricsJob(labels=labels, captures=str(tiny_root / "captures"), truth=str(tiny_root / "ground_truth"),
                     out=str(tmp_path / "metrics"))
    (summary,) = run_metrics(job).values()
    d = load_default_rig_definition()
    compared = [k for k, n in enumerate(d.blendshape_names) if n not in set(d.eye_following)]
    assert summary.dataset["blendshape_mae"].value == pytest.approx(0.5 * b[:, compared].mean(), rel=1e-5)
    rig = SubjectTruth.open(truth_dir).rig
    face = mesh_error_vertices(rig.model)
    moved = np.tensordot(b, rig.deltas[:, face].astype(np.float64), axes=1)  # (T, n, 3) m
    predicted_mm = 0.5 * np.linalg.norm(moved, axis=-1).mean() * 1000
    assert predicted_mm > 0.3
    assert summary.dataset["expression_mesh_error_mm"].value == pytest.approx(predicted_mm, rel=1e-4)


def test_metrics_job_uses_a_rig_the_user_passes(truth_labels, tiny_root, tiny_subject, tmp_path):
    """The truth labels posed on a rig from the rig folder (here the generic mean-identity
    rig) measure that rig's difference from the true one on the face, exactly."""
    capture_dir, truth_dir = tiny_subject
    truth = SubjectTruth.open(truth_dir)
    generic = BlendshapeRig.generic(load_ict_face_model())
    (tmp_path / "rigs").mkdir()
    generic.save(tmp_path / "rigs" / f"{capture_dir.name}.npz")
    job = MetricsJob(labels=str(tiny_root / "ground_truth" / "labels"), captures=str(tiny_root / "captures"),
                     truth=str(tiny_root / "ground_truth"), rig_dir=str(tmp_path / "rigs"), out=str(tmp_path / "metrics"))
    (summary,) = run_metrics(job).values()
    b = truth.hmc("rec000")["b"][::25]
    face = mesh_error_vertices(truth.rig.model)
    # The metric over every frame vs a direct check on every 25th frame: both far from 0.
    direct = np.linalg.norm(generic.pose(b)[:, face] - truth.rig.pose(b)[:, face], axis=-1).mean() * 1000
    value = summary.dataset["expression_mesh_error_mm"].value
    assert direct > 0.5 and value == pytest.approx(direct, rel=0.1)
    # A rig folder without the subject's rig is an error naming the file.
    job_missing = MetricsJob(labels=job.labels, captures=job.captures, truth=job.truth, rig_dir=str(tmp_path),
                             out=str(tmp_path / "metrics2"))
    with pytest.raises(ConfigError, match=f"{capture_dir.name}.npz: no rig for subject"):
        run_metrics(job_missing)


def test_metrics_without_a_rig_stop_only_where_a_rig_is_needed(truth_labels, tiny_root, tiny_subject, tmp_path):
    """No rig folder and no truth folder: Mouth Closure (the inner-lip gap) is an error
    naming the subject, never a generic rig's number; a recording without mouth_closed
    windows scores the other metrics without a rig."""
    from stages.metrics import recordings_from_label_table

    capture_dir, _ = tiny_subject
    job = MetricsJob(labels=str(tiny_root / "ground_truth" / "labels"), captures=str(tiny_root / "captures"),
                     out=str(tmp_path / "metrics"))
    with pytest.raises(ConfigError, match=f"subject {capture_dir.name}, recording rec000: Mouth Closure .* needs the subject's rig"):
        run_metrics(job)
    capture = Capture.open(capture_dir)
    no_mouth = SimpleNamespace(
        rig=capture.rig,
        recording=lambda rid: SimpleNamespace(segments=[s for s in capture.recording(rid).segments if s.kind != "mouth_closed"]),
    )
    (labels,) = recordings_from_label_table(truth_labels.read())
    results = score_recording(labels, no_mouth, load_default_rig_definition(), None).results
    assert results["mouth_closure"].value is None
    for name in ("semantic_accuracy", "neutralness", "smoothness", "eye_closure"):
        assert results[name].value is not None and 0 < results[name].value <= 1, name
