"""The QA dashboard's data access, drill-down geometry and offline report (no browser)."""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pandas as pd
import pytest

from storage import delta
from tests.dashboard_data import DISTILLED, STAND_IN
from workflows.dashboard.data import _SCANNED, DashboardData, product_group
from workflows.dashboard.views import with_worst_metric


def _groups(*rows):
    return pd.DataFrame(rows, columns=["label_source", "label_round", "computed_at"])


def test_product_is_the_newest_non_reference_group_else_what_is_there():
    t0, t1 = dt.datetime(2026, 1, 1), dt.datetime(2026, 2, 1)
    both = _groups(("ground_truth", 0, t1), ("trivial_zeros", 0, t1), ("self_supervision", 0, t0),
                   ("selfsup", 0, t1), ("distillation", 2, t0))
    assert product_group(both) == ("distillation", 2)
    assert product_group(both[both["label_source"] != "distillation"]) == ("selfsup", 0)  # newest on a tie
    assert product_group(_groups(("ground_truth", 0, t0), ("trivial_prior", 0, t1))) == ("ground_truth", 0)
    assert product_group(_groups()) is None


def test_worst_metric_is_the_one_furthest_on_the_bad_side():
    table = pd.DataFrame({"subject_id": ["a", "b", "c"], "semantic_accuracy": [0.9, 0.2, 0.8],
                          "active_mae": [0.05, 0.06, 0.30], "amplitude_ratio": [1.0, 0.95, 1.0]})
    out = with_worst_metric(table, ["subject_id"])
    worst = dict(zip(out["subject_id"], out["worst_metric"], strict=True))
    assert worst["b"] == "semantic_accuracy"  # low score is bad
    assert worst["c"] == "active_mae"  # high error is bad
    assert worst["a"] != "semantic_accuracy"


def test_dataset_numbers_and_frames_come_from_the_tables(dashboard_sources):
    data = DashboardData(dashboard_sources)
    assert data.product() == DISTILLED
    metrics = delta.read_rows(dashboard_sources.metrics_uri, filters={"level": "dataset"}).to_pandas()
    shown = data.dataset_metrics()
    for group in (STAND_IN, DISTILLED):
        want = metrics[(metrics["label_source"] == group[0]) & (metrics["label_round"] == group[1])
                       & ~metrics["metric"].str.contains("/")].set_index("metric")["value"]
        got = shown[(shown["label_source"] == group[0]) & (shown["label_round"] == group[1])].set_index("metric")["value"]
        pd.testing.assert_series_equal(got.sort_index(), want.sort_index(), check_names=False)
    assert {"trivial_zeros", "trivial_prior", "ground_truth"} <= set(shown["label_source"])
    trend = data.trend()
    assert {STAND_IN, DISTILLED} <= set(zip(trend["label_source"], trend["label_round"], strict=True))
    failures = data.failures()
    assert list(failures["subject"]) == ["synth-broken"] and failures["message"].iloc[0]
    cov = data.coverage().set_index(["stage", "state"])["subjects"]
    assert cov[("validate", "done")] == 1 and cov[("validate", "failed")] == 1
    subject = data.label_counts()["subject_id"].iloc[0]
    frames = data.recording_frames(subject, "rec000", DISTILLED)
    rows = delta.read_rows(dashboard_sources.labels_uri, filters={"subject_id": subject, "label_round": 1})
    assert len(frames.labels.frame_index) == rows.num_rows and np.all(np.diff(frames.labels.frame_index) > 0)


def test_overlay_poses_the_rig_where_the_truth_is(dashboard_sources):
    """The drill-down's posed mesh of the true labels is the truth's mesh (same pose
    composition: rig, gaze, head rotation then translation)."""
    from stages.synthesis.truth import SubjectTruth
    from workflows.dashboard.overlay import FramePose, posed_vertices

    data = DashboardData(dashboard_sources)
    subject = data.label_counts()["subject_id"].iloc[0]
    truth = SubjectTruth.open(f"{dashboard_sources.truth}/{subject}")
    t = truth.hmc("rec000")
    frame = int(np.argmax(t["b"].max(axis=1)))
    pose = FramePose(t["b"][frame], t["gaze"][frame], t["head_quat"][frame], t["head_t"][frame])
    np.testing.assert_allclose(posed_vertices(truth.rig, pose), truth.hmc_vertices("rec000", frame), atol=1e-6)
    moved = posed_vertices(truth.rig, FramePose(t["b"][frame], t["gaze"][frame], t["head_quat"][frame],
                                                t["head_t"][frame] + 0.01))
    assert np.abs(moved - truth.hmc_vertices("rec000", frame)).max() == pytest.approx(0.01, abs=1e-6)


