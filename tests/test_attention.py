"""The concat decoder's grouped attention against transformers' eager attention (repeat_kv)."""

from __future__ import annotations

import onnx
import pytest
import torch
from transformers.models.llama.modeling_llama import eager_attention_forward

from zspa.export.attention import grouped_attention


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 4), (14, 2)])
def test_grouped_attention_equals_eager_attention(heads, kv_heads):
    """Batch 2, a decode-like step (3 new positions over 9 cached), a padded row and a causal mask."""
    generator = torch.Generator().manual_seed(0)
    batch, steps, total, head_dim = 2, 3, 12, 16
    query = torch.randn(batch, heads, steps, head_dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, total, head_dim, generator=generator) for _ in range(2))
    visible = torch.arange(total)[None, :] <= (total - steps + torch.arange(steps))[:, None]
    visible = visible[None, None].repeat(batch, 1, 1, 1)
    visible[1, :, :, :4] = False  # left padding of the second row
    mask = torch.zeros(visible.shape).masked_fill(~visible, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = heads // kv_heads, False

    expected, _ = eager_attention_forward(module, query, key, value, mask, scaling=head_dim**-0.5)
    actual, _ = grouped_attention(module, query, key, value, mask, scaling=head_dim**-0.5)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_concat_decoder_does_not_copy_its_cache_per_query_head(tiny_bundle):
    """repeat_kv exported as Expand copies every layer's keys and values G times on every step."""
    graph = onnx.load(str(tiny_bundle / "decoder.onnx"), load_external_data=False).graph
    cache = {output.name for output in graph.output if output.name.startswith("present.")}
    assert len(cache) == 2 * 2  # the tiny model's two layers
    unsqueezed = {node.output[0] for node in graph.node if node.op_type == "Unsqueeze" and node.input[0] in cache}
    expanded = [node.name for node in graph.node if node.op_type == "Expand" and node.input[0] in cache | unsqueezed]
    assert not expanded
