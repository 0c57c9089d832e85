"""vision-client, vision-viz and vision-ws run as real programs against a daemon on ephemeral ports."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from clients.client import CSV_COLUMNS
from tests.conftest import (
    ROOT,
    VIDEO,
    connect,
    jpeg,
    run,
    running_daemon,
    shared_model,
    stats,
    stream_stats,
    wait_for,
)
from vision_daemon.lifecycle import Daemon

pytestmark = pytest.mark.slow  # real sockets, models or subprocesses

BIN = Path(sys.executable).parent
# The programs import this checkout's packages, not whatever checkout the venv was installed from.
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.getenv("PYTHONPATH")])),
}


async def program(name: str, *args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """Run one of the console scripts to completion; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / name),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=ENV,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def ports(d: Daemon) -> list[str]:
    return ["--port", str(d.tcp_port)]


def test_client_accounts_for_every_frame_and_saves_every_result(tmp_path: Path) -> None:
    """Every frame sent is a result or a server drop; one jsonl line per result, in order; one CSV row."""

    async def scenario() -> None:
        async with running_daemon() as d:
            rc, out, err = await program(
                "vision-client",
                *ports(d),
                "--mode",
                "2",  # the legacy spelling of synthetic
                "--fps",
                "20",
                "--duration",
                "5",
                "--stream",
                "pace",
                "--results-dir",
                str(tmp_path / "results"),
                "--bench-out",
                str(tmp_path / "bench.csv"),
                "--json",
            )
            assert rc == 0, err
            summary = json.loads(out)
            sent = summary["frames_sent"]
            assert 0 < sent <= 20 * 5  # never more than the schedule's slots
            assert summary["results"] + summary["server_drops"] + summary["errors"] == sent
            assert stream_stats(d, "pace")["received"] == sent
            lines = (tmp_path / "results" / "pace.jsonl").read_text().splitlines()
            assert len(lines) == summary["results"]
            results = [json.loads(line) for line in lines]
            ids = [r["frame_id"] for r in results]
            assert ids == sorted(set(ids)) and ids[-1] < sent  # in send order, no repeats
            assert all(r["type"] == "result" and r["rtt_ms"] > 0 for r in results)
            with (tmp_path / "bench.csv").open() as fh:
                rows = list(csv.DictReader(fh))
            assert list(rows[0]) == CSV_COLUMNS and len(rows) == 1
            assert int(rows[0]["frames_sent"]) == sent
            assert float(rows[0]["max_ms"]) >= float(rows[0]["p99_ms"]) >= float(rows[0]["p95_ms"])
            assert float(rows[0]["p99_ms"]) >= float(rows[0]["p50_ms"]) > 0

    run(scenario())


