"""The bundle manifest (DESIGN §3): the only thing the runtime knows about a model.

Plain dataclasses, read by pydantic in strict mode (nothing coerced: "8" is no int, true no
number), so a tampered or hand-edited manifest fails naming its field; `zspa.manifest_schema`
publishes the same types as a JSON Schema. Every field the generation loop needs lives here; a
family branch in the runtime means a field is missing from this file.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Discriminator, TypeAdapter, ValidationError

from zspa.errors import BundleError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]


@dataclass(frozen=True)
class GraphSpec:
    file: str
    sha256: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # External-data files (graphs over 2 GB) and their hashes, checked like the graph itself.
    data_files: dict[str, str] = field(default_factory=dict)
    # How a calibrated graph was quantized ({} for the exported precision): precision, method, settings.
    quantization: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class VisionSpec:
    """Image preprocessing every kind shares (the family's transformers processor, PIL path); each
    `kind` has its own spec type below with the fields only it reads (`VISION_SPECS`)."""

    kind: str  # "clip" | "qwen2_vl" | "qwen3_vl" | "internvl" | "gemma3": runtime/vision_kinds.py's preparation
    resample: int  # PIL resampling filter id
    rescale_factor: float
    mean: list[float]
    std: list[float]
    num_tokens: int  # visual tokens per image; with dynamic resolution, the most one image can give
    hidden_size: int

    def check(self) -> None:
        """The kind's own fields in range (BundleError naming the field)."""


@dataclass(frozen=True)
class ClipVisionSpec(VisionSpec):
    """"clip" (LLaVA): resize the shortest edge, center-crop to the tower's fixed square."""

    kind: Literal["clip"]
    image_size: list[int]  # [height, width] fed to the vision graph
    resize_shortest_edge: int | None
    center_crop: bool

    def check(self) -> None:
        _check_size("vision.image_size", self.image_size)


@dataclass(frozen=True)
class PatchVisionSpec(VisionSpec):
    """"qwen2_vl" (Qwen2-VL, Qwen2.5-VL): smart resize within [min_pixels, max_pixels] to multiples of
    patch·merge, patchified, so N follows the image (runtime/qwen_vision.py), with attention windows
    where `window_size` > 0; "qwen3_vl": the same, plus the taps into the learned position table
    whose side is `position_grid`."""

    kind: Literal["qwen2_vl", "qwen3_vl"]
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    window_size: int = 0  # Qwen2.5-VL window attention, in pixels
    position_grid: int = 0  # Qwen3-VL: side of the learned square position-embedding table

    def check(self) -> None:
        for where, value in (("vision.patch_size", self.patch_size), ("vision.merge_size", self.merge_size),
                             ("vision.temporal_patch_size", self.temporal_patch_size)):
            _in_range(where, value, 1, 2**16)
        _in_range("vision.position_grid", self.position_grid, 0, 2**12)
        if not 0 <= self.min_pixels <= self.max_pixels <= 2**30:
            raise BundleError("manifest.json: vision.min_pixels and max_pixels must satisfy 0 ≤ min ≤ max ≤ 2^30")


@dataclass(frozen=True)
class TileVisionSpec(VisionSpec):
    """"internvl" (InternVL3/3.5): the image resized onto the grid of `tile_size` tiles (between
    min_tiles and max_tiles of them) whose aspect ratio is closest to its own, split into tiles,
    plus a thumbnail of the whole image when there is more than one tile; every tile gives
    `tokens_per_tile` visual tokens, all of one image one block (runtime/tiles.py)."""

    kind: Literal["internvl"]
    tile_size: list[int]  # [height, width] of a tile, what the vision graph takes
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    tokens_per_tile: int

    def check(self) -> None:
        _check_size("vision.tile_size", self.tile_size)
        _in_range("vision.tokens_per_tile", self.tokens_per_tile, 1, 2**16)
        if not 1 <= self.min_tiles <= self.max_tiles <= 64:
            raise BundleError("manifest.json: vision.min_tiles and max_tiles must satisfy 1 ≤ min ≤ max ≤ 64")


@dataclass(frozen=True)
class ViewVisionSpec(VisionSpec):
    """"gemma3" (Gemma 3): the whole image resized to the tower's `image_size` square, and with
    `pan_and_scan` the crops of `Gemma3ImageProcessorPil.pan_and_scan` (an image whose aspect ratio
    passes `min_ratio` is cut along its long side into 2–`max_crops` crops of at least
    `min_crop_size` px), each resized the same; every view gives `tokens_per_tile` tokens and is a
    block of its own in the prompt (runtime/views.py)."""

    kind: Literal["gemma3"]
    image_size: list[int]  # [height, width] of a view, what the vision graph takes
    tokens_per_tile: int  # tokens per view (the vision graph's batch holds an image's views)
    pan_and_scan: bool
    min_crop_size: int
    max_crops: int
    min_ratio: float

    def check(self) -> None:
        _check_size("vision.image_size", self.image_size)
        _in_range("vision.tokens_per_tile", self.tokens_per_tile, 1, 2**16)
        _in_range("vision.max_crops", self.max_crops, 2, 64)
        _in_range("vision.min_crop_size", self.min_crop_size, 1, 2**14)
        if not (math.isfinite(self.min_ratio) and self.min_ratio >= 1.0):
            raise BundleError(f"manifest.json: vision.min_ratio is {self.min_ratio!r}; it must be at least 1")


# Each preprocessing kind's spec type; runtime/vision_kinds.py implements the same kinds (a test checks).
VISION_SPECS: dict[str, type[VisionSpec]] = {"clip": ClipVisionSpec, "qwen2_vl": PatchVisionSpec,
                                             "qwen3_vl": PatchVisionSpec, "internvl": TileVisionSpec,
                                             "gemma3": ViewVisionSpec}
# A manifest's vision section: the spec type its `kind` names.
AnyVisionSpec = Annotated[ClipVisionSpec | PatchVisionSpec | TileVisionSpec | ViewVisionSpec,
                          Discriminator("kind")]


@dataclass(frozen=True)
class TextSpec:
    image_token: str
    image_token_id: int
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    chat_template: str
    max_context: int
    add_special_tokens: bool = True
    # What each image's placeholder becomes before tokenizing, holding it once: the text a family's
    # processor puts around an image block (InternVL: "<img><IMG_CONTEXT></img>"); None: itself.
    image_text: str | None = None
    # What the chat template writes for an image, where that is not `image_token` (Gemma 3 writes
    # "<start_of_image>" and its processor expands it to `image_text` around "<image_soft_token>").
    template_image: str | None = None
    # An image of several views (Gemma 3's pan&scan: the whole image, then its crops): its text, with
    # "{first}" where the first view's `image_text` goes and "{rest}" the others', joined by spaces.
    views_text: str | None = None


@dataclass(frozen=True)
class DecoderSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    kv_dtype: str
    positions: str  # family default: "contiguous" | "original"
    # M-RoPE (Qwen2-VL, Qwen2.5-VL): `position_ids` is [3, B, S], (temporal, height, width) (DESIGN §6).
    mrope: bool = False
    # "concat": past → past+new, portable; "shared": one in-place buffer per layer through
    # onnxruntime's GroupQueryAttention (export/shared_kv.py), onnxruntime only; "static": one
    # in-place buffer per layer through opset 24's TensorScatter + Attention (export/static_kv.py),
    # TensorRT's form (≥ 10.15) that onnxruntime also runs.
    kv_cache: str = "concat"
    # DeepStack (Qwen3-VL): `deepstack_embeds` [L, B, S, D] is added to the hidden states after each of
    # the first L decoder layers (zero rows outside the image); the vision graph gives one plane each.
    deepstack_layers: int = 0
    # Gemma 3: `image_block_ids` [B, total length] (0: text, i > 0: the i-th image block) opens
    # attention both ways inside each block during prefill; decode steps feed zeros.
    image_blocks: bool = False

    @property
    def past_names(self) -> list[str]:
        """`past_key_values.{i}.key|value`, the decoder's KV inputs (optimum / onnxruntime-genai names)."""
        return kv_names(self.num_layers, "past_key_values")

    @property
    def present_names(self) -> list[str]:
        """`present.{i}.key|value`, its KV outputs, in the same order."""
        return kv_names(self.num_layers, "present")


def kv_names(num_layers: int, prefix: str) -> list[str]:
    """`{prefix}.{i}.key|value` for every layer: the one place the KV-cache names are spelled."""
    return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class PrunerSpec:
    """One method's per-request graph (`zspa.pruning.onnx_pruner`: K is its `budget` input, so any
    keep runs) and a keep the commands default to."""

    method: str
    keep: float
    params: dict[str, Any]
    graph: str


@dataclass(frozen=True)
class SourceSpec:
    model_id: str
    revision: str | None
    random_weights: bool  # True for built-in test models: their answers are gibberish


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    zspa_version: str
    family: str
    opset: int
    dtype: str
    source: SourceSpec
    graphs: dict[str, GraphSpec]
    vision: AnyVisionSpec
    text: TextSpec
    decoder: DecoderSpec
    pruners: list[PrunerSpec]
    files: dict[str, str] = field(default_factory=dict)  # tokenizer and other assets → sha256
    parity: dict[str, float] = field(default_factory=dict)
    # zspa-calibrate: the calibration set (digest, size, keep) and the measured fidelity to the source bundle.
    calibration: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        if not isinstance(data, dict):
            raise BundleError("manifest.json: expected a JSON object")
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise BundleError("manifest.json: missing or non-integer schema_version")
        if version > SCHEMA_VERSION:
            raise BundleError(
                f"manifest.json: bundle schema_version {version} is newer than this zspa supports "
                f"({SCHEMA_VERSION}); upgrade zspa or re-export the bundle"
            )
        if version < SCHEMA_VERSION:
            raise BundleError(f"manifest.json: schema_version {version} is no longer supported; re-export the bundle")
        _refuse_static_pruners(data.get("pruners"))
        _check_vision_kind(data.get("vision"))
        try:  # from JSON text: strict mode reads objects into dataclasses only there
            manifest = _reader().validate_json(json.dumps(data), strict=True)
        except ValidationError as exc:
            raise BundleError(f"manifest.json: {_describe(exc)}") from None
        check_values(manifest)
        return manifest

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BundleError(f"{path}: no manifest.json; is this a zspa bundle directory?") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(f"{path}: not valid JSON ({exc})") from None
        except (ValueError, RecursionError) as exc:  # a 5,000-digit integer, nesting past the recursion limit
            raise BundleError(f"{path}: a value cannot be read ({exc})") from None
        return cls.from_dict(data)


def _refuse_static_pruners(pruners: Any) -> None:
    """zspa 0.1 exported one graph per keep with K fixed (`k` an integer), which a per-request
    runtime cannot feed; such a bundle is refused whole rather than half run."""
    for i, pruner in enumerate(pruners if isinstance(pruners, list) else []):
        if isinstance(pruner, dict) and pruner.get("k") is not None:
            raise BundleError(f"manifest.json: pruners[{i}] has a fixed K ({pruner['k']!r}), the format of zspa 0.1; "
                              "re-export it with this version (its pruners run any keep)")


@functools.cache
def _reader() -> TypeAdapter[Manifest]:
    return TypeAdapter(Manifest)


def _check_vision_kind(vision: Any) -> None:
    """A kind this version prepares, said as such (pydantic would only list the tags it expected)."""
    if not isinstance(vision, dict):
        return  # pydantic names what is missing or mistyped
    kind = vision.get("kind")
    if not isinstance(kind, str) or kind not in VISION_SPECS:  # a list or an object is no kind (and unhashable)
        raise BundleError(f"manifest.json: vision.kind is {kind!r}, not one of {list(VISION_SPECS)}; "
                          "re-export the bundle, or upgrade zspa if a newer one wrote it")


_SCALARS = {"int", "str", "float", "bool"}  # how pydantic labels a scalar union's members (no field is named so)
_EXPECTED = {"int_type": "int", "float_type": "float", "string_type": "str", "bool_type": "bool",
             "list_type": "a list", "dict_type": "an object", "dataclass_type": "an object"}


def _describe(exc: ValidationError) -> str:
    """pydantic's first error as the field's dotted path and what is wrong with it."""
    errors = exc.errors()
    loc = list(errors[0]["loc"])
    if loc[:1] == ["vision"] and len(loc) > 1 and loc[1] in VISION_SPECS:
        del loc[1]  # the discriminated union's tag
    if all(e["loc"][-1] in _SCALARS and e["loc"][:-1] == errors[0]["loc"][:-1] for e in errors):
        members = " or ".join(e["loc"][-1] for e in errors)  # no member of a union took it
        return f"{_dotted(loc[:-1])} should be {members}, got {type(errors[0]['input']).__name__}"
    where, error = _dotted(loc), errors[0]
    if error["type"] == "missing":
        return f"missing field {where}"
    if error["type"] in _EXPECTED:
        return f"{where} should be {_EXPECTED[error['type']]}, got {type(error['input']).__name__}"
    return f"{where}: {error['msg']}"


def _dotted(loc: list[str | int]) -> str:
    return "manifest" + "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)


# Ranges for the manifest's values: a tampered or hand-edited manifest fails here naming the field,
# not later as an "unexpected error" deep in preprocessing or a session.
_KNOWN = {"decoder.kv_cache": ("concat", "shared", "static"),
          "decoder.positions": ("contiguous", "original"), "decoder.kv_dtype": ("float32", "float16", "bfloat16"),
          "vision.resample": tuple(range(6))}  # PIL's filters: NEAREST, LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING
_MAX_TOKENS_ID = 2**24  # vocabularies are ~10^5; a context or vocabulary past this is a corrupt value


def check_values(manifest: Manifest) -> None:
    """Refuses values out of range, naming the field (BundleError, the CLIs' exit 3)."""
    vision, text, decoder = manifest.vision, manifest.text, manifest.decoder
    for where, value in (("decoder.kv_cache", decoder.kv_cache),
                         ("decoder.positions", decoder.positions), ("decoder.kv_dtype", decoder.kv_dtype),
                         ("vision.resample", vision.resample)):
        if value not in _KNOWN[where]:
            raise BundleError(f"manifest.json: {where} is {value!r}, not one of {list(_KNOWN[where])}; "
                              "re-export the bundle, or upgrade zspa if a newer one wrote it")
    _in_range("text.max_context", text.max_context, 2, _MAX_TOKENS_ID)
    _in_range("decoder.vocab_size", decoder.vocab_size, 1, _MAX_TOKENS_ID)
    for where, value in (("decoder.num_layers", decoder.num_layers), ("decoder.num_kv_heads", decoder.num_kv_heads),
                         ("decoder.head_dim", decoder.head_dim), ("vision.hidden_size", vision.hidden_size)):
        _in_range(where, value, 1, 2**16)
    _in_range("decoder.deepstack_layers", decoder.deepstack_layers, 0, decoder.num_layers)
    vision.check()
    _in_range("vision.num_tokens", vision.num_tokens, 1, _MAX_TOKENS_ID)
    if not text.eos_token_ids:
        raise BundleError("manifest.json: text.eos_token_ids is empty; a generation could never end")
    for i, token in enumerate(text.eos_token_ids):
        _in_range(f"text.eos_token_ids[{i}]", token, 0, decoder.vocab_size - 1)
    _in_range("text.image_token_id", text.image_token_id, 0, decoder.vocab_size - 1)
    if text.image_text is not None and text.image_text.count(text.image_token) != 1:
        raise BundleError(f"manifest.json: text.image_text {text.image_text!r} must hold the image token "
                          f"{text.image_token!r} exactly once")
    if text.template_image is not None and (not text.template_image or text.image_text is None):
        raise BundleError("manifest.json: text.template_image needs text.image_text (what it becomes) and may not "
                          "be empty")
    if text.views_text is not None and (text.views_text.count("{first}") != 1 or text.views_text.count("{rest}") != 1
                                        or text.image_token in text.views_text):
        raise BundleError(f"manifest.json: text.views_text {text.views_text!r} must hold {{first}} and {{rest}} "
                          "once each and no image token")
    if len(vision.mean) != 3 or len(vision.std) != 3:
        raise BundleError("manifest.json: vision.mean and vision.std need one value per RGB channel")
    for i, value in enumerate(vision.std):
        if not math.isfinite(value) or value <= 0:
            raise BundleError(f"manifest.json: vision.std[{i}] is {value!r}; it must be a positive number")
    for where, value in (("vision.rescale_factor", vision.rescale_factor), *(
            (f"vision.mean[{i}]", m) for i, m in enumerate(vision.mean))):
        if not math.isfinite(value) or (where == "vision.rescale_factor" and value <= 0):
            raise BundleError(f"manifest.json: {where} is {value!r}; it must be a finite number")
    for i, pruner in enumerate(manifest.pruners):
        if not 0 < pruner.keep <= 1 or pruner.graph not in manifest.graphs:
            raise BundleError(f"manifest.json: pruners[{i}] (keep {pruner.keep!r}, graph "
                              f"{pruner.graph!r}) is not a pruner this bundle can run")
    names = [*(g.file for g in manifest.graphs.values()), *manifest.files,
             *(name for g in manifest.graphs.values() for name in g.data_files)]
    for name in names:
        if any(ord(ch) < 32 for ch in name):
            raise BundleError(f"manifest.json: the file name {name!r} holds a control character")


def _check_size(where: str, size: list[int]) -> None:
    """A [height, width] pair of sides in [1, 2^14]."""
    if len(size) != 2 or not all(1 <= side <= 2**14 for side in size):
        raise BundleError(f"manifest.json: {where} is {size!r}; expected [height, width]")


def _in_range(where: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise BundleError(f"manifest.json: {where} is {value}, outside [{low}, {high:,}]")
