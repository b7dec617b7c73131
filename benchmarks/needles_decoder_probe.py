"""Can `needles-llava`'s decoder learn the lookups at all? A diagnostic for issue 27's training.

The tower is taken out of the question: each of the 256 image positions gets an ideal patch
embedding, the sum of learnt vectors for its object's colour and shape (or "none") and its region,
straight from the generator's labels (`needles_tower.patch_labels`). What is left is the decoder
learning to find the patch a question names among 8–24 objects: if it stays at the image-blind loss
(about 0.72 here) with perfect patches, no vision recipe can pass it. Scenes grow from two objects
(`--steps-per-object`); first-token accuracy on held-out test questions, per kind, as it trains.
No image is rendered and no tower runs, so a step costs the decoder's alone.

    python benchmarks/needles_decoder_probe.py [--minutes 20] [--lr 1e-3] [--steps-per-object 20] [--max-objects 24] \
        [--crowded] [--region-counts] [--tie-words 0.1] [--first-scene N] [--init probe.pt] [--out probe.pt]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from zspa.datasets import needles
from zspa.export.needles import build_untrained

from machine import describe_machine
from needles_tower import patch_labels
from vlm_training import dialogue_rows, first_token_right, prompt_text, train_for


class IdealPatches(nn.Module):
    """The decoder, fed ideal patch embeddings at the image positions.

    `tie_words` > 0 adds that weight times the mean (1 − cosine) between each colour, shape and
    region vector and the decoder's embedding of its word: visual tokens that look like the words
    naming them, as a CLIP-aligned LLaVA's do, so that ZSPAPrune's question relevance has something
    to find (`needles_diagnostics.py relevance`)."""

    def __init__(self, model, tokenizer=None, tie_words: float = 0.0):
        super().__init__()
        self.model, hidden = model, model.config.text_config.hidden_size
        self.image_token_id, self.tie_words = model.config.image_token_id, tie_words
        self.colour = nn.Embedding(1 + len(needles.COLOURS), hidden)  # 0: no object
        self.shape = nn.Embedding(1 + len(needles.SHAPES), hidden)
        self.region = nn.Embedding(len(needles.REGIONS), hidden)
        for table in (self.colour, self.shape, self.region):
            nn.init.normal_(table.weight, std=0.02)
        if tie_words:
            ids = tokenizer.convert_tokens_to_ids([*needles.COLOURS, *needles.SHAPES, *needles.REGIONS])
            self.register_buffer("word_ids", torch.tensor(ids), persistent=False)

    def word_tie(self) -> torch.Tensor:
        """Mean (1 − cosine) between the named colour, shape and region vectors and their words'."""
        named = torch.cat([self.colour.weight[1:], self.shape.weight[1:], self.region.weight])
        words = self.model.get_input_embeddings()(self.word_ids)
        return 1 - nn.functional.cosine_similarity(named, words.to(named.dtype), dim=-1).mean()

    def patches(self, classes: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
        """[B, 256, hidden]: each patch's colour, shape and region vectors summed."""
        shapes = len(needles.SHAPES)
        present = classes > 0
        return (self.colour(torch.where(present, (classes - 1) // shapes + 1, 0))
                + self.shape(torch.where(present, (classes - 1) % shapes + 1, 0)) + self.region(regions))

    def logits(self, input_ids, attention_mask, classes, regions):
        embeds = self.model.get_input_embeddings()(input_ids)
        patches = self.patches(classes, regions).to(embeds.dtype)
        embeds = embeds.masked_scatter((input_ids == self.image_token_id)[..., None], patches)
        hidden = self.model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask)
        return self.model.lm_head(hidden.last_hidden_state)

    def forward(self, input_ids, attention_mask, labels, classes, regions):
        logits = self.logits(input_ids, attention_mask, classes, regions)
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        if self.tie_words:
            loss = loss + self.tie_words * self.word_tie()
        return SimpleNamespace(loss=loss)  # what train_for reads


def region_count(objects: tuple[needles.Needle, ...], rng: np.random.Generator) -> tuple[str, str]:
    """A training-only question keyed on the region alone: how many objects lie in one (a region
    holding at most four, the largest count word; 24 objects cannot fill all nine past that)."""
    counts = {region: sum(o.region == region for o in objects) for region in needles.REGIONS}
    region = str(rng.choice([r for r, n in counts.items() if n < len(needles.COUNT_WORDS)]))
    return f"how many objects are in the {region} ?", needles.COUNT_WORDS[counts[region]]


def rows(processor, split: str, indices, count: tuple[int, int], first_only: bool = False,
         crowded: bool = False, region_counts: bool = False) -> dict:
    """Token rows with the image token repeated once per patch, labels on answers and EOS, and each
    scene's patch labels; five questions per scene (the first in inference format) or the first,
    and with `region_counts` a sixth, `region_count`'s."""
    tokenizer, image_token_id = processor.tokenizer, processor.tokenizer.convert_tokens_to_ids("<image>")
    prompts, dialogues, labels = [], [], []
    for i in indices:
        objects, rng = needles.scene(split, i, count, crowded=crowded)
        kinds = needles.QUESTION_KINDS[i % 5:] + needles.QUESTION_KINDS[:i % 5]
        dialogues.append([needles.ask(objects, kind, rng) for kind in kinds[:1 if first_only else None]]
                         + ([region_count(objects, rng)] if region_counts else []))
        ids = tokenizer.encode(prompt_text(processor, dialogues[-1][0][0]))
        at = ids.index(image_token_id)
        prompts.append(ids[:at] + [image_token_id] * needles.GRID ** 2 + ids[at + 1:])
        labels.append(patch_labels(objects))
    return {**dialogue_rows(tokenizer, prompts, dialogues),
            "classes": torch.from_numpy(np.stack([c for c, _ in labels])),
            "regions": torch.from_numpy(np.stack([r for _, r in labels]))}


@torch.no_grad()
def accuracy(probe: IdealPatches, processor, count: int, objects: tuple[int, int]) -> dict[str, float]:
    """Greedy first-token accuracy on the first `count` test questions (scenes of `objects`
    fewest and most objects), per kind."""
    probe.eval()
    hits: dict[str, list[bool]] = {}
    for start in range(0, count, 100):
        indices = list(range(start, min(count, start + 100)))
        inputs = rows(processor, "test", indices, objects, first_only=True)
        logits = probe.logits(inputs["input_ids"], inputs["attention_mask"], inputs["classes"], inputs["regions"])
        for i, ok in zip(indices, first_token_right(logits, inputs)):
            for kind in (needles.QUESTION_KINDS[i % 5], "all"):
                hits.setdefault(kind, []).append(ok)
    probe.train()
    return {kind: round(float(np.mean(v)), 3) for kind, v in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=20.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps-per-object", type=int, default=20, help="curriculum: steps before one more object")
    parser.add_argument("--max-objects", type=int, default=needles.MAX_OBJECTS,
                        help="where the curriculum stops; below the benchmark's, the test scenes are as small "
                             "(a check that the lookup is learnable at all)")
    parser.add_argument("--test-questions", type=int, default=1000)
    parser.add_argument("--crowded", action="store_true",
                        help="train on scenes drawn from few colours and shapes (needles.scene(crowded=True)), so "
                             "questions need the region from the smallest scenes on")
    parser.add_argument("--region-counts", action="store_true",
                        help="a sixth training question per scene, how many objects lie in a named region: a lookup "
                             "keyed on the region alone, which the benchmark's colour and shape questions combine with "
                             "an attribute")
    parser.add_argument("--tie-words", type=float, default=0.0,
                        help="weight of a loss pulling each colour, shape and region vector towards the embedding "
                             "of its word (IdealPatches), so the aligned model's visual tokens are word-like")
    parser.add_argument("--first-scene", type=int, default=0,
                        help="index of the first training scene: a continuation (--init) can start past the scenes "
                             "its earlier runs saw")
    parser.add_argument("--init", type=Path, default=None, help="start from a probe saved with --out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="save the trained probe's state_dict (decoder and patch tables) here, the starting point "
                             "for aligning the projector to its patch embeddings")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    model, processor = build_untrained(args.seed)
    model.set_attn_implementation("sdpa")
    probe = IdealPatches(model, processor.tokenizer, args.tie_words)
    if args.init is not None:
        probe.load_state_dict(torch.load(args.init))
    print(f"decoder probe: {vars(args)}; {describe_machine()}, torch {torch.__version__}", flush=True)

    def batches(step: int) -> dict:
        most = min(args.max_objects, 2 + step // args.steps_per_object)
        first = args.first_scene + step * args.batch_size
        return rows(processor, "train", range(first, first + args.batch_size),
                    (max(1, most // 3), most), crowded=args.crowded,
                    region_counts=args.region_counts)

    parameters = [p for name, p in probe.named_parameters() if not name.startswith("model.model.vision_tower")
                  and not name.startswith("model.model.multi_modal_projector")]
    started = time.perf_counter()
    steps, _ = train_for(probe, parameters, batches, args.minutes, args.lr)
    test_objects = ((needles.MIN_OBJECTS, needles.MAX_OBJECTS) if args.max_objects >= needles.MAX_OBJECTS
                    else (max(1, args.max_objects // 3), args.max_objects))
    print(f"{steps} steps in {(time.perf_counter() - started) / 60:.1f} min; test accuracy "
          f"({args.test_questions} questions, {test_objects[0]}–{test_objects[1]} objects): "
          f"{accuracy(probe, processor, args.test_questions, test_objects)}"
          + (f"; word tie {probe.word_tie().item():.3f}" if args.tie_words else ""), flush=True)
    if args.out is not None:
        torch.save(probe.state_dict(), args.out)


if __name__ == "__main__":
    main()
