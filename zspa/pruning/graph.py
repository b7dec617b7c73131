"""The pruner graph shared by every method: select K indices, sort them, gather the features."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class TokenSelector(Protocol):
    """A pruning method: returns K indices per batch row, in any order, without duplicates."""

    def __call__(
        self, image_features: torch.Tensor, prompt_embeds: torch.Tensor, prompt_mask: torch.Tensor, k: int
    ) -> torch.Tensor: ...


class PrunerGraph(nn.Module):
    """`image_features, prompt_embeds, prompt_mask → kept_features, kept_indices` (DESIGN §4).

    K is a Python int, so the exported graph has static output shapes; indices come out ascending,
    so kept tokens keep their original spatial order.
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
