"""Pictures of a synthetic subject for docs/: phone RGB, depth, all HMC views, overlays.

Run: ``python -m workflows.figures CAPTURE_DIR TRUTH_DIR OUT_DIR [--prompt P] [--frame F]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from stages.synthesis.truth import SubjectTruth
from storage.capture import Capture


def depth_colormap(depth_mm: np.ndarray) -> np.ndarray:
    """(H, W) uint16 mm -> (H, W, 3) uint8 RGB, near = warm, invalid = black."""
    import matplotlib

    valid = depth_mm > 0
    d = depth_mm.astype(np.float64)
    lo, hi = np.percentile(d[valid], [1, 60]) if valid.any() else (0, 1)
    norm = np.clip((d - lo) / max(hi - lo, 1), 0, 1)
    rgb = (matplotlib.colormaps["turbo_r"](norm)[..., :3] * 255).astype(np.uint8)
    rgb[~valid] = 0
    return rgb


def _label(img: np.ndarray, text: str, scale: float = 0.5) -> np.ndarray:
    out = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img.copy()
    cv2.putText(out, text, (6, int(36 * scale)), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 0), 2, cv2.LINE_AA)
    return out


def _dots(img: np.ndarray, points: np.ndarray, colour: tuple[int, int, int], radius: int = 2) -> np.ndarray:
    out = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB) if img.ndim == 2 else img.copy()
    for x, y in points:
        if np.isfinite(x):
            cv2.circle(out, (round(float(x)), round(float(y))), radius, colour, -1, cv2.LINE_AA)
    return out


def write_figures(capture_dir: Path, truth_dir: Path, out: Path, prompt: str | None = None, frame: int | None = None) -> list[Path]:
    """Writes the pictures into ``out``; returns their paths."""
    capture, truth = Capture.open(capture_dir), SubjectTruth.open(truth_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompt = prompt or ("jaw_drop_max" if "jaw_drop_max" in capture.phone_expressions else capture.phone_expressions[0])
    phone = capture.read_phone_frame(prompt, 0)
    written = [out / "phone_rgb.png", out / "phone_depth.png", out / "phone_landmarks.png"]
    cv2.imwrite(str(written[0]), phone.rgb[:, :, ::-1])
    cv2.imwrite(str(written[1]), depth_colormap(phone.depth_mm)[:, :, ::-1])
    gt = truth.phone(prompt)
    cv2.imwrite(str(written[2]), _dots(phone.rgb, gt["landmarks_2d"][0][:478][gt["visible"][0][:478]], (0, 255, 0))[:, :, ::-1])

    rec = capture.recording(capture.recordings[0])
    if frame is None:  # a frame inside the first peak window shows an expression
        peaks = [s for s in rec.segments if s.kind == "peak"]
        frame = (peaks[0].start + peaks[0].end) // 2 if peaks else rec.frame_count // 2
    hmc = truth.hmc(rec.name)
    names = [str(n) for n in hmc["cameras"]]
    views, overlays = [], []
    for c, name in enumerate(names):
        img = rec.read_frame(name, frame)
        role = capture.rig.camera(name).role
        views.append(_label(img, f"{name} ({role})", scale=1.0))
        pts = hmc["landmarks_2d"][c, frame][hmc["visible"][c, frame]]
        overlays.append(_label(_dots(img, pts, (0, 255, 0), radius=3), name, scale=1.0))
    def grid(tiles: list[np.ndarray]) -> np.ndarray:
        # Half scale: sensor noise does not compress, and docs images live in the repo.
        full = np.vstack([np.hstack(tiles[:5]), np.hstack(tiles[5:])])
        return cv2.resize(full, None, fx=0.5, fy=0.5, interpolation=cv2.INTER_AREA)

    written += [out / "hmc_views.png", out / "hmc_landmarks.png"]
    cv2.imwrite(str(written[3]), grid(views)[:, :, ::-1])
    cv2.imwrite(str(written[4]), grid(overlays)[:, :, ::-1])
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("capture"), p.add_argument("truth"), p.add_argument("out")
    p.add_argument("--prompt"), p.add_argument("--frame", type=int)
    a = p.parse_args()
    for path in write_figures(Path(a.capture), Path(a.truth), Path(a.out), a.prompt, a.frame):
        print(path)


if __name__ == "__main__":
    main()
