"""Tracking, zones and lines (issue 18, the pure core): a scripted detector proves counts and events
exactly, and bad settings are refused with one line."""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from vision_daemon.analytics import (
    AnalyticsConfig,
    Event,
    LineConfig,
    StreamAnalytics,
    StreamTracker,
    TrackingConfig,
    ZoneConfig,
    analytics_from_toml,
    line_from_dict,
    tracking_from_dict,
    zone_from_dict,
)
from vision_daemon.analytics.geometry import Line, anchor_point
from vision_daemon.analytics.settings import MAX_POLYGON_POINTS, MAX_ZONES_PER_STREAM
from vision_daemon.config import ConfigError

T = 0.125  # seconds between scripted frames (8 fps; exact in binary, so times compare exactly)


CLASS_IDS = {"person": 0, "car": 2}


MID = LineConfig("walk", "mid", ((0.0, 330.0), (768.0, 330.0)))  # "in" = upwards on the screen


DOOR = ZoneConfig("walk", "door", ((100.0, 100.0), (300.0, 100.0), (300.0, 400.0), (100.0, 400.0)))


Frame = list[dict[str, Any]]


def box(
    x: float, bottom: float, label: str = "person", w: float = 40, h: float = 80
) -> dict[str, Any]:
    """A detection whose bottom-centre anchor is at (x + w/2, bottom)."""
    return {
        "label": label,
        "conf": 0.9,
        "bbox": [float(x), float(bottom - h), float(x + w), float(bottom)],
        "class_id": CLASS_IDS[label],
    }


def feed(
    a: StreamAnalytics, frames: Iterable[tuple[int, Frame]]
) -> tuple[list[Event], list[list[int | None]]]:
    """Feed (frame number, detections) pairs at k * T; all events and each frame's track IDs."""
    events: list[Event] = []
    ids: list[list[int | None]] = []
    for k, dets in frames:
        out, ev = a.update(dets, k * T)
        events += ev
        ids.append([d["track_id"] for d in out])
    return events, ids


def brief(events: Sequence[Event]) -> list[tuple[Any, ...]]:
    """Events as (type, zone or line, direction, label, track_id, time, dwell_s) tuples."""
    return [
        (e.type, e.zone or e.line, e.direction, e.label, e.track_id, e.time, e.dwell_s)
        for e in events
    ]


# ---- lines ----------------------------------------------------------------------------------------
def test_crossings_in_both_directions_are_counted_by_class_and_direction() -> None:
    """A person walking down crosses "out", a person and a car going up cross "in": one event
    each, at the first frame 4 px past the line, with their own track IDs."""
    a = StreamAnalytics("walk", lines=[MID])
    frames = [
        (
            k,
            [
                box(100, 280 + 10 * k),  # down: bottom 280 -> 420
                box(400, 430 - 10 * k),  # up: bottom 430 -> 290
                box(600, 360 - 10 * k, "car", w=80, h=60),  # up: bottom 360 -> 220
            ],
        )
        for k in range(15)
    ]
    events, ids = feed(a, frames)
    assert all(frame_ids == [1, 2, 3] for frame_ids in ids)
    assert brief(events) == [
        ("cross", "mid", "in", "car", 3, 4 * T, None),  # bottom 320: 10 px above
        ("cross", "mid", "out", "person", 1, 6 * T, None),  # bottom 340: 10 px below
        ("cross", "mid", "in", "person", 2, 11 * T, None),
    ]
    assert a.counts()["lines"] == {"mid": {"in": {"car": 1, "person": 1}, "out": {"person": 1}}}
    assert events[0].to_dict() == {
        "type": "cross",
        "stream": "walk",
        "time": 0.5,
        "track_id": 3,
        "label": "car",
        "box": (600.0, 260.0, 680.0, 320.0),
        "line": "mid",
        "direction": "in",
    }