def test_client_plays_a_folder_in_sorted_order_once(tmp_path: Path) -> None:
    """--mode folder (and legacy 1) sends each image at most once, in name order, then stops."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, value in enumerate([30, 90, 150, 210]):
        cv2.imwrite(str(folder / f"{i:03d}.png"), np.full((64, 80, 3), value, np.uint8))
    (folder / "notes.txt").write_text("not an image")

    async def scenario() -> None:
        async with running_daemon() as d:
            rc, out, err = await program(
                "vision-client",
                *ports(d),
                "--mode",
                "1",
                "--folder",
                str(folder),
                "--fps",
                "50",
                "--results-dir",
                str(tmp_path / "r"),
                "--json",
            )
            assert rc == 0, err
            summary = json.loads(out)
            # Each image is sent once, in name order; each ends as a result or a server drop
            # (on a loaded box the daemon may evict one for the next: it says so; and a client
            # that fell a whole slot behind its 50 fps schedule skips that image: it counts it).
            sent = summary["frames_sent"]
            assert sent + summary["skipped_slots"] == 4 and sent >= 1
            assert summary["results"] + summary["server_drops"] == sent and summary["results"] >= 1
            ids = [json.loads(x)["frame_id"] for x in (tmp_path / "r" / "imgs.jsonl").open()]
            assert ids == sorted(set(ids)) and set(ids) <= {0, 1, 2, 3}
            assert len(ids) == summary["results"]

    run(scenario())


def test_client_streams_video_to_a_real_model(tmp_path: Path) -> None:
    """vtest.avi through the shared int8 yolov8n: results carry person detections."""
    shared_model("yolov8n_int8_openvino_model")

    async def scenario() -> None:
        async with running_daemon(
            model="yolov8n", model_dir=str(shared_model(".")), workers=1
        ) as d:
            rc, out, err = await program(
                "vision-client",
                *ports(d),
                "--mode",
                "video",
                "--source",
                str(VIDEO),
                "--fps",
                "10",
                "--duration",
                "2",
                "--results-dir",
                str(tmp_path),
                "--no-progress",
            )
            assert rc == 0, err
            assert "round trip ms" in out
            results = [json.loads(x) for x in (tmp_path / "vtest.jsonl").open()]
            assert 0 < len(results) == stream_stats(d, "vtest")["processed"]
            labels = {det["label"] for r in results for det in r["detections"]}
            assert "person" in labels

    run(scenario())


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--port", "1"], 4, "not reachable"),
        (["--mode", "video", "--source", "missing.avi"], 3, "cannot open source"),
        (["--mode", "folder", "--folder", "/nonexistent"], 3, "not a directory"),
        (["--token", "wrong"], 5, "unauthorized"),
    ],
)
def test_client_errors_are_one_line_with_documented_exit_codes(
    tmp_path: Path, args: list[str], code: int, message: str
) -> None:
    """Unreachable daemon, unopenable source and a refused token each give one line and a code."""

    async def scenario() -> None:
        async with running_daemon(auth_token="secret") as d:
            full = [*ports(d), *args] if "--port" not in args else args
            rc, out, err = await program(
                "vision-client", *full, "--duration", "1", "--no-save", cwd=tmp_path
            )
            assert rc == code, (out, err)
            assert message in err and len(err.strip().splitlines()) == 1
            assert "Traceback" not in err

    run(scenario())


def test_viz_records_boxes_on_the_frame_they_belong_to(tmp_path: Path) -> None:
    """--headless --record writes one frame per result, and the box of frame 0 is drawn on it."""
    shared_model("yolov8n_int8_openvino_model")
    cap = cv2.VideoCapture(str(VIDEO))
    ok, frame0 = cap.read()
    cap.release()
    assert ok
    sent0 = cv2.imencode(".jpg", frame0, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    video = tmp_path / "out.mp4"

    async def scenario() -> tuple[dict[str, Any], int]:
        async with running_daemon(
            model="yolov8n", model_dir=str(shared_model(".")), workers=1
        ) as d:
            probe = await connect(d)  # what the model says about frame 0, as viz will send it
            await probe.send_frame("probe", 0, sent0)
            result: dict[str, Any] = await asyncio.wait_for(probe.recv(), 30)  # type: ignore[assignment]
            await probe.close()
            rc, out, err = await program(
                "vision-viz",
                *ports(d),
                "--source",
                str(VIDEO),
                "--fps",
                "10",
                "--duration",
                "2",
                "--headless",
                "--record",
                str(video),
            )
            assert rc == 0, err
            processed = stream_stats(d, "vtest")["processed"]
            assert f"recorded {processed} annotated frames" in out
            return result, processed

    result, processed = run(scenario())
    cap = cv2.VideoCapture(str(video))
    frames = []
    while (got := cap.read())[0]:
        frames.append(got[1])
    cap.release()
    assert 0 < len(frames) == processed  # one recorded frame per result
    best = max(result["detections"], key=lambda det: det["conf"])
    x1, y1, x2, y2 = (round(v) for v in best["bbox"])
    drawn = frames[0].astype(np.int16)
    original = frame0.astype(np.int16)
    edge = np.abs(drawn[y1 + 5 : y2 - 5, x1] - original[y1 + 5 : y2 - 5, x1]).mean()
    inside = np.abs(
        drawn[y1 + 8 : y2 - 8, x1 + 8 : x2 - 8] - original[y1 + 8 : y2 - 8, x1 + 8 : x2 - 8]
    ).mean()
    assert edge > 40 > inside + 20, (edge, inside)  # the box line, not just compression noise


def test_ws_viewer_prints_a_row_per_stream_and_filters(tmp_path: Path) -> None:
    """vision-ws prints per-stream rows; --json --stream a prints only stream a's results."""

    async def scenario() -> None:
        async with running_daemon() as d:
            api = ["--api-port", str(d.api_port)]
            table = asyncio.create_task(program("vision-ws", *api, "--duration", "6"))
            lines = asyncio.create_task(
                program("vision-ws", *api, "--json", "--stream", "a", "--count", "5")
            )
            await wait_for(
                lambda: stats(d)["ws"]["subscribers"] == 2, timeout=30, what="2 subscribers"
            )
            c = await connect(d)
            for i in range(6):
                for name in ("a", "b"):
                    await c.send_frame(name, i, jpeg(64, 80))
                await wait_for(
                    lambda i=i: (
                        "b" in stats(d)["streams"] and stream_stats(d, "b")["processed"] == i + 1
                    ),  # type: ignore[misc]
                    what="frame processed",
                )
            await c.bye()
            rc, out, err = await lines
            assert rc == 0, err
            msgs = [json.loads(x) for x in out.splitlines()]
            assert len(msgs) == 5 and {m["stream_name"] for m in msgs} == {"a"}
            rc, out, err = await table
            assert rc == 0, err
            rows = {line.split()[1]: line for line in out.splitlines() if line.startswith("│")}
            assert {"a", "b"} <= set(rows)
            assert rows["a"].split()[3] == "6"  # results column

    run(scenario())


