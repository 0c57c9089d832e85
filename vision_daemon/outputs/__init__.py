"""What leaves besides the reply: the /ws hub, the latest frame of each watched stream, and the
event outputs (MQTT, webhooks)."""

from vision_daemon.outputs.frames import (
    FrameImage,
    LatestFrames,
    as_image,
    encode_jpeg,
    snapshot_jpeg,
)
from vision_daemon.outputs.hub import Hub, Subscriber

__all__ = [
    "FrameImage",
    "Hub",
    "LatestFrames",
    "Subscriber",
    "as_image",
    "encode_jpeg",
    "snapshot_jpeg",
]
