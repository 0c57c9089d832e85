"""Fast tier: the policies with an injected clock and no sockets (scheduler, streams, pipeline...)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import struct
from collections.abc import Sequence
from typing import Any

import msgpack
import numpy as np
import pytest

from tests.conftest import ROOT, jpeg
from tests.integration.test_option_entry_points import CASES, OPERATOR
from vision_daemon import protocol as p
from vision_daemon.config import load_config
from vision_daemon.decode import DecodeFailure, decode, decode_for, reduction
from vision_daemon.detectors.base import Detection, Image, ModelInfo
from vision_daemon.log import RateLimiter, RedactTokens
from vision_daemon.metrics import OTHER, Metrics
from vision_daemon.options import OPERATOR_OPTIONS, SPECS, StreamOptions, protocol_table, resolve
from vision_daemon.outputs import Hub, Subscriber
from vision_daemon.pipeline import Pipeline
from vision_daemon.scheduler import Scheduler
from vision_daemon.stats import percentiles
from vision_daemon.streams import Gate, Job, Outcome, QueueBudget, Report, Reports, Stream
from vision_daemon.workers import normalise, process


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeSink:
    """Records what the pipeline routes to a transport."""

    def __init__(self, peer: str = "10.0.0.1:5000") -> None:
        self.peer = peer
        self.rate_advice = False
        self.results: list[dict[str, Any]] = []
        self.drops: list[tuple[str, int, str]] = []
        self.advice: list[tuple[str, float]] = []
        self.errors: list[tuple[str, int | None]] = []
        self.done = 0
        self.full = False

    def result(self, payload: bytes, frame: p.Frame) -> bool:
        if self.full:
            return False
        self.results.append(msgpack.unpackb(payload[4:]))
        return True

    def dropped(self, stream: str, frame_id: int, reason: str) -> None:
        self.drops.append((stream, frame_id, reason))

    def error(self, code: str, message: str, frame_id: int | None = None) -> None:
        self.errors.append((code, frame_id))

    def frame_done(self) -> None:
        self.done += 1

    def advise(self, stream: str, fps: float) -> None:
        self.advice.append((stream, fps))


def frame(name: str, fid: int, image: bytes = b"\xff\xd8\xff" + b"x" * 100) -> p.Frame:
    return p.Frame(name, fid, 0.0, image, "jpeg")


def make_pipeline(**overrides: Any) -> tuple[Pipeline, Clock, Scheduler, Reports]:
    """A pipeline on a hand-moved clock; streams serve fifo unless `serve_default` says (these
    tests follow every queued frame; tests/unit/test_serve.py covers `latest`)."""
    settings = {"log_dir": "", "serve_default": "fifo", **overrides}
    cfg = load_config(overrides=settings, environ={})
    clock = Clock()
    reports = Reports()
    scheduler = Scheduler(cfg.max_in_flight_per_stream, cfg.max_frame_age_ms / 1000, reports, clock)
    pipe = Pipeline(cfg, reports, scheduler, Hub(), Metrics(cfg.metrics_max_streams), clock)
    return pipe, clock, scheduler, reports


def accounted(pipe: Pipeline) -> bool:
    t = pipe.totals
    return t.received == t.processed + sum(t.dropped.values()) + pipe.queued() + pipe.in_flight()


def take(scheduler: Scheduler, n: int = 1) -> list[Job]:
    return asyncio.run(scheduler.take(n, 0.0))


# ---- scheduler -----------------------------------------------------------------------------------


def test_scheduler_round_robin_one_frame_per_stream_per_turn() -> None:
    """A stream with many frames queued gets no more turns than one with a single frame."""
    pipe, _, scheduler, _ = make_pipeline(queue_depth=5, max_in_flight_per_stream=5)
    sink = FakeSink()
    for i in range(5):
        pipe.submit(sink, frame("busy", i), p.StreamOptions())
    pipe.submit(sink, frame("calm", 0), p.StreamOptions())
    order = [take(scheduler)[0].stream.name for _ in range(3)]
    assert order == ["busy", "calm", "busy"]


def test_scheduler_drops_stale_frames_as_values_on_the_reports_queue() -> None:
    """A frame older than max_frame_age_ms is reported stale (untaken), and accounting holds."""
    pipe, clock, scheduler, reports = make_pipeline(max_frame_age_ms=100, queue_depth=2)
    sink = FakeSink()
    pipe.submit(sink, frame("cam", 0), p.StreamOptions())
    clock.now += 0.5
    pipe.submit(sink, frame("cam", 1), p.StreamOptions())
    (job,) = take(scheduler)
    assert job.frame.frame_id == 1
    assert [(r.dropped, r.taken) for r in reports._items] == [("stale", False)]
    assert accounted(pipe) is False  # the verdict is still on its way ...
    reports.put(Report(job, Outcome(detections=[])))
    pipe.drain()  # ... and routing it restores the balance
    assert pipe.totals.processed == 1 and pipe.totals.dropped["stale"] == 1 and accounted(pipe)


# ---- streams ---------------------------------------------------------------------------------------


def test_stream_skip_and_throttle_with_an_injected_clock() -> None:
    """skip_frames keeps every Nth frame; max_fps admits one frame per interval, never bursts."""
    budget = QueueBudget(2**20)
    s = Stream("a", p.StreamOptions(skip_frames=3), 2, 10.0, budget)
    assert [s.admit(float(i)) for i in range(6)] == [None, "skipped", "skipped"] * 2
    t = Stream("b", p.StreamOptions(max_fps=10), 2, 10.0, budget)
    verdicts = [t.admit(100.0 + i * 0.05) for i in range(10)]  # 20 fps for 0.5 s
    assert verdicts.count(None) == 5 and verdicts[0] is None


def test_throttle_keeps_its_rate_on_a_jittery_camera_and_never_bursts() -> None:
    """A 30 fps camera with +-15 ms jitter throttled to 10 fps gets 10 fps (not 9.3: a late
    frame does not push the schedule back), and admitted frames are never under 40 ms apart."""
    rng = random.Random(7)
    gate = Gate(p.StreamOptions(max_fps=10))
    times = [i / 30 + rng.uniform(-0.015, 0.015) for i in range(30 * 60)]
    admitted = [t for t in times if gate.admit(t) is None]
    assert 595 <= len(admitted) <= 601  # 60 s at 10 fps
    assert min(b - a for a, b in itertools.pairwise(admitted)) >= 0.04 - 1e-9


def test_stream_queue_evicts_oldest_and_keeps_the_byte_budget() -> None:
    """A full queue hands back its oldest frame; the shared budget tracks queued bytes exactly."""
    budget = QueueBudget(2**20)
    s = Stream("a", p.StreamOptions(), 2, 10.0, budget)
    sink = FakeSink()
    jobs = [Job(frame("a", i, b"x" * 10), s, sink, 0.0) for i in range(3)]
    assert s.push(jobs[0]) is None and s.push(jobs[1]) is None
    assert s.push(jobs[2]) is jobs[0]
    assert budget.used == s.queued_bytes == 20


# ---- pipeline --------------------------------------------------------------------------------------


def test_pipeline_routes_every_frame_to_exactly_one_result_or_drop() -> None:
    """Results, errors, queue_full and disconnect drops: each frame ends once, accounting holds."""
    pipe, _, scheduler, reports = make_pipeline(queue_depth=1)
    sink = FakeSink()
    for i in range(3):
        pipe.submit(sink, frame("cam", i), p.StreamOptions())
    assert accounted(pipe)
    (job,) = take(scheduler)
    reports.put(Report(job, Outcome(error=p.E_DECODE, message="bad")))
    pipe.drain()
    pipe.submit(sink, frame("cam", 3), p.StreamOptions())
    (job,) = take(scheduler)
    reports.put(Report(job, Outcome(detections=[], timings={"decode_ms": 1.0})))
    pipe.submit(sink, frame("cam", 4), p.StreamOptions())
    pipe.drain()
    pipe.detach(sink)
    assert accounted(pipe) and pipe.queued() == 0 and pipe.in_flight() == 0
    assert sink.done == 5
    assert [r["frame_id"] for r in sink.results] == [3]
    assert sink.errors == [(p.E_DECODE, 2)]
    assert dict(pipe.totals.dropped) == {"queue_full": 2, "decode_error": 1, "disconnected": 1}


def test_pipeline_counts_results_a_full_sink_could_not_take() -> None:
    """A result refused by its sink's outbox is counted as results_dropped, still processed."""
    pipe, _, scheduler, reports = make_pipeline()
    sink = FakeSink()
    sink.full = True
    pipe.submit(sink, frame("cam", 0), p.StreamOptions())
    (job,) = take(scheduler)
    reports.put(Report(job, Outcome(detections=[])))
    pipe.drain()
    assert pipe.totals.processed == 1 and pipe.totals.results_dropped == 1 and sink.done == 1


