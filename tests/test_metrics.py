"""Tests of the label metrics (stages/metrics*.py, SPEC §5, docs/metrics.md).

Every expected number is worked out by hand in the test, on small constructed recordings.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
import trimesh
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import ConfigError, StageError
from rigs.geometry import ClosestPoints
from stages.metrics import (
    METRICS_SCHEMA,
    NO_GT_METRICS,
    MeshSurface,
    MetricParams,
    MetricResult,
    RecordingMetrics,
    aggregate,
    blendshape_mae,
    expression_mesh_error,
    eye_closure,
    gaze_angle_deg,
    gaze_direction,
    gaze_error,
    head_pose_error,
    metrics_rows,
    mouth_closure,
    neutralness,
    now_scan_to_mesh,
    per_vertex_error,
    recording_metrics,
    recordings_from_label_table,
    rotation_error_deg,
    semantic_accuracy,
    smoothness,
    vertex_error,
)

_RIG_NAMES = """
browDown_L browDown_R browInnerUp_L browInnerUp_R browOuterUp_L browOuterUp_R cheekPuff_L
cheekPuff_R cheekSquint_L cheekSquint_R eyeBlink_L eyeBlink_R eyeLookDown_L eyeLookDown_R
eyeLookIn_L eyeLookIn_R eyeLookOut_L eyeLookOut_R eyeLookUp_L eyeLookUp_R eyeSquint_L
eyeSquint_R eyeWide_L eyeWide_R jawForward jawLeft jawOpen jawRight mouthClose
mouthDimple_L mouthDimple_R mouthFrown_L mouthFrown_R mouthFunnel mouthLeft
mouthLowerDown_L mouthLowerDown_R mouthPress_L mouthPress_R mouthPucker mouthRight
mouthRollLower mouthRollUpper mouthShrugLower mouthShrugUpper mouthSmile_L mouthSmile_R
mouthStretch_L mouthStretch_R mouthUpperUp_L mouthUpperUp_R noseSneer_L noseSneer_R
"""
NAMES = tuple(_RIG_NAMES.split())
EYE_FOLLOWING = frozenset(n for n in NAMES if n.startswith("eyeLook"))
COL = {n: i for i, n in enumerate(NAMES)}
PERIOD_NS = 1e9 / 30.0


@dataclass(frozen=True)
class Seg:
    """Stands in for storage.capture.Segment (same attributes)."""

    kind: str
    start: int
    end: int
    prompt: str | None = None
    eye: str | None = None


def timestamps(frames: np.ndarray, fps: float = 30.0) -> np.ndarray:
    return np.round(np.asarray(frames) * 1e9 / fps).astype(np.int64)


def zeros(t: int) -> np.ndarray:
    return np.zeros((t, len(NAMES)))


def test_names_are_the_contract_rig():
    assert len(NAMES) == 53 and len(EYE_FOLLOWING) == 8


# --- Semantic Accuracy ---------------------------------------------------------------------


PRIORS = {
    "smile": {"mouthSmile_L": 0.8, "mouthSmile_R": 0.8, "cheekSquint_L": 0.4,
              "cheekSquint_R": 0.1, "jawOpen": 0.0},
    "jaw_drop": {"jawOpen": 1.0},
    "nothing": {},
}


def test_semantic_accuracy_by_hand():
    b = zeros(20)
    fi = np.arange(20)
    b[0:10, COL["mouthSmile_L"]] = 0.7  # p90 0.7 >= 0.75*0.8 = 0.6 -> pass
    b[0:10, COL["mouthSmile_R"]] = 0.5  # p90 0.5 <  0.6             -> fail
    # 9 zeros and one 1.0: p90 sits at sorted position 0.9*(10-1) = 8.1, i.e. 0 + 0.1*(1-0)
    # = 0.1. cheekSquint_L: 0.1 < 0.75*0.4 = 0.3 -> fail (although its max is 1.0);
    # cheekSquint_R: 0.1 >= 0.75*0.1 = 0.075 -> pass.
    b[3, COL["cheekSquint_L"]] = 1.0
    b[3, COL["cheekSquint_R"]] = 1.0
    b[10:20, COL["jawOpen"]] = 0.75  # p90 0.75 >= 0.75*1.0 -> pass (>= is inclusive)
    segs = [Seg("peak", 0, 10, "smile"), Seg("neutral", 10, 12), Seg("peak", 10, 20, "jaw_drop"),
            Seg("peak", 0, 20, "nothing")]
    r = semantic_accuracy(b, NAMES, fi, segs, PRIORS)
    # jawOpen's prior 0 in "smile" and the empty "nothing" prior add no items: 5 items.
    assert (r.n_items, r.n_passed) == (5, 3)
    assert r.value == pytest.approx(3 / 5)
    assert [(f.segment, f.blendshape) for f in r.failures] == [
        (0, "cheekSquint_L"), (0, "mouthSmile_R")]  # rig order
    f = {x.blendshape: x for x in r.failures}
    assert f["mouthSmile_R"].value == pytest.approx(0.5)
    assert f["mouthSmile_R"].threshold == pytest.approx(0.6)
    assert f["cheekSquint_L"].value == pytest.approx(0.1)
    assert (f["cheekSquint_L"].frame_start, f["cheekSquint_L"].frame_end) == (0, 10)


def test_semantic_accuracy_uses_only_ok_frames_and_present_frames():
    b = zeros(10)
    b[:, COL["jawOpen"]] = 0.2
    b[4:6, COL["jawOpen"]] = 1.0  # only on failed frames
    status = np.array(["ok"] * 10, dtype=object)
    status[4:6] = "failed"
    segs = [Seg("peak", 0, 10, "jaw_drop")]
    assert semantic_accuracy(b, NAMES, np.arange(10), segs, PRIORS, status=status).value == 0.0
    assert semantic_accuracy(b, NAMES, np.arange(10), segs, PRIORS).value == 1.0
    # A window over frames that are not in the recording at all is skipped, not failed.
    r = semantic_accuracy(b, NAMES, np.arange(10), [Seg("peak", 50, 60, "jaw_drop")], PRIORS)
    assert r.value is None and r.n_items == 0 and r.skipped[0].segment == 0


def test_semantic_accuracy_none_without_peaks_and_errors_on_unknown_prompt():
    b = zeros(5)
    assert semantic_accuracy(b, NAMES, np.arange(5), [Seg("neutral", 0, 5)], PRIORS).value is None
    with pytest.raises(StageError, match="prompt"):
        semantic_accuracy(b, NAMES, np.arange(5), [Seg("peak", 0, 5, "frown")], PRIORS)
    with pytest.raises(StageError, match="no blendshape"):
        semantic_accuracy(b, NAMES, np.arange(5), [Seg("peak", 0, 5, "x")], {"x": {"nope": 1.0}})


# --- Neutralness -------------------------------------------------------------------------------


def test_neutralness_by_hand():
    b = zeros(140)
    b[:, COL["browDown_L"]] = 0.9  # everything outside the kept frames fails ...
    kept = np.arange(15, 25)  # [0, 40) at 30 fps minus round(0.5*30) = 15 frames each end
    b[kept, COL["browDown_L"]] = 0.1  # ... the 10 kept frames pass unless changed below
    b[15:18, COL["mouthSmile_L"]] = 0.2  # 3 fail
    b[18, COL["eyeLookUp_L"]] = 0.9  # eye-following: ignored -> passes
    b[19, COL["jawOpen"]] = 0.15  # not < 0.15 -> fails
    segs = [Seg("neutral", 0, 40),
            Seg("neutral", 50, 79),  # 29 frames < 1 s: contributes nothing
            Seg("neutral", 100, 130)]  # exactly 1 s: nothing left after trimming
    r = neutralness(b, NAMES, np.arange(140), segs, EYE_FOLLOWING)
    assert (r.n_items, r.n_passed) == (10, 6)
    assert r.value == pytest.approx(6 / 10)
    assert [(f.frame_start, f.frame_end, f.blendshape) for f in r.failures] == [
        (15, 18, "mouthSmile_L"), (19, 20, "jawOpen")]
    assert r.failures[0].value == pytest.approx(0.2)
    assert [s.segment for s in r.skipped] == [1, 2]


def test_neutralness_trim_follows_fps_and_none_without_neutral():
    b = zeros(80)
    b[:30, COL["jawOpen"]] = 0.5
    b[50:, COL["jawOpen"]] = 0.5
    # At 60 fps: trim round(0.5*60) = 30 frames each end of [0, 80) -> [30, 50), all pass.
    r = neutralness(b, NAMES, np.arange(80), [Seg("neutral", 0, 80)], EYE_FOLLOWING, fps=60.0)
    assert (r.value, r.n_items) == (1.0, 20)
    # At 30 fps: [15, 65) -> 50 frames, of which 15..29 and 50..64 (30) fail -> 20/50.
    r = neutralness(b, NAMES, np.arange(80), [Seg("neutral", 0, 80)], EYE_FOLLOWING)
    assert r.value == pytest.approx(20 / 50)
    assert neutralness(b, NAMES, np.arange(80), [], EYE_FOLLOWING).value is None
    # At 25 fps the trim is 12.5 frames rounded half up = 13: [0, 25) keeps nothing.
    r = neutralness(b, NAMES, np.arange(80), [Seg("neutral", 0, 25)], EYE_FOLLOWING, fps=25.0)
    assert r.value is None and r.skipped[0].segment == 0


# --- Smoothness ---------------------------------------------------------------------------------


def test_smoothness_known_second_differences():
    names = ("a", "b")
    b = np.zeros((5, 2))
    b[:, 0] = [0.0, 0.0, 0.1, 0.0, 0.0]
    fi = np.arange(5)
    r = smoothness(b, names, fi, timestamps(fi))
    # Centres 1, 2, 3: |0.1 - 0 + 0| = 0.1, |0 - 0.2 + 0| = 0.2, |0 - 0 + 0.1| = 0.1 on "a",
    # 0 on "b": x = (0.1 + 0.2 + 0.1 + 0 + 0 + 0) / 6 = 1/15; score = exp(-(1/15) / 0.02).
    assert r.n_items == 3
    assert r.value == pytest.approx(math.exp(-(1 / 15) / 0.02))
    assert r.failures[0].frame_start == 1 and r.failures[0].frame_end == 4  # centre frame 2
    assert r.failures[0].value == pytest.approx(0.1)  # mean over the 2 blendshapes
    # Leaving "b" out averages over "a" alone: x = 0.4 / 3.
    r = smoothness(b, names, fi, timestamps(fi), exclude={"b"})
    assert r.value == pytest.approx(math.exp(-(0.4 / 3) / 0.02))


def test_smoothness_never_across_missing_frames():
    fi = np.array([0, 1, 2, 4, 5, 6])  # frame 3 missing
    b = np.array([[0.0], [0.0], [0.0], [1.0], [1.0], [1.0]])
    r = smoothness(b, ("a",), fi, timestamps(fi))
    # Only centres 1 (0,1,2) and 5 (4,5,6) have two adjacent neighbours: both 0.
    assert (r.value, r.n_items) == (1.0, 2)
    # The frame indices alone find the hole (no timestamps to show it).
    r = smoothness(b, ("a",), fi, None)
    assert (r.value, r.n_items) == (1.0, 2)
    # Without the hole the jump would count: centres 1..4 -> (0 + 1 + 1 + 0) / 4.
    r = smoothness(b, ("a",), np.arange(6), timestamps(np.arange(6)))
    assert r.value == pytest.approx(math.exp(-0.5 / 0.02))


def test_smoothness_timestamp_gap_and_status_gap():
    b = np.array([[0.0], [0.0], [0.0], [1.0], [1.0], [1.0]])
    fi = np.arange(6)
    ts = timestamps(fi)
    ts[3:] += 50_000_000 - int(ts[3] - ts[2])  # step 2 -> 3 is exactly 1.5 periods: no gap
    assert smoothness(b, ("a",), fi, ts).n_items == 4
    ts[3:] += 1  # now 1.5 periods + 1 ns: a gap, centres 2 and 3 drop out
    r = smoothness(b, ("a",), fi, ts)
    assert (r.value, r.n_items) == (1.0, 2)
    # A failed frame (with NaN labels) is a gap too, and its NaN never reaches the mean.
    b2 = b.copy()
    b2[3] = np.nan
    status = ["ok", "ok", "ok", "failed", "ok", "ok"]
    r = smoothness(b2, ("a",), fi, timestamps(fi), status=status)
    assert (r.value, r.n_items) == (1.0, 1)  # only centre 1; centre 4 needs frame 3
    ts_back = timestamps(fi)
    ts_back[3:] -= ts_back[3] - ts_back[2]  # a stalled clock (step 0 ns) is a gap as well
    assert smoothness(b, ("a",), fi, ts_back).n_items == 2


def test_smoothness_is_expressed_at_30_hz():
    # a(t) = t^2 (t in seconds): the 30 Hz second difference is 2 / 30^2 everywhere.
    def run(fps: float) -> MetricResult:
        fi = np.arange(int(fps))
        return smoothness(((fi / fps) ** 2)[:, None], ("a",), fi, timestamps(fi, fps), fps=fps)

    expected = math.exp(-(2 / 900) / 0.02)
    assert run(30.0).value == pytest.approx(expected)
    assert run(60.0).value == pytest.approx(expected)  # 2/60^2 scaled by (60/30)^2
    assert smoothness(np.zeros((2, 1)), ("a",), np.arange(2), None).value is None


# --- Eye Closure ------------------------------------------------------------------------------


def test_eye_closure_by_hand():
    b = zeros(50)
    L, R = COL["eyeBlink_L"], COL["eyeBlink_R"]
    b[0:10, L], b[0:10, R] = 0.9, 0.85  # both closed: pass
    b[10:20, L], b[10:20, R] = 0.9, 0.7  # right p90 0.7 < 0.8: fail
    b[20:30, L], b[20:30, R] = 0.95, 0.1  # left wink ...
    b[25, R] = 0.3  # ... open eye max 0.3 is not < 0.3: fail
    b[30:40, R], b[30:40, L] = 0.8, 0.29  # right wink: 0.8 >= 0.8 and 0.29 < 0.3: pass
    segs = [Seg("eye_closure", 0, 10), Seg("eye_closure", 10, 20),
            Seg("wink", 20, 30, eye="left"), Seg("wink", 30, 40, eye="right"),
            Seg("speech", 40, 50)]
    r = eye_closure(b, NAMES, np.arange(50), segs)
    assert (r.n_items, r.n_passed, r.value) == (4, 2, 0.5)
    assert [(f.segment, f.blendshape) for f in r.failures] == [(1, "eyeBlink_R"), (2, "eyeBlink_R")]
    assert r.failures[1].value == pytest.approx(0.3) and r.failures[1].threshold == 0.3
    with pytest.raises(StageError, match="wink"):
        eye_closure(b, NAMES, np.arange(50), [Seg("wink", 0, 5)])
    assert eye_closure(b, NAMES, np.arange(50), [Seg("speech", 0, 5)]).value is None


# --- Mouth Closure ----------------------------------------------------------------------------


def lip_gap_model(names):
    """A linear stand-in for the rig: gap = 0.02 m * jawOpen + 0.005 m * mouthFunnel."""
    jaw, funnel = names.index("jawOpen"), names.index("mouthFunnel")
    return lambda b: 0.02 * b[:, jaw] + 0.005 * b[:, funnel]


def test_mouth_closure_by_hand():
    b = zeros(30)
    b[0:10, COL["jawOpen"]] = 0.04  # jaw 0.04 <= 0.1, gap 0.8 mm <= 1 mm: pass
    b[10:20, COL["jawOpen"]] = 0.2  # jaw 0.2 > 0.1, gap 4 mm: fails both checks
    b[20:30, COL["mouthFunnel"]] = 0.4  # jaw 0, gap 2 mm > 1 mm: fails the gap only
    segs = [Seg("mouth_closed", 0, 10), Seg("mouth_closed", 10, 20), Seg("mouth_closed", 20, 30)]
    fi = np.arange(30)
    r = mouth_closure(b, NAMES, fi, segs, lip_gap_model(NAMES))
    assert (r.n_items, r.n_passed) == (3, 1) and r.value == pytest.approx(1 / 3)
    assert [(f.segment, f.blendshape) for f in r.failures] == [(1, "jawOpen"), (1, None), (2, None)]
    assert r.failures[2].value == pytest.approx(0.002) and r.failures[2].threshold == 0.001
    # Precomputed gaps aligned with shuffled rows give the same answer.
    perm = np.random.default_rng(0).permutation(30)
    gaps = lip_gap_model(NAMES)(b)[perm]
    r2 = mouth_closure(b[perm], NAMES, fi[perm], segs, gaps)
    assert (r2.value, r2.failures) == (r.value, r.failures)
    assert mouth_closure(b, NAMES, fi, [Seg("neutral", 0, 30)], None).value is None
    with pytest.raises(StageError, match="lip"):
        mouth_closure(b, NAMES, fi, segs, None)


# --- All five, aggregation, the metrics table -------------------------------------------------


def test_recording_metrics_skips_what_does_not_apply():
    b = zeros(10)
    fi = np.arange(10)
    out = recording_metrics(b, NAMES, fi, timestamps(fi), [Seg("speech", 0, 10)], PRIORS,
                            EYE_FOLLOWING)
    assert tuple(out) == NO_GT_METRICS
    assert {k: v.value for k, v in out.items()} == {
        "semantic_accuracy": None, "neutralness": None, "smoothness": 1.0,
        "eye_closure": None, "mouth_closure": None}
    # Thresholds are parameters: a stricter ratio fails what passed.
    b[:, COL["jawOpen"]] = 0.75
    seg = [Seg("peak", 0, 10, "jaw_drop")]
    strict = MetricParams(semantic_ratio=0.8)
    assert recording_metrics(b, NAMES, fi, None, seg, PRIORS, EYE_FOLLOWING)[
        "semantic_accuracy"].value == 1.0
    assert recording_metrics(b, NAMES, fi, None, seg, PRIORS, EYE_FOLLOWING, params=strict)[
        "semantic_accuracy"].value == 0.0


def rm(subject: str, recording: str, sa: float | None, n: int = 4) -> RecordingMetrics:
    return RecordingMetrics(subject, recording, {
        "semantic_accuracy": MetricResult("semantic_accuracy", sa, n if sa is not None else 0),
        "smoothness": MetricResult("smoothness", 0.9, 100)})


RECS = [rm("A", "r1", 0.5), rm("A", "r2", None), rm("A", "r3", 1.0), rm("B", "r1", 0.25),
        rm("C", "r1", None)]


def test_aggregation_recording_subject_dataset():
    s = aggregate(RECS)
    # A: mean(0.5, 1.0) = 0.75 over 2 recordings (r2 does not apply); B: 0.25; C: None.
    assert (s.subjects["A"]["semantic_accuracy"].value, s.subjects["A"]["semantic_accuracy"].n) \
        == (0.75, 2)
    assert s.subjects["B"]["semantic_accuracy"].value == 0.25
    assert s.subjects["C"]["semantic_accuracy"].value is None
    # Dataset: mean over subjects (0.75 + 0.25) / 2 = 0.5, not over recordings (0.5833).
    assert (s.dataset["semantic_accuracy"].value, s.dataset["semantic_accuracy"].n) == (0.5, 2)
    assert s.dataset["smoothness"].value == pytest.approx(0.9)
    with pytest.raises(StageError):
        aggregate([rm("A", "r1", 0.5), rm("A", "r1", 0.5)])


def test_metrics_rows_long_format():
    at = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    t = metrics_rows(RECS, label_source="distillation", label_round=2, run_id="run7",
                     computed_at=at)
    assert t.schema == METRICS_SCHEMA
    # 5 recordings x 2 metrics + 3 subjects x 2 + 1 dataset x 2.
    assert t.num_rows == 10 + 6 + 2
    rows = t.to_pylist()
    key = {(r["level"], r["subject_id"], r["recording_id"], r["metric"]): r for r in rows}
    assert key[("recording", "A", "r2", "semantic_accuracy")]["value"] is None
    assert key[("recording", "A", "r1", "semantic_accuracy")]["n_items"] == 4
    assert key[("subject", "A", None, "semantic_accuracy")]["value"] == 0.75
    assert key[("subject", "A", None, "semantic_accuracy")]["n_items"] == 2
    assert key[("dataset", None, None, "semantic_accuracy")]["value"] == 0.5
    assert {r["label_round"] for r in rows} == {2} and {r["run_id"] for r in rows} == {"run7"}
    assert rows[0]["computed_at"] == at
    with pytest.raises(ConfigError):
        metrics_rows(RECS, label_source="guess", label_round=0, run_id="x")
    empty = metrics_rows([], label_source="ground_truth", label_round=0, run_id="x")
    assert empty.num_rows == 0 and empty.schema == METRICS_SCHEMA


def test_recordings_from_label_table_round_trip():
    fi = np.array([2, 0, 1, 0], dtype=np.int32)
    cols = {
        "subject_id": ["s1", "s1", "s1", "s0"], "recording_id": ["r", "r", "r", "q"],
        "frame_index": pa.array(fi, pa.int32()),
        "timestamp_ns": pa.array(timestamps(fi), pa.int64()),
        "bs_jawOpen": pa.array([0.2, 0.0, 0.1, 0.5], pa.float32()),
        "bs_eyeBlink_L": pa.array([None, 0.0, 0.0, 0.0], pa.float32()),
        "status": ["failed", "ok", "ok", "ok"],
    }
    recs = recordings_from_label_table(pa.table(cols))
    assert [(r.subject_id, r.recording_id) for r in recs] == [("s0", "q"), ("s1", "r")]
    r = recs[1]
    assert r.names == ("jawOpen", "eyeBlink_L") and r.frame_index.tolist() == [0, 1, 2]
    assert r.b[:, 0] == pytest.approx([0.0, 0.1, 0.2]) and np.isnan(r.b[2, 1])
    assert r.status.tolist() == ["ok", "ok", "failed"] and r.gaze is None


# --- Properties --------------------------------------------------------------------------------


PROP_PRIORS = {"p0": {"jawOpen": 0.9, "mouthSmile_L": 0.5}, "p1": {"browDown_L": 0.7,
               "eyeBlink_L": 0.2, "eyeLookUp_L": 0.4}}
KINDS = ("neutral", "peak", "eye_closure", "wink", "mouth_closed", "speech")


def random_recording(seed: int):
    rng = np.random.default_rng(seed)
    t = int(rng.integers(3, 150))
    b = rng.uniform(0, 1, (t, len(NAMES))) ** rng.uniform(0.3, 4)
    fi = np.sort(rng.choice(t + int(rng.integers(0, 10)), size=t, replace=False))
    status = rng.choice(["ok", "ok", "ok", "failed", "rejected"], size=t)
    segs = []
    if rng.uniform() < 0.7:  # most recordings get a neutral window long enough to count
        start = int(rng.integers(0, t))
        segs.append(Seg("neutral", start, start + int(rng.integers(30, 100))))
    for _ in range(int(rng.integers(0, 8))):
        start = int(rng.integers(0, t + 5))
        kind = str(rng.choice(KINDS))
        segs.append(Seg(kind, start, start + int(rng.integers(1, 100)),
                        prompt=str(rng.choice(["p0", "p1"])),
                        eye=str(rng.choice(["left", "right"]))))
    return b, fi, timestamps(fi), status, segs


def all_metrics(b, names, fi, ts, status, segs):
    out = recording_metrics(b, names, fi, ts, segs, PROP_PRIORS, EYE_FOLLOWING, status=status,
                            lip_gap=lip_gap_model(list(names)))
    return {k: v.value for k, v in out.items()}


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.integers(0, 2**32 - 1))
def test_scores_in_unit_interval(seed):
    for v in all_metrics(*(lambda r: (r[0], NAMES, *r[1:]))(random_recording(seed))).values():
        assert v is None or 0.0 <= v <= 1.0


@FAST
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_permuting_blendshapes_and_rows_changes_nothing(seed, perm_seed):
    b, fi, ts, status, segs = random_recording(seed)
    rng = np.random.default_rng(perm_seed)
    cols, rows = rng.permutation(len(NAMES)), rng.permutation(len(fi))
    ref = all_metrics(b, NAMES, fi, ts, status, segs)
    got = all_metrics(b[rows][:, cols], tuple(NAMES[c] for c in cols), fi[rows], ts[rows],
                      status[rows], segs)
    assert ref.keys() == got.keys()
    for k in ref:
        assert (ref[k] is None) == (got[k] is None)
        if ref[k] is not None:
            assert got[k] == pytest.approx(ref[k], rel=1e-12)


@FAST
@given(st.integers(0, 2**32 - 1))
def test_halving_labels_never_raises_semantic_accuracy(seed):
    b, fi, _, status, segs = random_recording(seed)
    segs = segs + [Seg("peak", 0, 40, "p0")]
    full = semantic_accuracy(b, NAMES, fi, segs, PROP_PRIORS, status=status).value
    half = semantic_accuracy(0.5 * b, NAMES, fi, segs, PROP_PRIORS, status=status).value
    assert (full is None) == (half is None)
    if full is not None:
        assert half <= full


@FAST
@given(st.integers(0, 2**32 - 1), st.floats(1e-3, 0.1))
def test_noise_lowers_smoothness(seed, amplitude):
    rng = np.random.default_rng(seed)
    t = int(rng.integers(3, 60))
    slope, offset = rng.uniform(-0.005, 0.005, 53), rng.uniform(0.3, 0.7, 53)
    clean = offset + np.arange(t)[:, None] * slope  # linear: every second difference is 0
    noisy = clean + rng.uniform(-amplitude, amplitude, clean.shape)
    fi = np.arange(t)
    s_clean = smoothness(clean, NAMES, fi, timestamps(fi)).value
    s_noisy = smoothness(noisy, NAMES, fi, timestamps(fi)).value
    assert s_clean == pytest.approx(1.0)
    assert s_noisy < s_clean


# --- Ground-truth metrics ------------------------------------------------------------------------


def test_blendshape_mae_by_hand():
    names = ("a", "b", "eyeLookUp_L")
    true = np.array([[0.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    est = np.array([[0.1, 0.0, 1.0], [0.2, 0.7, 1.0]])
    r = blendshape_mae(est, true, names, exclude=EYE_FOLLOWING)
    # a: (0.1 + 0.3) / 2 = 0.2; b: (0 + 0.2) / 2 = 0.1; all: (0.1 + 0.3 + 0 + 0.2) / 4 = 0.15.
    assert r.mae == pytest.approx(0.15) and r.n_frames == 2
    assert r.per_basis == pytest.approx({"a": 0.2, "b": 0.1})
    # Ground truth in another column order gives the same.
    r2 = blendshape_mae(est, true[:, [2, 1, 0]], names, exclude=EYE_FOLLOWING,
                        names_true=("eyeLookUp_L", "b", "a"))
    assert r2.per_basis == pytest.approx(r.per_basis)
    assert blendshape_mae(true, true, names).mae == 0.0
    assert r.as_results()["blendshape_mae/a"].value == pytest.approx(0.2)


def quat(axis, deg):
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    h = math.radians(deg) / 2
    return np.r_[math.cos(h), math.sin(h) * axis]


def qmul(p, q):
    w1, v1, w2, v2 = p[0], p[1:], q[0], q[1:]
    return np.r_[w1 * w2 - v1 @ v2, w1 * v2 + w2 * v1 + np.cross(v1, v2)]


def test_head_pose_error_known_rotation_and_translation():
    q_true = np.array([quat([1, 2, 3], 40), quat([0, 1, 0], -70), [1.0, 0, 0, 0]])
    q_est = np.array([qmul(q, quat([3, -1, 0.5], 10)) for q in q_true])
    t_true = np.zeros((3, 3))
    t_est = np.array([[0.003, 0.004, 0.0]] * 3)  # 5 mm
    r = head_pose_error(q_est, t_est, q_true, t_true)
    assert r.rotation_deg == pytest.approx([10, 10, 10])
    assert r.translation_mm == pytest.approx([5, 5, 5])
    assert r.mean_rotation_deg == pytest.approx(10)
    zero = head_pose_error(q_true, t_true, -q_true, t_true)  # q and -q: the same rotation
    assert zero.mean_rotation_deg == pytest.approx(0, abs=1e-6) and zero.mean_translation_mm == 0
    assert rotation_error_deg(quat([0, 0, 1], 0.001), quat([0, 0, 1], 0)) == pytest.approx(0.001)


def test_gaze_convention_and_error():
    assert gaze_direction(0.0, 0.0) == pytest.approx([0, 0, 1])  # +z forward
    assert gaze_direction(math.pi / 2, 0.0) == pytest.approx([1, 0, 0])  # yaw > 0 -> +x
    assert gaze_direction(0.0, math.pi / 2) == pytest.approx([0, 1, 0])  # pitch > 0 -> up
    assert gaze_angle_deg(np.array([0.1, 0.0]), np.zeros(2)) == pytest.approx(math.degrees(0.1))
    # Yaw offset of 20 deg at pitch 30 deg: cos(angle) = cos^2(30) cos(20) + sin^2(30).
    p, y = math.radians(30), math.radians(20)
    expected = math.degrees(math.acos(math.cos(p) ** 2 * math.cos(y) + math.sin(p) ** 2))
    assert gaze_angle_deg(np.array([y, p]), np.array([0, p])) == pytest.approx(expected)
    est = np.array([[0.0, 0.05, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    r = gaze_error(est, np.zeros((2, 4)))
    assert r.per_eye_deg == pytest.approx(np.array([[math.degrees(0.05), 0], [0, 0]]))
    assert r.mean_deg == pytest.approx(math.degrees(0.05) / 4)


def test_expression_mesh_error_rigid_offset_is_one_mm():
    rng = np.random.default_rng(1)
    neutral, deltas = rng.normal(size=(10, 3)) * 0.05, rng.normal(size=(4, 10, 3)) * 0.01
    offset = np.zeros((10, 3))
    offset[:5, 0] = 0.001  # 1 mm on the first 5 vertices

    def true_fn(b):
        return neutral + np.einsum("tk,knc->tnc", b, deltas)

    def est_fn(b):
        return true_fn(b) + offset

    b = rng.uniform(size=(7, 4))
    r = expression_mesh_error(b, b, est_fn, true_fn, chunk_frames=3)
    assert r.mean_mm == pytest.approx(0.5)  # 5 of 10 vertices at 1 mm
    assert r.per_frame_mm == pytest.approx(np.full(7, 0.5))
    assert r.per_vertex_mm == pytest.approx(np.r_[np.ones(5), np.zeros(5)])
    mask = np.r_[np.ones(5, bool), np.zeros(5, bool)]
    assert expression_mesh_error(b, b, est_fn, true_fn, vertex_mask=mask).mean_mm \
        == pytest.approx(1.0)
    assert expression_mesh_error(b, b, true_fn, true_fn).mean_mm == 0.0
    v = true_fn(b)
    assert vertex_error(v + [0, 0.001, 0], v, chunk_frames=2).mean_mm == pytest.approx(1.0)


def test_per_vertex_error_alignment_and_deltas():
    rng = np.random.default_rng(2)
    v = rng.normal(size=(30, 3)) * 0.05
    r3 = np.linalg.svd(rng.normal(size=(3, 3)))[0]
    r3 *= np.linalg.det(r3)  # a proper rotation
    moved = v @ r3.T + [0.01, -0.02, 0.005]
    assert per_vertex_error(moved, v).mean_mm > 1.0
    assert per_vertex_error(moved, v, align=True).mean_mm == pytest.approx(0, abs=1e-9)
    d = rng.normal(size=(3, 30, 3)) * 0.01
    e = d.copy()
    e[1] += [0.002, 0, 0]  # blendshape 1 off by 2 mm everywhere
    r = per_vertex_error(e, d)
    assert r.per_item_mm == pytest.approx([0, 2, 0]) and r.per_vertex_mm.shape == (3, 30)


def test_closest_point_on_triangle_regions():
    a, b, c = np.array([0.0, 0, 0]), np.array([1.0, 0, 0]), np.array([0.0, 1, 0])
    cases = {  # query -> closest point, one per Voronoi region
        (0.2, 0.2, 0.5): (0.2, 0.2, 0), (-1, -1, 0): (0, 0, 0), (2, -1, 0): (1, 0, 0),
        (-1, 2, 1): (0, 1, 0), (0.5, -1, 1): (0.5, 0, 0), (-1, 0.5, 0): (0, 0.5, 0),
        (1, 1, 0): (0.5, 0.5, 0),
    }
    p = np.array(list(cases), float)
    want = np.array(list(cases.values()), float)
    near, dist, tri, bary = ClosestPoints(np.stack([a, b, c]), np.array([[0, 1, 2]])).query(p)
    assert near == pytest.approx(want, abs=1e-7)
    assert dist == pytest.approx(np.linalg.norm(p - want, axis=1), abs=1e-7)
    assert (tri == 0).all() and bary.sum(1) == pytest.approx(1.0)
    assert bary[1] == pytest.approx([1, 0, 0], abs=1e-7) and bary[6] == pytest.approx([0, 0.5, 0.5], abs=1e-7)


def bumpy_grid(n: int = 12):
    """A height field over a 6 cm square (metres) and its triangles."""
    u, v = np.meshgrid(np.linspace(-0.03, 0.03, n), np.linspace(-0.03, 0.03, n))
    z = 0.01 * np.sin(80 * u) * np.cos(60 * v) + 0.02 * u * v / 0.03
    verts = np.stack([u.ravel(), v.ravel(), z.ravel()], axis=1)
    idx = np.arange(n * n).reshape(n, n)
    a, b = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel()
    c, d = idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.stack([a, b, c], 1), np.stack([b, d, c], 1)])
    return verts, faces


def test_mesh_surface_matches_brute_force():
    verts, faces = bumpy_grid(8)
    pts = np.random.default_rng(3).uniform(-0.04, 0.04, (200, 3))
    dist, near, face = MeshSurface(verts, faces).closest(pts)
    tri = verts[faces]
    rep = np.repeat(pts, len(faces), axis=0)
    # Brute force with trimesh's independent point-triangle routine, every pair.
    cp = trimesh.triangles.closest_point(np.tile(tri, (len(pts), 1, 1)), rep)
    brute = np.linalg.norm(cp - rep, axis=1).reshape(len(pts), len(faces)).min(axis=1)
    assert dist == pytest.approx(brute, abs=1e-8)  # Open3D searches in float32
    assert np.linalg.norm(near - pts, axis=1) == pytest.approx(dist)
    on_face = trimesh.triangles.closest_point(tri[face], pts)
    assert on_face == pytest.approx(near, abs=1e-8)  # the reported triangle holds the point


def test_now_error_of_a_rigidly_moved_copy_is_zero():
    verts, faces = bumpy_grid()
    rot = quat([1, -2, 0.5], 4)
    w, x, y, z = rot
    r = np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                  [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                  [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])
    scan = verts @ r.T + [0.002, -0.001, 0.003]
    raw = now_scan_to_mesh(verts, faces, scan, max_iterations=0)
    assert raw.mean_mm > 1.0  # misaligned before ICP
    icp = now_scan_to_mesh(verts, faces, scan)
    assert icp.median_mm < 1e-6 and icp.mean_mm < 1e-6
    assert icp.rotation @ r == pytest.approx(np.eye(3), abs=1e-9)  # undoes the motion
    lm = [0, 11, 70, 132, 143]
    fit = now_scan_to_mesh(verts, faces, scan, mesh_landmarks=verts[lm],
                           reference_landmarks=scan[lm], max_iterations=0)
    assert fit.mean_mm == pytest.approx(0, abs=1e-9) and fit.std_mm == pytest.approx(0, abs=1e-9)


def test_now_distance_without_alignment_by_hand():
    verts = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0]], float) * 0.1
    faces = np.array([[0, 1, 2], [1, 3, 2]])
    pts = np.array([[0.02, 0.03, 0.001], [0.05, 0.05, -0.002], [0.09, 0.01, 0.004]])
    r = now_scan_to_mesh(verts, faces, pts, max_iterations=0)
    # Points above a flat square: distances 1, 2, 4 mm -> median 2, mean 7/3,
    # std sqrt(((1-7/3)^2 + (2-7/3)^2 + (4-7/3)^2) / 3).
    assert r.distances_mm == pytest.approx([1, 2, 4])
    assert (r.median_mm, r.mean_mm) == pytest.approx((2, 7 / 3))
    m = 7 / 3
    assert r.std_mm == pytest.approx(math.sqrt(((1 - m) ** 2 + (2 - m) ** 2 + (4 - m) ** 2) / 3))
