"""ZSPAPrune: zero-shot prompt-aware token pruning (Zhang, Li, Xian, Tang, arXiv 2510.17197).

DESIGN §5: a core of the tokens most relevant to the question (cosine similarity to the pooled
question embedding), then diversity tokens chosen greedily by max–min cosine distance (farthest
point, as DivPrune), seeded with the core. Written as a fixed, unrolled loop of K argmax steps
that strike out each pick with a scatter, so the dynamo exporter yields a small static graph that
onnxruntime and TensorRT both run; ties go to the lower index (first argmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zspa.pruning.budget import core_size

POOLINGS = ("mean", "max")


@dataclass(frozen=True)
class ZSPASelector:
    relevance_ratio: float
    pooling: str

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        core_size(1, self.relevance_ratio)  # validates the ratio

    def __call__(
        self, image_features: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor, k: int
    ) -> torch.Tensor:
        tokens = F.normalize(image_features.float(), dim=-1)
        relevance = question_relevance(tokens, prompt_embeds.float(), prompt_mask, self.pooling)
        n_core = core_size(k, self.relevance_ratio)
        return farthest_point_fill(tokens, greedy_top(relevance, n_core), k)


def question_relevance(tokens: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor,
                       pooling: str) -> torch.Tensor:
    """r_i = cos(v_i, mean question embedding), or the max over question tokens of cos(v_i, e_t).

    `tokens` are L2-normalised visual tokens [B,N,D]; `prompt_mask` marks the question [B,T].
    """
    mask = prompt_mask.to(prompt_embeds.dtype).unsqueeze(-1)
    if pooling == "mean":
        pooled = (prompt_embeds * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return torch.matmul(tokens, F.normalize(pooled, dim=-1).unsqueeze(-1)).squeeze(-1)
    cosines = torch.matmul(tokens, F.normalize(prompt_embeds, dim=-1).transpose(1, 2))
    return cosines.masked_fill(mask.transpose(1, 2) == 0, float("-inf")).amax(-1)


def greedy_top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Top-`count` indices of `scores` [B,N], ties to the lower index.

    An unrolled argmax loop rather than TopK: argmax picks the first maximum in torch and ONNX
    alike, while torch.topk leaves the order of ties unspecified. Each pick is struck out with
    one scatter (two nodes a step), not a one-hot mask.
    """
    struck = torch.full_like(scores[:, :1], float("-inf"))
    picks = []
    for _ in range(count):
        pick = scores.argmax(-1, keepdim=True)
        scores = scores.scatter(1, pick, struck)
        picks.append(pick)
    return torch.cat(picks, dim=1)


def farthest_point_fill(tokens: torch.Tensor, seeds: torch.Tensor, k: int) -> torch.Tensor:
    """Extends `seeds` [B,S] to K indices, each step taking the token farthest, in minimum cosine
    distance, from all chosen so far. `tokens`: L2-normalised [B,N,D].

    Largest minimum distance 1 − cos is smallest maximum similarity, so the loop tracks each
    token's closeness (its highest cosine to the chosen set) and takes the argmin; chosen tokens
    are struck out with +inf by scatter, and each step's vector is one Gather from the flattened
    tokens: seven graph nodes a step, since at K≈N/10 the graph is launch-bound.
    """
    batch, n, hidden = tokens.shape
    flat = tokens.reshape(-1, hidden)
    row_offsets = (torch.arange(batch, device=tokens.device) * n).view(batch, 1)
    tokens_t = tokens.transpose(1, 2)
    closeness = torch.matmul(F.embedding(seeds + row_offsets, flat), tokens_t).amax(1)
    closeness = closeness.scatter(1, seeds, torch.full_like(seeds, 0, dtype=tokens.dtype) + torch.inf)
    struck = torch.full_like(closeness[:, :1], float("inf"))
    picks = [seeds]
    for _ in range(k - seeds.shape[1]):
        pick = closeness.argmin(-1, keepdim=True)
        similarity = torch.matmul(F.embedding(pick + row_offsets, flat), tokens_t).squeeze(1)
        closeness = torch.maximum(closeness, similarity).scatter(1, pick, struck)
        picks.append(pick)
    return torch.cat(picks, dim=1)
