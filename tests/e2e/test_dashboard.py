"""The web dashboard in a real browser: headless Chromium (the Debian package) driven by Playwright.

One daemon for the module runs the real model on a pulled camera looping vtest.avi, with a token;
the test keeps its own /ws subscription to compare what the page drew with what the model found.
Screenshots go to artifacts/dashboard/ (gitignored).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import cv2
import httpx
import numpy as np
import pytest
import websockets

from tests.conftest import ROOT, VIDEO, connect, jpeg, running_daemon, shared_model, wait_for_sync
from vision_daemon.config import camera_config
from vision_daemon.lifecycle import Daemon
from vision_daemon.tokens import TokenConfig

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
try:
    from playwright.sync_api import Browser, Page, sync_playwright
except ImportError:
    pytest.skip(
        "browser tests skipped: Playwright is not installed (pip install -e '.[dev]')",
        allow_module_level=True,
    )
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(
        "browser tests skipped: no chromium (apt-get install chromium; make test does it as root)",
        allow_module_level=True,
    )

pytestmark = pytest.mark.slow  # real sockets, a real model and a real browser

TOKEN = "dashboard-test-token"
VIEWER_TOKEN = "dashboard-viewer-token"
STREAM = "street"
ARTIFACTS = ROOT / "artifacts" / "dashboard"
KEEP_RESULTS = 2000


@dataclass
class LiveDaemon:
    """A daemon on its own event loop in a thread, and the test's own /ws subscriber on it."""

    settings: dict[str, Any]
    load: Callable[[Daemon], Coroutine[Any, Any, None]] | None = None  # runs beside the daemon
    results: OrderedDict[int, list[dict[str, Any]]] = field(default_factory=OrderedDict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0
    error: BaseException | None = None
    _up: threading.Event = field(default_factory=threading.Event)
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None
    _thread: threading.Thread | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> None:
        self._thread = threading.Thread(target=self._run, name="dashboard-daemon", daemon=True)
        self._thread.start()
        if not self._up.wait(timeout):
            raise AssertionError("the daemon did not start in time")
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to the test thread by start()
            self.error = exc
        finally:
            self._up.set()

    async def _main(self) -> None:
        async with running_daemon(**self.settings) as d:
            assert d.api_port is not None
            self.port = d.api_port
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            tasks = [asyncio.create_task(self._collect())]
            if self.load is not None:
                tasks.append(asyncio.create_task(self.load(d)))
            self._up.set()
            await self._stop.wait()
            for task in tasks:
                task.cancel()

    async def _collect(self) -> None:
        """Every result of the stream, by frame id (the last KEEP_RESULTS), from our own /ws."""
        url = f"ws://127.0.0.1:{self.port}/ws?stream={quote(STREAM)}"
        auth = {"Authorization": f"Bearer {TOKEN}"} if self.settings.get("auth_token") else {}
        while True:
            try:
                async with websockets.connect(url, additional_headers=auth) as ws:
                    async for text in ws:
                        msg = json.loads(text)
                        if msg.get("type") != "result":
                            continue
                        with self.lock:
                            self.results[msg["frame_id"]] = msg["detections"]
                            while len(self.results) > KEEP_RESULTS:
                                self.results.popitem(last=False)
            except (OSError, websockets.WebSocketException):
                await asyncio.sleep(0.2)

    def boxes(self, frame_id: int) -> list[dict[str, Any]] | None:
        with self.lock:
            return self.results.get(frame_id)

    def http(self) -> httpx.Client:
        token = self.settings.get("auth_token")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=10)


