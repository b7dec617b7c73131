"""Prompt → token ids, with the image placeholder located and the user's question marked.

ZSPAPrune scores relevance against the question tokens only (DESIGN §5), not the system
prompt, chat-template tokens or image placeholder, so the tokenizer's character offsets map the
question's span in the rendered template back to token positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from zspa.errors import BundleError, InvalidInputError
from zspa.manifest import TextSpec
from zspa.runtime.chat_template import render

_SENTINEL = "\x00zspa-question\x00"


@dataclass(frozen=True)
class Prompt:
    input_ids: np.ndarray  # int64 [S], one image placeholder token
    question_mask: np.ndarray  # int64 [S], 1 on the question's tokens
    image_position: int  # index of the placeholder in input_ids


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, spec: TextSpec):
        self.tokenizer = tokenizer
        self.spec = spec

    @classmethod
    def from_file(cls, path: Path, spec: TextSpec) -> PromptBuilder:
        try:
            return cls(Tokenizer.from_file(str(path)), spec)
        except Exception as exc:  # tokenizers raises plain Exception on a bad file
            raise BundleError(f"{path}: cannot load tokenizer ({exc})") from None

    def render(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return render(self.spec.chat_template, messages, add_generation_prompt=True,
                      bos_token=self._token(self.spec.bos_token_id), eos_token=self._token(self.spec.eos_token_ids[0]))

    def _token(self, token_id: int | None) -> str:
        return (self.tokenizer.id_to_token(token_id) or "") if token_id is not None else ""

    def build(self, question: str) -> Prompt:
        if not isinstance(question, str) or not question.strip():
            raise InvalidInputError("prompt is empty")
        text = self.render(question)
        start = self.render(_SENTINEL).find(_SENTINEL)
        if start < 0 or text[start : start + len(question)] != question:
            raise BundleError("chat template does not place the user's text verbatim; cannot mark the question")
        end = start + len(question)
        encoding = self.tokenizer.encode(text, add_special_tokens=self.spec.add_special_tokens)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        image_positions = np.flatnonzero(ids == self.spec.image_token_id)
        if len(image_positions) != 1:
            raise InvalidInputError(
                f"the prompt must hold exactly one image placeholder after templating, found {len(image_positions)}"
                f" (remove {self.spec.image_token!r} from the prompt text)"
            )
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        special = np.asarray(encoding.special_tokens_mask, dtype=bool)
        in_question = (offsets[:, 1] > start) & (offsets[:, 0] < end) & ~special
        return Prompt(ids, in_question.astype(np.int64), int(image_positions[0]))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)
