"""Remote image fetching against local HTTP servers: public hosts only, one resolution per hop and
a connection to exactly the checked address, every redirect checked, one deadline, bounded size."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from zspa.runtime.server.remote_images import FetchPolicy, FetchRefused, ImageTooLarge, fetch, is_public, resolve

IMAGE = b"\x89PNG\r\n\x1a\n" + b"x" * 1000


@dataclass(frozen=True)
class LoopbackOnly(FetchPolicy):
    """Lets the tests' servers (on 127.0.0.1) stand in for public hosts; every other address is
    judged by the real rule, so a redirect to another private address is still refused."""

    def check_address(self, address: str) -> None:
        if address != "127.0.0.1":
            super().check_address(address)


class Handler(BaseHTTPRequestHandler):
    hosts: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        Handler.hosts.append(self.headers["Host"])
        route, _, arg = self.path.strip("/").partition("/")
        if route == "image":
            self._send(200, IMAGE)
        elif route == "hop":  # /hop/N redirects N more times, then to the image
            left = int(arg)
            self.send_response(302)
            self.send_header("Location", f"/hop/{left - 1}" if left > 1 else "/image")
            self.end_headers()
        elif route == "to":  # redirect anywhere
            self.send_response(302)
            self.send_header("Location", "http://" + arg)
            self.end_headers()
        elif route == "drip":
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(200):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.05)
        elif route == "slowhead":  # the status line and headers a byte at a time, each well within a read timeout
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nabcd":
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.1)
            self.close_connection = True
        elif route == "big":
            self._send(200, b"x" * 5000)
        elif route == "liar":  # no Content-Length, more bytes than allowed
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"x" * 5000)
        else:
            self._send(404, b"no")

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def port():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def named(mapping: dict[str, str]):
    """A resolver for made-up names (numeric addresses resolve as the system does) that records calls."""
    calls = []

    def resolver(host: str, port: int) -> str:
        calls.append(host)
        return mapping[host] if host in mapping else resolve(host, port)
    resolver.calls = calls
    return resolver


POLICY = LoopbackOnly(max_bytes=2000, timeout_s=5)


def test_a_public_host_is_fetched_under_its_own_name(port):
    resolver = named({"images.example": "127.0.0.1"})
    Handler.hosts.clear()
    assert fetch(f"http://images.example:{port}/image", POLICY, resolver) == IMAGE
    assert Handler.hosts == [f"images.example:{port}"]  # the Host header keeps the name, not the address
    assert resolver.calls == ["images.example"]


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://localhost/", "http://127.1/", "http://2130706433/", "http://0x7f000001/",
    "http://[::1]/", "http://[::ffff:127.0.0.1]/", "http://0.0.0.0/", "http://10.1.2.3/", "http://192.168.0.1/",
    "http://172.16.0.1/", "http://169.254.169.254/latest/meta-data/", "http://100.64.0.1/", "http://224.0.0.1/",
    "http://[fe80::1]/", "http://[fc00::1]/", "http://[2002:a00:1::]/", "http://240.0.0.1/",
])
def test_non_public_addresses_are_refused_in_any_spelling(url):
    with pytest.raises(FetchRefused, match="not a public address"):
        fetch(url, FetchPolicy(max_bytes=2000, timeout_s=2))


@pytest.mark.parametrize("url", ["ftp://example.com/a.png", "file:///etc/passwd", "gopher://x/", "http:///x"])
def test_only_http_and_https_with_a_host(url):
    with pytest.raises(FetchRefused, match="only http and https"):
        fetch(url, POLICY)


def test_public_addresses_pass():
    assert all(map(is_public, ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "64:ff9b::808:808"]))
    assert not any(map(is_public, ["::ffff:10.0.0.1", "2002:c0a8:0001::1", "ff02::1", "::"]))


@pytest.mark.parametrize("address", [
    "::7f00:1", "::a00:1", "::808:808",  # IPv4-compatible (deprecated), even of a public IPv4
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "64:ff9b::a00:1",  # NAT64 of loopback, metadata, private
    "64:ff9b:1::808:808", "64:ff9b:1::1",  # local-use NAT64
    "::ffff:0:7f00:1", "::ffff:0:808:808",  # IPv4-translated
    "fec0::1", "feff::1",  # site-local
    "192.0.0.8", "192.0.0.170", "192.0.0.1",  # IETF protocol assignments
])
def test_every_non_global_range_is_refused(address):
    assert not is_public(address)
    with pytest.raises(FetchRefused, match="not a public address"):
        fetch(f"http://[{address}]/" if ":" in address else f"http://{address}/", FetchPolicy(2000, 2))


@pytest.mark.parametrize("url", ["http://example.com:99999/a.png", "http://example.com:abc/a.png",
                                 "http://[::1/x", "http://[::1]:-1/"])
def test_malformed_urls_are_refused_not_raised(url):
    with pytest.raises(FetchRefused, match="malformed URL"):
        fetch(url, FetchPolicy(2000, 2))


def test_one_deadline_covers_the_status_line_and_headers(port):
    """A server dripping its headers a byte every 0.1 s never lets a single read time out; the
    deadline's timer ends the fetch anyway, and takes the socket with it."""
    started = time.monotonic()
    with pytest.raises(FetchRefused, match="deadline passed"):
        fetch(f"http://127.0.0.1:{port}/slowhead", LoopbackOnly(max_bytes=2000, timeout_s=1.0))
    assert time.monotonic() - started < 2.0  # the headers alone take 4 s
    assert fetch(f"http://127.0.0.1:{port}/slowhead", LoopbackOnly(max_bytes=2000, timeout_s=8.0)) == b"abcd"


