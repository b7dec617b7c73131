"""Pieces of the PyTorch reference pipelines the parity tests build from transformers modules."""

from __future__ import annotations

import torch


@torch.no_grad()
def greedy_continue(lm, lm_head, embed, out, eos_ids, next_position: int, position_shape: tuple[int, ...],
                    max_new: int) -> list[int]:
    """Greedy decoding in transformers from a prefill's output, up to `max_new` tokens or EOS; each
    step's position ids have `position_shape` ((1, 1), or (3, 1, 1) for M-RoPE)."""
    tokens = []
    for _ in range(max_new):
        token = int(lm_head(out.last_hidden_state[:, -1]).argmax(-1))
        if token in eos_ids:
            break
        tokens.append(token)
        out = lm(inputs_embeds=embed(torch.tensor([[token]])), position_ids=torch.full(position_shape, next_position),
                 cache=out.cache, use_cache=True)
        next_position += 1
    return tokens