def test_detached_streams_count_toward_max_streams_and_the_oldest_goes_first() -> None:
    """Name churn cannot grow the registry: past max_streams the oldest detached stream leaves."""
    pipe, clock, _, _ = make_pipeline(max_streams=3, stream_grace_s=60)
    for i in range(10):
        sink = FakeSink(f"10.0.0.{i}:1")
        pipe.submit(sink, frame(f"name{i}", 0), p.StreamOptions())
        pipe.drop_queued("disconnected")
        pipe.detach(sink)
        clock.now += 1
    assert sorted(pipe.streams) == ["name7", "name8", "name9"]
    assert pipe.streams_evicted == 7


def test_live_streams_are_never_evicted_and_a_new_one_is_refused() -> None:
    """With max_streams live streams, another name is refused with limit_exceeded and counted."""
    pipe, _, _, _ = make_pipeline(max_streams=2)
    sink = FakeSink()
    for name in ("a", "b", "c"):
        pipe.submit(sink, frame(name, 0), p.StreamOptions())
    assert sorted(pipe.streams) == ["a", "b"]
    assert sink.errors == [(p.E_LIMIT, 0)] and pipe.totals.dropped["refused"] == 1
    assert accounted(pipe) and sink.done == 1


# ---- metrics ---------------------------------------------------------------------------------------


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    value = m.registry.get_sample_value(name, labels)
    return value


