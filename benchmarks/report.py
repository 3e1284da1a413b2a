"""Builds ``docs/benchmarks.md`` from ``benchmarks/results/*.json``.

Run: ``python -m benchmarks.report``. Every number in the page comes from a result file
that a benchmark command wrote; the page says which command.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PAGE = Path(__file__).parents[1] / "docs" / "benchmarks.md"


def _load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def synth_section(d: dict) -> list[str]:
    rows = [[p["preset"], p["subjects"], f"{p['median_seconds']:.1f}", f"{p['median_capture_bytes'] / 1e6:.1f}",
             f"{p['capture_files']:.0f}", f"{p['median_truth_bytes'] / 1e6:.1f}"] for p in d["presets"]]
    return ["## Synthetic subjects", "",
            "`python -m benchmarks.bench_synth --standard 1 --tiny 3`: seconds and disk bytes per subject "
            "(median over the subjects generated), on this machine "
            f"({d['machine']['cpus']} CPUs), one process per subject. Subjects are independent: "
            "`pgt synth --workers N` generates N at once. A `standard` subject is 60 prompts x 4 RGBD "
            "frames at 480 x 640 and ~66 s of 10-camera 400 x 400 HMC video (19,800 images); its sensor "
            "noise keeps PNGs near raw size.", "",
            *_table(["preset", "subjects", "s / subject", "capture MB / subject", "files / subject", "truth MB / subject"], rows)]


def landmarks_section(d: dict) -> list[str]:
    rows = [[r["subject"], r["frames"], r["found"], f"{r['mean_px']:.2f}", f"{r['median_px']:.2f}",
             f"{r['median_mm']:.2f}", f"{r['p90_mm']:.2f}", f"{r['seconds_per_frame']:.3f}"] for r in d["subjects"]]
    return ["## Landmark stage against ground truth", "",
            f"`python -m benchmarks.bench_landmarks {d['data']}`: the `landmarks` stage (MediaPipe face mesh) "
            "on `standard` phone frames, compared with the true 2D positions of the 478 embedded landmarks "
            "(visible ones). Millimetres convert each pixel error at the landmark's depth.", "",
            *_table(["subject", "frames", "faces found", "mean px", "median px", "median mm", "p90 mm", "s / frame"], rows)]


def face_model_section(d: dict) -> list[str]:
    rows = [[name, c["frames_desc"], f"{c['found']}/{c['frames']}", f"{c['mean_px']:.2f}", f"{c['median_px']:.2f}",
             f"{c['median_mm']:.2f}", f"{c['p90_mm']:.2f}"] for name, c in d["cases"].items()]
    return ["## Landmark embedding against MediaPipe", "",
            f"`{d['command']}`: MediaPipe's detections on synthetic phone renders (photo texture) against the "
            "projections of the 478 embedded landmarks (visible ones), pixels and millimetres on the face "
            "(each pixel error at the landmark's depth). Quoted by docs/face-model.md.", "",
            *_table(["case", "frames", "found", "mean px", "median px", "median mm", "p90 mm"], rows)]


def orchestration_section(d: dict) -> list[str]:
    cols = ["label", "units", "fingerprint_s", "plan_s", "execute_s", "total_s", "per_task_ms",
            "scheduler_rss_before_mb", "scheduler_rss_peak_mb"]
    rows = [[int(r[c]) if c == "units" else r.get(c) for c in cols] for r in d.get("medians", d["runs"])]
    return ["## Orchestration overhead", "",
            f"`python -m benchmarks.bench_orchestration --repeats {d.get('repeats', 1)}`: {d['subjects']:,} subjects through "
            "two trivial per-subject stages and one dataset barrier "
            f"({2 * d['subjects'] + 1:,} units), {d['workers']} worker processes on {d['cpus']} CPUs. "
            "`plan_s` is the graph build (content keys, cache checks, submission); `per_task_ms` is execution "
            "wall time per task, storage commits included; the cached row is a rerun over the same output, "
            "the baseline that shows what resuming costs. The scheduler runs in the driver process, so its "
            "memory includes the driver.", "",
            *_table(cols, rows)]


def scaling_section(d: dict) -> list[str]:
    rows = [[w, f"{r['median_seconds']:.1f}", f"{r['subjects_per_minute']:.1f}"] for w, r in d["workers"].items()]
    return ["## Scaling: 1 against 2 workers", "",
            f"`python -m benchmarks.bench_scaling --subjects {d['subjects']} --repeats {d['repeats']}`: the real chain "
            f"({' + '.join(d['stages'])}) on {d['subjects']} `tiny` subjects, a fresh output each repeat; "
            "medians of the repeats.", "",
            *_table(["workers", "median s", "subjects / min"], rows),
            f"Throughput ratio, 2 workers / 1 worker: **{d['throughput_ratio_2_over_1']:.2f}**. The machine has "
            "2 CPUs, which the two workers share with the driver (planning, Delta publishing and compaction) "
            "and the scheduler, and each `tiny` subject spends part of its time loading MediaPipe's models.", ""]


def label_table_section(d: dict) -> list[str]:
    c = d["config"]

    def row(name: str, r: dict) -> list[object]:
        cc = r["concurrent"]
        return [name, f"{r['replace_median_ms']:,.0f}", f"{cc['conflicts']}", f"{cc['wall_s']:.1f}",
                f"{r['read_one_median_ms']:.0f}", f"{r['full_scan_median_s']:.1f}", r["data_files"],
                f"{r['maintenance_s']:.0f}"]

    header = ["layout", "replace 1 subject ms", "conflicts (2 writers)", "2-writer wall s",
              "read 1 subject ms", "full scan s", "data files", "compaction s"]
    head = d["headline"]
    ratios = d["headline_ratios_old_over_new"]
    dv = d["deletion_vectors"]
    load = d["machine"]
    out = ["## Label table", "",
           f"`python -m benchmarks.bench_label_table`: tables of {c['frames']:,} HMC time steps per subject "
           f"(the `standard` preset: {c['recordings']} recordings of {c['frames'] // c['recordings']} frames) x "
           f"{c['blendshapes']} blendshapes, appended {c['batch']} subjects per commit in two commits (so each "
           "subject starts in two files), then COMPACTED by the layout's maintenance, as after a labelling run. "
           f"Replace = one `write_subject_round`-style relabel of one subject, fresh handle (table open included), "
           f"median of {c['replace_repeats']} subjects. 2 writers = two processes released together, each "
           f"relabelling {c['concurrent']} different subjects (pairs that share a hash bucket, the worst case of the "
           "bucket layout); conflicts = commits retried after losing a race. Read 1 subject: median of "
           f"{c['read_repeats']}; full scan: median of {c['scans']}. Measured on a shared 2-CPU VM while other jobs "
           f"ran (load average {load['load_avg_start'][0]:.1f} at the start, {load['load_avg_end'][0]:.1f} at the end): "
           "read the ratios, not the absolute times.", "",
           f"On a compacted {c['subjects']:,}-subject table ({c['subjects'] * c['frames'] / 1e6:.1f} M rows), the "
           "old layout against the product's, in the same run:", "",
           *_table(header, [row(head[k]["layout"]["name"], head[k]) for k in ("old", "product")]),
           f"Old / new: replace **{ratios['replace_median_ms']:.0f}x** faster, two writers "
           f"**{ratios['concurrent_wall_s']:.0f}x** faster, read of one subject {ratios['read_one_median_ms']:.2f}x, "
           f"full scan {ratios['full_scan_median_s']:.2f}x (below 1: the new layout is slower).", "",
           f"The options, on {c['options_subjects']:,} subjects (measured with `--skip-headline` right after the "
           "headline run, same code):", "",
           *_table(header, [row(r["layout"]["name"], r) for r in d["options"].values()]),
           f"Deletion vectors: with `delta.enableDeletionVectors` set, deltalake {dv['deltalake']} still deletes "
           f"rows by rewriting the file (a delete of 100 of 1,000 rows copied {dv['delete_metrics']['num_copied_rows']} "
           f"rows; {dv['deletion_vectors_in_table']} deletion vectors in the table), so they do not help here.", ""]
    sp = d.get("scan_paths")
    if sp:
        rows = [[codec, f"{sp[f'{codec}/pyarrow_dataset_median_s']:.2f}", f"{sp[f'{codec}/delta_rs_engine_median_s']:.2f}",
                 f"{sp[f'{codec}/bytes_on_disk'] / 1e6:.0f}"] for codec in ("ZSTD", "LZ4_RAW")]
        out += [f"Full scan of a {sp['subjects']}-subject table with one file per subject ({sp['frames']:,} rows each), "
                "median s: pyarrow's dataset reader against delta-rs's engine, which `storage.delta.read_rows` uses "
                "for whole-table reads, for both codecs:", "",
                *_table(["codec", "pyarrow dataset s", "delta-rs engine s", "MB on disk"], rows)]
    return out


def _mm(v: object, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


#: Columns of the per-subject error decomposition (stages/error_decomposition.py).
DECOMPOSITION = (("all mm", "all_mm"), ("uncovered share", "uncovered_share"), ("covered, normal mm", "covered_normal_mm"),
                 ("covered, along: common mm", "covered_along_common_mm"),
                 ("covered, along: per expression mm", "covered_along_per_expression_mm"),
                 ("gain, perfect normal", "ceiling_normal"), ("+ per expression", "ceiling_normal_per_expression"),
                 ("gain, all covered error", "ceiling_covered"))


def _decomposition_table(d: dict) -> list[str]:
    """The error decomposition per subject and stage (rigid alignment), or nothing."""
    rows = [[sid, stage, *(_mm(v.get(k)) for _, k in DECOMPOSITION)]
            for sid, e in d.get("per_subject", {}).items()
            for stage, v in (e.get("decomposition") or {}).items() if v]
    if not rows:
        return []
    return ["The same error after the rigid alignment of the targets (`stages/error_decomposition.py`): the "
            "along-surface part on covered vertices split into its mean over the subject's expressions (common: an "
            "identity-level slide) and the rest (per expression), and the gains ideal corrections would give "
            "(removing the covered off-surface part; also the per-expression slide; all covered error):", "",
            *_table(["subject", "stage", *(c for c, _ in DECOMPOSITION)], rows)]


def phone_chain_section(d: dict) -> list[str]:
    """The issue-7 table, seconds per stage and the ablations (benchmarks/bench_phone_chain.py)."""

    def shown(f: dict) -> str:
        v = f["measured"]
        if v is None:
            return "not measured"
        return f"{100 * v:.0f} %" if f["key"] == "refinement_gain" else f"{v:.2f}" if "mm" in f["key"] else f"{v:.0f}"

    met = {True: "yes", False: "**no**", None: "n/a"}
    h = d["headline"]
    out = ["## Phone-scan geometry chain (issue 7)", "",
           f"`{d['command']}`: the chain {' -> '.join(d['stages'])} through the engine "
           f"({d['workers']} worker processes, {d['machine']['cpus']} CPUs, load average "
           f"{d['machine']['load_avg_start'][0]:.1f} at the start, shared with other jobs) on "
           f"{len(d['subjects'])} phone-only `standard` subjects ({', '.join(d['subjects'])}), scored against the "
           "truth on the face region (the face model's 7,801 `fitting_vertices`; `stages/geometry_eval.py`). "
           f"{h['expressions_fused']} expressions fused, {h['expressions_refined']} refined. Fused scan: median over "
           "the expressions of each one's median scan-to-true-surface distance. Neutral: median over subjects. "
           "Per-vertex errors after a rigid (Kabsch, no scale) alignment over the face region. Floor: the error "
           "left by the best fit inside the face model's identity and expression spaces (least squares, weights in "
           "[0, 1]; `geometry_eval.linear_space_floor`), which only the refinement can go below. Wall per subject: "
           "the sum of its stages' wall seconds (they run one after the other in one worker; the other worker "
           "takes another subject).", "",
           *_table(["figure", "target", "measured", "met?", "floor"],
                   [[f["figure"], f["target"], shown(f), met[f["met"]], _mm(f.get("floor"))] for f in d["figures"]])]
    if d.get("failures"):
        out += ["Failures: " + "; ".join(d["failures"]), ""]
    split = []
    for stage in ("fit", "refine"):
        recs = [r for e in d.get("per_subject", {}).values() if isinstance(e, dict) for r in e.get(stage, [])
                if r.get("covered_fraction") is not None]
        if recs:
            def avg(k: str, recs: list = recs) -> str:
                vals = [r[k] for r in recs if r.get(k) is not None]
                return _mm(sum(vals) / len(vals)) if vals else "n/a"
            split.append([stage, len(recs), avg("estimated_mean_mm"), avg("covered_fraction"), avg("covered_mean_mm"),
                          avg("covered_normal_mm"), avg("covered_tangential_mm"), avg("uncovered_mean_mm")])
    if split:
        out += ["Where the per-vertex error comes from (`geometry_eval.coverage_split`, as estimated: each mesh placed "
                "by its own pose in the reference camera, no alignment; means over all expressions): face-region vertices "
                "the fused scan covers (a scan vertex within 1.5 mm of the true vertex) against the rest, and on the "
                "covered ones the error's component along the true normal (off the surface) and across it (sliding "
                "along the surface):", "",
                *_table(["stage", "expressions", "all mm", "covered fraction", "covered mm", "covered, normal mm",
                         "covered, tangential mm", "uncovered mm"], split)]
    out += _decomposition_table(d)
    cpu = d.get("cpu_seconds_per_stage", {})
    rows = []
    for st, v in d["seconds_per_stage"].items():
        c = cpu.get(st, {}).get("median_s")
        rows.append([st, f"{v['median_s']:.1f}", _mm(c, 1)]
                    + [f"{v['per_subject_s'].get(s, float('nan')):.1f}" for s in d["subjects"]])
    cpu_chain = [sum(c["per_subject_s"].get(s, 0.0) for c in cpu.values()) for s in d["subjects"]] if cpu else []
    rows.append(["chain", f"{statistics.median(d['chain_seconds_per_subject'].values()):.1f}",
                 _mm(statistics.median(cpu_chain), 1) if cpu_chain else "n/a"]
                + [f"{d['chain_seconds_per_subject'][s]:.1f}" for s in d["subjects"]])
    out += ["Seconds per stage: wall (stage function + commit, from the run's stage log) and the worker "
            "process's CPU seconds in the stage function; medians over subjects, then wall per subject. On a "
            "machine shared with other jobs the CPU seconds are the steadier figure.", "",
            *_table(["stage", "median wall s", "median CPU s", *[f"wall s {s}" for s in d["subjects"]]], rows)]
    probe = d.get("poisson_probe") or []
    if probe:
        out += ["Fusion's cost against its Poisson octree depth (`fusion.poisson_depth`, default 9): the first "
                "expressions of the first subject re-fused in the driver from the run's landmarks and masks, "
                "scored like the fused-scan row above:", "",
                *_table(["expression", "depth", "CPU s", "vertices", "median mm", "p90 mm"],
                        [[r["expression"], r["poisson_depth"], f"{r['cpu_s']:.1f}", f"{r['vertices']:,}",
                          _mm(r.get("median_mm"), 3), _mm(r.get("p90_mm"), 3)] for r in probe])]
    out += ["Why targets are missed, measured: [phone-accuracy.md](phone-accuracy.md#what-the-benchmark-found).", ""]
    for name, a in d.get("ablations", {}).items():
        title = {"landmark_init": "Ablation: no landmark initialisation, bursts with large head turns (yaw +-40, pitch +-20 deg)",
                 "l2_flying_pixels": "Ablation: plain L2 distance instead of the robust term, flying pixels present "
                                     "(face mask depth-edge test off)"}.get(name, name)
        out += [f"{title}: {len(a['subjects'])} subjects of `{a['data']}`, chain up to `fit`.", ""]
        if a.get("skipped"):
            out += [f"Not run: {a['skipped']}", ""]
            continue
        vrows = []
        for label, v in a["variants"].items():
            if v.get("skipped"):
                vrows.append([label, f"not run: {v['skipped']}", "", "", "", "", ""])
                continue
            vrows.append([label, v["expressions_fitted"], v["rejected"], _mm(v["rigid_mean_mm"]), _mm(v["estimated_mean_mm"]),
                          _mm(v["worst_expression_rigid_mean_mm"]), v["expressions_over_3mm"]])
        out += _table(["variant", "expressions fitted", "rejected", "per-vertex mean mm (rigid)",
                       "per-vertex mean mm (as estimated)", "worst expression mm", "expressions > 3 mm"], vrows)
    return out


def rigging_speed_section(d: dict) -> list[str]:
    rows = []
    for r in d["runs"]:
        case = d["cases"][r["case"]]
        steps = r["step_cpu_s"]
        rows.append([f"{r['vertices']:,} v, {r['shapes']} shapes, {r['poses']} poses", r["stop"], r["iterations"],
                     f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['peak_mb']:.0f}",
                     f"{case['peer']['wall_s']} / {case['peer']['cpu_s']} / {case['peer']['peak_gb'] * 1024:.0f}",
                     f"{case['target_wall_s']}", f"{r['setup']['setup_cpu_s']:.1f}",
                     f"{steps['gradient_step']:.1f} / {steps['vertex_step']:.1f} / {steps['weight_step']:.1f}",
                     f"{r['basis_error_mm']['transfer']:.3f} / {r['basis_error_mm']['example_based']:.3f}"])
    return ["## Example-based rigging speed", "",
            f"`{d['command']}`: example-based rigging (rigs/example_rig.py) at the C++ peer's problem sizes, cut "
            "from the ICT template (see the module docstring for the synthetic truth); each run in a fresh "
            "child process, peak memory its VmHWM. `peer` = kyle-gh/ExampleBasedFacialRigging on 2 threads, "
            "always 10 iterations: wall s / CPU s / MiB. Steps = CPU s summed over the iterations (gradient / "
            "vertex / weight). The machine is shared with other jobs: read CPU seconds. Basis error = mean "
            "per-vertex mm over the vertices each true basis moves >= 0.5 mm (transfer / example-based).", "",
            *_table(["problem", "stop", "iterations", "wall s", "CPU s", "peak MiB", "peer wall / CPU / MiB",
                     "target wall s", "setup CPU s", "steps CPU s", "basis error mm"], rows)]


def rig_accuracy_section(d: dict) -> list[str]:
    def mm(v: list[float]) -> str:
        return f"{_nanmean(v):.3f} / {_nanmedian(v):.3f}"

    rows = []
    for s in d["subjects"]:
        b, h, w, r = s["basis_error_mm"], s["held_out_fit"], s["weights_mad"], s["run"]
        held = {m: statistics.fmean(h[m]["residual_mean_mm"]) for m in h}
        rows.append([s["subject"], mm(b["generic"]), mm(b["transfer"]), mm(b["example_based"]), mm(b["known_weights"]),
                     f"{held['transfer']:.3f} / {held['example_based']:.3f} / {held['true']:.4f}",
                     f"{w['prior']['all']:.3f} / {w['prior']['prior_active']:.3f}",
                     f"{w['example_based']['all']:.3f} / {w['example_based']['prior_active']:.3f}",
                     f"{r['iterations']} ({'yes' if r['converged'] else 'no'})", f"{r['cpu_s']:.0f} / {r['wall_s']:.0f}",
                     _rejected_prompts(r.get("rejected", ""))])
    t = d["summary"]
    basis, held = t["basis_error_mm"], t["held_out_mm"]
    better = min(basis["generic"]["mean"], basis["transfer"]["mean"])
    targets = [["per-basis error, mean over subjects' bases (mm)",
                f"{basis['example_based']['mean']:.3f} vs better of copy {basis['generic']['mean']:.3f} / "
                f"transfer {basis['transfer']['mean']:.3f}", f"{t['basis_ratio_to_better']:.2f}", "<= 0.6",
                "met" if basis["example_based"]["mean"] <= 0.6 * better else "not met"],
               ["held-out residual (mm)", f"{held['example_based']:.3f} vs transfer {held['transfer']:.3f}",
                f"{t['held_out_ratio_to_transfer']:.2f}", "<= 0.8",
                "met" if t["held_out_ratio_to_transfer"] <= 0.8 else "not met"]]
    chain = d.get("source") == "chain"
    title = "phone chain's meshes" if chain else "true meshes"
    examples = ("the phone chain's refined meshes of their prompts (the `refine` artifacts of a `pgt label` run)"
                if chain else "their 60 phone prompts' true meshes (head frame)")
    return [f"## Example-based rigging accuracy ({title})", "",
            f"`{d['command']}`: the `rig` stage's default config on `standard` subjects of seed {d['seed']}, "
            f"on {examples}, against the true personal rig "
            "(benchmarks/bench_rig_accuracy.py). Basis error: per regressed basis, mean per-vertex mm over "
            "the vertices the true basis moves >= 0.5 mm; mean / median over the 45 bases. Known weights: "
            "the true weights as a trusted prior (gamma 100). Held-out: 10 of 60 examples (every 6th) "
            "held out, rig built from 50, bounded least-squares fit of each held-out mesh over the "
            "fitting vertices, mean per-vertex residual (transfer / example-based / true rig). Weights: "
            "mean |w - true| over all (example, shape) pairs / over those active in the art prior. "
            "CPU = process time (all threads), on the shared 2-CPU VM. Where the rig's prior-contradiction "
            "check rejects the true meshes, the rig is rebuilt with it off and the CPU / wall s cover both "
            "builds; the figures are the rebuilt rig's." + ("" if chain else " The phone chain's half: the next "
                                                             "section."), "",
            *_table(["subject", "copy mm", "transfer mm", "example-based mm", "known weights mm",
                     "held-out mm", "prior weight MAD", "recovered weight MAD", "iterations (converged)",
                     "CPU / wall s", "stage's prior check"], rows),
            *_table(["figure", "measured", "ratio", "target", ""], targets)]


def placement_section(d: dict) -> list[str]:
    row = [", ".join(d["rigs"]), d["cameras"], f"{d['identities']} x {d['expressions']} (+ neutral) x {d['donnings']}",
           f"{d['posed_faces']:,}", f"{d['scored_views']:,}", d["sample_points"], f"{d['wall_s']:.0f}", f"{d['cpu_s']:.0f}",
           f"{1e3 * d['cpu_s'] / d['posed_faces']:.1f}", f"{d['peak_rss_mb']:.0f}"]
    return ["## Camera-placement scoring", "",
            f"`{d['command']}`: `pgt placement`'s scoring (docs/camera-placement.md) with occlusion: every posed "
            "face is ray-cast by every camera at every donning offset (one Open3D BVH per posed face, its rays "
            "batched over cameras x donnings). CPU = process time (all threads) on the shared 2-CPU VM "
            f"(1-minute load {d['load_1min_after']:.1f} at the end): read CPU seconds.", "",
            *_table(["rigs", "cameras", "identities x expressions x donnings", "posed faces",
                     "camera views scored", "sample points", "wall s", "CPU s", "CPU ms / posed face",
                     "peak MiB"], [row])]


def _rejected_prompts(message: str) -> str:
    """'passed', or the prompts a prior-contradiction message names."""
    if not message:
        return "passed"
    parts = message.split(": ", 1)[-1].split("; ")
    return "rejected: " + ", ".join(p.split(" (")[0] for p in parts)


def _nanmean(v: list[float]) -> float:
    return statistics.fmean(x for x in v if x == x)


def _nanmedian(v: list[float]) -> float:
    return statistics.median(x for x in v if x == x)


def dashboard_section(d: dict) -> list[str]:
    rows = [[c["case"], f"{c['report_bytes'] / 1e6:.1f}", f"{c['report_seconds']:.1f}", f"{c['report_cpu_seconds']:.1f}",
             c["recordings_embedded"], c["frames_embedded"], f"{c['served_load_seconds']:.1f}",
             "-" if c["served_open_recording_seconds"] is None else f"{c['served_open_recording_seconds']:.1f}",
             f"{c['replicate_seconds']:.0f}" if "replicate_seconds" in c else "-"] for c in d["cases"]]
    return ["## QA report and dashboard", "",
            f"`{d['command']}`: the offline report's size and build time, and the served dashboard's page "
            "load in headless chromium (until the dataset table shows) and the time to open a recording with "
            "its frame overlay. Label tables: the stand-in labeller of tests/dashboard_data.py; a replicated "
            "case copies 3 tiny subjects' label and metrics rows under new ids, with capture folders of hard "
            "links (docs/qa-report.md; 'making it' is that copy). Wall seconds on the shared, loaded machine; "
            "CPU seconds beside the build.", "",
            *_table(["case", "report MB", "build s", "build CPU s", "recordings embedded", "frames embedded",
                     "page load s", "open recording s", "making it s"], rows)]


def main() -> None:
    from benchmarks.report_labels import (
        placement_vs_labels_section,
        rig_keypoints_section,
        selfsup_section,
        selfsup_standard_section,
    )

    def titled(title: str):
        return lambda d: selfsup_section(d, title)

    lines = ["# Benchmarks", "",
             "Generated by `python -m benchmarks.report` from `benchmarks/results/*.json`; each section "
             "names the command that produced its numbers. Machine: the project's 2-CPU, 24 GiB "
             "development VM, no GPU.", ""]
    for name, section in (("synth", synth_section), ("landmarks", landmarks_section), ("face_model", face_model_section),
                          ("orchestration", orchestration_section), ("scaling", scaling_section),
                          ("label_table", label_table_section), ("phone_chain", phone_chain_section),
                          ("rigging_speed", rigging_speed_section), ("rig_accuracy", rig_accuracy_section),
                          ("rig_accuracy_chain", rig_accuracy_section),
                          ("selfsup", selfsup_section),
                          ("selfsup_tiny_defaults", titled("Round-0 labels, this session's defaults (tiny)")),
                          ("selfsup_alt", titled("Round-0 labels on the generator's alt variant (tiny)")),
                          ("selfsup_tiny_prefit300_kpwarmup600_300", titled(
                              "Round-0 labels with the per-frame keypoint prefit (tiny; 300 prefit steps, 600 + 300)")),
                          ("selfsup_tiny_kpwarmup600_300", titled("Round-0 labels with the keypoint warm-up "
                                                                  "(tiny; 600 warm-up + 300 whole steps)")),
                          ("selfsup_alt_kpwarmup600_300", titled("Round-0 labels with the keypoint warm-up on "
                                                                 "the alt variant (tiny; 600 + 300 steps)")),
                          ("selfsup_standard", lambda d: selfsup_standard_section(
                              d, "Round-0 labels of standard subjects, 1,000 keypoint warm-up + 600 whole steps "
                                 "(the fourth session's default)")),
                          ("selfsup_standard_1500", lambda d: selfsup_standard_section(
                              d, "Round-0 labels of a standard subject, the earlier default (1,500 whole steps, "
                                 "no warm-up)")),
                          ("selfsup_standard_kpwarmup3000_600", lambda d: selfsup_standard_section(
                              d, "Round-0 labels of standard subjects, 3,000 keypoint warm-up + 600 whole steps (the default)")),
                          ("selfsup_standard_prefit", lambda d: selfsup_standard_section(
                              d, "Round-0 labels of standard subjects with the per-frame keypoint prefit (300 steps; 1,000 + 600)")),
                          ("rig_keypoints_standard", rig_keypoints_section),
                          ("selfsup_standard_650", titled("Round-0 labels of the standard subject in 650 steps "
                                                          "(what fits the 20-minute budget)")),
                          ("placement", placement_section),
                          ("placement_vs_labels", placement_vs_labels_section),
                          ("dashboard", dashboard_section)):
        data = _load(name)
        lines += section(data) if data else [f"## {name}", "", "not measured yet", ""]
    PAGE.write_text("\n".join(lines).rstrip() + "\n")
    print(f"wrote {PAGE}")


if __name__ == "__main__":
    main()
