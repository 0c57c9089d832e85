"""The TCP protocol over a Unix domain socket: permissions, stale files, clients, accounting."""

from __future__ import annotations

import json
import socket
import stat
from pathlib import Path

import pytest

from clients.lib import DaemonClient
from tests.conftest import accounted, collect, jpeg, run, running_daemon, stats, wait_for
from tests.e2e.test_clients import program
from vision_daemon.config import ConfigError, load_config
from vision_daemon.ingest.tcp import StartupError

pytestmark = pytest.mark.slow


def test_unix_socket_serves_the_protocol_with_mode_0600_and_is_removed_at_shutdown(
    tmp_path: Path,
) -> None:
    """A client on the socket gets results like a TCP one; the file is 0600 and goes at exit."""
    path = tmp_path / "vision.sock"

    async def main() -> None:
        async with running_daemon(unix_socket=str(path)) as d:
            assert stat.S_ISSOCK(path.stat().st_mode)
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            c = await DaemonClient.connect(unix_socket=str(path))
            msgs = []
            for i in range(3):  # one at a time: back to back, the queue may evict (queue_full)
                await c.send_frame("local", i, jpeg())
                msgs += await collect(c, 1)
            assert [m["frame_id"] for m in msgs] == [0, 1, 2]
            assert all(m["type"] == "result" for m in msgs)
            assert stats(d)["streams"]["local"]["peer"].startswith("unix:")
            assert stats(d)["connections"]["open"] == 1
            await c.bye()
            await wait_for(lambda: stats(d)["connections"]["open"] == 0)
            assert accounted(d)
        assert not path.exists()

    run(main())


def test_unix_socket_mode_is_configurable_and_checked(tmp_path: Path) -> None:
    """unix_socket_mode = 0660 gives a 0660 socket; a mode that is not octal is refused."""
    path = tmp_path / "group.sock"

    async def main() -> None:
        async with running_daemon(unix_socket=str(path), unix_socket_mode="0660"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o660

    run(main())
    with pytest.raises(ConfigError, match="unix_socket_mode must be octal"):
        load_config(overrides={"unix_socket_mode": "rw-------"}, environ={})


def test_stale_socket_is_replaced_but_a_file_or_a_live_socket_is_not(tmp_path: Path) -> None:
    """A socket file left by a dead daemon is replaced; a regular file at the path, or a socket
    another process serves, stops start-up with a one-line error."""
    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))
    dead.close()  # the file stays, nobody listens
    plain = tmp_path / "plain.sock"
    plain.write_text("not a socket")

    async def main() -> None:
        async with running_daemon(unix_socket=str(stale)):
            c = await DaemonClient.connect(unix_socket=str(stale))
            await c.bye()
            with pytest.raises(StartupError, match="another process is serving it"):
                async with running_daemon(unix_socket=str(stale)):
                    pass
        with pytest.raises(StartupError, match="it exists and is not a socket"):
            async with running_daemon(unix_socket=str(plain)):
                pass
        assert plain.read_text() == "not a socket"

    run(main())


def test_vision_client_streams_over_the_unix_socket(tmp_path: Path) -> None:
    """vision-client --transport unix sends and gets every frame answered; either flag without
    the other is refused with exit 2."""
    path = tmp_path / "c.sock"

    async def main() -> None:
        async with running_daemon(unix_socket=str(path)) as d:
            rc, out, err = await program(
                "vision-client",
                *("--transport", "unix", "--unix-socket", str(path), "--stream", "u"),
                *("--fps", "20", "--duration", "2", "--no-save", "--json"),
            )
            assert rc == 0, err
            summary = json.loads(out)
            assert summary["frames_sent"] > 0
            assert summary["results"] + summary["server_drops"] == summary["frames_sent"]
            assert stats(d)["streams"]["u"]["received"] == summary["frames_sent"]
        rc, _, err = await program("vision-client", "--transport", "unix", "--no-save")
        assert rc == 2 and "--unix-socket" in err
        rc, _, err = await program("vision-client", "--unix-socket", str(path), "--no-save")
        assert rc == 2 and "--transport unix" in err

    run(main())
