"""Trains `needles-llava` on the needles benchmark in LLaVA's two stages, on CPU, seeded.

Stage 1 (alignment): every image with its caption, the list of its objects ('red circle
top-left , …'); LLaVA trains only the projector here, on a frozen pretrained LLM. Nothing here
is pretrained, so by default the tower and the decoder learn too (`--freeze-lm` freezes the
decoder as LLaVA does, to compare). Stage 2 (instruction tuning): everything, on five questions per
image (one of each kind, the first in the exact inference format). Fresh examples every step;
then greedy first-token accuracy on the held-out test split, per question kind. Writes the
`save_pretrained` directory (fp16 + processor) that `zspa-export --model DIR` reads (default: the
shipped `needles-llava`), and the log, loss curve and accuracies under `--results`.

With `--tower PATH` (stage 0's weights, `benchmarks/needles_tower.py`), the tower starts trained
and stays frozen through stage 1 (`--freeze-tower`: through stage 2 too), as LLaVA's pretrained
CLIP does, and stage 2 runs at `--tune-lr-scale` of stage 1's learning rate. `--stage1 both` puts
the five questions before each caption in stage 1, so questions start on the few-object scenes of
the curriculum; `--question-curriculum` restarts the curriculum for stage 2's scenes.

With `--decoder PATH` as well (a trained `needles_decoder_probe.py --out`: a decoder that answers
from ideal patch embeddings), stage 1 is LLaVA's alignment proper: tower and decoder frozen, only
the projector learns, to give from the tower's features the patch embeddings that decoder learnt its
lookups on (relative squared error against the probe's embeddings of the same scene's labels).

    python benchmarks/train_needles.py [--minutes 60] [--alignment-share 0.3] [--tower tower.pt] \
        [--decoder probe.pt]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from zspa.datasets import needles
from zspa.export.needles import NEEDLES_MODEL_DIR, build_untrained

from machine import describe_machine
from needles_decoder_probe import IdealPatches
from needles_tower import scenes
from vlm_training import accuracy, batch, train_for

RESULTS = Path(__file__).resolve().parent / "results" / "needles-training"


def curriculum(step: int) -> tuple[int, int]:
    """Objects per stage-1 image: one or two at first, the benchmark's 8–24 from step 440 on.
    Measured: on the full scenes from the start, the loss sat at the image-blind level through
    two whole stages (a question's object is 1 of 256 tokens: nothing to pull the attention)."""
    most = min(needles.MAX_OBJECTS, 2 + step // CURRICULUM_STEPS_PER_OBJECT)
    return max(1, most // 3), most


CURRICULUM_STEPS_PER_OBJECT = 20


def scene_batches(processor, batch_size: int, first: int, questions: bool, captions: bool, grow: bool):
    """Fresh training scenes every step. Per image: five questions, one of each kind (the first,
    in rotation, in the exact inference format) and/or its caption last (after the questions, so
    no answer can be read off the caption); with `grow`, few objects first (`curriculum`)."""
    def batches(step: int) -> dict[str, torch.Tensor]:
        count = curriculum(step) if grow else (needles.MIN_OBJECTS, needles.MAX_OBJECTS)
        images, dialogues = [], []
        for i in range(first + step * batch_size, first + (step + 1) * batch_size):
            objects, rng = needles.scene("train", i, count)
            images.append(needles.render(objects, seed=needles.SPLIT_SEEDS["train"] * 1_000_003 + i))
            kinds = needles.QUESTION_KINDS[i % 5:] + needles.QUESTION_KINDS[:i % 5]
            turns = [needles.ask(objects, kind, rng) for kind in kinds] if questions else []
            dialogues.append(turns + ([(needles.CAPTION_PROMPT, needles.caption(objects))] if captions else []))
        return batch(processor, images, dialogues)
    return batches


@torch.no_grad()
def image_reliance(model, inputs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Loss on a batch with its own images and with each row given another row's image: equal
    losses mean the model answers from the text alone."""
    was_training = model.training
    model.eval()
    own = model(**inputs).loss.item()
    swapped = model(**{**inputs, "pixel_values": inputs["pixel_values"].roll(1, 0)}).loss.item()
    model.train(was_training)
    return own, swapped


class ProjectorAlignment(torch.nn.Module):
    """Stage 1 on a probe-trained decoder: the projector's output against the probe's ideal patch
    embeddings of the same scene, squared error relative to the target's energy (1.0: no better
    than zeros)."""

    def __init__(self, model, ideal: IdealPatches):
        super().__init__()
        self.model, self.ideal = model, ideal

    def forward(self, pixel_values, classes, regions):
        llava = self.model.model
        features = llava.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        projected = llava.multi_modal_projector(features[self.model.config.vision_feature_layer][:, 1:])
        target = self.ideal.patches(classes, regions).detach()
        return SimpleNamespace(loss=(projected - target).pow(2).mean() / target.pow(2).mean())


def trainable(model, frozen: tuple[str, ...]) -> list[torch.nn.Parameter]:
    """The parameters outside `frozen` (name prefixes); the frozen ones stop requiring gradients,
    so backward skips them (a frozen tower's whole backward pass)."""
    parameters = []
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(not name.startswith(frozen))
        if parameter.requires_grad:
            parameters.append(parameter)
    return parameters


def plot_curve(curves: dict[str, list[tuple[int, float, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    offset = 0.0
    for stage, curve in curves.items():
        ax.plot([offset + m for _, m, _ in curve], [loss for _, _, loss in curve], label=stage)
        offset += curve[-1][1] if curve else 0.0
    ax.set_xlabel("minutes")
    ax.set_ylabel("training loss (answer tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget for both stages")
    parser.add_argument("--alignment-share", type=float, default=0.35, help="share of the budget for stage 1")
    parser.add_argument("--freeze-lm", action="store_true", help="stage 1 trains the tower and projector only")
    parser.add_argument("--tower", type=Path, default=None,
                        help="stage 0's tower weights: loaded, and frozen through stage 1")
    parser.add_argument("--freeze-tower", action="store_true", help="with --tower: frozen through stage 2 too")
    parser.add_argument("--decoder", type=Path, default=None,
                        help="with --tower: a trained decoder probe (needles_decoder_probe.py --out); stage 1 then "
                             "aligns the projector to its patch embeddings, tower and decoder frozen")
    parser.add_argument("--stage1", choices=("captions", "both"), default="captions",
                        help="stage 1's targets: captions alone, or the five questions then the caption")
    parser.add_argument("--question-curriculum", action="store_true",
                        help="stage 2's scenes also start with few objects and grow")
    parser.add_argument("--tune-lr-scale", type=float, default=1.0, help="stage 2's learning rate over stage 1's")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-examples", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=NEEDLES_MODEL_DIR)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.decoder is not None and args.tower is None:
        parser.error("--decoder needs --tower: the projector is aligned on a trained tower's features")

    args.results.mkdir(parents=True, exist_ok=True)
    log_file = open(args.results / "training.log", "w", encoding="utf-8")

    def log(line: str) -> None:
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    log(f"needles-llava, {vars(args)}; {describe_machine()}, torch {torch.__version__}, "
        f"Python {platform.python_version()}")
    torch.manual_seed(args.seed)
    model, processor = build_untrained(args.seed)
    model.set_attn_implementation("sdpa")  # training speed; the export chooses its own
    ideal = None
    if args.decoder is not None:  # before the tower: the probe's state holds an untrained one
        ideal = IdealPatches(model)
        ideal.load_state_dict(torch.load(args.decoder, weights_only=True))
        log(f"decoder and patch embeddings from the decoder probe: {args.decoder}")
    if args.tower is not None:
        model.model.vision_tower.load_state_dict(torch.load(args.tower, weights_only=True))
        log(f"tower from stage 0: {args.tower}")
    log(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters")
    started = time.perf_counter()

    align_minutes = args.minutes * args.alignment_share
    tower_frozen = ("model.vision_tower",) if args.tower is not None else ()
    stage1_frozen = tower_frozen + (("model.language_model", "lm_head") if args.freeze_lm else ())
    stage2_frozen = tower_frozen if args.freeze_tower else ()
    with_questions = args.stage1 == "both"
    if ideal is not None:
        log(f"stage 1 (the projector alone, to the probe's patch embeddings): {align_minutes:.1f} min")
        align_steps, align_curve = train_for(
            ProjectorAlignment(model, ideal),
            trainable(model, ("model.vision_tower", "model.language_model", "lm_head")),
            lambda step: scenes(processor, "train", range(step * args.batch_size, (step + 1) * args.batch_size)),
            align_minutes, args.lr, log=log)
    else:
        log(f"stage 1 (alignment on captions{' after questions' * with_questions}): {align_minutes:.1f} min")
        align_steps, align_curve = train_for(
            model, trainable(model, stage1_frozen),
            scene_batches(processor, args.batch_size, 0, questions=with_questions, captions=True, grow=True),
            align_minutes, args.lr, log=log)
    after_alignment = accuracy(model, processor, needles, "test", 200)
    probe = scene_batches(processor, args.batch_size, 50_000_000, False, True, False)(0)  # full scenes, unseen
    log(f"after stage 1 ({align_steps} steps): test accuracy on 200 questions {after_alignment}; caption loss "
        "with own / swapped images %.3f / %.3f" % image_reliance(model, probe))

    tune_minutes = args.minutes - (time.perf_counter() - started) / 60
    log(f"stage 2 (questions): {tune_minutes:.1f} min")
    tune_steps, tune_curve = train_for(
        model, trainable(model, stage2_frozen),
        scene_batches(processor, args.batch_size, 0, questions=True, captions=False, grow=args.question_curriculum),
        tune_minutes, args.lr * args.tune_lr_scale, log=log)
    minutes = (time.perf_counter() - started) / 60
    result = accuracy(model, processor, needles, "test", args.test_examples)
    unseen = scene_batches(processor, args.batch_size, 60_000_000, questions=True, captions=False, grow=False)(0)
    log(f"trained {align_steps} + {tune_steps} steps in {minutes:.1f} min; question loss with own / swapped "
        "images %.3f / %.3f" % image_reliance(model, unseen))
    log(f"test accuracy ({args.test_examples} questions): "
        + ", ".join(f"{k} {v:.3f}" for k, v in sorted(result.items())))

    args.out.mkdir(parents=True, exist_ok=True)
    model.set_attn_implementation("eager")
    model.to(torch.float16).save_pretrained(args.out)
    processor.save_pretrained(args.out)
    curves = {"stage 1: captions": align_curve, "stage 2: questions": tune_curve}
    plot_curve(curves, args.results / "loss.png")
    (args.results / "summary.json").write_text(json.dumps({
        "settings": {k: str(v) for k, v in vars(args).items()}, "machine": describe_machine(),
        "minutes": minutes, "steps": [align_steps, tune_steps], "after_alignment": after_alignment,
        "test_accuracy": result, "curves": curves}, indent=1))
    log(f"wrote {args.out} and {args.results}")


if __name__ == "__main__":
    main()
