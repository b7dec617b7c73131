"""`--model zspa` for lmms-eval: a bundle answers generate_until tasks (GQA, TextVQA, POPE, MME, …),
multi-round ones and loglikelihood (multiple-choice) ones through the runtime, with pruning chosen
by model_args:

    lmms-eval eval --model zspa --model_args bundle=DIR,keep=0.1,method=zspa,backend=ort-cpu --tasks pope

The harness the pruning papers report with, so a bundle's scores compare with theirs. A document
may show several images: each goes where the context has an `<image>` placeholder, or all before
the text when the context has none (or a different count); greedy unless the task asks otherwise.
"""

from __future__ import annotations

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from tqdm import tqdm

from zspa.errors import InvalidInputError
from zspa.runtime.pipeline import Pipeline, PreparedImage
from zspa.runtime.prompting import Prompt

IMAGE_PLACEHOLDER = "<image>"  # lmms-eval prompts may carry it; the bundle's template places the images itself
DEFAULT_MAX_NEW_TOKENS = 128


class ZspaLMM(lmms):
    is_simple = True

    def __init__(self, bundle: str, keep: float | str = 1.0, method: str | None = None, backend: str = "ort-cpu",
                 positions: str | None = None, threads: int | str | None = None, batch_size: int | str = 1,
                 max_batch_size: int | str | None = None, device: str | None = None, **unknown) -> None:
        """`max_batch_size` and `device` are what the harness passes every model; the backend says
        where zspa runs. Any other key is refused: a misspelt `keep` would run an unpruned evaluation."""
        if unknown:
            raise InvalidInputError(f"unknown model_args {', '.join(sorted(unknown))}: zspa takes "
                                    "bundle, keep, method, backend, positions and threads")
        super().__init__()
        if int(batch_size) != 1:
            raise InvalidInputError("zspa answers one request at a time: use --batch_size 1")
        self.pipeline = Pipeline.load(bundle, backend=backend, positions=positions,
                                      threads=int(threads) if threads else None)
        self.keep = float(keep)
        self.method = method if self.keep < 1.0 else None
        self.pipeline.bundle.pruner_for(self.keep, self.method)  # refuses a setting the bundle cannot run, now

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for request in tqdm(requests, desc="zspa answering", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = [v for v in doc_to_visual(self.task_dict[task][split][doc_id]) if v is not None]
            answers.append(self._answer(visuals, context, dict(gen_kwargs)))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answers[-1])
        return answers

    def _answer(self, images: list, context: str, gen_kwargs: dict) -> str:
        until = gen_kwargs.get("until") or []
        images, prompt = self._prompt(images, context)
        result = self.pipeline.generate(
            images, prompt, keep=self.keep, method=self.method,
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS),
            temperature=float(gen_kwargs.get("temperature") or 0.0) if gen_kwargs.get("do_sample") else 0.0,
            top_p=float(gen_kwargs.get("top_p") or 1.0), stop=[until] if isinstance(until, str) else list(until))
        return result.text

    def _prompt(self, images: list, context: str) -> tuple[list[PreparedImage], Prompt]:
        """The document's images preprocessed, and its context as one user turn that shows them
        (as many blocks each as the image has views: Gemma 3's pan&scan crops)."""
        prepared = [self.pipeline.prepare_image(image) for image in images]
        views = tuple(image.vision_input.views for image in prepared)
        prompt = self.pipeline.prompts.build_chat([{"role": "user", "content": user_content(context, len(images))}],
                                                  self.pipeline.max_context, views=views)
        return prepared, prompt

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(log-probability of the continuation as the answer to the context, whether greedy
        decoding gives it): the continuation's tokens follow the chat template's generation prompt."""
        scores = []
        for request in tqdm(requests, desc="zspa scoring", disable=self.rank != 0):
            context, target, doc_to_visual, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            continuation = target if isinstance(target, str) else target(doc)
            visuals = [v for v in doc_to_visual(doc) or [] if v is not None]
            images, prompt = self._prompt(visuals, context)
            scores.append(self.pipeline.score(images, prompt, self.pipeline.prompts.encode_text(continuation),
                                              keep=self.keep, method=self.method))
            self.cache_hook.add_partial("loglikelihood", (context, continuation), scores[-1])
        return scores

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Each round's answer; rounds after the first get their context and images from the task's
        `doc_to_text(doc, previous_output=, round_idx=, previous_round_info=)`, until it signals the end."""
        results = []
        for request in tqdm(requests, desc="zspa answering", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
            doc = self.task_dict[task][split][doc_id]
            gen_kwargs = {k: v for k, v in dict(gen_kwargs).items() if k != "until"}  # rounds end at EOS
            visuals, rounds, info, round_idx = doc_to_visual(doc), [], None, 0
            while True:
                if round_idx:
                    visuals, context, terminal, rounds, info = doc_to_text(
                        doc, previous_output=rounds, round_idx=round_idx, previous_round_info=info)
                    rounds = list(rounds)
                    if terminal:
                        break
                rounds.append(self._answer([v for v in visuals or [] if v is not None], context, gen_kwargs))
                round_idx += 1
            results.append(rounds)
            self.cache_hook.add_partial("generate_until_multi_round", (request.args[0], gen_kwargs), rounds)
        return results


def user_content(context: str, images: int) -> list[dict]:
    """The user turn in transformers' format: the images at the context's placeholders when it has
    one per image, else all of them first; blank text between images is dropped."""
    pieces = context.split(IMAGE_PLACEHOLDER)
    if len(pieces) != images + 1:
        pieces = [*([""] * images), context.replace(IMAGE_PLACEHOLDER, "")]
    content = []
    for i, piece in enumerate(pieces):
        if i:
            content.append({"type": "image"})
        if piece.strip():
            content.append({"type": "text", "text": piece.strip()})
    return content
