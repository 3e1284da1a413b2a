"""Where a self-supervision training step's time goes (docs/selfsup.md, "Fewer steps").

Run::

    python -m benchmarks.profile_selfsup_step --data TINY --runs RUNS [--threads 1] [--steps 10] [--keypoint-warmup]

``TINY`` is a ``pgt synth`` output; its first subject is trained with the chain's rig and
texture when ``RUNS/<subject>`` holds its ``pgt label`` run, else with its true rig. The
step is the stage's: the network on every camera, the energy with the default config
(potentially visible set, neutral correction). Prints the wall and CPU seconds of a step
and torch's profiler table of a few steps, by self CPU time. ``--keypoint-warmup`` profiles
a warm-up step instead (``selfsup.keypoint_warmup_steps``: keypoint, sparsity and
constraint terms, nothing rendered).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from benchmarks.bench_selfsup import _personal
    from rigs.render.correction import NeutralCorrection
    from rigs.render.visible_set import extreme_states, potentially_visible
    from stages.selfsup import label as stage
    from stages.selfsup.frames import network_input
    from stages.selfsup.network import NetworkConfig, StateNetwork
    from stages.selfsup.stage import SelfSupConfig, load_pool, neutral_frames
    from stages.synthesis.truth import SubjectTruth
    from storage.capture import Capture

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--runs", type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--keypoint-warmup", action="store_true", help="profile a render-free warm-up step")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    capture_dir = sorted(d for d in (a.data / "captures").iterdir() if d.is_dir())[0]
    rig, texture, source = _personal(a.runs, capture_dir.name, SubjectTruth.open(a.data / "ground_truth" / capture_dir.name))
    cap, cfg = Capture.open(capture_dir), SelfSupConfig()
    names, pool = load_pool(cap, cfg)
    energy = stage.build_energy(cap, rig, texture, names, cfg)
    donning = stage.estimate_donning(energy, pool, neutral_frames(pool, cfg.appearance_frames))
    energy.renderer.restrict(potentially_visible(energy.renderer, extreme_states(energy.renderer.rig.size, donning),
                                                 rings=cfg.visible_set_rings))
    left, right = rig.eyeball_vertices
    energy.renderer.rig.correction = NeutralCorrection(rig.model.triangles, rig.model.n_vertices,
                                                       np.concatenate([left, right]))
    net = StateNetwork(len(names), len(rig.definition.regressed), NetworkConfig(width=cfg.network_width))
    params = [*net.parameters(), *energy.appearance.parameters(), *energy.renderer.rig.correction.parameters()]
    optimizer = torch.optim.Adam(params, cfg.learning_rate)
    rng = np.random.default_rng(0)

    def step() -> None:
        idx = np.sort(rng.choice(len(pool), cfg.batch_size, replace=False))
        out = net(network_input(pool.images[idx], pool.mirrored))
        terms = energy(out.b, out.gaze, out.rotation @ donning[0], donning[1] + out.translation,
                       pool.data(idx, cfg.keypoints), with_pixels=not a.keypoint_warmup)
        optimizer.zero_grad()
        terms.total.backward()
        optimizer.step()

    for _ in range(3):  # warm-up
        step()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(a.steps):
        step()
    kind = "warm-up" if a.keypoint_warmup else "whole"
    print(f"{capture_dir.name} ({source}), {kind} step, {a.threads} thread(s): {(time.perf_counter() - wall) / a.steps:.3f} s wall, "
          f"{(time.process_time() - cpu) / a.steps:.3f} CPU-s per step")
    with torch.profiler.profile() as prof:
        for _ in range(5):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