def test_dropped_frames_keep_the_track_and_give_one_crossing() -> None:
    """Eight frames dropped while a person crosses (it moves 96 px, more than its height): the
    timestamps make ByteTrack predict across the gap, so the track keeps its ID and crosses once;
    counted as one frame step, as the library alone would, the same frames split the track."""
    frames = [(k, [box(100, 180 + 12 * k)]) for k in range(30) if not 10 <= k < 18]
    a = StreamAnalytics("walk", lines=[MID])
    events, ids = feed(a, frames)
    assert ids == [[1]] * len(frames)
    assert brief(events) == [("cross", "mid", "out", "person", 1, 18 * T, None)]
    assert a.tracker.interval_s == T

    naive = StreamAnalytics("walk", TrackingConfig(frame_interval_s=60.0), lines=[MID])
    events, ids = feed(naive, frames)
    assert {i for frame_ids in ids for i in frame_ids} == {1, 2, None}
    assert events == []  # the new track starts below the line


def test_jitter_on_a_line_does_not_double_count() -> None:
    """A box whose anchor shakes 3 px either side of the line (inside the 4 px band) counts once
    when it gets across and once when it comes back; with no band every shake would count."""
    shake = [327, 333] * 8
    bottoms = [300, 310, 320, *shake, 340, 350, 360, *shake, 320, 310, 300]
    frames = [(k, [box(300, b)]) for k, b in enumerate(bottoms)]
    a = StreamAnalytics("walk", lines=[MID])
    events, ids = feed(a, frames)
    assert {i for frame_ids in ids for i in frame_ids} == {1}
    assert [(e.direction, e.time) for e in events] == [("out", 19 * T), ("in", 38 * T)]
    assert a.counts()["lines"]["mid"] == {"in": {"person": 1}, "out": {"person": 1}}

    no_band = LineConfig("walk", "mid", MID.points, min_distance_px=0)
    b = StreamAnalytics("walk", lines=[no_band])
    events, _ = feed(b, frames)
    assert len(events) == 15 + 16 + 1  # every change of sign counts


def test_a_track_passing_beside_the_end_of_a_line_does_not_cross_it() -> None:
    """A line drawn over x 0..200 is not crossed by a person walking down at x 400."""
    short = LineConfig("walk", "short", ((0.0, 330.0), (200.0, 330.0)))
    a = StreamAnalytics("walk", lines=[short])
    events, _ = feed(a, [(k, [box(400, 280 + 10 * k)]) for k in range(12)])
    assert events == []
    assert a.counts()["lines"]["short"] == {"in": {}, "out": {}}


def test_the_centre_anchor_and_the_classes_filter() -> None:
    """With anchor "center" a box whose bottom dips across the line does not cross; a line that
    counts only cars ignores a person who crosses it."""
    dip = [300, 310, 320, 330, 340, 350, 360, 350, 340, 330, 320, 310, 300]
    frames = [(k, [box(300, b)]) for k, b in enumerate(dip)]
    bottom = StreamAnalytics("walk", lines=[MID])
    assert [e.direction for e in feed(bottom, frames)[0]] == ["out", "in"]
    centre = LineConfig("walk", "mid", MID.points, anchor="center")
    assert feed(StreamAnalytics("walk", lines=[centre]), frames)[0] == []
    cars = LineConfig("walk", "mid", MID.points, classes=("car",))
    assert feed(StreamAnalytics("walk", lines=[cars]), frames)[0] == []


def test_line_directions_follow_the_left_hand_side_rule() -> None:
    """Facing from the first point to the second on the screen, left is "in" (positive side):
    above a left-to-right line, right of a top-to-bottom one."""
    assert Line((0, 330), (768, 330)).side((10, 300)) == 30
    assert Line((768, 330), (0, 330)).side((10, 300)) == -30
    assert Line((100, 0), (100, 500)).side((150, 50)) == 50
    assert anchor_point([10, 20, 30, 60], "bottom_center") == (20, 60)
    assert anchor_point([10, 20, 30, 60], "center") == (20, 40)


# ---- zones ----------------------------------------------------------------------------------------
def walk_x(anchors: Sequence[float], bottom: float = 300) -> list[tuple[int, Frame]]:
    """Frames of one person whose anchor walks through these x positions."""
    return [(k, [box(x - 20, bottom)]) for k, x in enumerate(anchors)]


