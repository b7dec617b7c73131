"""Load test of `zspa-serve`, continuous batching against one request at a time.

Each side is a real server process (the launcher the tests use) with its own `--max-batch`;
all run at once (the others idle while one is loaded) and take turns at each concurrency, in an order that flips every
round, over `--rounds`. Each is loaded with streaming requests at every
`--concurrency` (concurrency × `--requests-per-slot` requests, each generating exactly
`--max-tokens`), and the script prints, per side and concurrency, time to first token p50/p99
(at the client, queueing included), inter-token latency p50/p99 at the client (the gaps between
one answer's streamed chunks: text the detokenizer holds back, an incomplete UTF-8 character,
merges tokens into one chunk) and at the server (every token's gap, from the scheduler's
`zspa_inter_token_latency_seconds` histogram, interpolated within its buckets as Prometheus'
histogram_quantile does), generated tokens/s and errors, as median (min–max) over
rounds, then each server's resident memory once warm and its peak under the load as a multiple
of it (joins included; Linux /proc), and the tokens/s ratio between the sides. Distinct frames
never hit the vision cache, so the servers run without one (`--vision-cache-mb 0`) unless
`--same-image`: filling it would add up to its bound to the peak and hide what requests cost.
Default: tiny-random-llava (576 visual tokens) exported at keep 0.1; `--model llava-shaped` is
the speed benchmarks' random-weight LLaVA-1.5-shaped model (576 visual tokens, a 1024 x 8
decoder: benchmarks/llava_shaped.py), and `--model qwen2.5-vl-shaped` family_ttft.py's
Qwen2.5-VL-shaped one (a 256 x 4 windowed tower, the same decoder; 576 visual tokens at
`--image-size 672x672`). `--malloc glibc` runs the servers on glibc's own malloc settings.

    python benchmarks/serve_load.py --batches 1,8 --concurrency 1,8,32,64 --rounds 3
    python benchmarks/serve_load.py --model llava-shaped --kv-cache shared --max-context 1024 \
        --concurrency 1,32 --requests-per-slot 2
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import io
import itertools
import json
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from zspa.cli.common import int_list
from zspa.testing import chat_body, data_url, running_server

from family_ttft import save_model
from llava_shaped import build_llava_shaped
from machine import describe_machine

ROOT = Path(__file__).resolve().parent.parent

IMAGE = ROOT / "zspa" / "assets" / "shapes-example.png"
_FRAMES = itertools.count()
QUESTIONS = ["where is the blue triangle ?", "what colour is the circle ?", "is there a square ?",
             "what shape is red ?"]


async def _one(session: aiohttp.ClientSession, url: str, body: dict, limit: asyncio.Semaphore) -> dict:
    async with limit:
        started = time.perf_counter()
        first, tokens, done, status, arrivals = None, 0, False, 0, []
        try:
            async with session.post(url, json=body) as response:
                status = response.status
                async for raw in response.content:  # one SSE line at a time
                    line = raw.rstrip(b"\r\n")
                    if line == b"data: [DONE]":
                        done = True
                    elif line.startswith(b"data: "):
                        event = json.loads(line[6:])
                        usage = event.get("usage")
                        tokens = usage["completion_tokens"] if usage else tokens
                        if event.get("choices") and event["choices"][0]["delta"].get("content"):
                            arrivals.append(time.perf_counter())
                            first = arrivals[0] - started if first is None else first
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            status = type(exc).__name__
        return {"status": status, "done": done, "ttft": first, "latency": time.perf_counter() - started,
                "tokens": tokens, "gaps": np.diff(arrivals).tolist()}


async def _load(url: str, bodies: list[dict], concurrency: int) -> tuple[list[dict], float]:
    """All `bodies`, `concurrency` at a time. aiohttp rather than httpx: the client shares the
    server's cores here, and aiohttp's C parser takes about a third of httpx's CPU per stream."""
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*[_one(session, url, body, limit) for body in bodies])
        return results, time.perf_counter() - started


def _summary(results: list[dict], wall_s: float) -> dict:
    complete = [r for r in results if r["status"] == 200 and r["done"]]
    ttft = np.array([r["ttft"] for r in complete if r["ttft"] is not None] or [np.nan]) * 1000
    gaps = np.array([gap for r in complete for gap in r["gaps"]] or [np.nan]) * 1000
    return {"errors": len(results) - len(complete), "statuses": collections.Counter(r["status"] for r in results),
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
            "itl_p50": float(np.percentile(gaps, 50)), "itl_p99": float(np.percentile(gaps, 99)),
            "tokens_per_s": sum(r["tokens"] for r in complete) / wall_s,
            "requests_per_s": len(complete) / wall_s}


def _token_gap_buckets(url: str) -> dict[float, float]:
    """The server's `zspa_inter_token_latency_seconds` histogram: cumulative count by upper bound."""
    base = url.removesuffix("/v1/chat/completions")
    with urllib.request.urlopen(f"{base}/metrics", timeout=30) as response:
        text = response.read().decode()
    family = next(f for f in text_string_to_metric_families(text) if f.name == "zspa_inter_token_latency_seconds")
    return {float(sample.labels["le"]): sample.value for sample in family.samples if sample.name.endswith("_bucket")}


