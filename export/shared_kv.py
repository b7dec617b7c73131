"""Decoder graphs whose KV cache is one preallocated buffer per layer, updated in place.

The portable decoder (DESIGN §4) takes the past and returns past+new, so onnxruntime copies the
whole cache every token. These variants take a fixed-capacity [B, Hkv, capacity, Dh] buffer per
cache tensor as past and return it updated as present (the runtime binds both to the same memory),
so a step writes only its new positions. Two attention kinds fill that contract:

- `shared` (here): onnxruntime's `com.microsoft.GroupQueryAttention`, as onnxruntime-genai's models
  do; it reads each row's valid prefix only. onnxruntime only: TensorRT cannot parse the op.
- `static` (`static_kv.py`): ONNX opset 24's `TensorScatter` writes the new positions and `Attention`
  reads the whole capacity under a mask; what TensorRT ≥ 10.15 builds into an in-place KV-cache
  update, so a decode step has static shapes.

How they are exported: transformers' attention interface gets an implementation that calls a torch
custom op (with an eager reference used for tracing and tests), and the dynamo exporter translates
that op into the ONNX nodes. Rotary embeddings stay outside the op, so the position ids the runtime
gives (original or contiguous) still apply. Both read the rows' lengths off `attention_mask`
[B, past + S], whose ones are each row's valid prefix (the runtime's slot batch lays them so).
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from dataclasses import dataclass

import torch
from onnx.defs import OpSchema
from torch import nn

from zspa.export.attention import attention_implementation
from zspa.export.contrib_ops import FLOATS, contrib_op

# The contrib op (onnxruntime ContribOperators.md), the inputs this graph uses.
_GQA_OP = contrib_op(
    "GroupQueryAttention",
    inputs=[("query", "T"), ("key", "T"), ("value", "T"), ("past_key", "T"), ("past_value", "T"), ("seqlens_k", "M"),
            ("total_sequence_length", "M")],
    outputs=[("output", "T"), ("present_key", "T"), ("present_value", "T")],
    types={"T": FLOATS, "M": ["tensor(int32)"]},
    attributes={"num_heads": OpSchema.AttrType.INT, "kv_num_heads": OpSchema.AttrType.INT,
                "scale": OpSchema.AttrType.FLOAT},
)


@torch.library.custom_op("zspa::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, seqlens_k: torch.Tensor, total_length: torch.Tensor,
                          num_heads: int, kv_num_heads: int, scale: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reference of the contrib op (batch 1 semantics of its shared-buffer mode): q/k/v
    [B, S, heads·Dh], buffers [B, Hkv, capacity, Dh], total_length = past + S."""
    batch, steps, _ = query.shape
    head_dim = past_key.shape[-1]
    total = int(total_length[0])
    past = total - steps
    present_key, present_value = past_key.clone(), past_value.clone()
    present_key[:, :, past:total] = key.view(batch, steps, kv_num_heads, head_dim).transpose(1, 2)
    present_value[:, :, past:total] = value.view(batch, steps, kv_num_heads, head_dim).transpose(1, 2)
    groups = num_heads // kv_num_heads
    q = query.view(batch, steps, num_heads, head_dim).transpose(1, 2)
    k = present_key[:, :, :total].repeat_interleave(groups, 1)
    v = present_value[:, :, :total].repeat_interleave(groups, 1)
    visible = torch.arange(total).view(1, total) <= (past + torch.arange(steps)).view(steps, 1)
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    output = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, steps, num_heads * head_dim)
    return output, present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, seqlens_k, total_length, num_heads, kv_num_heads, scale):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def _group_query_attention_onnx(query, key, value, past_key, past_value, seqlens_k, total_length, num_heads: int,
                                kv_num_heads: int, scale: float):
    return _GQA_OP(query, key, value, past_key, past_value, seqlens_k, total_length, num_heads=num_heads,
                   kv_num_heads=kv_num_heads, scale=scale)


