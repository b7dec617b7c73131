"""Trains `shapes-llava` on the shapes benchmark, on CPU, seeded.

Teacher forcing on one-word answers (the loss covers the answer and EOS only), AdamW with warm-up
and cosine decay, fresh examples every step (the generator never repeats a training image), then
accuracy on the held-out test split. Saves a `save_pretrained` directory (model in fp16 +
processor) that `zspa-export --model DIR` reads, by default the one shipped as `shapes-llava`.

    python benchmarks/train_shapes.py [--minutes 25] [--out export/models/shapes-llava]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch

from zspa.datasets.shapes import example, image_for
from zspa.export.shapes import SHAPES_MODEL_DIR, build_untrained


def prompt_text(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def batch(processor, split: str, indices: list[int]) -> dict[str, torch.Tensor]:
    """Prompt + answer + EOS per example, right-padded; labels only on the answer and EOS."""
    tokenizer = processor.tokenizer
    examples = [example(split, i) for i in indices]
    encoded = processor(images=[image_for(split, i) for i in indices],
                        text=[prompt_text(processor, e.question) for e in examples], return_tensors="np")
    rows, labels = [], []
    for ids, ex in zip(encoded["input_ids"], examples):
        answer = tokenizer.encode(ex.answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        rows.append(list(ids) + answer)
        labels.append([-100] * len(ids) + answer)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([r + [-100] * (width - len(r)) for r in labels]),
        "pixel_values": torch.from_numpy(encoded["pixel_values"]),
    }


@torch.no_grad()
def accuracy(model, processor, split: str, count: int, batch_size: int = 50) -> dict[str, float]:
    """Greedy first-token accuracy (every answer is one token), overall and per question kind."""
    model.eval()
    hits: dict[str, list[bool]] = {}
    for start in range(0, count, batch_size):
        indices = list(range(start, min(count, start + batch_size)))
        inputs = batch(processor, split, indices)
        answer_at = (inputs["labels"] != -100).float().argmax(1)  # first answer position
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=inputs["pixel_values"]).logits
        predicted = logits[torch.arange(len(indices)), answer_at - 1].argmax(-1)
        expected = inputs["input_ids"][torch.arange(len(indices)), answer_at]
        for i, ok in zip(indices, (predicted == expected).tolist()):
            hits.setdefault(example(split, i).kind, []).append(ok)
            hits.setdefault("all", []).append(ok)
    model.train()
    return {kind: float(np.mean(v)) for kind, v in hits.items()}


def train(minutes: float, batch_size: int, lr: float, seed: int, log_every: int, out: Path) -> dict[str, float]:
    torch.manual_seed(seed)
    model, processor = build_untrained(seed)
    model.train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    budget_s = minutes * 60
    warmup = 100
    started = time.perf_counter()
    step = 0
    while True:
        elapsed = time.perf_counter() - started
        if elapsed > budget_s:
            break
        progress = min(1.0, elapsed / budget_s)  # cosine schedule over wall-clock time
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimiser.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        inputs = batch(processor, "train", list(range(step * batch_size, (step + 1) * batch_size)))
        loss = model(**inputs).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        step += 1
        if step % log_every == 0:
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  loss {loss.item():.4f}", flush=True)
    result = accuracy(model, processor, "test", 1000)
    print(f"trained {step} steps ({step * batch_size} examples) in {(time.perf_counter() - started) / 60:.1f} min")
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
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    train(args.minutes, args.batch_size, args.lr, args.seed, args.log_every, args.out)


if __name__ == "__main__":
    main()
