"""Trains `shapes-llava` on the shapes benchmark, on CPU, seeded.

Teacher forcing on one-word answers, four questions per image in one sequence (the loss covers
answers and EOS only), AdamW with warm-up and cosine decay, fresh examples every step (the
generator never repeats a training image), then accuracy on the held-out test split. Saves a
`save_pretrained` directory (model in fp16 + processor) that `zspa-export --model DIR` reads, by
default the one shipped as `shapes-llava`.

    python benchmarks/train_shapes.py [--minutes 25] [--out export/models/shapes-llava]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from zspa.datasets import shapes
from zspa.export.shapes import SHAPES_MODEL_DIR, build_untrained

from vlm_training import accuracy, batch, train_for


def train(minutes: float, batch_size: int, lr: float, seed: int, log_every: int, out: Path,
          init: Path | None = None, first_example: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    model, processor = build_untrained(seed)
    if init is not None:  # continue a run: its weights, fresh examples after the ones it saw
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32)

    def batches(step: int) -> dict[str, torch.Tensor]:
        indices = range(first_example + step * batch_size, first_example + (step + 1) * batch_size)
        return batch(processor, [shapes.image_for("train", i) for i in indices],
                     [shapes.training_turns("train", i) for i in indices])

    started = time.perf_counter()
    steps, _ = train_for(model, model.parameters(), batches, minutes, lr, log_every=log_every)
    result = accuracy(model, processor, shapes, "test", 1000)
    minutes = (time.perf_counter() - started) / 60
    last = first_example + steps * batch_size
    print(f"trained {steps} steps (examples {first_example}..{last}) in {minutes:.1f} min")
    print("test accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(result.items())))
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    processor.save_pretrained(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=SHAPES_MODEL_DIR)
    parser.add_argument("--init", type=Path, default=None, help="continue from a saved run's directory")
    parser.add_argument("--first-example", type=int, default=0, help="index of the first training example")
    args = parser.parse_args()
    train(args.minutes, args.batch_size, args.lr, args.seed, args.log_every, args.out, args.init,
          args.first_example)


if __name__ == "__main__":
    main()