@pytest.fixture(scope="module")
def daemon() -> Iterator[LiveDaemon]:
    shared_model("yolov8n_int8_openvino_model")
    camera = camera_config(name=STREAM, url=str(VIDEO), loop=True, max_fps=5.0)
    live = LiveDaemon(
        {
            "model": "yolov8n",
            "model_dir": str(shared_model(".")),
            "workers": 1,
            "auth_token": TOKEN,
            "tokens": (TokenConfig("wall", "viewer", token=VIEWER_TOKEN),),
            "cameras": (camera,),
            "stats_refresh_s": 0.5,
            "stats_history_interval_s": 0.5,
        }
    )
    live.start()
    try:
        with live.http() as h:

            def processing() -> bool:
                r = h.get("/stats")
                return (
                    r.status_code == 200
                    and r.json()["streams"].get(STREAM, {}).get("processed", 0) > 0
                )

            wait_for_sync(processing, 120, "the camera's first processed frame", interval=0.1)
        yield live
    finally:
        live.stop()


MANY = 64


async def push_many(d: Daemon) -> None:
    """MANY pushed streams at 2 fps, 8 a connection; the replies are read and ignored."""
    image = jpeg()

    async def one_connection(names: list[str]) -> None:
        client = await connect(d)

        async def drain() -> None:
            async for _ in client.messages():
                pass

        reader = asyncio.create_task(drain())
        try:
            for frame_id in range(10**9):
                for name in names:
                    await client.send_frame(name, frame_id, image)
                await asyncio.sleep(0.5)
        finally:
            reader.cancel()
            await client.close()

    names = [f"cam{i:02d}" for i in range(MANY)]
    async with asyncio.TaskGroup() as group:
        for k in range(0, MANY, 8):
            group.create_task(one_connection(names[k : k + 8]))


@pytest.fixture(scope="module")
def many() -> Iterator[LiveDaemon]:
    live = LiveDaemon({"stats_refresh_s": 0.5}, load=push_many)  # the none detector, no token
    live.start()
    try:
        with live.http() as h:
            wait_for_sync(
                lambda: len(h.get("/stats").json()["streams"]) == MANY,
                30,
                f"{MANY} streams",
                interval=0.1,
            )
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@dataclass
class Session:
    """A page on the dashboard, with every URL it requested and every page or console error."""

    page: Page
    origin: str
    urls: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def console(self, kind: str, text: str) -> None:
        """Console errors count (a CSP violation among them), but not an HTTP error status: the
        page expects 401 for a wrong token and 404 for a camera whose stream is not up yet."""
        if kind == "error" and not text.startswith("Failed to load resource"):
            self.errors.append(text)

    def sign_in(self, token: str) -> None:
        self.page.fill("#token", token)
        self.page.click("#login-form button[type=submit]")

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"))

    def check_origin_and_errors(self) -> None:
        """Every request and WebSocket went to the daemon's origin, no URL held the token, and
        the page raised nothing."""
        assert self.urls, "the page made no requests"
        ws_origin = self.origin.replace("http://", "ws://", 1)
        for url in self.urls:
            parts = urlsplit(url)
            assert f"{parts.scheme}://{parts.netloc}" in (self.origin, ws_origin), url
            assert TOKEN not in url and b64(TOKEN) not in url, f"token in a URL: {url}"
        assert not self.errors, self.errors


