"""`tiny-random-llava`: a seeded, few-MB LLaVA-1.5-shaped model built from configs, no download.

Same structure as llava-1.5 (CLIP tower at 336 px with 14 px patches → 576 visual tokens,
feature layer −2 without CLS, GELU projector, Llama decoder with grouped KV heads, the llava-hf
chat template) at toy widths. Its answers are gibberish; it exists so every command runs offline.
"""

from __future__ import annotations

import torch

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]

# The chat template llava-hf ships with llava-1.5 (including transformers' `generation` tag).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}"
    "{% endif %}{# Render all images first #}{% for content in message['content'] | selectattr('type', "
    "'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != "
    "'assistant' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% else %}{% for content in message['content'] | selectattr('type',"
    " 'equalto', 'text') %}{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

_CORPUS = """\
USER: What is in the image? ASSISTANT: A cat sits on a red sofa next to a window.
USER: How many people are there? ASSISTANT: There are two people walking a dog in the park.
USER: Describe the scene in detail. ASSISTANT: A street at night with cars, lights and tall buildings.
USER: What colour is the car on the left? ASSISTANT: The car on the left is blue and the truck is white.
USER: Is there a tree behind the house? ASSISTANT: Yes, a large green tree stands behind the small house.
USER: Where is the ball? ASSISTANT: The ball is under the table, near the chair on the right side.
"""


def train_bpe(special_tokens: list[str], unk_token: str | None = None, vocab_size: int = 512):
    """A byte-level BPE `tokenizers.Tokenizer` trained on a small fixed corpus (deterministic; any
    text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=unk_token))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines() * 4, trainer=trainer)
    return tok


def build_tokenizer():
    return as_llama_style_tokenizer(train_bpe(SPECIAL_TOKENS, unk_token="<unk>"))


def as_llama_style_tokenizer(tok):
    """Adds Llama's `<s> …` post-processor and wraps a `tokenizers.Tokenizer` for transformers."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def build_processor(image_size: int = 336, patch_size: int = 14, tokenizer=None):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer or build_tokenizer(),
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped again by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_model(
    processor,
    *,
    image_size: int = 336,
    patch_size: int = 14,
    vision_hidden: int = 64,
    vision_layers: int = 2,
    text_hidden: int = 64,
    text_layers: int = 2,
    initializer_range: float = 0.2,
    max_context: int = 2048,
    seed: int = 0,
    intermediate_size: int | None = None,
    text_heads: int | None = None,
    kv_heads: int | None = None,
):
    """A random-weight `LlavaForConditionalGeneration`, identical for identical arguments.

    By default weights are drawn wider than transformers' std of 0.02 so that logits have clear
    top-1 margins: greedy decoding then compares backends token for token without coin flips.
    Models meant for training pass the usual 0.02.
    """
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=vision_hidden * 2,
        num_hidden_layers=vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        hidden_size=text_hidden,
        intermediate_size=intermediate_size or (text_hidden * 2 if text_hidden < 512 else text_hidden * 8 // 3),
        num_hidden_layers=text_layers,
        num_attention_heads=text_heads or max(4, text_hidden // 64),
        num_key_value_heads=kv_heads or max(2, text_hidden // 128),
        vocab_size=len(tokenizer),
        max_position_embeddings=max_context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation("eager")
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def build_tiny_llava():
    """The built-in model and processor for `--model tiny-random-llava`."""
    processor = build_processor()
    return build_model(processor), processor
