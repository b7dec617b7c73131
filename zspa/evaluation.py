"""`zspa-eval`: accuracy and agreement with the unpruned model across pruning methods and keeps.

Each data line is `{"image": path, "question": str, "answer": str, "choices": [str, …]?}`, or
`"images": [path, …]` for a question about several (the prompt gets them in order before the
question); image paths are relative to the data file. For every line the bundle answers once unpruned
(keep 1.0) and once per method × keep; each pruned answer is scored against the reference
answer and against the unpruned run: first-token top-1 agreement, exact match of the greedy
answers, and KL(unpruned ‖ pruned) of the first-token distributions. Records are appended to
`records.jsonl` as they are made, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zspa.errors import InvalidInputError, ZspaError
from zspa.intervals import bootstrap_interval, difference_of_means, mean_of, ratio_of_means
from zspa.runtime.logprobs import log_softmax
from zspa.runtime.pipeline import Pipeline

BASELINE = ("none", 1.0)
LETTERS = string.ascii_uppercase
_ARTICLES = {"a", "an", "the"}


@dataclass(frozen=True)
class EvalItem:
    line: int
    images: tuple[Path, ...]
    question: str
    answer: str
    choices: tuple[str, ...] = ()
    kind: str = ""  # the question's kind, when the data names one: accuracy is also reported per kind

    def prompt(self) -> str:
        if not self.choices:
            return self.question
        options = "\n".join(f"{LETTERS[i]}. {c}" for i, c in enumerate(self.choices))
        return f"{self.question}\n{options}\nAnswer with the option's letter from the given choices directly."

    def expected(self) -> str:
        """The reference, as a choice letter for multiple choice, else the normalised answer."""
        if not self.choices:
            return normalise(self.answer)
        if self.answer.strip().upper() in LETTERS[: len(self.choices)]:
            return self.answer.strip().upper()
        matches = [i for i, c in enumerate(self.choices) if normalise(c) == normalise(self.answer)]
        return LETTERS[matches[0]] if matches else ""


def normalise(text: str) -> str:
    """VQA-style answer normalisation: lower case, no punctuation (hyphens kept), no articles."""
    text = re.sub(r"[^\w\s-]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in _ARTICLES)


def predicted(item: EvalItem, text: str) -> str:
    if not item.choices:
        return normalise(text)
    match = re.match(r"\s*\(?([A-Z])\b", text.strip().upper())
    return match.group(1) if match else ""


def read_dataset(path: Path) -> tuple[list[EvalItem], list[str]]:
    """Parses every line it can; returns the items and one message per bad line (with its number)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidInputError(f"{path}: cannot read the data file ({exc.strerror})") from None
    items, problems = [], []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in ("question", "answer") if not isinstance(row.get(k), str) or not row[k]]
            if missing:
                raise ValueError(f"missing or non-text field(s): {', '.join(missing)}")
            images = _images(row)
            choices = row.get("choices") or ()
            if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
                raise ValueError("choices must be a list of strings")
            if len(choices) > len(LETTERS):
                raise ValueError(f"at most {len(LETTERS)} choices")
            kind = row.get("kind", "")
            if not isinstance(kind, str):
                raise ValueError("kind must be a string")
            item = EvalItem(number, tuple(path.parent / image for image in images), row["question"], row["answer"],
                            tuple(choices), kind)
            if item.choices and not item.expected():
                raise ValueError("answer is neither a choice letter nor one of the choices")
            items.append(item)
        except (json.JSONDecodeError, ValueError) as exc:
            problems.append(f"{path}:{number}: {exc}")
    return items, problems


def _images(row: dict) -> list[str]:
    """A line's image paths: its "image", or its non-empty "images" list (one of the two)."""
    if ("image" in row) == ("images" in row):
        raise ValueError('give either "image" (a path) or "images" (a list of paths)')
    images = [row["image"]] if "image" in row else row["images"]
    if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
        raise ValueError('"image" must be a path, "images" a non-empty list of paths')
    return images


def kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """KL(P‖Q) in nats between the softmax distributions of two logit vectors."""
    log_p, log_q = log_softmax(reference_logits), log_softmax(logits)
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))