def _gqa_lengths(attention_mask: torch.Tensor, steps: int, capacity: int) -> tuple[torch.Tensor, ...]:
    """GroupQueryAttention's `seqlens_k` (each row's valid length − 1) and total length."""
    seqlens_k = (attention_mask.sum(-1) - 1).to(torch.int32)
    total_length = (attention_mask.new_ones(1) * attention_mask.shape[1]).to(torch.int32)
    return seqlens_k, total_length


def _gqa_attend(query, key, value, past_key, past_value, lengths, scaling: float):
    batch, heads, steps, head_dim = query.shape
    flat = [t.transpose(1, 2).reshape(batch, steps, -1) for t in (query, key, value)]
    output, present_key, present_value = torch.ops.zspa.group_query_attention(
        *flat, past_key, past_value, *lengths, heads, key.shape[1], float(scaling))
    return output.view(batch, steps, heads, head_dim), present_key, present_value


@dataclass(frozen=True)
class BufferAttention:
    """One attention kind for the in-place cache: what it derives from the mask once per call
    (`lengths(attention_mask, steps, capacity)`), how a layer attends (`attend(q, k, v, past_key,
    past_value, lengths, scaling)` on transformers' [B, heads, S, Dh] tensors → output
    [B, S, heads, Dh] and the updated buffers), the exporter's translation of its op, and the
    opset the graph needs (None: the bundle's)."""

    name: str
    lengths: Callable[[torch.Tensor, int, int], tuple[torch.Tensor, ...]]
    attend: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    translation_table: dict
    opset: int | None = None


GROUP_QUERY_ATTENTION = BufferAttention(
    "zspa_gqa", _gqa_lengths, _gqa_attend,
    {torch.ops.zspa.group_query_attention.default: _group_query_attention_onnx})


class _BufferCache:
    """What transformers' attention layers see as the cache: `update` hands back the new keys and
    values only; the attention implementation below finds the layer's buffers here."""

    def __init__(self, kind: BufferAttention, buffers: list[tuple[torch.Tensor, torch.Tensor]],
                 lengths: tuple[torch.Tensor, ...]):
        self.kind, self.buffers, self.lengths = kind, buffers, lengths
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        return key, value


_ACTIVE_CACHE: contextvars.ContextVar[_BufferCache] = contextvars.ContextVar("zspa_buffer_kv_cache")


def _attention(module: nn.Module, query, key, value, attention_mask, scaling=None, **kwargs):
    """transformers attention interface: [B, H, S, Dh] tensors after rotary → [B, S, H, Dh]."""
    cache = _ACTIVE_CACHE.get()
    past_key, past_value = cache.buffers[module.layer_idx]
    output, present_key, present_value = cache.kind.attend(query, key, value, past_key, past_value, cache.lengths,
                                                           scaling)
    cache.present[module.layer_idx] = (present_key, present_value)
    return output, None


def buffer_attention(language_model: nn.Module, kind: BufferAttention):
    """Routes the language model's attention through `kind`'s op while exporting, then restores it."""
    return attention_implementation(language_model, kind.name, _attention)


class SharedKVDecoderGraph(nn.Module):
    """Same inputs and outputs as `DecoderGraph`, but `past_key_values.*` are the fixed-capacity
    buffers and `present.*` the same buffers updated; `attention_mask` [B, past + S] gives each
    row's valid length. Export inside `buffer_attention(language_model, kind)`."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module, kind: BufferAttention):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.kind = kind

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past_key_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        lengths = self.kind.lengths(attention_mask, inputs_embeds.shape[1], past_key_values[0].shape[2])
        cache = _BufferCache(self.kind, list(zip(past_key_values[0::2], past_key_values[1::2])), lengths)
        token = _ACTIVE_CACHE.set(cache)
        try:
            output = self.language_model(inputs_embeds=inputs_embeds, position_ids=position_ids, cache=cache,
                                         use_cache=True)
        finally:
            _ACTIVE_CACHE.reset(token)
        logits = self.lm_head(output.last_hidden_state[:, -1:, :])
        present = []
        for layer in range(len(cache.present)):
            present += cache.present[layer]
        return (logits, *present)
