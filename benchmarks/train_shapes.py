"""Trains `shapes-llava` on the shapes benchmark, on CPU, seeded.

Teacher forcing on one-word answers, four questions per image in one sequence (the loss covers
answers and EOS only), AdamW with warm-up
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

from zspa.datasets.shapes import QUESTION_KINDS, example, image_for, training_turns
from zspa.export.shapes import SHAPES_MODEL_DIR, build_untrained


def prompt_text(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def batch(processor, split: str, indices: list[int], turns: int = 1) -> dict[str, torch.Tensor]:
    """Per image, `turns` question–answer pairs in one sequence (the first in exactly the
    single-question format that inference uses), right-padded; labels on answers and EOS only."""
    tokenizer = processor.tokenizer
    dialogues = [training_turns(split, i)[:turns] for i in indices]
    encoded = processor(images=[image_for(split, i) for i in indices],
                        text=[prompt_text(processor, d[0][0]) for d in dialogues], return_tensors="np")
    rows, labels = [], []
    for ids, dialogue in zip(encoded["input_ids"], dialogues):
        row, label = list(ids), [-100] * len(ids)
        for turn, (question, answer) in enumerate(dialogue):
            if turn:
                follow_up = tokenizer.encode(f"USER: {question} ASSISTANT:", add_special_tokens=False)
                row += follow_up
                label += [-100] * len(follow_up)
            target = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
            row += target
            label += target
        rows.append(row)
        labels.append(label)
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


def train(minutes: float, batch_size: int, lr: float, seed: int, log_every: int, out: Path,
          init: Path | None = None, first_example: int = 0) -> dict[str, float]:
    torch.manual_seed(seed)
    model, processor = build_untrained(seed)
    if init is not None:  # continue a run: its weights, fresh examples after the ones it saw
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
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
        start = first_example + step * batch_size
        indices = list(range(start, start + batch_size))
        inputs = batch(processor, "train", indices, turns=len(QUESTION_KINDS))
        loss = model(**inputs).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimiser.step()
        step += 1
        if step % log_every == 0:
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  loss {loss.item():.4f}", flush=True)
    result = accuracy(model, processor, "test", 1000)
    minutes = (time.perf_counter() - started) / 60
    print(f"trained {step} steps (examples {first_example}..{first_example + step * batch_size}) in {minutes:.1f} min")
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
