"""The ``rig`` stage (stages/rigging.py) on the tiny subject's true expression meshes.

The algorithm's own checks (exact Poisson solve, a known rig recovered, each failure
message) are in tests/test_example_rig.py; this module checks the stage: its inputs from
the refine artifact, its artifact and records, and its failures on a subject.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.errors import StageError
from pipeline.serialize import decode, encode
from rigs.example_rig import ExampleRigConfig
from rigs.face_model import load_ict_face_model
from rigs.rig import BlendshapeRig
from stages.refine import RefinedExpression, RefinedSubject
from stages.rigging import RiggedSubject, rig_capture, rig_subject


@pytest.fixture(scope="module")
def truth_refined(tiny_subject):
    """A refine artifact whose meshes are the tiny subject's true expression meshes."""
    from stages.synthesis.truth import SubjectTruth

    capture_dir, truth_dir = tiny_subject
    truth = SubjectTruth.open(truth_dir)
    expressions = truth.expressions()
    prompts = tuple(str(p) for p in expressions["prompts"])
    n = truth.rig.neutral.shape[0]
    refined = {
        e: RefinedExpression(expressions["vertices"][i].astype(np.float32), np.eye(4), np.zeros(n, np.float32),
                             0.1, 0.1, 1.0)
        for i, e in enumerate(prompts)
    }
    subject = RefinedSubject(capture_dir.name, "neutral", truth.rig.neutral.astype(np.float32), "refined",
                             refined, {}, prompts)
    return capture_dir, truth, expressions, subject


@pytest.fixture(scope="module")
def rigged(truth_refined):
    capture_dir, _, _, subject = truth_refined
    return rig_capture(capture_dir, subject.to_output(), ExampleRigConfig())


def test_rig_from_true_meshes_reproduces_them_and_round_trips(truth_refined, rigged) -> None:
    """Every prompt is an example; the personal rig reproduces each true mesh with its
    recovered weights (the examples are exact, so the residual is the solver's), and the
    artifact survives the store's serializer with its records."""
    _, truth, expressions, subject = truth_refined
    back = RiggedSubject.from_output(decode(*encode(rigged)))
    rig = back.result
    assert rig.example_names == subject.order and not back.rejected
    assert rig.rig.deltas.shape == truth.rig.deltas.shape
    assert np.array_equal(rig.rig.neutral, subject.neutral)
    region = load_ict_face_model().fitting_vertices
    for j, e in enumerate(rig.example_names):
        posed = rig.rig.neutral + np.einsum("k,knc->nc", rig.weights[j], rig.rig.deltas)
        err = np.linalg.norm(posed[region] - expressions["vertices"][j][region], axis=1).mean() * 1e3
        assert err < 0.5, (e, err)
        assert rig.residual_mean_mm[j] < 0.5
    assert rig.history and all(np.isfinite(h["objective"]) for h in rig.history)
    rows = rigged.tables["rows"].to_pylist()
    assert [r["status"] for r in rows] == ["example"] * len(subject.order)
    assert all(np.isfinite(r["residual_mean_mm"]) for r in rows)


def test_rejected_prompts_are_records_and_too_few_examples_fail(truth_refined) -> None:
    """A prompt the refinement rejected is a record with the upstream reason; with fewer
    examples than ``min_examples`` the subject fails, naming the count and the rejected."""
    capture_dir, _, _, subject = truth_refined
    gone = subject.order[2]
    refined = {e: r for e, r in subject.refined.items() if e != gone}
    partial = dataclasses.replace(subject, refined=refined, rejected={gone: "too few scan correspondences"})
    # One iteration: the records do not depend on how far the fit runs (measured 12.9 CPU-s;
    # the default fit of the 5 examples, to convergence in 4 iterations, takes 33.9).
    cfg = ExampleRigConfig(min_examples=len(refined), max_iterations=1)
    rig = RiggedSubject.from_output(rig_capture(capture_dir, partial.to_output(), cfg))
    assert gone not in rig.result.example_names and rig.rejected == {gone: "not refined: too few scan correspondences"}
    rows = {r["expression"]: r for r in rig.rows().to_pylist()}
    assert rows[gone]["status"] == "rejected" and np.isnan(rows[gone]["residual_mean_mm"])
    with pytest.raises(StageError, match=rf"{len(refined)} example meshes, rigging needs at least "
                                         rf"{len(refined) + 1}.*{gone}: not refined"):
        rig_subject(partial, ExampleRigConfig(min_examples=len(refined) + 1))


def test_flipped_triangles_in_an_example_fail_naming_it(truth_refined) -> None:
    """An example whose skin is folded over (a mirrored patch) fails, naming the example."""
    _, truth, _, subject = truth_refined
    model = load_ict_face_model()
    e = subject.order[1]
    bad = subject.refined[e].vertices.copy()
    patch = model.part_vertices("face")[:2000]
    centre = bad[patch].mean(0)
    bad[patch, 2] = 2 * centre[2] - bad[patch, 2]  # mirror a patch through its mean depth
    refined = dict(subject.refined, **{e: dataclasses.replace(subject.refined[e], vertices=bad)})
    generic = BlendshapeRig.generic(model, truth.rig.definition)
    with pytest.raises(StageError, match=rf"{subject.subject_id}: .*{e}.*"):
        rig_subject(dataclasses.replace(subject, refined=refined), ExampleRigConfig(), generic=generic)


