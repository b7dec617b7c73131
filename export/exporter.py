"""HF model → bundle (DESIGN §3): every graph, the tokenizer, the manifest, parity, atomically."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import zspa
from zspa.errors import InvalidInputError
from zspa.export.attention import grouped_attention_export
from zspa.export.graphs import DecoderGraph, DeepstackDecoderGraph, EmbedGraph, ImageBlockDecoderGraph, vision_outputs
from zspa.export.loading import LoadedModel, load_model
from zspa.export.onnx_io import describe_graph, export_graph, node_count
from zspa.export.parity import check_parity
from zspa.export.shared_kv import GROUP_QUERY_ATTENTION, BufferAttention, SharedKVDecoderGraph, buffer_attention
from zspa.export.static_kv import STATIC_CACHE_ATTENTION
from zspa.export.vision_attention import TRANSLATION_TABLE as VISION_TRANSLATION_TABLE
from zspa.integrity import sha256_file
from zspa.manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest, PrunerSpec
from zspa.pruning import METHOD_DEFAULTS
from zspa.pruning.budget import validate_keep
from zspa.pruning.onnx_pruner import save_pruner
from zspa.pruning.params import method_params
from zspa.runtime.staging import staged_directory
from zspa.signing import SigningKey, sign_bundle

DTYPES = {"fp32": (torch.float32, "float32"), "fp16": (torch.float16, "float16")}
DEFAULT_OPSET = 18
# The in-place KV-cache kinds by name; "concat" (past → past + new) is the portable one.
BUFFER_ATTENTIONS = {"shared": GROUP_QUERY_ATTENTION, "static": STATIC_CACHE_ATTENTION}
KV_CACHES = ("concat", *BUFFER_ATTENTIONS)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class ExportOptions:
    model: str
    output: Path
    keeps: list[float] = field(default_factory=lambda: [0.1])
    keep_tokens: list[int] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: ["zspa"])
    relevance_ratio: float = METHOD_DEFAULTS["zspa"]["relevance_ratio"]
    pooling: str = METHOD_DEFAULTS["zspa"]["pooling"]
    dtype: str = "fp32"
    # or "shared" (in-place KV buffers through onnxruntime's GroupQueryAttention) or "static"
    # (in-place through opset 24's TensorScatter + Attention, TensorRT's form)
    kv_cache: str = "concat"
    opset: int = DEFAULT_OPSET
    force: bool = False
    revision: str | None = None
    progress: bool = True
    signing: SigningKey | None = None  # sign the bundle before it replaces the output
    # Dynamic-resolution families (Qwen): the processor's pixel bounds, overriding the checkpoint's
    # (Qwen3-VL's allow 16,384 visual tokens; an edge device and its engines want far fewer).
    min_pixels: int | None = None
    max_pixels: int | None = None
    # Tiled families (InternVL): the most tiles an image is cut into (the checkpoint's max_patches,
    # 12 for InternVL3: 3,328 tokens with the thumbnail).
    max_tiles: int | None = None
    # Gemma 3: cut wide and tall images into pan&scan crops (True/False), or as the checkpoint's
    # preprocessor_config.json says (None; the released ones: off).
    pan_and_scan: bool | None = None


@dataclass
class ExportReport:
    manifest: Manifest
    path: Path
    node_counts: dict[str, int]
    sizes: dict[str, int]


def export_bundle(options: ExportOptions) -> ExportReport:
    _validate(options)
    if options.signing is not None:
        options.signing.check()  # before minutes of export
    steps = 6 + len(options.methods)
    with tqdm(total=steps, desc="loading model", unit="step", disable=not options.progress) as bar:
        loaded = load_model(options.model, options.revision)
        _bound_pixels(loaded.processor, options.min_pixels, options.max_pixels)
        _bound_tiles(loaded.processor, options.max_tiles)
        _set_pan_and_scan(loaded.processor, options.pan_and_scan)
        torch_dtype, dtype_name = DTYPES[options.dtype]
        loaded.model.to(torch_dtype)
        bar.update()
        with staged_directory(options.output, force=options.force) as staging:
            manifest, counts = _write_bundle(loaded, options, staging, torch_dtype, dtype_name, bar)
            sizes = {name: (staging / g.file).stat().st_size for name, g in manifest.graphs.items()}
            if options.signing is not None:
                sign_bundle(staging, options.signing)
    return ExportReport(manifest, options.output.resolve(), counts, sizes)


def _validate(options: ExportOptions) -> None:
    for keep in options.keeps:
        validate_keep(keep)
    for k in options.keep_tokens:
        if k < 1:
            raise InvalidInputError(f"--keep-tokens must be ≥ 1, got {k}")
    if not options.keeps and not options.keep_tokens:
        raise InvalidInputError("give at least one --keep ratio or --keep-tokens budget")
    if options.dtype not in DTYPES:
        raise InvalidInputError(f"--dtype must be one of {sorted(DTYPES)}, got {options.dtype!r}")
    if not 14 <= options.opset <= 23:
        raise InvalidInputError(f"--opset must be between 14 and 23, got {options.opset}")
    if options.kv_cache not in KV_CACHES:
        raise InvalidInputError(f"--kv-cache must be one of {', '.join(KV_CACHES)}, got {options.kv_cache!r}")
    if not options.methods:
        raise InvalidInputError("give at least one pruning --method")
    for name, value in (("--min-pixels", options.min_pixels), ("--max-pixels", options.max_pixels)):
        if value is not None and not 1 <= value <= 2**30:
            raise InvalidInputError(f"{name} must be between 1 and 2^30, got {value}")
    if options.max_tiles is not None and not 1 <= options.max_tiles <= 64:
        raise InvalidInputError(f"--max-tiles must be between 1 and 64, got {options.max_tiles}")
    if None not in (options.min_pixels, options.max_pixels) and options.min_pixels > options.max_pixels:
        raise InvalidInputError(f"--min-pixels {options.min_pixels} is over --max-pixels {options.max_pixels}")
    for method in options.methods:
        method_params(method, _method_params(options, method))  # validates names and parameters


def _bound_pixels(processor, min_pixels: int | None, max_pixels: int | None) -> None:
    """Sets a dynamic-resolution image processor's pixel bounds (its `size` shortest/longest edge,
    in pixels), as the checkpoint's preprocessor_config.json would; fixed-size processors refuse."""
    if min_pixels is None and max_pixels is None:
        return
    size = dict(processor.image_processor.size)
    if "longest_edge" not in size:
        raise InvalidInputError("--min-pixels / --max-pixels apply to dynamic-resolution models (Qwen-VL); this "
                                f"model resizes every image to a fixed size ({size})")
    size["shortest_edge"] = size["shortest_edge"] if min_pixels is None else min_pixels
    size["longest_edge"] = size["longest_edge"] if max_pixels is None else max_pixels
    if size["shortest_edge"] > size["longest_edge"]:
        raise InvalidInputError(f"min pixels {size['shortest_edge']} would be over max pixels {size['longest_edge']}")
    processor.image_processor.size = size