def test_leaving_and_re_entering_a_zone_counts_two_enters_and_two_exits() -> None:
    """A person walks through the door zone, stops, walks back through it: enter, exit (dwell
    2.5 s), enter, exit again, all one track; occupancy and dwell follow."""
    out_and_back = [*range(20, 361, 10), 360, 360, 360, 360, *range(350, 19, -10)]
    a = StreamAnalytics("walk", zones=[DOOR])
    events, ids = feed(a, walk_x(out_and_back))
    assert {i for frame_ids in ids for i in frame_ids} == {1}
    # In at anchor x 110 (k 9; 100 is the edge, 4 px are needed), out at 310 (k 29); after the
    # stop (k 35..38) back in at 290 (k 45), out at 90 (k 65).
    assert brief(events) == [
        ("enter", "door", None, "person", 1, 9 * T, None),
        ("exit", "door", None, "person", 1, 29 * T, 20 * T),
        ("enter", "door", None, "person", 1, 45 * T, None),
        ("exit", "door", None, "person", 1, 65 * T, 20 * T),
    ]
    zone = a.counts()["zones"]["door"]
    assert zone == {
        "occupancy": {},
        "entered": {"person": 2},
        "exited": {"person": 2},
        "dwell_s": {},
    }

    inside = StreamAnalytics("walk", zones=[DOOR])
    feed(inside, walk_x(out_and_back[:17]))  # up to anchor x 180 (k 16), inside since k 9
    assert inside.counts()["zones"]["door"]["occupancy"] == {"person": 1}
    assert inside.counts()["zones"]["door"]["dwell_s"] == {1: 7 * T}


def test_jitter_on_a_zone_edge_enters_once() -> None:
    """An anchor shaking 3 px either side of the zone's edge does not enter; it enters once when
    it is 4 px or more inside and does not leave while it shakes there again."""
    shake = [97, 103] * 6
    anchors = [60, 80, *shake, 110, 120, *[x + 10 for x in shake], 130]
    a = StreamAnalytics("walk", zones=[DOOR])
    events, _ = feed(a, walk_x(anchors))
    assert brief(events) == [("enter", "door", None, "person", 1, 14 * T, None)]


def test_loiter_fires_once_per_track_after_the_threshold() -> None:
    """Standing in the door zone: loiter fires at the first frame 2 s after entering, once;
    leaving and coming back for longer does not fire again for that track."""
    door = ZoneConfig("walk", "door", DOOR.polygon, loiter_s=2.0)
    a = StreamAnalytics("walk", zones=[door])
    turn = [*range(210, 361, 10), 360, 360, 360, 360, *range(350, 199, -10)]  # k 24..59
    anchors = [200] * 24 + turn + [200] * 24
    events, ids = feed(a, walk_x(anchors))
    assert {i for frame_ids in ids for i in frame_ids} == {1}
    kinds = [(e.type, e.time, e.dwell_s) for e in events]
    assert kinds == [
        ("enter", 0.0, None),
        ("loiter", 16 * T, 2.0),
        ("exit", 34 * T, 34 * T),  # anchor 310 (k 34)
        ("enter", 50 * T, None),  # anchor 290 (k 50)
    ]
    assert a.counts()["zones"]["door"]["dwell_s"] == {1: (83 - 50) * T}  # 4.1 s: no 2nd loiter


def test_zone_classes_filter_counts_only_those_labels() -> None:
    """A person-only zone does not see a car drive through it."""
    people = ZoneConfig("walk", "door", DOOR.polygon, classes=("person",))
    a = StreamAnalytics("walk", zones=[people])
    frames = [(k, [box(x - 40, 300, "car", w=80, h=60)]) for k, x in enumerate(range(20, 400, 20))]
    assert feed(a, frames)[0] == []
    assert a.counts()["zones"]["door"]["entered"] == {}


