"""The round-0 labels' section of ``docs/benchmarks.md`` (from ``results/selfsup.json``)."""

from __future__ import annotations

#: (metric, target text, better) for the issue's targets; None = no target, reported only.
TARGETS = (
    ("active_mae", "<= 0.12", "low"), ("amplitude_ratio", ">= 0.85", "high"),
    ("expression_mesh_error_active_mm", "<= 1.0 mm", "low"), ("head_rotation_error_deg", "<= 0.5", "low"),
    ("head_translation_error_mm", "<= 1 mm", "low"), ("gaze_error_deg", "<= 2", "low"),
    ("blendshape_mae", "", "low"), ("expression_mesh_error_mm", "", "low"),
)
#: SPEC §5.1 metrics: the target is "within 0.05 of the truth's own score".
SEMANTIC = ("semantic_accuracy", "neutralness", "smoothness", "eye_closure", "mouth_closure")


def _fmt(v: object) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def selfsup_section(d: dict, title: str = "Round-0 labels (self-supervision)") -> list[str]:
    from benchmarks.report import _table

    lines = [f"## {title}", "",
             f"`{d['command']}` on `{d['data']}`: every variant's labels scored by `pgt metrics` against the "
             "truth, beside the two trivial labellers (all zeros; the art prior in peak windows) and the "
             "truth's own §5.1 scores (the ceiling: performances are imperfect by design). "
             f"Load average before the run {d['machine']['load_before']:.1f} (timings below are "
             "inflated by it when it exceeds the 2 CPUs).", ""]
    for subject, entry in d["subjects"].items():
        variants = entry["variants"]
        floor = entry.get("rig_floor")
        header = ["metric", "target", *variants, "trivial_zeros", "trivial_prior", "truth",
                  *(["truth through the chain's rig"] if floor else [])]
        rows = []
        first = next(iter(variants.values()))["metrics"]
        for metric, target, _ in TARGETS:
            rows.append([metric, target or "-", *[_fmt(v["metrics"].get("self_supervision/0", {}).get(metric))
                                                  for v in variants.values()],
                         _fmt(first.get("trivial_zeros", {}).get(metric)), _fmt(first.get("trivial_prior", {}).get(metric)),
                         "0", *([_fmt(floor.get(metric))] if floor else [])])
        truth = d.get("truth", {}).get("ground_truth/0", {})
        for metric in SEMANTIC:
            rows.append([metric, f"within 0.05 of {_fmt(truth.get(metric))}",
                         *[_fmt(v["metrics"].get("self_supervision/0", {}).get(metric)) for v in variants.values()],
                         _fmt(first.get("trivial_zeros", {}).get(metric)), _fmt(first.get("trivial_prior", {}).get(metric)),
                         _fmt(truth.get(metric)), *([_fmt(floor.get(metric))] if floor else [])])
        rows.append(["wall s (CPU s)", "<= 1200 (standard)",
                     *[f"{v['wall_s']:.0f} ({v['cpu_s']:.0f})" for v in variants.values()], "", "", "",
                     *([""] if floor else [])])
        lines += [f"### {subject} ({entry['rig']}; {first and next(iter(variants.values()))['frames']} frames)", "",
                  *_table(header, rows)]
        if "baseline" in entry:
            b = entry["baseline"]
            lines += [f"Per-frame baseline on {b['frames']} frames around the first peak: "
                      f"{b['baseline_fps']:.2f} frames/s ({b['baseline_cpu_s']:.0f} CPU-s); the network "
                      f"{_fmt(b['cnn_inference_fps'])} frames/s at inference, {_fmt(b['cnn_fps_with_training'])} "
                      "with its training amortised over the subject's frames.", "",
                      *_table(["on those frames", "baseline", "network"],
                              [[k, _fmt(b["baseline"][k]), _fmt(b["cnn"][k])] for k in b["cnn"]])]
    return lines


