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


def shape_row(name: str, neutral: np.ndarray, generic: np.ndarray, true: np.ndarray, transferred: np.ndarray,
              model, width: int = 300) -> np.ndarray:
    """One shape: copy | true | |true - copy| | |true - DT| | colour bar.

    Args:
        neutral: (n, 3) the subject's neutral.
        generic, true, transferred: (n, 3) the shape's generic, true and transferred deltas.
    """
    triangles = model.triangles
    region = model.part_vertices("face")
    centre = neutral[region].mean(0)
    camera = Camera.look_at(centre + np.array([0.0, 0.0, 0.5]), centre, np.array([0.0, 1.0, 0.0]),
                            width=width, height=int(width * 1.2), focal=2.0 * width)
    copy_img, _ = shaded(neutral + generic, triangles, camera)
    true_img, _ = shaded(neutral + true, triangles, camera)
    tiles = [copy_img, true_img]
    labels = [f"{name}: generic copy", "true personal rig"]
    for label, other in (("|true - copy|", generic), ("|true - DT|", transferred)):
        d = np.linalg.norm(true - other, axis=1) * 1e3
        moving = np.linalg.norm(true, axis=1) >= 5e-4
        img, _ = shaded(neutral + true, triangles, camera, error_colours(d, VMAX_MM))
        tiles.append(img)
        labels.append(f"{label} mean {d[moving].mean():.2f} mm")
    return beside(*tiles, colour_bar(copy_img.shape[0], VMAX_MM), labels=(*labels, ""))


def write_rig_figure(out: Path, seed: int = 1000, index: int = 0, shapes: tuple[str, ...] = SHAPES) -> Path:
    model, definition = load_ict_face_model(), load_default_rig_definition()
    subject = make_subject(f"fig-{index}", np.random.default_rng([seed, index]), model, definition)
    generic = BlendshapeRig.generic(model, definition)
    neutral = subject.rig.neutral.astype(np.float64)
    transferred = base_deltas(generic, neutral)
    rows = [shape_row(name, neutral, generic.deltas[k], subject.rig.deltas[k], transferred[k], model)
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