def _bound_tiles(processor, max_tiles: int | None) -> None:
    """Sets a tiled image processor's most tiles (`max_patches`), as its preprocessor_config.json would."""
    if max_tiles is None:
        return
    image_processor = processor.image_processor
    if not hasattr(image_processor, "max_patches"):
        raise InvalidInputError("--max-tiles applies to tiled models (InternVL); this model does not cut images "
                                "into tiles")
    if max_tiles < image_processor.min_patches:
        raise InvalidInputError(f"--max-tiles {max_tiles} is under the checkpoint's min_patches "
                                f"{image_processor.min_patches}")
    image_processor.max_patches = max_tiles


def _set_pan_and_scan(processor, pan_and_scan: bool | None) -> None:
    """Turns a Gemma 3 image processor's pan&scan on or off, as its preprocessor_config.json would."""
    if pan_and_scan is None:
        return
    if not hasattr(processor.image_processor, "pan_and_scan"):
        raise InvalidInputError("--pan-and-scan applies to Gemma 3; this model does not cut images into crops")
    processor.image_processor.do_pan_and_scan = pan_and_scan


def _method_params(options: ExportOptions, method: str) -> dict:
    if method == "zspa":
        return {"relevance_ratio": options.relevance_ratio, "pooling": options.pooling}
    return dict(METHOD_DEFAULTS[method])


