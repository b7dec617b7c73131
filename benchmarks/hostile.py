"""What hostile clients cost a running `zspa-serve`: memory per hostile image, the time to refuse a
30 MB prompt and what it does to a normal request meanwhile, and thousands of idle sockets.

Every figure is read from one real server process (tiny-random-llava, `clip` preprocessing):
- images: the server's resident high-water mark (VmHWM) after each hostile image, over its
  high-water mark after warm-up, and the answer (refused with the reason, or answered);
- the 30 MB prompt: its wall time to the 400, and the latency of a small request sent while
  it is being refused, against the same request alone (median over rounds);
- idle sockets: N connections that send nothing and one that drips its headers; /health's
  latency while they are held, and how long until the server has closed them all.

    python benchmarks/hostile.py [--idle 3000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

from zspa.testing import builtin_bundle, chat_body, data_url, running_server, slowloris

from machine import describe_machine

ROOT = Path(__file__).resolve().parent.parent


IMAGES = [(6000, 1, "PNG"), (6000, 1, "WEBP"), (1, 6000, "PNG"), (20000, 1, "PNG"), (200000, 1, "PNG"),
          (6000, 30, "PNG"), (30, 6000, "WEBP"), (6700, 34, "PNG"), (7000, 7000, "PNG")]


def _high_water_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc (Linux only)")


def _encoded(width: int, height: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    mode = "RGBA" if width * height > 10**7 else "RGB"  # the big one with transparency: the costly path
    Image.new(mode, (width, height), (200, 10, 10, 128)[: len(mode)]).save(buffer, format=fmt)
    return buffer.getvalue()


def images(server, client: httpx.Client) -> None:
    print("\nhostile images: server high-water mark over warm-up (VmHWM), outcome")
    mime = {"PNG": "image/png", "WEBP": "image/webp"}
    for width, height, fmt in IMAGES:
        data = _encoded(width, height, fmt)
        before = _high_water_mb(server.process.pid)
        response = client.post(f"{server.url}/v1/chat/completions", json=chat_body(
            data_url(data, mime[fmt]), model="hostile", max_tokens=1))
        grown = _high_water_mb(server.process.pid) - before
        outcome = "answered" if response.status_code == 200 else response.json()["error"]["message"]
        print(f"  {width}x{height} {fmt} ({len(data):,} bytes): +{grown:.1f} MB  {response.status_code} {outcome}")


def prompt(server, client: httpx.Client, rounds: int) -> None:
    image = data_url((ROOT / "zspa" / "assets" / "example.png").read_bytes(), "image/png")
    small = chat_body(image, "What is it?", model="hostile", max_tokens=1)
    huge = json.dumps(chat_body(image, "x" * 30_000_000, model="hostile", max_tokens=1)).encode()
    url = f"{server.url}/v1/chat/completions"

    def timed(send) -> float:
        started = time.perf_counter()
        send()
        return (time.perf_counter() - started) * 1000

    alone, beside, refusals = [], [], []
    for _ in range(rounds):
        alone.append(timed(lambda: client.post(url, json=small).raise_for_status()))
        with ThreadPoolExecutor(2) as pool:
            refusal = pool.submit(timed, lambda: _expect_400(client.post(
                url, content=huge, headers={"Content-Type": "application/json"})))
            time.sleep(0.05)  # the huge body is on its way
            beside.append(timed(lambda: client.post(url, json=small).raise_for_status()))
            refusals.append(refusal.result())
    print(f"\n30 MB prompt: refused in {_spread(refusals)} ms (upload over loopback included); a small request "
          f"beside it {_spread(beside)} ms, alone {_spread(alone)} ms (median, min-max over {rounds} rounds)")


def _expect_400(response: httpx.Response) -> None:
    assert response.status_code == 400 and response.json()["error"]["code"] == "prompt_too_long", response.text


def idle(server, count: int) -> None:
    host, port = server.url.removeprefix("http://").split(":")
    held = [socket.create_connection((host, int(port))) for _ in range(count)]
    slow, stop = slowloris(server.url, interval_s=0.5)
    opened = time.monotonic()
    latencies = []
    for _ in range(5):
        started = time.perf_counter()
        status = httpx.get(f"{server.url}/health", timeout=30).status_code
        latencies.append(((time.perf_counter() - started) * 1000, status))
    closed_at = []
    for sock in (*held, slow):
        sock.settimeout(60)
        try:
            while sock.recv(4096):
                pass
        except (ConnectionResetError, TimeoutError):
            pass
        closed_at.append(time.monotonic() - opened)
    stop.set()
    for sock in (*held, slow):
        sock.close()
    print(f"\n{count} idle sockets and a slowloris: /health while held "
          f"{', '.join(f'{ms:.1f} ms ({status})' for ms, status in latencies)}; all closed by the server "
          f"{max(closed_at):.1f} s after opening (the slowloris at {closed_at[-1]:.1f} s)")


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle", type=int, default=3000, help="idle sockets to hold")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bundle", type=Path, default=None, help="default: tiny-random-llava, exported here")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.idle + 256)), hard))  # the client's own
    print(describe_machine())
    with tempfile.TemporaryDirectory() as workdir:
        bundle = builtin_bundle("tiny-random-llava", Path(workdir), args.bundle)
        with running_server(bundle, Path(workdir) / "server.log", "--served-model-name", "hostile",
                            "--max-connections", str(args.idle + 100)) as server, httpx.Client(timeout=120) as client:
            images(server, client)
            prompt(server, client, args.rounds)
            idle(server, args.idle)
            log = (Path(workdir) / "server.log").read_text()
            print(f"\nserver log: {len(log):,} bytes, {log.count('Traceback')} tracebacks")


if __name__ == "__main__":
    main()
