"""Eager PyTorch pruners: the references the parity tests prune with before transformers' own
language model runs, beside the numpy oracles (`oracles.py`) the exported graphs are checked against.

The product's pruners are the ONNX graphs of `zspa.pruning.onnx_pruner`; these are written
independently of them (unrolled loops over K, torch ops) and agree index for index (tested).
Every selector takes `image_features [B,N,D], prompt_embeds [B,T,D], prompt_mask [B,T], k` and
returns K distinct indices; `PrunerGraph` sorts and gathers. Ties go to the lower index.

ZSPAPrune (DESIGN §5): a core of the tokens most relevant to the question, then diversity tokens
chosen greedily by max–min cosine distance (farthest point, as DivPrune), seeded with the core.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from zspa.pruning import DPP_EPSILON
from zspa.pruning.budget import core_size
from zspa.pruning.params import method_params
from zspa.pruning.random_order import random_indices


class TokenSelector(Protocol):
    """A pruning method: returns K indices per batch row, in any order, without duplicates."""

    def __call__(
        self, image_features: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor, k: int
    ) -> torch.Tensor: ...


class PrunerGraph(nn.Module):
    """`image_features, prompt_embeds, prompt_mask → kept_features, kept_indices` (DESIGN §4).

    Indices come out ascending, so kept tokens keep their original spatial order, as the pruner
    graphs give them.
    """

    def __init__(self, selector: TokenSelector, k: int):
        super().__init__()
        self.selector = selector
        self.k = k

    def forward(
        self, image_features: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        indices = self.selector(image_features, prompt_embeds, prompt_mask, self.k)
        kept_indices = torch.sort(indices, dim=-1).values
        hidden = image_features.shape[-1]
        kept = torch.gather(image_features, 1, kept_indices.unsqueeze(-1).expand(-1, -1, hidden))
        return kept, kept_indices


@dataclass(frozen=True)
class ZSPASelector:
    relevance_ratio: float
    pooling: str

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


def _constant_indices(indices: np.ndarray, batch_like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(indices.astype(np.int64)).unsqueeze(0).expand(batch_like.shape[0], -1)


@dataclass(frozen=True)
class RandomSelector:
    """Random pruning, the usual floor baseline: K tokens in a seeded pseudo-random order.

    Deviation: the order is a fixed hash of the token position and the seed (`random_order`), the
    same for every image, so that the graph is deterministic on every backend and any N.
    """

    seed: int = 0

    def __call__(self, image_features, prompt_embeds, prompt_mask, k):
        n = image_features.shape[1]
        return _constant_indices(random_indices(n, k, self.seed), image_features)


@dataclass(frozen=True)
class UniformSelector:
    """Uniform spatial stride: token floor((i + ½)·N/K) for i < K, in raster order.

    Deviation from a 2-D lattice: K is rarely a product of grid divisors, so the stride runs
    over the flattened grid; rows are still covered evenly.
    """

    def __call__(self, image_features, prompt_embeds, prompt_mask, k):
        n = image_features.shape[1]
        return _constant_indices(uniform_indices(n, k), image_features)


def uniform_indices(n: int, k: int) -> np.ndarray:
    return ((np.arange(k) + 0.5) * n / k).astype(np.int64)


@dataclass(frozen=True)
class DivPruneSelector:
    """DivPrune (Alvar, Singh, Akbari, Zhang, CVPR 2025): max–min diversity by greedy farthest point.

    As in the paper's code, the first token is the most isolated one (largest cosine distance to
    its nearest neighbour); each next token maximises its minimum distance to those chosen.
    Prompt-agnostic.
    """

    def __call__(self, image_features, prompt_embeds, prompt_mask, k):
        tokens = F.normalize(image_features.float(), dim=-1)
        n = tokens.shape[1]
        distance = 1.0 - torch.matmul(tokens, tokens.transpose(1, 2))
        eye = torch.eye(n, dtype=torch.bool, device=tokens.device).unsqueeze(0)
        isolation = distance.masked_fill(eye, float("inf")).amin(-1)
        return farthest_point_fill(tokens, greedy_top(isolation, 1), k)


@dataclass(frozen=True)
class DartSelector:
    """DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
    Duplication Matters More", 2025): keep pivot tokens, drop the tokens that duplicate them.

    Deviations: DART picks pivots by key norms inside the LLM's second layer and splits the
    budget per pivot; before the decoder there are no keys, so pivots are the `pivots` tokens of
    largest feature norm, and the other K − pivots slots go to the tokens whose highest cosine
    similarity to any pivot is lowest.
    """

    pivots: int = 8

    def __call__(self, image_features, prompt_embeds, prompt_mask, k):
        features = image_features.float()
        n_pivots = min(self.pivots, k)
        pivots = greedy_top(features.norm(dim=-1), n_pivots)
        if n_pivots == k:
            return pivots
        tokens = F.normalize(features, dim=-1)
        pivot_vectors = torch.gather(tokens, 1, pivots.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        duplication = torch.matmul(pivot_vectors, tokens.transpose(1, 2)).amax(1)
        rest = greedy_top((-duplication).scatter(1, pivots, float("-inf")), k - n_pivots)
        return torch.cat([pivots, rest], dim=1)


@dataclass(frozen=True)
class CDPrunerSelector:
    """CDPruner (Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity
    for Token Pruning in MLLMs", NeurIPS 2025): a conditional DPP, greedy MAP inference.

    Kernel L = diag(r)·S·diag(r), with S the cosine similarity of visual tokens and r the
    min–max-normalised relevance of each token to the question; the greedy MAP of Chen et al.
    (NeurIPS 2018) adds, K times, the token with the largest residual variance d², updating the
    Cholesky factors incrementally. Deviation: relevance is the cosine to the question's mean
    embedding in the LLM space (as ZSPAPrune), not CLIP text–image similarity.
    """

    def __call__(self, image_features, prompt_embeds, prompt_mask, k):
        tokens = F.normalize(image_features.float(), dim=-1)
        relevance = question_relevance(tokens, prompt_embeds.float(), prompt_mask, "mean")
        low = relevance.amin(-1, keepdim=True)
        high = relevance.amax(-1, keepdim=True)
        relevance = (relevance - low) / (high - low).clamp_min(1e-6)
        kernel = relevance.unsqueeze(-1) * torch.matmul(tokens, tokens.transpose(1, 2)) * relevance.unsqueeze(1)
        return greedy_dpp_map(kernel, k)


def greedy_dpp_map(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Fast greedy MAP of a DPP (Chen, Zhang, Zhou, NeurIPS 2018), unrolled K times. `kernel` [B,N,N]."""
    n = kernel.shape[1]
    positions = torch.arange(n, device=kernel.device).view(1, n)
    residual = torch.diagonal(kernel, dim1=1, dim2=2).clone()  # d_i²
    chosen = torch.zeros_like(residual, dtype=torch.bool)
    factors: list[torch.Tensor] = []  # rows c_t [B,N] of the incremental Cholesky factor
    picks = []
    for _ in range(k):
        pick = residual.masked_fill(chosen, float("-inf")).argmax(-1, keepdim=True)
        chosen = chosen | (positions == pick)
        row = torch.gather(kernel, 1, pick.unsqueeze(-1).expand(-1, 1, n)).squeeze(1)
        if factors:
            stacked = torch.stack(factors, dim=1)  # [B,t,N]
            at_pick = torch.gather(stacked, 2, pick.unsqueeze(1).expand(-1, len(factors), 1))  # [B,t,1]
            row = row - (at_pick * stacked).sum(1)
        variance = torch.gather(residual, 1, pick)
        factor = torch.where(variance > DPP_EPSILON, row / variance.clamp_min(DPP_EPSILON).sqrt(), 0.0)
        factors.append(factor)
        residual = residual - factor * factor
        picks.append(pick)
    return torch.cat(picks, dim=1)


_SELECTORS = {
    "zspa": ZSPASelector,
    "random": RandomSelector,
    "uniform": UniformSelector,
    "divprune": DivPruneSelector,
    "dart": DartSelector,
    "cdpruner": CDPrunerSelector,
}


def make_selector(method: str, params: dict[str, Any]) -> TokenSelector:
    """The method's selector with its defaults and `params`, checked as the exporter checks them."""
    return _SELECTORS[method](**method_params(method, params))
