"""Rendering Hugging Face chat templates with plain jinja2, as transformers does, without it.

transformers compiles templates in an immutable sandbox with `trim_blocks`, `lstrip_blocks`,
loop controls, a `raise_exception` global and a `{% generation %}` tag (which marks assistant
text for training masks and renders its body unchanged). Templates shipped with models use all
of these, so the runtime supports the same set.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
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


@functools.lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: dt.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise BundleError(f"manifest.json: chat template does not compile ({exc})") from None


def render(source: str, messages: list[dict[str, Any]], **variables: Any) -> str:
    return compile_template(source).render(messages=messages, **variables)
