"""What a camera URL may reach: one policy for the config file, --camera and POST /cameras.

- Schemes: rtsp(s), http(s), file (or a plain path) and usb:N.
- Local files only under `camera_media_dir` (after resolving symlinks), regular files whose first
  bytes are a video container or an image FFmpeg plays as a camera: never a text file, which
  FFmpeg's tty demuxer would happily render as a picture. Devices only /dev/videoN (or usb:N).
- Network hosts are resolved, and every address is checked: loopback, link-local (cloud metadata
  lives there), unspecified and multicast addresses are refused unless the camera
  (`allow_local = true`) or the daemon (`camera_allow_local`) allows them. Private LAN ranges
  (10/8, 172.16/12, 192.168/16, fc00::/7) stay allowed: that is where cameras live.
- For plain rtsp:// and http://, the connection goes to the address that was checked (the URL's
  host is replaced by it; HTTP keeps the name in its Host header), so a name that resolves
  differently a moment later (DNS rebinding) cannot move the camera. rtsps:// and https:// keep
  the name, which their certificate check needs; a rebinding there would have to pass that check.
- Every HTTP redirect hop is checked again (http_sources.py follows at most 3 itself).
- FFmpeg opens with a protocol whitelist per kind, so nothing like `concat:`, `subfile:` or a
  `file:` entry inside a playlist opens.

A refusal is a `UrlRefused` with one line that never echoes a file's contents or a password.
`check_static` needs no network (it runs when the config is loaded); `resolve` looks the host up
(blocking: off the event loop) and runs before every open.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import stat
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit, urlunsplit

# FFmpeg protocols each kind of camera may use (av.open(options={"protocol_whitelist": ...})).
PROTOCOLS = {"rtsp": "rtsp,rtsps,rtp,srtp,udp,tcp,tls", "file": "file", "usb": "file"}
NETWORK_PORTS = {"rtsp": 554, "rtsps": 322, "http": 80, "https": 443}  # schemes with a host
SCHEMES = (*NETWORK_PORTS, "file", "usb")  # and a plain path (no scheme): a file
DEVICE_RE = re.compile(r"/dev/video[0-9]{1,3}")
SNIFF_BYTES = 512


class UrlRefused(ValueError):
    """A camera URL the policy refuses; the message is one line, safe to show."""


@dataclass(frozen=True)
class Target:
    """Where a checked URL connects: `url` (for plain rtsp/http, with the checked address in
    place of the name) and `host_header` (the name, for HTTP's Host header; "" if unchanged)."""

    url: str
    host_header: str = ""


def _scheme(url: str) -> str:
    try:
        return urlsplit(url).scheme.lower()
    except ValueError:
        raise UrlRefused("the URL cannot be parsed") from None


def file_path(url: str) -> str:
    """The local path of a file URL or plain path."""
    return unquote(urlsplit(url).path) if url.lower().startswith("file://") else url


def _sniff(head: bytes) -> bool:
    """A video container, an elementary stream or an image FFmpeg plays, by its first bytes."""
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot"):
        return True  # MP4, MOV, 3GP
    if head.startswith((b"\x1a\x45\xdf\xa3", b"FLV", b"OggS", b"\x00\x00\x01\xba")):
        return True  # Matroska/WebM, FLV, Ogg, MPEG program stream
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return True
    if len(head) > 376 and head[0] == head[188] == head[376] == 0x47:
        return True  # MPEG transport stream
    if head.startswith((b"\x00\x00\x00\x01", b"\x00\x00\x01")):
        return True  # H.264 / H.265 Annex B
    return head.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF8"))  # one image


@dataclass(frozen=True)
class UrlPolicy:
    media_dir: str = ""  # local files only under this folder ("" = no file cameras)
    allow_local: bool = False  # loopback, link-local, unspecified and multicast hosts too

    def check_static(self, url: str) -> None:
        """Everything that needs no network: scheme, device, file place and content, and a
        host given as an address."""
        scheme = _scheme(url)
        if scheme in NETWORK_PORTS:
            host = urlsplit(url).hostname
            if not host:
                raise UrlRefused("the URL has no host")
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                return  # a name: checked once resolved
            self._check_address(ip)
            return
        if scheme == "usb":
            if not re.fullmatch(r"usb:[0-9]{1,3}", url):
                raise UrlRefused("a USB camera is usb:N (the device /dev/videoN)")
            return
        if scheme not in ("file", ""):
            raise UrlRefused(
                f"scheme {scheme!r} is not allowed (rtsp, rtsps, http, https, file, usb)"
            )
        self._check_file(file_path(url))

    def _check_file(self, path: str) -> None:
        if path.startswith("/dev/"):
            if not DEVICE_RE.fullmatch(path):
                raise UrlRefused("the only devices a camera may open are /dev/videoN")
            return
        if not self.media_dir:
            raise UrlRefused(
                "file cameras are off: set camera_media_dir to the folder they live in"
            )
        root = os.path.realpath(self.media_dir)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            raise UrlRefused("a camera file must be inside camera_media_dir")
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            raise UrlRefused("no such file in camera_media_dir") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):  # not a FIFO, socket or device
                raise UrlRefused("a camera file must be a regular file")
            head = os.pread(fd, SNIFF_BYTES, 0)
        finally:
            os.close(fd)
        if not _sniff(head):  # never say what it holds
            raise UrlRefused("the file is not a video container or an image by its content")

    def _check_address(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        local = ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast
        if local and not self.allow_local:
            raise UrlRefused(
                f"the host is a loopback, link-local, unspecified or multicast address ({ip}); "
                "allow it with allow_local = true on the camera or camera_allow_local"
            )

    def resolve(self, url: str) -> Target:
        """Check `url` fully (looking its host up) and say where to connect."""
        self.check_static(url)
        scheme = _scheme(url)
        if scheme not in NETWORK_PORTS:
            return Target(url)
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port or NETWORK_PORTS[scheme]
        try:
            infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError):
            raise UrlRefused(f"the host {host[:80]!r} cannot be resolved") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        for ip in addresses:
            self._check_address(ip)
        if scheme in ("rtsps", "https"):
            return Target(url)  # TLS checks the name; keep it
        ip = addresses[0]
        literal = f"[{ip}]" if ip.version == 6 else str(ip)
        netloc = parts.netloc.rsplit("@", 1)
        hostport = f"{literal}:{parts.port}" if parts.port else literal
        pinned = f"{netloc[0]}@{hostport}" if len(netloc) == 2 else hostport
        host_header = parts.netloc.rsplit("@", 1)[-1]
        return Target(urlunsplit(parts._replace(netloc=pinned)), host_header)