def test_metric_counters_never_fall_when_streams_expire() -> None:
    """_other is a counter of its own; an expired stream's series go and its slot is reused."""
    pipe, clock, _, _ = make_pipeline(metrics_max_streams=1, stream_grace_s=1)
    sink = FakeSink()
    for name in ("a", "b", "c"):
        pipe.submit(sink, frame(name, 0), p.StreamOptions())
    m = pipe.metrics
    assert sample(m, "vision_daemon_frames_received_total", stream="a") == 1
    assert sample(m, "vision_daemon_frames_received_total", stream=OTHER) == 2
    pipe.drop_queued("disconnected")
    pipe.detach(sink)
    clock.now += 5
    pipe.expire()
    assert not pipe.streams
    assert sample(m, "vision_daemon_frames_received_total", stream="a") is None
    assert sample(m, "vision_daemon_frames_received_total", stream=OTHER) == 2
    pipe.submit(FakeSink(), frame("d", 0), p.StreamOptions())
    assert sample(m, "vision_daemon_frames_received_total", stream="d") == 1


# ---- protocol --------------------------------------------------------------------------------------


def test_unpack_refuses_declared_lengths_over_the_limits_before_building() -> None:
    """Huge array/map/str headers and container floods are limit_exceeded; cheap to refuse."""
    for body in (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", msgpack.packb("x" * 5000)):
        with pytest.raises(p.ProtocolError) as err:
            p.unpack_body(body)
        assert err.value.code == p.E_LIMIT
    nested = msgpack.packb([[[{} for _ in range(16)] for _ in range(16)] for _ in range(4)])
    with pytest.raises(p.ProtocolError) as err:
        p.unpack_body(nested)
    assert err.value.code == p.E_LIMIT


def test_stream_names_options_and_timestamps_are_validated() -> None:
    """Control characters, skip_frames 0 and non-finite timestamps are refused; nil is a default."""
    for bad in ("cam\n", "cam\r", "a\x00b", "", "-x"):
        with pytest.raises(p.ProtocolError):
            p.validate_stream_name(bad)
    with pytest.raises(p.ProtocolError):
        p.parse_options({"skip_frames": 0})
    assert p.parse_options({"skip_frames": None, "max_fps": None}) == p.StreamOptions()
    base = {"type": "frame", "stream_name": "a", "frame_id": 1, "image": b"x"}
    for ts in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(p.ProtocolError):
            p.parse_message({**base, "timestamp": ts})
    msg = p.parse_message({**base, "timestamp": None, "encoding": None})
    assert isinstance(msg, p.Frame) and msg.timestamp == 0.0 and msg.encoding == "jpeg"


def test_unknown_type_does_not_echo_the_value() -> None:
    """The error for an unknown type never repeats what the peer sent."""
    with pytest.raises(p.ProtocolError) as err:
        p.parse_message({"type": "Z" * 500})
    assert "Z" not in err.value.message


# ---- decode and workers ------------------------------------------------------------------------------


def png_header(w: int, h: int) -> bytes:
    return p_png + struct.pack(">I", 13) + b"IHDR" + struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)


