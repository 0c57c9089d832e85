"""Motion gating in a running daemon: unchanged frames reuse detections (`reused: true`) and are
counted."""

from __future__ import annotations

import asyncio

import pytest

from clients.lib import ClientError
from tests.conftest import SlowDetector, collect, connect, jpeg, run, running_daemon, stats

pytestmark = pytest.mark.slow  # a real daemon on real sockets


# ---- slow: a real daemon ------------------------------------------------------------------------
def test_a_gated_stream_reuses_detections_for_unchanged_frames_and_counts_them() -> None:
    """With hello option motion_gate, repeats of a frame come back with the first frame's
    detections and reused: true, without a detector call, counted as unchanged (part of
    processed) in /stats and /metrics; a changed frame and refresh_s bring inference back; a
    stream that did not ask is never gated."""
    detector = SlowDetector(0.0)

    async def main() -> None:
        async with running_daemon(lambda: detector, motion_refresh_s=0.5) as d:
            c = await connect(d, options={"motion_gate": 0.01})
            still, other = jpeg(value=60), jpeg(value=200)
            replies = []
            for i, image in enumerate([still] * 4 + [other]):
                await c.send_frame("door", i, image)
                replies += await collect(c, 1)
            assert [r.get("reused", False) for r in replies] == [False, True, True, True, False]
            assert all(r["detections"] == replies[0]["detections"] for r in replies)
            assert detector.calls == 2
            await asyncio.sleep(0.6)  # past motion_refresh_s: analysed again, unchanged or not
            await c.send_frame("door", 5, other)
            assert "reused" not in (await collect(c, 1))[0]
            s = stats(d)["streams"]["door"]
            assert (s["processed"], s["unchanged"], s["options"]["motion_gate"]) == (6, 3, 0.01)
            assert stats(d)["totals"]["unchanged"] == 3
            metrics = d.metrics.render().decode()
            assert 'vision_daemon_frames_unchanged_total{stream="door"} 3.0' in metrics
            plain = await connect(d)  # no option, daemon default 0: never gated
            for i in range(3):
                await plain.send_frame("plain", i, still)
                assert "reused" not in (await collect(plain, 1))[0]
            with pytest.raises(ClientError, match="motion_gate must be a share"):
                await connect(d, options={"motion_gate": 2})  # refused at the handshake
            for client in (c, plain):
                await client.close()

    run(main())
