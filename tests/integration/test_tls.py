"""TLS on every plane (issue 27): HTTPS and WSS on the control plane, TLS on the TCP ingest with
optional client certificates, with certificates each test makes with the openssl command-line
tool (a CA, a server certificate for 127.0.0.1 and localhost, a client certificate)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from clients.lib import ClientError
from clients.transports import open_client
from tests.conftest import ROOT, collect, jpeg, run, running_daemon, stream_stats
from tests.sources import VIDEO
from vision_daemon.tls import client_context

pytestmark = pytest.mark.slow  # real TLS over real sockets, subprocesses

IMG = jpeg(64, 64)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed(cwd: Path, name: str, cn: str, ext: str) -> None:
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", *key, "-subj", f"/CN={cn}", "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=cwd
    )
    (cwd / f"{name}.ext").write_text(ext)
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.pem",
        cwd=cwd,
    )


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    """ca.pem, server.pem/.key (127.0.0.1, localhost) and client.pem/.key, in a fresh folder."""
    if shutil.which("openssl") is None:
        pytest.skip(
            "openssl not installed: apt-get install openssl (it makes the test's certificates)"
        )
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req",
        "-x509",
        *key,
        "-days",
        "2",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=tmp_path,
    )
    _signed(tmp_path, "server", "localhost", "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    _signed(tmp_path, "client", "door-cam", "extendedKeyUsage=clientAuth\n")
    return tmp_path


def tls_settings(pki: Path, mutual: bool = False) -> dict[str, str]:
    settings = {"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "server.key")}
    if mutual:
        settings["tls_client_ca"] = str(pki / "ca.pem")
    return settings


async def one_result(transport: str, d: object, ctx: ssl.SSLContext | None, stream: str) -> dict:
    port = {"port": d.tcp_port} if transport == "tcp" else {"api_port": d.api_port}  # type: ignore[attr-defined]
    c = await open_client(transport, ssl=ctx, **port)
    try:
        await c.send_image(stream, 0, IMG, "jpeg", None)
        (msg,) = await collect(c, 1)
        return dict(msg)
    finally:
        await c.close()


def test_https_wss_and_tls_ingest_serve_a_client_that_trusts_the_ca(pki: Path) -> None:
    """With tls_cert and tls_key: /health over HTTPS, frames over TLS on the TCP port and over
    WSS, all verified against the test's CA; plain HTTP and a client that lacks the CA are
    refused, and the daemon serves on."""

    async def main() -> None:
        async with running_daemon(**tls_settings(pki)) as d:
            ctx = client_context(str(pki / "ca.pem"))
            async with httpx.AsyncClient(verify=ctx) as h:
                assert (await h.get(f"https://127.0.0.1:{d.api_port}/health")).status_code == 200
                with pytest.raises(httpx.HTTPError):
                    await httpx.AsyncClient().get(f"http://127.0.0.1:{d.api_port}/health")
            for transport in ("tcp", "ws"):
                msg = await one_result(transport, d, ctx, f"tls-{transport}")
                assert (msg["type"], msg["frame_id"]) == ("result", 0), msg
                with pytest.raises((ClientError, ssl.SSLError, OSError)):
                    await one_result(transport, d, client_context(), f"untrusted-{transport}")
            assert stream_stats(d, "tls-tcp")["processed"] == 1
            assert stream_stats(d, "tls-ws")["processed"] == 1

    run(main())


def test_mutual_tls_refuses_a_client_without_a_certificate(pki: Path) -> None:
    """With tls_client_ca, a TCP client without a certificate is refused in the handshake;
    one with a certificate the CA signed is served."""

    async def main() -> None:
        async with running_daemon(**tls_settings(pki, mutual=True)) as d:
            bare = client_context(str(pki / "ca.pem"))
            with pytest.raises((ClientError, ssl.SSLError, OSError, asyncio.IncompleteReadError)):
                await one_result("tcp", d, bare, "no-cert")
            cert = client_context(
                str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key")
            )
            msg = await one_result("tcp", d, cert, "door-1")
            assert msg["type"] == "result", msg

    run(main())


def test_vision_client_streams_over_tls_and_wss(pki: Path, tmp_path: Path) -> None:
    """vision-client --tls --cafile streams a real video over the TCP ingest and over WSS."""

    async def main() -> None:
        async with running_daemon(**tls_settings(pki)) as d:
            for transport in ("tcp", "ws"):
                out = tmp_path / f"cli-{transport}.jsonl"
                args = [
                    sys.executable,
                    "-m",
                    "clients.client",
                    "--mode",
                    "video",
                    "--source",
                    str(VIDEO),
                    "--duration",
                    "2",
                    "--fps",
                    "5",
                    "--port",
                    str(d.tcp_port),
                    "--api-port",
                    str(d.api_port),
                    "--transport",
                    transport,
                    "--tls",
                    "--cafile",
                    str(pki / "ca.pem"),
                    "--results-dir",
                    str(tmp_path),
                    "--stream",
                    f"cli-{transport}",
                    "--no-progress",
                ]
                done = await asyncio.to_thread(
                    subprocess.run, args, cwd=ROOT, capture_output=True, timeout=60
                )
                assert done.returncode == 0, done.stderr.decode()[-2000:]
                lines = out.read_text().splitlines()
                assert len(lines) >= 5 and all('"result"' in line for line in lines[:5]), lines[:2]

    run(main())


def test_mqtts_delivers_events_to_mosquitto_with_tls(pki: Path, tmp_path: Path) -> None:
    """An mqtts:// output verified against the test's CA delivers events to Mosquitto's TLS
    listener (read back on its plain one); without the CA it never connects."""
    if shutil.which("mosquitto") is None:
        pytest.skip(
            "mosquitto not installed: make test installs it as root (apt-get install mosquitto)"
        )
    from tests.conftest import wait_for
    from tests.integration.test_event_outputs import event
    from tests.outputs import Broker, Subscriber
    from vision_daemon.outputs.mqtt import MqttOutput

    broker = Broker("mosquitto", tmp_path, tls=(pki / "server.pem", pki / "server.key"))
    broker.start()

    async def main() -> None:
        sub = Subscriber(broker.port)
        out = MqttOutput(
            f"mqtts://localhost:{broker.tls_port}", topic_prefix="vd", qos=1, ca=str(pki / "ca.pem")
        )
        untrusted = MqttOutput(f"mqtts://localhost:{broker.tls_port}", topic_prefix="vx")
        try:
            await out.start()
            await untrusted.start()
            await wait_for(lambda: out.connected, what="connected over TLS")
            out.offer_event(event(1))
            await wait_for(lambda: len(sub.on("vd/walk/events")) == 1, what="the event")
            assert out.snapshot()["broker"].startswith("mqtts://")
            await asyncio.sleep(1.0)
            assert not untrusted.connected and "cannot connect" in (untrusted.last_error or "")
        finally:
            await out.stop()
            await untrusted.stop()
            sub.close()

    try:
        run(main())
    finally:
        broker.kill()
