"""`tiny-random-gemma3`: a seeded, few-MB Gemma-3-shaped model built from configs, no download.

Gemma 3's structure (a SigLIP tower, the 4×4 average pool, RMSNorm and the projection matrix →
a fixed token count per image, bidirectional attention inside each image block, sliding-window
local layers and global layers with their two rope bases, the embedding scale, Gemma's special
tokens and chat template, `Gemma3Processor` with pan&scan) at toy widths: 128 px images in 4 px
patches, pooled 4×4 to 64 tokens. Its answers are gibberish.
"""

from __future__ import annotations

import torch

IMAGE_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", *IMAGE_TOKENS.values()]

# The chat template of google/gemma-3-4b-it: a system message joins the first user turn, each
# image is `<start_of_image>` (the processor expands it), text parts are trimmed.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n        {%- endfor -%}\n    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n{%- endif -%}\n"
)
IMAGE_SIZE, PATCH_SIZE, TOKENS_PER_IMAGE = 128, 4, 64


def build_tokenizer():
    """Byte-level BPE with Gemma's special tokens (named as its tokenizer names them); BOS from the
    chat template, as Gemma's."""
    from transformers import PreTrainedTokenizerFast

    from zspa.export.tiny import train_bpe

    return PreTrainedTokenizerFast(tokenizer_object=train_bpe(SPECIAL_TOKENS), bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", extra_special_tokens=IMAGE_TOKENS)


def build_processor(pan_and_scan: bool | None = None, image_size: int = IMAGE_SIZE,
                    tokens_per_image: int = TOKENS_PER_IMAGE):
    """`Gemma3Processor` (it needs no torchvision) over the PIL image processor as the checkpoints'
    preprocessor_config.json sets it (`do_pan_and_scan` null there unless given)."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    image_processor = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, resample=2,
                                              image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                              do_pan_and_scan=pan_and_scan)
    return Gemma3Processor(image_processor=image_processor, tokenizer=build_tokenizer(),
                           chat_template=GEMMA3_CHAT_TEMPLATE, image_seq_length=tokens_per_image)


def build_model(processor, *, vision_hidden: int = 64, vision_layers: int = 2, text_hidden: int = 64,
                text_layers: int = 3, sliding_window: int = 48, initializer_range: float = 0.2,
                max_context: int = 8192, seed: int = 0, tie_word_embeddings: bool = False,
                patch_size: int = PATCH_SIZE):
    """A random-weight `Gemma3ForConditionalGeneration`, identical for identical arguments. Its
    local layers' window (48) is shorter than a prompt with one image, so the window matters."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    tokenizer = processor.tokenizer
    ids = {name: tokenizer.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS}
    head_dim = max(16, text_hidden // 4)
    config = Gemma3Config(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": vision_hidden,
                       "intermediate_size": vision_hidden * 2, "num_hidden_layers": vision_layers,
                       "num_attention_heads": 4, "image_size": processor.image_processor.size["height"],
                       "patch_size": patch_size,
                       "vision_use_head": False},
        text_config={"vocab_size": len(tokenizer), "hidden_size": text_hidden, "intermediate_size": text_hidden * 2,
                     "num_hidden_layers": text_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "head_dim": head_dim, "query_pre_attn_scalar": head_dim, "sliding_window": sliding_window,
                     "layer_types": ["sliding_attention"] * (text_layers - 1) + ["full_attention"],
                     "max_position_embeddings": max_context, "initializer_range": initializer_range,
                     "bos_token_id": ids["<bos>"], "eos_token_id": ids["<eos>"], "pad_token_id": ids["<pad>"],
                     "tie_word_embeddings": tie_word_embeddings},
        mm_tokens_per_image=processor.image_seq_length, boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"], image_token_index=ids["<image_soft_token>"],
        initializer_range=initializer_range, tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # the projector starts at zero (every visual token alike)
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, initializer_range)
    model.set_attn_implementation("eager")
    model.generation_config.eos_token_id = [ids["<eos>"], ids["<end_of_turn>"]]
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.bos_token_id = ids["<bos>"]
    return model.eval()


def build_tiny_gemma3():
    """The built-in model and processor for `--model tiny-random-gemma3`."""
    processor = build_processor()
    return build_model(processor), processor