p_png = b"\x89PNG\r\n\x1a\n"


def test_decode_accepts_only_jpeg_and_png_and_sizes_from_the_header() -> None:
    """BMP/GIF/PPM are refused unread; a huge PNG header is image_too_large, not decode_error."""
    for data in (b"BM" + b"\0" * 60, b"GIF89a" + b"\0" * 20, b"P6\n2000000 1\n255\n\0"):
        with pytest.raises(DecodeFailure) as err:
            decode(frame("a", 0, data), 10**7)
        assert err.value.code == p.E_DECODE
    with pytest.raises(DecodeFailure) as err:
        decode(frame("a", 0, png_header(30000, 30000)), 10**7)
    assert err.value.code == p.E_IMAGE_TOO_LARGE
    img = decode(frame("a", 0, jpeg(48, 64)), 10**7)
    assert img.shape == (48, 64, 3)


def test_a_jpeg_twice_the_model_input_is_decoded_at_reduced_scale() -> None:
    """1/k where k <= long side / model input (k in 2, 4, 8); smaller frames, PNG and raw at 1/1."""
    assert [reduction(w, h, 640) for w, h in [(768, 576), (1280, 720), (1920, 1080)]] == [1, 2, 2]
    assert [reduction(w, h, 640) for w, h in [(2560, 1440), (3840, 2160), (7680, 4320)]] == [
        4,
        4,
        8,
    ]
    assert reduction(1920, 1080, 0) == 1 and reduction(720, 1280, 320) == 4
    got = decode_for(frame("a", 0, jpeg(1080, 1920)), 10**7, 640)
    assert (got.k, got.width, got.height, got.image.shape) == (2, 1920, 1080, (540, 960, 3))
    got = decode_for(frame("a", 0, jpeg(576, 768)), 10**7, 640)
    assert (got.k, got.image.shape) == (1, (576, 768, 3))
    assert decode_for(frame("a", 0, jpeg(1080, 1920)), 10**7, 0).image.shape == (1080, 1920, 3)
    import cv2

    png = cv2.imencode(".png", np.zeros((1080, 1920, 3), np.uint8))[1].tobytes()
    assert decode_for(frame("a", 0, png), 10**7, 640).k == 1


class Raises:
    info = ModelInfo(name="t", backend="t", device="cpu", imgsz=0)

    def __init__(self, result: Any = None) -> None:
        self.result = result

    def warmup(self) -> None:
        return None

    def detect(self, images: Sequence[Image]) -> list[list[Detection]]:
        if self.result is None:
            raise RuntimeError("boom")
        return [self.result for _ in images]  # type: ignore[misc]


