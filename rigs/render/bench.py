"""Speed of the renderer: ms per frame, 10 HMC cameras, forward and backward.

Run ``python -m rigs.render.bench [--frames 4] [--sizes 100 200] [--device cpu] [--threads 1]``. Prints
one row per size: wall and process-CPU time per frame of the visibility pass, of the
differentiable forward (posing, surface, appearance) and of the backward pass to
(b, gaze, R, t) and the appearance parameters.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def _timed(fn, device: str) -> tuple[object, float, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def measure(size: int, frames: int, device: str = "cpu", repeats: int = 3) -> dict[str, float]:
    """Per-frame wall and CPU seconds of each pass, best of ``repeats``, at ``size`` px."""
    from rigs.camera import rig_cameras
    from rigs.face_model import load_ict_face_model
    from rigs.render import AppearanceModel, HmcRenderer, RigState
    from rigs.render.losses import masked_l2
    from rigs.rig import BlendshapeRig
    from stages.synthesis.hmc import default_hmc_rig

    model = load_ict_face_model()
    rig = BlendshapeRig.generic(model)
    cams = rig_cameras(default_hmc_rig())
    renderer = HmcRenderer.from_rig(rig, cams, scale=size / cams[next(iter(cams))].width).to(device)
    seed = np.full((64, 256), 0.4, np.float32)
    app = AppearanceModel(list(cams), seed, np.ones_like(seed), np.ones(len(model.triangles), bool),
                          model.n_vertices).to(device)
    rng = np.random.default_rng(0)
    state = RigState.rest(frames, rig.definition.size, device=device)
    state.b = torch.as_tensor(rng.uniform(0, 0.3, state.b.shape), dtype=torch.float32, device=device)
    for x in (state.b, state.gaze, state.R, state.t):
        x.requires_grad_(True)
    target = torch.full((frames, len(cams), size, size), 0.5, device=device)
    best: dict[str, tuple[float, float]] = {}
    def forward(ids: torch.Tensor) -> torch.Tensor:
        s = renderer.surface(renderer.rig(state), ids)
        return masked_l2(app(s, renderer.rig.triangles, renderer.cameras), target, s.mask)

    for _ in range(repeats):
        with torch.no_grad():
            vertices = renderer.rig(state)
        ids, w_vis, c_vis = _timed(lambda v=vertices: renderer.visibility(v), device)
        loss, w_fwd, c_fwd = _timed(lambda i=ids: forward(i), device)
        _, w_bwd, c_bwd = _timed(loss.backward, device)
        for key, value in (("visibility", (w_vis, c_vis)), ("forward", (w_fwd, c_fwd)), ("backward", (w_bwd, c_bwd))):
            if key not in best or value[0] < best[key][0]:
                best[key] = value
    return {f"{k}_{kind}_ms": 1000 * v[i] / frames for k, v in best.items() for i, kind in enumerate(("wall", "cpu"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, device {args.device}, {args.frames} frames x 10 cameras")
    for size in args.sizes:
        r = measure(size, args.frames, args.device)
        cells = "  ".join(f"{k.replace('_ms', '')} {v:7.1f}" for k, v in r.items())
        print(f"{size:4d} px  ms/frame: {cells}")


if __name__ == "__main__":
    main()
