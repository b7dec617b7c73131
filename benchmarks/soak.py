"""Soak test of `zspa-serve`: thousands of mixed requests against one server, its memory sampled.

Valid plain and streamed answers, answers about a fresh image each time (vision-cache churn),
streams the client abandons after the first chunk, and bad requests (bad keep, bad base64, an
unknown field, malformed JSON), eight in flight. The server's resident memory is read every 100
requests; after the warm-up (the first fifth) a least-squares line gives the growth per 1,000
requests, printed with the residual spread. Any outcome other than the expected one (200 with a
complete answer, or the expected 400) is counted and shown.

    python benchmarks/soak.py [--requests 3000] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from zspa.testing import builtin_bundle, chat_body, data_url, running_server

from machine import describe_machine

ROOT = Path(__file__).resolve().parent.parent


IMAGE = data_url((ROOT / "zspa" / "assets" / "shapes-example.png").read_bytes(), "image/png")
KINDS = ["plain"] * 6 + ["stream"] * 3 + ["fresh_image"] * 3 + ["abandoned"] * 2 + ["bad_keep", "bad_base64",
                                                                                       "unknown_field", "bad_json"]


def _fresh_image(index: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (224, 224), (index % 251, index * 7 % 253, 90)).save(buffer, format="PNG")
    return data_url(buffer.getvalue(), "image/png")


def _request(client: httpx.Client, url: str, index: int) -> tuple[str, str | None]:
    """(kind, None) when the outcome is the expected one, else (kind, what happened)."""
    kind = KINDS[index % len(KINDS)]
    body = chat_body(_fresh_image(index) if kind == "fresh_image" else IMAGE, "where is the blue triangle ?",
                     model="soak", temperature=0, max_tokens=8)
    if kind in ("stream", "abandoned"):
        body["stream"] = True
        with client.stream("POST", url, json=body) as response:
            lines = response.iter_lines()
            for line in lines:
                if kind == "abandoned" and line.startswith("data: "):
                    return kind, None if response.status_code == 200 else f"status {response.status_code}"
                if line == "data: [DONE]":
                    return kind, None
        return kind, f"status {response.status_code}, stream ended without [DONE]"
    if kind == "bad_json":
        response = client.post(url, content=b'{"model": "soak", "messages": [', headers={
            "Content-Type": "application/json"})
    else:
        body.update({"bad_keep": {"keep": 7}, "bad_base64": {"messages": chat_body(
            "data:image/png;base64,***", model="soak")["messages"]}, "unknown_field": {"tools": []}}.get(kind, {}))
        response = client.post(url, json=body)
    expected = 200 if kind in ("plain", "fresh_image") else 400
    if response.status_code != expected:
        return kind, f"status {response.status_code}: {response.text[:200]}"
    if expected == 200 and not response.json()["choices"][0]["message"]["content"]:
        return kind, "empty answer"
    return kind, None


def _resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--bundle", type=Path, default=None, help="default: shapes-llava exported at keep 0.1")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--vision-cache-mb", type=float, default=64.0,
                        help="the server's vision cache (it grows with fresh images up to this bound; 0: off)")
    args = parser.parse_args()
    print(describe_machine())
    with tempfile.TemporaryDirectory() as tmp:
        bundle = builtin_bundle("shapes-llava", Path(tmp), args.bundle)
        with running_server(bundle, Path(tmp) / "server.log", "--served-model-name", "soak", "--log-level",
                            "warning", "--max-queue", str(4 * args.concurrency), "--vision-cache-mb",
                            str(args.vision_cache_mb)) as server, \
                httpx.Client(timeout=60) as client, ThreadPoolExecutor(args.concurrency) as pool:
            url = f"{server.url}/v1/chat/completions"
            samples, unexpected = [(0, _resident_mb(server.process.pid))], collections.Counter()
            examples: dict[str, str] = {}
            for start in range(0, args.requests, 100):
                batch = range(start, min(args.requests, start + 100))
                for kind, problem in pool.map(lambda i: _request(client, url, i), batch):
                    if problem:
                        unexpected[kind] += 1
                        examples.setdefault(kind, problem)
                samples.append((batch[-1] + 1, _resident_mb(server.process.pid)))
                print(f"{samples[-1][0]:6d} requests  RSS {samples[-1][1]:7.1f} MB", flush=True)
    done, rss = np.array(samples).T
    steady = done >= done[-1] / 5
    slope, intercept = np.polyfit(done[steady], rss[steady], 1)
    residual = rss[steady] - (slope * done[steady] + intercept)
    print(json.dumps({"requests": int(done[-1]), "rss_start_mb": round(float(rss[0]), 1),
                      "rss_end_mb": round(float(rss[-1]), 1),
                      "growth_mb_per_1000_after_warmup": round(float(slope * 1000), 2),
                      "residual_std_mb": round(float(residual.std()), 2),
                      "unexpected": dict(unexpected), "examples": examples}, indent=1))


if __name__ == "__main__":
    main()
