"""Fuzzing, bounded: schemathesis drives every route of a real zspa-serve from its own OpenAPI
document (valid and invalid requests alike) and hypothesis drives the parsers underneath."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed (the dev extra has it)")

import copy  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from zspa.errors import BundleError, InvalidInputError  # noqa: E402
from zspa.manifest import Manifest  # noqa: E402
from zspa.runtime.images import load_image  # noqa: E402
from zspa.runtime.server.errors import APIError  # noqa: E402
from zspa.runtime.server.image_urls import image_bytes  # noqa: E402
from zspa.testing import running_server  # noqa: E402

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def fuzzed_server(tiny_bundle, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-fuzz") / "server.log"
    with running_server(tiny_bundle, log, "--served-model-name", "tiny", "--request-timeout", "10",
                        "--default-max-tokens", "2", "--max-body-bytes", "200000") as running:
        yield running
    assert "Traceback" not in log.read_text()  # nothing the fuzzer sent reached an unhandled error


def _operations(server):
    loaded = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    return {f"{op.method.upper()} {op.path}": op for op in (result.ok() for result in loaded.get_all_operations())}


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_every_route_answers_within_its_schema_without_5xx(fuzzed_server, mode):
    """Per route and mode, 40 generated requests: no 5xx, status codes and bodies as documented,
    invalid requests refused (4xx), and no traceback in any body."""
    operations = _operations(fuzzed_server)
    assert set(operations) >= {"POST /v1/chat/completions", "GET /v1/models", "GET /health", "GET /ready",
                               "GET /metrics"}  # schemathesis leaves out the schema's own route
    for operation in operations.values():
        if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
            continue  # no parameters: nothing to make invalid
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def exchange(case):
            response = case.call(base_url=fuzzed_server.url, timeout=30)
            case.validate_response(response, checks=CHECKS)
            assert "Traceback" not in response.text

        exchange()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 12), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256) | st.builds(lambda cut, flips: _damaged(PNG, cut, flips),
                                           st.integers(0, len(PNG)), st.lists(st.integers(0, len(PNG) * 8 - 1))))
def test_image_decoding_only_ever_refuses_with_a_clear_error(data):
    try:
        image = load_image(data, max_pixels=10_000)
    except InvalidInputError as exc:
        assert str(exc).startswith("image bytes: ")
    else:
        assert image.mode == "RGB" and image.size[0] * image.size[1] <= 10_000


def _damaged(data: bytes, cut: int, flips: list[int]) -> bytes:
    damaged = bytearray(data[:cut] if cut else data)
    for bit in flips:
        if bit // 8 < len(damaged):
            damaged[bit // 8] ^= 1 << (bit % 8)
    return bytes(damaged)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=64), st.builds(lambda mime, params, body: f"data:{mime}{params},{body}",
                                                 st.sampled_from(["image/png", "image/jpeg", "", "text/html"]),
                                                 st.sampled_from([";base64", "", ";charset=x;base64"]),
                                                 st.text(max_size=40))))
def test_image_urls_only_ever_refuse_with_a_400(url):
    try:
        data, formats = image_bytes(url, "url", max_bytes=1000, remote=None)
    except APIError as error:
        assert error.status == 400 and error.param == "url" and error.message
    else:
        assert isinstance(data, bytes) and formats


@pytest.fixture(scope="module")
def manifest_data(tiny_bundle):
    return json.loads((tiny_bundle / "manifest.json").read_text())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_manifest_parsing_only_ever_refuses_with_a_bundle_error(manifest_data, data):
    """Tampered manifests: any field replaced by any JSON value, or removed."""
    edited = copy.deepcopy(manifest_data)
    for _ in range(data.draw(st.integers(1, 3))):
        parent, key = _random_field(edited, data)
        if data.draw(st.booleans()):
            parent[key] = data.draw(JSON)
        elif isinstance(parent, dict):
            parent.pop(key)
    try:
        Manifest.from_dict(edited)
    except BundleError as exc:
        assert "manifest" in str(exc)


def _random_field(tree, data):
    """A (container, key) somewhere in the JSON tree, walked from the root."""
    parent, key = None, None
    node = tree
    while isinstance(node, (dict, list)) and node and (parent is None or data.draw(st.booleans())):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, data.draw(st.sampled_from(keys))
        node = node[key]
    return (parent, key) if parent is not None else (tree, next(iter(tree)))


HOSTILE_TEXT = st.lists(st.sampled_from(["\x00zspa-question-0\x00", "\x00zspa-question-1\x00", "\ud800", "\udfff",
                                         "<image>", "{{ x }}", "\x00", "ok", " ", "é", "\U0001f600"]),
                        max_size=6).map("".join)
HUGE_NUMBER = st.integers(4300, 6000).map(lambda digits: "9" * digits)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(HOSTILE_TEXT, min_size=1, max_size=3), number=st.none() | HUGE_NUMBER,
       field=st.sampled_from(["seed", "max_tokens", "top_k", "temperature", "keep"]))
def test_hostile_bodies_are_400s_or_prompts(pipeline, texts, number, field):
    """Lone surrogates, the question markers, NULs and template syntax in any turn, a number past
    Python's 4,300-digit limit in any numeric field: parse_body refuses with a 400, or the prompt
    builds (the markers are text); nothing else escapes."""
    from zspa.runtime.server.protocol import parse_body

    turns = [{"role": role, "content": text} for role, text in zip(["user", "assistant"] * 2, texts[:-1])]
    last = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
                                        {"type": "text", "text": texts[-1] or "?"}]}
    body = json.dumps({"model": "tiny", "messages": [*turns, last]})
    if number is not None:
        body = body[:-1] + f', "{field}": {number}}}'
    try:
        request = parse_body(body.encode("utf-8", "surrogatepass"))
    except APIError as error:
        assert error.status == 400 and error.message
        return
    messages = [{"role": m.role, "content": [{"type": "text", "text": m.content}] if isinstance(m.content, str) else
                 [{"type": "image"} if p.type == "image_url" else {"type": "text", "text": p.text} for p in m.content]}
                for m in request.messages]
    try:
        prompt = pipeline.prompts.build_chat(messages, max_tokens=2048)
    except InvalidInputError:
        return  # "no text", "image placeholders": the client's to fix
    assert prompt.question_mask.sum() >= 1  # the last turn's text is the question, markers or not
    image_id = pipeline.bundle.manifest.text.image_token_id
    assert [prompt.input_ids[at] for at in prompt.image_positions] == [image_id] * (prompt.input_ids == image_id).sum()


_SHAPES_PEAK = """
import json, resource, sys
from pathlib import Path
import numpy as np
from PIL import Image
from zspa.errors import InvalidInputError
from zspa.manifest import Manifest
from zspa.runtime.images import load_image
from zspa.runtime.vision_kinds import prepare_vision
spec = Manifest.read(Path(sys.argv[1])).vision
prepare_vision(load_image(Image.new("RGB", (64, 48))), spec)
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
idle, answered, refused = peak(), 0, 0
for width, height in json.loads(sys.argv[2]):
    try:
        vision = prepare_vision(load_image(Image.new("RGB", (width, height), (width % 256, 7, 9))), spec)
        assert vision.feeds["pixel_values"].shape == (1, 3, 336, 336)
        answered += 1
    except InvalidInputError as exc:
        assert "aspect ratio over 200:1" in str(exc), exc
        refused += 1
print(json.dumps([peak() - idle, answered, refused]))
"""


@settings(max_examples=1, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.integers(1, 30_000), st.integers(1, 200)).map(
    lambda wh: wh if wh[0] % 2 else wh[::-1]), min_size=60, max_size=60))
def test_extreme_aspect_ratios_stay_within_100_mb(tiny_bundle, shapes):
    """60 shapes from 1×1 to 30,000×200 either way round, in one process: every one refused by its
    aspect ratio or preprocessed to 336², and the process's high-water mark ≤ 100 MB over idle."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _SHAPES_PEAK, str(tiny_bundle / "manifest.json"), json.dumps(shapes)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    peak_mb, answered, refused = json.loads(run.stdout)
    assert peak_mb <= 100 and answered + refused == len(shapes)