def test_ws_viewer_refused_token_exits_5() -> None:
    """A wrong token is a one-line error and exit code 5, not a traceback."""

    async def scenario() -> None:
        async with running_daemon(auth_token="secret") as d:
            rc, _, err = await program(
                "vision-ws", "--api-port", str(d.api_port), "--token", "nope", "--duration", "2"
            )
            assert rc == 5 and "Traceback" not in err and "token" in err

    run(scenario())


def test_pacer_skips_missed_slots_instead_of_sending_a_burst() -> None:
    """After a stall the schedule resumes on its grid: missed slots are counted, not sent late."""
    from clients.sources import Pacer

    now = [0.0]  # an injected clock: sleeping moves it, and so does the stall below

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    async def scenario() -> tuple[Pacer, list[float], list[int | None]]:
        pacer = Pacer(4.0, clock=lambda: now[0], sleep=sleep)  # a slot every 250 ms
        times, missed = [], []
        for i in range(12):
            missed.append(await pacer.wait())
            times.append(now[0] - pacer.start)
            if i == 3:
                now[0] += 1.0  # a blocking source stalls for four periods
        return pacer, times, missed

    pacer, times, missed = run(scenario())
    assert pacer.skipped == missed[4] == 3 and missed.count(0) == 11  # slots 4-6, once
    slots = [t / 0.25 for t in times]
    assert slots == [round(x) for x in slots]  # every send on the absolute grid
    assert slots == sorted(set(slots))  # at most one send per slot: no catch-up burst
    assert len(slots) + pacer.skipped == slots[-1] + 1  # every slot sent or counted as skipped


def test_pacer_schedule_ends_at_its_end() -> None:
    """With an end, no slot due at or after it is handed out; each slot is sent or skipped."""
    from clients.sources import Pacer

    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    async def scenario() -> tuple[int, int]:
        pacer = Pacer(4.0, start=0.0, end=2.5, clock=lambda: now[0], sleep=sleep)  # slots 0-9
        sent = 0
        while await pacer.wait() is not None:
            sent += 1
            if sent == 5:
                now[0] += 0.5  # one stall mid-way
        return sent, pacer.skipped

    sent, skipped = run(scenario())
    assert sent + skipped == 10 and skipped == 1


def test_drift_is_the_last_third_over_the_first_third() -> None:
    """One drift definition: median of the last third over the first third, None when too few."""
    from clients.lib import drift, percentiles

    assert drift([10.0] * 8) is None  # fewer than 3 results per third
    assert drift([10.0] * 3 + [99.0] * 3 + [20.0] * 3) == 2.0
    assert drift([5.0] * 30) == 1.0
    p = percentiles([3.0, 1.0, 2.0])
    assert p["p50"] == 2.0 and p["mean"] == 2.0 and p["p50"] <= p["p95"] <= p["p99"] <= p["max"]
    assert set(percentiles([])) == set(p) and percentiles([])["max"] == 0.0


def test_client_exits_6_with_the_servers_reason_when_the_daemon_closes(tmp_path: Path) -> None:
    """A protocol error that makes the daemon close (frame over max_message_bytes): one line, 6."""

    async def scenario() -> None:
        async with running_daemon(max_message_bytes=2048) as d:
            rc, _, err = await program(
                "vision-client", *ports(d), "--duration", "2", "--no-save", cwd=tmp_path
            )
            assert rc == 6, err
            assert "message_too_large" in err and "Traceback" not in err

    run(scenario())


def test_viz_unwritable_recording_is_one_line_exit_3(tmp_path: Path) -> None:
    """--record into a path that cannot be a folder is a one-line error, not a traceback."""
    (tmp_path / "file.txt").write_text("x")

    async def scenario() -> None:
        async with running_daemon() as d:
            rc, _, err = await program(
                "vision-viz", *ports(d), "--source", str(VIDEO), "--duration", "1",
                "--headless", "--record", str(tmp_path / "file.txt" / "out.mp4"),
            )  # fmt: skip
            assert rc == 3 and "cannot write video" in err and "Traceback" not in err

    run(scenario())
