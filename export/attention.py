"""Attention implementations the decoder graphs are exported with.

transformers' eager attention repeats each key/value head for its group of query heads
(`repeat_kv`, an Expand and a Reshape), so the exported concat decoder copies its whole KV cache
G times per layer on every step: Expand was 12 % of a decode step at G = 2 (Qwen2.5-VL-3B has
G = 8). `grouped_attention` folds a group's query heads into the sequence axis instead, q
[B, Hkv, G·S, Dh] against k [B, Hkv, T, Dh]: the same products, no copy, standard ONNX ops only
(TensorRT builds it). The shared-KV decoder uses onnxruntime's GroupQueryAttention (shared_kv.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

GROUPED_IMPLEMENTATION = "zspa_grouped"


def grouped_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """transformers' eager attention ([B, H, S, Dh] in, [B, S, H, Dh] out) without repeat_kv."""
    batch, heads, steps, head_dim = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scores = torch.matmul(query.reshape(batch, kv_heads, groups * steps, head_dim), key.transpose(2, 3)) * scaling
    scores = scores.view(batch, kv_heads, groups, steps, total)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None]  # [B, 1, S, T] → [B, 1, 1, S, T]
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights.view(batch, kv_heads, groups * steps, total), value)
    return output.view(batch, heads, steps, head_dim).transpose(1, 2).contiguous(), None


def grouped_attention_export(language_model: nn.Module):
    """The concat decoder's attention while exporting: `grouped_attention` with eager's float masks
    (sdpa's boolean ones would be added to the scores as 0/1)."""
    from transformers.masking_utils import eager_mask

    return attention_implementation(language_model, GROUPED_IMPLEMENTATION, grouped_attention, eager_mask)


@contextlib.contextmanager
def attention_implementation(language_model: nn.Module, name: str, function: Callable,
                             mask_function: Callable | None = None) -> Iterator[None]:
    """Routes the language model's attention layers through `function` while exporting, then restores
    them. `mask_function` builds the masks it gets (transformers' `eager_mask` for additive float
    ones); without one, a new name gets sdpa's boolean masks."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, function)
    if mask_function is not None:
        AttentionMaskInterface.register(name, mask_function)
    previous = language_model.config._attn_implementation
    language_model.set_attn_implementation(name)  # transformers' public switch (a PreTrainedModel's)
    try:
        yield
    finally:
        language_model.set_attn_implementation(previous)