def test_report_command_writes_one_self_contained_file(dashboard_sources, tmp_path):
    from workflows.cli import main

    s, html = dashboard_sources, tmp_path / "report.html"
    assert main(["report", s.out, "--labels", s.labels, "--captures", s.captures, "--truth", s.truth,
                 "--html", str(html)]) == 0
    page = html.read_text()
    assert not re.search(r"<(script|link|img)[^>]+(src|href)=[\"']?(https?:)?//", page)  # nothing fetched
    assert page.count("data:image/jpeg;base64,") >= 5  # frame overlays embedded
    assert "distillation:1" in page and "(product)" in page


def test_rendered_drill_down_covers_the_true_landmarks_and_follows_the_pose(dashboard_sources):
    """The drill-down's rendered rig, posed by the true labels, covers the true mesh's
    landmarks in every embedded view; a 2 cm slip moves its silhouette."""
    from rigs.camera import rig_cameras
    from stages.synthesis.truth import SubjectTruth
    from storage.capture import Capture
    from workflows.dashboard.overlay import FramePose, rendered_views

    data = DashboardData(dashboard_sources)
    subject = data.label_counts()["subject_id"].iloc[0]
    truth = SubjectTruth.open(f"{dashboard_sources.truth}/{subject}")
    t = truth.hmc("rec000")
    frame = int(np.argmax(t["b"].max(axis=1)))
    recording = Capture.open(f"{dashboard_sources.captures}/{subject}").recording("rec000")
    cameras = rig_cameras(recording.rig)
    names = [c.name for c in recording.rig.embedded]
    pose = FramePose(t["b"][frame], t["gaze"][frame], t["head_quat"][frame], t["head_t"][frame])
    views = rendered_views(truth.rig, pose, cameras, names, view_px=96)
    marks = truth.hmc_vertices("rec000", frame)[np.asarray(truth.rig.model.landmarks68)]
    for name, (mask, _) in zip(names, views, strict=True):
        scale = mask.shape[0] / cameras[name].height
        px, depth = cameras[name].project(marks)
        uv = np.round((px + 0.5) * scale - 0.5).astype(int)
        inside = (depth > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < mask.shape[1]) & (uv[:, 1] >= 0) & (uv[:, 1] < mask.shape[0])
        if inside.sum() < 5:
            continue
        hit = [mask[max(0, v - 1):v + 2, max(0, u - 1):u + 2].any() for u, v in uv[inside]]
        assert np.mean(hit) > 0.9, (name, np.mean(hit))
    slipped = rendered_views(truth.rig, FramePose(pose.b, pose.gaze, pose.head_q, pose.head_t + [0.0, 0.02, 0.0]),
                             cameras, names, view_px=96)
    ious = [(a & b).sum() / max(1, (a | b).sum()) for (a, _), (b, _) in zip(views, slipped, strict=True)]
    assert max(ious) < 0.98, ious  # the face fills these views: 2 cm moves 4-8 % of the silhouette


def test_label_counts_from_the_log_equal_a_scan(dashboard_sources, tmp_path):
    """Frames per subject and group from the Delta log's file statistics equal a count
    over the rows: one group per file (as written), a compacted partition holding
    several groups (scanned), and a table without those statistics (scanned whole)."""
    import shutil

    from storage.label_table import PARTITION_COLUMN, LabelTable
    from workflows.dashboard.data import DashboardSources

    def counts(uri: str) -> pd.DataFrame:
        got = DashboardData(DashboardSources(out=str(tmp_path), labels=uri)).label_counts()
        rows = delta.read_rows(uri, columns=["subject_id", "label_source", "label_round"]).to_pandas()
        want = rows.groupby(["subject_id", "label_source", "label_round"], as_index=False).size()
        want = want.rename(columns={"size": "frames"}).sort_values(["subject_id", "label_source", "label_round"])
        pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True), check_dtype=False)
        return got

    written = counts(dashboard_sources.labels_uri)
    assert len(written) == 3 * written["subject_id"].nunique()  # truth, stand-in, distilled
    compacted = str(tmp_path / "compacted")
    shutil.copytree(dashboard_sources.labels_uri, compacted)
    subject = written["subject_id"].iloc[0]
    assert LabelTable(compacted).compact_subject(subject) is not None
    stats = delta.file_statistics(compacted).to_pandas()
    assert (stats["min.label_source"] != stats["max.label_source"]).sum() == 1  # the compacted file
    counts(compacted)
    assert (compacted, subject) in _SCANNED  # kept with the subject's files
    counts(compacted)  # from the kept count
    table = LabelTable(compacted)
    again = table.read(subject_id=subject, label_source=DISTILLED[0], label_round=DISTILLED[1])
    table.write_subject_round(again.slice(0, 5))  # the subject's files change: counted anew
    assert counts(compacted).set_index(["subject_id", "label_source"]).loc[(subject, DISTILLED[0]), "frames"].item() == 5
    bare = str(tmp_path / "no-stats")
    delta.append_rows(bare, delta.read_rows(dashboard_sources.labels_uri), partition_by=[PARTITION_COLUMN])
    assert "min.label_source" not in delta.file_statistics(bare).column_names
    counts(bare)
