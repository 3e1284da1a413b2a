"""Placement tables: per rig x camera x region, per camera's target regions, across rigs.

Every figure of a (camera, region) is one number per face (identity x donning offset);
tables give the population's mean and its 10th percentile (the worst faces matter).
A camera's *target* figures first average its target regions per face, then take the
population statistics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from stages.placement.scoring import PopulationScores

METRICS = ("v_cosine", "v_occluded", "coverage", "motion")
#: Column headers of the metrics in markdown tables.
METRIC_LABELS = {"v_cosine": "V cos", "v_occluded": "V occ", "coverage": "seen", "motion": "M px"}


@dataclass(frozen=True)
class Row:
    """One table row: a rig's camera over some regions.

    Attributes:
        rig: rig name.
        camera: camera name.
        regions: the region (or the "+"-joined target regions) the figures cover.
        mean: metric -> population mean.
        p10: metric -> population 10th percentile.
    """

    rig: str
    camera: str
    regions: str
    mean: dict[str, float]
    p10: dict[str, float]


def _stats(per_face: Mapping[str, np.ndarray]) -> tuple[dict[str, float], dict[str, float]]:
    """metric -> (N, D) per-face values  ->  (means, 10th percentiles)."""
    return ({k: float(v.mean()) for k, v in per_face.items()},
            {k: float(np.percentile(v, 10)) for k, v in per_face.items()})


def region_rows(rig: str, cameras: Sequence[str], region_names: Sequence[str], scores: PopulationScores,
                min_coverage: float = 0.0) -> list[Row]:
    """Rows per camera x region; regions whose mean coverage is <= ``min_coverage`` are left out.

    Args:
        cameras: the C camera names, in ``scores`` order.
    """
    rows = []
    for c, cam in enumerate(cameras):
        for r, region in enumerate(region_names):
            per_face = {k: getattr(scores, k)[c, :, :, r] for k in METRICS}
            if per_face["coverage"].mean() <= min_coverage:
                continue
            rows.append(Row(rig, cam, region, *_stats(per_face)))
    return rows


def target_rows(rig: str, cameras: Sequence[str], targets: Sequence[Sequence[str]],
                region_names: Sequence[str], scores: PopulationScores) -> list[Row]:
    """One row per camera over its target regions (per face: the mean over the targets)."""
    rows = []
    for c, (cam, regions) in enumerate(zip(cameras, targets, strict=True)):
        idx = [region_names.index(r) for r in regions]
        per_face = {k: getattr(scores, k)[c][:, :, idx].mean(-1) for k in METRICS}
        rows.append(Row(rig, cam, "+".join(regions), *_stats(per_face)))
    return rows


def markdown(rows: Sequence[Row], metrics: Sequence[str] = METRICS, with_rig: bool = False) -> str:
    """A markdown table: mean and p10 of each metric."""
    head = (["rig"] if with_rig else []) + ["camera", "regions"]
    for k in metrics:
        head += [f"{METRIC_LABELS[k]} mean", f"{METRIC_LABELS[k]} p10"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = ([row.rig] if with_rig else []) + [row.camera, row.regions]
        for k in metrics:
            digits = 1 if k == "motion" else 2
            cells += [f"{row.mean[k]:.{digits}f}", f"{row.p10[k]:.{digits}f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def comparison_markdown(rows_by_rig: Mapping[str, Sequence[Row]], metrics: Sequence[str] = ("v_occluded", "motion")) -> str:
    """Cameras as rows, rigs as column groups (target figures; "-" where a rig lacks the camera)."""
    rigs = list(rows_by_rig)
    cameras = list(dict.fromkeys(r.camera for rows in rows_by_rig.values() for r in rows))
    lookup = {(r.rig, r.camera): r for rows in rows_by_rig.values() for r in rows}
    head = ["camera"] + [f"{rig}: {METRIC_LABELS[k]} mean / p10" for rig in rigs for k in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cam in cameras:
        cells = [cam]
        for rig in rigs:
            row = lookup.get((rig, cam))
            for k in metrics:
                digits = 1 if k == "motion" else 3
                cells.append("-" if row is None else f"{row.mean[k]:.{digits}f} / {row.p10[k]:.{digits}f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def accuracy_correlation(placement_scores: Mapping[str, float], accuracy: Mapping[str, float]) -> dict[str, float]:
    """How well a per-camera placement score predicts a per-camera accuracy figure.

    Args:
        placement_scores: camera -> score (higher = better placed, e.g. V occ mean).
        accuracy: camera -> accuracy figure; use one where higher is better (negate an error).

    Returns:
        {"cameras": n, "pearson": r, "spearman": rho} over the cameras in both (NaN when
        fewer than 3 cameras are shared or either side is constant).
    """
    from scipy import stats

    shared = sorted(set(placement_scores) & set(accuracy))
    x = np.array([placement_scores[c] for c in shared], float)
    y = np.array([accuracy[c] for c in shared], float)
    if len(shared) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"cameras": len(shared), "pearson": float("nan"), "spearman": float("nan")}
    return {"cameras": len(shared), "pearson": float(stats.pearsonr(x, y)[0]),
            "spearman": float(stats.spearmanr(x, y)[0])}
