"""Rendering Hugging Face chat templates with plain jinja2, as transformers does, without it.

transformers compiles templates in an immutable sandbox with `trim_blocks`, `lstrip_blocks`,
loop controls, a `raise_exception` global and a `{% generation %}` tag (which marks assistant
text for training masks and renders its body unchanged). Templates shipped with models use all
of these, so the runtime supports the same set.

A template comes from the bundle, so a tampered one must not hang or exhaust the service: each
rendering has a budget of loop steps (`range` items), a time limit checked at every step and
every output chunk, and a size limit on what it writes and on strings or lists it multiplies,
adds or raises to powers (jinja2's sandbox bounds one `range` only, not nested ones).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import threading
import time
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from zspa.errors import BundleError, InvalidInputError


class GenerationTag(Extension):
    """`{% generation %}…{% endgeneration %}` renders its body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


def _raise(message: str) -> None:
    raise InvalidInputError(f"chat template: {message}")


MAX_LOOP_STEPS = 100_000  # range() items in one rendering (real templates loop over messages)
MAX_RENDER_S = 2.0
MAX_RENDERED_CHARS = 64 * 1024 * 1024  # what one rendering writes, and any string or list it builds


class _Budget(threading.local):
    steps = 0
    deadline = 0.0

    def spend(self, steps: int) -> None:
        self.steps += steps
        if self.steps > MAX_LOOP_STEPS:
            raise BundleError(f"chat template: over {MAX_LOOP_STEPS:,} loop steps in one rendering")
        if time.monotonic() > self.deadline:
            raise BundleError(f"chat template: rendering took over {MAX_RENDER_S:g} s")


_budget = _Budget()


def _budgeted_range(*args: int):
    for value in range(*args):
        _budget.spend(1)
        yield value


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        sizes = [len(v) for v in (left, right) if isinstance(v, (str, list, tuple))]
        counts = [v for v in (left, right) if isinstance(v, int) and not isinstance(v, bool)]
        too_big = ((operator == "*" and sizes and counts and sizes[0] * max(counts[0], 0) > MAX_RENDERED_CHARS)
                   or (operator == "+" and sum(sizes) > MAX_RENDERED_CHARS)
                   or (operator == "**" and len(counts) == 2 and abs(counts[1]) > 1024))
        if too_big:
            raise BundleError(f"chat template: {operator!r} would build a value over the rendering's size limit")
        return super().call_binop(context, operator, left, right)


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = _BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.globals["range"] = _budgeted_range
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: dt.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise BundleError(f"manifest.json: chat template does not compile ({exc})") from None


def render(source: str, messages: list[dict[str, Any]], **variables: Any) -> str:
    _budget.steps, _budget.deadline = 0, time.monotonic() + MAX_RENDER_S
    parts, size = [], 0
    for chunk in compile_template(source).generate(messages=messages, **variables):
        size += len(chunk)
        if size > MAX_RENDERED_CHARS:
            raise BundleError(f"chat template: the rendering is over {MAX_RENDERED_CHARS:,} characters")
        _budget.spend(0)
        parts.append(chunk)
    return "".join(parts)
