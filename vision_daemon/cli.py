"""`vision-daemon`: parse flags -> Config -> run. No logic beyond that."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

from vision_daemon import __version__
from vision_daemon.config import FIELDS, ConfigError, bounds_text, camera_from_flag, load_config
from vision_daemon.detectors import ModelError
from vision_daemon.httpserver import HttpStartupError
from vision_daemon.ingest.tcp import StartupError
from vision_daemon.lifecycle import Daemon
from vision_daemon.log import setup_logging

log = logging.getLogger("vision_daemon")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vision-daemon",
        description="Real-time multi-camera object detection over TCP. "
        "Every setting of configs/default.toml is also a flag; flags override --config.",
    )
    parser.add_argument(
        "--config", metavar="FILE", help="TOML config file (see configs/default.toml)"
    )
    parser.add_argument("--version", action="version", version=f"vision-daemon {__version__}")
    parser.add_argument(
        "--camera",
        metavar="NAME=URL",
        action="append",
        default=[],
        help="pull this camera (rtsp://, http:// MJPEG or snapshot, a file, usb:N); repeatable; "
        "added to the config file's [[cameras]]",
    )
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        bounds = bounds_text(f)
        where = f"{f.metadata['section']}; {bounds}" if bounds else f.metadata["section"]
        helptext = f"{f.metadata['help']} [{where}]"
        if name == "model":  # repeated: more Triton endpoints (the rest go to `backends`)
            parser.add_argument(flag, dest=name, action="append", metavar="MODEL", help=helptext)
        elif isinstance(f.default, bool):
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=helptext
            )
        else:  # values are type-checked by load_config, with the same messages as the TOML file
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(), help=helptext)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k in FIELDS}
    models = overrides.pop("model") or []
    if models:
        overrides["model"] = models[0]
    if len(models) > 1:
        more = overrides.get("backends") or ""  # --backends a,b as well
        overrides["backends"] = [*models[1:], *(b for b in more.split(",") if b.strip())]
    try:
        overrides["cameras"] = [camera_from_flag(text) for text in args.camera]
        config = load_config(args.config, overrides)
        daemon = Daemon(config)
    except ConfigError as exc:
        print(f"vision-daemon: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_dir)
    log.info(
        "vision-daemon %s starting: model=%s workers=%d", __version__, config.model, config.workers
    )
    try:
        asyncio.run(daemon.run())
    except (StartupError, HttpStartupError, ModelError) as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
