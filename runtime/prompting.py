"""Prompt → token ids, with the image placeholders located and the user's question marked.

ZSPAPrune scores relevance against the question tokens only (DESIGN §5), not the system
prompt, chat-template tokens or image placeholder, so the tokenizer's character offsets map the
question's span in the rendered template back to token positions.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from zspa.errors import BundleError, InvalidInputError
from zspa.manifest import TextSpec
from zspa.runtime.chat_template import render


class PromptTooLong(InvalidInputError):
    """The prompt is over its token limit (told by its characters, or by its tokens)."""


def _text_length(content: str | list[dict[str, Any]]) -> int:
    """Characters of a message's text: a string, or the text parts of a content list."""
    return len(content) if isinstance(content, str) else sum(len(part.get("text") or "") for part in content)


def _sentinel(nonce: str, index: int) -> str:
    """A marker standing in for the question's index-th text part; the per-call nonce keeps a
    client who types a marker into a message from being taken for the question."""
    return f"\x00zspa-question-{nonce}-{index}\x00"


@dataclass(frozen=True)
class Prompt:
    input_ids: np.ndarray  # int64 [S], one placeholder token per image
    question_mask: np.ndarray  # int64 [S], 1 on the question's tokens
    image_positions: tuple[int, ...]  # indices of the placeholders in input_ids, one per image in order

    @property
    def text_runs(self) -> list[int]:
        """Lengths of the n + 1 text runs around the n placeholders (runtime/positions.py)."""
        bounds = [-1, *self.image_positions, len(self.input_ids)]
        return [end - start - 1 for start, end in zip(bounds, bounds[1:])]


class PromptBuilder:
    def __init__(self, tokenizer: Tokenizer, spec: TextSpec):
        self.tokenizer = tokenizer
        self.spec = spec
        # No token covers more characters than the longest vocabulary entry, so a text of more than
        # `limit × max_token_chars` characters is over `limit` tokens: refused before templating
        # and tokenizing (a 30 MB prompt cost 71 s of tokenizer time to learn it was too long).
        self.max_token_chars = max(map(len, tokenizer.get_vocab(with_added_tokens=True)), default=1)

    @classmethod
    def from_file(cls, path: Path, spec: TextSpec) -> PromptBuilder:
        try:
            return cls(Tokenizer.from_file(str(path)), spec)
        except Exception as exc:  # tokenizers raises plain Exception on a bad file
            raise BundleError(f"{path}: cannot load tokenizer ({exc})") from None

    def render(self, messages: list[dict[str, Any]]) -> str:
        return render(self.spec.chat_template, messages, add_generation_prompt=True,
                      bos_token=self._token(self.spec.bos_token_id), eos_token=self._token(self.spec.eos_token_ids[0]))

    def _expand_images(self, text: str) -> str:
        """Each image placeholder as the family's processor writes it before tokenizing (InternVL
        wraps it in `<img>…</img>`), still one placeholder per image."""
        image_text = self.spec.image_text
        return text if image_text is None else text.replace(self.spec.image_token, image_text)

    def _token(self, token_id: int | None) -> str:
        return (self.tokenizer.id_to_token(token_id) or "") if token_id is not None else ""

    def build(self, question: str, max_tokens: int | None = None, limit: str = "context", images: int = 1) -> Prompt:
        """One user turn: the images, then the question."""
        if not isinstance(question, str) or not question.strip():
            raise InvalidInputError("prompt is empty")
        content = [*({"type": "image"} for _ in range(images)), {"type": "text", "text": question}]
        return self.build_chat([{"role": "user", "content": content}], max_tokens, limit)

    def build_chat(self, messages: list[dict[str, Any]], max_tokens: int | None = None,
                   limit: str = "context") -> Prompt:
        """A conversation in transformers' format (content: a list of {"type": "image"} and
        {"type": "text", "text": ...} parts) holding any number of images, in any of its messages;
        the question is the text of the last message, which must be the user's. Past `max_tokens`
        (`limit` names that bound in the message) it is refused, by its length in characters when
        that alone proves it, before any templating or tokenizing."""
        if not messages or messages[-1].get("role") != "user":
            raise InvalidInputError("the conversation must end with a user message")
        texts = [part["text"] for part in messages[-1]["content"] if part.get("type") == "text"]
        if not any(text.strip() for text in texts):
            raise InvalidInputError("the last user message has no text: nothing to ask about the image")
        if max_tokens is not None:
            self._check_characters(messages, max_tokens, limit)
        text = self._expand_images(self.render(messages))
        spans = self._question_spans(messages, texts)
        if any(text[start:end] != question for (start, end), question in zip(spans, texts)):
            raise BundleError("chat template does not place the user's text verbatim; cannot mark the question")
        encoding = self.tokenizer.encode(text, add_special_tokens=self.spec.add_special_tokens)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        image_positions = np.flatnonzero(ids == self.spec.image_token_id)
        images = sum(part.get("type") == "image" for message in messages
                     if isinstance(message.get("content"), list) for part in message["content"])
        if len(image_positions) != images:
            raise InvalidInputError(
                f"the prompt holds {len(image_positions)} image placeholders after templating for {images} images"
                f" (remove {self.spec.image_token!r} from the prompt text)"
            )
        if max_tokens is not None and len(ids) > max_tokens:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens, over the {limit} of {max_tokens}")
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        special = np.asarray(encoding.special_tokens_mask, dtype=bool)
        in_question = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            in_question |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
        return Prompt(ids, (in_question & ~special).astype(np.int64), tuple(int(at) for at in image_positions))

    def _check_characters(self, messages: list[dict[str, Any]], max_tokens: int, limit: str) -> None:
        characters = sum(_text_length(message.get("content") or "") for message in messages)
        if characters > max_tokens * self.max_token_chars:
            raise PromptTooLong(f"the prompt's text is {characters:,} characters, more than the {limit} of "
                                f"{max_tokens} tokens can hold ({self.max_token_chars} characters at most per token)")

    def _question_spans(self, messages: list[dict[str, Any]], texts: list[str]) -> list[tuple[int, int]]:
        """Character spans of the last message's text parts in the rendered prompt, found by
        rendering numbered sentinels in their place."""
        nonce = secrets.token_hex(8)
        sentinels = (_sentinel(nonce, i) for i in range(len(texts)))
        content = messages[-1]["content"]
        last = {**messages[-1], "content": [
            {**part, "text": next(sentinels)} if part.get("type") == "text" else part for part in content
        ]}
        marked = self._expand_images(self.render([*messages[:-1], last]))
        spans, shift, search_from = [], 0, 0
        for i, question in enumerate(texts):
            sentinel = _sentinel(nonce, i)
            found = marked.find(sentinel, search_from)
            if found < 0:
                raise BundleError("chat template does not render the user's text; cannot mark the question")
            spans.append((found + shift, found + shift + len(question)))
            shift += len(question) - len(sentinel)
            search_from = found + len(sentinel)
        return spans

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` alone, no special tokens: an answer to append after the prompt."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def token_text(self, token_id: int) -> str:
        """One token's text as logprobs show it: special tokens included, a partial UTF-8
        sequence as the replacement character."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
