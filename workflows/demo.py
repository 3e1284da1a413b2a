"""The README's main job on the embedded default: synthesize a subject, then run the chain.

1. ``pgt synth`` a ``tiny`` subject (captures + ground truth + true label table);
2. the chain through the Dask DAG: validation, landmarks, depth-refined face masks,
   fusion, fit, refinement, UV texture, the personal rig, and the self-supervision's
   round-0 labels (written to the run's label table);
3. the QA report: status of every stage and the records each left out; the phone chain's
   pictures (refined mask, fused scan, per-vertex error of the refined mesh, UV texture,
   each beside the truth) and its accuracy against the truth; the personal rig against
   the true rig; the round-0 labels' metrics against the truth beside the two trivial
   labellers, with the labelled rig over the HMC views and curves against the truth; and
   the ground-truth table's own metrics (the ceiling of the §5.1 scores).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.runlog import OutputLayout
from pipeline.status import status
from stages.selfsup.stage import SelfSupConfig
from stages.synthesis.generate import generate
from stages.synthesis.presets import get_preset
from workflows.config import RunConfig
from workflows.dashboard.data import DashboardSources
from workflows.dashboard.report import build_report
from workflows.label import backfill
from workflows.metrics import MetricsJob, format_summary, run_metrics

#: The demo's self-supervision: the tiny subject's 160 px frames at 48 px, a short schedule
#: (docs/selfsup.md gives its accuracy and time beside the default's): 400 render-free
#: keypoint steps (each about a quarter of a whole step) then 120 whole ones.
DEMO_SELFSUP = SelfSupConfig(resolution=48, steps=120, keypoint_warmup_steps=400, batch_size=8,
                             appearance_frames=8, appearance_steps=60)


def run_demo(out: Path, preset: str = "tiny", seed: int = 0, workers: int | None = None) -> int:
    """Returns a process exit status (0 = every stage of every subject succeeded)."""
    out = Path(out)
    synth = out / "synthetic"
    generate(get_preset(preset), 1, seed, synth)
    summary = backfill(synth / "captures", str(out / "run"), RunConfig(selfsup=DEMO_SELFSUP), workers=workers)
    report = [status(str(out / "run")).to_text(), ""]
    if summary.ok:
        report += phone_chain_section(out / "run", synth / "ground_truth", out / "qa")
        report += personal_rig_section(out / "run", synth / "ground_truth", out / "qa")
        report += round0_section(out / "run", synth, out / "qa", summary.run_id)
    metrics = run_metrics(MetricsJob(
        labels=str(synth / "ground_truth" / "labels"), captures=str(synth / "captures"),
        truth=str(synth / "ground_truth"), out=str(out / "qa" / "truth" / "metrics"), run_id=summary.run_id,
    ))
    report += ["## Label metrics of the ground-truth table (the ceiling of the §5.1 scores)", "",
               "```", format_summary(metrics), "```"]
    text = "\n".join(report)
    (out / "qa").mkdir(parents=True, exist_ok=True)
    (out / "qa" / "report.md").write_text(text + "\n")
    # The HTML report shows the round-0 labels when the chain made them, else the truth's table.
    labelled = (out / "qa" / "metrics" / "_delta_log").is_dir()
    build_report(DashboardSources(str(out / "run"), labels="" if labelled else str(synth / "ground_truth" / "labels"),
                                  metrics=str(out / "qa" / ("metrics" if labelled else "truth/metrics")),
                                  captures=str(synth / "captures"), truth=str(synth / "ground_truth")),
                 out / "qa" / "report.html")
    print(text)
    print(f"\nrun folder {summary.run_dir}; QA report {out / 'qa' / 'report.md'} and {out / 'qa' / 'report.html'}")
    return 0 if summary.ok else 1


def phone_chain_section(run_out: Path, truth_root: Path, qa: Path) -> list[str]:
    """The QA report's phone-chain section: pictures beside the truth (written under
    ``qa/img/``) and the accuracy of the fused scans and meshes on the face region."""
    import numpy as np

    from stages.fusion import FusedScans
    from stages.geometry_eval import evaluate_subject
    from stages.synthesis.truth import SubjectTruth
    from workflows.phone_figures import find_outputs, write_phone_figures

    written = write_phone_figures(run_out, truth_root, qa / "img")
    sid, _, outputs = find_outputs(run_out, None)
    acc = evaluate_subject(SubjectTruth.open(truth_root / sid), FusedScans.from_output(outputs["fusion"]),
                           outputs.get("fit"), outputs.get("refine"))

    def mean(kind: str, key: str) -> str:
        values = [r[key] for r in acc[kind] if r.get(key) is not None]
        return f"{np.mean(values):.2f}" if values else "n/a"

    lines = [f"## Phone chain ({sid})", "",
             "Accuracy against the truth on the face region (docs/phone-accuracy.md), mm:", "",
             "| measure | fit | refine |", "|---|---|---|",
             f"| per-vertex error, mean over expressions (rigid alignment) | {mean('fit', 'rigid_mean_mm')} "
             f"| {mean('refine', 'rigid_mean_mm')} |",
             f"| per-vertex error, mean over expressions (as estimated) | {mean('fit', 'estimated_mean_mm')} "
             f"| {mean('refine', 'estimated_mean_mm')} |", "",
             f"Fused scans: median distance to the true surface {mean('fusion', 'median_mm')} mm "
             f"(mean over {len(acc['fusion'])} expressions).", ""]
    lines += [f"![{p.stem}](img/{p.name})" for p in written]
    return lines + [""]


def personal_rig_section(run_out: Path, truth_root: Path, qa: Path) -> list[str]:
    """The QA report's personal-rig section: the ``rig`` stage's rig against the subject's
    true rig (per-basis error beside the generic copy and deformation transfer, per-example
    residuals) and a picture of a few shapes (``qa/img/personal_rig.png``)."""
    import numpy as np

    from rigs.definition import load_default_rig_definition
    from rigs.face_model import load_ict_face_model
    from rigs.rig import BlendshapeRig
    from stages.rigging import RiggedSubject
    from stages.synthesis.personal_rig import shape_differences
    from stages.synthesis.truth import SubjectTruth
    from workflows.phone_figures import find_outputs
    from workflows.rig_figures import write_personal_rig_figure

    sid, _, outputs = find_outputs(run_out, None)
    if "rig" not in outputs:
        return []
    personal = RiggedSubject.from_output(outputs["rig"]).result
    true = SubjectTruth.open(truth_root / sid).rig
    d = load_default_rig_definition()
    regressed = np.array([d.index(n) for n in d.regressed])
    generic = BlendshapeRig.generic(load_ict_face_model(), d)

    def basis_mm(deltas: np.ndarray) -> str:
        return f"{np.nanmean(shape_differences(true.deltas[regressed], np.asarray(deltas)[regressed])[:, 0]):.2f}"

    figure = write_personal_rig_figure(qa / "img" / "personal_rig.png", personal.rig, personal.transferred, true)
    history = personal.history[-1] if personal.history else {}
    return [f"## Personal rig ({sid})", "",
            f"Example-based rigging of {len(personal.example_names)} examples "
            f"({len(personal.history)} iterations, {'converged' if personal.converged else 'iteration limit'}; "
            f"docs/rigging.md). Per-basis error against the true rig, mean per-vertex mm over the vertices "
            "each true basis moves by >= 0.5 mm, mean over the regressed bases:", "",
            "| generic copied | deformation transfer | example-based |", "|---|---|---|",
            f"| {basis_mm(generic.deltas)} | {basis_mm(personal.transferred)} | {basis_mm(personal.rig.deltas)} |", "",
            f"Examples reproduced by the rig: median residual {np.median(personal.residual_mean_mm):.2f} mm, "
            f"worst {personal.residual_mean_mm.max():.2f} mm "
            f"({personal.example_names[int(np.argmax(personal.residual_mean_mm))]}); "
            f"last objective {history.get('objective', float('nan')):.4g}.", "",
            f"![{figure.stem}](img/{figure.name})", ""]


def round0_section(run_out: Path, synth: Path, qa: Path, run_id: str) -> list[str]:
    """The QA report's round-0 section: the run's label table scored against the truth
    (SPEC §5, the mesh error through the chain's own rig) beside the trivial labellers,
    the labelled rig over the HMC views (best and worst frames by pixel residual) and
    curves against the truth (``qa/img/round0_*.png``)."""
    from pipeline.outputs import RunOutputs
    from stages.rigging import rig_from_run
    from stages.selfsup.stage import SelfSupLabels
    from stages.synthesis.truth import SubjectTruth
    from storage.capture import Capture
    from workflows.selfsup_figures import write_curves_figure, write_overlay_figure

    outputs = RunOutputs(str(run_out))  # reads only the selfsup and rig artifacts
    subjects = outputs.subjects("selfsup")
    if not subjects:
        return []
    sid = subjects[0]
    capture_path = outputs.captures[sid]
    labels = SelfSupLabels.from_output(outputs.load("selfsup", sid))
    rig = rig_from_run(outputs, sid)
    metrics = run_metrics(MetricsJob(
        labels=OutputLayout(str(run_out)).table("labels"), captures=str(synth / "captures"),
        truth=str(synth / "ground_truth"), rig_run=str(run_out), out=str(qa / "metrics"), run_id=run_id,
    ))
    capture = Capture.open(capture_path)
    recording = labels.recordings[0]
    rec = capture.recording(recording)
    truth_b = SubjectTruth.open(synth / "ground_truth" / sid).hmc(recording)["b"]
    overlay = write_overlay_figure(qa / "img" / "round0_overlay.png", capture, labels, rig)
    curves = write_curves_figure(qa / "img" / "round0_curves.png", labels, truth_b, list(rec.segments), recording,
                                 fps=rec.rig.fps)
    t = labels.timings
    return [f"## Round-0 labels ({sid})", "",
            f"Self-supervision ({len(labels.b)} frames, {len(labels.cameras)} cameras; docs/selfsup.md): "
            f"training {t.get('train_s', 0):.0f} s, inference {t.get('infer_s', 0):.0f} s. Status: "
            + ", ".join(f"{k} {v}" for k, v in zip(*np.unique(labels.status, return_counts=True), strict=True))
            + f"; median pixel residual {np.median(labels.residual_photometric) * 255:.1f} grey levels.", "",
            "Label metrics against the truth (mesh error through the chain's own rig), beside the "
            "trivial labellers:", "", "```", format_summary(metrics), "```", "",
            f"![{overlay.stem}](img/{overlay.name})", "", f"![{curves.stem}](img/{curves.name})", ""]
