"""Where zspa's time goes against its targets, each side of every comparison in its own process.

On a random-weight model with LLaVA-1.5's token geometry and a 1024-wide, 8-layer decoder (93 M
parameters: toy proportions, see real_proportions.py for 7B ones), saved with save_pretrained
and exported through the library:

1. pruner time as a share of time to first token at keep 0.1 (target < 1 %; at N = 2916, the
   nearest square grid to LLaVA-NeXT's 2880 tokens, target < 2 %);
2. runtime overhead per decode step: the decode loop's wall time minus the embed and decoder
   graphs' own time in the same run, as a share of the step (target < 2 %);
3. time to first token and decode tokens/s against Hugging Face transformers `generate` on the
   same weights (targets: TTFT 1.2x faster at keep 1.0, 5x at keep 0.1);
4. KV-cache bytes, and the resident memory a request adds to a freshly loaded pipeline, at keep
   0.1 over keep 1.0 (a process per keep);
5. decode tokens/s against onnxruntime-genai on the same decoder weights (its model builder on a
   LlamaForCausalLM directory holding them; fp32, CPU, default threads), at the pruned and the
   unpruned context length, for both decoder KV caches (concat and shared; target >= 1.1x).

Every measurement runs in a fresh process; the sides alternate over `--rounds` and each figure is
printed as median (min, max) over rounds, ratios round by round.

    pip install -e ".[dev,bench]" && python benchmarks/performance.py [--rounds 3] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from genai_reference import build_genai_model, genai_decode_tokens_per_s  # noqa: E402
from isolation import alternate, ratios, run_worker, spread  # noqa: E402
from llava_shaped import IMAGE, QUESTION, add_model_arguments, build_llava_shaped  # noqa: E402
from machine import describe_machine  # noqa: E402


def worker_zspa(args) -> dict:
    """TTFT, pruner and vision time at one keep (medians), then decode tokens/s over `--tokens` tokens."""
    from zspa.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(args.bundle)

    def generate(tokens: int):
        return pipeline.generate(IMAGE, QUESTION, keep=args.keep, max_new_tokens=tokens, ignore_eos=True).stats

    generate(1)
    first = [generate(1) for _ in range(args.runs)]
    decode = generate(args.tokens)
    return {"ttft_ms": statistics.median(s.time_to_first_token_ms for s in first),
            "prune_ms": statistics.median(s.timings_ms["prune"] for s in first),
            "vision_ms": statistics.median(s.timings_ms["vision"] for s in first),
            "tokens_per_s": decode.decode_tokens_per_s, "context": decode.prompt_tokens}


class _TimedCalls:
    """Forwards to a graph runner or decoder session, keeping each run/step call's duration."""

    def __init__(self, inner):
        self.inner, self.durations = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _timed(self, call, *args):
        start = time.perf_counter()
        out = call(*args)
        self.durations.append(time.perf_counter() - start)
        return out

    def run(self, feeds):
        return self._timed(self.inner.run, feeds)

    def step(self, *args):
        return self._timed(self.inner.step, *args)

    def decode(self, *args):
        return self._timed(self.inner.decode, *args)


def worker_overhead(args) -> dict:
    """ms per decode step and ms of it inside the embed and decoder graphs (a decode step runs
    both, `decode`), from one generation:
    the loop's wall time against the graphs' own, call by call, so run-to-run noise cancels."""
    from zspa.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(args.bundle)
    pipeline.generate(IMAGE, QUESTION, keep=0.1, max_new_tokens=4, ignore_eos=True)
    pipeline.decoder = _TimedCalls(pipeline.decoder)
    result = pipeline.generate(IMAGE, QUESTION, keep=0.1, max_new_tokens=args.tokens, ignore_eos=True)
    graphs_s = sum(pipeline.decoder.durations[1:])  # [0]: prefill
    steps = args.tokens - 1
    return {"step_ms": result.stats.timings_ms["decode"] / steps, "graph_ms": graphs_s * 1000 / steps}


