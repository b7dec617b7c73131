"""Manifest fields every family fills the same way from its transformers config and tokenizer."""

from __future__ import annotations

from typing import Any

from zspa.manifest import DecoderSpec, TextSpec


def embedding(model: Any) -> Any:
    """A transformers VLM's input embedding (Gemma 3's scaled by √hidden, as transformers applies it)."""
    return model.get_input_embeddings()


def language_model(model: Any) -> tuple[Any, Any]:
    """A transformers VLM's decoder stack (takes `inputs_embeds`, `cache`) and its LM head."""
    return model.model.language_model, model.lm_head


def image_normalisation(image_processor: Any) -> dict[str, Any]:
    """The vision spec's resample, rescale and normalisation fields from a transformers image
    processor (identity values where it skips a step)."""
    ip = image_processor
    return {
        "resample": int(ip.resample),
        "rescale_factor": float(ip.rescale_factor) if ip.do_rescale else 1.0,
        "mean": [float(x) for x in ip.image_mean] if ip.do_normalize else [0.0, 0.0, 0.0],
        "std": [float(x) for x in ip.image_std] if ip.do_normalize else [1.0, 1.0, 1.0],
    }


def processor_size(processor: Any) -> tuple[int, int]:
    """(height, width) the image processor resizes to (a tile or a view)."""
    size = processor.image_processor.size
    return int(size["height"]), int(size["width"])


def batched_image_export(module: Any, processor: Any, count: int, generator: Any, dtype: Any):
    """A vision export whose batch is one image's tiles or views (a symbolic `num_tiles` axis, `count`
    random ones to trace, parity on one), all their tokens one block: `image_features` [1, N, D]."""
    import torch

    from zspa.families import VisionExport

    pixel_values = torch.randn(count, 3, *processor_size(processor), generator=generator).to(dtype)
    return VisionExport(module.eval(), {"pixel_values": pixel_values},
                        {"pixel_values": {0: "num_tiles"}, "image_features": {1: "num_visual_tokens"}},
                        {"pixel_values": pixel_values[:1]})


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
