"""One request's answer as it is decoded: sampling, stop strings, incremental text, limits and
stats. Whatever runs the decoder (alone, or many rows in one batch) hands each sequence its row
of logits per step, so a request behaves the same either way."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from zspa.runtime.detokenize import Detokenizer
from zspa.runtime.logprobs import TokenLogprob, token_logprob
from zspa.runtime.sampling import SamplingParams, next_token
from zspa.runtime.stops import first_stop, held_back

STAGES = ("preprocess", "vision", "embed", "prune", "prefill", "decode")


@dataclass
class GenerationStats:
    visual_tokens_total: int
    visual_tokens_kept: int
    prompt_tokens: int  # what the decoder prefilled: text plus kept visual tokens
    tokens_generated: int = 0
    timings_ms: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    time_to_first_token_ms: float = 0.0
    vision_cache_hits: list[bool] | None = None  # per image, in prompt order; None: no vision cache

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
    # int64 [K], ascending: which visual tokens the decoder saw, numbered across the request's images
    # in prompt order (image 2's first token is N_1)
    kept_indices: np.ndarray
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    stats: GenerationStats
    first_token_logits: np.ndarray  # float32 [V]: what prefill predicted, for agreement metrics
    logprobs: list[TokenLogprob] | None = None  # one per answer token, when asked for


@dataclass
class Limits:
    """What ends a sequence besides EOS: its token budget, stop strings, and the context."""

    max_new_tokens: int
    stop: list[str]
    eos: set[int]
    max_context: int


class Sequence:
    def __init__(self, stats: GenerationStats, kept_indices: np.ndarray, params: SamplingParams, limits: Limits,
                 detokenizer: Detokenizer, next_position: int, started: float,
                 logprobs: int | None = None):
        """`logprobs`: None, or how many alternatives each answer token's log-probability comes with."""
        self.stats, self.kept_indices, self.params, self.limits = stats, kept_indices, params, limits
        self.top_logprobs = logprobs
        self.logprobs: list[TokenLogprob] = []
        self._logprobs_sent = 0
        self.rng = np.random.default_rng(params.seed)
        self.detokenizer = detokenizer
        self.position = next_position  # where the next token fed to the decoder sits
        self.length = stats.prompt_tokens  # this sequence's entries in the KV cache
        self.started = started
        self.text, self.emitted, self.finish_reason = "", 0, "length"
        self.token: int | None = None  # the token to feed next; None once done
        self.first_token_logits: np.ndarray | None = None
        self._decode_start = started
        self.result: GenerationResult | None = None

    @property
    def done(self) -> bool:
        return self.token is None and self.first_token_logits is not None

    def accept(self, logits: np.ndarray) -> str:
        """Samples the next token from this sequence's row of logits [V]; returns the text that
        is now safe to show ("" when a stop string might still be forming, or none came)."""
        limits, tokens = self.limits, self.detokenizer.tokens
        if self.first_token_logits is None:
            self.first_token_logits = logits.copy()
        self.token = None
        token = next_token(logits, self.params, self.rng)
        if not tokens:
            now = time.perf_counter()
            self.stats.time_to_first_token_ms = (now - self.started) * 1000.0
            self._decode_start = now
        if token in limits.eos:
            self.finish_reason = "stop"
            return ""
        if self.top_logprobs is not None:
            self.logprobs.append(token_logprob(logits, token, self.top_logprobs))
        before = len(self.text)
        self.text = self.detokenizer.add(token)
        if first_stop(self.text, limits.stop, len(self.text) - before) is not None:
            self.finish_reason = "stop"
            return ""
        delta = ""
        safe = len(self.text) - held_back(self.text, limits.stop)
        if safe > self.emitted:
            delta, self.emitted = self.text[self.emitted:safe], safe
        if len(tokens) < limits.max_new_tokens and max(self.position, self.length) < limits.max_context:
            self.token = token
        return delta

    def take_logprobs(self) -> list[TokenLogprob]:
        """The answer tokens' log-probabilities not taken yet (streamed with the text they make)."""
        taken, self._logprobs_sent = self.logprobs[self._logprobs_sent:], len(self.logprobs)
        return taken

    def advance(self) -> None:
        """The decoder has taken `token` at `position`."""
        self.position += 1
        self.length += 1

    def finish(self) -> str:
        """Ends the sequence (done, or given up): sets `result`, returns the text not yet shown."""
        self.token = None
        self.stats.timings_ms["decode"] = (time.perf_counter() - self._decode_start) * 1000.0
        text = self.detokenizer.flush()
        cut = first_stop(text, self.limits.stop, len(text))
        if cut is not None:
            text, self.finish_reason = text[:cut], "stop"
        self.stats.tokens_generated = len(self.detokenizer.tokens)
        self.result = GenerationResult(text, self.detokenizer.tokens, self.kept_indices, self.finish_reason,
                                       self.stats, self.first_token_logits,
                                       self.logprobs if self.top_logprobs is not None else None)
        return text[self.emitted:] if len(text) > self.emitted else ""