def _write_bundle(loaded: LoadedModel, options: ExportOptions, out: Path, torch_dtype, dtype_name: str, bar):
    model, family, processor = loaded.model, loaded.family, loaded.processor
    generator = torch.Generator().manual_seed(0)
    vision_export = family.vision_export(model, processor, generator, torch_dtype)
    vision = vision_export.module
    with torch.no_grad():
        example_tokens, hidden = vision_outputs(vision, vision_export.example)[0].shape[1:]
    vision_spec = family.vision_spec(model, processor, int(example_tokens))
    num_tokens = vision_spec.num_tokens  # with dynamic resolution, the most one image can give
    decoder_spec = dataclasses.replace(family.decoder_spec(model, kv_dtype=dtype_name), kv_cache=options.kv_cache)
    batch, seq = "batch_size", "sequence_length"

    def step(description: str) -> None:
        bar.set_description(description)

    step("exporting vision")
    export_graph(vision, tuple(vision_export.example.values()), out / "vision.onnx",
                 input_names=list(vision_export.example), output_names=vision_export.output_names,
                 dynamic_axes=vision_export.dynamic_axes, opset=options.opset,
                 custom_translation_table=VISION_TRANSLATION_TABLE)
    bar.update()

    step("exporting embed")
    embed = EmbedGraph(family.embedding(model)).eval()
    input_ids = torch.randint(0, decoder_spec.vocab_size, (2, 5), generator=generator)
    export_graph(embed, (input_ids,), out / "embed.onnx", input_names=["input_ids"], output_names=["inputs_embeds"],
                 dynamic_axes={"input_ids": {0: batch, 1: seq}, "inputs_embeds": {0: batch, 1: seq}},
                 opset=options.opset)
    bar.update()

    step("exporting decoder")
    language_model, lm_head = family.language_model(model)
    decoder_class = ImageBlockDecoderGraph if decoder_spec.image_blocks else DecoderGraph
    decoder = _with_deepstack(decoder_class(language_model, lm_head), language_model, decoder_spec)  # the reference
    if options.kv_cache in BUFFER_ATTENTIONS:
        kind = BUFFER_ATTENTIONS[options.kv_cache]
        if decoder_spec.image_blocks:
            raise InvalidInputError(f"--kv-cache {options.kv_cache} has no mask for {family.NAME}'s bidirectional "
                                    "image blocks yet; export it with --kv-cache concat")
        with buffer_attention(language_model, kind):
            _export_decoder(_with_deepstack(SharedKVDecoderGraph(language_model, lm_head, kind), language_model,
                                            decoder_spec), decoder_spec, hidden, torch_dtype, out / "decoder.onnx",
                            kind.opset or options.opset, kind)
    else:
        with grouped_attention_export(language_model):
            _export_decoder(decoder, decoder_spec, hidden, torch_dtype, out / "decoder.onnx", options.opset)
    bar.update()

    pruners = []
    keeps = sorted({*options.keeps, *(min(1.0, k / num_tokens) for k in options.keep_tokens)} - {1.0})
    for method in options.methods if keeps else []:  # keep 1.0 alone: an unpruned bundle
        step(f"exporting pruner {method}")
        params = _method_params(options, method)
        name = f"pruner-{method}"
        save_pruner(method, params, out / f"{name}.onnx", hidden=hidden, dtype=dtype_name, opset=options.opset)
        pruners += [PrunerSpec(method, keep, params, name) for keep in keeps]
        bar.update()

    step("checking parity with transformers")
    parity = check_parity(out, vision, decoder, embed, vision_inputs=vision_export.parity_example,
                          input_ids=input_ids[:1],
                          decoder_spec=decoder_spec, max_context=family.text_spec(model, processor).max_context,
                          dtype=dtype_name)
    bar.update()

    step("writing tokenizer and manifest")
    files = _save_tokenizer(processor, out)
    graph_files = ["vision", "embed", "decoder", *dict.fromkeys(p.graph for p in pruners)]
    manifest = Manifest(
        schema_version=SCHEMA_VERSION,
        zspa_version=zspa.__version__,
        family=family.NAME,
        opset=options.opset,
        dtype=dtype_name,
        source=loaded.source,
        graphs={name: describe_graph(out / f"{name}.onnx") for name in graph_files},
        vision=vision_spec,
        text=family.text_spec(model, processor),
        decoder=decoder_spec,
        pruners=pruners,
        files=files,
        parity=parity,
    )
    (out / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    bar.update()
    return manifest, {name: node_count(out / f"{name}.onnx") for name in graph_files}


def _with_deepstack(decoder: torch.nn.Module, language_model: torch.nn.Module, spec) -> torch.nn.Module:
    """The decoder graph, taking `deepstack_embeds` where the family adds DeepStack planes."""
    if not spec.deepstack_layers:
        return decoder.eval()
    return DeepstackDecoderGraph(decoder, list(language_model.layers[: spec.deepstack_layers])).eval()


def _export_decoder(decoder: torch.nn.Module, spec, hidden: int, torch_dtype, path: Path, opset: int,
                    buffers: BufferAttention | None = None) -> None:
    """`buffers`: the in-place cache's attention kind (None: the portable concat cache)."""
    batch, seq, past_len = 2, 3, 4  # past ≥ 2 so neither axis is specialised
    positions_shape = (3, batch) if spec.mrope else (batch,)  # M-RoPE: (temporal, height, width) × batch
    capacity = past_len + seq + 5 if buffers else past_len
    past = [torch.randn(batch, spec.num_kv_heads, capacity, spec.head_dim).to(torch_dtype)
            for _ in range(2 * spec.num_layers)]
    optional = {}  # runtime/decoder_inputs.py feeds the same ones
    if spec.deepstack_layers:
        optional["deepstack_embeds"] = torch.randn(spec.deepstack_layers, batch, seq, hidden).to(torch_dtype)
    if spec.image_blocks:
        optional["image_block_ids"] = torch.tensor([[0, 0, 0, 0, 1, 1, 0], [0, 1, 1, 0, 2, 2, 2]])
    if len(optional) > 1:
        raise InvalidInputError(f"a decoder taking {' and '.join(optional)} is not supported")
    args = (
        torch.randn(batch, seq, hidden).to(torch_dtype),
        torch.ones(batch, past_len + seq, dtype=torch.int64),
        torch.arange(past_len, past_len + seq).expand(*positions_shape, seq).contiguous(),
        *optional.values(),
        *past,
    )
    past_names, present_names = spec.past_names, spec.present_names
    # in place, past and present are one buffer: its capacity, not a length
    past_axis, present_axis = (("max_cache_length",) * 2 if buffers
                               else ("past_sequence_length", "total_sequence_length"))
    axes = {
        "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
        "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
        "position_ids": {len(positions_shape) - 1: "batch_size", len(positions_shape): "sequence_length"},
        "deepstack_embeds": {1: "batch_size", 2: "sequence_length"},
        "image_block_ids": {0: "batch_size", 1: "total_sequence_length"},
        "logits": {0: "batch_size"},
        **{name: {0: "batch_size", 2: past_axis} for name in past_names},
        **{name: {0: "batch_size", 2: present_axis} for name in present_names},
    }
    inputs = ["inputs_embeds", "attention_mask", "position_ids", *optional]
    export_graph(decoder, args, path, input_names=[*inputs, *past_names],
                 output_names=["logits", *present_names], dynamic_axes=axes, opset=opset,
                 custom_translation_table=buffers.translation_table if buffers else None)


def _save_tokenizer(processor, out: Path) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        processor.tokenizer.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            shutil.copy(Path(tmp) / name, out / name)
    return {name: sha256_file(out / name) for name in TOKENIZER_FILES}
