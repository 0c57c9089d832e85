"""What leaves besides the reply: the /ws hub, the latest frame of each watched stream, and the
event outputs (MQTT, webhooks)."""

from vision_daemon.outputs.events import EventOutput
from vision_daemon.outputs.frames import (
    FrameImage,
    LatestFrames,
    as_image,
    encode_jpeg,
    snapshot_jpeg,
)
from vision_daemon.outputs.hub import Hub, Subscriber
from vision_daemon.outputs.mqtt import MqttOutput
from vision_daemon.outputs.webhooks import WebhookOutput

__all__ = [
    "EventOutput",
    "FrameImage",
    "Hub",
    "LatestFrames",
    "MqttOutput",
    "Subscriber",
    "WebhookOutput",
    "as_image",
    "encode_jpeg",
    "snapshot_jpeg",
]
