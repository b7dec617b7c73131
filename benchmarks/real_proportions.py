"""The pruner's share of time to first token at LLaVA-1.5-7B proportions, without the 7B weights.

The toy model of `performance.py` has a 93 M-parameter decoder, so the pruner's share of TTFT there
measures the toy. Here: ZSPAPrune's per-request graph at D = 4096 (LLaVA-1.5-7B's width) for
N = 576 and N = 2916 at keep 0.1, and the prefill of one Llama-7B-sized decoder layer (4096 wide,
MLP 11008, 32 heads of 128) on the pruned sequence, scaled by 32 layers:

    share = pruner / (pruner + 32 × one layer's prefill)

The vision tower and the LM head are left out, so the real share is lower still. Both graphs are
exported by zspa-export from a save_pretrained checkpoint (a one-layer random-weight LLaVA). Every
measurement runs in a fresh process; the sides alternate over `--rounds`; medians with min / max.

    python benchmarks/real_proportions.py [--rounds 3] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isolation import median_ms, run_worker, spread  # noqa: E402
from machine import describe_machine  # noqa: E402

LAYERS, HIDDEN, MLP, HEADS = 32, 4096, 11008, 32
TEXT_TOKENS = 40  # system prompt, question and chat template around the image


def build_bundle(work: Path) -> Path:
    from zspa.export.exporter import ExportOptions, export_bundle
    from zspa.export.tiny import build_model, build_processor

    processor = build_processor()
    model = build_model(processor, vision_hidden=64, vision_layers=1, text_hidden=HIDDEN, text_layers=1,
                        initializer_range=0.02, max_context=4096, intermediate_size=MLP, text_heads=HEADS,
                        kv_heads=HEADS)
    model.save_pretrained(work / "model")
    processor.save_pretrained(work / "model")
    export_bundle(ExportOptions(str(work / "model"), work / "bundle", keeps=[0.1], progress=False))
    return work / "bundle"


def worker(args) -> dict:
    from zspa.runtime.backends import OrtBackend
    from zspa.runtime.bundle import Bundle

    bundle = Bundle.open(args.bundle)
    rng = np.random.default_rng(0)
    backend = OrtBackend()
    if args.worker == "pruner":
        pruner = backend.graph(bundle.graph_file("pruner-zspa"))
        feeds = {"image_features": rng.standard_normal((1, args.n, HIDDEN)).astype(np.float32),
                 "prompt_embeds": rng.standard_normal((1, TEXT_TOKENS, HIDDEN)).astype(np.float32),
                 "prompt_mask": np.ones((1, TEXT_TOKENS), np.int64), "budget": np.array([args.k], np.int64)}
        return {"ms": median_ms(lambda: pruner.run(feeds), args.runs)}
    manifest = bundle.manifest
    decoder = backend.decoder(bundle.graph_file("decoder"), manifest.decoder, manifest.text.max_context)
    embeds = rng.standard_normal((1, args.s, HIDDEN)).astype(np.float32) * 0.02
    mask, positions = np.ones((1, args.s), np.int64), np.arange(args.s, dtype=np.int64)[None]

    def prefill():
        decoder.reset()
        decoder.step(embeds, mask, positions)

    return {"ms": median_ms(prefill, args.runs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--worker", choices=["pruner", "layer"], help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    for name in ("n", "k", "s"):
        parser.add_argument(f"--{name}", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    from zspa.pruning.budget import token_budget

    print(f"machine: {describe_machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        bundle = build_bundle(Path(tmp))
        print(f"one decoder layer {HIDDEN} wide, MLP {MLP}, {HEADS} heads; x {LAYERS} layers; pruner D = {HIDDEN}; "
              f"onnxruntime CPU fp32; {args.rounds} rounds, a process per measurement")
        for n in (576, 2916):
            k = token_budget(0.1, n)
            sequence = k + TEXT_TOKENS
            pruner, layer = [], []
            for _ in range(args.rounds):
                pruner.append(run_worker(__file__, "pruner", bundle=bundle, runs=args.runs, n=n, k=k)["ms"])
                layer.append(run_worker(__file__, "layer", bundle=bundle, runs=args.runs, s=sequence)["ms"])
            shares = [100 * p / (p + LAYERS * one) for p, one in zip(pruner, layer)]
            print(f"N={n} K={k}: pruner {spread(pruner, 1)} ms; one layer's prefill of {sequence} tokens "
                  f"{spread(layer, 1)} ms; pruner share of TTFT at 7B proportions {spread(shares)} % (target "
                  f"{'< 1' if n == 576 else '< 2'} %)")


if __name__ == "__main__":
    main()