def test_the_request_deadline_ends_a_fetch_before_its_own(port):
    started = time.monotonic()
    with pytest.raises(FetchRefused, match="deadline passed"):
        fetch(f"http://127.0.0.1:{port}/slowhead", LoopbackOnly(max_bytes=2000, timeout_s=30.0),
              deadline=time.monotonic() + 0.5)
    assert time.monotonic() - started < 1.5


def test_every_redirect_is_checked_and_counted(port):
    resolver = named({"images.example": "127.0.0.1", "metadata.example": "169.254.169.254"})
    assert fetch(f"http://images.example:{port}/hop/3", POLICY, resolver) == IMAGE
    with pytest.raises(FetchRefused, match="more than 3 redirects"):
        fetch(f"http://images.example:{port}/hop/4", POLICY, resolver)
    for target in ("127.0.0.2/x", f"metadata.example:{port}/latest", "10.0.0.1/"):
        with pytest.raises(FetchRefused, match="not a public address"):
            fetch(f"http://images.example:{port}/to/{target}", POLICY, resolver)


def test_the_checked_address_is_the_one_connected_to(port):
    """DNS rebinding: a resolver that answers differently the second time is never asked twice."""
    answers = iter(["127.0.0.1", "10.0.0.1"])
    calls = []

    def rebinding(host: str, port_: int) -> str:
        calls.append(host)
        return next(answers)
    assert fetch(f"http://rebind.example:{port}/image", POLICY, rebinding) == IMAGE
    assert calls == ["rebind.example"]


def test_one_deadline_bounds_a_slow_drip(port):
    started = time.monotonic()
    with pytest.raises(FetchRefused):
        fetch(f"http://127.0.0.1:{port}/drip", LoopbackOnly(max_bytes=200_000, timeout_s=1.0))
    assert time.monotonic() - started < 3.0  # the drip would take 10 s; one read never waits past the deadline


def test_size_limit_with_and_without_content_length(port):
    for route in ("big", "liar"):
        with pytest.raises(ImageTooLarge):
            fetch(f"http://127.0.0.1:{port}/{route}", POLICY)


def test_allowed_domains(port):
    policy = LoopbackOnly(max_bytes=2000, timeout_s=5, allowed_domains=("good.example",))
    resolver = named({"cdn.good.example": "127.0.0.1", "evil.example": "127.0.0.1"})
    assert fetch(f"http://cdn.good.example:{port}/image", policy, resolver) == IMAGE
    with pytest.raises(FetchRefused, match="not in --allowed-image-domains"):
        fetch(f"http://evil.example:{port}/image", policy, resolver)
    assert resolver.calls == ["cdn.good.example"]  # a refused name is not even resolved


def test_https_checks_the_certificate_against_the_name_while_connecting_to_the_checked_address(tmp_path):
    """The connection goes to 127.0.0.1 (the resolved, checked address) but TLS verifies the
    certificate against the URL's name: a certificate for images.example passes, the same server
    reached as other.example fails."""
    import datetime
    import ssl

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "images.example")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("images.example")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        policy = LoopbackOnly(max_bytes=2000, timeout_s=5, ca_file=str(tmp_path / "cert.pem"))
        resolver = named({"images.example": "127.0.0.1", "other.example": "127.0.0.1"})
        assert fetch(f"https://images.example:{port}/image", policy, resolver) == IMAGE
        with pytest.raises(FetchRefused, match="certificate|hostname"):
            fetch(f"https://other.example:{port}/image", policy, resolver)
        with pytest.raises(FetchRefused, match="certificate"):  # the system's CAs do not know this one
            fetch(f"https://images.example:{port}/image", LoopbackOnly(max_bytes=2000, timeout_s=5), resolver)
    finally:
        server.shutdown()
