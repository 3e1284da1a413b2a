"""A picture of a synthetic subject's true personal rig against the generic rig.

One row per shape (a smile, jaw open, a brow raise, an eye blink), each at full activation
on the subject's neutral: the generic deltas copied unchanged | the true personal rig |
the true rig coloured by its per-vertex distance from the generic copy | from
deformation transfer alone (mm, colour bar). Run::

    python -m workflows.rig_figures OUT [--seed 1000] [--index 0] [--shapes mouthSmile_L,...]

writes ``OUT/true_rig_shapes.png``. The subject is ``make_subject`` of the (seed, index)
stream, i.e. the rig of ``pgt synth --seed SEED`` subject ``index``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from rigs.camera import Camera
from rigs.definition import load_default_rig_definition
from rigs.face_model import load_ict_face_model
from rigs.rig import BlendshapeRig
from stages.synthesis.personal_rig import base_deltas
from stages.synthesis.subject import make_subject
from workflows.phone_figures import _save, beside, colour_bar, error_colours, shaded

SHAPES = ("mouthSmile_L", "jawOpen", "browInnerUp_L", "eyeBlink_L")
#: Colour scale of the difference maps, mm.
VMAX_MM = 3.0


def shape_row(name: str, neutral: np.ndarray, shown: tuple[tuple[str, np.ndarray], ...], true: np.ndarray,
              compared: tuple[tuple[str, np.ndarray], ...], model, width: int = 300) -> np.ndarray:
    """One shape at full activation: each shown rig | the true rig coloured by its per-vertex
    distance from each compared rig (mean over the vertices it moves >= 0.5 mm) | colour bar.

    Args:
        neutral: (n, 3) the subject's neutral.
        shown: (label, (n, 3) deltas) drawn shaded, before the true rig.
        true: (n, 3) the shape's true deltas.
        compared: (label, (n, 3) deltas) whose distance from ``true`` is coloured.
    """
    region = model.part_vertices("face")
    centre = neutral[region].mean(0)
    camera = Camera.look_at(centre + np.array([0.0, 0.0, 0.5]), centre, np.array([0.0, 1.0, 0.0]),
                            width=width, height=int(width * 1.2), focal=2.0 * width)
    tiles, labels = [], []
    for label, deltas in (*shown, ("true personal rig", true)):
        tiles.append(shaded(neutral + deltas, model.triangles, camera)[0])
        labels.append(label)
    labels[0] = f"{name}: {labels[0]}"
    moving = np.linalg.norm(true, axis=1) >= 5e-4
    for label, other in compared:
        d = np.linalg.norm(true - other, axis=1) * 1e3
        tiles.append(shaded(neutral + true, model.triangles, camera, error_colours(d, VMAX_MM))[0])
        labels.append(f"|true - {label}| mean {d[moving].mean():.2f} mm")
    return beside(*tiles, colour_bar(tiles[0].shape[0], VMAX_MM), labels=(*labels, ""))


def write_personal_rig_figure(path: Path, rig: BlendshapeRig, transferred: np.ndarray, true: BlendshapeRig,
                              shapes: tuple[str, ...] = SHAPES) -> Path:
    """A subject's example-based rig against its true rig (the QA report's picture): per
    shape, personal | true | |true - personal| | |true - DT|."""
    d = rig.definition
    rows = [shape_row(name, rig.neutral.astype(np.float64), (("example-based", rig.deltas[k]),), true.deltas[k],
                      (("example-based", rig.deltas[k]), ("DT", transferred[k])), rig.model)
            for name in shapes for k in [d.index(name)]]
    path.parent.mkdir(parents=True, exist_ok=True)
    return _save(path, np.vstack(rows))


def write_rig_figure(out: Path, seed: int = 1000, index: int = 0, shapes: tuple[str, ...] = SHAPES) -> Path:
    model, definition = load_ict_face_model(), load_default_rig_definition()
    subject = make_subject(f"fig-{index}", np.random.default_rng([seed, index]), model, definition)
    generic = BlendshapeRig.generic(model, definition)
    neutral = subject.rig.neutral.astype(np.float64)
    transferred = base_deltas(generic, neutral)
    rows = [shape_row(name, neutral, (("generic copy", generic.deltas[k]),), subject.rig.deltas[k],
                      (("copy", generic.deltas[k]), ("DT", transferred[k])), model)
            for name in shapes for k in [definition.index(name)]]
    out.mkdir(parents=True, exist_ok=True)
    return _save(out / "true_rig_shapes.png", np.vstack(rows))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for true_rig_shapes.png (docs/img)")
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated shape names")
    a = p.parse_args()
    print(write_rig_figure(a.out, a.seed, a.index, tuple(a.shapes.split(","))))


if __name__ == "__main__":
    main()