def test_personal_rig_figure_shows_zero_error_for_the_true_rig(truth_refined, rigged, tmp_path) -> None:
    """The QA report's picture: one row per shape; where the compared rig is the true rig
    itself its difference tile is coloured 0 mm everywhere, unlike deformation transfer's."""
    from PIL import Image

    from workflows.rig_figures import write_personal_rig_figure

    _, truth, _, _ = truth_refined
    rig = RiggedSubject.from_output(rigged).result
    shapes = ("jawOpen", "mouthSmile_L")
    path = write_personal_rig_figure(tmp_path / "rig.png", truth.rig, rig.transferred, truth.rig, shapes)
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    width = 300  # shape_row's tile width: shown | true | |true - rig| | |true - DT| | colour bar

    def hot(tile: np.ndarray) -> int:  # pixels coloured near the scale's top (>= ~2.5 mm)
        body = tile[30:]  # below the label strip
        return int(((body[..., 0] > 180) & (body[..., 1] > 180) & (body[..., 2] < 120)).sum())

    rows = np.split(img, len(shapes), axis=0)
    assert img.shape[1] == 4 * width + 90
    for row in rows:
        assert hot(row[:, 2 * width:3 * width]) == 0  # the true rig against itself: 0 mm
    assert hot(rows[0][:, 3 * width:4 * width]) > 100  # jawOpen: DT misses the subject's jaw style


def _write_run(out, run_id: str, units: list[dict], subjects: dict[str, str]) -> None:
    """A run record and plan as the engine writes them (pipeline/runlog.py)."""
    import json

    run_dir = out / "runs" / run_id
    run_dir.mkdir(parents=True)
    (run_dir / "plan.json").write_text(json.dumps(units))
    (run_dir / "run.json").write_text(json.dumps({"run_id": run_id, "subjects": subjects}))


def test_metrics_read_the_rig_a_run_made(truth_refined, rigged, tiny_root, tmp_path) -> None:
    """``pgt metrics --run OUT`` poses the labels on the personal rig of the newest run
    whose rig unit finished, with the same numbers as that rig exported to a rig folder;
    a failed newer unit does not hide the finished one, and a subject the run never
    rigged is an error naming the output root."""
    import json

    from pipeline.artifacts import ArtifactStore
    from pipeline.errors import ConfigError
    from pipeline.runlog import OutputLayout
    from stages.rigging import rig_from_run
    from workflows.cli import main
    from workflows.metrics import MetricsJob, run_metrics

    capture_dir, truth, _, _ = truth_refined
    sid = capture_dir.name
    out = tmp_path / "run"
    ArtifactStore(OutputLayout(str(out)).artifacts).commit("rig", "k-good", rigged, {})
    unit = {"stage": "rig", "subject": sid}
    _write_run(out, "20261201T000000Z-a", [{**unit, "state": "done", "key": "k-good"}], {sid: str(capture_dir)})
    _write_run(out, "20261202T000000Z-b", [{**unit, "state": "failed", "key": "k-bad"}], {sid: str(capture_dir)})
    rig = rig_from_run(out, sid)
    expected = RiggedSubject.from_output(decode(*encode(rigged))).result.rig
    assert np.array_equal(rig.deltas, expected.deltas) and np.array_equal(rig.neutral, expected.neutral)
    assert rig_from_run(out, "someone-else") is None
    # A run killed before its final plan: the workers' stage log says what it committed.
    killed = tmp_path / "killed"
    ArtifactStore(OutputLayout(str(killed)).artifacts).commit("rig", "k-good", rigged, {})
    _write_run(killed, "20261203T000000Z-c", [{**unit, "state": "planned", "key": "k-good"}], {sid: str(capture_dir)})
    events = [{"event": "finish", "committed": True, "stage": "rig", "subject": sid, "key": "k-good", "time": 1},
              {"event": "start", "stage": "selfsup", "subject": sid, "key": "k-x", "time": 2}]
    (killed / "runs" / "20261203T000000Z-c" / "stage-log.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in events))
    assert np.array_equal(rig_from_run(killed, sid).deltas, expected.deltas)

    (tmp_path / "rigs").mkdir()
    expected.save(tmp_path / "rigs" / f"{sid}.npz")
    common = {"labels": str(tiny_root / "ground_truth" / "labels"), "captures": str(tiny_root / "captures"),
              "truth": str(tiny_root / "ground_truth")}
    (from_folder,) = run_metrics(MetricsJob(**common, rig_dir=str(tmp_path / "rigs"), out=str(tmp_path / "m1"))).values()
    assert main(["metrics", common["labels"], "--captures", common["captures"], "--truth", common["truth"],
                 "--run", str(out), "--out", str(tmp_path / "m2")]) == 0
    (from_run,) = run_metrics(MetricsJob(**common, rig_run=str(out), out=str(tmp_path / "m3"))).values()
    error = from_run.dataset["expression_mesh_error_mm"].value
    assert error == pytest.approx(from_folder.dataset["expression_mesh_error_mm"].value, rel=1e-9)
    true_rig_error = run_metrics(MetricsJob(**common, out=str(tmp_path / "m4"))).values()
    assert error > next(iter(true_rig_error)).dataset["expression_mesh_error_mm"].value + 0.05, \
        "the run's personal rig is not the true rig"

    empty = tmp_path / "empty"
    _write_run(empty, "20261201T000000Z-a", [], {})
    with pytest.raises(ConfigError, match=f"{empty}: no finished rig stage for subject {sid}"):
        run_metrics(MetricsJob(**common, rig_run=str(empty), out=str(tmp_path / "m5")))
