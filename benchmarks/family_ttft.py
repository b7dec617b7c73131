"""Qwen2.5-VL-, Qwen3-VL-, InternVL3- or Gemma-3-shaped model: time to first token at keep 1.0, 0.25 and 0.1
for three image sizes against transformers `generate` on the same weights, and (Qwen2.5-VL)
decode tokens/s against onnxruntime-genai.

A random-weight model with the family's token geometry (Qwen2.5-VL: 14 px patches, 2×2 merge,
112 px windows; Qwen3-VL: 16 px patches, a learned position table, DeepStack planes from two of
its blocks into the first two decoder layers; both dynamic resolution up to 1280 tokens;
InternVL3: 448 px tiles of 256 tokens, 3 / 9 / 13 tiles with the thumbnail, up to 3,328 tokens;
Gemma 3: 896 px views of 256 tokens (SigLIP 14 px patches, 4×4 pool) with pan&scan on, 1 / 3 / 5
views, sliding-window local layers of 1,024 and a global last layer, bidirectional image blocks), a
256-wide 4-block tower and a 1024-wide, 8-layer decoder is saved with save_pretrained and exported with
zspa-export from that directory, as a user's checkpoint would be. Every measurement runs in a
fresh process; the sides alternate over `--rounds`, and each ratio is printed with the min /
median / max over rounds, with zspa's time per stage and transformers' vision tower alone
(pruning acts after the tower, so the tower bounds what it can save). CPU, fp32.

    pip install -e ".[dev,bench]" && python benchmarks/family_ttft.py [--family qwen3_vl|internvl|gemma3] [--rounds 3]
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
from isolation import ratios, run_worker, spread  # noqa: E402
from machine import describe_machine  # noqa: E402

IMAGE = Path(__file__).resolve().parent.parent / "zspa" / "assets" / "example.png"
QUESTION = "What colour is the ball next to the house?"
SIZES = {"qwen2_5_vl": [(448, 448), (896, 672), (1280, 720)], "qwen3_vl": [(448, 448), (896, 672), (1280, 720)],
         "internvl": [(896, 448), (1280, 720), (1344, 1792)],  # InternVL: 2 tiles, 8, 12, each + the thumbnail
         "gemma3": [(896, 896), (1280, 720), (2560, 720)]}  # Gemma 3 with pan&scan: 1 view, the image + 2 crops, + 4
KEEPS = (1.0, 0.25, 0.1)


def _image(size: tuple[int, int]):
    from PIL import Image

    return Image.open(IMAGE).convert("RGB").resize(size)


FAMILIES = {"qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
            "internvl": "InternVLForConditionalGeneration", "gemma3": "Gemma3ForConditionalGeneration"}


def save_model(directory: Path, family: str, text_hidden: int, text_layers: int) -> None:
    """The checkpoint directory: weights, image processor, tokenizer and chat template."""
    from zspa.export import tiny_gemma3, tiny_internvl
    from zspa.export.tiny_qwen import build_model, build_processor, build_tiny_qwen3, save_checkpoint

    if family == "gemma3":
        processor = tiny_gemma3.build_processor(pan_and_scan=True, image_size=896, tokens_per_image=256)
        model = tiny_gemma3.build_model(processor, vision_hidden=256, vision_layers=4, text_hidden=text_hidden,
                                        text_layers=text_layers, sliding_window=1024, initializer_range=0.02,
                                        patch_size=14)
    elif family == "internvl":
        processor = tiny_internvl.build_processor()
        model = tiny_internvl.build_model(processor, vision_hidden=256, vision_layers=4, text_hidden=text_hidden,
                                          text_layers=text_layers, initializer_range=0.02)
    else:
        processor = build_tiny_qwen3()[1] if family == "qwen3_vl" else build_processor()
        model = build_model(processor, vision_hidden=256, vision_depth=4, text_hidden=text_hidden,
                            text_layers=text_layers, initializer_range=0.02, family=family)
    save_checkpoint(model, processor, directory)


def worker_zspa(args) -> dict:
    from zspa.runtime.pipeline import Pipeline
    from zspa.runtime.sequence import STAGES

    pipeline = Pipeline.load(args.bundle)
    image = _image(tuple(args.size))
    if args.decode:
        pipeline.generate(image, QUESTION, keep=args.keep, max_new_tokens=4, ignore_eos=True)
        rates, context = [], 0
        for _ in range(args.runs):
            stats = pipeline.generate(image, QUESTION, keep=args.keep, max_new_tokens=args.tokens,
                                      ignore_eos=True).stats
            rates.append(stats.decode_tokens_per_s)
            context = stats.prompt_tokens
        return {"tokens_per_s": statistics.median(rates), "context": context}
    pipeline.generate(image, QUESTION, keep=args.keep, max_new_tokens=1)
    runs = [pipeline.generate(image, QUESTION, keep=args.keep, max_new_tokens=1).stats for _ in range(args.runs)]
    stages = {stage: statistics.median(r.timings_ms[stage] for r in runs) for stage in STAGES if stage != "decode"}
    return {"ms": statistics.median(r.time_to_first_token_ms for r in runs), "stages": stages,
            "visual_tokens": runs[0].visual_tokens_total}


def worker_hf(args) -> dict:
    """`generate` with one new token, the processor's work included (as zspa's TTFT includes preprocessing)."""
    import torch
    import transformers
    from transformers import (
        AutoTokenizer,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        GotOcr2ImageProcessorPil,
        Qwen2VLImageProcessorPil,
    )

    model_class = getattr(transformers, FAMILIES[args.family])
    model = model_class.from_pretrained(args.model, dtype=torch.float32).eval()
    internvl, gemma = args.family == "internvl", args.family == "gemma3"
    processor_class = {"internvl": GotOcr2ImageProcessorPil, "gemma3": Gemma3ImageProcessorPil}.get(
        args.family, Qwen2VLImageProcessorPil)
    image_processor = processor_class.from_pretrained(args.model)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    template = (Path(args.model) / "chat_template.jinja").read_text()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False)
    image = _image(tuple(args.size))

    def inputs() -> tuple[dict, torch.Tensor]:
        """What the family's processor gives: pixels, and the ids with the placeholder expanded."""
        if gemma:  # Gemma3Processor itself (no torchvision needed), pan&scan asked for in the call
            processor = Gemma3Processor(image_processor, tokenizer, chat_template=template,
                                        image_seq_length=model.config.mm_tokens_per_image)
            given = processor(text=text, images=[image], do_pan_and_scan=True, return_tensors="pt")
            ids = given.pop("input_ids")
            given.pop("attention_mask")
            return dict(given), ids
        if internvl:  # InternVLProcessor: crop_to_patches, <img> + 256 per tile + </img>
            pixels = image_processor(images=[image], crop_to_patches=True, return_tensors="pt")
            block = "<img>" + "<IMG_CONTEXT>" * (256 * int(pixels.pop("num_patches")[0])) + "</img>"
            return pixels, tokenizer(text.replace("<IMG_CONTEXT>", block), return_tensors="pt")["input_ids"]
        pixels = image_processor(images=[image], return_tensors="pt")
        count = int(pixels["image_grid_thw"].prod()) // 4  # what Qwen2_5_VLProcessor expands the placeholder to
        ids = tokenizer(text.replace("<|image_pad|>", "<|image_pad|>" * count), return_tensors="pt")["input_ids"]
        return pixels, ids

    def first_token_ms() -> float:
        start = time.perf_counter()
        pixels, ids = inputs()
        extra = {} if internvl or gemma else {"mm_token_type_ids": (ids == model.config.image_token_id).int()}
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                           **extra, **pixels)
        return (time.perf_counter() - start) * 1000

    def tower_ms() -> float:  # the vision tower alone, on the processor's output
        pixels, _ = inputs()
        start = time.perf_counter()
        layer = {"vision_feature_layer": -1, "vision_feature_select_strategy": "default"} if internvl else {}
        with torch.no_grad():
            if gemma:
                model.model.get_image_features(pixels["pixel_values"])
            else:
                model.model.get_image_features(*pixels.values(), **layer)
        return (time.perf_counter() - start) * 1000

    first_token_ms()
    return {"ms": statistics.median(first_token_ms() for _ in range(args.runs)),
            "vision_ms": statistics.median(tower_ms() for _ in range(args.runs))}


