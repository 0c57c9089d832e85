"""From boxes to answers (issue 18): per-stream tracking, zones and lines, counts and events.

A pure policy layer: no sockets, threads or clocks. The daemon keeps one StreamAnalytics per
stream and feeds it each frame's detections with the frame's timestamp.
"""

from vision_daemon.analytics.counting import Event, EventData, LineCounter, ZoneCounter, ZoneCounts
from vision_daemon.analytics.settings import (
    AnalyticsConfig,
    LineConfig,
    TrackingConfig,
    ZoneConfig,
    analytics_from_toml,
    line_from_dict,
    tracking_from_dict,
    zone_from_dict,
)
from vision_daemon.analytics.stream import StreamAnalytics, StreamCounts
from vision_daemon.analytics.tracking import StreamTracker, Track, TrackStep, preload

__all__ = [
    "AnalyticsConfig",
    "Event",
    "EventData",
    "LineConfig",
    "LineCounter",
    "StreamAnalytics",
    "StreamCounts",
    "StreamTracker",
    "Track",
    "TrackStep",
    "TrackingConfig",
    "ZoneConfig",
    "ZoneCounter",
    "ZoneCounts",
    "analytics_from_toml",
    "line_from_dict",
    "preload",
    "tracking_from_dict",
    "zone_from_dict",
]
