"""Two diagnostics behind the needles figures in docs/evaluation.md (issue 27).

`lookups PROBE.pt`: what a decoder probe (`needles_decoder_probe.py --out`) keys its answers on. For
the test questions that name an attribute and a region (colour: "the star in the top-left", shape:
"the red object in the centre"), how often its answer is right, is the answer of *some* object with
the named attribute, and of some object in the named region: a probe that ignores the region scores
high on the second and near chance on the third.

`relevance [MODEL_DIR | PROBE.pt]`: where ZSPAPrune's relevance points in a needles model (default:
the shipped `needles-llava`), or in a probe's ideal patch embeddings, which alignment copies. Per
test image, the cosine of each visual token to the question's mean word embedding (the pruner's
mean pooling), averaged over object and empty patches, and the share of object patches among the
keep-0.1 core (the 26 most relevant): models whose visual tokens are word-like rank the objects
first.

    python benchmarks/needles_diagnostics.py lookups probe.pt [--questions 1000]
    python benchmarks/needles_diagnostics.py relevance [export/models/needles-llava | probe.pt] [--questions 100]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from zspa.datasets import needles
from zspa.export.needles import NEEDLES_MODEL_DIR, build_untrained

from needles_decoder_probe import IdealPatches, rows
from needles_tower import patch_labels

KEEP_CORE = 26  # keep 0.1 of 256 tokens, rounded up as the budget does
TokensOf = Callable[[int], torch.Tensor]  # test image index → its [256, hidden] visual tokens


def load_probe(path: Path) -> tuple[IdealPatches, object]:
    """A probe saved by `needles_decoder_probe.py --out`, in eval mode, and its processor."""
    model, processor = build_untrained(0)
    model.set_attn_implementation("sdpa")
    probe = IdealPatches(model)
    probe.load_state_dict(torch.load(path))
    return probe.eval(), processor


@torch.no_grad()
def lookups(probe_path: Path, questions: int) -> None:
    probe, processor = load_probe(probe_path)
    tally: dict[str, list[tuple[bool, bool, bool]]] = {"colour": [], "shape": []}
    for start in range(0, questions, 100):
        indices = [i for i in range(start, min(questions, start + 100)) if needles.QUESTION_KINDS[i % 5] in tally]
        inputs = rows(processor, "test", indices, (needles.MIN_OBJECTS, needles.MAX_OBJECTS), first_only=True)
        logits = probe.logits(inputs["input_ids"], inputs["attention_mask"], inputs["classes"], inputs["regions"])
        answer_at = (inputs["labels"] != -100).float().argmax(1)
        predicted = logits[torch.arange(len(indices)), answer_at - 1].argmax(-1)
        for i, token in zip(indices, predicted.tolist()):
            example = needles.example("test", i)
            words, answer = example.question.rstrip(" ?").split(), processor.tokenizer.decode([token]).strip()
            named, region = words[4], words[-1]  # "what colour is the SHAPE in the REGION", "... the COLOUR object ..."
            named_attribute, asked = ("shape", "colour") if example.kind == "colour" else ("colour", "shape")
            answers_of = [getattr(o, asked) for o in example.objects]
            tally[example.kind].append((
                answer == example.answer,
                any(getattr(o, named_attribute) == named and a == answer for o, a in zip(example.objects, answers_of)),
                any(o.region == region and a == answer for o, a in zip(example.objects, answers_of))))
    for kind, rows_ in tally.items():
        right, by_attribute, by_region = np.mean(rows_, axis=0)
        print(f"{kind} ({len(rows_)} questions): right {right:.3f}; the answer of an object with the named "
              f"attribute {by_attribute:.3f}; of an object in the named region {by_region:.3f}")


def _model_tokens(model_dir: Path) -> tuple[TokensOf, torch.Tensor, object]:
    """A model directory's visual tokens per test image, its word embedding table and tokenizer."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir).float().eval()
    processor = AutoProcessor.from_pretrained(model_dir)

    def tokens(i: int) -> torch.Tensor:
        pixels = processor.image_processor([needles.image_for("test", i)], return_tensors="pt")["pixel_values"]
        features = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
        return model.model.multi_modal_projector(features[model.config.vision_feature_layer][:, 1:])[0]
    return tokens, model.get_input_embeddings().weight, processor.tokenizer


def _probe_tokens(probe_path: Path) -> tuple[TokensOf, torch.Tensor, object]:
    """A decoder probe's ideal patch embeddings per test image (what alignment will copy), its word
    embedding table and tokenizer."""
    probe, processor = load_probe(probe_path)

    def tokens(i: int) -> torch.Tensor:
        classes, regions = (torch.from_numpy(a)[None] for a in patch_labels(needles.example("test", i).objects))
        return probe.patches(classes, regions)[0]
    return tokens, probe.model.get_input_embeddings().weight, processor.tokenizer


@torch.no_grad()
def relevance(path: Path, questions: int) -> None:
    tokens_of, words, tokenizer = _probe_tokens(path) if path.is_file() else _model_tokens(path)
    object_cos, empty_cos, core_on_objects, object_share = [], [], [], []
    for i in range(questions):
        example = needles.example("test", i)
        question = words[tokenizer.encode(example.question, add_special_tokens=False)].mean(0)
        tokens = tokens_of(i)
        cosines = torch.nn.functional.normalize(tokens, dim=-1) @ torch.nn.functional.normalize(question, dim=0)
        on_object = torch.from_numpy(patch_labels(example.objects)[0] > 0)
        object_cos.append(cosines[on_object].mean().item())
        empty_cos.append(cosines[~on_object].mean().item())
        core_on_objects.append(on_object[cosines.argsort(descending=True)[:KEEP_CORE]].float().mean().item())
        object_share.append(on_object.float().mean().item())
    print(f"{path} over {questions} test images: mean relevance of object patches {np.mean(object_cos):+.3f}, "
          f"of empty patches {np.mean(empty_cos):+.3f}; object patches among the {KEEP_CORE} most relevant "
          f"{np.mean(core_on_objects):.3f} (among all patches {np.mean(object_share):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="diagnostic", required=True)
    probe = sub.add_parser("lookups", help="what a decoder probe keys its answers on")
    probe.add_argument("probe", type=Path)
    probe.add_argument("--questions", type=int, default=1000)
    model = sub.add_parser("relevance", help="where ZSPAPrune's relevance points in a needles model")
    model.add_argument("path", type=Path, nargs="?", default=NEEDLES_MODEL_DIR, help="a model directory or a probe")
    model.add_argument("--questions", type=int, default=100)
    args = parser.parse_args()
    (lookups(args.probe, args.questions) if args.diagnostic == "lookups"
     else relevance(args.path, args.questions))


if __name__ == "__main__":
    main()
