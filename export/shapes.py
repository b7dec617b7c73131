"""`shapes-llava`: a small LLaVA trained on the shapes benchmark (zspa.datasets.shapes).

LLaVA-1.5's structure at toy widths (CLIP tower at 224 px with 28 px patches → 64 visual
tokens, feature layer −2 without CLS, GELU projector, Llama decoder) and a word-level tokenizer
over the benchmark's vocabulary. `benchmarks/train_shapes.py` trains it; the trained weights
ship in `export/models/shapes-llava/` (fp16, about 2 MB).
"""

from __future__ import annotations

from pathlib import Path

from zspa.datasets.shapes import IMAGE_SIZE, vocabulary
from zspa.export.tiny import IMAGE_TOKEN, SPECIAL_TOKENS, as_llama_style_tokenizer, build_model, build_processor

SHAPES_MODEL_NAME = "shapes-llava"
SHAPES_MODEL_DIR = Path(__file__).resolve().parent / "models" / SHAPES_MODEL_NAME
PATCH_SIZE = 28


def build_word_tokenizer(words: list[str] | None = None):
    """Whole words split on whitespace; 'top-left' and 'USER:' stay one token each. `words`: a
    benchmark's vocabulary (default: the shapes one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = [w for w in (words or vocabulary()) if w not in ("USER", ":", "ASSISTANT")] + ["USER:", "ASSISTANT:"]
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + sorted(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(SPECIAL_TOKENS)
    return as_llama_style_tokenizer(tok)


def build_untrained(seed: int = 0):
    """(model, processor) with freshly initialised weights, ready for training."""
    processor = build_processor(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, tokenizer=build_word_tokenizer())
    model = build_model(processor, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_hidden=96, vision_layers=3,
                        text_hidden=128, text_layers=3, initializer_range=0.02, seed=seed)
    return model, processor


__all__ = ["IMAGE_TOKEN", "SHAPES_MODEL_DIR", "SHAPES_MODEL_NAME", "build_untrained", "build_word_tokenizer"]
