"""Log-probabilities of the tokens an answer is made of, and of the most likely alternatives, as
OpenAI's chat `logprobs` / `top_logprobs` report them.

They are the model's own distribution (log-softmax of the raw logits, before temperature, top-k
or top-p), as vLLM reports by default, so a sampled answer's figures are comparable with a greedy
one's. Computed in float64: a float32 log-softmax over 150k logits loses the small ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the `top_logprobs` most likely tokens and theirs, most likely first


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 [V] log-probabilities of a row of logits."""
    scores = logits.astype(np.float64)
    shifted = scores - scores.max()
    return shifted - np.log(np.exp(shifted).sum())


def token_logprob(logits: np.ndarray, token_id: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability and the `top` most likely tokens' (ties to the lower id)."""
    logprobs = log_softmax(logits)
    best: list[tuple[int, float]] = []
    if top > 0:
        candidates = np.argpartition(-logprobs, min(top, logprobs.size) - 1)[:top]
        order = sorted(candidates.tolist(), key=lambda i: (-logprobs[i], i))
        best = [(int(i), float(logprobs[i])) for i in order]
    return TokenLogprob(int(token_id), float(logprobs[token_id]), best)
