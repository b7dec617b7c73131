"""Load test of `zspa-serve`: many concurrent streaming chat completions against one bundle.

Starts a real server (the same launcher the tests use), fires `--requests` streaming requests
with at most `--concurrency` in flight through httpx, and prints what a capacity plan needs:
errors by status, complete streams, time to first token and total latency (p50/p99, measured at
the client, queueing included), and throughput. Default bundle: shapes-llava exported at keep 0.1.

    python benchmarks/serve_load.py --requests 128 --concurrency 32
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from serving import chat_body, data_url, running_server  # noqa: E402 (the tests' server launcher)

IMAGE = ROOT / "zspa" / "assets" / "shapes-example.png"
QUESTIONS = ["where is the blue triangle ?", "what colour is the circle ?", "is there a square ?",
             "what shape is red ?"]


async def _one(client: httpx.AsyncClient, url: str, body: dict, limit: asyncio.Semaphore) -> dict:
    async with limit:
        started = time.perf_counter()
        first, tokens, done, status = None, 0, False, 0
        try:
            async with client.stream("POST", url, json=body) as response:
                status = response.status_code
                async for line in response.aiter_lines():
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        usage = event.get("usage")
                        tokens = usage["completion_tokens"] if usage else tokens
                        if event.get("choices") and event["choices"][0]["delta"].get("content") and first is None:
                            first = time.perf_counter() - started
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        return {"status": status, "done": done, "ttft": first, "latency": time.perf_counter() - started,
                "tokens": tokens}


async def _load(url: str, bodies: list[dict], concurrency: int) -> tuple[list[dict], float]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*[_one(client, url, body, limit) for body in bodies])
        return results, time.perf_counter() - started


def _report(results: list[dict], wall_s: float, concurrency: int) -> None:
    statuses = collections.Counter(r["status"] for r in results)
    complete = [r for r in results if r["status"] == 200 and r["done"]]
    print(f"requests {len(results)}, concurrency {concurrency}: {len(complete)} complete streams; "
          f"statuses {dict(statuses)}")
    if not complete:
        return
    ttft = np.array([r["ttft"] for r in complete if r["ttft"] is not None]) * 1000
    latency = np.array([r["latency"] for r in complete]) * 1000
    tokens = sum(r["tokens"] for r in complete)
    print(f"time to first token: p50 {np.percentile(ttft, 50):.0f} ms, p99 {np.percentile(ttft, 99):.0f} ms")
    print(f"request latency:     p50 {np.percentile(latency, 50):.0f} ms, p99 {np.percentile(latency, 99):.0f} ms")
    print(f"throughput: {len(complete) / wall_s:.1f} requests/s, {tokens / wall_s:.0f} generated tokens/s "
          f"over {wall_s:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=None, help="default: shapes-llava exported at keep 0.1")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--keep", type=float, default=None, help="default: the bundle's smallest")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from zspa.export.exporter import ExportOptions, export_bundle

            bundle = Path(tmp) / "shapes"
            export_bundle(ExportOptions("shapes-llava", bundle, keeps=[0.1], progress=False))
        image = data_url(IMAGE.read_bytes(), "image/png")
        extra = {"keep": args.keep} if args.keep is not None else {}
        bodies = [chat_body(image, QUESTIONS[i % len(QUESTIONS)], model="bench", stream=True, temperature=0,
                            max_tokens=args.max_tokens, stream_options={"include_usage": True}, **extra)
                  for i in range(args.requests)]
        with running_server(bundle, Path(tmp) / "server.log", "--served-model-name", "bench",
                            "--max-queue", str(args.requests), "--log-level", "warning") as server:
            results, wall_s = asyncio.run(_load(f"{server.url}/v1/chat/completions", bodies, args.concurrency))
        _report(results, wall_s, args.concurrency)


if __name__ == "__main__":
    main()