def selfsup_standard_section(d: dict, title: str = "Round-0 labels of standard subjects") -> list[str]:
    """Round 0 of ``pgt label`` runs on standard subjects (results/selfsup_standard.json,
    benchmarks/bench_standard_labels.py): each subject, and the mean over them beside the
    trivial labellers, the truth and the truth through the chain's rig."""
    from benchmarks.bench_standard_labels import product
    from benchmarks.report import _table

    subjects, mean = d["subjects"], d["mean"]
    names = list(subjects)
    rows = []
    for metric, target in [(m, t or "-") for m, t, _ in TARGETS] + [(m, "within 0.05 of the truth") for m in SEMANTIC]:
        rows.append([metric, target, *[_fmt(product(subjects[n]).get(metric)) for n in names],
                     *[_fmt(mean[c].get(metric)) for c in ("round0", "trivial_zeros", "trivial_prior", "truth",
                                                           "truth_through_chain_rig")]])
    rows.append(["round 0 s", "<= 1200", *[f"{subjects[n]['round0_s']:.0f}" for n in names],
                 f"{mean['round0_s']:.0f}", "", "", "", ""])
    notes = []
    for n in names:
        e = subjects[n]
        t = e["timings_s"]
        steps = e["selfsup_config"].get("steps", "?")
        warmup = e["selfsup_config"].get("keypoint_warmup_steps", 0)
        steps = f"{warmup} keypoint warm-up + {steps} whole" if warmup else steps
        smoothed = (f"; made before the default temporal smoothing: scored with sigma "
                    f"{e['smoothed_offline']['sigma_frames']} applied to its blendshapes offline"
                    if "smoothed_offline" in e else "")
        scored = e.get("scored") or {}
        if scored.get("command") and scored["command"] != d["command"]:
            smoothed += f"; kept from an earlier scoring (`{scored['command']}`{', ' + scored['date'] if scored.get('date') else ''})"
        notes.append(f"- {n}: {e['frames']} frames, {steps} steps; seconds "
                     + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in t.items())
                     + f"; neutral correction max {e['diagnostics'].get('neutral_correction_max_mm', float('nan')):.1f} mm"
                     + smoothed + ".")
    return [f"## {title}", "",
            f"`{d['command']}`: each subject's `pgt label` run scored by `pgt metrics --run` (its own chain "
            "rig). The mean columns average the subjects; \"truth\" is the truth's own score (its true rig), "
            "\"through the chain rig\" the truth's labels scored with the chain's rig (the phone chain's floor). "
            f"Load average before: {d['machine']['load_before']:.1f}.", "",
            *_table(["metric", "target", *names, "mean", "trivial_zeros (mean)", "trivial_prior (mean)",
                     "truth (mean)", "truth through the chain rig (mean)"], rows),
            *notes, ""]


def placement_vs_labels_section(d: dict) -> list[str]:
    """Each camera's worth to round 0 against its placement scores (results/placement_vs_labels.json)."""
    from benchmarks.placement_vs_labels import markdown

    return ["## Camera placement against each camera's worth to the labels", "",
            "`python -m benchmarks.placement_vs_labels --selfsup " + " ".join(d["selfsup"]) +
            "` (docs/camera-placement.md, Part 3): a camera's worth is the round-0 metric without it "
            "minus with every camera (positive = it helps); correlations over the 10 cameras.", "",
            markdown(d), ""]


def rig_keypoints_section(d: dict) -> list[str]:
    """The chain rig against the detector keypoints (results/rig_keypoints_standard.json,
    benchmarks/diag_rig_keypoints.py): keypoint residuals per window kind, and per subject
    the bases the chain rig moves least like the truth."""
    from benchmarks.report import _table

    kinds = ("neutral", "peak", "speech", "eye_closure", "mouth_closed")
    rows, worst = [], []
    for name, e in d["subjects"].items():
        for source, label in (("labels_chain_rig", "round-0 labels, chain rig"),
                              ("truth_chain_rig", "truth's labels, chain rig"),
                              ("truth_true_rig", "truth's labels, true rig (detector noise)")):
            rows.append([name, label, *[_fmt(e["residual_px"][source].get(k)) for k in kinds]])
        bases = sorted(e["bases"].items(), key=lambda kv: kv[1]["gain"])[:6]
        worst.append(f"- {name}: mean gain {e['mean_gain']:.2f}"
                     + (f", rank correlation of gain and amplitude ratio {_fmt(e.get('gain_amplitude_rank_correlation'))} "
                        f"over {e.get('rated_bases')} rated bases" if "rated_bases" in e else "")
                     + "; lowest gains: " + ", ".join(f"{n} {v['gain']:.2f}" for n, v in bases) + ".")
        if "render_free_optimum" in e:
            o = e["render_free_optimum"]
            worst.append(f"  Per-frame keypoint fits of all its frames through the chain rig ({o['steps']} steps, "
                         f"{o['seconds']:.0f} s): active MAE {o['active_mae']:.3f}, amplitude ratio "
                         f"{o['amplitude_ratio']:.3f}, median keypoint distance {o['keypoint_px_median']:.2f} stored px.")
    return ["## The chain rig against the detector keypoints (standard subjects)", "",
            f"`{d['command']}`: median over frames of each frame's median keypoint distance (pixels at "
            "400 px width), per window kind; then each regressed basis's keypoint motion at unit weight, "
            "chain rig against true rig (gain 1 = the same size along the true motion).", "",
            *_table(["subject", "states, rig", *kinds], rows), *worst, ""]
