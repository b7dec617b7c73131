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
from zspa.runtime.detokenize import Detokenizer, make_detokenizer


class PromptTooLong(InvalidInputError):
    """The prompt is over its token limit (told by its characters, or by its tokens)."""


def _text_length(content: str | list[dict[str, Any]]) -> int:
    """Characters of a message's text: a string, or the text parts of a content list."""
    return len(content) if isinstance(content, str) else sum(len(part.get("text") or "") for part in content)


def _sentinel(nonce: str, index: int) -> str:
    """A marker standing in for the question's index-th text part; the per-call nonce keeps a
    client who types a marker into a message from being taken for the question."""
    return f"\x00zspa-question-{nonce}-{index}\x00"


def check_question(question: object) -> None:
    """A question is a string with something besides whitespace."""
    if not isinstance(question, str) or not question.strip():
        raise InvalidInputError("prompt is empty")


@dataclass(frozen=True)
class Prompt:
    input_ids: np.ndarray  # int64 [S], one placeholder token per image block
    question_mask: np.ndarray  # int64 [S], 1 on the question's tokens
    image_positions: tuple[int, ...]  # indices of the placeholders in input_ids, one per block in order
    # Blocks of each image in order (Gemma 3's pan&scan: the image and its crops); None: one each.
    views: tuple[int, ...] | None = None

    @property
    def image_views(self) -> tuple[int, ...]:
        """How many placeholders (blocks) each image has, in order."""
        return self.views if self.views is not None else (1,) * len(self.image_positions)

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

    @property
    def image_marker(self) -> str:
        """What the chat template writes for an image."""
        return self.spec.template_image or self.spec.image_token

    def _expand_images(self, text: str, views: tuple[int, ...] | None) -> str:
        """Each image as the family's processor writes it before tokenizing (InternVL wraps it in
        `<img>…</img>`; Gemma 3 writes each of its views' blocks, with pan&scan's text around
        them), one placeholder per block."""
        spec = self.spec
        if spec.image_text is None:
            return text
        parts = text.split(self.image_marker)
        views = views if views is not None and len(views) == len(parts) - 1 else (1,) * (len(parts) - 1)
        expanded = [parts[0]]
        for count, part in zip(views, parts[1:]):
            if count > 1 and spec.views_text is None:
                raise InvalidInputError(f"an image of {count} views, but this model shows each image as one")
            image = spec.image_text if count == 1 else spec.views_text.replace("{first}", spec.image_text).replace(
                "{rest}", " ".join([spec.image_text] * (count - 1)))
            expanded += [image, part]
        return "".join(expanded)

    def _token(self, token_id: int | None) -> str:
        return (self.tokenizer.id_to_token(token_id) or "") if token_id is not None else ""

    def build(self, question: str, max_tokens: int | None = None, limit: str = "context", images: int = 1,
              views: tuple[int, ...] | None = None) -> Prompt:
        """One user turn: the images, then the question."""
        check_question(question)
        content = [*({"type": "image"} for _ in range(images)), {"type": "text", "text": question}]
        return self.build_chat([{"role": "user", "content": content}], max_tokens, limit, views)

    def build_chat(self, messages: list[dict[str, Any]], max_tokens: int | None = None,
                   limit: str = "context", views: tuple[int, ...] | None = None) -> Prompt:
        """A conversation in transformers' format (content: a list of {"type": "image"} and
        {"type": "text", "text": ...} parts) holding any number of images, in any of its messages;
        the question is the text of the last message, which must be the user's. Past `max_tokens`
        (`limit` names that bound in the message) it is refused, by its length in characters when
        that alone proves it, before any templating or tokenizing. `views`: each image's blocks
        (`VisionInput.views`, known once it is preprocessed; None: one each)."""
        if not messages or messages[-1].get("role") != "user":
            raise InvalidInputError("the conversation must end with a user message")
        texts = [part["text"] for part in messages[-1]["content"] if part.get("type") == "text"]
        if not any(text.strip() for text in texts):
            raise InvalidInputError("the last user message has no text: nothing to ask about the image")
        if max_tokens is not None:
            self._check_characters(messages, max_tokens, limit)
        images = sum(part.get("type") == "image" for message in messages
                     if isinstance(message.get("content"), list) for part in message["content"])
        views = tuple(views) if views is not None else (1,) * images
        if len(views) != images:
            raise InvalidInputError(f"views for {len(views)} images given for a conversation of {images}")
        text = self._expand_images(self.render(messages), views)
        spans = self._question_spans(messages, texts, text, views)
        encoding = self.tokenizer.encode(text, add_special_tokens=self.spec.add_special_tokens)
        ids = np.asarray(encoding.ids, dtype=np.int64)
        image_positions = np.flatnonzero(ids == self.spec.image_token_id)
        if len(image_positions) != sum(views):
            typed = " or ".join(repr(t) for t in dict.fromkeys((self.image_marker, self.spec.image_token)))
            raise InvalidInputError(
                f"the prompt holds {len(image_positions)} image placeholders after templating for {images} images"
                f" (remove {typed} from the prompt text)"
            )
        if max_tokens is not None and len(ids) > max_tokens:
            raise PromptTooLong(f"the prompt is {len(ids)} tokens, over the {limit} of {max_tokens}")
        offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        special = np.asarray(encoding.special_tokens_mask, dtype=bool)
        in_question = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            in_question |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
        return Prompt(ids, (in_question & ~special).astype(np.int64), tuple(int(at) for at in image_positions), views)

    def _check_characters(self, messages: list[dict[str, Any]], max_tokens: int, limit: str) -> None:
        characters = sum(_text_length(message.get("content") or "") for message in messages)
        if characters > max_tokens * self.max_token_chars:
            raise PromptTooLong(f"the prompt's text is {characters:,} characters, more than the {limit} of "
                                f"{max_tokens} tokens can hold ({self.max_token_chars} characters at most per token)")

    def _question_spans(self, messages: list[dict[str, Any]], texts: list[str], text: str,
                        views: tuple[int, ...]) -> list[tuple[int, int]]:
        """Character spans of the last message's text parts in the rendered prompt `text`, found
        by rendering numbered sentinels in their place. A part may be rendered trimmed (Gemma's
        template trims text parts); anything else is refused."""
        nonce = secrets.token_hex(8)
        sentinels = (_sentinel(nonce, i) for i in range(len(texts)))
        content = messages[-1]["content"]
        last = {**messages[-1], "content": [
            {**part, "text": next(sentinels)} if part.get("type") == "text" else part for part in content
        ]}
        marked = self._expand_images(self.render([*messages[:-1], last]), views)
        spans, shift, search_from = [], 0, 0
        for i, question in enumerate(texts):
            sentinel = _sentinel(nonce, i)
            found = marked.find(sentinel, search_from)
            if found < 0:
                raise BundleError("chat template does not render the user's text; cannot mark the question")
            start = found + shift
            rendered = next((form for form in (question, question.strip()) if text.startswith(form, start)), None)
            if rendered is None:
                raise BundleError("chat template does not place the user's text verbatim; cannot mark the question")
            spans.append((start, start + len(rendered)))
            shift += len(rendered) - len(sentinel)
            search_from = found + len(sentinel)
        return spans

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def detokenizer(self) -> Detokenizer:
        """An answer's incremental text (`runtime/detokenize.py`)."""
        return make_detokenizer(self.tokenizer, self.decode)

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` alone, no special tokens: an answer to append after the prompt."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def token_text(self, token_id: int) -> str:
        """One token's text as logprobs show it: special tokens included, a partial UTF-8
        sequence as the replacement character."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)
