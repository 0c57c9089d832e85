"""Makes docs/dashboard.png, the user guide's screenshot of the web dashboard (not a benchmark).

    VISION_DAEMON_MODEL_DIR=../shared/models YOLO_OFFLINE=1 \\
      .venv/bin/python -m benchmarks.screenshot --out docs/dashboard.png

A daemon in this process runs the real model on three pulled cameras, each looping vtest.avi at
its own max_fps, added with POST /cameras 12 s apart (so the tiles show different moments); after
--seconds (so the charts have a line), headless Chromium (the Debian package, through Playwright)
takes a 1000 px wide screenshot of the page, and Pillow reduces it to a 256-colour optimised PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import shutil
from pathlib import Path

import httpx
from PIL import Image
from playwright.async_api import async_playwright

from benchmarks.harness import ROOT, VIDEO
from vision_daemon.config import load_config
from vision_daemon.lifecycle import Daemon

CAMERAS = (("street-a", 5.0), ("street-b", 3.0), ("street-c", 2.0))
CAMERA_STAGGER_S = 12.0


async def shoot(args: argparse.Namespace) -> bytes:
    settings = {
        "model": args.model,
        "model_dir": args.model_dir,
        "workers": 1,
        "tcp_port": 0,
        "api_port": 0,
        "log_dir": "",
        "stats_history_interval_s": 1.0,
        "camera_media_dir": str(args.video.resolve().parent),  # file cameras live only there
    }
    daemon = Daemon(load_config(overrides=settings, environ={}))
    await daemon.start()
    base = f"http://127.0.0.1:{daemon.api_port}"
    try:
        async with httpx.AsyncClient(base_url=base) as h:
            for i, (name, fps) in enumerate(CAMERAS):
                if i:
                    await asyncio.sleep(CAMERA_STAGGER_S)
                camera = {"name": name, "url": str(args.video), "loop": True, "max_fps": fps}
                (await h.post("/cameras", json=camera)).raise_for_status()
        async with async_playwright() as p:
            chromium = shutil.which("chromium") or "/usr/bin/chromium"
            browser = await p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = await browser.new_page(viewport={"width": 1000, "height": args.height})
            await page.goto(f"{base}/")
            await asyncio.sleep(args.seconds)  # a screenshot, not a test: let the charts fill
            for name, _ in CAMERAS:
                await page.wait_for_selector(f'.tile[data-stream="{name}"] canvas[data-boxes]')
            png = await page.screenshot()
            await browser.close()
            return png
    finally:
        await daemon.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    ap.add_argument("--video", type=Path, default=VIDEO)
    ap.add_argument("--model", default="yolov8n")
    ap.add_argument("--model-dir", default=os.environ.get("VISION_DAEMON_MODEL_DIR", "models"))
    ap.add_argument("--seconds", type=float, default=30.0, help="after the last camera is added")
    ap.add_argument("--height", type=int, default=860)
    args = ap.parse_args()
    png = asyncio.run(shoot(args))
    image = Image.open(io.BytesIO(png)).convert("RGB")
    small = image.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    small.save(args.out, optimize=True)
    print(f"{args.out}: {image.width}x{image.height}, {args.out.stat().st_size // 1024} KiB")


if __name__ == "__main__":
    main()
