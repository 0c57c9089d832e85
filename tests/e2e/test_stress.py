"""vision-stress runs as a real program against a daemon on ephemeral ports."""

from __future__ import annotations

import asyncio
import csv
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from clients.lib import drift
from tests.conftest import VIDEO, SlowDetector, run, running_daemon, stats
from tests.e2e.test_clients import program
from vision_daemon.lifecycle import Daemon

pytestmark = pytest.mark.slow  # real sockets, models or subprocesses


def ports(d: Daemon) -> list[str]:
    return ["--port", str(d.tcp_port), "--api-port", str(d.api_port)]


def test_stress_run_writes_summary_samples_and_report(tmp_path: Path) -> None:
    """A short run writes summary.json (per stream and aggregate), samples.csv and a real PNG."""
    out = tmp_path / "run"

    async def scenario() -> dict[str, Any]:
        async with running_daemon() as d:
            rc, stdout, err = await program(
                "vision-stress", *ports(d), "--streams", "3", "--fps", "10", "--duration", "3",
                "--out-dir", str(out),
            )  # fmt: skip
            assert rc == 0, err
            assert "ALL" in stdout and "load generator" in stdout
            return {name: s["received"] for name, s in stats(d)["streams"].items()}

    received = run(scenario())
    summary = json.loads((out / "summary.json").read_text())
    agg = summary["aggregate"]
    assert agg["streams"] == 3 and len(summary["streams"]) == 3
    for s in summary["streams"]:
        assert 0 < s["sent"] <= 10 * 3 and s["sent"] == received[s["stream"]]  # within schedule
        assert s["processed"] + s["dropped"] == s["sent"]
        assert s["rtt_ms"]["p50"] > 0 and set(s["rtt_ms"]) == {"mean", "p50", "p95", "p99", "max"}
    assert agg["unanswered"] == 0 and agg["sent"] == sum(received.values())
    processed = [s["processed"] for s in summary["streams"]]
    fairness = round(min(processed) / max(processed), 3) if max(processed) else 0.0
    assert agg["processed"] == sum(processed) and agg["fairness"] == fairness
    assert agg["generator_behind"] == (
        agg["generator_skipped_slots"] > 0 or agg["generator_late_sends"] > 0.05 * agg["sent"]
    )
    assert summary["daemon_stats"]["total_frames"] >= 0
    with (out / "samples.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == agg["processed"]
    assert set(rows[0]) == {"stream", "frame_id", "send_time_s", "latency_ms"}
    for name in received:  # each stream's results come back in the order its frames were sent
        ids = [int(r["frame_id"]) for r in rows if r["stream"] == name]
        assert ids == sorted(set(ids))
    in_send_order = sorted(rows, key=lambda r: float(r["send_time_s"]))
    expected = drift([float(r["latency_ms"]) for r in in_send_order])
    assert agg["drift"] == (None if expected is None else pytest.approx(expected, abs=0.01))
    img = cv2.imread(str(out / "report.png"))
    assert img is not None and img.shape[0] > 500 and img.shape[1] > 500
    assert float(np.std(img)) > 10  # axes, points and lines, not a blank canvas


def test_stress_video_source_over_two_processes(tmp_path: Path) -> None:
    """--source video with --procs 2: every stream reports, frames come from the real video."""
    out = tmp_path / "run"

    async def scenario() -> None:
        async with running_daemon() as d:
            rc, _, err = await program(
                "vision-stress", *ports(d), "--streams", "4", "--fps", "5", "--duration", "3",
                "--source", "video", "--video", str(VIDEO), "--procs", "2", "--out-dir", str(out),
            )  # fmt: skip
            assert rc == 0, err
            assert sorted(stats(d)["streams"]) == [f"stress{i}" for i in range(4)]

    run(scenario())
    summary = json.loads((out / "summary.json").read_text())
    assert [s["stream"] for s in summary["streams"]] == [f"stress{i}" for i in range(4)]
    assert all(0 < s["processed"] == s["sent"] - s["dropped"] for s in summary["streams"])


def test_stress_exits_1_when_the_slo_is_broken(tmp_path: Path) -> None:
    """--slo-p95-ms below what a 50 ms detector can do makes the exit code 1."""

    async def scenario() -> None:
        async with running_daemon(lambda: SlowDetector(0.05), workers=1) as d:
            rc, stdout, err = await program(
                "vision-stress", *ports(d), "--streams", "2", "--fps", "5", "--duration", "2",
                "--slo-p95-ms", "10", "--out-dir", str(tmp_path / "slo"),
            )  # fmt: skip
            assert rc == 1, (stdout, err)
            assert "SLO broken" in stdout

    run(scenario())


def test_find_capacity_brackets_a_known_capacity(tmp_path: Path) -> None:
    """The search's answer is the largest passing count: every count tested above it failed."""
    out = tmp_path / "cap"

    async def scenario() -> int:
        async with running_daemon(lambda: SlowDetector(0.02), workers=1) as d:
            rc, stdout, err = await program(
                "vision-stress", *ports(d), "--find-capacity", "--fps", "10", "--duration", "3",
                "--slo-p95-ms", "150", "--max-drop-pct", "2", "--max-streams", "16",
                "--out-dir", str(out),
            )  # fmt: skip
            assert "capacity:" in stdout and "Traceback" not in err, err
            return rc

    rc = run(scenario())
    result = json.loads((out / "capacity.json").read_text())
    best = result["capacity_streams"]
    assert isinstance(best, int) and 0 <= best <= 16 and rc == (0 if best else 1)
    by_n = {s["streams"]: s for s in result["steps"]}
    assert len(by_n) == len(result["steps"]) and set(by_n) <= set(range(1, 17))  # each count once
    assert 1 in by_n  # the search starts at one stream
    assert all(s["passed"] == (n <= best) for n, s in by_n.items())  # the bracket is consistent
    assert all(s["passed"] == (s["why"] == "") for s in by_n.values())
    if best:
        assert by_n[best]["passed"]
    if best < 16:
        assert not by_n[best + 1]["passed"]  # the search tested the next count up and it failed


def test_stress_unreachable_daemon_is_one_line_exit_4(tmp_path: Path) -> None:
    """No daemon on the port: one line, exit code 4."""
    rc, _, err = asyncio.run(
        program("vision-stress", "--port", "1", "--api-port", "0", "--duration", "1",
                "--out-dir", str(tmp_path))
    )  # fmt: skip
    assert rc == 4 and "not reachable" in err and "Traceback" not in err


def test_live_view_shows_client_counters_and_the_daemons_stats() -> None:
    """The live view polls the real /stats and renders per-stream counters, workers and drops."""
    from rich.console import Console

    from stress.cli import LiveView, build_parser
    from tests.conftest import collect, connect, jpeg, wait_for

    async def scenario() -> str:
        async with running_daemon() as d:
            c = await connect(d)
            await c.send_frame("stress0", 0, jpeg())
            await collect(c, 1)
            args = build_parser().parse_args(["--api-port", str(d.api_port), "--no-live"])
            console = Console(record=True, width=140)
            view = LiveView(args, console, "live test")
            assert view.live is None  # --no-live (and never on a non-terminal)
            poller = asyncio.create_task(view.poll())
            await wait_for(lambda: view.stats is not None, what="/stats polled")
            poller.cancel()
            view.on_progress(
                {"stress0": {"sent": 1, "results": 1, "dropped": 0, "errors": 0,
                             "last_rtt_ms": 3.0, "recent": [3.0]}}
            )  # fmt: skip
            console.print(view.render())
            return console.export_text()

    text = run(scenario())
    assert "stress0" in text and "live test" in text
    assert "workers busy" in text and "w0:" in text and "w1:" in text
    assert "drops by reason" in text and "processed fps" in text
