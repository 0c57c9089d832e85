"""TLS for the two listening planes (issue 27): `tls_cert` and `tls_key` turn on HTTPS and WSS on
the control plane and TLS on the TCP ingest; `tls_client_ca` makes the TCP ingest ask every
client for a certificate signed by that CA (mutual TLS, for cameras). The Unix socket stays
plain: it is local and guarded by its file mode.

TLS 1.2 at least; Python's default ciphers. Making a self-signed pair: docs/USER_GUIDE.md
("TLS")."""

from __future__ import annotations

import ssl


def server_context(cert: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """A server context with the certificate chain in `cert` and its key; with `client_ca`,
    clients must present a certificate that CA signed."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    if client_ca:
        ctx.load_verify_locations(client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    cafile: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """A client context that verifies the server (against `cafile`, else the system's CAs)
    and, with `cert`, presents a client certificate."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx
