"""The generation pipeline: images + prompt → vision → embed → prune → splice → prefill → decode.

Each image is its own block: its vision outputs, its pruning (keep applies per image) and its
place in the prompt, at its placeholder.

Everything model-specific comes from the manifest; this loop has no per-family branches.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zspa.errors import InvalidInputError
from zspa.manifest import PrunerSpec
from zspa.pruning.budget import token_budget, validate_keep
from zspa.runtime.backends import Backend, make_backend
from zspa.runtime.batching import SlotDecodeBatch, SoloDecode
from zspa.runtime.bundle import Bundle
from zspa.runtime.decoder_inputs import chunk_ends, chunk_extras, image_block_ids, stack_extras
from zspa.runtime.deepstack import gather as deepstack_gather
from zspa.runtime.deepstack import splice as deepstack_splice
from zspa.runtime.images import DEFAULT_MAX_PIXELS, IMAGE_FORMATS, ImageSource, VisionInput, load_image
from zspa.runtime.logprobs import MAX_TOP_LOGPROBS, log_softmax
from zspa.runtime.positions import SCHEMES, position_extent, prefill_positions
from zspa.runtime.prompting import Prompt, PromptBuilder, check_question
from zspa.runtime.sampling import SamplingParams
from zspa.runtime.sequence import STAGES, GenerationResult, GenerationStats, Limits, Sequence
from zspa.runtime.vision_cache import VisionCache
from zspa.runtime.vision_kinds import vision_kind
from zspa.signing import TrustPolicy

__all__ = ["STAGES", "Encoded", "EncodedImage", "GenerationResult", "GenerationStats", "GenerationStream",
           "ImageBlock", "Pipeline", "PrefillChunks", "PreparedImage", "Request"]


@dataclass(frozen=True)
class PreparedImage:
    """One image decoded and preprocessed (`Pipeline.prepare_image`); the decoded image is gone."""

    vision_input: VisionInput
    vision_key: str | None  # the image's vision-cache key; None without a cache
    started: float  # when its preparation began (time.perf_counter())
    prepared_ms: float  # decoding and preprocessing it (and its vision-cache digest)


@dataclass(frozen=True)
class ImageBlock:
    """One image of a request: its preprocessed input and how many of its tokens the decoder sees."""

    image: PreparedImage
    kept_count: int
    pruner: PrunerSpec | None  # None: all of its tokens are kept

    @property
    def num_tokens(self) -> int:
        return self.image.vision_input.num_tokens

    def without_pixels(self) -> ImageBlock:
        """The block without its feeds and pixels (once encoded): its counts, grid and views stay."""
        vision_input = self.image.vision_input
        light = VisionInput({}, vision_input.grid, np.zeros((0, 0, 3), np.uint8), vision_input.views)
        return dataclasses.replace(self, image=dataclasses.replace(self.image, vision_input=light))

    @property
    def view_grids(self) -> list[tuple[int, int, int]]:
        """The token grid of each of its views (blocks in the prompt): the image's own for one view."""
        vision_input = self.image.vision_input
        if vision_input.views == 1:
            return [vision_input.grid]
        return [(1, 1, vision_input.num_tokens // vision_input.views)] * vision_input.views


@dataclass(frozen=True)
class EncodedImage:
    """One image after the vision graph and its pruner: what the decoder will see of it."""

    kept: np.ndarray  # [1, K, D] kept visual tokens, in the embeddings' dtype
    kept_indices: np.ndarray  # int64 [K], ascending, into the image's N tokens
    planes: np.ndarray | None  # [L, 1, K, D] DeepStack planes at the kept tokens; None without DeepStack


@dataclass(frozen=True)
class Encoded:
    """Everything before the decoder (`Pipeline.encode`): the prompt's embeddings, each image's
    kept tokens, and the counts and stage timings so far."""

    prompt_embeds: np.ndarray  # [1, S, D]
    images: tuple[EncodedImage, ...]
    stats: GenerationStats

    @property
    def nbytes(self) -> int:
        arrays = [self.prompt_embeds, *(a for image in self.images for a in (image.kept, image.planes)
                                        if a is not None)]
        return sum(array.nbytes for array in arrays)


@dataclass
class PrefillChunks:
    """A request's prefill, spliced once and fed in chunks (`Pipeline.prefill_chunk`): what lets
    the service run a long prompt between decode steps instead of stalling every running row for
    all of it (vLLM's chunked prefill)."""

    request: Request
    sequence: np.ndarray  # [1, S, H] the prompt's embeddings with each image's kept tokens spliced in
    positions: np.ndarray  # [1, S] or [3, 1, S]
    extras: dict[str, np.ndarray]  # the decoder's optional inputs for the whole prefill
    ends: np.ndarray  # where a chunk may end, ascending, the last S
    stats: GenerationStats
    kept_indices: np.ndarray
    fed: int = 0
    logits: np.ndarray | None = None  # of the last chunk fed

    @property
    def length(self) -> int:
        return self.sequence.shape[1]

    @property
    def done(self) -> bool:
        return self.fed == self.length

    def next_end(self, budget: int) -> int:
        """Where the next chunk ends: as far as fits in `budget` tokens, where a chunk may end
        (never inside an image block, whose tokens see each other), at least one such chunk."""
        after = self.ends[self.ends > self.fed]
        fits = after[after <= self.fed + max(budget, 1)]
        return int(fits[-1]) if len(fits) else int(after[0])

    def piece(self, end: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """The decoder's inputs for the tokens [fed, end): embeddings, positions, optional inputs."""
        return (self.sequence[:, self.fed:end], self.positions[..., self.fed:end],
                chunk_extras(self.extras, self.fed, end))


@dataclass(frozen=True)
class Request:
    """A checked request with its images decoded: what `Pipeline.prefill` needs."""

    images: tuple[ImageBlock, ...]  # in the order of the prompt's placeholders
    prompt: Prompt
    params: SamplingParams
    limits: Limits
    started: float  # when the request was made: its time to first token counts from here
    prepared_ms: float  # decoding and preprocessing its images (and their vision-cache digests)
    logprobs: int | None = None  # each answer token's log-probability with this many alternatives
    encoded: Encoded | None = None  # set by `Pipeline.encode`, which also drops the preprocessed pixels

    @property
    def image_bytes(self) -> int:
        """What it holds for its images until prefill: the preprocessed images, or once encoded
        the kept tokens (and the prompt's embeddings)."""
        held = sum(block.image.vision_input.nbytes for block in self.images)
        return held + (self.encoded.nbytes if self.encoded is not None else 0)


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
        self.kind = vision_kind(manifest.vision)  # how images are prepared and positioned (Bundle.open checked it)
        self.positions = positions or manifest.decoder.positions
        if self.positions not in SCHEMES:
            raise InvalidInputError(f"positions must be one of {SCHEMES}, got {self.positions!r}")
        self.max_image_pixels = max_image_pixels
        self.vision_cache = VisionCache(vision_cache_bytes) if vision_cache_bytes > 0 else None
        self.providers = backend.providers
        self.vision = backend.graph(bundle.graph_file("vision"))
        self.embed = backend.graph(bundle.graph_file("embed"))
        self.pruners = {p.graph: backend.graph(bundle.graph_file(p.graph)) for p in manifest.pruners}
        self.decoder = backend.decoder(bundle.graph_file("decoder"), manifest.decoder, self.max_context, self.embed)
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
        images: ImageSource | list[ImageSource],
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
        logprobs: int | None = None,
        stream: bool = False,
    ) -> GenerationResult | GenerationStream:
        """Answers `prompt` (a question, or a conversation built by `self.prompts.build_chat`) about
        `images` (one image, or a list of them in the order of the prompt's placeholders; a question
        gets them all before its text). keep/method None use the bundle's defaults (its first method,
        smallest keep); keep 1.0 disables pruning; keep applies to each image on its own. With
        stream=True returns a `GenerationStream` of text deltas. ignore_eos generates exactly
        max_new_tokens (profiling). logprobs N (0–20) puts each answer token's log-probability, and
        the N most likely tokens', in `result.logprobs`."""
        request = self.request(images, prompt, keep=keep, method=method, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                               ignore_eos=ignore_eos, logprobs=logprobs)
        stream_ = GenerationStream(self._generate(request))
        if stream:
            return stream_
        for _ in stream_:
            pass
        return stream_.result

    def prepare_image(self, source: ImageSource | PreparedImage, formats: tuple[str, ...] = IMAGE_FORMATS,
                      max_pixels: int | None = None) -> PreparedImage:
        """Decodes (refusing bad input, images over `max_pixels` (default: the pipeline's) and
        encoded formats outside `formats`) and preprocesses one image; the full-size decoded image
        is dropped on return. Thread-safe."""
        if isinstance(source, PreparedImage):
            return source
        started = time.perf_counter()
        decoded = load_image(source, max_pixels=max_pixels or self.max_image_pixels, formats=formats)
        vision_input = self.kind.prepare(decoded, self.bundle.manifest.vision)
        vision_key = None if self.vision_cache is None else self.vision_cache.key(vision_input.pixels)
        return PreparedImage(vision_input, vision_key, started, (time.perf_counter() - started) * 1000.0)

    def request(self, images: ImageSource | PreparedImage | list[ImageSource | PreparedImage],
                prompt: str | Prompt, *, keep: float | None = None, method: str | None = None,
                max_new_tokens: int = 128, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                seed: int | None = None, stop: list[str] | None = None, ignore_eos: bool = False,
                logprobs: int | None = None) -> Request:
        """Checks a request and decodes and preprocesses its images (so a bad one fails here, not
        mid-stream); the keywords are `generate`'s. Thread-safe: the service runs it in the
        request's thread, off the decoding worker."""
        keep = self.bundle.keeps(method)[0] if keep is None else validate_keep(keep)
        pruner = self.bundle.pruner_for(keep, method)
        params = SamplingParams(temperature, top_p, top_k, seed)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be an integer ≥ 1, got {max_new_tokens!r}")
        if logprobs is not None and not (isinstance(logprobs, int) and 0 <= logprobs <= MAX_TOP_LOGPROBS):
            raise InvalidInputError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] or None, got {logprobs!r}")
        sources = list(images) if isinstance(images, (list, tuple)) else [images]
        if isinstance(prompt, Prompt) and len(prompt.image_views) != len(sources):
            raise InvalidInputError(f"the prompt places {len(prompt.image_views)} images, "
                                    f"but {len(sources)} were given")
        if not isinstance(prompt, Prompt):
            check_question(prompt)  # before any image is decoded
        started = time.perf_counter()
        blocks = tuple(self._block(self.prepare_image(source), pruner, keep) for source in sources)
        views = tuple(block.image.vision_input.views for block in blocks)
        built = prompt if isinstance(prompt, Prompt) else self.prompts.build(prompt, self.max_context,
                                                                             images=len(sources), views=views)
        if built.image_views != views:
            raise InvalidInputError(f"the prompt shows its images as {built.image_views} blocks, but they have "
                                    f"{views} views; build it with views= from the prepared images")
        texts = built.text_runs
        kept = sum(block.kept_count for block in blocks)
        extent = position_extent(texts, kept, [grid for block in blocks for grid in block.view_grids],
                                 self.positions, self.kind.mrope)
        needed = max(extent, sum(texts) + kept)  # positions, and the KV cache's length
        if needed >= self.max_context:
            images_ = f"{len(blocks)} image{'s' if len(blocks) != 1 else ''} ({kept} visual tokens)"
            raise InvalidInputError(f"prompt needs {needed} positions with its {images_}, over the context "
                                    f"of {self.max_context}; shorten it or send fewer or smaller images")
        eos = set() if ignore_eos else set(self.bundle.manifest.text.eos_token_ids)
        limits = Limits(max_new_tokens, list(stop or []), eos, self.max_context)
        started = min([started, *(block.image.started for block in blocks)])
        return Request(blocks, built, params, limits, started, sum(block.image.prepared_ms for block in blocks),
                       logprobs)

    @staticmethod
    def _block(image: PreparedImage, pruner: PrunerSpec | None, keep: float) -> ImageBlock:
        """The image's share of the budget: K = max(1, round(keep · N))."""
        num_tokens = image.vision_input.num_tokens
        if pruner is None:
            return ImageBlock(image, num_tokens, None)
        kept_count = token_budget(keep, num_tokens)
        return ImageBlock(image, kept_count, pruner if kept_count < num_tokens else None)

    def encode(self, request: Request) -> Request:
        """Vision, embed and prune for a request: everything before the decoder. Thread-safe: the
        service runs it in the request's thread, so the decoding worker only splices and prefills;
        the returned request holds the kept tokens instead of the preprocessed images."""
        if request.encoded is not None:
            return request
        encoded = self._encode(request)
        return dataclasses.replace(request, images=tuple(block.without_pixels() for block in request.images),
                                   encoded=encoded)

    def _encode(self, request: Request) -> Encoded:
        stats = GenerationStats(sum(block.num_tokens for block in request.images),
                                sum(block.kept_count for block in request.images), 0)
        timings = stats.timings_ms
        timings["preprocess"] = request.prepared_ms
        if self.vision_cache is not None:
            stats.vision_cache_hits = []
        with _Timer(timings, "embed"):
            prompt_embeds = self.embed.run({"input_ids": request.prompt.input_ids[None]})[0]
        images = []
        for block in request.images:
            features = self._vision(block.image, stats)
            features, planes = features[:1], features[1:, None]
            with _Timer(timings, "prune"):
                kept, kept_indices = self._prune(block, features, prompt_embeds, request.prompt.question_mask)
            images.append(EncodedImage(kept.astype(prompt_embeds.dtype), kept_indices,
                                       deepstack_gather(planes, kept_indices) if len(planes) else None))
        return Encoded(prompt_embeds, tuple(images), stats)

    def prefill(self, request: Request) -> tuple[Sequence, np.ndarray]:
        """Splices each image's kept tokens into the prompt and prefills, on `self.decoder` (whose
        KV cache then holds this request alone), encoding it first unless `encode` did; returns its
        sequence and the first token's logits [V]."""
        chunks = self.start_prefill(request)
        self.prefill_chunk(chunks, chunks.length)
        return self.finish_prefill(chunks)

    def start_prefill(self, request: Request) -> PrefillChunks:
        """Splices the request (encoding it first unless `encode` did) and resets `self.decoder`
        for it; `prefill_chunk` then feeds it, a chunk at a time if the caller wants (the service
        interleaves chunks with decode steps), and `finish_prefill` makes its sequence."""
        built = request.prompt
        encoded = request.encoded or self._encode(request)
        stats = dataclasses.replace(encoded.stats, timings_ms=dict(encoded.stats.timings_ms),
                                    vision_cache_hits=None if encoded.stats.vision_cache_hits is None
                                    else list(encoded.stats.vision_cache_hits))
        timings, prompt_embeds = stats.timings_ms, encoded.prompt_embeds
        pieces, rows, kept_planes, image_kept, view_kept = [], [], [], [], []
        placeholders = iter(built.image_positions)
        previous, length = 0, 0
        with _Timer(timings, "prefill"):
            for block, image in zip(request.images, encoded.images):
                image_kept.append(image.kept_indices)
                # An image of several views is pruned as one pool; each view's kept tokens go to its own block.
                per_view = block.num_tokens // block.image.vision_input.views
                for view in range(block.image.vision_input.views):
                    at = next(placeholders)
                    in_view = (image.kept_indices >= view * per_view) & (image.kept_indices < (view + 1) * per_view)
                    pieces += [prompt_embeds[:, previous:at], image.kept[:, in_view]]
                    length += at - previous
                    rows.append(length + np.arange(int(in_view.sum())))
                    length += len(rows[-1])
                    if image.planes is not None:
                        kept_planes.append(image.planes[:, :, in_view])
                    view_kept.append(image.kept_indices[in_view] - view * per_view)
                    previous = at + 1
            pieces.append(prompt_embeds[:, previous:])
            sequence = np.concatenate(pieces, axis=1)
            block_ids = image_block_ids(rows, sequence.shape[1])
            extras = {"image_block_ids": block_ids}
            if kept_planes:
                extras["deepstack_embeds"] = deepstack_splice(np.concatenate(kept_planes, axis=2),
                                                              np.concatenate(rows), sequence.shape[1])
            positions = prefill_positions(built.text_runs, view_kept,
                                          [grid for block in request.images for grid in block.view_grids],
                                          self.positions, self.kind.mrope)
            self.decoder.reset()
        stats.prompt_tokens = sequence.shape[1]
        starts = np.cumsum([0, *(block.num_tokens for block in request.images)])
        kept_indices = np.concatenate([np.zeros(0, np.int64),
                                       *(start + kept for start, kept in zip(starts, image_kept))])
        bidirectional = block_ids[0] if self.bundle.manifest.decoder.image_blocks else np.zeros_like(block_ids[0])
        return PrefillChunks(request, sequence, positions[..., None, :], extras, chunk_ends(bidirectional), stats,
                             kept_indices)

    def prefill_chunk(self, chunks: PrefillChunks, budget: int) -> int:
        """Feeds the next chunk of `chunks` to `self.decoder`, as many tokens as fit in `budget`
        (`PrefillChunks.next_end`); returns how many tokens it fed."""
        start, end = chunks.fed, chunks.next_end(budget)
        embeds, positions, extras = chunks.piece(end)
        with _Timer(chunks.stats.timings_ms, "prefill"):
            chunks.logits = self.decoder.step(embeds, np.ones((1, end), np.int64), positions, extras)
        chunks.fed = end
        return end - start

    def prefill_first_chunks(self, group: list[PrefillChunks], length: int, batch: SlotDecodeBatch,
                             slots: list[int]) -> None:
        """Feeds the first `length` tokens of every prompt in `group` (none fed yet, each at least
        that long) in one decoder call, into `batch`'s consecutive `slots`: several prompts
        admitted together prefill together. Each one's prefill time counts the whole call."""
        pieces = [chunks.piece(length) for chunks in group]
        started = time.perf_counter()
        logits = batch.prefill_first_chunks(slots, np.concatenate([embeds for embeds, _, _ in pieces]),
                                            np.concatenate([positions for _, positions, _ in pieces], axis=-2),
                                            stack_extras([extras for _, _, extras in pieces]))
        took = (time.perf_counter() - started) * 1000.0
        for row, chunks in enumerate(group):
            chunks.logits, chunks.fed = logits[row:row + 1], length
            chunks.stats.timings_ms["prefill"] += took

    def finish_prefill(self, chunks: PrefillChunks) -> tuple[Sequence, np.ndarray]:
        """The request's sequence and its first token's logits [V], once every chunk is fed."""
        if not chunks.done:
            raise InvalidInputError(f"the prefill has fed {chunks.fed} of its {chunks.length} tokens")
        request = chunks.request
        answer = Sequence(chunks.stats, chunks.kept_indices, request.params, request.limits, self.prompts.detokenizer(),
                          int(chunks.positions.max()) + 1, request.started, request.logprobs)
        return answer, chunks.logits[0]

    def _vision(self, image: PreparedImage, stats: GenerationStats) -> np.ndarray:
        """The vision outputs [1 + L, N, D] of one image (image_features, then any DeepStack
        planes), from the vision cache when it holds them."""
        features = None
        if image.vision_key is not None:  # the digest counted as preprocessing; a hit skips the vision stage
            with _Timer(stats.timings_ms, "preprocess"):
                features = self.vision_cache.get(image.vision_key)
            stats.vision_cache_hits.append(features is not None)
        if features is None:
            with _Timer(stats.timings_ms, "vision"):
                outputs = self.vision.run(image.vision_input.feeds)
                features = outputs[0] if len(outputs) == 1 else np.concatenate(outputs)
            if image.vision_key is not None:
                self.vision_cache.put(image.vision_key, features)
        return features

    def _prune(self, block: ImageBlock, features: np.ndarray, prompt_embeds: np.ndarray,
               question_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One image's kept features [1, K, D] and indices [K], scored against the question."""
        if block.pruner is None:
            return features, np.arange(block.num_tokens, dtype=np.int64)
        feeds = {"image_features": features, "prompt_embeds": prompt_embeds, "prompt_mask": question_mask[None],
                 "budget": np.array([block.kept_count], dtype=np.int64)}
        kept, kept_indices = self.pruners[block.pruner.graph].run(feeds)
        return kept, kept_indices[0]

    def score(self, images: ImageSource | list[ImageSource], prompt: str | Prompt, continuation: list[int], *,
              keep: float | None = None, method: str | None = None) -> tuple[float, bool]:
        """The log-probability of the answer `continuation` (token ids, after the prompt's
        generation prompt) about `images`, and whether greedy decoding would produce it: what
        lmms-eval's `loglikelihood` tasks (multiple choice) ask. One prefill, then one decode step
        per continuation token but the last (the decoder returns the last position's logits)."""
        if not continuation:
            raise InvalidInputError("the continuation to score is empty")
        request = self.request(images, prompt, keep=keep, method=method, max_new_tokens=len(continuation))
        answer, logits = self.prefill(request)
        if answer.position + len(continuation) > self.max_context:
            raise InvalidInputError(f"the prompt and its {len(continuation)}-token continuation need "
                                    f"{answer.position + len(continuation)} positions, over the context of "
                                    f"{self.max_context}")
        solo, total, greedy = SoloDecode(self.decoder), 0.0, True
        solo.add(self.decoder)
        for i, token in enumerate(continuation):
            total += float(log_softmax(logits)[token])
            greedy = greedy and int(np.argmax(logits)) == token
            if i + 1 < len(continuation):
                logits = solo.step([token], self.position_ids([answer.position]))[0]
                answer.advance()
        return total, greedy

    def position_ids(self, positions: list[int]) -> np.ndarray:
        """Decoder position_ids for one new token per row: [B, 1], or [3, B, 1] under M-RoPE."""
        ids = np.array(positions, dtype=np.int64)[:, None]
        return np.broadcast_to(ids, (3, *ids.shape)).copy() if self.kind.mrope else ids

    def _generate(self, request: Request) -> Generator[str, None, GenerationResult]:
        answer, logits = self.prefill(request)
        solo = SoloDecode(self.decoder)
        solo.add(self.decoder)
        while True:
            delta = answer.accept(logits)
            if delta:
                yield delta
            if answer.done:
                break
            logits = solo.step([answer.token], self.position_ids([answer.position]))[0]
            answer.advance()
        tail = answer.finish()
        if tail:
            yield tail
        return answer.result
