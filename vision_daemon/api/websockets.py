"""WebSocket routes: /ws (results and events out) and, when served, WS /ingest (frames in)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect

from vision_daemon.api.auth import WS_POLICY_VIOLATION, TokenGate
from vision_daemon.api.control import Control
from vision_daemon.outputs import Hub, Subscriber
from vision_daemon.tokens import PUSH

WS_TRY_AGAIN_LATER = 1013  # ws_max_subscribers reached
WS_GOING_AWAY = 1001  # daemon shutting down


def router(control: Control, hub: Hub, gate: TokenGate, ws_queue: int) -> APIRouter:
    r = APIRouter()

    if control.ingests_websockets:

        @r.websocket("/ingest")
        async def ingest(websocket: WebSocket) -> None:
            """Frames in, results out: one protocol message (msgpack) per binary message."""
            if who := await gate.accept_ws(websocket, PUSH):
                await control.serve_ingest(websocket, None, principal=who)

        @r.websocket("/ingest/{stream}")
        async def ingest_stream(websocket: WebSocket, stream: str) -> None:
            """Browser mode: one JPEG per binary message in, JSON results out."""
            if who := await gate.accept_ws(websocket, PUSH):
                await control.serve_ingest(websocket, stream, principal=who)

        @r.websocket("/ws/stream")
        async def ingest_unnamed(websocket: WebSocket) -> None:
            """Browser mode on a stream of the connection's own (the path simple clients of
            other servers use)."""
            if who := await gate.accept_ws(websocket, PUSH):
                await control.serve_ingest(websocket, None, browser=True, principal=who)

    @r.websocket("/ws")
    async def ws(
        websocket: WebSocket,
        stream: Annotated[list[str] | None, Query()] = None,
        every: Annotated[int, Query(ge=1)] = 1,
        max_fps: Annotated[float, Query(ge=0)] = 0.0,
        kind: Annotated[list[str] | None, Query()] = None,
    ) -> None:
        if not await gate.accept_ws(websocket):
            return
        kinds = frozenset(kind or ("result",))
        if not kinds <= {"result", "event"}:
            await websocket.close(code=WS_POLICY_VIOLATION, reason="kind must be result or event")
            return
        client = websocket.client
        host = client.host if client else "?"
        sub = Subscriber(
            frozenset(stream or ()),
            ws_queue,
            every=every,
            min_interval_s=1.0 / max_fps if max_fps > 0 else 0.0,
            peer=f"{host}:{client.port}" if client else "",
            kinds=kinds,
        )
        if not hub.add(sub):
            why = "daemon shutting down" if hub.closed else "ws_max_subscribers reached"
            await websocket.close(code=WS_TRY_AGAIN_LATER, reason=why)
            return
        try:
            while (batch := await sub.next_batch()) is not None:
                sub.sending = len(batch)
                for text in batch:
                    await websocket.send_text(text)
                    sub.sent += 1
                    sub.sending -= 1
            await websocket.close(code=WS_GOING_AWAY, reason="daemon shutting down")
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass
        finally:
            hub.remove(sub)

    return r