class Evaluation:
    """Runs and records the sweep; `summary()` aggregates whatever `records.jsonl` holds."""

    def __init__(self, pipeline: Pipeline, out: Path, settings: list[tuple[str, float]], max_new_tokens: int):
        self.pipeline = pipeline
        self.out = out
        self.settings = settings
        self.max_new_tokens = max_new_tokens
        self.records_path = out / "records.jsonl"

    def done(self) -> set[tuple[int, str, float]]:
        return {(r["line"], r["method"], r["keep"]) for r in self.records()}

    def run(self, items: list[EvalItem], progress: bool = True) -> list[str]:
        """Evaluates what is not recorded yet; returns messages for lines that failed at run time."""
        from tqdm.auto import tqdm

        self.out.mkdir(parents=True, exist_ok=True)
        done = self.done()
        todo = [(item, [s for s in [BASELINE, *self.settings] if (item.line, *s) not in done]) for item in items]
        todo = [(item, settings) for item, settings in todo if settings]
        problems = []
        with open(self.records_path, "a", encoding="utf-8") as records, tqdm(
            total=sum(len(s) for _, s in todo), desc="evaluating", unit="run", disable=not progress
        ) as bar:
            for item, settings in todo:
                try:
                    rows = list(self._evaluate(item, settings))
                except ZspaError as exc:
                    problems.append(f"line {item.line}: {exc}")
                    bar.update(len(settings))
                    continue
                for row in rows:  # an item's records land together, so resuming never mixes baselines
                    records.write(json.dumps(row) + "\n")
                records.flush()
                bar.update(len(settings))
        return problems

    def _evaluate(self, item: EvalItem, settings: list[tuple[str, float]]) -> Iterable[dict]:
        baseline = self._answer(item, *BASELINE)
        expected = item.expected()
        for method, keep in settings:
            reference = (method, keep) == BASELINE  # agreement with itself would say nothing
            result = baseline if reference else self._answer(item, method, keep)
            yield {
                "line": item.line,
                "kind": item.kind,
                "method": method,
                "keep": keep,
                "answer": result.text,
                "correct": predicted(item, result.text) == expected,
                "first_token_agrees": None if reference else int(np.argmax(result.first_token_logits))
                == int(np.argmax(baseline.first_token_logits)),
                "answer_agrees": None if reference else result.token_ids == baseline.token_ids,
                "kl": None if reference else kl_divergence(baseline.first_token_logits, result.first_token_logits),
                "visual_tokens_kept": result.stats.visual_tokens_kept,
                "time_to_first_token_ms": result.stats.time_to_first_token_ms,
            }

    def _answer(self, item: EvalItem, method: str, keep: float):
        return self.pipeline.generate(list(item.images), item.prompt(), keep=keep,
                                      method=None if method == "none" else method,
                                      max_new_tokens=self.max_new_tokens)

    def records(self) -> list[dict]:
        if not self.records_path.exists():
            return []
        return [json.loads(line) for line in self.records_path.read_text().splitlines() if line.strip()]

    def summary(self) -> list[dict]:
        """One row per (method, keep): n, accuracy and retained accuracy with 95 % bootstrap
        intervals, accuracy per question kind, agreements, mean KL, kept tokens, TTFT."""
        groups: dict[tuple[str, float], list[dict]] = {}
        for row in self.records():
            groups.setdefault((row["method"], row["keep"]), []).append(row)
        baseline = {r["line"]: r["correct"] for r in groups.get(BASELINE, [])}
        table = []
        for (method, keep), group in sorted(groups.items(), key=lambda kv: (kv[0] != BASELINE, kv[0][0], -kv[0][1])):
            correct = [r["correct"] for r in group]
            paired = [(r["correct"], baseline[r["line"]]) for r in group if r["line"] in baseline]
            reference = np.mean([b for _, b in paired]) if paired else np.nan
            kinds: dict[str, list[bool]] = {}
            for r in group:
                if r.get("kind"):
                    kinds.setdefault(r["kind"], []).append(r["correct"])
            table.append({
                "method": method,
                "keep": keep,
                "n": len(group),
                "visual_tokens_kept": float(np.mean([r["visual_tokens_kept"] for r in group])),
                "accuracy": float(np.mean(correct)),
                "accuracy_interval": bootstrap_interval(mean_of, correct),
                "retained_accuracy": float(np.mean([c for c, _ in paired]) / reference) if reference else float("nan"),
                "retained_interval": bootstrap_interval(ratio_of_means, *zip(*paired)) if paired and reference
                else (float("nan"), float("nan")),
                "accuracy_by_kind": {kind: float(np.mean(v)) for kind, v in sorted(kinds.items())},
                **_agreement(group, reference_row=(method, keep) == BASELINE),
                "time_to_first_token_ms": float(np.median([r["time_to_first_token_ms"] for r in group])),
            })
        return table

    def margin(self, first: tuple[str, float], second: tuple[str, float]) -> dict:
        """Accuracy of `first` minus `second` (each a (method, keep)) on the questions both
        answered, with its paired 95 % bootstrap interval."""
        by_setting: dict[tuple[str, float], dict[int, bool]] = {first: {}, second: {}}
        for row in self.records():
            setting = (row["method"], row["keep"])
            if setting in by_setting:
                by_setting[setting][row["line"]] = row["correct"]
        lines = sorted(by_setting[first].keys() & by_setting[second].keys())
        if not lines:
            raise InvalidInputError(f"no question was answered under both {first} and {second}")
        a, b = [by_setting[first][i] for i in lines], [by_setting[second][i] for i in lines]
        return {"n": len(lines), "margin": float(np.mean(a) - np.mean(b)),
                "interval": bootstrap_interval(difference_of_means, a, b)}


