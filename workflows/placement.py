"""``pgt placement``: score headset rigs over a population of faces, compare them, search.

Writes into ``out``:

* ``<rig>.md``: the rig's table per camera x region (regions a camera never sees left
  out) and per camera over its target regions; mean and 10th percentile over the faces;
* ``comparison.md``: the rigs side by side (target figures; first rig = reference);
* ``placement.json``: every figure, the population and the settings;
* ``<rig>_heat.png``: each camera's view with visibility as a heat map (``pictures``);
* ``search.md`` / in ``placement.json``: the placement search of one camera of the first
  rig, when asked (score on the search's faces and on a fresh population).

See docs/camera-placement.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError
from stages.placement.population import Population, PopulationConfig
from stages.placement.regions import template_regions
from stages.placement.rigfile import PlacementRig, load_placement_rig
from stages.placement.scoring import ScoreConfig, score_cameras
from stages.placement.search import SearchConfig, search_camera, weighted_scores
from stages.placement.tables import comparison_markdown, markdown, region_rows, target_rows


@dataclass(frozen=True)
class PlacementJob:
    """One ``pgt placement`` run.

    Attributes:
        rigs: placement rig files (the first is the comparison's reference).
        out: output folder.
        population: the faces.
        scoring: occlusion options.
        samples_per_region: sample points (and keypoints) per region.
        pictures: write the heat-map pictures.
        search_camera: camera of the first rig to search a placement for ("" = no search).
        search: the search's feasible set and objective.
        search_population: the (smaller) population the search optimises over; the result
            is then rescored on ``population``.
    """

    rigs: Sequence[str | Path]
    out: str | Path
    population: PopulationConfig = PopulationConfig()
    scoring: ScoreConfig = ScoreConfig()
    samples_per_region: int = 64
    pictures: bool = True
    search_camera: str = ""
    search: SearchConfig = SearchConfig()
    search_population: PopulationConfig = field(
        default_factory=lambda: PopulationConfig(identities=6, max_expressions=12, donnings=3, seed=1))


def run_placement(job: PlacementJob, log=print) -> dict:
    """Runs ``job``; returns what ``placement.json`` holds."""
    from rigs.definition import load_default_rig_definition
    from rigs.face_model import load_ict_face_model

    rigs = [load_placement_rig(p) for p in job.rigs]
    if len({r.name for r in rigs}) != len(rigs):
        raise ConfigError("placement: two rig files have the same name (file stem)")
    model, definition = load_ict_face_model(), load_default_rig_definition()
    regions = template_regions(model, job.samples_per_region)
    population = Population.build(job.population, model, definition, regions)
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    names, cams, proxies, owner = [], [], [], []
    for rig in rigs:
        proxy = rig.proxy_mesh()
        for name, cam in rig.cameras().items():
            names.append(name), cams.append(cam), proxies.append(proxy), owner.append(rig)
    log(f"scoring {len(rigs)} rig(s), {len(cams)} cameras over {population.size[0]} identities x "
        f"{population.size[1]} expressions x {population.size[2]} donnings")
    wall, cpu = time.perf_counter(), time.process_time()
    scores = score_cameras(cams, population, job.scoring, proxies)
    timing = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    result: dict = {"population": asdict(job.population), "scoring": asdict(job.scoring),
                    "expressions": list(population.expression_names), "regions": regions.counts(),
                    "timing": timing, "rigs": {}}
    rows_by_rig = {}
    for rig in rigs:
        idx = [k for k, o in enumerate(owner) if o is rig]
        sub = _select(scores, idx)
        cam_names = [names[k] for k in idx]
        per_region = region_rows(rig.name, cam_names, regions.names, sub)
        per_target = target_rows(rig.name, cam_names, [rig.target_regions(n) for n in cam_names], regions.names, sub)
        rows_by_rig[rig.name] = per_target
        (out / f"{rig.name}.md").write_text(
            f"# Placement scores: {rig.name}\n\n## Per camera, target regions\n\n{markdown(per_target)}\n"
            f"## Per camera and region\n\n{markdown(per_region)}")
        result["rigs"][rig.name] = {"targets": [asdict(r) for r in per_target], "regions": [asdict(r) for r in per_region]}
        if job.pictures:
            from stages.placement.pictures import write_heat_mosaic

            write_heat_mosaic(out / f"{rig.name}_heat.png", cam_names, [cams[k] for k in idx], population,
                              sub.point_weight, f"{rig.name}: V occ weight per point, population mean")
    (out / "comparison.md").write_text(comparison_markdown(rows_by_rig))
    if job.search_camera:
        result["search"] = _run_search(job, rigs[0], model, definition, regions, population, log)
        (out / "search.md").write_text(_search_markdown(result["search"]))
    (out / "placement.json").write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")
    log(f"wrote {out} ({timing['wall_s']:.1f} s wall, {timing['cpu_s']:.1f} CPU-s scoring)")
    return result


def _select(scores, idx: list[int]):
    return type(scores)(**{k: getattr(scores, k)[idx] for k in scores.__dataclass_fields__})


def _jsonable(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"not JSON: {type(value)}")


def _run_search(job: PlacementJob, rig: PlacementRig, model, definition, regions, population: Population, log) -> dict:
    cams = rig.cameras()
    if job.search_camera not in cams:
        raise ConfigError(f"placement search: rig {rig.name} has no camera {job.search_camera!r} ({', '.join(cams)})")
    weights = dict(job.search.weights) or {r: 1.0 for r in rig.target_regions(job.search_camera)}
    faces = Population.build(job.search_population, model, definition, regions, keep_scenes=True)
    log(f"searching {job.search_camera} over {faces.size[0]} x {faces.size[1]} x {faces.size[2]} faces, "
        f"weights {weights}")
    wall, cpu = time.perf_counter(), time.process_time()
    found = search_camera(cams[job.search_camera], faces, weights, job.search, job.scoring, rig.proxy_mesh())
    timing = {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}
    config = replace(job.search, weights=weights)
    start, best = weighted_scores([found.start, found.best], population, weights, config, job.scoring, rig.proxy_mesh())
    fresh = {"start": start, "best": best}
    return {"camera": job.search_camera, "weights": weights, "config": asdict(config),
            "search_population": asdict(job.search_population), "evaluations": found.evaluations,
            "search_faces": {"start": found.start_score, "best": found.best_score},
            "scoring_faces": fresh, "offset_mm": found.offset_mm, "turn_deg": found.turn_deg,
            "best_position_m": found.best.t_world_from_camera, "best_rotation": found.best.R_world_from_camera,
            "history": found.history, "timing": timing}


def _search_markdown(s: dict) -> str:
    rel = lambda a, b: f"{100 * (b - a) / abs(a):+.1f} %" if a else "n/a"  # noqa: E731
    return (
        f"# Placement search: {s['camera']}\n\nweights {s['weights']}, box +-{s['config']['box_mm']} mm, "
        f"cone {s['config']['cone_deg']} deg, motion weight {s['config']['motion_weight']} / px, "
        f"{s['evaluations']} evaluations ({s['timing']['wall_s']:.0f} s wall, {s['timing']['cpu_s']:.0f} CPU-s)\n\n"
        "| faces | start score | best score | change |\n|---|---|---|---|\n"
        f"| search population | {s['search_faces']['start']:.4f} | {s['search_faces']['best']:.4f} | "
        f"{rel(s['search_faces']['start'], s['search_faces']['best'])} |\n"
        f"| scoring population | {s['scoring_faces']['start']:.4f} | {s['scoring_faces']['best']:.4f} | "
        f"{rel(s['scoring_faces']['start'], s['scoring_faces']['best'])} |\n\n"
        f"moved {np.round(s['offset_mm'], 1).tolist()} mm (headset x, y, z), axis turned {s['turn_deg']:.1f} deg\n"
    )
