"""What a TensorRT engine build needs decided before TensorRT runs, and what the runtime checks after.

Pure logic on the manifest, testable without a GPU: optimisation profiles from each graph's
symbolic dimensions, which precisions the GPU supports, the engine directory's name, and the
build record that ties engines to one GPU, one TensorRT version and the exact source graphs.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from zspa.errors import BundleError, InvalidInputError
from zspa.manifest import GraphSpec, Manifest
from zspa.pruning.budget import token_budget
from zspa.runtime.vision_kinds import vision_kind

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
# Minimum compute capability per precision (TensorRT 10 support matrix): bf16 from Ampere, fp8
# from Ada/Hopper, int4 weight-only through ModelOpt Q/DQ from Ampere.
_MIN_CAPABILITY = {"fp32": (5, 3), "fp16": (5, 3), "int8": (6, 1), "bf16": (8, 0), "int4": (8, 0), "fp8": (8, 9)}
RECORD_NAME = "build.json"

Shape = tuple[int, ...]


@dataclass(frozen=True)
class ShapeRanges:
    """Upper bounds the engines must accept; the opt point is where TensorRT tunes its kernels."""

    max_context: int
    max_prefill: int
    opt_prefill: int
    opt_context: int
    # Visual tokens per image: fixed for LLaVA (min = opt = max), from the processor's min/max pixels
    # for dynamic-resolution families, whose vision graph takes patches_per_token patches per token.
    min_visual_tokens: int = 1
    opt_visual_tokens: int = 1
    max_visual_tokens: int = 1
    patches_per_token: int = 1
    # tiled families (InternVL tiles, Gemma 3 views): the vision graph's batch is tiles of this many tokens
    tokens_per_tile: int = 0

    @classmethod
    def for_manifest(cls, manifest: Manifest, max_context: int | None = None) -> ShapeRanges:
        limit = manifest.text.max_context
        context = limit if max_context is None else max_context
        if not 1 < context <= limit:
            raise InvalidInputError(f"--max-context must be in (1, {limit}] (the model's context), got {context}")
        max_prefill = min(context, manifest.vision.num_tokens + 512)  # keep 1.0 with a long prompt
        num_tokens = manifest.vision.num_tokens
        smallest_k = min((token_budget(p.keep, num_tokens) for p in manifest.pruners), default=num_tokens)
        vision = manifest.vision
        kind = vision_kind(vision)
        fixed, low = kind.fixed_tokens(vision), kind.fewest_tokens(vision)
        return cls(context, max_prefill, opt_prefill=min(max_prefill, smallest_k + 64),
                   opt_context=min(context, smallest_k + 64 + 256), min_visual_tokens=low,
                   opt_visual_tokens=num_tokens if fixed else min(num_tokens, 1024), max_visual_tokens=num_tokens,
                   patches_per_token=kind.patches_per_token(vision),
                   tokens_per_tile=getattr(vision, "tokens_per_tile", 0))

    def dim(self, name: str) -> tuple[int, int, int]:
        """(min, opt, max) of a symbolic dimension, by the optimum / onnxruntime-genai names the graphs use."""
        ranges = {
            "batch_size": (1, 1, 1),
            "sequence_length": (1, self.opt_prefill, self.max_prefill),
            "past_sequence_length": (0, self.opt_context, self.max_context - 1),
            "total_sequence_length": (1, self.opt_context, self.max_context),
            "prompt_length": (1, 64, self.max_prefill),
            "num_visual_tokens": (self.min_visual_tokens, self.opt_visual_tokens, self.max_visual_tokens),
            "num_patches": tuple(n * self.patches_per_token for n in
                                 (self.min_visual_tokens, self.opt_visual_tokens, self.max_visual_tokens)),
            "num_windows": (1, max(1, self.opt_visual_tokens // 16), self.max_visual_tokens),
            # a static KV cache: the buffers' capacity, one fixed value so every decode step has one shape
            "max_cache_length": (self.max_context,) * 3,
        }
        if self.tokens_per_tile:
            ranges["num_tiles"] = tuple(max(1, n // self.tokens_per_tile) for n in ranges["num_visual_tokens"])
        if name not in ranges:
            raise BundleError(f"manifest.json: no shape range for the dimension {name!r}; this zspa cannot build it")
        return ranges[name]


    def shape_input_values(self, name: str) -> tuple[list[int], list[int], list[int]]:
        """(min, opt, max) values of an input TensorRT reads as a shape: the pruners' budget K."""
        if name != "budget":
            raise BundleError(f"no value range for the shape input {name!r}; this zspa cannot build it")
        return [1], [max(1, self.opt_visual_tokens // 10)], [self.max_visual_tokens]


def optimisation_profile(graph: GraphSpec, ranges: ShapeRanges) -> dict[str, tuple[Shape, Shape, Shape]]:
    """input name → (min, opt, max) shapes; fixed dimensions stay fixed (LLaVA's vision graph is static)."""
    profile = {}
    for tensor in graph.inputs:
        dims = [(d, d, d) if isinstance(d, int) else ranges.dim(d) for d in tensor.shape]
        profile[tensor.name] = tuple(tuple(d[i] for d in dims) for i in range(3))
    return profile


def check_precision(precision: str, capability: tuple[int, int]) -> None:
    if precision not in PRECISIONS:
        raise InvalidInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    needed = _MIN_CAPABILITY[precision]
    if capability < needed:
        raise InvalidInputError(
            f"{precision} needs a GPU of compute capability {needed[0]}.{needed[1]} or newer; this one is "
            f"{capability[0]}.{capability[1]}. Choose fp16 (or int8 where supported)"
        )


def engine_sources(manifest: Manifest, precision: str) -> dict[str, tuple[str, str]]:
    """Engine name → (graph to build it from, precision to build at).

    A `<graph>-trt-<precision>` variant from `zspa-calibrate --tensorrt` replaces its graph;
    pruners build in fp32 (their argmax ties must break as the ONNX graph's do); int8, fp8 and
    int4 need such Q/DQ graphs, so graphs without one build in fp16. onnxruntime-quantized graphs
    (QDQ for the CPU, MatMulNBits) are not TensorRT's format and are refused.
    """
    sources = {}
    for name, spec in manifest.graphs.items():
        if "-trt-" in name:
            continue
        variant = f"{name}-trt-{precision}"
        if variant in manifest.graphs:
            sources[name] = (variant, precision)
        elif name == "decoder" and manifest.decoder.kv_cache == "shared":  # ("static" builds: TensorScatter)
            raise BundleError("the decoder uses onnxruntime's GroupQueryAttention (exported with --kv-cache shared),"
                              " which TensorRT cannot build; re-export with --kv-cache concat")
        elif spec.quantization.get("method", "").startswith("onnxruntime"):
            raise BundleError(
                f"{name} is quantized for onnxruntime ({spec.quantization['precision']}), which TensorRT cannot build;"
                f" run zspa-build on the unquantized bundle, or zspa-calibrate --tensorrt {precision}"
            )
        elif name.startswith("pruner"):
            sources[name] = (name, "fp32")
        else:
            sources[name] = (name, precision if precision in ("fp32", "fp16", "bf16") else "fp16")
    return sources


# TensorScatter, the static KV cache's in-place update, is parsed from TensorRT 10.15 on (onnx-tensorrt's
# operator table; the parser of 10.15 reads opsets up to 24).
STATIC_KV_TENSORRT = (10, 15)


def check_tensorrt_version(manifest: Manifest, version: str) -> None:
    """Refuses, before any engine is built, a bundle this TensorRT cannot parse."""
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if manifest.decoder.kv_cache == "static" and release < STATIC_KV_TENSORRT:
        need = ".".join(map(str, STATIC_KV_TENSORRT))
        raise BundleError(f"the decoder's static KV cache (TensorScatter, opset 24) needs TensorRT {need} or newer; "
                          f"this is {version}: re-export with --kv-cache concat for it")


def strongly_typed(graph: GraphSpec) -> bool:
    """Graphs carrying Q/DQ nodes (from zspa-calibrate) build as strongly typed networks, so
    TensorRT keeps the precisions the graph states instead of choosing its own."""
    return graph.quantization.get("precision") in ("int8", "int4", "fp8")


def engine_dir_name(gpu_name: str, capability: tuple[int, int], trt_version: str) -> str:
    """`engines/<gpu>-sm<cc>-trt<version>`: one folder per device kind, so a bundle can carry several."""
    slug = re.sub(r"[^a-z0-9]+", "-", gpu_name.lower()).strip("-")
    return f"{slug}-sm{capability[0]}{capability[1]}-trt{trt_version}"


@dataclass(frozen=True)
class BuildRecord:
    tensorrt_version: str
    gpu: str
    compute_capability: list[int]
    precision: str
    max_context: int
    max_prefill: int
    workspace_bytes: int
    graphs: dict[str, str] = field(default_factory=dict)  # graph name → sha256 of the ONNX it was built from

    def write(self, folder: Path) -> None:
        (folder / RECORD_NAME).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, folder: Path) -> BuildRecord:
        try:
            return cls(**json.loads((folder / RECORD_NAME).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise BundleError(
                f"{folder / RECORD_NAME}: unreadable build record ({exc}); rebuild with zspa-build"
            ) from None

    def check(self, manifest: Manifest, gpu: str, capability: tuple[int, int], trt_version: str) -> None:
        """Refuses engines built for another GPU, TensorRT version or graph: TensorRT engines are
        not portable across any of them, and a stale engine would run the old model."""
        rebuild = "rebuild them on this device with zspa-build"
        if tuple(self.compute_capability) != tuple(capability) or self.gpu != gpu:
            raise BundleError(f"engines were built for {self.gpu} (sm{''.join(map(str, self.compute_capability))}),"
                              f" not this {gpu} (sm{capability[0]}{capability[1]}); {rebuild}")
        if self.tensorrt_version != trt_version:
            raise BundleError(f"engines were built with TensorRT {self.tensorrt_version}, this is {trt_version}; "
                              f"{rebuild}")
        stale = [name for name, sha in self.graphs.items()
                 if name not in manifest.graphs or manifest.graphs[name].sha256 != sha]
        if stale:
            raise BundleError(f"engines for {', '.join(stale)} were built from other graphs than this bundle's; "
                              f"{rebuild}")
