"""The ports file: where a launcher reads the daemon's real ports (port 0 lets the OS pick them)
instead of parsing log lines. Written atomically once everything listens, removed at shutdown."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from vision_daemon.ingest.tcp import StartupError


def write(path: str, ports: Mapping[str, object]) -> None:
    """`ports` as one JSON object: a temp file in the same folder, then os.replace (atomic)."""
    target = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise StartupError(f"cannot write ports_file {path}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(ports, fh)
            fh.write("\n")
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove(path: str) -> None:
    """Remove the file if it is still this process's (another daemon may have written it since)."""
    try:
        ours = json.loads(Path(path).read_text()).get("pid") == os.getpid()
    except (OSError, ValueError, AttributeError):
        return
    if ours:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
