"""The generation pipeline: image + prompt → vision → embed → prune → splice → prefill → decode.

Everything model-specific comes from the manifest; this loop has no per-family branches.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from zspa.errors import InvalidInputError
from zspa.pruning.budget import token_budget, validate_keep
from zspa.runtime.backends import Backend, make_backend
from zspa.runtime.bundle import Bundle
from zspa.runtime.detokenize import IncrementalDetokenizer
from zspa.runtime.images import DEFAULT_MAX_PIXELS, ImageSource, load_image, prepare_vision
from zspa.runtime.positions import SCHEMES, position_extent, prefill_positions
from zspa.runtime.prompting import Prompt, PromptBuilder
from zspa.runtime.sampling import SamplingParams, next_token
from zspa.runtime.stops import first_stop, held_back
from zspa.runtime.vision_cache import VisionCache
from zspa.signing import TrustPolicy

STAGES = ("preprocess", "vision", "embed", "prune", "prefill", "decode")


@dataclass
class GenerationStats:
    visual_tokens_total: int
    visual_tokens_kept: int
    prompt_tokens: int  # what the decoder prefilled: text plus kept visual tokens
    tokens_generated: int = 0
    timings_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    time_to_first_token_ms: float = 0.0
    vision_cache_hit: bool | None = None  # None: no vision cache

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first (which prefill produces) over the decode loop's time."""
        steps = self.tokens_generated - 1
        seconds = self.timings_ms["decode"] / 1000.0
        return steps / seconds if steps > 0 and seconds > 0 else 0.0


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    kept_indices: np.ndarray  # int64 [K], ascending: which visual tokens the decoder saw
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    stats: GenerationStats
    first_token_logits: np.ndarray  # float32 [V]: what prefill predicted, for agreement metrics


class GenerationStream:
    """Iterates over text deltas as they are decoded; `result` is set once iteration ends."""

    def __init__(self, steps: Generator[str, None, GenerationResult]):
        self._steps = steps
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        self.result = yield from self._steps


class _Timer:
    def __init__(self, timings: dict[str, float], stage: str):
        self.timings, self.stage = timings, stage

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.timings[self.stage] += (time.perf_counter() - self.start) * 1000.0


