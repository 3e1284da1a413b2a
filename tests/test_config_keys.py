"""Content keys cover everything that changes an output, and configs are checked before
anything runs (issue 6, item 3)."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from distributed import Client, LocalCluster

from pipeline.artifacts import ArtifactStore
from pipeline.config import path_field, with_overrides
from pipeline.dag import _check_worker_libraries, run_chain
from pipeline.errors import ConfigError
from pipeline.stage import Chain, Stage, StageConfig, content_key, library_versions
from stages.landmarks import LandmarksConfig
from tests.dag_stages import make_captures
from workflows.cli import main
from workflows.config import RunConfig

pytestmark = pytest.mark.timeout(300)


@dataclass(frozen=True)
class WConfig:
    """Settings of the weights stage."""

    weights: str = path_field(kind="file")
    """A model file."""
    lookup: str = path_field(kind="folder")
    """A folder of files the stage reads."""


@dataclass(frozen=True)
class Root:
    w: WConfig = field(default_factory=WConfig)


def stage_w(capture: str, config: StageConfig) -> dict[str, np.ndarray]:
    """Digests the weights file and the lookup folder's files."""
    h = hashlib.sha256(Path(config["w.weights"]).read_bytes())
    for f in sorted(Path(config["w.lookup"]).iterdir()):
        h.update(f.read_bytes())
    return {"digest": np.frombuffer(h.digest(), np.uint8).copy()}


CHAIN = Chain((Stage(name="w", version="1", fn=stage_w, config_fields=("w.weights", "w.lookup"),
                     library_versions=("numpy",)),))


@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=":0") as cluster, Client(cluster) as cl:
        yield cl


def test_files_named_by_the_config_enter_the_key_by_content(tmp_path: Path, client: Client) -> None:
    caps = make_captures(tmp_path / "caps", 1)
    weights, lookup = tmp_path / "model.bin", tmp_path / "lookup"
    weights.write_bytes(b"A" * 64)
    lookup.mkdir()
    (lookup / "t.txt").write_text("one")
    cfg = Root(WConfig(str(weights), str(lookup)))
    out = str(tmp_path / "out")

    def run(c: Root = cfg):
        return run_chain(caps, out, c, chain=CHAIN, client=client, progress=False, report=False)

    first = run()
    assert first.counts["done"] == 1 and run().counts["cached"] == 1
    weights.write_bytes(b"B" * 64)  # replaced at the same path, same size
    second = run()
    assert second.counts["done"] == 1, "new weights at the same path must rerun the stage"
    (lookup / "t.txt").write_text("two")  # a file inside a named folder changed
    third = run()
    assert third.counts["done"] == 1
    moved = tmp_path / "moved.bin"  # the same bytes elsewhere: same content, same key
    moved.write_bytes(weights.read_bytes())
    assert run(Root(WConfig(str(moved), str(lookup)))).counts["cached"] == 1
    store = ArtifactStore(f"{out}/artifacts")
    digests = {bytes(store.load("w", s.keys[("w", caps[0].name)])["digest"])
               for s in (first, second, third)}
    assert len(digests) == 3


def test_a_missing_named_file_stops_the_run_before_anything_runs(tmp_path: Path,
                                                                client: Client) -> None:
    caps = make_captures(tmp_path / "caps", 1)
    (tmp_path / "lookup").mkdir()
    cfg = Root(WConfig(str(tmp_path / "nope.bin"), str(tmp_path / "lookup")))
    with pytest.raises(ConfigError, match=r"w\.weights: .*nope\.bin: no such file"):
        run_chain(caps, str(tmp_path / "out"), cfg, chain=CHAIN, client=client, progress=False,
                  report=False)
    assert not (tmp_path / "out").exists()


def test_library_versions_enter_the_key(client: Client) -> None:
    st = CHAIN["w"]
    vals = {"w.weights": "x", "w.lookup": "y"}
    k1 = content_key(st, vals, {"capture": "fp"}, "s", {"numpy": "1.26.4"})
    k2 = content_key(st, vals, {"capture": "fp"}, "s", {"numpy": "2.0.0"})
    assert k1 != k2
    with pytest.raises(ConfigError, match="numpy"):
        content_key(st, vals, {"capture": "fp"}, "s", {})
    assert library_versions(("numpy", "no-such-dist-pgt")) == {
        "numpy": np.__version__, "no-such-dist-pgt": "not installed"}
    _check_worker_libraries(client, {"numpy": np.__version__})
    with pytest.raises(ConfigError, match="other library versions"):
        _check_worker_libraries(client, {"numpy": "0.0.1"})


def test_landmarks_config_checks_its_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'mediapip' is not one of mediapipe, face_alignment, precomputed"):
        LandmarksConfig(detector="mediapip")
    for bad in (1.5, -0.1, math.nan):
        with pytest.raises(ConfigError, match="min_confidence"):
            LandmarksConfig(min_confidence=bad)
    with pytest.raises(ConfigError, match="needs landmarks.weights"):
        LandmarksConfig(detector="face_alignment")
    with pytest.raises(ConfigError, match="needs landmarks.precomputed_dir"):
        LandmarksConfig(detector="precomputed")
    with pytest.raises(ConfigError, match="is not a number"):
        LandmarksConfig(min_confidence="high")
    weights = tmp_path / "fan.pt"
    weights.write_bytes(b"w")
    # overrides of one section apply together, in any order
    for order in (("detector", "weights"), ("weights", "detector")):
        values = {"detector": "face_alignment", "weights": str(weights)}
        cfg = with_overrides(RunConfig(), {f"landmarks.{k}": values[k] for k in order})
        assert (cfg.landmarks.detector, cfg.landmarks.weights) == ("face_alignment", str(weights))
    with pytest.raises(ConfigError, match="validate.deep: 'maybe' is not a bool"):
        with_overrides(RunConfig(), {"validate.deep": "maybe"})


@pytest.mark.parametrize("setting, message", [
    ("landmarks.detector=mediapip",
     "config option landmarks.detector: 'mediapip' is not one of mediapipe, face_alignment, precomputed"),
    ("landmarks.min_confidence=2", "landmarks.min_confidence must be in [0, 1]"),
    ("landmarks.nope=1", "unknown config option 'landmarks.nope'"),
    ("landmarks.weights=/no/such/fan.pt", "landmarks.weights: /no/such/fan.pt: no such file"),
])
def test_a_bad_setting_is_a_usage_error_before_anything_runs(tmp_path: Path, capsys, setting,
                                                             message) -> None:
    out = tmp_path / "out"
    assert main(["label", str(tmp_path / "capture"), "--out", str(out), "--set", setting]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()  # no run, no failure rows
