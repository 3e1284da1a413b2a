"""Does the camera-placement score predict what a camera is worth to the labels? (issue 11 part 3)

Run::

    python -m benchmarks.bench_selfsup --data TINY --runs RUNS --subjects 1 --set selfsup.steps=300 \\
        --variants cnn,seed:1,without:eye_left,...,without:gt_glabella --out LOO.json   # one or more files
    python -m benchmarks.placement_vs_labels --selfsup LOO.json [LOO2.json ...] \\
        [--placement benchmarks/results/placement.json] [--out benchmarks/results/placement_vs_labels.json]

A camera's worth to the labels is how much worse round 0 gets without it: the metric of
the ``without:CAMERA`` run minus that of the run with every camera (the ``cnn`` variant).
Each placement score of the standard rig (``pgt placement``'s per-camera figures over
its target regions: REFA's cosine visibility, the occlusion-aware visibility, the
fraction of points seen, the range of motion) is correlated with that worth over the
cameras (``stages.placement.tables.accuracy_correlation``). The ``seed:N`` run gives the
run-to-run spread of the metric: a worth below it is noise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: Round-0 metrics whose increase without a camera is its worth (all: lower is better).
WORTH_METRICS = ("active_mae", "blendshape_mae", "expression_mesh_error_active_mm", "gaze_error_deg")
#: Placement figures (means over the population) correlated with the worth.
SCORES = ("v_cosine", "v_occluded", "coverage", "motion")


def _variants(paths: list[Path]) -> dict[str, dict[str, float]]:
    """variant -> round-0 metrics of the (single) subject, merged over the files."""
    out: dict[str, dict[str, float]] = {}
    for path in paths:
        result = json.loads(path.read_text())
        (entry,) = result["subjects"].values()
        for name, v in entry["variants"].items():
            out[name] = v["metrics"]["self_supervision/0"]
    return out


def analyse(selfsup: list[Path], placement: Path) -> dict:
    """Per-camera worth, placement scores and their correlations."""
    from stages.placement.tables import accuracy_correlation

    variants = _variants(selfsup)
    if "cnn" not in variants:
        raise SystemExit("the selfsup results need the 'cnn' variant (every camera)")
    base = variants["cnn"]
    worth = {m: {name.split(":", 1)[1]: v[m] - base[m] for name, v in variants.items() if name.startswith("without:")}
             for m in WORTH_METRICS}
    spread = {m: [abs(v[m] - base[m]) for name, v in variants.items() if name.startswith("seed:")] for m in WORTH_METRICS}
    targets = json.loads(placement.read_text())["standard_targets"]
    scores = {s: {t["camera"]: t["mean"][s] for t in targets} for s in SCORES}
    correlations = {m: {s: accuracy_correlation(scores[s], worth[m]) for s in SCORES} for m in WORTH_METRICS}
    return {"selfsup": [str(p) for p in selfsup], "placement": str(placement), "with_every_camera": base,
            "worth": worth, "seed_spread": spread, "scores": scores, "correlations": correlations}


def markdown(result: dict) -> str:
    """The per-camera table and the correlations."""
    worth, scores = result["worth"], result["scores"]
    cams = sorted(worth["active_mae"], key=lambda c: -worth["active_mae"][c])
    lines = ["| camera | " + " | ".join(f"worth: {m}" for m in WORTH_METRICS) + " | " + " | ".join(SCORES) + " |",
             "|---" * (1 + len(WORTH_METRICS) + len(SCORES)) + "|"]
    for c in cams:
        lines.append(f"| {c} | " + " | ".join(f"{worth[m][c]:+.3f}" for m in WORTH_METRICS) + " | "
                     + " | ".join(f"{scores[s].get(c, float('nan')):.2f}" for s in SCORES) + " |")
    spread = result["seed_spread"]
    if any(spread.values()):
        lines.append("| run-to-run spread (another seed, every camera) | "
                     + " | ".join(f"{max(spread[m]):.3f}" if spread[m] else "-" for m in WORTH_METRICS)
                     + " |" + " |" * len(SCORES))
    lines += ["", "| worth metric | " + " | ".join(f"{s}: Pearson / Spearman" for s in SCORES) + " |",
              "|---" * (1 + len(SCORES)) + "|"]
    for m, row in result["correlations"].items():
        lines.append(f"| {m} | " + " | ".join(f"{row[s]['pearson']:+.2f} / {row[s]['spearman']:+.2f}" for s in SCORES) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--selfsup", type=Path, nargs="+", required=True)
    p.add_argument("--placement", type=Path, default=Path(__file__).parent / "results" / "placement.json")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "placement_vs_labels.json")
    a = p.parse_args()
    result = analyse(a.selfsup, a.placement)
    a.out.write_text(json.dumps(result, indent=1))
    print(markdown(result))


if __name__ == "__main__":
    main()