# ---- tracks ---------------------------------------------------------------------------------------
def test_new_object_fires_once_per_new_track_of_a_watched_class() -> None:
    """Watching people: two people give two new_object events, the car none; the first person
    gone past the timeout and back is a new track and a new event."""
    a = StreamAnalytics("walk", TrackingConfig(timeout_s=1.0, new_object_classes=("person",)))
    frames: list[tuple[int, Frame]] = []
    for k in range(40):
        dets = [box(600, 200 + k, "car", w=80, h=60)]
        if k < 10 or k >= 25:
            dets.append(box(100, 300))
        if k >= 5:
            dets.append(box(400, 300 - k))
        frames.append((k, dets))
    events, ids = feed(a, frames)
    assert [(e.type, e.label, e.track_id, e.time) for e in events] == [
        ("new_object", "person", 2, 0.0),  # the car, listed first, got ID 1
        ("new_object", "person", 3, 6 * T),  # seen at k 5, confirmed at k 6
        ("new_object", "person", 4, 26 * T),  # back at k 25 after 1.875 s unseen
    ]
    assert ids[5] == [1, 2, None] and ids[6] == [1, 2, 3]
    assert ids[25] == [1, None, 3] and ids[26] == [1, 4, 3]


def test_tracks_end_after_the_timeout_and_exit_their_zones() -> None:
    """A person last seen at 0.875 s is still a track at 1.875 s (1 s unseen) and ends at 2 s,
    exiting the zone with the dwell it was seen for; a longer gap ends every track at once."""
    a = StreamAnalytics("walk", TrackingConfig(timeout_s=1.0), zones=[DOOR])
    events, _ = feed(a, [(k, [box(180, 300)]) for k in range(8)])
    assert brief(events) == [("enter", "door", None, "person", 1, 0.0, None)]
    events, _ = feed(a, [(k, []) for k in range(8, 16)])
    assert events == [] and a.counts()["tracks"] == 1
    assert a.counts()["zones"]["door"]["dwell_s"] == {1: 15 * T}
    events, _ = feed(a, [(16, [])])
    assert brief(events) == [("exit", "door", None, "person", 1, 2.0, 7 * T)]
    assert a.counts()["tracks"] == 0
    assert a.counts()["zones"]["door"]["occupancy"] == {}

    b = StreamTracker(TrackingConfig(timeout_s=1.0))
    b.update([box(100, 300), box(400, 300)], 0.0)
    step = b.update([box(100, 300), box(400, 300)], 5.0)
    assert [t.track_id for t in step.ended] == [1, 2]
    assert step.track_ids == [3, 4]  # a fresh start: the first frame's tracks are confirmed at once


def test_each_stream_has_its_own_tracker_and_ids() -> None:
    """Two streams fed the same boxes number their tracks from 1 each and do not share state."""
    a, b = StreamAnalytics("a"), StreamAnalytics("b")
    for k in range(5):
        out_a, _ = a.update([box(100 + k, 300)], k * T)
        out_b, _ = b.update([box(500, 300), box(100 + k, 300)], k * T)
    assert [d["track_id"] for d in out_a] == [1]
    assert [d["track_id"] for d in out_b] == [1, 2]
    assert a.tracker is not b.tracker


def test_detections_keep_their_fields_and_bad_boxes_get_no_track_id() -> None:
    """Each detection comes back as a copy with track_id added; a degenerate or malformed box
    is passed through with track_id None; the input is not changed."""
    dets = [
        box(100, 300),
        {"label": "person", "conf": 0.9, "bbox": [5, 5, 5, 50], "class_id": 0},
        {"label": "person", "conf": 0.9, "bbox": [float("nan"), 1, 2, 3], "class_id": 0},
        {"label": "person", "conf": 0.9, "class_id": 0},
    ]
    out, _ = StreamAnalytics("walk").update(dets, 0.0)
    assert [d.get("track_id", "missing") for d in out] == [1, None, None, None]
    assert out[0] == {**dets[0], "track_id": 1}
    assert "track_id" not in dets[0]


def test_timestamps_that_go_back_count_as_the_last_one() -> None:
    """A frame stamped earlier than the last one is tracked at the last time: no negative
    dwell, no crash, and the track goes on."""
    a = StreamAnalytics("walk", zones=[DOOR])
    a.update([box(180, 300)], 10.0)
    out, events = a.update([box(181, 300)], 9.0)
    assert out[0]["track_id"] == 1 and events == []
    assert a.counts()["time"] == 10.0
    assert a.counts()["zones"]["door"]["dwell_s"] == {1: 0.0}


