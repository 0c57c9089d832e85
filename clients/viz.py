"""vision-viz: send frames from a camera or file and draw the returned boxes on those frames.

    vision-viz --source ../shared/data/vtest.avi            # OpenCV window, q quits
    vision-viz --source 0 --headless --record out.mp4       # no window: write annotated video

Boxes are drawn on the frame they belong to (matched by frame_id), never on a later one. The
recording holds one annotated frame per result, in the order results arrive; frames the daemon
dropped are not recorded. Exit codes are vision-client's.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from clients.client import (
    add_send_args,
    check_send_args,
    print_summary,
    run_source,
    send_fps,
    summarize,
)
from clients.engine import Hooks
from clients.lib import (
    EXIT_OK,
    EXIT_PROTOCOL,
    EXIT_SOURCE,
    ClientError,
    add_daemon_args,
    exit_code,
    stop_on_signals,
)
from clients.sources import SourceError, open_source

PENDING_FRAMES = 256  # frames kept while their result is outstanding; older ones are forgotten


def color(class_id: int) -> tuple[int, int, int]:
    """A stable, distinct BGR colour per class."""
    hue = (class_id * 47) % 180
    hsv = np.uint8([[[hue, 220, 255]]])
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def draw(img: np.ndarray, result: dict[str, Any], fps: float) -> np.ndarray:
    """Boxes, labels and an fps / latency overlay, drawn with OpenCV's built-in Hershey font."""
    out = img.copy()
    for det in result.get("detections", []):
        x1, y1, x2, y2 = (round(float(v)) for v in det["bbox"])
        c = color(int(det.get("class_id", 0)))
        cv2.rectangle(out, (x1, y1), (x2, y2), c, 2)
        text = f"{det['label']} {det['conf']:.2f}"
        (tw, th), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        top = max(y1, th + 4)
        cv2.rectangle(out, (x1, top - th - 4), (x1 + tw + 2, top), c, -1)
        cv2.putText(out, text, (x1 + 1, top - 3), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
    rtt = result.get("rtt_ms", result.get("latency_ms", 0.0))
    overlay = f"{fps:5.1f} fps  {rtt:6.1f} ms  frame {result.get('frame_id')}"
    cv2.putText(out, overlay, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 3)
    cv2.putText(out, overlay, (8, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 1)
    return out


class Viewer:
    """Keeps sent frames by id until their result arrives, then shows or records them."""

    def __init__(self, headless: bool, record: str | None, fps: float, stop: asyncio.Event):
        self.headless = headless
        self.record = record
        self.fps = fps
        self.stop = stop
        self.frames: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self.writer: cv2.VideoWriter | None = None
        self.shown: collections.deque[float] = collections.deque(maxlen=30)
        self.written = 0
        self.error = ""

    def on_send(self, frame_id: int, img: np.ndarray | None) -> None:
        if img is None:
            return
        self.frames[frame_id] = img
        while len(self.frames) > PENDING_FRAMES:
            self.frames.popitem(last=False)

    def on_dropped(self, msg: dict[str, Any]) -> None:
        self.frames.pop(msg.get("frame_id", -1), None)

    def on_result(self, msg: dict[str, Any]) -> None:
        img = self.frames.pop(msg.get("frame_id", -1), None)
        if img is None:  # its frame was forgotten: never draw on another frame
            return
        now = time.monotonic()
        self.shown.append(now)
        fps = (len(self.shown) - 1) / (now - self.shown[0]) if len(self.shown) > 1 else 0.0
        annotated = draw(img, msg, fps)
        if self.record:
            if self.writer is None:
                h, w = annotated.shape[:2]
                fourcc = cv2.VideoWriter.fourcc(*"mp4v")
                self.writer = cv2.VideoWriter(self.record, fourcc, self.fps, (w, h))
                if not self.writer.isOpened():  # reported by main(); the run stops here
                    self.error = f"cannot write video {self.record!r}"
                    self.record = None
                    self.stop.set()
                    return
            self.writer.write(annotated)
            self.written += 1
        if not self.headless:
            cv2.imshow("vision-viz", annotated)
            if cv2.waitKey(1) & 0xFF == ord("q"):
                self.stop.set()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
        if not self.headless:
            cv2.destroyAllWindows()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="vision-viz", description="Stream a camera or file and draw the daemon's detections."
    )
    ap.add_argument("--source", default="0", help="camera index, video file or URL (default 0)")
    ap.add_argument("--loop", action="store_true", help="loop a video file")
    add_daemon_args(ap)
    add_send_args(ap)
    ap.add_argument("--headless", action="store_true", help="no window (use with --record)")
    ap.add_argument("--record", default=None, help="write the annotated video to this .mp4")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_send_args(ap, args)
    if args.headless and not args.record:
        ap.error("--headless needs --record FILE.mp4 (there is nothing else to show)")
    args.encoding = "jpeg"  # vision-client's run_source reads it; viz always sends JPEG
    try:
        source = open_source("video", args.source, loop=args.loop)
    except SourceError as exc:
        print(f"vision-viz: {exc}", file=sys.stderr)
        return EXIT_SOURCE
    if args.record:
        try:
            Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(f"vision-viz: cannot write video {args.record!r}: {exc}", file=sys.stderr)
            return EXIT_SOURCE

    async def run() -> Any:
        stop = stop_on_signals()
        viewer = Viewer(args.headless, args.record, send_fps(args, source), stop)
        hooks = Hooks(viewer.on_send, viewer.on_result, viewer.on_dropped)
        try:
            return await run_source(args, source, stop, hooks, "vision-viz"), viewer
        finally:
            viewer.close()

    try:
        result, viewer = asyncio.run(run())
    except ClientError as exc:
        print(f"vision-viz: {exc}", file=sys.stderr)
        return exit_code(exc)
    except SourceError as exc:
        print(f"vision-viz: {exc}", file=sys.stderr)
        return EXIT_SOURCE
    finally:
        source.close()
    if viewer.error:
        print(f"vision-viz: {viewer.error}", file=sys.stderr)
        return EXIT_SOURCE
    print_summary(summarize(result))
    if args.record:
        print(f"recorded {viewer.written} annotated frames to {args.record}")
    return EXIT_PROTOCOL if result.closed_by_server else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