def test_process_turns_every_failure_into_a_per_frame_error() -> None:
    """A decoder or detector failure, or output msgpack cannot carry, ends as an error code."""
    s = Stream("a", p.StreamOptions(), 2, 10.0, QueueBudget(2**20))
    sink = FakeSink()
    good = Job(frame("a", 0, jpeg(32, 32)), s, sink, 0.0)
    bad = Job(frame("a", 1, b"BM" + b"\0" * 10), s, sink, 0.0)
    out = process(Raises(), [good, bad], 10**7, False, False)  # type: ignore[arg-type]
    assert [o.error for o in out] == [p.E_DETECTOR, p.E_DECODE]
    nan = [{"label": "x", "conf": float("nan"), "bbox": [0, 0, 1, 1], "class_id": 0}]
    assert process(Raises(nan), [good], 10**7, False, False)[0].error == p.E_DETECTOR  # type: ignore[arg-type]
    numpy_out = [
        {
            "label": "x",
            "conf": np.float32(0.5),
            "bbox": np.array([0, 0, 1, 1]),
            "class_id": np.int64(3),
        }
    ]
    (ok,) = process(Raises(numpy_out), [good], 10**7, False, False)  # type: ignore[arg-type]
    assert ok.error is None and ok.detections is not None
    msgpack.packb(ok.detections)  # plain Python types only
    assert type(normalise(numpy_out)[0]["conf"]) is float


# ---- outputs, logs, stats ------------------------------------------------------------------------


def test_hub_caps_subscribers_and_a_slow_one_loses_its_oldest() -> None:
    """Past max_subscribers a subscriber is refused; a full queue drops its oldest, counted."""
    hub = Hub(max_subscribers=1)
    a, b = Subscriber(frozenset(), 2), Subscriber(frozenset(), 2)
    assert hub.add(a) and not hub.add(b) and hub.refused == 1
    for i in range(5):
        hub.publish("cam", f'{{"i": {i}}}', float(i))
    assert list(a.queue) == ['{"i": 3}', '{"i": 4}'] and a.dropped == 3


def test_rate_limiter_summarises_what_it_held_back() -> None:
    """Past the burst a key is silent for the period, then reports how many lines it held."""
    rl = RateLimiter(burst=2, period_s=10)
    verdicts = [rl.allow("peer", 0.0 + i) for i in range(5)]
    assert [ok for ok, _ in verdicts] == [True, True, False, False, False]
    assert rl.allow("peer", 11.0) == (True, 3)


def test_redaction_masks_tokens_and_authorization_headers() -> None:
    """A record carrying ?token= or an Authorization header is masked before any handler."""
    f = RedactTokens()
    rec = logging.LogRecord("x", logging.INFO, "f", 1, '"GET /ws?token=%s&a=1"', ("s3cret",), None)
    f.filter(rec)
    assert "s3cret" not in rec.getMessage() and "/ws?***" in rec.getMessage()
    rec = logging.LogRecord("x", logging.INFO, "f", 1, "body token=%s end", ("s3cret",), None)
    f.filter(rec)
    assert rec.getMessage() == "body token=*** end"
    rec = logging.LogRecord("x", logging.DEBUG, "f", 1, "> Authorization: Bearer s3cret", (), None)
    f.filter(rec)
    assert "s3cret" not in rec.getMessage()
    line = '%s - "WebSocket /ws?%%74oken=s3cret&stream=a" [accepted]'  # a percent-encoded key
    rec = logging.LogRecord("uvicorn.error", logging.INFO, "f", 1, line, ("1.2.3.4:5",), None)
    f.filter(rec)
    assert "s3cret" not in rec.getMessage() and "/ws?***" in rec.getMessage()


