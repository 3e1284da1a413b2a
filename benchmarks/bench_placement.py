"""Runtime of camera-placement scoring (issue 11) over the full population.

Scores a rig's cameras over identities x expressions x donning offsets with occlusion
(ray casting against every posed face), as ``pgt placement`` does, without pictures.
Default: the standard rig (10 cameras), 100 identities x the 59 prompt expressions (+ the
neutral: 60 poses per identity) x 5 donnings = 30,000 posed faces. Wall and CPU seconds
are both recorded (the machine is shared); the scoring runs in this process on the
machine's cores (Open3D's ray casting is multithreaded).

Run::

    python -m benchmarks.bench_placement                       # the full population
    python -m benchmarks.bench_placement --identities 10       # a quick look

Writes ``benchmarks/results/placement.json``; rerun ``python -m benchmarks.report``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
from pathlib import Path

from stages.placement.population import PopulationConfig
from stages.placement.rigfile import PLACEMENT_DIR
from workflows.placement import PlacementJob, run_placement

RESULTS = Path(__file__).parent / "results" / "placement.json"


def measure(rigs: list[str], identities: int, donnings: int, samples: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        job = PlacementJob(rigs=rigs, out=out, population=PopulationConfig(identities=identities, donnings=donnings),
                           samples_per_region=samples, pictures=False)
        result = run_placement(job)
    n_expr = len(result["expressions"])
    cameras = sum(len(r["targets"]) for r in result["rigs"].values())
    return {
        "command": f"python -m benchmarks.bench_placement --identities {identities} --donnings {donnings}"
                   f" --samples {samples}",
        "rigs": [Path(r).stem for r in rigs], "cameras": cameras, "identities": identities,
        "expressions": n_expr, "poses_per_identity": n_expr + 1, "donnings": donnings,
        "posed_faces": identities * (n_expr + 1), "scored_views": identities * (n_expr + 1) * donnings * cameras,
        "sample_points": sum(k for _, k in result["regions"].values()),
        "wall_s": result["timing"]["wall_s"], "cpu_s": result["timing"]["cpu_s"],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cpus": os.cpu_count(), "load_1min_after": os.getloadavg()[0],
        "standard_targets": result["rigs"][Path(rigs[0]).stem]["targets"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rigs", nargs="+", default=[str(PLACEMENT_DIR / "standard.json")])
    parser.add_argument("--identities", type=int, default=100)
    parser.add_argument("--donnings", type=int, default=5)
    parser.add_argument("--samples", type=int, default=64)
    args = parser.parse_args()
    result = measure(args.rigs, args.identities, args.donnings, args.samples)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "standard_targets"}, indent=1))


if __name__ == "__main__":
    main()
