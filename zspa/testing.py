"""Helpers the test suite and the benchmarks share, as `numpy.testing` is numpy's: a real
`zspa-serve` process on a free loopback port, request bodies, a slowloris client, a built-in
model's bundle. Needs httpx (the dev extra); nothing in the product imports it."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    def metric(self, name: str) -> float:
        """One sample of /metrics by its full name with labels, 0 when absent."""
        for line in httpx.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith(name + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(bundle: Path, log: Path, *args: str, env: dict[str, str] | None = None,
                   python: str = sys.executable):
    """Starts `zspa-serve` under `python` and waits for /ready; stops it (SIGTERM, then SIGKILL) afterwards."""
    port = free_port()
    command = [python, "-m", "zspa.cli.serve", str(Path(bundle).resolve()), "--port", str(port), *args]
    with open(log, "wb") as out:
        # in the log's folder: a source checkout as the working directory would shadow the installed package
        process = subprocess.Popen(command, cwd=log.parent, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})})
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:
        _wait_ready(server, timeout_s=90)
        yield server
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(server: Server, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"zspa-serve exited with {server.process.returncode}:\n{server.log.read_text()}")
        try:
            if httpx.get(f"{server.url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"zspa-serve not ready after {timeout_s} s:\n{server.log.read_text()}")


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_body(image_url: str, text: str = "What is in the picture?", model: str = "tiny", **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]}], **fields}


def slowloris(url: str, interval_s: float) -> tuple[socket.socket, threading.Event]:
    """A connection to `url`'s server sending one header byte every `interval_s`, its headers never
    complete; set the returned event to stop it."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    stop = threading.Event()

    def drip() -> None:
        for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100_000:
            if stop.wait(interval_s):
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return
    threading.Thread(target=drip, daemon=True).start()
    return sock, stop


def builtin_bundle(model: str, workdir: Path, given: Path | None = None) -> Path:
    """`given`, or the built-in `model` exported at keep 0.1 into `workdir` (benchmarks' default)."""
    if given is not None:
        return given
    from zspa.export.exporter import ExportOptions, export_bundle

    bundle = workdir / model
    export_bundle(ExportOptions(model, bundle, keeps=[0.1], progress=False))
    return bundle