def worker_hf(args) -> dict:
    """transformers' time to first token (its processor included) and decode tokens/s, greedy, fp32."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)

    def generate_ms(tokens: int) -> float:
        start = time.perf_counter()
        inputs = processor(images=Image.open(IMAGE), text=text, return_tensors="pt")
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        return (time.perf_counter() - start) * 1000

    generate_ms(1)
    first = statistics.median(generate_ms(1) for _ in range(args.runs))
    full = generate_ms(args.tokens)
    return {"ttft_ms": first, "tokens_per_s": (args.tokens - 1) / ((full - first) / 1000)}


def worker_genai(args) -> dict:
    return {"tokens_per_s": genai_decode_tokens_per_s(args.model, args.context, args.tokens, args.runs)}


def worker_memory(args) -> dict:
    """Resident memory one generation adds to a freshly loaded pipeline (KV cache and the arena's
    activation high-water mark); Linux (/proc). Peak RSS would not do: loading peaks above it."""
    import os

    from zspa.runtime.pipeline import Pipeline

    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    pipeline = Pipeline.load(args.bundle)
    loaded = rss()
    pipeline.generate(IMAGE, QUESTION, keep=args.keep, max_new_tokens=args.tokens, ignore_eos=True)
    return {"bytes": rss() - loaded}


WORKERS = {"zspa": worker_zspa, "overhead": worker_overhead, "hf": worker_hf, "genai": worker_genai,
           "memory": worker_memory}


def save_text_model(model, processor, out: Path) -> Path:
    """The VLM's decoder as a LlamaForCausalLM directory (same weights) for genai's builder."""
    from transformers import LlamaForCausalLM

    llama = LlamaForCausalLM(model.config.text_config)
    llama.model.load_state_dict(model.model.language_model.state_dict())
    llama.lm_head.load_state_dict(model.lm_head.state_dict())
    llama.save_pretrained(out)
    processor.tokenizer.save_pretrained(out)  # the builder copies it into its model folder
    return out


def compare_with_transformers(bundle: Path, model_dir: Path, args) -> dict[float, dict[str, list[float]]]:
    """Items 1 and 3: zspa at keep 1.0 and 0.1 against transformers, alternating processes."""
    keeps = (1.0, 0.1)
    results = {keep: [] for keep in keeps}
    hf = []

    def zspa_side(keep: float):
        def measure() -> float:
            results[keep].append(run_worker(__file__, "zspa", bundle=bundle, keep=keep, runs=args.runs,
                                            tokens=args.decode_tokens))
            return results[keep][-1]["ttft_ms"]
        return measure

    def hf_side() -> float:
        hf.append(run_worker(__file__, "hf", model=model_dir, runs=args.runs, tokens=args.decode_tokens))
        return hf[-1]["ttft_ms"]

    alternate({"hf": hf_side, **{f"keep {k:g}": zspa_side(k) for k in keeps}}, args.rounds)
    shares = [100 * r["prune_ms"] / r["ttft_ms"] for r in results[0.1]]
    print(f"1. pruner share of TTFT at keep 0.1, N=576 (toy proportions): "
          f"{spread([r['prune_ms'] for r in results[0.1]])} ms of {spread([r['ttft_ms'] for r in results[0.1]], 1)}"
          f" ms = {spread(shares)} % (target < 1 %)")
    hf_ttft, hf_rate = [h["ttft_ms"] for h in hf], [h["tokens_per_s"] for h in hf]
    print(f"3. transformers generate: TTFT {spread(hf_ttft, 1)} ms, decode {spread(hf_rate, 1)} tokens/s")
    for keep in keeps:
        ttft, rate = [r["ttft_ms"] for r in results[keep]], [r["tokens_per_s"] for r in results[keep]]
        print(f"   zspa keep {keep:g}: TTFT {spread(ttft, 1)} ms; transformers / zspa = "
              f"{spread(ratios(hf_ttft, ttft))}x (target {1.2 if keep == 1.0 else 5}x); "
              f"decode {spread(rate, 1)} tokens/s = {spread(ratios(rate, hf_rate))}x transformers'")
    return {keep: {"context": results[keep][0]["context"]} for keep in keeps}


def compare_with_genai(bundles: dict[str, Path], genai: Path, contexts: dict[float, int], *, rounds: int,
                       runs: int, tokens: int, label: str = "5. decode") -> None:
    """Our decode loop per bundle against onnxruntime-genai's, alternating processes (item 5;
    quantized.py's INT4 comparison too)."""
    def rate(kind: str, **options):
        return lambda: run_worker(__file__, kind, tokens=tokens, **options)["tokens_per_s"]

    for keep, context in contexts.items():
        sides = {name: rate("zspa", bundle=bundle, keep=keep, runs=1) for name, bundle in bundles.items()}
        sides["genai"] = rate("genai", model=genai, context=context, runs=runs)
        rates = alternate(sides, rounds)
        for name in bundles:
            print(f"{label} at context {context} (keep {keep:g}), {name} KV cache: zspa {spread(rates[name], 1)}"
                  f" tokens/s, onnxruntime-genai {spread(rates['genai'], 1)} tokens/s; zspa / genai = "
                  f"{spread(ratios(rates[name], rates['genai']))}x (target >= 1.1x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds, a fresh process per side")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--decode-compare-tokens", type=int, default=64, help="tokens per genai comparison run")
    parser.add_argument("--skip-large-n", action="store_true", help="skip the N = 2916 model")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    for name in ("--bundle", "--model"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return

    from zspa.export.exporter import ExportOptions, export_bundle
    from zspa.runtime.pipeline import Pipeline
    from zspa.runtime.profiling import kv_cache_bytes

    print(f"machine: {describe_machine()}")
    print(f"onnxruntime CPU against transformers eager, fp32; {args.rounds} rounds x {args.runs} runs, "
          f"a process per measurement; median (min, max) over rounds")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        size = {"text_hidden": args.text_hidden, "text_layers": args.text_layers, "keeps": [0.1]}
        model, processor, bundle = build_llava_shaped(work, "n576", **size)
        model_dir = work / "n576-model"
        contexts = compare_with_transformers(bundle, model_dir, args)

        overhead = [run_worker(__file__, "overhead", bundle=bundle, tokens=64) for _ in range(args.rounds)]
        shares = [100 * (o["step_ms"] - o["graph_ms"]) / o["step_ms"] for o in overhead]
        print(f"2. decode step {spread([o['step_ms'] for o in overhead])} ms, of which graphs "
              f"{spread([o['graph_ms'] for o in overhead])} ms: overhead {spread(shares)} % (target < 2 %)")

        pipeline = Pipeline.load(bundle)
        kv = {keep: kv_cache_bytes(pipeline, contexts[keep]["context"] + args.decode_tokens) for keep in (0.1, 1.0)}
        print(f"4. KV cache at keep 0.1 / keep 1.0: {kv[0.1] / 1e6:.2f} MB / {kv[1.0] / 1e6:.2f} MB = "
              f"{kv[0.1] / kv[1.0]:.3f}")
        memory = alternate({keep: lambda k=keep: run_worker(__file__, "memory", bundle=bundle, keep=k,
                                                             tokens=args.decode_tokens)["bytes"] / 1e6
                            for keep in (0.1, 1.0)}, args.rounds)
        print(f"   memory a request adds to the loaded pipeline: {spread(memory[0.1], 1)} MB / "
              f"{spread(memory[1.0], 1)} MB = {spread(ratios(memory[0.1], memory[1.0]), 3)}")

        shared = work / "n576-shared"
        export_bundle(ExportOptions(str(model_dir), shared, keeps=[0.1], kv_cache="shared", progress=False))
        genai = build_genai_model(save_text_model(model, processor, work / "llama"), work / "genai")
        if genai is not None:
            compare_with_genai({"concat": bundle, "shared": shared}, genai,
                               {keep: c["context"] for keep, c in contexts.items()}, rounds=args.rounds, runs=args.runs,
                               tokens=args.decode_compare_tokens)

        if not args.skip_large_n:
            del model, pipeline
            _, _, big = build_llava_shaped(work, "n2916", image_size=14 * 54, **size)
            runs = [run_worker(__file__, "zspa", bundle=big, keep=0.1, runs=args.runs, tokens=2)
                    for _ in range(args.rounds)]
            shares = [100 * r["prune_ms"] / r["ttft_ms"] for r in runs]
            print(f"1b. pruner share of TTFT at keep 0.1, N=2916 (toy proportions): "
                  f"{spread([r['prune_ms'] for r in runs])} ms of {spread([r['ttft_ms'] for r in runs], 1)} ms = "
                  f"{spread(shares)} % (target < 2 %)")


if __name__ == "__main__":
    main()
