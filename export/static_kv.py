"""The static KV cache: ONNX opset 24's `TensorScatter` writes each row's new keys and values at its
own length, and `Attention` reads the whole capacity under a mask (DESIGN §7).

This is the form TensorRT ≥ 10.15 builds in place: its ONNX parser maps `TensorScatter` (4-D
cache, axis −2) to the KV-cache update layer, whose output shares the cache input's memory, and
`Attention` with a 4-D boolean mask to its attention layer (neither `past_key` nor
`nonpad_kv_seqlen` is parsed, so the graph passes neither). Every decode step then has the same
shapes, [B, Hkv, capacity, Dh] whatever the rows' lengths, which a CUDA graph can capture. A
ScatterElements form would copy the whole cache every step. onnxruntime runs the same graph and
updates the buffer in place when past and present are bound to the same memory, so the graph is
checked against transformers on a CPU.

Unlike GroupQueryAttention, every row has its own write index, so several rows may each feed
several new tokens after pasts of different lengths.
"""

from __future__ import annotations

import torch

from zspa.export.contrib_ops import standard_op
from zspa.export.shared_kv import BufferAttention

STATIC_KV_OPSET = 24  # the first with TensorScatter
_TENSOR_SCATTER = standard_op("TensorScatter", STATIC_KV_OPSET)
_ATTENTION = standard_op("Attention", STATIC_KV_OPSET)


@torch.library.custom_op("zspa::static_cache_attention", mutates_args=())
def static_cache_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                           past_value: torch.Tensor, write_indices: torch.Tensor, visible: torch.Tensor,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reference of TensorScatter + Attention: query [B, H, S, Dh], new key/value
    [B, Hkv, S, Dh], buffers [B, Hkv, capacity, Dh]; row b's new positions are written at
    `write_indices[b]` onward; `visible` [B, 1, S, capacity] says which keys each query sees.
    Returns the output [B, H, S, Dh] and the updated buffers."""
    steps = query.shape[2]
    present_key, present_value = past_key.clone(), past_value.clone()
    for row, start in enumerate(write_indices.tolist()):
        present_key[row, :, start:start + steps] = key[row]
        present_value[row, :, start:start + steps] = value[row]
    groups = query.shape[1] // past_key.shape[1]
    keys, values = (t.repeat_interleave(groups, 1) for t in (present_key, present_value))
    scores = (query @ keys.transpose(-1, -2) * scale).masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, -1, dtype=torch.float32).to(query.dtype) @ values, present_key, present_value


@static_cache_attention.register_fake
def _(query, key, value, past_key, past_value, write_indices, visible, scale):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


def _static_cache_attention_onnx(query, key, value, past_key, past_value, write_indices, visible, scale: float):
    present_key = _TENSOR_SCATTER(past_key, key, write_indices, axis=-2)
    present_value = _TENSOR_SCATTER(past_value, value, write_indices, axis=-2)
    output = _ATTENTION(query, present_key, present_value, visible, scale=scale)[0]  # Y; the optional outputs unused
    return output, present_key, present_value


def _write_positions(attention_mask: torch.Tensor, steps: int, capacity: int) -> tuple[torch.Tensor, ...]:
    """Each row writes at its valid length before this call (`attention_mask`'s ones − S), and its
    query s sees the keys up to its own position: [B, 1, S, capacity]."""
    write_indices = attention_mask.sum(-1) - steps
    queries = write_indices[:, None] + torch.arange(steps, device=attention_mask.device)
    visible = torch.arange(capacity, device=attention_mask.device) <= queries[:, None, :, None]
    return write_indices, visible


def _static_attend(query, key, value, past_key, past_value, lengths, scaling: float):
    output, present_key, present_value = torch.ops.zspa.static_cache_attention(
        query, key, value, past_key, past_value, *lengths, float(scaling))
    return output.transpose(1, 2), present_key, present_value


STATIC_CACHE_ATTENTION = BufferAttention(
    "zspa_static_kv", _write_positions, _static_attend,
    {torch.ops.zspa.static_cache_attention.default: _static_cache_attention_onnx}, opset=STATIC_KV_OPSET)