def worker_genai(args) -> dict:
    return {"tokens_per_s": genai_decode_tokens_per_s(args.model, args.context, args.tokens, args.runs)}


def build_genai_text_model(checkpoint: Path, out: Path) -> Path | None:
    """The decoder as a Qwen2ForCausalLM (text-only M-RoPE with equal t/h/w positions is plain RoPE),
    built by onnxruntime-genai's model builder with the same weights."""
    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2Config, Qwen2ForCausalLM

    source = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32)
    text = source.config.text_config.to_dict()
    rope = {k: v for k, v in text.pop("rope_parameters").items() if k != "mrope_section"}
    config = Qwen2Config(**{k: v for k, v in text.items() if k in Qwen2Config().to_dict()}, rope_parameters=rope)
    model = Qwen2ForCausalLM(config)
    model.model.load_state_dict(source.model.language_model.state_dict())
    model.lm_head.load_state_dict(source.lm_head.state_dict())
    model.save_pretrained(out / "qwen2")
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(out / "qwen2")
    return build_genai_model(out / "qwen2", out / "genai")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="qwen2_5_vl")
    parser.add_argument("--text-hidden", type=int, default=1024)
    parser.add_argument("--text-layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds, a fresh process per side")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per process (median)")
    parser.add_argument("--tokens", type=int, default=64, help="decoded tokens per decode measurement")
    parser.add_argument("--worker", choices=["zspa", "hf", "genai"], help=argparse.SUPPRESS)
    parser.add_argument("--bundle", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--context", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--decode", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps({"zspa": worker_zspa, "hf": worker_hf, "genai": worker_genai}[args.worker](args)))
        return

    from zspa.export.exporter import ExportOptions, export_bundle

    print(f"machine: {describe_machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        checkpoint = work / f"{args.family}-shaped"
        save_model(checkpoint, args.family, args.text_hidden, args.text_layers)
        bundle = work / "bundle"
        export_bundle(ExportOptions(str(checkpoint), bundle, keeps=[0.1, 0.25], progress=False))
        print(f"model: {args.family} geometry, vision 256 x 4 blocks, decoder {args.text_hidden} x {args.text_layers}, "
              f"random weights; onnxruntime CPU vs transformers eager, fp32; {args.rounds} rounds x {args.runs} runs")
        for size in SIZES[args.family]:
            times: dict[str, list[float]] = {"hf": [], **{f"keep {k:g}": [] for k in KEEPS}}
            stages: dict[str, list[dict]] = {f"keep {k:g}": [] for k in KEEPS}
            towers, visual_tokens = [], 0
            for _ in range(args.rounds):
                reference = run_worker(__file__, "hf", model=checkpoint, size=size, runs=args.runs, family=args.family)
                times["hf"].append(reference["ms"])
                towers.append(reference["vision_ms"])
                for keep in KEEPS:
                    result = run_worker(__file__, "zspa", bundle=bundle, size=size, keep=keep, runs=args.runs)
                    times[f"keep {keep:g}"].append(result["ms"])
                    stages[f"keep {keep:g}"].append(result["stages"])
                    visual_tokens = result["visual_tokens"]
            print(f"{size[0]}x{size[1]} ({visual_tokens} visual tokens): transformers generate TTFT "
                  f"{spread(times['hf'])} ms, its vision tower alone {spread(towers)} ms")
            for keep in KEEPS:
                ours = times[f"keep {keep:g}"]
                split = ", ".join(f"{stage} {statistics.median(r[stage] for r in stages[f'keep {keep:g}']):.0f}"
                                  for stage in stages[f"keep {keep:g}"][0])
                print(f"{size[0]}x{size[1]}: zspa keep {keep:g} TTFT {spread(ours)} ms ({split} ms); "
                      f"transformers / zspa = {spread(ratios(times['hf'], ours))}x")

        genai = build_genai_text_model(checkpoint, work) if args.family == "qwen2_5_vl" else None
        if genai is None:
            return
        for keep in (0.1, 1.0):
            size = SIZES[args.family][-1]
            ours, theirs = [], []
            for _ in range(args.rounds):
                result = run_worker(__file__, "zspa", bundle=bundle, size=size, keep=keep, runs=args.runs,
                                    tokens=args.tokens, decode=True)
                ours.append(result["tokens_per_s"])
                theirs.append(run_worker(__file__, "genai", model=genai, context=result["context"], runs=args.runs,
                                         tokens=args.tokens)["tokens_per_s"])
            print(f"decode at context {result['context']} ({size[0]}x{size[1]}, keep {keep:g}): zspa "
                  f"{spread(ours)} tokens/s, onnxruntime-genai {spread(theirs)} tokens/s; zspa / genai = "
                  f"{spread(ratios(ours, theirs))}x")


if __name__ == "__main__":
    main()
