"""What training the built-in benchmark models shares: teacher-forced batches of dialogues about
one image (loss on answers and EOS only), greedy first-token accuracy per question kind, and a
wall-clock-budgeted AdamW loop with warm-up and cosine decay. CPU, seeded, torch + transformers."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch


def prompt_text(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def batch(processor, images: list, dialogues: list[list[tuple[str, str]]]) -> dict[str, torch.Tensor]:
    """Per image, its question–answer pairs in one sequence (the first in exactly the
    single-question format that inference uses), right-padded; labels on answers and EOS only."""
    encoded = processor(images=images, text=[prompt_text(processor, d[0][0]) for d in dialogues], return_tensors="np")
    return {**dialogue_rows(processor.tokenizer, [list(ids) for ids in encoded["input_ids"]], dialogues),
            "pixel_values": torch.from_numpy(encoded["pixel_values"])}


def dialogue_rows(tokenizer, prompts: list[list[int]], dialogues: list[list[tuple[str, str]]]
                  ) -> dict[str, torch.Tensor]:
    """Each prompt's token ids (its image tokens already expanded) followed by its dialogue's
    answer, then every further turn as 'USER: q ASSISTANT:' and its answer; right-padded, labels on
    answers and EOS only."""
    rows, labels = [], []
    for ids, dialogue in zip(prompts, dialogues):
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
    }


def first_token_right(logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> list[bool]:
    """Per row, whether the greedy prediction at its first answer position is the answer's token."""
    answer_at = (inputs["labels"] != -100).float().argmax(1)
    rows = torch.arange(len(answer_at))
    return (logits[rows, answer_at - 1].argmax(-1) == inputs["input_ids"][rows, answer_at]).tolist()


@torch.no_grad()
def accuracy(model, processor, dataset, split: str, count: int, batch_size: int = 50) -> dict[str, float]:
    """Greedy first-token accuracy (every answer is one token), overall and per question kind.
    `dataset`: a module with `example(split, i)` and `image_for(split, i)`."""
    was_training = model.training
    model.eval()
    hits: dict[str, list[bool]] = {}
    for start in range(0, count, batch_size):
        indices = list(range(start, min(count, start + batch_size)))
        examples = [dataset.example(split, i) for i in indices]
        inputs = batch(processor, [dataset.image_for(split, i) for i in indices],
                       [[(ex.question, ex.answer)] for ex in examples])
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       pixel_values=inputs["pixel_values"]).logits
        for ex, ok in zip(examples, first_token_right(logits, inputs)):
            hits.setdefault(ex.kind, []).append(ok)
            hits.setdefault("all", []).append(ok)
    model.train(was_training)
    return {kind: float(np.mean(v)) for kind, v in hits.items()}


def train_for(model, parameters: Iterable[torch.nn.Parameter], batches: Callable[[int], dict[str, torch.Tensor]],
              minutes: float, lr: float, log: Callable[[str], None] = print, log_every: int = 50,
              warmup: int = 100) -> tuple[int, list[tuple[int, float, float]]]:
    """AdamW on `parameters` for a wall-clock budget, lr warm-up then cosine decay over the
    budget (floored at 2 %); `batches(step)` gives each step's inputs. Returns (steps, curve of
    (step, minutes, loss) averaged over each logging window)."""
    model.train()
    parameters = list(parameters)
    optimiser = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.01)
    budget_s, started, step, window, curve = minutes * 60, time.perf_counter(), 0, [], []
    while (elapsed := time.perf_counter() - started) < budget_s:
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * elapsed / budget_s))
        for group in optimiser.param_groups:
            group["lr"] = lr * max(scale, 0.02)
        loss = model(**batches(step)).loss
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        step += 1
        window.append(loss.item())
        if step % log_every == 0:
            curve.append((step, elapsed / 60, float(np.mean(window))))
            window = []
            log(f"step {step:5d}  {elapsed / 60:5.1f} min  loss {curve[-1][2]:.4f}")
    return step, curve