# ---- configuration --------------------------------------------------------------------------------
ISSUE_TOML = """
[tracking]
timeout_s = 3
new_object_classes = ["person"]

[[lines]]
stream = "walk"
name = "mid"
points = [[0, 330], [768, 330]]

[[zones]]
stream = "walk"
name = "door"
polygon = [[100, 100], [300, 100], [300, 400], [100, 400]]
anchor = "center"
loiter_s = 30
classes = ["person", "car"]
"""


def test_the_issue_toml_parses_into_frozen_configs() -> None:
    """The issue's [[lines]] and [[zones]] tables, with options, become the expected configs."""
    config = analytics_from_toml(tomllib.loads(ISSUE_TOML))
    assert config == AnalyticsConfig(
        tracking=TrackingConfig(timeout_s=3.0, new_object_classes=("person",)),
        lines=(MID,),
        zones=(
            ZoneConfig("walk", "door", DOOR.polygon, "center", ("person", "car"), loiter_s=30.0),
        ),
    )
    assert config.lines_of("walk") == (MID,) and config.zones_of("other") == ()
    assert analytics_from_toml({}) == AnalyticsConfig()
    assert StreamAnalytics.from_config(config, "walk").counts()["zones"]["door"]["entered"] == {}


def line(**over: Any) -> dict[str, Any]:
    return {"stream": "walk", "name": "mid", "points": [[0, 330], [768, 330]], **over}


def zone(**over: Any) -> dict[str, Any]:
    return {"stream": "walk", "name": "door", "polygon": [[0, 0], [10, 0], [10, 10]], **over}


@pytest.mark.parametrize(
    ("parse", "raw", "message"),
    [
        (
            line_from_dict,
            line(colour="red"),
            "bad line 'mid' of stream 'walk': unknown setting 'colour'",
        ),
        (
            line_from_dict,
            {"stream": "walk", "name": "mid"},
            "bad line 'mid' of stream 'walk': points is required",
        ),
        (
            line_from_dict,
            line(points=[[0, 0], [1, 1], [2, 2]]),
            "bad line 'mid' of stream 'walk': points must be a list of 2 [x, y] pairs of finite "
            "pixel coordinates",
        ),
        (
            line_from_dict,
            line(points=[[0, 0], [float("nan"), 1]]),
            "bad line 'mid' of stream 'walk': points must be a list of 2 [x, y] pairs of finite pixel "
            "coordinates (|x|, |y| <= 100000)",
        ),
        (
            line_from_dict,
            line(points=[[0, 0], [True, 1]]),
            "bad line 'mid' of stream 'walk': points must be a list of 2 [x, y] pairs of finite pixel "
            "coordinates (|x|, |y| <= 100000)",
        ),
        (
            line_from_dict,
            line(points=[[5, 5], [5, 5]]),
            "bad line 'mid' of stream 'walk': points must be two different points",
        ),
        (
            line_from_dict,
            line(anchor="top"),
            "bad line 'mid' of stream 'walk': anchor must be one of bottom_center, center",
        ),
        (
            line_from_dict,
            line(min_distance_px=-1),
            "bad line 'mid' of stream 'walk': min_distance_px must be 0..1000",
        ),
        (
            line_from_dict,
            line(min_distance_px="4"),
            "bad line 'mid' of stream 'walk': min_distance_px: must be a number",
        ),
        (
            line_from_dict,
            line(classes="person"),
            "bad line 'mid' of stream 'walk': classes: must be a list of label strings",
        ),
        (
            line_from_dict,
            line(name="mid line"),
            "bad line '?' of stream 'walk': name must be 1-64 letters, digits and _ . : - "
            "starting with a letter or digit",
        ),
        (line_from_dict, "mid", "bad line: each line must be a table/object with stream and name"),
        (
            zone_from_dict,
            zone(polygon=[[0, 0], [1, 1]]),
            "bad zone 'door' of stream 'walk': polygon must be a list of 3..64 [x, y] pairs of "
            "finite pixel coordinates",
        ),
        (
            zone_from_dict,
            zone(polygon=[[i, i % 2] for i in range(MAX_POLYGON_POINTS + 1)]),
            "bad zone 'door' of stream 'walk': polygon must be a list of 3..64 [x, y] pairs of "
            "finite pixel coordinates",
        ),
        (
            zone_from_dict,
            zone(polygon=[[0, 0], [1e9, 0], [0, 1]]),
            "bad zone 'door' of stream 'walk': polygon must be a list of 3..64 [x, y] pairs of finite pixel "
            "coordinates (|x|, |y| <= 100000)",
        ),
        (
            zone_from_dict,
            zone(polygon=[[0, 0], [5, 5], [10, 10]]),
            "bad zone 'door' of stream 'walk': polygon must enclose an area (not all on one line)",
        ),
        (
            zone_from_dict,
            zone(loiter_s=-5),
            "bad zone 'door' of stream 'walk': loiter_s must be 0 (off) or 0.1..604800",
        ),
        (tracking_from_dict, {"timeout": 2}, "bad [tracking]: unknown setting 'timeout'"),
        (tracking_from_dict, {"timeout_s": 0}, "bad [tracking]: timeout_s must be 0.01..3600"),
        (
            tracking_from_dict,
            {"low_thresh": 0.5, "high_thresh": 0.3},
            "bad [tracking]: low_thresh, high_thresh and new_thresh must be 0..1 with low <= high",
        ),
    ],
)
def test_bad_settings_are_refused_with_one_line(parse: Any, raw: Any, message: str) -> None:
    """Each bad line, zone or tracking setting is a ConfigError whose one line names it."""
    with pytest.raises(ConfigError) as info:
        parse(raw)
    assert str(info.value) == message
    assert "\n" not in message


