"""How far the synthetic true personal rig is from the generic rig and from deformation
transfer (issue 8: what a rigging method has to recover).

Run: ``python -m benchmarks.bench_true_rig [--subjects 3] [--seed 1000]``. The subjects are
those of ``pgt synth --seed SEED`` (``make_subject`` draws first from the (seed, index)
stream, so the rigs are those of the ``standard`` preset's subjects). Per shape: mean and
max per-vertex mm over the vertices the true shape moves by >= 0.5 mm, for the generic
deltas copied unchanged and for deformation transfer alone; plus the fraction of each
shape's drawn style that plausibility kept. Writes ``benchmarks/results/true_rig.json``
and prints a markdown table (means over subjects of the per-shape mean; max of max).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from rigs.definition import load_default_rig_definition
from rigs.face_model import load_ict_face_model
from rigs.rig import BlendshapeRig
from stages.synthesis.personal_rig import base_deltas, shape_differences
from stages.synthesis.presets import get_preset
from stages.synthesis.subject import make_subject

RESULTS = Path(__file__).parent / "results" / "true_rig.json"


def measure(subjects: int, seed: int) -> dict:
    model, definition = load_ict_face_model(), load_default_rig_definition()
    generic = BlendshapeRig.generic(model, definition)
    config = get_preset("standard")
    rows = []
    for index in range(subjects):
        t0 = time.process_time()
        subject = make_subject(f"bench-{index}", np.random.default_rng([seed, index]), model, definition,
                               identity_std=config.identity_std, detail_mm=config.detail_mm,
                               rig_variation=config.rig_variation)
        cpu = time.process_time() - t0
        true = subject.rig.deltas
        dt = base_deltas(generic, subject.rig.neutral)
        rows.append({"index": index, "cpu_seconds": cpu,
                     "copy": shape_differences(true, generic.deltas).tolist(),
                     "dt": shape_differences(true, dt).tolist(),
                     "dt_vs_copy": shape_differences(dt, generic.deltas).tolist()})
    return {"seed": seed, "subjects": rows, "names": list(definition.blendshape_names),
            "regressed": list(definition.regressed)}


def table(result: dict) -> str:
    copy = np.array([r["copy"] for r in result["subjects"]])  # (S, K, 2)
    dt = np.array([r["dt"] for r in result["subjects"]])
    lines = ["| shape | copy mean mm | copy max mm | DT mean mm | DT max mm |", "|---|---|---|---|---|"]
    for k, name in enumerate(result["names"]):
        lines.append(f"| {name} | {copy[:, k, 0].mean():.2f} | {copy[:, k, 1].max():.2f} | "
                     f"{dt[:, k, 0].mean():.2f} | {dt[:, k, 1].max():.2f} |")
    reg = [result["names"].index(n) for n in result["regressed"]]
    for label, a in (("copy", copy), ("DT", dt)):
        m = a[:, reg, 0].mean(0)
        lines.append(f"\n{label}, regressed shapes: median {np.median(m):.2f} mm, range {m.min():.2f}-{m.max():.2f} mm")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--subjects", type=int, default=3)
    p.add_argument("--seed", type=int, default=1000)
    a = p.parse_args()
    result = measure(a.subjects, a.seed)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))


if __name__ == "__main__":
    main()
