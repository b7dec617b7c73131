"""Manifest fields every family fills the same way from its transformers config and tokenizer."""

from __future__ import annotations

from typing import Any

from zspa.manifest import DecoderSpec, TextSpec


def text_spec(model: Any, tokenizer: Any, image_token: str, chat_template: str) -> TextSpec:
    """Special tokens, EOS ids (the generation config's, as generate stops on them) and context."""
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = eos if isinstance(eos, list) else [eos if eos is not None else tokenizer.eos_token_id]
    return TextSpec(
        image_token=image_token,
        image_token_id=int(model.config.image_token_id),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=[int(i) for i in eos_ids if i is not None],
        pad_token_id=tokenizer.pad_token_id,
        chat_template=chat_template,
        max_context=int(model.config.text_config.max_position_embeddings),
    )


def decoder_spec(model: Any, kv_dtype: str, positions: str, mrope: bool = False,
                 deepstack_layers: int = 0) -> DecoderSpec:
    """KV-cache geometry of the language model."""
    cfg = model.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return DecoderSpec(
        num_layers=int(cfg.num_hidden_layers),
        num_kv_heads=int(cfg.num_key_value_heads),
        head_dim=int(head_dim),
        vocab_size=int(cfg.vocab_size),
        kv_dtype=kv_dtype,
        positions=positions,
        mrope=mrope,
        deepstack_layers=deepstack_layers,
    )
