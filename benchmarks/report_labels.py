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


def selfsup_standard_section(d: dict) -> list[str]:
    """Round 0 of a standard subject labelled by ``pgt label`` (results/selfsup_standard.json)."""
    from benchmarks.report import _table

    labels = d["labels"]
    truth = next(iter(d["truth"].values()))
    floor = next(iter(d["truth_through_chain_rig"].values()))
    rows = [[m, t or "-", _fmt(labels["self_supervision/0"][m]), _fmt(labels["trivial_zeros"][m]),
             _fmt(labels["trivial_prior"][m]), _fmt(truth[m]), _fmt(floor[m])]
            for m, t in [(m, t) for m, t, _ in TARGETS] + [(m, "within 0.05 of the truth") for m in SEMANTIC]]
    t = d["timings_s"]
    return ["## Round-0 labels of a standard subject", "",
            "; ".join(f"`{c}`" for c in d["commands"]) + f". {d['frames']} frames, {len(d['cameras'])} cameras. "
            f"{d['load_note']}.", "",
            *_table(["metric", "target", "round 0", "trivial_zeros", "trivial_prior", "truth",
                     "truth through the chain's rig"], rows),
            "Seconds: " + ", ".join(f"{k[:-2]} {v:.0f}" for k, v in t.items()) +
            f"; total {sum(t.values()):.0f} s (target 1,200 s). Temporal smoothing (now default) applied to "
            "these labels offline: " + ", ".join(f"{k} {v}" for k, v in d["smoothed_offline_sigma_0.7"].items()) + ".", ""]


def placement_vs_labels_section(d: dict) -> list[str]:
    """Each camera's worth to round 0 against its placement scores (results/placement_vs_labels.json)."""
    from benchmarks.placement_vs_labels import markdown

    return ["## Camera placement against each camera's worth to the labels", "",
            "`python -m benchmarks.placement_vs_labels --selfsup " + " ".join(d["selfsup"]) +
            "` (docs/camera-placement.md, Part 3): a camera's worth is the round-0 metric without it "
            "minus with every camera (positive = it helps); correlations over the 10 cameras.", "",
            markdown(d), ""]
