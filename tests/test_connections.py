"""Connections the service must shed or keep: idle sockets, slowloris, descriptor limits, and a 500
that leaves the keep-alive connection it came on usable."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from zspa.testing import chat_body, data_url, free_port, running_server, slowloris

MODEL = "tiny"


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, lower-cased headers, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return int(status_line.split()[1]), headers, body


def _closed_by_peer(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.fixture(scope="module")
def strict_server(tiny_bundle, tmp_path_factory):
    """Headers due within 1 s; room for 200 connections."""
    log = tmp_path_factory.mktemp("serve-connections") / "server.log"
    with running_server(tiny_bundle, log, "--served-model-name", MODEL, "--header-timeout", "1",
                        "--max-connections", "200") as running:
        yield running


def test_idle_sockets_and_a_slowloris_are_closed_while_health_answers(strict_server):
    port = int(strict_server.url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(150)]
    slow, stop = slowloris(strict_server.url, interval_s=0.2)  # each read is quick, the headers never end
    try:
        assert httpx.get(f"{strict_server.url}/health", timeout=5).json() == {"status": "ok"}
        assert all(_closed_by_peer(sock, within_s=3.0) for sock in idle)
        assert _closed_by_peer(slow, within_s=3.0)
        assert httpx.get(f"{strict_server.url}/health", timeout=5).status_code == 200
    finally:
        stop.set()
        for sock in (*idle, slow):
            sock.close()
    assert "Traceback" not in strict_server.log.read_text()


def test_a_keep_alive_connection_outlives_its_response(strict_server):
    """The deadline is for headers, not for a connection that is used: three requests, one socket,
    a pause under the header timeout between each."""
    port = int(strict_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for _ in range(3):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _read_response(sock)[0] == 200
            time.sleep(0.5)


def test_a_broken_upload_is_no_server_error(strict_server, photo_path):
    """A client that hangs up halfway through its body, and one whose chunked body is malformed: no
    500 and no traceback (both were 500s with tracebacks), and the server answers the next client."""
    port = int(strict_server.url.rsplit(":", 1)[1])
    body = json.dumps(chat_body(data_url(photo_path.read_bytes()), model=MODEL, max_tokens=2)).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head + body[: len(body) // 2])
        time.sleep(0.3)
    chunked = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"mod\r\nzz-not-hex\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(chunked)
        reply = b""
        try:
            while chunk := sock.recv(4096):
                reply += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert not reply.startswith(b"HTTP/1.1 5"), reply[:200]
    assert httpx.get(f"{strict_server.url}/health", timeout=5).status_code == 200
    time.sleep(0.5)  # the abandoned upload's handler finishes
    assert "Traceback" not in strict_server.log.read_text()


_LIMIT_PROBE = """
import json, resource, sys
soft, hard = (int(v) for v in sys.argv[1:3])
resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
from zspa.runtime.server.connections import RESERVED_FILES, connection_limit
fitting = connection_limit(int(sys.argv[3]))
print(json.dumps([fitting, resource.getrlimit(resource.RLIMIT_NOFILE)[0], RESERVED_FILES]))
"""


def test_the_open_file_limit_is_raised_to_fit_the_connections():
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"this machine's hard open-file limit ({hard}) is too low to show the raise")

    def probe(soft: int, hard_: int, wanted: int) -> list[int]:
        run = subprocess.run([sys.executable, "-c", _LIMIT_PROBE, str(soft), str(hard_), str(wanted)],
                             capture_output=True, text=True, check=True, timeout=60)
        return json.loads(run.stdout)

    fitting, soft, reserved = probe(256, 2048, 1000)  # systemd-like low soft limit, room under the hard one
    assert fitting == 1000 and soft == 1000 + reserved
    fitting, soft, reserved = probe(256, 600, 1000)  # the hard limit caps it: fewer connections, not a crash
    assert soft == 600 and fitting == 600 - reserved


def test_a_500_keeps_the_keep_alive_connection(pipeline, photo_path, monkeypatch):
    """A bug inside one request answers 500 in OpenAI's shape; the next request on the same socket is
    served (Starlette's catch-all handler re-raised, and uvicorn then closed the connection)."""
    import uvicorn

    from zspa.runtime.server.app import create_app
    from zspa.runtime.server.connections import http_protocol
    from zspa.runtime.server.settings import ServerSettings

    original = pipeline.prompts.build_chat
    calls = []

    def buggy(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug, not the client's fault")
        return original(*args, **kwargs)
    monkeypatch.setattr(pipeline.prompts, "build_chat", buggy)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(pipeline, ServerSettings(MODEL, warmup=False)), port=port,
                                           http=http_protocol(5.0), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        body = json.dumps(chat_body(data_url(photo_path.read_bytes()), max_tokens=2)).encode()
        request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(request)
            status, headers, payload = _read_response(sock)
            assert status == 500 and headers.get("connection") != "close"
            assert json.loads(payload)["error"]["code"] == "internal_error"
            assert b"a bug" not in payload
            sock.sendall(request)  # the same socket
            status, _, payload = _read_response(sock)
            assert status == 200, payload
    finally:
        server.should_exit = True
        thread.join(30)
