"""The README's main job on the embedded default: synthesize a subject, then run the chain.

1. ``pgt synth`` a ``tiny`` subject (captures + ground truth + true label table);
2. the chain through the Dask DAG (today: validation, landmarks, depth-refined face masks, fusion);
3. the QA report: status of every stage, and the label metrics of the ground-truth table
   (the reference the pipeline's own labels will be scored against).
Each chain issue extends step 2 until it ends in labels, which step 3 then scores.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.status import status
from stages.synthesis.generate import generate
from stages.synthesis.presets import get_preset
from workflows.config import RunConfig
from workflows.label import backfill
from workflows.metrics import MetricsJob, format_summary, run_metrics


def run_demo(out: Path, preset: str = "tiny", seed: int = 0, workers: int | None = None) -> int:
    """Returns a process exit status (0 = every stage of every subject succeeded)."""
    out = Path(out)
    synth = out / "synthetic"
    generate(get_preset(preset), 1, seed, synth)
    summary = backfill(synth / "captures", str(out / "run"), RunConfig(), workers=workers)
    report = [status(str(out / "run")).to_text(), ""]
    metrics = run_metrics(MetricsJob(
        labels=str(synth / "ground_truth" / "labels"), captures=str(synth / "captures"),
        truth=str(synth / "ground_truth"), out=str(out / "qa" / "metrics"), run_id=summary.run_id,
    ))
    report += ["## Label metrics of the ground-truth table", "", format_summary(metrics)]
    text = "\n".join(report)
    (out / "qa").mkdir(parents=True, exist_ok=True)
    (out / "qa" / "report.md").write_text(text + "\n")
    print(text)
    print(f"\nrun folder {summary.run_dir}; QA report {out / 'qa' / 'report.md'}")
    return 0 if summary.ok else 1
