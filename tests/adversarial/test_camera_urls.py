"""The camera URL policy (issue 27): what a camera URL may reach, checked in one place for the
config file, --camera and POST /cameras. Real sockets: a listener records every connection, so
"nothing was opened" is seen, not assumed."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import api, run, running_daemon, stats, wait_for
from tests.sources import VIDEO
from vision_daemon.config import ConfigError, camera_config, load_config

pytestmark = pytest.mark.slow  # real sockets, daemons

SECRET_TEXT = "root:x:0:0 very secret line"


class Listener:
    """A TCP listener that records every connection it accepts (and says nothing)."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    try:
        yield lst
    finally:
        lst.close()


@pytest.fixture
def media(tmp_path: Path) -> Path:
    """A media folder with a real video, a text file, a symlink out of it and a secret beside."""
    folder = tmp_path / "media"
    folder.mkdir()
    (folder / "clip.avi").symlink_to(VIDEO)  # resolves outside: refused, like any way out
    (folder / "real.avi").write_bytes(VIDEO.read_bytes()[: 1 << 20])
    (folder / "notes.txt").write_text(SECRET_TEXT)
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET_TEXT)
    secret.chmod(0o600)
    (folder / "leak.txt").symlink_to(secret)
    return folder


def refused_urls(listener: Listener, media: Path) -> list[tuple[str, str]]:
    port = listener.port
    return [
        (f"http://127.0.0.1:{port}/stream", "loopback"),
        (f"rtsp://127.0.0.1:{port}/live", "loopback"),
        (f"http://localhost:{port}/stream", "loopback"),  # a name that resolves there
        (f"http://[::ffff:127.0.0.1]:{port}/", "loopback"),
        (f"http://0.0.0.0:{port}/", "unspecified"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),  # cloud metadata
        (str(media.parent / "secret.txt"), "inside camera_media_dir"),
        (str(media / "leak.txt"), "inside camera_media_dir"),
        (str(media / "notes.txt"), "not a video container"),
        ("file:///etc/passwd", "inside camera_media_dir"),
        ("/dev/zero", "/dev/videoN"),
        (f"concat:{media / 'real.avi'}|{media / 'notes.txt'}", "url must be"),
        (f"subfile,,start,0,end,100,,:{media / 'notes.txt'}", "inside camera_media_dir"),
        ("ftp://192.168.1.20/cam.mjpg", "url must be"),
        ("gopher://192.168.1.20/", "url must be"),
    ]


def test_each_refused_class_gets_a_422_and_nothing_is_opened(
    listener: Listener, media: Path
) -> None:
    """POST /cameras with each URL the policy refuses: 422 with a one-line reason that names
    the class and never the file's text; the listener saw no connection; no camera exists."""

    async def main() -> None:
        async with (
            running_daemon(camera_allow_local=False, camera_media_dir=str(media)) as d,
            api(d) as h,
        ):
            for i, (url, why) in enumerate(refused_urls(listener, media)):
                r = await h.post("/cameras", json={"name": f"c{i}", "url": url})
                assert r.status_code == 422, (url, r.status_code, r.text)
                detail = r.json()["detail"]
                assert why in detail and "\n" not in detail, (url, detail)
                assert "secret" not in detail.replace("secret.txt", ""), detail
            r = await h.post("/cameras", json={"name": "ok", "url": str(media / "real.avi")})
            assert r.status_code == 201, r.text  # a real video inside the media folder
            assert listener.accepted == 0
            assert set(stats(d)["cameras"]) == {"ok"}

    run(main())


def test_a_camera_may_be_allowed_local_by_itself_or_by_the_daemon(listener: Listener) -> None:
    """allow_local on the camera, or camera_allow_local on the daemon, lets a loopback camera
    through: the listener then sees the connection."""

    async def main() -> None:
        async with running_daemon(camera_allow_local=False) as d, api(d) as h:
            url = f"http://127.0.0.1:{listener.port}/stream"
            body = {"name": "lo", "url": url, "allow_local": True, "retry_max_s": 60}
            assert (await h.post("/cameras", json=body)).status_code == 201
            await wait_for(lambda: listener.accepted >= 1, what="the camera's connection")

    run(main())


def non_loopback_ipv4() -> str | None:
    """This box's own address on its network (a private LAN address, allowed by default)."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("10.255.255.255", 1))  # no packet is sent: it only picks a route
        address = str(probe.getsockname()[0])
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") else address


def test_a_redirect_to_a_refused_address_is_refused(listener: Listener) -> None:
    """An HTTP camera on this box's LAN address (allowed) that redirects to 127.0.0.1: the hop
    is checked again and refused; the camera fails saying so, and the loopback listener sees
    nothing."""
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this box has no non-loopback IPv4 address to serve an allowed camera on")
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    target = f"http://127.0.0.1:{listener.port}/stream"

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer((address, 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:

        async def main() -> None:
            async with running_daemon(camera_allow_local=False) as d, api(d) as h:
                url = f"http://{address}:{server.server_port}/stream"
                body = {"name": "hop", "url": url, "retry_max_s": 60}
                assert (await h.post("/cameras", json=body)).status_code == 201
                await wait_for(
                    lambda: "redirect refused" in (stats(d)["cameras"]["hop"]["last_error"] or ""),
                    what="the redirect refused",
                )
                assert stats(d)["cameras"]["hop"]["state"] == "failed"
                assert listener.accepted == 0

        run(main())
    finally:
        server.shutdown()
        server.server_close()


def test_the_config_file_and_camera_flag_are_held_to_the_same_policy(
    tmp_path: Path, media: Path
) -> None:
    """[[cameras]] in a file and --camera (given to load_config as the CLI does) are refused
    at load time, with the same one-line reasons."""
    toml = tmp_path / "c.toml"
    toml.write_text(
        f'[limits]\ncamera_media_dir = "{media}"\n\n'
        f'[[cameras]]\nname = "a"\nurl = "{media / "notes.txt"}"\n'
    )
    with pytest.raises(ConfigError, match="not a video container"):
        load_config(toml, environ={})
    flag = camera_config(name="b", url="http://169.254.169.254/")
    with pytest.raises(ConfigError, match="link-local"):
        load_config(overrides={"cameras": (flag,)}, environ={})
    ok = camera_config(name="c", url=str(media / "real.avi"))
    config = load_config(overrides={"cameras": (ok,), "camera_media_dir": str(media)}, environ={})
    assert config.cameras == (ok,)
    assert os.path.exists(media / "real.avi")