def _bucket_quantile(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The q-quantile in ms of what was observed between two scrapes, interpolated linearly within
    its bucket (Prometheus' histogram_quantile); the highest finite bound if it lies past it."""
    bounds = sorted(after)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    if not counts[-1]:
        return float("nan")
    rank = q * counts[-1]
    lower, below = 0.0, 0.0
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if bound == float("inf"):
                return lower * 1000
            return (lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)) * 1000
        lower, below = bound, count
    return lower * 1000


def _spread(values: list[float], digits: int = 0) -> str:
    """Median (min–max) over rounds."""
    return f"{np.median(values):.{digits}f} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def _frame(base: Image.Image, distinct: bool) -> str:
    """`base` as a PNG data URL; `distinct` sets pixel (0, 0) from a counter: a different frame
    per request, as cameras send, so that every request runs the vision encoder (no cache hits)."""
    image = base.copy()
    if distinct:
        index = next(_FRAMES)
        image.putpixel((0, 0), (index % 256, index // 256 % 256, 7))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return data_url(buffer.getvalue(), "image/png")


def _bodies(args: argparse.Namespace, count: int) -> list[dict]:
    extra = {"keep": args.keep} if args.keep is not None else {}
    base = Image.open(IMAGE).convert("RGB")
    base = base.resize(args.image_size) if args.image_size else base
    same = _frame(base, distinct=False) if args.same_image else None
    return [chat_body(same or _frame(base, distinct=True), QUESTIONS[i % len(QUESTIONS)],
                      model="bench", stream=True, temperature=0, max_tokens=args.max_tokens, ignore_eos=True,
                      stream_options={"include_usage": True}, **extra)
            for i in range(count)]


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def _measure(urls: dict[int, str], args: argparse.Namespace) -> dict[int, list[dict[int, dict]]]:
    """Every side at every concurrency, round after round; within a round the sides take turns at
    each concurrency (their order flips every round), so the two figures of a pair are seconds
    apart and the machine's drift over minutes falls on both."""
    rounds: dict[int, list[dict[int, dict]]] = {side: [] for side in urls}
    for index in range(args.rounds):
        order = list(urls) if index % 2 == 0 else list(urls)[::-1]
        for side in order:
            rounds[side].append({})
        for concurrency in args.concurrency:
            count = max(16, concurrency * args.requests_per_slot)
            for side in order:
                before = _token_gap_buckets(urls[side])
                summary = _summary(*asyncio.run(_load(urls[side], _bodies(args, count), concurrency)))
                after = _token_gap_buckets(urls[side])
                summary["server_itl_p50"], summary["server_itl_p99"] = (_bucket_quantile(before, after, q)
                                                                        for q in (0.5, 0.99))
                rounds[side][index][concurrency] = summary
        print(f"round {index + 1}: done", flush=True)
    return rounds


def _memory_mb(pid: int, field: str) -> float:
    """A /proc/PID/status memory field (VmRSS: resident now; VmHWM: resident peak) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _servers(bundle: Path, args: argparse.Namespace, logs: Path,
             stack: contextlib.ExitStack) -> tuple[dict[int, str], dict[int, tuple[int, float]]]:
    """One server process per side (`--max-batch`), started, ready and warmed up (an idle one costs
    the other nothing measurable: its worker blocks on an empty queue); their URLs, and each one's
    pid and resident MB once warm (model, preallocated cache, arenas), its peak reset there."""
    urls, ready = {}, {}
    for side in args.batches:
        server = stack.enter_context(running_server(
            bundle, logs / f"server-{side}.log", "--served-model-name", "bench", "--max-batch", str(side),
            *(["--max-context", str(args.max_context)] if args.max_context else []),
            *(["--max-prefill-tokens", str(args.max_prefill_tokens)] if args.max_prefill_tokens else []),
            *([] if args.same_image else ["--vision-cache-mb", "0"]), "--malloc", args.malloc,
            "--max-queue", str(max(args.concurrency) * args.requests_per_slot), "--log-level", "warning"))
        urls[side] = f"{server.url}/v1/chat/completions"
        asyncio.run(_load(urls[side], _bodies(args, 4), 4))  # untimed: first calls at new batch shapes
        Path(f"/proc/{server.process.pid}/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux ≥ 4.0)
        ready[side] = server.process.pid, _memory_mb(server.process.pid, "VmRSS")
    return urls, ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random-llava",
                        help="built-in model to export at --keep, or llava-shaped / qwen2.5-vl-shaped (random-weight "
                             "models with a 1024 x 8 decoder, built here)")
    parser.add_argument("--bundle", type=Path, default=None, help="an exported bundle instead of --model")
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--kv-cache", choices=["concat", "shared"], default="concat",
                        help="the --model export's decoder: concat (batches by re-laying its cache out on join and "
                             "leave) or shared (GroupQueryAttention, batches on a slot cache that never moves)")
    parser.add_argument("--batches", type=int_list, default=[1, 8], help="the --max-batch of each side")
    parser.add_argument("--concurrency", type=int_list, default=[1, 8, 32, 64])
    parser.add_argument("--requests-per-slot", type=int, default=4, help="requests = concurrency × this (≥ 16)")
    parser.add_argument("--max-tokens", type=int, default=32, help="generated per request (EOS ignored)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the sides take turns within each")
    parser.add_argument("--image-size", type=_size, default=None, metavar="WxH",
                        help="resize the example image (224x224) to this; 672x672 gives Qwen2.5-VL 576 visual tokens")
    parser.add_argument("--max-context", type=int, default=None,
                        help="each server's --max-context (what sizes a shared-KV slot cache; default: the model's)")
    parser.add_argument("--max-prefill-tokens", type=int, default=None,
                        help="each server's --max-prefill-tokens (prompt tokens fed between two decode steps)")
    parser.add_argument("--malloc", choices=["tuned", "glibc"], default="tuned",
                        help="each server's --malloc (glibc: its own defaults, which keep memory requests free)")
    parser.add_argument("--same-image", action="store_true",
                        help="every request carries the same image (vision-cache hits); default: a distinct frame each")
    args = parser.parse_args()
    print(describe_machine())
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None and args.model == "llava-shaped":
            _, _, bundle = build_llava_shaped(Path(tmp), "llava-shaped", text_hidden=1024, text_layers=8,
                                              keeps=[args.keep], kv_cache=args.kv_cache)
        elif bundle is None:
            from zspa.export.exporter import ExportOptions, export_bundle

            model = args.model
            if model == "qwen2.5-vl-shaped":
                model = str(Path(tmp) / "qwen2.5-vl-shaped-model")
                save_model(Path(model), "qwen2_5_vl", text_hidden=1024, text_layers=8)
            bundle = Path(tmp) / "bundle"
            export_bundle(ExportOptions(model, bundle, keeps=[args.keep], kv_cache=args.kv_cache, progress=False))
        with contextlib.ExitStack() as stack:
            urls, ready = _servers(bundle, args, Path(tmp), stack)
            rounds = _measure(urls, args)
            peaks = {side: _memory_mb(pid, "VmHWM") / rss for side, (pid, rss) in ready.items()}
    size = "x".join(map(str, args.image_size or Image.open(IMAGE).size))
    images = f"{size} images, " + ("one for all (vision-cache hits)" if args.same_image else "a distinct one each")
    print(f"\n{bundle.name if args.bundle else f'{args.model} ({args.kv_cache} KV cache)'}, keep {args.keep:g}, "
          f"{args.max_tokens} tokens per request, "
          f"{f'--max-context {args.max_context}, ' if args.max_context else ''}"
          f"{f'--max-prefill-tokens {args.max_prefill_tokens}, ' if args.max_prefill_tokens else ''}"
          f"--malloc {args.malloc}, "
          f"{images}, {args.rounds} rounds, median (min–max):")
    print("ITL: inter-token latency at the client (per streamed chunk) and at the server (per token, bucketed)")
    print(f"{'max-batch':>9} {'conc.':>5} {'TTFT p50 ms':>22} {'TTFT p99 ms':>22} {'ITL p50 ms':>18} "
          f"{'ITL p99 ms':>20} {'server ITL p50':>18} {'server ITL p99':>20} {'tokens/s':>22} {'errors':>6}")
    for side in args.batches:
        for concurrency in args.concurrency:
            runs = [r[concurrency] for r in rounds[side]]
            print(f"{side:>9} {concurrency:>5} {_spread([r['ttft_p50'] for r in runs]):>22} "
                  f"{_spread([r['ttft_p99'] for r in runs]):>22} {_spread([r['itl_p50'] for r in runs], 1):>18} "
                  f"{_spread([r['itl_p99'] for r in runs], 1):>20} "
                  f"{_spread([r['server_itl_p50'] for r in runs], 1):>18} "
                  f"{_spread([r['server_itl_p99'] for r in runs], 1):>20} "
                  f"{_spread([r['tokens_per_s'] for r in runs]):>22} "
                  f"{sum(r['errors'] for r in runs):>6}")
    for side, (_, rss) in ready.items():
        print(f"--max-batch {side}: resident {rss:.0f} MB when warm (model, cache, arenas); "
              f"peak under load {peaks[side]:.2f}x that")
    base = args.batches[0]
    for batched in args.batches[1:]:
        for concurrency in args.concurrency:
            pairs = list(zip(rounds[base], rounds[batched]))  # the same round: neighbours in time
            ratios = [b[concurrency]["tokens_per_s"] / a[concurrency]["tokens_per_s"] for a, b in pairs]
            p99 = [b[concurrency]["ttft_p99"] / a[concurrency]["ttft_p99"] for a, b in pairs]
            print(f"concurrency {concurrency}: tokens/s --max-batch {batched} ÷ {base} = {_spread(ratios, 2)}; "
                  f"TTFT p99 ratio {_spread(p99, 2)}")


if __name__ == "__main__":
    main()
