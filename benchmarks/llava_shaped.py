"""The random-weight, LLaVA-1.5-shaped model the speed benchmarks share, and their common options.

576 visual tokens at 336 px (or another grid via `image_size`), a small vision tower, and a
decoder wide enough that prefill dominates; saved with save_pretrained and exported through the
library, as a user's model would be.
"""

from __future__ import annotations

import argparse
from pathlib import Path

IMAGE = Path(__file__).resolve().parent.parent / "zspa" / "assets" / "example.png"
QUESTION = "What colour is the ball next to the house?"


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-hidden", type=int, default=1024, help="decoder width (default: 1024)")
    parser.add_argument("--text-layers", type=int, default=8, help="decoder layers (default: 8)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per measurement (default: 5)")


def build_llava_shaped(workdir: Path, name: str, *, text_hidden: int, text_layers: int, keeps: list[float],
                       image_size: int = 336, vision_hidden: int = 128, vision_layers: int = 2,
                       kv_cache: str = "concat", intermediate_size: int | None = None):
    """(model, processor, bundle path) for a fresh random-weight model exported at `keeps` with
    the `kv_cache` decoder; `intermediate_size` defaults to Llama's 8/3 of the width."""
    from zspa.export.exporter import ExportOptions, export_bundle
    from zspa.export.tiny import build_model, build_processor

    processor = build_processor(image_size=image_size)
    model = build_model(processor, image_size=image_size, vision_hidden=vision_hidden, vision_layers=vision_layers,
                        text_hidden=text_hidden, text_layers=text_layers, max_context=4096,
                        intermediate_size=intermediate_size)
    source = workdir / f"{name}-model"
    model.save_pretrained(source)
    processor.save_pretrained(source)
    params = sum(p.numel() for p in model.model.language_model.parameters()) / 1e6
    print(f"model {name}: {(image_size // 14) ** 2} visual tokens, vision {vision_hidden} x {vision_layers}, "
          f"decoder {text_hidden} x {text_layers} layers "
          f"({params:.0f} M params)")
    bundle = workdir / name
    export_bundle(ExportOptions(str(source), bundle, keeps=keeps, kv_cache=kv_cache, progress=False))
    return model.eval(), processor, bundle