def test_per_stream_bounds_and_unique_names() -> None:
    """A stream may have at most MAX_ZONES_PER_STREAM zones, and two zones (or two lines) of one
    stream may not share a name; other streams are counted apart."""
    many = [zone(name=f"z{i}") for i in range(MAX_ZONES_PER_STREAM)]
    assert len(analytics_from_toml({"zones": many}).zones) == MAX_ZONES_PER_STREAM
    more = [*many, zone(name="extra", stream="other")]
    assert len(analytics_from_toml({"zones": more}).zones_of("other")) == 1
    with pytest.raises(ConfigError, match=r"^bad zones: stream 'walk' has more than 16 zones$"):
        analytics_from_toml({"zones": [*many, zone(name="extra")]})
    with pytest.raises(ConfigError, match=r"^bad lines: stream 'walk' has two lines named 'mid'$"):
        analytics_from_toml({"lines": [line(), line()]})
    with pytest.raises(ConfigError, match=r"^bad config: zones must be \[\[zones\]\] tables$"):
        analytics_from_toml({"zones": {"stream": "walk"}})


def test_lean_kalman_update_equals_the_librarys() -> None:
    """The tracker's leaner correction step gives the library's result (to rounding) along
    tracks built by the library's own initiate and predict, with and without a confidence."""
    from ultralytics.trackers.utils.kalman_filter import KalmanFilterXYAH

    from vision_daemon.analytics.tracking import _byte_tracker_class

    lean = _byte_tracker_class()(SimpleNamespace(track_buffer=30)).get_kalmanfilter()
    ref = KalmanFilterXYAH()
    rng = np.random.default_rng(7)
    for _ in range(20):
        mean, cov = ref.initiate(rng.uniform([0, 0, 0.3, 20], [700, 500, 2.0, 200]))
        for step in range(10):
            mean, cov = ref.predict(mean, cov)
            measured = mean[:4] + rng.normal(0, [3, 3, 0.02, 3])
            conf = None if step % 2 else float(rng.uniform(0.2, 1.0))
            want = ref.update(mean, cov, measured, conf)
            got = lean.update(mean, cov, measured, conf)
            assert np.allclose(got[0], want[0], rtol=1e-9, atol=1e-9)
            assert np.allclose(got[1], want[1], rtol=1e-9, atol=1e-9)
            mean, cov = want
