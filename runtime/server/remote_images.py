"""Fetching an `http(s)` image URL without becoming a proxy into the device's network (SSRF).

Each hop resolves the host once, refuses loopback, private, link-local, multicast, reserved and
unspecified addresses (IPv4, IPv6, IPv4-mapped and odd spellings alike: the check is on the
resolved address) unless the operator allows private hosts, and connects to exactly that address,
with the original name kept for TLS and the Host header, so DNS rebinding cannot swap it between
check and connect. Every redirect is checked again (at most 3), and one deadline covers the whole
download, status line and headers included: a timer shuts the socket down when it passes, so a
server dripping its headers a byte at a time cannot hold a worker past it. What went wrong goes to
the log; the client learns only that the image could not be fetched (no port scanner).
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

log = logging.getLogger("zspa.serve")
MAX_REDIRECTS = 3
_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024

Resolver = Callable[[str, int], str]


class FetchRefused(Exception):
    """The URL, an address or a response was refused; the message is for the log."""


class ImageTooLarge(FetchRefused):
    pass


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int
    timeout_s: float  # the whole download, redirects included
    allow_private: bool = False
    allowed_domains: tuple[str, ...] = ()  # empty: any public host
    ca_file: str | None = None  # trust this CA bundle for https instead of the system's (a fleet's private PKI)

    def check_host(self, host: str) -> None:
        if self.allowed_domains and not any(host == d or host.endswith("." + d) for d in self.allowed_domains):
            raise FetchRefused(f"{host} is not in --allowed-image-domains")

    def check_address(self, address: str) -> None:
        if not self.allow_private and not is_public(address):
            raise FetchRefused(f"{address} is not a public address (--allow-private-image-hosts)")


# Ranges `ipaddress`'s is_global misses on some Python versions, or that embed an IPv4 address in a
# way the checks below do not decode: refused outright.
_NOT_GLOBAL = tuple(ipaddress.ip_network(net) for net in (
    "192.0.0.0/24",  # IETF protocol assignments: 192.0.0.8 (dummy), 192.0.0.170/171 (NAT64 discovery), …
    "::/96",  # IPv4-compatible (deprecated), loopback and unspecified among them
    "::ffff:0:0:0/96",  # IPv4-translated (RFC 2765)
    "64:ff9b:1::/48",  # local-use NAT64 (RFC 8215)
    "fec0::/10",  # site-local (deprecated)
))
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix: the IPv4 address in the last 32 bits


def is_public(address: str) -> bool:
    """Globally routable unicast: not loopback, private, link-local, shared, reserved, unspecified
    or multicast; IPv4 inside IPv6 (mapped, 6to4, Teredo, NAT64) judged by its IPv4 address."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(str(embedded))
    if any(ip in network for network in _NOT_GLOBAL if network.version == ip.version):
        return False
    return ip.is_global and not ip.is_multicast


def resolve(host: str, port: int) -> str:
    """The first address the system resolver gives for host:port (one lookup per hop)."""
    try:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError) as exc:
        raise FetchRefused(f"cannot resolve {host}: {exc}") from None


def fetch(url: str, policy: FetchPolicy, resolver: Resolver = resolve, deadline: float | None = None) -> bytes:
    """The body of `url` after at most MAX_REDIRECTS checked redirects, within policy.timeout_s
    and before `deadline` (time.monotonic(); the request's own) when that comes first."""
    own = time.monotonic() + policy.timeout_s
    deadline = own if deadline is None else min(own, deadline)
    for _ in range(MAX_REDIRECTS + 1):
        try:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError as exc:  # "Port out of range 0-65535", "Invalid IPv6 URL", a non-numeric port
            raise FetchRefused(f"{url!r}: malformed URL ({exc})") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchRefused(f"{url!r}: only http and https URLs with a host are fetched")
        host = parts.hostname.lower()
        policy.check_host(host)
        address = resolver(host, port)
        policy.check_address(address)
        tls = ssl.create_default_context(cafile=policy.ca_file) if parts.scheme == "https" else None
        connection = _PinnedConnection(address, host, port, _remaining(deadline), tls)
        cutoff = threading.Timer(_remaining(deadline), connection.abort)  # status line and headers too
        cutoff.daemon = True
        cutoff.start()
        try:
            connection.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
                               headers={"User-Agent": "zspa-serve", "Accept": "image/*"})
            response = connection.getresponse()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise FetchRefused(f"{url}: redirect without a Location")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise FetchRefused(f"{url}: HTTP {response.status}")
            return _read_body(response, connection, policy.max_bytes, deadline)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if connection.aborted:
                raise FetchRefused(f"{url}: deadline passed") from None
            raise FetchRefused(f"{url}: {exc}") from None
        finally:
            cutoff.cancel()
            connection.close()
    raise FetchRefused(f"more than {MAX_REDIRECTS} redirects")


def _read_body(response, connection, max_bytes: int, deadline: float) -> bytes:
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise ImageTooLarge(f"Content-Length {declared} over {max_bytes}")
    body = bytearray()
    while chunk := _read_chunk(response, connection, deadline):
        body += chunk
        if len(body) > max_bytes:
            raise ImageTooLarge(f"body over {max_bytes} bytes")
    if connection.aborted:  # the shut-down socket reads as the end of the body
        raise FetchRefused("deadline passed")
    return bytes(body)


def _read_chunk(response, connection, deadline: float) -> bytes:
    connection.socket.settimeout(_remaining(deadline))  # a drip of bytes cannot outlast the deadline
    return response.read1(_CHUNK)


def _remaining(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise FetchRefused("deadline passed")
    return left


class _PinnedConnection(http.client.HTTPConnection):
    """Connects to `address` (already checked) while speaking to `host`: its name goes in the Host
    header and, for https, in SNI and the certificate check."""

    def __init__(self, address: str, host: str, port: int, timeout: float, tls: ssl.SSLContext | None):
        super().__init__(host, port, timeout=timeout)
        self._address, self._tls = address, tls
        self.socket: socket.socket | None = None
        self.aborted = False
        self._lock = threading.Lock()

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        if self._tls is not None:
            sock = self._tls.wrap_socket(sock, server_hostname=self.host)
        with self._lock:
            self.sock = self.socket = sock  # http.client drops `sock` once a response owns it
            if self.aborted:
                sock.close()
                raise TimeoutError("deadline passed while connecting")

    def abort(self) -> None:
        """From the deadline's timer: a read blocked in the fetching thread fails at once."""
        with self._lock:
            self.aborted = True
            if self.socket is not None:
                try:
                    self.socket.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed
