"""zspa against llama.cpp on the same LLaVA-1.5-shaped weights: time to first token and decode speed.

The peer an edge user would pick instead of zspa on a CPU is llama.cpp (its `mtmd` path runs
LLaVA-1.5 from a text GGUF and an `mmproj` GGUF). One random-weight LLaVA-1.5-shaped checkpoint
(CLIP 336 px / 576 tokens, a 1024 × 8 Llama decoder, saved with save_pretrained) is exported by zspa
(fp32 with the shared-KV decoder, onnxruntime's fastest on a CPU, and zspa-calibrate's INT8 and INT4
weight-only decoders in blocks of 32, as q8_0 and q4_0, and of 128; vision fp32) and converted with
the scripts llama.cpp ships: `convert_hf_to_gguf.py` for the text model (f32, f16, q8_0; q4_0 by
llama.cpp's own quantizer) and `tools/mtmd/legacy-models/convert_image_encoder_to_gguf.py` for the
CLIP tower and projector (f32 for every side, as zspa's vision graph is fp32). The checkpoint's
tokenizer is a small BPE of the tests' that llama.cpp's pre-tokenizer table does not know: the
converter is told it is the default one (the text is a few tokens beside 576 image tokens; each
side's context is printed).

Sides: zspa at keep 1.0 (the whole image, context about 600) and keep 0.1 (about 80); llama.cpp
with the image (about 600) and with a text prompt of about 80 tokens (decode at that context).
Every measurement is a fresh process (2 threads each), the sides alternate over `--rounds`,
figures are median (min, max) over rounds, ratios round by round, the machine named. zspa's decode
rate is its Python loop's wall time; llama.cpp's is its engine's own counter (no Python).

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install -e ".[bench-llamacpp]"   # builds llama.cpp (minutes)
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    python benchmarks/llamacpp.py --llama-cpp llama_cpp_python-0.3.36/vendor/llama.cpp [--rounds 3]
"""

from __future__ import annotations

import argparse
import base64
import functools
import json
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isolation import alternate, ratios, run_worker, spread  # noqa: E402
from llava_shaped import IMAGE, QUESTION, add_model_arguments, build_llava_shaped  # noqa: E402
from machine import describe_machine  # noqa: E402

THREADS = 2
# zspa-calibrate's --decoder and --block-size per side: blocks of 32 are q8_0's and q4_0's; blocks of
# 128 keep a scale per 128 weights (INT4: 4.25 bits a weight against q4_0's 4.5), a coarser precision
# that onnxruntime's kernels run faster
ZSPA_PRECISIONS = {"fp32": None, "int8": ("int8", 32), "int4": ("int4", 32), "int8-b128": ("int8", 128),
                   "int4-b128": ("int4", 128)}
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
PEERS = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0", "int8-b128": "q8_0", "int4-b128": "q4_0"}
# The MLP width: a multiple of 32, so that llama.cpp's q8_0 and q4_0 blocks fit every matrix (at the
# default 8/3 of 1024, 2730, it falls back to f16 for ffn_down), as Llama-7B's 11008 does.
INTERMEDIATE_SIZE = 2752
TEXT_PROMPT = " ".join(["Describe the colours, the shapes and where each object lies in the picture."] * 2)


def worker_zspa(args) -> dict:
    from zspa.runtime.pipeline import Pipeline

    pipeline = Pipeline.load(args.bundle, threads=THREADS)
    pipeline.generate(IMAGE, QUESTION, keep=args.keep, max_new_tokens=2, ignore_eos=True)
    stats = pipeline.generate(IMAGE, QUESTION, keep=args.keep, max_new_tokens=args.tokens, ignore_eos=True).stats
    return {"ttft_ms": stats.time_to_first_token_ms, "tokens_per_s": stats.decode_tokens_per_s,
            "context": stats.prompt_tokens}


def worker_llama(args) -> dict:
    """One warm-up and one timed answer; TTFT at the client, decode tokens/s from llama.cpp's own
    counters (the tokens after the first over their evaluation time)."""
    import llama_cpp
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Llava15ChatHandler

    handler = Llava15ChatHandler(clip_model_path=args.mmproj, verbose=False) if args.image else None
    if handler is not None:  # its default system prompt (about 110 tokens) would lengthen llama.cpp's prefill
        handler.DEFAULT_SYSTEM_MESSAGE = None
    llm = Llama(model_path=args.gguf, chat_handler=handler, n_ctx=2048, n_batch=1024, n_threads=THREADS,
                n_threads_batch=THREADS, verbose=False)
    if args.image:
        url = "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]
    else:  # the checkpoint's chat template (in the GGUF) reads content parts
        content = [{"type": "text", "text": TEXT_PROMPT}]
    messages = [{"role": "user", "content": content}]
    never_stop = {llm.token_eos(): -1e9}

    def answer(tokens: int) -> float:
        llm.reset()
        started, first = time.perf_counter(), None
        for chunk in llm.create_chat_completion(messages, max_tokens=tokens, temperature=0.0, stream=True,
                                                logit_bias=never_stop):
            if first is None and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
        return ((first or time.perf_counter()) - started) * 1000

    answer(2)
    llama_cpp.llama_perf_context_reset(llm.ctx)
    ttft = answer(args.tokens)
    perf = llama_cpp.llama_perf_context(llm.ctx)
    return {"ttft_ms": ttft, "tokens_per_s": perf.n_eval / (perf.t_eval_ms / 1000),
            "context": llm.n_tokens - perf.n_eval}


def convert(llama_cpp_dir: Path, model_dir: Path, image_processor, work: Path) -> dict[str, Path]:
    """The text GGUFs by type and the f32 mmproj, with the scripts llama.cpp ships."""
    import torch
    from transformers import LlavaForConditionalGeneration

    outputs = {}
    for kind in ("f32", "f16", "q8_0"):
        outputs[kind] = work / f"text-{kind}.gguf"
        subprocess.run([sys.executable, __file__, "--worker", "convert-text", "--llama-cpp", str(llama_cpp_dir),
                        "--model-dir", str(model_dir), "--outtype", kind, "--gguf", str(outputs[kind])], check=True,
                       stdout=subprocess.DEVNULL)
    outputs["q4_0"] = work / "text-q4_0.gguf"
    quantize_gguf(outputs["f32"], outputs["q4_0"])

    model = LlavaForConditionalGeneration.from_pretrained(model_dir)
    tower = work / "clip-vision"
    model.model.vision_tower.save_pretrained(tower)
    projector = work / "llava.projector"
    torch.save({f"multi_modal_projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()},
               projector)
    command = [sys.executable, __file__, "--worker", "convert-mmproj", "--llama-cpp", str(llama_cpp_dir), "--",
               "-m", str(tower), "--llava-projector", str(projector), "--output-dir", str(work / "mmproj"),
               "--clip-model-is-vision", "--use-f32", "--image-mean", *map(str, image_processor.image_mean),
               "--image-std", *map(str, image_processor.image_std)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    outputs["mmproj"] = work / "mmproj" / "mmproj-model-f32.gguf"
    return outputs


def worker_convert_text(args) -> None:
    """convert_hf_to_gguf.py, told that the checkpoint's pre-tokenizer is llama.cpp's default."""
    root = Path(args.llama_cpp)
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    from conversion import base

    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
    sys.argv = ["convert_hf_to_gguf.py", args.model_dir, "--outtype", args.outtype, "--outfile", args.gguf]
    runpy.run_path(str(root / "convert_hf_to_gguf.py"), run_name="__main__")


def worker_convert_mmproj(args) -> None:
    """The legacy LLaVA image-encoder converter, which reads transformers 4's CLIPVisionModel
    (`model.vision_model.…`); transformers 5's has the tower's parts at the top."""
    import torch
    import transformers

    class Nested(torch.nn.Module):
        def __init__(self, tower: torch.nn.Module):
            super().__init__()
            self.vision_model = tower

    load = transformers.CLIPVisionModel.from_pretrained
    transformers.CLIPVisionModel.from_pretrained = lambda *a, **k: Nested(load(*a, **k))
    root = Path(args.llama_cpp)
    sys.path[:0] = [str(root / "gguf-py")]
    script = root / "tools" / "mtmd" / "legacy-models" / "convert_image_encoder_to_gguf.py"
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")


def quantize_gguf(source: Path, target: Path) -> None:
    """llama.cpp's own quantizer (`llama-quantize`'s library call) to q4_0."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.nthread = THREADS
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} to q4_0")


def zspa_bundles(model_dir: Path, fp32: Path, work: Path, precisions: dict = ZSPA_PRECISIONS) -> dict[str, Path]:
    """The fp32 bundle and zspa-calibrate's decoders of it at `precisions` (name: (decoder, block
    size); default INT8 and INT4), vision kept fp32."""
    from zspa.calibration.calibrate import CalibrateOptions, calibrate_bundle
    from zspa.datasets.shapes import example, image_for

    images = work / "calibration"
    images.mkdir()
    questions = []
    for i in range(8):
        image_for("test", 2000 + i).save(images / f"{i:03d}.png")
        questions.append(example("test", 2000 + i).question)
    prompts = work / "prompts.txt"
    prompts.write_text("\n".join(questions) + "\n", encoding="utf-8")
    bundles = {"fp32": fp32}
    for precision, quantization in precisions.items():
        if quantization:
            decoder, block_size = quantization
            bundles[precision] = work / f"zspa-{precision}"
            calibrate_bundle(CalibrateOptions(fp32, images, prompts, bundles[precision], vision="fp32",
                                              decoder=decoder, block_size=block_size, fidelity_tokens=4,
                                              progress=False))
    return bundles


def measure(side: str, options: dict, results: dict[str, list[dict]]) -> float:
    result = run_worker(__file__, side.split(" ")[0], **options)
    results[side].append(result)
    return result["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--llama-cpp", type=Path, help="a llama.cpp source tree (its conversion scripts)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds, a fresh process per side")
    parser.add_argument("--tokens", type=int, default=64, help="tokens decoded per measurement (default: 64)")
    parser.add_argument("--worker", choices=["zspa", "llama", "convert-text", "convert-mmproj"], help=argparse.SUPPRESS)
    for name in ("--bundle", "--gguf", "--mmproj", "--model-dir", "--outtype"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--keep", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--image", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("rest", nargs="*", help=argparse.SUPPRESS)  # the legacy converter's own arguments
    args = parser.parse_args()
    if args.worker in ("convert-text", "convert-mmproj"):
        {"convert-text": worker_convert_text, "convert-mmproj": worker_convert_mmproj}[args.worker](args)
        return
    if args.worker:
        print(json.dumps({"zspa": worker_zspa, "llama": worker_llama}[args.worker](args)))
        return
    if args.llama_cpp is None or not (args.llama_cpp / "convert_hf_to_gguf.py").is_file():
        parser.error("--llama-cpp must name a llama.cpp source tree (with convert_hf_to_gguf.py)")

    import llama_cpp

    print(f"machine: {describe_machine()}")
    print(f"llama-cpp-python {llama_cpp.__version__}; onnxruntime CPU; {THREADS} threads each; {args.rounds} rounds, "
          f"a process per measurement, {args.tokens} greedy tokens; median (min, max) over rounds")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        size = {"text_hidden": args.text_hidden, "text_layers": args.text_layers, "keeps": [0.1]}
        _, processor, fp32 = build_llava_shaped(work, "n576", kv_cache="shared", intermediate_size=INTERMEDIATE_SIZE,
                                                **size)
        model_dir = work / "n576-model"
        bundles = zspa_bundles(model_dir, fp32, work)
        ggufs = convert(args.llama_cpp, model_dir, processor.image_processor, work)
        sides: dict[str, dict] = {}
        for precision, bundle in bundles.items():
            for keep in (1.0, 0.1):
                sides[f"zspa {precision} keep {keep:g}"] = {"bundle": bundle, "keep": keep, "tokens": args.tokens}
        for kind in GGUF_TYPES:
            sides[f"llama {kind} image"] = {"gguf": ggufs[kind], "mmproj": ggufs["mmproj"], "image": True,
                                            "tokens": args.tokens}
            sides[f"llama {kind} text"] = {"gguf": ggufs[kind], "tokens": args.tokens}
        results: dict[str, list[dict]] = {side: [] for side in sides}
        rates = alternate({side: functools.partial(measure, side, options, results)
                           for side, options in sides.items()}, args.rounds)
        print("\nside | context | TTFT ms | decode tokens/s")
        for side in sides:
            runs = results[side]
            print(f"{side} | {runs[0]['context']} | {spread([r['ttft_ms'] for r in runs], 0)} | "
                  f"{spread(rates[side], 1)}")
        print("\nratios, round by round (target: decode >= 1.0x at the same precision; TTFT at keep 1.0 >= 1.0x "
              "llama.cpp's; TTFT at keep 0.1 >= 5x llama.cpp's unpruned):")
        for precision, kind in PEERS.items():
            for keep, context in ((1.0, "image"), (0.1, "text")):
                ours, theirs = f"zspa {precision} keep {keep:g}", f"llama {kind} {context}"
                print(f"  decode {ours} / {theirs}: {spread(ratios(rates[ours], rates[theirs]))}x")
            for keep in (1.0, 0.1):
                ours, theirs = f"zspa {precision} keep {keep:g}", f"llama {kind} image"
                ttft = ratios([r["ttft_ms"] for r in results[theirs]], [r["ttft_ms"] for r in results[ours]])
                print(f"  TTFT llama {kind} image / {ours}: {spread(ttft)}x")


if __name__ == "__main__":
    main()
