"""`tiny-random-internvl3`: a seeded, few-MB InternVL3-shaped model built from configs, no download.

InternVL3's structure (InternViT on 448 px tiles with 14 px patches, CLS token, layer scale,
pixel shuffle 0.5, the LayerNorm + GELU MLP projector, 256 tokens per tile, 1–12 tiles plus a
thumbnail, a Qwen2 decoder, InternVL's special tokens and chat template) at toy widths. Its
answers are gibberish.
"""

from __future__ import annotations

import torch

from zspa.families.qwen2_5_vl import ImageTextProcessor

IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *IMAGE_TOKENS.values()]

# The chat template of the InternVL3 -hf checkpoints: each image is `<IMG_CONTEXT>` and a newline.
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\\n' }}{% elif content['type'] == 'video' %}{{ '<video>\\n' }}{% elif content['type'] == "
    "'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def build_tokenizer():
    """Byte-level BPE with InternVL's special tokens (named as its tokenizer names them); no BOS."""
    from transformers import PreTrainedTokenizerFast

    from zspa.export.tiny import train_bpe

    return PreTrainedTokenizerFast(tokenizer_object=train_bpe(SPECIAL_TOKENS), eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", extra_special_tokens=IMAGE_TOKENS)


def build_processor(max_tiles: int = 12) -> ImageTextProcessor:
    """GotOcr2's PIL tile processor as InternVL3's preprocessor_config sets it, and the tokenizer."""
    from transformers import GotOcr2ImageProcessorPil

    image_processor = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True,
                                               min_patches=1, max_patches=max_tiles, image_mean=IMAGENET_MEAN,
                                               image_std=IMAGENET_STD)
    return ImageTextProcessor(image_processor, build_tokenizer(), INTERNVL_CHAT_TEMPLATE)


def build_model(processor: ImageTextProcessor, *, vision_hidden: int = 64, vision_layers: int = 2,
                text_hidden: int = 64, text_layers: int = 2, initializer_range: float = 0.2,
                max_context: int = 8192, seed: int = 0):
    """A random-weight `InternVLForConditionalGeneration`, identical for identical arguments (wide
    weights, as the other tiny models, so greedy decoding compares backends without coin flips)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    tokenizer = processor.tokenizer
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    heads = max(4, text_hidden // 64)
    config = InternVLConfig(
        vision_config={"hidden_size": vision_hidden, "num_hidden_layers": vision_layers, "num_attention_heads": 4,
                       "intermediate_size": vision_hidden * 2, "image_size": [448, 448], "patch_size": [14, 14],
                       "layer_scale_init_value": 1.0, "initializer_range": initializer_range},
        text_config={"model_type": "qwen2", "vocab_size": len(tokenizer), "hidden_size": text_hidden,
                     "intermediate_size": text_hidden * 2, "num_hidden_layers": text_layers,
                     "num_attention_heads": heads, "num_key_value_heads": max(2, heads // 2),
                     "max_position_embeddings": max_context, "initializer_range": initializer_range,
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"], "bos_token_id": None,
                     "tie_word_embeddings": False},
        image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=256, downsample_ratio=0.5,
        tie_word_embeddings=False, initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    return model.eval()


def build_tiny_internvl3():
    """The built-in model and processor for `--model tiny-random-internvl3` (initializer range
    0.3: at 0.2 its greedy answer at 3 tiles is one token repeated)."""
    processor = build_processor()
    return build_model(processor, initializer_range=0.3), processor