def b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@contextmanager
def open_dashboard(browser: Browser, live: LiveDaemon) -> Iterator[Session]:
    """A fresh browser context (its own sessionStorage) on the daemon's dashboard."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    s = Session(page, live.base)
    page.on("request", lambda r: s.urls.append(r.url))
    page.on("websocket", lambda ws: s.urls.append(ws.url))
    page.on("pageerror", lambda e: s.errors.append(str(e)))
    page.on("console", lambda m: s.console(m.type, m.text))
    page.set_default_timeout(30_000)
    page.goto(live.base + "/")
    try:
        yield s
    finally:
        context.close()


@pytest.fixture
def session(browser: Browser, daemon: LiveDaemon) -> Iterator[Session]:
    with open_dashboard(browser, daemon) as s:
        yield s


TILE = f'.tile[data-stream="{STREAM}"]'
CANVAS_STATE = """async (selector) => {
  const { PALETTE } = await import("/web/draw.js");
  // One synchronous block: the frame id and the pixels are of the same drawing.
  const c = document.querySelector(selector);
  return { id: c.dataset.frameId, boxes: c.dataset.boxes, png: c.toDataURL("image/png"), palette: PALETTE };
}"""


def hex_rgb(color: str) -> np.ndarray:
    return np.array([int(color[i : i + 2], 16) for i in (1, 3, 5)], np.int16)


def edge_match(rgb: np.ndarray, box: list[float], color: np.ndarray) -> float:
    """The share of pixels along the box's four edges that are the stroke colour."""
    h, w, _ = rgb.shape
    x1, y1, x2, y2 = (int(v) for v in box)
    x1, x2 = max(0, min(x1, w - 1)), max(0, min(x2, w - 1))
    y1, y2 = max(0, min(y1, h - 1)), max(0, min(y2, h - 1))
    xs = np.arange(x1, x2 + 1)
    ys = np.arange(y1, y2 + 1)
    pts = np.concatenate(
        [
            rgb[np.full_like(xs, y1), xs],
            rgb[np.full_like(xs, y2), xs],
            rgb[ys, np.full_like(ys, x1)],
            rgb[ys, np.full_like(ys, x2)],
        ]
    )
    close = np.all(np.abs(pts.astype(np.int16) - color) <= 40, axis=1)
    return float(close.mean())


def test_wrong_token_shows_the_login_error(session: Session) -> None:
    """A wrong token shows the login error and no dashboard; the right one then opens it."""
    page = session.page
    page.wait_for_selector("#login-form", state="visible")
    session.sign_in("not-the-token")
    page.wait_for_selector("#login-error", state="visible")
    assert "wrong token" in page.inner_text("#login-error").lower()
    assert page.is_hidden("#app")
    assert page.evaluate("sessionStorage.length") == 0
    session.shot("login-error")
    session.sign_in(TOKEN)
    page.wait_for_selector(TILE)
    assert page.is_hidden("#login-error") and page.is_visible("#app")
    session.check_origin_and_errors()


def test_tile_draws_the_models_boxes_where_the_model_found_them(
    session: Session, daemon: LiveDaemon
) -> None:
    """The stream's tile shows a frame with the boxes /ws gave for that very frame id, in the
    class's stroke colour along each box edge."""
    page = session.page
    session.sign_in(TOKEN)
    canvas = f"{TILE} canvas"
    page.wait_for_selector(f"{canvas}[data-frame-id]")
    deadline = time.monotonic() + 30
    checked = 0
    while checked < 3:
        assert time.monotonic() < deadline, f"only {checked} frames with boxes could be checked"
        state = page.evaluate(CANVAS_STATE, canvas)
        frame_id = int(state["id"])
        boxes = daemon.boxes(frame_id)
        if not boxes or state["boxes"] != str(len(boxes)):
            time.sleep(0.2)  # a frame without people, or one our subscriber has not seen yet
            continue
        png = base64.b64decode(state["png"].split(",", 1)[1])
        bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
        rgb = bgr[:, :, ::-1]
        assert rgb.shape[:2] == (576, 768)
        palette = state["palette"]
        shares = [
            edge_match(rgb, d["bbox"], hex_rgb(palette[d["class_id"] % len(palette)]))
            for d in boxes
            if d["bbox"][2] - d["bbox"][0] >= 6 and d["bbox"][3] - d["bbox"][1] >= 6
        ]
        assert shares and min(shares) >= 0.5 and float(np.mean(shares)) >= 0.8, (frame_id, shares)
        # The strokes are on the edges, not everywhere: most of the frame is the video.
        stroke = hex_rgb(palette[0])
        assert float(np.all(np.abs(rgb.astype(np.int16) - stroke) <= 40, axis=2).mean()) < 0.2
        checked += 1
        if checked == 1:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            (ARTIFACTS / "tile-canvas.png").write_bytes(png)
            session.shot("grid")
        page.wait_for_function(
            "([sel, id]) => document.querySelector(sel).dataset.frameId !== id",
            arg=[canvas, state["id"]],
        )
    session.check_origin_and_errors()


