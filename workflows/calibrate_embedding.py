"""Calibrates the MediaPipe landmark embedding on synthetic subjects (``fit.landmark_embedding``).

MediaPipe's landmarks sit 2-3 mm off the embedded points on the template, and most of that
offset is the same for every subject and expression (a systematic bias per landmark:
docs/refine.md, "Where the along-surface error comes from"). The fit reads landmarks as
fixed surface points, so the bias slides the whole fitted surface along itself. This tool
runs MediaPipe on the phone frames of synthetic subjects, casts each detection onto the
subject's true mesh and re-places every surface landmark at the median of where it lands
(:func:`rigs.embedding.calibrate_embedding`)::

    python -m workflows.calibrate_embedding DATA OUT.npz [--subjects N] [--frames F]

``DATA`` holds ``captures/`` and ``ground_truth/`` (``pgt synth``); use subjects other
than the ones you evaluate on. Writes ``OUT.npz`` (the format ``fit.landmark_embedding``
reads) and ``OUT.json`` (the calibration's facts).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

from rigs.embedding import DetectionView, calibrate_embedding, save_embedding


def detection_views(data: Path, subjects: int, frames: int) -> Iterator[DetectionView]:
    """MediaPipe on the phone frames of the first ``subjects`` synthetic subjects under
    ``data``, each detection with its frame's true mesh and camera."""
    from stages.landmarks import MediaPipeDetector
    from stages.synthesis.truth import SubjectTruth
    from storage.capture import Capture

    detector = MediaPipeDetector()
    try:
        for root in sorted(p for p in (data / "captures").iterdir() if p.is_dir())[:subjects]:
            cap, truth = Capture.open(root), SubjectTruth.open(data / "ground_truth" / root.name)
            ex = truth.expressions()
            prompts = [str(p) for p in ex["prompts"]]
            for e in cap.phone_expressions:
                K = cap.phone_intrinsics(e).K
                poses = truth.phone(e)["head_in_camera"]
                for i in range(min(frames, cap.phone_frame_count(e))):
                    found = detector.detect(cap.read_phone_frame(e, i).rgb)
                    if found.found:
                        yield DetectionView(ex["vertices"][prompts.index(e)], poses[i], K, found.points)
    finally:
        detector.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="folder with captures/ and ground_truth/ (pgt synth)")
    p.add_argument("out", type=Path, help="embedding .npz to write (facts go next to it as .json)")
    p.add_argument("--subjects", type=int, default=1, help="subjects of DATA to use")
    p.add_argument("--frames", type=int, default=2, help="frames per expression to run MediaPipe on")
    args = p.parse_args(argv)
    embedding, facts = calibrate_embedding(detection_views(args.data, args.subjects, args.frames))
    save_embedding(embedding, args.out)
    facts["source"] = {"data": str(args.data), "subjects": args.subjects, "frames": args.frames}
    args.out.with_suffix(".json").write_text(json.dumps(facts, indent=1) + "\n")
    print(json.dumps(facts, indent=1))
    return 0 if facts["moved"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
