"""Why round-0 labels are muted on a subject: its rig against the detector keypoints.

Run::

    python -m benchmarks.diag_rig_keypoints --data STD --runs RUNS
        [--scores benchmarks/results/selfsup_standard.json]
        [--out benchmarks/results/rig_keypoints_standard.json]

``STD`` and ``RUNS`` are as for :mod:`benchmarks.bench_standard_labels`. Two measurements per
subject with a finished ``pgt label`` run, both in the stored images' keypoints, in pixels at
the 400 px reference width:

1. **Keypoint residual** per window kind (median over frames of each frame's median
   distance over its detected points, every camera the labeller uses): the round-0 labels
   posed through the chain's rig; the truth's labels posed through the chain's rig; the
   truth's labels through the true rig (the detector's own noise: the floor). When the
   truth through the chain rig fits the keypoints worse than the round-0 labels, the
   labeller's energy does not have its minimum at the truth: no training schedule can
   recover the truth's weights through that rig.
2. **Per-basis keypoint motion** of a unit weight at the nominal donning, chain rig
   against true rig, over the 10 points the true basis moves most (points in view of
   each camera): the true motion, the mismatch (mean distance between the two motions)
   and the gain (the chain motion projected on the true one, 1 = same size). A basis the
   chain rig moves too little or the wrong way is one the labeller replaces by others.
   With ``--scores`` (a bench_standard_labels result with per-basis figures) each basis's
   round-0 amplitude ratio is joined, and the rank correlation of gain and amplitude is
   reported.

3. With ``--prefit-steps N``: **the render-free optimum**. Every frame's state fitted to
   its keypoints alone through the chain rig (stages/selfsup/prefit.py, the labeller's
   warm-up terms, each frame its own variables), scored as labels: active MAE and
   amplitude ratio against the truth (eye-following shapes excluded, as the metrics job
   does), beside the round-0 labels'. Where this optimum is not muted and the network is,
   the network has not learnt what its energy already says.

1 and 2 are forward posing and projection only (seconds); 3 costs about a minute of CPU
per standard subject at 300 steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

#: Width at which keypoint pixels are reported (the detector contract's reference).
REFERENCE_WIDTH_PX = 400
#: Points per basis over which its motion is compared (those the true basis moves most).
TOP_POINTS = 10


def labeller_view(capture, rig):
    """(renderer at stored resolution, keypoint layout, camera names, px -> reference px)."""
    from rigs.camera import rig_cameras
    from rigs.render import HmcRenderer
    from stages.selfsup.keypoints import keypoint_layout
    from stages.selfsup.stage import SelfSupConfig, camera_names

    cfg = SelfSupConfig()
    names = camera_names(capture.rig, cfg.cameras, cfg.exclude_cameras)
    width = capture.rig.camera(names[0]).intrinsics.width
    renderer = HmcRenderer.from_rig(rig, rig_cameras(capture.rig), scale=1.0, names=names)
    return renderer, keypoint_layout(cfg.keypoint_layout, rig.model), names, REFERENCE_WIDTH_PX / width


def table_states(table, names: list[str]) -> dict:
    """{recording: (frame_index (T,), b (T, K), gaze (T, 4), R (T, 3, 3), t (T, 3))} of label rows."""
    from rigs.geometry import rotation_from_quat
    from storage.label_table import GAZE_COLUMNS, HEAD_COLUMNS, blendshape_matrix

    out = {}
    for rec in sorted(set(table.column("recording_id").to_pylist())):
        rows = table.filter(np.array([r == rec for r in table.column("recording_id").to_pylist()]))
        rows = rows.sort_by([("frame_index", "ascending")])
        head = np.stack([rows.column(c).to_numpy() for c in HEAD_COLUMNS], 1)
        out[rec] = (rows.column("frame_index").to_numpy(), np.nan_to_num(blendshape_matrix(rows, names)),
                    np.nan_to_num(np.stack([rows.column(c).to_numpy() for c in GAZE_COLUMNS], 1)),
                    rotation_from_quat(head[:, :4]).as_matrix(), head[:, 4:])
    return out


def keypoint_residuals(capture, rig, states: dict, batch: int = 200) -> dict:
    """{window kind: (frames,) each frame's median keypoint distance, reference px}."""
    import torch

    from rigs.render import RigState

    renderer, layout, names, ref = labeller_view(capture, rig)
    per_kind: dict[str, list] = {}
    for rec_id, (frames, b, gaze, rot, t) in states.items():
        rec = capture.recording(rec_id)
        kind = np.full(rec.frame_count, "other", object)
        for s in rec.segments:
            kind[s.start:s.end] = s.kind
        found = [rec.keypoints(c) for c in names]
        medians = []
        for i in range(0, len(frames), batch):
            s = slice(i, i + batch)
            state = RigState(*(torch.as_tensor(a[s], dtype=torch.float32) for a in (b, gaze, rot, t)))
            with torch.no_grad():
                pixels, _ = renderer.project(layout.points(renderer.rig(state)))  # (F, C, P, 2)
            d = np.full(pixels.shape[:3], np.nan)
            for c, kp in enumerate(found):
                if kp is not None:
                    obs, conf = kp[0][frames[s]], kp[1][frames[s]]
                    dist = np.linalg.norm(pixels[:, c].numpy() - obs, axis=-1) * ref
                    d[:, c] = np.where(conf > 0, dist, np.nan)
            medians.append(np.nanmedian(d.reshape(len(d), -1), axis=1))
        for k, v in zip(kind[frames], np.concatenate(medians), strict=True):
            per_kind.setdefault(str(k), []).append(float(v))
    return per_kind


def basis_motion(capture, rig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """((K, C, P, 2) keypoint motion of each unit weight in reference px, (C, P) in view, names)."""
    import torch

    from rigs.render import RigState

    renderer, layout, names, ref = labeller_view(capture, rig)
    k = renderer.rig.size
    n = k + 1
    state = RigState(torch.cat([torch.zeros(1, k), torch.eye(k)]), torch.zeros(n, 4),
                     torch.eye(3).expand(n, 3, 3).clone(), torch.zeros(n, 3))
    with torch.no_grad():
        pixels, depth = renderer.project(layout.points(renderer.rig(state)))
    intr = capture.rig.camera(names[0]).intrinsics
    rest, d = pixels[0].numpy(), depth[0].numpy()
    in_view = (rest[..., 0] >= 0) & (rest[..., 0] < intr.width) & (rest[..., 1] >= 0) & (rest[..., 1] < intr.height) & (d > 0.01)
    return (pixels[1:] - pixels[:1]).numpy() * ref, in_view, list(rig.definition.blendshape_names)


def compare_bases(chain: tuple, true: tuple, regressed: set[str]) -> dict:
    """{basis: {true_px, mismatch_px, gain}} of the regressed bases (see the module docstring)."""
    (mc, vc, names), (mt, vt, _) = chain, true
    both = vc & vt
    out = {}
    for k, name in enumerate(names):
        if name not in regressed:
            continue
        a, t = mc[k][both], mt[k][both]
        top = np.argsort(np.linalg.norm(t, axis=-1))[-TOP_POINTS:]
        a, t = a[top], t[top]
        out[name] = {"true_px": float(np.linalg.norm(t, axis=-1).mean()),
                     "mismatch_px": float(np.linalg.norm(a - t, axis=-1).mean()),
                     "gain": float((a * t).sum() / max(float((t ** 2).sum()), 1e-12))}
    return out


def rank_correlation(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho of two equal-length lists (None under 3 pairs)."""
    from scipy.stats import spearmanr

    return float(spearmanr(x, y).statistic) if len(x) >= 3 else None


def pooled(capture, per_recording: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict]]:
    """(labels (T, K), truth (T, K), frame ids (T,), segments) of several recordings in one pool:
    each recording's frames and segments shifted by its own offset (metrics take one clip)."""
    est, true, frames, segments = [], [], [], []
    for r, (rec_id, (fi, b_est, b_true)) in enumerate(per_recording.items()):
        offset = r * 10_000_000
        est.append(b_est), true.append(b_true), frames.append(fi + offset)
        segments += [{"kind": s.kind, "start": s.start + offset, "end": s.end + offset}
                     for s in capture.recording(rec_id).segments]
    return np.concatenate(est), np.concatenate(true), np.concatenate(frames), segments


def render_free_optimum(capture, rig, truth: dict, steps: int) -> dict:
    """Measurement 3: the per-frame keypoint fits of every frame, scored against the truth."""
    import torch

    from stages.metrics_active import active_mae, amplitude_ratio
    from stages.selfsup.label import build_energy, estimate_donning
    from stages.selfsup.losses import full_blendshapes
    from stages.selfsup.prefit import PrefitConfig, fit_keypoints
    from stages.selfsup.stage import SelfSupConfig, load_pool, neutral_frames

    cfg = SelfSupConfig()
    names, pool = load_pool(capture, cfg)
    energy = build_energy(capture, rig, None, names, cfg)
    donning = estimate_donning(energy, pool, neutral_frames(pool, cfg.appearance_frames))
    fits = fit_keypoints(energy, pool, donning, PrefitConfig(steps=steps))
    full = full_blendshapes(torch.as_tensor(fits.b), torch.as_tensor(fits.gaze), rig.definition, energy.index).numpy()
    per_recording, start = {}, 0
    for clip in pool.clips:
        fi, b_true = truth[clip.recording][0], truth[clip.recording][1]
        per_recording[clip.recording] = (fi, full[start:start + clip.frame_count][fi], b_true)
        start += clip.frame_count
    est, true, frames, segments = pooled(capture, per_recording)
    names_all, exclude = list(rig.definition.blendshape_names), set(rig.definition.eye_following)
    return {"steps": steps, "seconds": fits.seconds, "keypoint_px_median": float(np.nanmedian(fits.keypoint_px)),
            "active_mae": active_mae(est, true, names_all, exclude=exclude).mae,
            "amplitude_ratio": amplitude_ratio(est, true, names_all, frames, segments, exclude=exclude).median}


def diagnose_subject(data: Path, run: Path, subject: str, amplitude: dict[str, float] | None,
                     prefit_steps: int = 0) -> dict:
    """Both measurements of one subject (see the module docstring)."""
    from pipeline.outputs import RunOutputs
    from stages.rigging import rig_from_run
    from stages.synthesis.truth import SubjectTruth
    from storage.capture import Capture
    from storage.label_table import LabelTable

    capture = Capture.of(data / "captures" / subject)
    chain_rig = rig_from_run(RunOutputs(str(run)), subject)
    true_rig = SubjectTruth.open(data / "ground_truth" / subject).rig
    names = list(chain_rig.definition.blendshape_names)
    labels = table_states(LabelTable(str(run / "tables" / "labels")).read(subject_id=subject, label_round=0), names)
    truth = table_states(LabelTable(str(data / "ground_truth" / "labels")).read(subject_id=subject), names)
    residuals = {"labels_chain_rig": keypoint_residuals(capture, chain_rig, labels),
                 "truth_chain_rig": keypoint_residuals(capture, chain_rig, truth),
                 "truth_true_rig": keypoint_residuals(capture, true_rig, truth)}
    summary = {src: {kind: float(np.median(v)) for kind, v in sorted(kinds.items())} for src, kinds in residuals.items()}
    bases = compare_bases(basis_motion(capture, chain_rig), basis_motion(capture, true_rig),
                          set(chain_rig.definition.regressed))
    entry = {"residual_px": summary, "frames": {k: len(v) for k, v in residuals["truth_chain_rig"].items()},
             "bases": bases, "mean_gain": float(np.mean([b["gain"] for b in bases.values()]))}
    if prefit_steps > 0:
        entry["render_free_optimum"] = render_free_optimum(capture, chain_rig, truth, prefit_steps)
    if amplitude:
        rated = [n for n in bases if amplitude.get(n) is not None]
        for n in rated:
            bases[n]["amplitude_ratio"] = amplitude[n]
        entry["gain_amplitude_rank_correlation"] = rank_correlation([bases[n]["gain"] for n in rated],
                                                                    [amplitude[n] for n in rated])
        entry["rated_bases"] = len(rated)
    return entry


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, nargs="+", required=True)
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--scores", type=Path, help="a bench_standard_labels result with per-basis figures")
    p.add_argument("--prefit-steps", type=int, default=0, help="measurement 3 with this many steps (0: skip)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "rig_keypoints_standard.json")
    a = p.parse_args()
    scores = json.loads(a.scores.read_text())["subjects"] if a.scores else {}
    result = {"command": "python -m benchmarks.diag_rig_keypoints " + " ".join(sys.argv[1:]), "subjects": {}}
    for data in a.data:
        for capture in sorted(d for d in (data / "captures").iterdir() if d.is_dir()):
            run = a.runs / capture.name
            if not (run / "tables" / "labels").exists():
                continue
            per_basis = (scores.get(capture.name, {}).get("labels", {}).get("self_supervision/0", {})
                         .get("per_basis", {}).get("amplitude_ratio"))
            entry = diagnose_subject(data, run, capture.name, per_basis, a.prefit_steps)
            result["subjects"][capture.name] = entry
            print(capture.name, json.dumps(entry["residual_px"]), f"mean gain {entry['mean_gain']:.2f}")
    if not result["subjects"]:
        raise SystemExit(f"no subject of {[str(d) for d in a.data]} has a finished run under {a.runs}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    print(a.out)


if __name__ == "__main__":
    main()