def _agreement(group: list[dict], *, reference_row: bool) -> dict:
    """Agreement with the unpruned run; None on the unpruned row itself, which is the reference."""
    if reference_row:
        return {"first_token_agreement": None, "answer_agreement": None, "mean_kl": None}
    return {"first_token_agreement": float(np.mean([r["first_token_agrees"] for r in group])),
            "answer_agreement": float(np.mean([r["answer_agrees"] for r in group])),
            "mean_kl": float(np.mean([r["kl"] for r in group]))}


def _cell(value: float | None, digits: int) -> str:
    return "ref" if value is None else f"{value:.{digits}f}"


def markdown_table(table: list[dict]) -> str:
    """The summary as Markdown; intervals are 95 % bootstrap ones over questions."""
    header = ("| method | keep | tokens kept | n | accuracy (95 % CI) | retained (95 % CI) | first-token agreement "
              "| answer agreement | mean KL | TTFT ms |\n|---|---|---|---|---|---|---|---|---|---|\n")
    return header + "".join(
        f"| {r['method']} | {r['keep']:g} | {r['visual_tokens_kept']:.0f} | {r['n']} | "
        f"{r['accuracy']:.3f} {_interval(r['accuracy_interval'])} | "
        f"{r['retained_accuracy']:.3f} {_interval(r['retained_interval'])} | {_cell(r['first_token_agreement'], 3)} | "
        f"{_cell(r['answer_agreement'], 3)} | {_cell(r['mean_kl'], 4)} | {r['time_to_first_token_ms']:.1f} |\n"
        for r in table
    )


def kind_table(table: list[dict]) -> str:
    """Accuracy per question kind, one row per (method, keep); empty when the data names no kinds."""
    kinds = sorted({kind for r in table for kind in r["accuracy_by_kind"]})
    if not kinds:
        return ""
    header = f"| method | keep | {' | '.join(kinds)} |\n|---|---|{'---|' * len(kinds)}\n"
    return header + "".join(
        f"| {r['method']} | {r['keep']:g} | "
        + " | ".join(f"{r['accuracy_by_kind'][k]:.3f}" if k in r["accuracy_by_kind"] else "–" for k in kinds) + " |\n"
        for r in table
    )


def _interval(bounds: tuple[float, float]) -> str:
    return "(–)" if any(np.isnan(bounds)) else f"({bounds[0]:.3f}–{bounds[1]:.3f})"