def test_percentiles_nearest_rank() -> None:
    """p50/p95/p99 and mean of a known list; empty gives None."""
    got = percentiles([float(v) for v in range(1, 101)])
    assert got == {"p50": 51.0, "p95": 96.0, "p99": 100.0, "mean": 50.5}
    assert percentiles([])["p50"] is None


def test_share_cores_policy() -> None:
    """'busy' shares cores whenever another worker runs; 'waiting' only if frames also wait."""
    from vision_daemon.workers import share_cores

    assert [share_cores("busy", b, w) for b, w in ((0, 3), (1, 0), (1, 2))] == [False, True, True]
    assert [share_cores("waiting", b, w) for b, w in ((0, 3), (1, 0), (1, 2))] == [
        False,
        False,
        True,
    ]


def test_png_decoding_writes_nothing_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    """A PNG with a broken iCCP chunk decodes without libpng printing to the process's stderr."""
    import zlib

    import cv2

    png = bytes(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    bad = png[:33] + chunk(b"iCCP", b"bad\x00\x00" + zlib.compress(bytes(10))) + png[33:]
    assert decode(frame("a", 0, bad), 10**7).shape == (8, 8, 3)
    assert capfd.readouterr().err == ""


def test_third_party_log_lines_are_rate_limited_by_template() -> None:
    """uvicorn's per-handshake lines: 5 per template per period, then a count of the rest."""
    from vision_daemon.log import RateLimitFilter

    f = RateLimitFilter(burst=5, period_s=10)
    recs = [
        logging.LogRecord(
            "uvicorn.error", logging.INFO, "f", 1, '%s - "WebSocket %s"', (i, "/ws"), None
        )
        for i in range(20)
    ]
    for i, r in enumerate(recs):
        r.created = 100.0 + i * 0.1
    assert sum(f.filter(r) for r in recs) == 5
    late = logging.LogRecord(
        "uvicorn.error", logging.INFO, "f", 1, '%s - "WebSocket %s"', (0, "/"), None
    )
    late.created = 200.0
    assert f.filter(late) and "15 similar suppressed" in late.getMessage()


def test_jpeg_with_too_many_scans_is_refused_before_decoding() -> None:
    """More than MAX_JPEG_SCANS start-of-scan markers: decode_error, no decoder pass at all."""
    from vision_daemon.decode import JPEG_SOS, MAX_JPEG_SCANS

    data = jpeg(32, 32) + JPEG_SOS * (MAX_JPEG_SCANS + 1)
    with pytest.raises(DecodeFailure) as err:
        decode(frame("a", 0, data), 10**7)
    assert err.value.code == p.E_DECODE and "scans" in err.value.message


def test_protocol_doc_holds_the_options_table_generated_from_the_spec() -> None:
    """docs/PROTOCOL.md's stream-options table is the one options.protocol_table() makes, so the
    doc cannot drift from the declarations."""
    text = (ROOT / "docs" / "PROTOCOL.md").read_text()
    start = text.index("<!-- options-table:start -->\n") + len("<!-- options-table:start -->\n")
    assert text[start : text.index("\n<!-- options-table:end -->")] == protocol_table()


def test_operator_options_are_the_ones_the_entry_point_test_patches() -> None:
    """The options PATCH accepts are those the entry-point test drives through PATCH."""
    assert set(OPERATOR_OPTIONS) == OPERATOR
    assert {option for option, _, _ in CASES} == set(SPECS)


def test_resolve_takes_daemon_then_client_then_operator() -> None:
    """Unset options take the daemon's setting, the client's win over it and an operator's win
    over both; track stays unset (the pipeline reads the daemon's)."""
    daemon = {"serve": "fifo", "motion_gate": 0.2, "track": True}
    assert resolve(StreamOptions(), daemon, {}) == StreamOptions(serve="fifo", motion_gate=0.2)
    given = StreamOptions(serve="latest", motion_gate=0.0, skip_frames=2)
    got = resolve(given, daemon, {"skip_frames": 5, "motion_gate": -1.0})
    assert (got.serve, got.motion_gate, got.skip_frames, got.track) == ("latest", 0.2, 5, None)
