"""One stream's multi-object tracker: ultralytics' ByteTrack, driven by frame timestamps.

ByteTrack counts in frames: its Kalman filter predicts one step per update and it forgets a lost
track after a number of updates. The daemon drops frames under load, so a stream's frames are
not evenly spaced. This wrapper makes the library's steps follow time:

- the stream's frame interval is the median of its last intervals (or `frame_interval_s`), and a
  frame that comes k intervals after the last one is preceded by k - 1 empty updates, so the
  filter predicts across the frames that were dropped and the object is matched where it has got
  to, keeping its track;
- a track ends when it has not been matched for more than `timeout_s` seconds (the library's own
  frame-count buffer is only a backstop); its ID is never handed out again, even if the library
  re-finds the object afterwards (that is a new track);
- a gap longer than `timeout_s` ends every track and starts the library afresh.

Track IDs are this stream's own (1, 2, 3, ...): each stream has its own StreamTracker, never
shared, and the library's IDs are mapped to them. A track's label is the one it was detected
with most often (ByteTrack matches across classes, so a box may flicker between labels).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from vision_daemon.analytics.settings import TrackingConfig

INTERVAL_WINDOW = 15  # frame intervals in the median that estimates a stream's frame interval
MAX_GAP_STEPS = 30  # at most this many predicted steps across a gap (the Kalman guess degrades)
LIBRARY_BUFFER = 10_000  # frames; the library's own expiry, a backstop behind timeout_s
_EMPTY = np.zeros((0, 6), dtype=np.float32)


@dataclass(slots=True)
class Track:
    """What the analytics know of one track."""

    track_id: int
    label: str
    class_id: int
    box: list[float]  # x1, y1, x2, y2 of its latest detection
    conf: float
    first_seen: float
    last_seen: float
    hits: int = 1  # frames it was matched in
    votes: Counter[str] = field(default_factory=Counter)
    class_ids: dict[str, int] = field(default_factory=dict)

    def observe(self, label: str, class_id: int, box: list[float], conf: float, t: float) -> None:
        self.box, self.conf, self.last_seen = box, conf, t
        self.hits += 1
        self.votes[label] += 1
        self.class_ids[label] = class_id
        if label != self.label and self.votes[label] > self.votes[self.label]:
            self.label, self.class_id = label, class_id


@dataclass(slots=True)
class TrackStep:
    """One frame's outcome: a track ID (or None: not tracked yet) per input detection, the
    tracks matched in it, the tracks it started and the tracks that ended (timed out)."""

    time: float
    track_ids: list[int | None]
    seen: list[Track]
    new: list[Track]
    ended: list[Track]


_TRACKER_CLASS: Any = None


def _byte_tracker_class() -> Any:
    """ultralytics' BYTETracker with a leaner Kalman correction step (made once).

    Imported here, not at the top: importing ultralytics takes seconds, and the settings,
    geometry and counting modules must stay cheap to import (config parsing uses them).
    """
    global _TRACKER_CLASS
    if _TRACKER_CLASS is not None:
        return _TRACKER_CLASS
    from ultralytics.trackers.byte_tracker import BYTETracker
    from ultralytics.trackers.utils.kalman_filter import KalmanFilterXYAH

    class LeanKalman(KalmanFilterXYAH):
        """The library's correction step in fewer array operations (it runs once per matched
        track per frame, and was half the tracker's time at 30 objects). With H the first four
        rows, the projected covariance is S = P[:4, :4] + R, the gain K = P[:, :4] S^-1, and
        K S K^T = K (H P) = K P[:4, :]. In this filter every coordinate is coupled only with its
        own velocity (a diagonal start, a per-coordinate motion model, diagonal noises), so
        P[:4, :4] and S are diagonal and S^-1 is a division. Same result to rounding
        (tests/unit/test_analytics.py compares it with the library's)."""

        def update(
            self,
            mean: np.ndarray,
            covariance: np.ndarray,
            measurement: np.ndarray,
            confidence: float | None = None,
        ) -> tuple[np.ndarray, np.ndarray]:
            var = (self._std_weight_position * mean[3]) ** 2
            noise = np.array([var, var, 1e-2, var])
            if confidence is not None:  # the library's NSA scaling, kept as it is
                noise *= max(1.0 - float(confidence), 0.05)
            gain = covariance[:, :4] / (np.diagonal(covariance)[:4] + noise)
            new_mean = mean + gain @ (measurement - mean[:4])
            return new_mean, covariance - gain @ covariance[:4, :]

    class LeanByteTracker(BYTETracker):
        def get_kalmanfilter(self) -> KalmanFilterXYAH:
            return LeanKalman()  # type: ignore[no-untyped-call]

    _TRACKER_CLASS = LeanByteTracker
    return _TRACKER_CLASS


def preload() -> None:
    """Import the tracker library now (seconds; call it in a thread at start-up), so that the
    first frame of a tracked stream is not the one that waits for the import."""
    _byte_tracker_class()
    _boxes(_EMPTY)


def _boxes(data: np.ndarray) -> Any:
    from ultralytics.engine.results import Boxes

    return Boxes(data, (1, 1))  # orig_shape only scales normalised coordinates, unused here


class StreamTracker:
    """ByteTrack for one stream, fed with the daemon's detections and the frames' timestamps."""

    def __init__(self, config: TrackingConfig | None = None) -> None:
        self.config = config or TrackingConfig()
        self._intervals: deque[float] = deque(maxlen=INTERVAL_WINDOW)
        self._now: float | None = None
        self._next_id = 1
        self._tracks: dict[int, Track] = {}  # ours, by our ID
        self._ids: dict[int, int] = {}  # the library's ID -> ours
        # Made at the first frame, not here: the first one imports ultralytics (seconds), which
        # belongs in a worker's thread, never on the event loop that creates streams.
        self._lib: Any = None

    @property
    def tracks(self) -> Mapping[int, Track]:
        """The live tracks (matched in the last `timeout_s`), by ID."""
        return self._tracks

    @property
    def interval_s(self) -> float | None:
        """The frame interval the steps are counted in (None until two frames came)."""
        if self.config.frame_interval_s > 0:
            return self.config.frame_interval_s
        return statistics.median(self._intervals) if self._intervals else None

    def update(self, detections: Sequence[Mapping[str, Any]], timestamp: float) -> TrackStep:
        """Track one frame's detections (dicts with bbox [x1, y1, x2, y2], conf, label,
        class_id), taken at `timestamp` seconds; frames must come in time order (an earlier
        timestamp counts as the last one)."""
        t = float(timestamp)
        ended: list[Track] = []
        steps = 1
        if self._now is not None:
            if not math.isfinite(t) or t < self._now:
                t = self._now
            gap = t - self._now
            if gap > self.config.timeout_s:  # everything timed out: start afresh
                ended = self._end([tr for tr in self._tracks.values()], t)
                self._lib = self._new_library()
            elif gap > 0:
                self._intervals.append(gap)
                interval = self.interval_s or gap
                steps = max(1, min(MAX_GAP_STEPS, round(gap / interval)))
        elif not math.isfinite(t):
            t = 0.0
        self._now = t

        if self._lib is None:
            self._lib = self._new_library()
        rows, kept = self._rows(detections)
        for _ in range(steps - 1):
            self._lib.update(_boxes(_EMPTY))
        out = np.asarray(self._lib.update(_boxes(rows)), dtype=np.float64).reshape(-1, 8)

        track_ids: list[int | None] = [None] * len(detections)
        seen: list[Track] = []
        new: list[Track] = []
        for row in out:
            i = kept[int(row[7])]
            if track_ids[i] is not None:
                continue
            det = detections[i]
            box = [float(c) for c in det["bbox"][:4]]
            label, class_id = str(det.get("label", "")), int(det.get("class_id", -1))
            conf = float(rows[int(row[7]), 4])
            ours = self._ids.get(int(row[4]))
            track = self._tracks.get(ours) if ours is not None else None
            if track is None:
                track = Track(self._next_id, label, class_id, box, conf, t, t)
                track.votes[label] = 1
                track.class_ids[label] = class_id
                self._ids[int(row[4])] = self._next_id
                self._tracks[self._next_id] = track
                self._next_id += 1
                new.append(track)
            else:
                track.observe(label, class_id, box, conf, t)
            track_ids[i] = track.track_id
            seen.append(track)

        timeout = self.config.timeout_s
        ended += self._end([tr for tr in self._tracks.values() if t - tr.last_seen > timeout], t)
        return TrackStep(t, track_ids, seen, new, ended)

    def reset(self) -> list[Track]:
        """End every track (the stream went away); returns them. IDs keep counting up."""
        ended = self._end(list(self._tracks.values()), self._now or 0.0)
        self._lib = None
        self._intervals.clear()
        self._now = None
        return ended

    # ---- internals ------------------------------------------------------------------------------
    def _new_library(self) -> Any:
        c = self.config
        args = SimpleNamespace(
            track_high_thresh=c.high_thresh,
            track_low_thresh=c.low_thresh,
            new_track_thresh=c.new_thresh,
            track_buffer=LIBRARY_BUFFER,
            match_thresh=c.match_thresh,
            fuse_score=True,
        )
        self._ids = {}
        return _byte_tracker_class()(args)

    @staticmethod
    def _rows(detections: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, list[int]]:
        """The library's input, [x1, y1, x2, y2, conf, class] rows, and for each row the index
        of its detection; boxes that are not 4 finite numbers with positive size are left out
        (they get no track ID)."""
        rows: list[list[float]] = []
        kept: list[int] = []
        for i, det in enumerate(detections):
            try:
                x1, y1, x2, y2 = (float(c) for c in det["bbox"][:4])
                conf = float(det.get("conf", 1.0))
                cls = float(det.get("class_id", -1))
            except (KeyError, TypeError, ValueError):
                continue
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2, conf)) or x2 <= x1 or y2 <= y1:
                continue
            rows.append([x1, y1, x2, y2, conf, cls])
            kept.append(i)
        data = np.asarray(rows, dtype=np.float32) if rows else _EMPTY
        return data, kept

    def _end(self, tracks: list[Track], t: float) -> list[Track]:
        """Forget these tracks here and in the library (so it cannot bring them back)."""
        if not tracks:
            return []
        gone = {tr.track_id for tr in tracks}
        for tr in tracks:
            del self._tracks[tr.track_id]
        lib_gone = {lib for lib, ours in self._ids.items() if ours in gone}
        for lib in lib_gone:
            del self._ids[lib]
        for pool in ("tracked_stracks", "lost_stracks") if self._lib is not None else ():
            kept = []
            for st in getattr(self._lib, pool):
                if st.track_id in lib_gone:
                    st.mark_removed()
                else:
                    kept.append(st)
            setattr(self._lib, pool, kept)
        return tracks
