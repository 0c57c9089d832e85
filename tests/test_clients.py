"""vision-client, vision-viz and vision-ws run as real programs against a daemon on ephemeral ports."""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from clients.client import CSV_COLUMNS
from tests.conftest import VIDEO, connect, jpeg, run, running_daemon, shared_model, until
from vision_daemon.lifecycle import Daemon

BIN = Path(sys.executable).parent


async def program(name: str, *args: str, cwd: Path | None = None) -> tuple[int, str, str]:
    """Run one of the console scripts to completion; (exit code, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / name),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def ports(d: Daemon) -> list[str]:
    return ["--port", str(d.tcp_port)]


def test_client_paces_20fps_for_5s_and_saves_every_result(tmp_path: Path) -> None:
    """--fps 20 --duration 5 sends 100 +/- 2 frames; one jsonl line per result; one CSV row."""

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
            assert 98 <= summary["frames_sent"] <= 102
            assert summary["results"] + summary["server_drops"] == summary["frames_sent"]
            assert d.streams["pace"].counts.received == summary["frames_sent"]
            lines = (tmp_path / "results" / "pace.jsonl").read_text().splitlines()
            assert len(lines) == summary["results"]
            first = json.loads(lines[0])
            assert first["type"] == "result" and first["frame_id"] == 0 and first["rtt_ms"] > 0
            with (tmp_path / "bench.csv").open() as fh:
                rows = list(csv.DictReader(fh))
            assert list(rows[0]) == CSV_COLUMNS and len(rows) == 1
            assert int(rows[0]["frames_sent"]) == summary["frames_sent"]
            assert float(rows[0]["p99_ms"]) >= float(rows[0]["p50_ms"]) > 0

    run(scenario())


def test_client_plays_a_folder_in_sorted_order_once(tmp_path: Path) -> None:
    """--mode folder (and legacy 1) sends each image once, in name order, then stops."""
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
            assert summary["frames_sent"] == 4 and summary["results"] == 4
            ids = [json.loads(x)["frame_id"] for x in (tmp_path / "r" / "imgs.jsonl").open()]
            assert ids == [0, 1, 2, 3]

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
            assert len(results) >= 15
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

    async def scenario() -> dict[str, Any]:
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
            assert f"recorded {d.streams['vtest'].counts.processed} annotated frames" in out
            return result

    result = run(scenario())
    cap = cv2.VideoCapture(str(video))
    frames = []
    while (got := cap.read())[0]:
        frames.append(got[1])
    cap.release()
    assert len(frames) >= 15
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
            await until(lambda: len(d.hub.subscribers) == 2, timeout=30, what="2 subscribers")
            c = await connect(d)
            for i in range(6):
                for name in ("a", "b"):
                    await c.send_frame(name, i, jpeg(64, 80))
                await until(
                    lambda i=i: "b" in d.streams and d.streams["b"].counts.processed == i + 1,  # type: ignore[misc]
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
    import time

    from clients.sources import Pacer

    async def scenario() -> tuple[Pacer, list[float]]:
        pacer = Pacer(50.0)  # a slot every 20 ms
        times = []
        for i in range(12):
            await pacer.wait()
            times.append(time.monotonic() - pacer.start)
            if i == 3:
                time.sleep(0.1)  # noqa: ASYNC251 - a blocking source stalls the loop on purpose
        return pacer, times

    pacer, times = run(scenario())
    assert 4 <= pacer.skipped <= 6
    gaps = np.diff(times[4:])
    assert gaps.min() > 0.012  # no burst of catch-up sends
    slots = np.array(times) / 0.02
    assert np.abs(slots - np.round(slots)).max() < 0.4  # every send on the absolute grid


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
