"""The dashboard's static files, served at / and /web/{name} with a strict CSP."""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

WEB_DIR = Path(__file__).resolve().parents[1] / "web"
# The dashboard's own files only: no inline script or style, no other origin, no framing.
DASHBOARD_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def router(web_dir: Path | None = None) -> APIRouter:
    """The files of `web_dir` (default WEB_DIR, read when the app is made)."""
    r = APIRouter(include_in_schema=False)
    files = web_files(WEB_DIR if web_dir is None else web_dir)

    def web_file(name: str) -> Response:
        found = files.get(name)
        if found is None:
            raise HTTPException(404, "no such dashboard file")
        body, media_type = found
        return Response(body, media_type=media_type, headers=DASHBOARD_HEADERS)

    @r.get("/")
    async def dashboard() -> Response:
        """The dashboard (static; every figure it shows is fetched with the token)."""
        return web_file("index.html")

    @r.get("/web/{name}")
    async def dashboard_file(name: str) -> Response:
        return web_file(name)

    return r


def web_files(web_dir: Path) -> dict[str, tuple[bytes, str]]:
    """The dashboard's files (a flat directory inside the package, a few kB), read once."""
    if not web_dir.is_dir():
        return {}
    return {
        f.name: (f.read_bytes(), mimetypes.guess_type(f.name)[0] or "application/octet-stream")
        for f in sorted(web_dir.iterdir())
        if f.is_file() and not f.name.startswith(".")
    }
