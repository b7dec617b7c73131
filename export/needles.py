"""`needles-llava`: a small LLaVA trained on the needles benchmark (zspa.datasets.needles).

LLaVA-1.5's structure at toy widths: a CLIP tower at 224 px with 14 px patches (16×16 = 256
visual tokens, feature layer −2 without CLS), GELU projector, Llama decoder, a word-level
tokenizer over the benchmark's vocabulary. Trained in four steps (docs/evaluation.md: the tower on
per-patch labels, the decoder on ideal patch embeddings, the projector aligned between them, then
questions; `benchmarks/needles_*.py`, `train_needles.py`); the weights ship in
`export/models/needles-llava/` (fp16).
"""

from __future__ import annotations

from pathlib import Path

from zspa.datasets.needles import IMAGE_SIZE, PATCH, vocabulary
from zspa.export.shapes import build_word_tokenizer
from zspa.export.tiny import build_model, build_processor

NEEDLES_MODEL_NAME = "needles-llava"
NEEDLES_MODEL_DIR = Path(__file__).resolve().parent / "models" / NEEDLES_MODEL_NAME


def build_untrained(seed: int = 0, vision_hidden: int = 128, vision_layers: int = 4, text_hidden: int = 128,
                    text_layers: int = 4):
    """(model, processor) with freshly initialised weights, ready for training."""
    processor = build_processor(image_size=IMAGE_SIZE, patch_size=PATCH, tokenizer=build_word_tokenizer(vocabulary()))
    model = build_model(processor, image_size=IMAGE_SIZE, patch_size=PATCH, vision_hidden=vision_hidden,
                        vision_layers=vision_layers, text_hidden=text_hidden, text_layers=text_layers,
                        initializer_range=0.02, seed=seed)
    return model, processor
