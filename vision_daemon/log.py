"""Logging: stderr plus a rotating logs/vision-daemon.log; modules use getLogger(__name__)."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(level: str, log_dir: str) -> Path | None:
    root = logging.getLogger()
    root.setLevel(level.upper())
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stderr = logging.StreamHandler()
    stderr.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(stderr)
    path = None
    if log_dir:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        path = Path(log_dir) / "vision-daemon.log"
        rotating = logging.handlers.RotatingFileHandler(path, maxBytes=10 * 2**20, backupCount=5)
        rotating.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(rotating)
    # ultralytics logs every model load at INFO through its own logger; keep ours readable.
    logging.getLogger("ultralytics").setLevel(logging.WARNING)
    return path
