"""ZSPAPrune: zero-shot prompt-aware token pruning (Zhang, Li, Xian, Tang, arXiv 2510.17197).

DESIGN §5: a core of the tokens most relevant to the question (cosine similarity to the pooled
question embedding), then diversity tokens chosen greedily by max–min cosine distance (farthest
point, as DivPrune), seeded with the core. Written as a fixed, unrolled loop of K argmax steps
with one-hot masks instead of scatters, so the dynamo exporter yields a small static graph that
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
        core, chosen = greedy_top(relevance, n_core)
        return farthest_point_fill(tokens, core, chosen, k)


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


def greedy_top(scores: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`count` indices of `scores` [B,N], ties to the lower index, and the one-hot mask of them.

    An unrolled argmax loop rather than TopK: argmax picks the first maximum in torch and ONNX
    alike, while torch.topk leaves the order of ties unspecified.
    """
    positions = torch.arange(scores.shape[1], device=scores.device).view(1, -1)
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    picks = []
    for _ in range(count):
        pick = scores.masked_fill(chosen, float("-inf")).argmax(-1, keepdim=True)
        chosen = chosen | (positions == pick)
        picks.append(pick)
    return torch.cat(picks, dim=1), chosen


def farthest_point_fill(tokens: torch.Tensor, seeds: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """Extends `seeds` [B,S] (one-hot `chosen` [B,N]) to K indices, each step taking the token
    farthest, in minimum cosine distance, from all chosen so far. `tokens`: L2-normalised [B,N,D]."""
    n, hidden = tokens.shape[1], tokens.shape[2]
    positions = torch.arange(n, device=tokens.device).view(1, n)
    seed_vectors = torch.gather(tokens, 1, seeds.unsqueeze(-1).expand(-1, -1, hidden))
    min_distance = 1.0 - torch.matmul(seed_vectors, tokens.transpose(1, 2)).amax(1)
    picks = [seeds]
    for _ in range(k - seeds.shape[1]):
        pick = min_distance.masked_fill(chosen, float("-inf")).argmax(-1, keepdim=True)
        chosen = chosen | (positions == pick)
        vector = torch.gather(tokens, 1, pick.unsqueeze(-1).expand(-1, -1, hidden))
        distance = 1.0 - torch.matmul(vector, tokens.transpose(1, 2)).squeeze(1)
        min_distance = torch.minimum(min_distance, distance)
        picks.append(pick)
    return torch.cat(picks, dim=1)