def test_figures_and_charts_change_over_time(session: Session) -> None:
    """The stream's counters, the totals and the charts update while the camera streams."""
    page = session.page
    session.sign_in(TOKEN)
    cell = f'#streams-table tr[data-stream="{STREAM}"] td.processed'
    page.wait_for_selector(cell)
    first = page.inner_text(cell)
    total = page.inner_text('#summary dd[data-key="processed"]')
    page.wait_for_function(
        "([sel, old]) => document.querySelector(sel).textContent !== old", arg=[cell, first]
    )
    page.wait_for_function(
        "(old) => document.querySelector('#summary dd[data-key=\"processed\"]').textContent !== old",
        arg=total,
    )
    page.wait_for_selector('#workers-table tr td.state:text-matches("ready|busy")')
    assert "openvino" in page.inner_text('#model-facts dd[data-key="backend"]').lower()
    page.wait_for_selector(f'#cameras-table tr[data-camera="{STREAM}"] td.state:text("streaming")')
    page.wait_for_function(
        "document.querySelector('#chart-fps').dataset.points > 0 &&"
        " document.querySelector('#chart-latency').dataset.points > 0"
    )
    session.shot("figures")
    session.check_origin_and_errors()


def test_large_view_draws_and_changes_the_streams_options(
    session: Session, daemon: LiveDaemon
) -> None:
    """Clicking the tile opens the large view with its own live frame and figures; its form
    changes the stream's max_fps and skip_frames on the daemon."""
    page = session.page
    session.sign_in(TOKEN)
    page.click(TILE)
    page.wait_for_selector("#detail[open]")
    page.wait_for_selector("#detail-canvas[data-frame-id]")
    page.wait_for_function(
        "document.querySelector('#detail-facts dd[data-key=\"processed\"]').textContent !== '\u2013'"
    )
    session.shot("large-view")
    with daemon.http() as h:
        try:
            page.fill("#detail-skip", "2")
            page.fill("#detail-maxfps", "3")
            page.click("#detail-apply")
            page.wait_for_selector("#detail-msg:text('Applied')")

            def options() -> tuple[int, float]:
                o = h.get(f"/streams/{STREAM}").json()["options"]
                return o["skip_frames"], o["max_fps"]

            # /streams serves the snapshot, rebuilt every stats_refresh_s
            wait_for_sync(
                lambda: options() == (2, 3.0), 10, "the new options in /streams", interval=0.1
            )
        finally:
            h.patch(f"/streams/{STREAM}", json={"skip_frames": 1, "max_fps": 5.0})
    page.fill("#detail-skip", "0")
    page.click("#detail-apply")
    assert page.evaluate("document.querySelector('#detail-skip').validity.valid") is False
    page.click("#detail-close")
    page.wait_for_selector("#detail", state="hidden")
    session.check_origin_and_errors()


def test_adds_and_removes_a_pulled_camera(session: Session, daemon: LiveDaemon) -> None:
    """The add-camera form starts a pulled camera that gets a tile; Remove (clicked twice)
    stops it."""
    page = session.page
    session.sign_in(TOKEN)
    page.wait_for_selector(TILE)
    page.fill("#cam-name", "second")
    page.fill("#cam-url", str(VIDEO))
    page.fill("#cam-maxfps", "1")
    page.check("#cam-loop")
    page.click("#add-camera-form button[type=submit]")
    page.wait_for_selector("#add-camera-msg:text('added')")
    page.wait_for_selector('.tile[data-stream="second"]')
    with daemon.http() as h:
        try:
            assert h.get("/cameras/second").json()["options"]["max_fps"] == 1.0
            page.fill("#cam-name", "second")
            page.fill("#cam-url", str(VIDEO))
            page.click("#add-camera-form button[type=submit]")
            page.wait_for_selector("#add-camera-msg:text('Not added')")  # the name is taken
            remove = '#cameras-table tr[data-camera="second"] button.remove'
            page.click(remove)
            page.click(remove)
            page.wait_for_selector('#cameras-table tr[data-camera="second"]', state="detached")
            assert h.get("/cameras/second").status_code == 404
        finally:
            h.delete("/cameras/second")
    session.check_origin_and_errors()


