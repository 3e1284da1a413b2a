"""The pgt command line: validate's exit status and messages, and the main job end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

from workflows.cli import main


def test_validate_prints_a_summary_of_a_valid_capture(tiny_subject, capsys):
    capture, _ = tiny_subject
    assert main(["validate", str(capture)]) == 0
    out = capsys.readouterr().out
    assert capture.name in out and "eye_left" in out and "rec000" in out


def test_validate_lists_problems_with_exit_status_1(tiny_subject, tmp_path, capsys):
    capture, _ = tiny_subject
    broken = tmp_path / capture.name
    shutil.copytree(capture, broken)
    (broken / "phone" / "neutral" / "intrinsics.json").unlink()
    (broken / "hmc" / "rec000" / "glabella" / "000003.png").unlink()
    assert main(["validate", str(broken), "--shallow"]) == 1
    err = capsys.readouterr().err
    assert "intrinsics.json" in err
    assert "glabella" in err


def test_unknown_config_option_is_a_clear_error(tiny_subject, tmp_path, capsys):
    capture, _ = tiny_subject
    assert main(["label", str(capture), "--out", str(tmp_path), "--set", "landmarks.nope=1"]) == 2
    assert "unknown config option 'landmarks.nope'" in capsys.readouterr().err


def test_demo_runs_the_main_job_end_to_end(tmp_path: Path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--workers", "1"]) == 0
    report = (out / "qa" / "report.md").read_text()
    assert "| landmarks | 1 | 0 | 0 | 0 |" in report
    assert "mouth_closure" in report
    assert "| rig | 1 | 0 | 0 | 0 |" in report and "## Personal rig" in report
    assert (out / "qa" / "img" / "personal_rig.png").is_file()
    assert "mouth_closure" in (out / "qa" / "report.html").read_text()  # the offline HTML report
    assert (out / "synthetic" / "ground_truth" / "labels" / "_delta_log").is_dir()
    assert list((out / "run" / "runs").glob("*/dask-report.html"))
