"""What listening needs besides asyncio: the start-up error, and the Unix socket's file (bound
with its mode before it exists, a dead daemon's file replaced, anyone else's refused)."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

from vision_daemon.pending import LISTEN_BACKLOG


class StartupError(Exception):
    """The daemon cannot start (port in use, model missing); the message is one line."""


def clear_stale_socket(path: str) -> None:
    """Remove a socket file a dead daemon left; refuse a live one, one we may not probe, or a
    file that is no socket (start-up only: blocking is fine here)."""
    target = Path(path)
    try:
        st = target.lstat()  # never follows a link
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StartupError(f"cannot listen on {path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nobody listens: a dead daemon's file
        try:
            target.unlink()
        except OSError as exc:
            raise StartupError(
                f"cannot remove the stale socket {path} ({exc.strerror or exc})"
            ) from None
    except OSError as exc:  # EACCES (another user's socket), a timeout (a stuck server), ...
        raise StartupError(
            f"cannot listen on {path}: a socket is there and cannot be probed "
            f"({exc.strerror or exc}); remove it if no daemon uses it"
        ) from None
    else:
        raise StartupError(f"cannot listen on {path}: another process is serving it")
    finally:
        probe.close()


def bind_unix(path: str, mode: int) -> socket.socket:
    """A listening Unix socket whose file is never wider than `mode`: the mode is set on the
    socket before bind (Linux creates the file with it, less the umask), then the file is given
    exactly `mode`, which can only widen it within `mode`. No process-wide umask change."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), mode)
        sock.bind(path)
        os.chmod(path, mode)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path} ({exc.strerror or exc})") from None
    return sock
