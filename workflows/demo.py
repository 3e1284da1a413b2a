"""The README's main job on the embedded default: synthesize a subject, then run the chain.

Today the chain is validation; each chain issue extends this job until it ends in labels
and a QA report.
"""

from __future__ import annotations

from pathlib import Path

from stages.synthesis.generate import generate
from stages.synthesis.presets import get_preset
from storage.validate import summarize_capture, validate_capture


def run_demo(out: Path, preset: str = "tiny", seed: int = 0) -> int:
    """Returns a process exit status (0 = the chain succeeded)."""
    out = Path(out)
    synth_root = out / "synthetic"
    (subject_id,) = generate(get_preset(preset), 1, seed, synth_root)
    capture = synth_root / "captures" / subject_id
    problems = validate_capture(capture)
    if problems:
        for p in problems:
            print(f"invalid capture: {p}")
        return 1
    print(summarize_capture(capture))
    return 0
