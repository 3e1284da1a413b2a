"""Progress draws a bar only on a terminal; logs get plain lines, and --quiet nothing."""

from __future__ import annotations

import contextlib
import io
import re

from pipeline.progress import LogProgress, progress_bar, track


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _count(bar, n: int) -> None:
    for _ in range(n):
        bar.update(1)
    bar.close()


def test_a_log_gets_plain_lines_without_carriage_returns():
    log = io.StringIO()
    _count(progress_bar(5, "s000", "frame", stream=log), 5)
    text = log.getvalue()
    assert "\r" not in text
    assert re.fullmatch(r"(s000: \d/5 frame \(\d+%\), [\d.]+ s\n)*"
                        r"s000: 5/5 frame \(100%\), [\d.]+ s done\n", text), text


def test_log_lines_are_rate_limited():
    log = io.StringIO()
    _count(LogProgress(1000, "stages", "task", log, every_s=3600.0), 1000)
    assert log.getvalue().count("\n") == 1, "one closing line, not one line per update"
    log = io.StringIO()
    _count(LogProgress(3, "stages", "task", log, every_s=0.0), 3)
    assert log.getvalue().count("\n") == 4


def test_a_terminal_gets_a_redrawn_bar():
    term = _Terminal()
    _count(progress_bar(5, "s000", "frame", stream=term), 5)
    assert "\r" in term.getvalue() and "5/5" in term.getvalue()


def test_quiet_prints_nothing_anywhere():
    for stream in (io.StringIO(), _Terminal()):
        _count(progress_bar(5, "s000", "frame", enabled=False, stream=stream), 5)
        assert stream.getvalue() == ""
    log = io.StringIO()
    assert list(track(range(3), 3, "subjects", enabled=False, stream=log)) == [0, 1, 2]
    assert log.getvalue() == ""


def test_track_counts_every_item():
    log = io.StringIO()
    assert list(track(iter("abc"), 3, "subjects", "subject", stream=log)) == ["a", "b", "c"]
    assert log.getvalue().splitlines()[-1].startswith("subjects: 3/3 subject (100%)")


def test_synth_progress_in_a_log_has_no_carriage_returns(tmp_path):
    """The generator's per-frame progress, written to a non-terminal stderr (a log)."""
    from stages.synthesis.generate import generate
    from stages.synthesis.presets import ScriptTiming, SynthConfig

    micro = SynthConfig(
        name="micro", prompts=("neutral", "jaw_drop_max"), phone_frames_per_prompt=1,
        phone_width=96, hmc_size=48, hmc_recordings=1, hmc_peaks_per_recording=1, fps=10.0,
        script=ScriptTiming(neutral_s=1.2, peak_s=0.4, eye_event_s=0.2, mouth_closed_s=0.2,
                            speech_s=0.2, rest_s=0.1))
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        (sid,) = generate(micro, 1, 0, tmp_path, progress=True)
    text = log.getvalue()
    assert "\r" not in text
    assert re.search(rf"^{sid}: (\d+)/\1 frame \(100%\), [\d.]+ s done$", text, re.MULTILINE), text