class Pipeline:
    def __init__(self, bundle: Bundle, backend: Backend, *, positions: str | None = None,
                 max_image_pixels: int = DEFAULT_MAX_PIXELS, max_context: int | None = None,
                 vision_cache_bytes: int = 0):
        """`max_context` caps the positions a request may use (prompt, image tokens, answer) below
        the model's context; it also sizes the KV buffers that shared-KV and TensorRT decoders
        allocate up front, so it is the memory knob on small devices. `vision_cache_bytes` > 0
        keeps that many bytes of vision outputs for images seen again."""
        manifest = bundle.manifest
        self.bundle = bundle
        limit = manifest.text.max_context
        self.max_context = limit if max_context is None else max_context
        if not (isinstance(self.max_context, int) and 1 < self.max_context <= limit):
            raise InvalidInputError(f"max_context must be an integer in (1, {limit}] (the model's context), "
                                    f"got {max_context!r}")
        self.positions = positions or manifest.decoder.positions
        if self.positions not in SCHEMES:
            raise InvalidInputError(f"positions must be one of {SCHEMES}, got {self.positions!r}")
        self.max_image_pixels = max_image_pixels
        self.vision_cache = VisionCache(vision_cache_bytes) if vision_cache_bytes > 0 else None
        self.providers = backend.providers
        self.vision = backend.graph(bundle.graph_file("vision"))
        self.embed = backend.graph(bundle.graph_file("embed"))
        self.pruners = {p.graph: backend.graph(bundle.graph_file(p.graph)) for p in manifest.pruners}
        self.decoder = backend.decoder(bundle.graph_file("decoder"), manifest.decoder, self.max_context)
        self.prompts = PromptBuilder.from_file(bundle.member("tokenizer.json"), manifest.text)

    @classmethod
    def load(cls, path: str | Path, *, backend: str = "ort-cpu", threads: int | None = None,
             positions: str | None = None, max_image_pixels: int = DEFAULT_MAX_PIXELS,
             max_context: int | None = None, trust: TrustPolicy | None = None,
             vision_cache_bytes: int = 0) -> Pipeline:
        """Opens a bundle (schema and sha256 checked; its signature too with `trust`) and
        creates a session per graph on `backend` (one of `BACKENDS`: onnxruntime on CPU, CUDA or
        TensorRT, or zspa-build's TensorRT engines)."""
        bundle = Bundle.open(path, trust=trust)
        return cls(bundle, make_backend(backend, bundle, threads), positions=positions,
                   max_image_pixels=max_image_pixels, max_context=max_context, vision_cache_bytes=vision_cache_bytes)

    def generate(
        self,
        image: ImageSource,
        prompt: str | Prompt,
        *,
        keep: float | None = None,
        method: str | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: list[str] | None = None,
        ignore_eos: bool = False,
        stream: bool = False,
    ) -> GenerationResult | GenerationStream:
        """Answers `prompt` (a question, or a conversation built by `self.prompts.build_chat`) about
        `image`. keep/method None use the bundle's defaults (its first method, smallest keep); keep
        1.0 disables pruning. With stream=True returns a
        `GenerationStream` of text deltas. ignore_eos generates exactly max_new_tokens (profiling)."""
        keep = self.bundle.keeps(method)[0] if keep is None else validate_keep(keep)
        pruner = self.bundle.pruner_for(keep, method)
        params = SamplingParams(temperature, top_p, top_k, seed)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be an integer ≥ 1, got {max_new_tokens!r}")
        built = prompt if isinstance(prompt, Prompt) else self.prompts.build(prompt)
        # Decode the image now, so that a bad one fails the call rather than the stream's first step.
        started = time.perf_counter()
        vision_input = prepare_vision(load_image(image, max_pixels=self.max_image_pixels), self.bundle.manifest.vision)
        num_tokens = vision_input.num_tokens
        kept_count = num_tokens
        if pruner is not None:
            kept_count = min(num_tokens, pruner.k if pruner.k is not None else token_budget(keep, num_tokens))
            pruner = pruner if kept_count < num_tokens else None
        text_before = built.image_position
        text_after = len(built.input_ids) - built.image_position - 1
        mrope = self.bundle.manifest.decoder.mrope
        extent = position_extent(text_before, kept_count, vision_input.grid, text_after, self.positions, mrope)
        needed = max(extent, text_before + kept_count + text_after)  # positions, and the KV cache's length
        max_context = self.max_context
        if needed >= max_context:
            raise InvalidInputError(
                f"prompt needs {needed} positions with the image, over the context of {max_context}; shorten it"
            )
        eos = set() if ignore_eos else set(self.bundle.manifest.text.eos_token_ids)
        steps = self._generate(vision_input, built, pruner, kept_count, params, max_new_tokens, list(stop or []),
                               eos, max_context, started)
        stream_ = GenerationStream(steps)
        if stream:
            return stream_
        for _ in stream_:
            pass
        return stream_.result

    def _generate(self, vision_input, built, pruner, kept_count, params, max_new_tokens, stop, eos, max_context,
                  started):
        mrope = self.bundle.manifest.decoder.mrope
        num_tokens = vision_input.num_tokens
        stats = GenerationStats(num_tokens, kept_count, 0)
        timings = stats.timings_ms
        features, cache_key = None, None
        if self.vision_cache is not None:  # the digest counts as preprocessing; a hit skips the vision stage
            cache_key = self.vision_cache.key(vision_input.feeds)
            features = self.vision_cache.get(cache_key)
            stats.vision_cache_hit = features is not None
        timings["preprocess"] = (time.perf_counter() - started) * 1000.0
        if features is None:
            with _Timer(timings, "vision"):
                features = self.vision.run(vision_input.feeds)[0]
            if cache_key is not None:
                self.vision_cache.put(cache_key, features)
        with _Timer(timings, "embed"):
            prompt_embeds = self.embed.run({"input_ids": built.input_ids[None]})[0]
        with _Timer(timings, "prune"):
            if pruner is None:
                kept, kept_indices = features, np.arange(num_tokens, dtype=np.int64)
            else:
                feeds = {"image_features": features, "prompt_embeds": prompt_embeds,
                         "prompt_mask": built.question_mask[None]}
                if pruner.k is None:
                    feeds["budget"] = np.array([kept_count], dtype=np.int64)
                kept, kept_indices = self.pruners[pruner.graph].run(feeds)
                kept_indices = kept_indices[0]
        with _Timer(timings, "prefill"):
            at = built.image_position
            sequence = np.concatenate([prompt_embeds[:, :at], kept.astype(prompt_embeds.dtype),
                                       prompt_embeds[:, at + 1 :]], axis=1)
            positions = prefill_positions(at, kept_indices, vision_input.grid, len(built.input_ids) - at - 1,
                                          self.positions, mrope)
            stats.prompt_tokens = sequence.shape[1]
            self.decoder.reset()
            logits = self.decoder.step(sequence, np.ones((1, sequence.shape[1]), np.int64), positions[..., None, :])

        first_token_logits = logits[0].copy()
        rng = np.random.default_rng(params.seed)
        detokenizer = IncrementalDetokenizer(self.prompts.decode)
        tokens = detokenizer.tokens
        text, emitted, finish = "", 0, "length"
        next_position = int(positions.max()) + 1
        position_shape = (3, 1, 1) if mrope else (1, 1)
        decode_start = time.perf_counter()
        while True:
            token = next_token(logits[0], params, rng)
            if not tokens:
                stats.time_to_first_token_ms = (time.perf_counter() - started) * 1000.0
                decode_start = time.perf_counter()
            if token in eos:
                finish = "stop"
                break
            before = len(text)
            text = detokenizer.add(token)
            cut = first_stop(text, stop, len(text) - before)
            if cut is not None:
                finish = "stop"
                break
            safe = len(text) - held_back(text, stop)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if len(tokens) >= max_new_tokens or max(next_position, self.decoder.past_length) >= max_context:
                break
            embeds = self.embed.run({"input_ids": np.array([[token]], dtype=np.int64)})[0]
            mask = np.ones((1, self.decoder.past_length + 1), np.int64)
            logits = self.decoder.step(embeds, mask, np.full(position_shape, next_position, dtype=np.int64))
            next_position += 1
        timings["decode"] = (time.perf_counter() - decode_start) * 1000.0
        text = detokenizer.flush()
        cut = first_stop(text, stop, len(text))
        if cut is not None:
            text, finish = text[:cut], "stop"
        if len(text) > emitted:
            yield text[emitted:]
        stats.tokens_generated = len(tokens)
        return GenerationResult(text, tokens, kept_indices, finish, stats, first_token_logits)
