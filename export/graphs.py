"""torch modules with the exact input/output contract of each bundle graph (DESIGN §4)."""

from __future__ import annotations

import torch
from torch import nn


class DecoderGraph(nn.Module):
    """One graph for prefill and decode: embeddings, mask, positions and past KV in; logits of the
    last position only (prefill never materialises S×V logits) and the updated KV out."""

    def __init__(self, language_model: nn.Module, lm_head: nn.Module):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past_key_values: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (key, value) in enumerate(zip(past_key_values[0::2], past_key_values[1::2])):
            cache.update(key, value, layer)
        output = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
        )
        logits = self.lm_head(output.last_hidden_state[:, -1:, :])
        present = []
        for layer in output.cache.layers:
            present += [layer.keys, layer.values]
        return (logits, *present)


class DeepstackDecoderGraph(nn.Module):
    """`decoder` with DeepStack's extra input `deepstack_embeds` [L, B, S, D]: plane i is added to
    the hidden states after decoder layer i, as transformers' `_deepstack_process` adds the visual
    features at the image positions; rows outside the image are zeros (adding them is exact), so
    the graph needs no mask and one graph serves prefill (planes at the kept image tokens) and
    decode steps (zeros). Works for either KV-cache kind: the add is a hook on each layer."""

    def __init__(self, decoder: nn.Module, layers: list[nn.Module]):
        super().__init__()
        self.decoder = decoder
        self.layers = layers

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                deepstack_embeds: torch.Tensor, *past_key_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        def adder(plane: torch.Tensor):
            return lambda module, args, output: output + plane.to(output.dtype)

        hooks = [layer.register_forward_hook(adder(plane)) for layer, plane in zip(self.layers, deepstack_embeds)]
        try:
            return self.decoder(inputs_embeds, attention_mask, position_ids, *past_key_values)
        finally:
            for hook in hooks:
                hook.remove()


class ImageBlockDecoderGraph(DecoderGraph):
    """The decoder with Gemma 3's `image_block_ids` [B, P+S] (0: text, i > 0: the i-th image block):
    a query in a block sees the whole block, later rows too, as transformers' `token_type_ids` mask
    (`create_masks_for_vision_model`); local layers keep their window (key index > query index −
    window, over cache slots: left padding sits before a row's tokens, so it moves no distance).
    The masks are built here, additive floats by layer type, and handed to the language model as
    the mapping transformers' own `generate` prepares. Decode steps feed zeros: plain causal."""

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                image_block_ids: torch.Tensor, *past_key_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        steps, total = inputs_embeds.shape[1], attention_mask.shape[1]
        queries = torch.arange(steps, device=inputs_embeds.device) + (total - steps)
        keys = torch.arange(total, device=inputs_embeds.device)
        causal = keys[None, :] <= queries[:, None]
        query_blocks = image_block_ids[:, total - steps:, None]
        same_block = (query_blocks == image_block_ids[:, None, :]) & (query_blocks > 0)
        allowed = (causal[None] | same_block) & attention_mask[:, None, :].bool()
        masks = {"full_attention": allowed}
        window = getattr(self.language_model.config, "sliding_window", None)
        if window:
            masks["sliding_attention"] = allowed & (keys[None, None, :] > queries[None, :, None] - window)
        lowest = torch.finfo(inputs_embeds.dtype).min
        additive = {kind: torch.where(mask, 0.0, lowest).to(inputs_embeds.dtype)[:, None]
                    for kind, mask in masks.items()}
        return super().forward(inputs_embeds, additive, position_ids, *past_key_values)


class EmbedGraph(nn.Module):
    """`input_ids → inputs_embeds`."""

    def __init__(self, embedding: nn.Module):
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)


def vision_outputs(vision: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, ...]:
    """The vision module's outputs as a tuple: `image_features`, then any DeepStack planes."""
    outputs = vision(**inputs)
    return outputs if isinstance(outputs, tuple) else (outputs,)
