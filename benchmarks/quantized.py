"""The quantized CPU path: zspa-calibrate's INT4 decoder against onnxruntime-genai's INT4 model,
and the INT8 vision graph against the fp32 one.

On performance.py's model (LLaVA-1.5 geometry, 1024-wide 8-layer decoder, random weights),
calibrated by `zspa-calibrate` on 8 shapes images and questions:

1. decode tokens/s of the INT4 weight-only decoder (MatMulNBits, blocks of 32, accuracy level 4)
   against onnxruntime-genai's builder at `-p int4` on the same weights (its defaults: blocks of
   32, accuracy level 4), at the pruned and unpruned context, both KV caches (target >= 1.1x);
2. the vision stage and time to first token with the INT8 vision graph (decoder kept fp32) against
   the fp32 bundle, at keep 0.1 and 1.0, on a second model whose vision tower has CLIP ViT-L's
   width (1024, 4 of its 24 layers) and a small decoder: the toy's 128-wide tower is too small
   for int8 to pay.

Every measurement runs in a fresh process (performance.py's workers); the sides alternate over
`--rounds`, medians with min and max over rounds.

    pip install -e ".[dev,bench]" && python benchmarks/quantized.py [--rounds 3] [--runs 5]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import performance  # noqa: E402

from genai_reference import build_genai_model  # noqa: E402
from isolation import alternate, ratios, run_worker, spread  # noqa: E402
from llava_shaped import add_model_arguments, build_llava_shaped  # noqa: E402
from machine import describe_machine  # noqa: E402

CONTEXTS = {0.1: 76, 1.0: 594}  # prompt tokens at each keep (576 visual tokens, 18 of text)


def calibrate(bundle: Path, out: Path, images: Path, prompts: Path, **precisions) -> Path:
    from zspa.calibration.calibrate import CalibrateOptions, calibrate_bundle

    calibrate_bundle(CalibrateOptions(bundle, images, prompts, out, progress=False, fidelity_tokens=4, **precisions))
    return out


def calibration_folder(root: Path, count: int = 8) -> tuple[Path, Path]:
    from zspa.datasets.shapes import example, image_for

    images = root / "images"
    images.mkdir(parents=True)
    for i in range(count):
        image_for("test", i).save(images / f"{i:03d}.png")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(example("test", i).question for i in range(count)) + "\n", encoding="utf-8")
    return images, prompts


def compare_vision(fp32: Path, int8: Path, args) -> None:
    for keep in CONTEXTS:
        results: dict[str, list[dict]] = {"fp32": [], "int8": []}

        def side(name: str, bundle: Path, keep: float = keep, results: dict = results):
            def measure() -> float:
                results[name].append(run_worker(performance.__file__, "zspa", bundle=bundle, keep=keep,
                                                runs=args.runs, tokens=2))
                return results[name][-1]["ttft_ms"]
            return measure

        alternate({"fp32": side("fp32", fp32), "int8": side("int8", int8)}, args.rounds)
        vision = {name: [r["vision_ms"] for r in runs] for name, runs in results.items()}
        ttft = {name: [r["ttft_ms"] for r in runs] for name, runs in results.items()}
        print(f"2. keep {keep:g}: vision stage fp32 {spread(vision['fp32'], 1)} ms, int8 {spread(vision['int8'], 1)} ms"
              f" = {spread(ratios(vision['fp32'], vision['int8']))}x faster; TTFT fp32 {spread(ttft['fp32'], 1)} ms, "
              f"int8 vision {spread(ttft['int8'], 1)} ms = {spread(ratios(ttft['fp32'], ttft['int8']))}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds, a fresh process per side")
    parser.add_argument("--tokens", type=int, default=64, help="decoded tokens per decode measurement")
    args = parser.parse_args()

    from zspa.export.exporter import ExportOptions, export_bundle

    print(f"machine: {describe_machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, processor, concat = build_llava_shaped(work, "n576", text_hidden=args.text_hidden,
                                                      text_layers=args.text_layers, keeps=[0.1])
        shared = work / "n576-shared"
        export_bundle(ExportOptions(str(work / "n576-model"), shared, keeps=[0.1], kv_cache="shared", progress=False))
        images, prompts = calibration_folder(work / "calibration")
        int4 = {"concat": calibrate(concat, work / "int4-concat", images, prompts, vision="fp32"),
                "shared": calibrate(shared, work / "int4-shared", images, prompts, vision="fp32")}
        _, _, wide = build_llava_shaped(work, "vit-l-width", text_hidden=256, text_layers=2, keeps=[0.1],
                                        vision_hidden=1024, vision_layers=4)
        int8_vision = calibrate(wide, work / "int8-vision", images, prompts, decoder="fp32")
        genai = build_genai_model(performance.save_text_model(model, processor, work / "llama"), work / "genai-int4",
                                  precision="int4")
        print(f"onnxruntime CPU; {args.rounds} rounds x {args.runs} runs, a process per measurement")
        if genai is not None:
            performance.compare_with_genai(int4, genai, CONTEXTS, rounds=args.rounds, runs=args.runs,
                                           tokens=args.tokens, label="1. INT4 decode")
        compare_vision(wide, int8_vision, args)


if __name__ == "__main__":
    main()