def test_a_viewer_sees_the_streams_but_no_control_it_may_not_use(session: Session) -> None:
    """Signed in with a viewer token: tiles and the cameras table, but no add-camera form, no
    Remove buttons and no stream-options form (the daemon would refuse them: 403)."""
    page = session.page
    session.sign_in(VIEWER_TOKEN)
    page.wait_for_selector(TILE)
    page.wait_for_selector(f'#cameras-table tr[data-camera="{STREAM}"]')
    assert page.evaluate("document.body.dataset.role") == "viewer"
    assert page.is_hidden("#add-camera-form")
    assert page.is_hidden(f'#cameras-table tr[data-camera="{STREAM}"] button.remove')
    assert page.is_hidden("#detail-form")
    session.check_origin_and_errors()


def test_no_request_leaves_the_daemons_origin(session: Session) -> None:
    """Signing in, the live grid, the charts and the large view request only the daemon's
    origin (HTTP and WebSocket), and never put the token in a URL."""
    page = session.page
    session.sign_in(TOKEN)
    page.wait_for_selector(f"{TILE} canvas[data-frame-id]")
    page.wait_for_function("document.querySelector('#chart-fps').dataset.points > 0")
    page.click(TILE)
    page.wait_for_selector("#detail-canvas[data-frame-id]")
    assert any(urlsplit(u).path == "/ws" for u in session.urls), session.urls
    assert any(urlsplit(u).path.endswith("/frame.jpg") for u in session.urls)
    session.check_origin_and_errors()


def test_sixty_four_streams_page_and_fetch_only_tiles_on_screen(
    browser: Browser, many: LiveDaemon
) -> None:
    """With 64 pushed streams the grid pages them, only tiles on screen fetch frames, each with one
    request in flight, and the running page adds or removes no DOM nodes."""
    with open_dashboard(browser, many) as s:  # no token on this daemon: no sign-in
        page = s.page
        page.wait_for_selector(".tile canvas[data-frame-id]")
        assert page.locator(".tile").count() == MANY
        assert page.locator(".tile:not([hidden])").count() == 16
        in_flight: dict[str, set[Any]] = {}  # requests seen starting, by stream
        most: Counter[str] = Counter()
        fetched: list[str] = []

        def stream_of(r: Any) -> str | None:
            path = urlsplit(r.url).path
            return path.split("/")[2] if path.endswith("/frame.jpg") else None

        def started(r: Any) -> None:
            if (name := stream_of(r)) is not None:
                fetched.append(name)
                in_flight.setdefault(name, set()).add(r)
                most[name] = max(most[name], len(in_flight[name]))

        def ended(r: Any) -> None:
            if (name := stream_of(r)) is not None:
                in_flight.get(name, set()).discard(r)

        page.on("request", started)
        page.on("requestfinished", ended)
        page.on("requestfailed", ended)
        page.evaluate(
            """() => { window.nodesChanged = []; new MutationObserver((ms) => {
                for (const m of ms) window.nodesChanged.push(m.target.id || m.target.className);
            }).observe(document.body, { subtree: true, childList: true }); }"""
        )
        page.wait_for_timeout(3000)  # a window to watch, not a synchronisation
        on_screen = page.evaluate(
            """() => [...document.querySelectorAll('.tile:not([hidden])')].filter((t) => {
                const r = t.getBoundingClientRect(); return r.bottom > 0 && r.top < innerHeight;
            }).map((t) => t.dataset.stream)"""
        )
        assert fetched and set(fetched) <= set(on_screen), (set(fetched), on_screen)
        assert max(most.values()) == 1, most
        assert page.evaluate("window.nodesChanged") == []  # text nodes change in place
        page.click("#page-next")
        page.wait_for_selector('.tile[data-stream="cam16"] canvas[data-frame-id]')
        assert page.is_hidden('.tile[data-stream="cam00"]')
        s.shot("sixty-four")
        s.check_origin_and_errors()
