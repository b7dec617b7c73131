"""Chat template rendering and question marking without transformers."""

from __future__ import annotations

import pytest

from zspa.errors import InvalidInputError
from zspa.runtime.chat_template import render


def test_template_renders_like_transformers(tiny_hf, pipeline):
    _, processor = tiny_hf
    for question in ["What is this?", "  spaces  around ", "ünïcödé — and \"quotes\"\nnew line"]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        assert pipeline.prompts.render(messages) == processor.apply_chat_template(messages, add_generation_prompt=True)


def test_conversation_marks_only_the_last_user_text(tiny_hf, pipeline):
    """System prompt, an earlier turn with the image, an answer, then the question in two parts."""
    _, processor = tiny_hf
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "You describe photos."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A kitchen."}]},
        {"role": "user", "content": [{"type": "text", "text": "Which colour"},
                                     {"type": "text", "text": "is the kettle?"}]},
    ]
    prompt = pipeline.prompts.build_chat(messages)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert pipeline.prompts.render(messages) == text
    assert prompt.input_ids.tolist() == processor.tokenizer(text)["input_ids"]
    marked = pipeline.prompts.decode(prompt.input_ids[prompt.question_mask == 1].tolist())
    assert marked.split() == "Which colour is the kettle?".split()


@pytest.mark.parametrize("messages, problem", [
    ([{"role": "assistant", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], "end with a user"),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "  "}]}], "no text"),
    ([{"role": "user", "content": [{"type": "text", "text": "an <image> typed in"}]}],
     "1 image placeholders .* 0 images"),
    ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "<image> again"}]}],
     "2 image placeholders .* 1 images"),
])
def test_bad_conversations_are_refused(pipeline, messages, problem):
    with pytest.raises(InvalidInputError, match=problem):
        pipeline.prompts.build_chat(messages)


def test_question_mask_covers_exactly_the_question(pipeline):
    question = "Which colour is the umbrella?"
    prompt = pipeline.prompts.build(question)
    marked = prompt.input_ids[prompt.question_mask == 1].tolist()
    assert pipeline.prompts.decode(marked).strip() == question
    (at,) = prompt.image_positions
    assert prompt.question_mask[: at + 1].sum() == 0  # template and image are not question
    assert prompt.input_ids[at] == pipeline.bundle.manifest.text.image_token_id


def test_generation_tag_and_raise_exception_are_supported():
    template = "{% generation %}{{ messages[0]['content'] }}{% endgeneration %}"
    assert render(template, [{"content": "hi"}]) == "hi"
    with pytest.raises(InvalidInputError, match="no system role"):
        render("{{ raise_exception('no system role') }}", [])


@pytest.mark.parametrize("bad", ["", "   ", "look: <image> twice"])
def test_bad_prompts_are_refused(pipeline, bad):
    with pytest.raises(InvalidInputError):
        pipeline.prompts.build(bad)


def test_overlong_prompts_are_refused_before_templating_or_tokenizing(pipeline, monkeypatch):
    """A text of more characters than `max_tokens` tokens can hold never reaches the template or the
    tokenizer (a 30 MB prompt took 71 s of tokenizing before its 400); one just under is counted."""
    from zspa.runtime import prompting

    calls = []

    class CountingTokenizer:
        def __init__(self, tokenizer):
            self.tokenizer = tokenizer

        def encode(self, *args, **kwargs):
            calls.append("encode")
            return self.tokenizer.encode(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.tokenizer, name)

    builder = prompting.PromptBuilder(CountingTokenizer(pipeline.prompts.tokenizer), pipeline.prompts.spec)
    monkeypatch.setattr(prompting, "render", lambda *a, **k: calls.append("render") or render(*a, **k))
    limit = 50
    bound = limit * builder.max_token_chars
    assert builder.max_token_chars == max(len(t) for t in pipeline.prompts.tokenizer.get_vocab(with_added_tokens=True))
    too_long = f"{bound + 1:,} characters, more than the context of 50 tokens"
    with pytest.raises(prompting.PromptTooLong, match=too_long):
        builder.build("x" * (bound + 1), max_tokens=limit)
    with pytest.raises(prompting.PromptTooLong, match="more than the context of 50 tokens"):
        builder.build("x" * 30_000_000, max_tokens=limit)
    assert calls == []
    with pytest.raises(prompting.PromptTooLong, match=r"the prompt is \d+ tokens, over the context of 50"):
        builder.build("x " * 60, max_tokens=limit)  # few characters, many tokens: counted
    assert calls == ["render", "render", "encode"]  # the template, the question markers, the tokenizer
    assert len(builder.build("x " * 10, max_tokens=limit).input_ids) <= limit


def test_a_typed_question_marker_is_text_like_any_other(pipeline):
    """The question's markers carry a per-call nonce: a client typing the old fixed marker into an
    earlier message gets an answer, not a 'bundle fault'."""
    marker = "\x00zspa-question-0\x00"
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"first {marker} turn"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": [{"type": "text", "text": "What is it?"}]},
    ]
    prompt = pipeline.prompts.build_chat(messages)
    marked = pipeline.prompts.decode(prompt.input_ids[prompt.question_mask == 1].tolist())
    assert marked.strip() == "What is it?"


@pytest.mark.parametrize("template, problem", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", "loop steps"),
    ("{{ 'x' * 10**9 }}", "'\\*' would build"),
    ("{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "'\\+'"),
    ("{{ 10 ** 100000 }}", "'\\*\\*'"),
])
def test_a_hostile_chat_template_is_stopped_within_its_budget(template, problem):
    """Nested ranges took hours, a doubling string all memory: each is a bundle error in well under
    the 2 s render limit."""
    import time

    from zspa.errors import BundleError

    started = time.monotonic()
    with pytest.raises(BundleError, match=problem):
        render(template, [{"content": "hi"}])
    assert time.monotonic() - started < 2.0
    assert render("{% for i in range(3) %}{{ i }}{% endfor %}", []) == "012"  # loops still work


def test_images_in_several_turns_are_placed_in_order(tiny_hf, pipeline):
    """An image in an earlier turn and two in the last: three placeholders where transformers'
    template puts them, the text runs around them, and only the last turn's text marked."""
    _, processor = tiny_hf
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A kitchen."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And these two?"}, {"type": "image"}]},
    ]
    prompt = pipeline.prompts.build_chat(messages)
    ids = prompt.input_ids.tolist()
    assert ids == processor.tokenizer(processor.apply_chat_template(messages, add_generation_prompt=True))["input_ids"]
    image_id = pipeline.bundle.manifest.text.image_token_id
    assert list(prompt.image_positions) == [i for i, token in enumerate(ids) if token == image_id]
    assert len(prompt.image_positions) == 3 and sum(prompt.text_runs) == len(ids) - 3
    assert pipeline.prompts.decode(prompt.input_ids[prompt.question_mask == 1].tolist()).strip() == "And these two?"
