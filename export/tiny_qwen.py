"""`tiny-random-qwen2.5-vl`, `tiny-random-qwen2-vl` and `tiny-random-qwen3-vl`: seeded, few-MB
Qwen-VL-shaped models built from configs, no download.

Qwen2.5-VL's structure (14 px patches, temporal patch 2, 2×2 merger, 112 px windows with
full-attention blocks, the processor's dynamic resolution and defaults, M-RoPE in a Qwen2
decoder, Qwen's special tokens and chat template) at toy widths; Qwen2-VL's the same with its own
tower (LayerNorm blocks, no windows); Qwen3-VL's with 16 px patches, a learned position table,
DeepStack planes from two tower blocks and a Qwen3 decoder with interleaved M-RoPE. Their answers
are gibberish.
"""

from __future__ import annotations

import torch

from zspa.families.qwen2_5_vl import ImageTextProcessor

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# The chat template Qwen ships with Qwen2.5-VL-Instruct.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer():
    """Byte-level BPE with Qwen's special tokens; like Qwen's, it adds no BOS."""
    from transformers import PreTrainedTokenizerFast

    from zspa.export.tiny import train_bpe

    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(SPECIAL_TOKENS), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>"},
    )


def build_processor(*, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280) -> ImageTextProcessor:
    """Qwen2-VL's PIL image processor at its defaults (up to 1280 visual tokens) and the tokenizer."""
    from transformers import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    return ImageTextProcessor(image_processor, build_tokenizer(), QWEN_CHAT_TEMPLATE)


def build_model(processor: ImageTextProcessor, *, vision_hidden: int = 64, vision_depth: int = 4,
                text_hidden: int = 64, text_layers: int = 2, initializer_range: float = 0.2,
                max_context: int = 4096, seed: int = 0, family: str = "qwen2_5_vl"):
    """A random-weight `Qwen2_5_VLForConditionalGeneration` (or, with family "qwen2_vl",
    `Qwen2VLForConditionalGeneration`), identical for identical arguments (wide weights, as
    tiny-random-llava, so greedy decoding compares backends without coin flips)."""
    import transformers

    tokenizer = processor.tokenizer
    heads = max(4, text_hidden // 64)
    head_dim = text_hidden // heads
    half = head_dim // 2  # M-RoPE splits the rotary frequencies (t, h, w) as Qwen's 16:24:24 of 64
    sections = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    patches = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
               "initializer_range": initializer_range}
    if family == "qwen3_vl":  # 16 px patches, a learned 8×8 position table, DeepStack after blocks 0 and 2
        patches["patch_size"] = 16
        vision = {"depth": vision_depth, "hidden_size": vision_hidden, "intermediate_size": vision_hidden * 2,
                  "num_heads": 4, "out_hidden_size": text_hidden, "num_position_embeddings": 64,
                  "deepstack_visual_indexes": [0, 2], **patches}
    elif family == "qwen2_vl":  # embed_dim is the tower's width, hidden_size its output (the decoder's)
        vision = {"depth": vision_depth, "embed_dim": vision_hidden, "hidden_size": text_hidden, "num_heads": 4,
                  "mlp_ratio": 2, **patches}
    else:
        vision = {"depth": vision_depth, "hidden_size": vision_hidden, "intermediate_size": vision_hidden * 2,
                  "num_heads": 4, "out_hidden_size": text_hidden, "fullatt_block_indexes": [1, vision_depth - 1],
                  "window_size": 112, **patches}
    config_class, model_class = {"qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
                                 "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
                                 "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration")}[family]
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": sections}
    if family == "qwen3_vl":  # Qwen3-VL interleaves the (t, h, w) frequencies
        rope["mrope_interleaved"] = True
    config = getattr(transformers, config_class)(
        vision_config=vision,
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": text_hidden, "intermediate_size": text_hidden * 2,
            "num_hidden_layers": text_layers, "num_attention_heads": heads, "num_key_value_heads": max(2, heads // 2),
            "max_position_embeddings": max_context, "initializer_range": initializer_range,
            "rope_parameters": rope, **({"head_dim": head_dim} if family == "qwen3_vl" else {}),
            "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], "bos_token_id": None,
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    model.set_attn_implementation("eager")
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model.eval()


def save_checkpoint(model, processor: ImageTextProcessor, directory) -> None:
    """A checkpoint directory laid out as the hub's Qwen2.5-VL repositories: weights, the image
    processor, the tokenizer and chat_template.jinja (what `zspa-export --model DIR` reads)."""
    from pathlib import Path

    model.save_pretrained(directory)
    processor.image_processor.save_pretrained(directory)
    processor.tokenizer.save_pretrained(directory)
    (Path(directory) / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")


def build_tiny_qwen():
    processor = build_processor()
    return build_model(processor), processor


def build_tiny_qwen2():
    processor = build_processor()
    return build_model(processor, family="qwen2_vl"), processor


def build_tiny_qwen3():
    """Qwen3-VL's processor settings (16 px patches, mean and std 0.5) with the tiny models' pixel range."""
    from transformers import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(patch_size=16, min_pixels=64 * 64, max_pixels=32 * 32 * 1280,
                                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = ImageTextProcessor(image_processor, build_tokenizer(), QWEN_CHAT_TEMPLATE)
    # Wider weights than the others: at 0.2 its greedy answers settle on one token within a few steps.
    return build_model(processor, family="qwen3_vl", initializer_range=0.4), processor
