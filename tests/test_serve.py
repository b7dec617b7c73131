"""`zspa-serve` as clients meet it: a real uvicorn process, the official `openai` client, raw HTTP."""

from __future__ import annotations

import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from zspa.testing import chat_body, data_url, running_server

API_KEY = "test-key"
MODEL = "tiny"
LONG = {"ignore_eos": True, "max_tokens": 12000}  # a generation of seconds on the long-context bundle


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    """The tiny bundle behind an API key, with small limits the tests can cross cheaply."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with running_server(tiny_bundle, log, "--served-model-name", MODEL, "--max-image-bytes", "300000",
                        "--max-image-pixels", "4000000", "--max-body-bytes", "1000000", "--max-prompt-tokens", "200",
                        env={"ZSPA_API_KEY": API_KEY}) as running:
        yield running


@pytest.fixture(scope="module")
def long_bundle(tmp_path_factory):
    """A tiny model with a 16k context and 64 visual tokens, so that one generation lasts seconds."""
    from zspa.export.exporter import ExportOptions, export_bundle
    from zspa.export.tiny import build_model, build_processor

    workdir = tmp_path_factory.mktemp("long")
    processor = build_processor(image_size=112)
    build_model(processor, image_size=112, max_context=16384).save_pretrained(workdir / "model")
    processor.save_pretrained(workdir / "model")
    export_bundle(ExportOptions(str(workdir / "model"), workdir / "bundle", keeps=[0.25], progress=False))
    return workdir / "bundle"


@pytest.fixture(scope="module")
def busy_server(long_bundle, tmp_path_factory):
    """Two rows decoding, one waiting slot, a 2-second timeout, remote images allowed (loopback ones too)."""
    log = tmp_path_factory.mktemp("serve-busy") / "server.log"
    with running_server(long_bundle, log, "--served-model-name", MODEL, "--max-batch", "2", "--max-queue", "1",
                        "--request-timeout", "2",
                        "--allow-remote-images", "--allow-private-image-hosts") as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def photo_url(photo_path):
    return data_url(photo_path.read_bytes())


def _post(server, body, *, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60, **kwargs)


def _messages(photo_url, text):
    return chat_body(photo_url, text)["messages"]


def test_openai_client_answers_like_the_pipeline(client, pipeline, photo_path, photo_url):
    response = client.chat.completions.create(model=MODEL, messages=_messages(photo_url, "Describe it."),
                                              temperature=0, max_tokens=12)
    expected = pipeline.generate(photo_path, "Describe it.", max_new_tokens=12)
    assert response.choices[0].message.content == expected.text
    assert response.choices[0].finish_reason == expected.finish_reason
    usage = response.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.stats.prompt_tokens, len(expected.token_ids))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.model_extra == {"visual_tokens_total": 576, "visual_tokens_kept": 58}


def test_streaming_matches_the_plain_answer_and_reports_usage(client, photo_url):
    messages = _messages(photo_url, "What colour is it?")
    plain = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=10,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_several_images_over_several_turns_answer_like_the_pipeline(client, pipeline, photo_path, rgba_png_path):
    """Two images in the last turn and one in an earlier turn: each its own block, kept per image,
    answered as the pipeline answers the same conversation."""
    urls = [data_url(Path(path).read_bytes(), mime) for path, mime in
            [(photo_path, "image/jpeg"), (rgba_png_path, "image/png")]]
    messages = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": urls[1]}},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A shape."},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image_url", "image_url": {
            "url": urls[0]}}, {"type": "text", "text": "with"}, {"type": "image_url", "image_url": {"url": urls[1]}}]},
    ]
    response = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8,
                                              extra_body={"keep": 0.25})
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A shape."}]},
            {"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"},
                                         {"type": "text", "text": "with"}, {"type": "image"}]}]
    expected = pipeline.generate([rgba_png_path, photo_path, rgba_png_path], pipeline.prompts.build_chat(chat),
                                 keep=0.25, max_new_tokens=8)
    assert response.choices[0].message.content == expected.text
    assert response.usage.model_extra == {"visual_tokens_total": 3 * 576, "visual_tokens_kept": 3 * 144}


def test_logprobs_follow_openai_streamed_or_not(client, pipeline, photo_path, photo_url):
    """logprobs / top_logprobs: one entry per answer token with OpenAI's fields, the pipeline's
    values; the stream's chunks carry the same entries in order (batching on)."""
    messages = _messages(photo_url, "Describe it.")
    plain = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8,
                                           logprobs=True, top_logprobs=2)
    expected = pipeline.generate(photo_path, "Describe it.", max_new_tokens=8, logprobs=2)
    content = plain.choices[0].logprobs.content
    assert [entry.token for entry in content] == [pipeline.prompts.token_text(t) for t in expected.token_ids]
    for entry, ours in zip(content, expected.logprobs, strict=True):
        assert entry.logprob == pytest.approx(ours.logprob) and entry.bytes == list(entry.token.encode())
        assert [top.token for top in entry.top_logprobs] == [pipeline.prompts.token_text(t) for t, _ in ours.top]
        assert [top.logprob for top in entry.top_logprobs] == pytest.approx([value for _, value in ours.top])
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=8,
                                                 logprobs=True, top_logprobs=2, stream=True))
    streamed = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    without = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=2)
    assert without.choices[0].logprobs is None


def test_a_request_without_images_is_answered_as_text(client, pipeline):
    response = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}],
                                              temperature=0, max_tokens=6)
    expected = pipeline.generate([], "Say hi.", max_new_tokens=6)
    assert response.choices[0].message.content == expected.text and expected.token_ids
    assert response.usage.model_extra == {"visual_tokens_total": 0, "visual_tokens_kept": 0}


def test_keep_and_pruning_method_select_the_pruner(client, photo_url):
    def kept(**extra):
        response = client.chat.completions.create(model=MODEL, messages=_messages(photo_url, "hi"), max_tokens=2,
                                                  extra_body=extra)
        return response.usage.model_extra["visual_tokens_kept"]

    assert (kept(keep=1.0), kept(keep=0.25, pruning_method="zspa"), kept()) == (576, 144, 58)


def test_a_gif_is_answered_like_the_pipeline(client, pipeline, photo_path):
    gif = _encoded(Image.open(photo_path).convert("RGB"), "GIF")
    response = client.chat.completions.create(model=MODEL, messages=_messages(data_url(gif, "image/gif"), "What?"),
                                              temperature=0, max_tokens=6)
    assert response.choices[0].message.content == pipeline.generate(gif, "What?", max_new_tokens=6).text


def test_models_lists_the_bundle(client, tiny_bundle):
    (model,) = client.models.list().data
    assert model.id == MODEL and model.model_extra["pruning"] == {"zspa": [0.1, 0.25, 1.0]}
    assert model.created == int((tiny_bundle / "manifest.json").stat().st_mtime)  # when the export published it


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _png(image: Image.Image) -> bytes:
    return _encoded(image, "PNG")


def _jpeg(image: Image.Image) -> bytes:
    return _encoded(image, "JPEG")


def _with_image(url):
    return lambda body: {**body, "messages": _messages(url, "hi")}


IMAGE_PARAM = "messages[0].content[0].image_url.url"
NOISE = np.random.default_rng(0).integers(0, 256, (400, 400, 3), dtype=np.uint8)  # ~480 KB as PNG
BAD_REQUESTS = {
    "wrong type": (lambda b: {**b, "temperature": "hot"}, "temperature", "valid number"),
    "out of range": (lambda b: {**b, "top_p": 0}, "top_p", "greater than 0"),
    "unknown field": (lambda b: {**b, "tools": []}, "tools", "unknown field"),
    "missing messages": (lambda b: {k: v for k, v in b.items() if k != "messages"}, "messages", "required"),
    "keep not a number": (lambda b: {**b, "keep": "half"}, "keep", "valid number"),
    "keep out of range": (lambda b: {**b, "keep": 1.5}, "keep", "less than or equal to 1"),
    "keep true": (lambda b: {**b, "keep": True}, "keep", "valid number"),
    "max_tokens a string": (lambda b: {**b, "max_tokens": "4"}, "max_tokens", "valid integer"),
    "stream a string": (lambda b: {**b, "stream": "yes"}, "stream", "valid boolean"),
    "five stops": (lambda b: {**b, "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 items"),
    "unknown method": (lambda b: {**b, "pruning_method": "fastv"}, "pruning_method", "'fastv'"),
    "overlong stop": (lambda b: {**b, "stop": ["ok", "x" * 257]}, "stop[1]", "at most 256 characters"),
    "negative seed": (lambda b: {**b, "seed": -1}, "seed", "greater than or equal to 0"),
    "huge max_tokens": (lambda b: {**b, "max_tokens": 10**30}, "max_tokens", "less than or equal to"),
    "too many messages": (lambda b: {**b, "messages": [{"role": "user", "content": "hi"}] * 65}, "messages",
                          "at most 64 items"),
    "bad base64": (_with_image("data:image/png;base64,not*base64"), IMAGE_PARAM, "base64"),
    "not an image type": (_with_image("data:text/plain;base64,aGk="), IMAGE_PARAM, "text/plain"),
    "corrupt image": (_with_image(data_url(_png(Image.new("RGB", (64, 64)))[:60], "image/png")), IMAGE_PARAM,
                      "corrupt or truncated image"),
    "oversized image": (_with_image(data_url(_png(Image.fromarray(NOISE)), "image/png")), IMAGE_PARAM,
                        "300,000-byte limit"),
    "too many pixels": (_with_image(data_url(_png(Image.new("L", (2100, 2100))), "image/png")), IMAGE_PARAM,
                        "4,000,000-pixel limit"),
    "declared png, jpeg bytes": (_with_image(data_url(_jpeg(Image.new("RGB", (64, 64))), "image/png")), IMAGE_PARAM,
                                 "not a readable PNG image"),
    "tiff": (_with_image(data_url(_encoded(Image.new("RGB", (64, 64)), "TIFF"), "image/png")), IMAGE_PARAM,
             "not a readable PNG image"),
    "remote image": (_with_image("http://127.0.0.1:9/cat.png"), IMAGE_PARAM, "--allow-remote-images"),
    "animated gif": (_with_image(data_url(_encoded(Image.new("RGB", (64, 64)), "GIF", save_all=True, append_images=[
        Image.new("RGB", (64, 64), "red")]), "image/gif")), IMAGE_PARAM, "an animated GIF (2 frames)"),
    "6000x1 image (98 bytes)": (_with_image(data_url(_png(Image.new("RGB", (6000, 1))), "image/png")), IMAGE_PARAM,
                                "aspect ratio over 200:1"),
    "1x20000 image": (_with_image(data_url(_png(Image.new("L", (1, 20000))), "image/png")), IMAGE_PARAM,
                      "aspect ratio over 200:1"),
    "nine images": (lambda b: {**b, "messages": [{"role": "user", "content": [
        *[b["messages"][0]["content"][0]] * 9, {"type": "text", "text": "Which differ?"}]}]}, "messages",
        "carry 9 images (image_url content parts, every turn counted); this server takes at most 8 (--max-images)"),
    "images past the context": (lambda b: {**b, "keep": 1.0, "messages": [{"role": "user", "content": [
        *[b["messages"][0]["content"][0]] * 4, {"type": "text", "text": "Which differ?"}]}]}, "messages",
        "with its 4 images (2304 visual tokens), over the context"),
    "overlong prompt": (lambda b: {**b, "messages": _messages(b["messages"][0]["content"][0]["image_url"]["url"],
                                                              "word " * 300)}, "messages", "--max-prompt-tokens"),
    "prompt past the character bound": (lambda b: {**b, "messages": _messages(
        b["messages"][0]["content"][0]["image_url"]["url"], "x" * 200_000)}, "messages",
        "characters, more than the server's limit (--max-prompt-tokens) of 200"),
    "top_logprobs without logprobs": (lambda b: {**b, "top_logprobs": 2}, "top_logprobs",
                                      "top_logprobs needs logprobs: true"),
    "top_logprobs 21": (lambda b: {**b, "logprobs": True, "top_logprobs": 21}, "top_logprobs",
                        "less than or equal to 20"),
    "ends with the assistant": (lambda b: {**b, "messages": [*b["messages"], {"role": "assistant", "content": "x"}]},
                                "messages", "end with a user message"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=list(BAD_REQUESTS))
def test_bad_requests_get_400_naming_the_field(server, photo_url, case):
    change, param, words = BAD_REQUESTS[case]
    response = _post(server, change(chat_body(photo_url, max_tokens=2)))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"] and error["type"] == "invalid_request_error"


def test_malformed_and_oversized_bodies(server, photo_url):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    url = f"{server.url}/v1/chat/completions"
    malformed = httpx.post(url, content=b'{"model": "tiny", "messages": [', headers=headers)
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]["message"]
    not_object = httpx.post(url, content=b"[1, 2]", headers=headers)
    assert not_object.status_code == 400 and "JSON object" in not_object.json()["error"]["message"]
    nested = httpx.post(url, content=b"[" * 100_000 + b"]" * 100_000, headers=headers)
    assert nested.status_code == 400 and "nested too deeply" in nested.json()["error"]["message"]
    huge = _post(server, chat_body(photo_url, text="x" * 1_100_000))
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "body_too_large"
    wrong_model = _post(server, chat_body(photo_url, model="gpt-4o"))
    assert wrong_model.status_code == 404 and wrong_model.json()["error"]["param"] == "model"
    unknown_route = httpx.get(f"{server.url}/v1/engines")
    assert unknown_route.status_code == 404 and "error" in unknown_route.json()


def test_hostile_bodies_are_400s_without_tracebacks(server, photo_url):
    """Inputs that gave 500s: a 5,000-digit integer, a lone surrogate, the internal question marker
    in an earlier message (answered: it is text), a 30 MB prompt (refused by its characters)."""
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    url = f"{server.url}/v1/chat/completions"
    body = json.dumps(chat_body(photo_url, max_tokens=2))
    huge_int = httpx.post(url, content=body[:-1] + ', "seed": ' + "9" * 5000 + "}", headers=headers)
    assert huge_int.status_code == 400 and "number out of range" in huge_int.json()["error"]["message"]
    surrogate = httpx.post(url, content=body.replace("What is in the picture?", "\\ud800 hi"), headers=headers)
    error = surrogate.json()["error"]
    assert surrogate.status_code == 400 and "lone UTF-16 surrogate" in error["message"]
    assert error["param"] == "messages[0].content[1].text"
    marker = {"role": "assistant", "content": "\u0000zspa-question-0\u0000"}
    earlier = chat_body(photo_url, max_tokens=2)
    earlier["messages"] = [{"role": "user", "content": "hello"}, marker, *earlier["messages"]]
    assert _post(server, earlier).status_code == 200
    assert "Traceback" not in server.log.read_text()


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_missing_or_wrong_key_is_401(server, photo_url, key):
    response = _post(server, chat_body(photo_url, max_tokens=2), key=key)
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "none", max_retries=0).models.list()


def test_vision_cache_hits_show_in_metrics(server, client, photo_url):
    hits = server.metric('zspa_vision_cache_lookups_total{result="hit"}')
    for question in ("What is it?", "What colour is it?"):  # the same image twice: the second is a hit
        client.chat.completions.create(model=MODEL, messages=_messages(photo_url, question), temperature=0,
                                       max_tokens=1)
    assert server.metric('zspa_vision_cache_lookups_total{result="hit"}') >= hits + 1


def test_probes_and_metrics_need_no_key(server, client, photo_url):
    client.chat.completions.create(model=MODEL, messages=_messages(photo_url, "hi"), max_tokens=3)
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").json() == {"status": "ready"}
    assert server.metric('zspa_keep_ratio_requests_total{keep="0.1",method="zspa"}') >= 1
    assert server.metric('zspa_stage_seconds_count{stage="prune"}') >= 1
    assert server.metric("zspa_time_to_first_token_seconds_count") >= 1
    assert server.metric('zspa_visual_tokens_total{kind="total"}') >= 576


def test_image_preparation_is_bounded_by_its_own_semaphore(pipeline, photo_url, monkeypatch):
    """Eight request threads at once, --max-concurrent-images 2: at most two images are decoded and
    preprocessed at any moment (the thread pool alone let 40 do it, each with its own peak)."""
    from zspa.runtime import pipeline as pipeline_module
    from zspa.runtime.server import conversation
    from zspa.runtime.server.protocol import parse_body
    from zspa.runtime.server.settings import ServerSettings

    active, peak, lock = 0, 0, threading.Lock()
    decode = pipeline_module.load_image

    def slow_decode(*args, **kwargs):
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        time.sleep(0.05)
        try:
            return decode(*args, **kwargs)
        finally:
            with lock:
                active -= 1
    monkeypatch.setattr(pipeline_module, "load_image", slow_decode)
    settings = ServerSettings(MODEL, max_concurrent_images=2)
    slots = threading.BoundedSemaphore(settings.max_concurrent_images)
    body = parse_body(json.dumps(chat_body(photo_url, model=MODEL, max_tokens=1)).encode())
    with ThreadPoolExecutor(8) as pool:
        prepared = list(pool.map(lambda _: conversation.prepare(body, pipeline, settings, slots,
                                                                time.monotonic() + 60), range(8)))
    assert peak == 2 and len(prepared) == 8


def test_metrics_labels_are_bounded_and_the_metrics_key_is_required(pipeline, photo_url):
    """Keep values a client invents are counted as "other", not as a series each; with a metrics
    key, /metrics wants it and /health still does not."""
    from fastapi.testclient import TestClient

    from zspa.runtime.server.app import create_app
    from zspa.runtime.server.settings import ServerSettings

    with TestClient(create_app(pipeline, ServerSettings(MODEL, warmup=False, metrics_key="scrape"))) as http:
        for keep in (0.1, 0.123, 0.37, 0.2501):
            body = chat_body(photo_url, max_tokens=1, keep=keep)
            assert http.post("/v1/chat/completions", json=body).status_code == 200
        assert http.get("/metrics").status_code == 401
        assert http.get("/health").status_code == 200
        text = http.get("/metrics", headers={"Authorization": "Bearer scrape"}).text
    assert 'zspa_keep_ratio_requests_total{keep="other",method="zspa"} 3.0' in text
    assert 'zspa_keep_ratio_requests_total{keep="0.1",method="zspa"} 1.0' in text
    assert "0.123" not in text and "0.37" not in text


def test_concurrent_streams_complete_without_mixing(client, pipeline, photo_path, photo_url):
    """32 streams at once over 4 prompts: each stream's text is its own prompt's greedy answer."""
    prompts = ["What is this?", "Who is it?", "Where was it taken?", "Describe the colours."]
    expected = {p: pipeline.generate(photo_path, p, max_new_tokens=8).text for p in prompts}

    def stream(prompt: str) -> tuple[str, str, str | None, float]:
        started = time.perf_counter()
        first, text, finish = None, "", None
        for chunk in client.chat.completions.create(model=MODEL, messages=_messages(photo_url, prompt), stream=True,
                                                    temperature=0, max_tokens=8):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter() - started
                text += chunk.choices[0].delta.content
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
        return prompt, text, finish, first or time.perf_counter() - started

    with ThreadPoolExecutor(32) as pool:
        results = [f.result(timeout=120) for f in [pool.submit(stream, prompts[i % 4]) for i in range(32)]]
    for prompt, text, finish, _ in results:
        assert text == expected[prompt] and finish in ("stop", "length")
    ttft = np.array([r[3] for r in results]) * 1000
    print(f"\n32 concurrent streams: time to first token p50 {np.percentile(ttft, 50):.0f} ms, "
          f"p99 {np.percentile(ttft, 99):.0f} ms")


def test_full_queue_answers_429_with_retry_after(busy_server, photo_url):
    body = chat_body(photo_url, **LONG)
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda _: _post(busy_server, body, key=None), range(4)))
    statuses = sorted(r.status_code for r in responses)
    assert 429 in statuses and set(statuses) <= {200, 429, 504}, statuses
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1 and refused.json()["error"]["code"] == "queue_full"
    assert httpx.get(f"{busy_server.url}/ready").status_code == 200


def test_images_waiting_for_the_decoder_are_bounded_in_memory(long_bundle, photo_url, tmp_path):
    """--max-image-memory-mb fits one request's preprocessed image (188 kB) but not that and another
    request's kept tokens: with one row decoding (its tokens dropped once prefilled) and one waiting
    in the queue as its kept tokens, the next (its image reserved for its vision stage) is a 429;
    once they finish the memory is free again."""
    with running_server(long_bundle, tmp_path / "serve.log", "--served-model-name", MODEL, "--max-batch", "1",
                        "--max-image-memory-mb", "0.19") as server:
        body = chat_body(photo_url, ignore_eos=True, max_tokens=2000)
        with ThreadPoolExecutor(4) as pool:
            responses = list(pool.map(lambda _: _post(server, body, key=None), range(4)))
        refused = [r for r in responses if r.status_code == 429]
        assert refused and {r.status_code for r in responses} <= {200, 429}, [r.status_code for r in responses]
        assert all(r.json()["error"]["code"] == "image_memory_full" for r in refused)
        assert _post(server, chat_body(photo_url, max_tokens=2), key=None).status_code == 200


def test_a_request_whose_images_alone_pass_the_bound_is_a_400(pipeline, photo_url):
    from zspa.runtime.server import conversation
    from zspa.runtime.server.errors import APIError
    from zspa.runtime.server.protocol import parse_body
    from zspa.runtime.server.settings import ServerSettings

    body = parse_body(json.dumps(chat_body(photo_url, model=MODEL, max_tokens=1)).encode())
    settings = ServerSettings(MODEL, max_image_memory_bytes=1_000_000)  # one 336 px image: 1.7 MB preprocessed
    with pytest.raises(APIError) as refused:
        conversation.prepare(body, pipeline, settings, threading.BoundedSemaphore(1), time.monotonic() + 60)
    assert refused.value.status == 400 and "--max-image-memory-mb" in refused.value.body()["error"]["message"]


def test_timeout_gives_504_or_a_stream_error(busy_server, photo_url):
    response = _post(busy_server, chat_body(photo_url, **LONG), key=None)
    assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
    client = openai.OpenAI(base_url=f"{busy_server.url}/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.APIError, match="timed out"):
        for _ in client.chat.completions.create(model=MODEL, messages=_messages(photo_url, "hi"), stream=True,
                                                extra_body=LONG):
            pass


def _leave_mid_stream(server, body) -> None:
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=30, json={**body, "stream": True}) as r:
        lines = r.iter_lines()
        while '"content": ""' in next(line for line in lines if line.startswith("data:")):
            pass  # the role chunk; leave after the first generated text


def _give_up_waiting(server, body) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))


@pytest.mark.parametrize("leave", [_leave_mid_stream, _give_up_waiting], ids=["stream", "plain"])
def test_disconnect_stops_the_generation_and_frees_the_slot(busy_server, photo_url, leave):
    cancelled = 'zspa_generations_cancelled_total{reason="disconnect"}'
    before = busy_server.metric(cancelled)
    leave(busy_server, chat_body(photo_url, **LONG))
    deadline = time.monotonic() + 10
    while busy_server.metric(cancelled) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert busy_server.metric(cancelled) == before + 1  # stopped by the disconnect, before the 2 s timeout
    assert busy_server.metric("zspa_requests_running") == 0
    assert httpx.get(f"{busy_server.url}/ready").status_code == 200
    assert _post(busy_server, chat_body(photo_url, max_tokens=2), key=None).status_code == 200


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_remote_images_from_a_loopback_host_need_both_flags(busy_server, tiny_bundle, photo_path, tmp_path):
    http = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(photo_path.parent)))
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{http.server_address[1]}"
        with running_server(tiny_bundle, tmp_path / "public-only.log", "--served-model-name", MODEL,
                            "--allow-remote-images") as public_only:  # the default: public hosts only
            refused = _post(public_only, chat_body(f"{base}/{photo_path.name}", max_tokens=2), key=None)
            assert refused.status_code == 400 and refused.json()["error"]["code"] == "image_fetch_failed"
            assert "127.0.0.1 is not a public address" in public_only.log.read_text()
        fetched = _post(busy_server, chat_body(f"{base}/{photo_path.name}", max_tokens=2), key=None)
        assert fetched.status_code == 200, fetched.text
        missing = _post(busy_server, chat_body(f"{base}/missing.png", max_tokens=2), key=None)
        assert missing.status_code == 400 and missing.json()["error"]["code"] == "image_fetch_failed"
        assert "404" not in missing.text and "127.0.0.1" not in missing.text  # details stay in the log
        assert "HTTP 404" in busy_server.log.read_text()
    finally:
        http.shutdown()


def test_sigterm_drains_the_running_stream_then_exits(long_bundle, photo_url, tmp_path):
    with running_server(long_bundle, tmp_path / "server.log", "--served-model-name", MODEL) as server:
        body = chat_body(photo_url, stream=True, ignore_eos=True, max_tokens=3000)
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data:"))
            events = [next(lines), next(lines)]  # the role chunk and the first text: generation is under way
            server.process.send_signal(signal.SIGTERM)
            events += list(lines)
        assert events[-1] == "data: [DONE]"
        finish = json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"]
        assert finish == "length"
        assert server.process.wait(20) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{server.url}/health", timeout=2)


def test_a_drain_that_times_out_ends_the_stream_with_an_error_event(long_bundle, photo_url, tmp_path):
    """--drain-timeout 1 against a 12,000-token answer: the stream ends with OpenAI's error event
    (not a cut connection), and the process exits soon after the timeout."""
    with running_server(long_bundle, tmp_path / "server.log", "--served-model-name", MODEL,
                        "--drain-timeout", "1") as server:
        body = chat_body(photo_url, stream=True, **LONG)
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data:"))
            events = [next(lines), next(lines)]
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            events += list(lines)
        error = json.loads(events[-1].removeprefix("data: "))["error"]
        assert (error["type"], error["code"]) == ("server_error", "shutdown")
        assert server.process.wait(20) in (0, -signal.SIGTERM)
        assert time.monotonic() - signalled < 5.0  # the drain's 1 s and the events' grace, not 5 s more
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_serve_refuses_a_bad_bundle_fast(tmp_path):
    result = subprocess.run([sys.executable, "-m", "zspa.cli.serve", str(tmp_path / "nope")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 3 and "not a directory" in result.stderr


def test_foreign_host_names_and_non_json_posts_are_refused(server, photo_url):
    """DNS rebinding and cross-site form posts: a page on evil.example resolving to 127.0.0.1 sends
    Host: evil.example; a plain HTML form can only send form or text/plain bodies."""
    url = f"{server.url}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = json.dumps(chat_body(photo_url, max_tokens=2, temperature=0))
    rebound = httpx.post(url, content=body, headers={**headers, "Host": "evil.example:8000",
                                                     "Content-Type": "application/json"})
    assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
    assert httpx.get(f"{server.url}/ready", headers={"Host": "evil.example"}).status_code == 400
    for host in ("localhost", f"127.0.0.1:{server.url.rsplit(':', 1)[1]}", "[::1]:8000"):
        ok = httpx.post(url, content=body, headers={**headers, "Host": host, "Content-Type": "application/json"})
        assert ok.status_code == 200, (host, ok.text)
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        sent = {**headers, **({"Content-Type": content_type} if content_type else {})}
        refused = httpx.post(url, content=body, headers=sent)
        assert refused.status_code == 415 and refused.json()["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize("bound, extra, expected", [
    ("127.0.0.1", None, {"127.0.0.1", "::1", "localhost"}),
    ("127.0.0.1", ["jetson.local"], {"127.0.0.1", "::1", "localhost", "jetson.local"}),
    ("192.168.1.20", None, {"192.168.1.20"}),
    ("0.0.0.0", None, None),
    ("0.0.0.0", ["cam-hub.lan"], {"cam-hub.lan"}),
    ("127.0.0.1", ["*"], None),
])
def test_allowed_hosts_follow_the_bound_address(bound, extra, expected):
    from zspa.runtime.server.app import host_name
    from zspa.runtime.server.settings import allowed_hosts

    assert allowed_hosts(bound, extra) == (None if expected is None else frozenset(expected))
    assert [host_name(h) for h in ("LocalHost:8000", "[::1]:80", "::1", "10.0.0.1")] == [
        "localhost", "::1", "::1", "10.0.0.1"]


@pytest.mark.parametrize("header", ["[::1]evil.example", "[::1]:80evil", "localhost:evil.example", "[::1]:",
                                    "localhost:80:80"])
def test_host_headers_with_junk_after_the_name_match_nothing(header):
    from zspa.runtime.server.app import host_name

    assert host_name(header) not in {"::1", "localhost", "127.0.0.1"}


def test_probes_answer_head_and_wrapped_base64_is_an_image(server, photo_path):
    """HEAD /health is what load balancers send; base64 wrapped at 76 columns (MIME, `base64` without
    -w0) is the same image."""
    assert httpx.head(f"{server.url}/health").status_code == 200
    assert httpx.head(f"{server.url}/ready").status_code == 200
    import base64
    import textwrap

    wrapped = "\r\n".join(textwrap.wrap(base64.b64encode(photo_path.read_bytes()).decode(), 76))
    plain = _post(server, chat_body(data_url(photo_path.read_bytes()), max_tokens=3, temperature=0))
    response = _post(server, chat_body(f"data:image/jpeg;base64,{wrapped}", max_tokens=3, temperature=0))
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == plain.json()["choices"][0]["message"]["content"]


def test_a_dripped_body_or_a_slow_image_cannot_hold_a_request_past_its_deadline(busy_server, photo_url):
    """busy_server's --request-timeout is 2 s: a client sending its body a byte at a time, and an
    image host sending its image a byte at a time, both end in a 504 at about that deadline."""
    host, port = busy_server.url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json"
                    f"\r\nContent-Length: 1000\r\n\r\n{{".encode())
        reply = b""
        while b"\r\n\r\n" not in reply and time.monotonic() - started < 8:
            try:
                raw.sendall(b" ")
            except OSError:
                break
            raw.settimeout(0.2)
            try:
                reply += raw.recv(4096)
            except TimeoutError:
                pass
    assert reply.startswith(b"HTTP/1.1 504"), reply[:200]
    assert time.monotonic() - started < 5

    class Dripping(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(100):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.1)

    http = ThreadingHTTPServer(("127.0.0.1", 0), Dripping)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    try:
        started = time.monotonic()
        slow = _post(busy_server, chat_body(f"http://127.0.0.1:{http.server_address[1]}/i.png", max_tokens=2),
                     key=None)
        assert slow.status_code == 504 and slow.json()["error"]["code"] == "timeout"
        assert time.monotonic() - started < 5
    finally:
        http.shutdown()


class _FailsOnce:
    """The decoder's real session, made to fail its `nth` run the way a GPU out-of-memory or a
    cancelled run does: onnxruntime's own error, raised by onnxruntime (a terminating RunOptions)."""

    def __init__(self, session, nth: int):
        self.session, self.runs, self.nth = session, 0, nth

    def run_with_iobinding(self, binding, run_options=None):
        self.runs += 1
        if self.runs == self.nth:
            import onnxruntime as ort

            run_options = ort.RunOptions()
            run_options.terminate = True
        return self.session.run_with_iobinding(binding, run_options)

    def __getattr__(self, name):
        return getattr(self.session, name)


@pytest.mark.parametrize("stream, nth", [(False, 1), (True, 1), (False, 3), (True, 3)],
                         ids=["plain-prefill", "stream-prefill", "plain-decode", "stream-decode"])
def test_an_onnxruntime_failure_fails_only_its_request(tiny_bundle, photo_path, photo_url, stream, nth, caplog):
    """Run 1 is the request's prefill, run 3 its second decode step (in the batch)."""
    from fastapi.testclient import TestClient

    from zspa.runtime.pipeline import Pipeline
    from zspa.runtime.server.app import create_app
    from zspa.runtime.server.settings import ServerSettings

    pipeline = Pipeline.load(tiny_bundle)
    expected = pipeline.generate(photo_path, "Describe it.", max_new_tokens=6)
    pipeline.decoder.session = _FailsOnce(pipeline.decoder.session, nth)
    body = chat_body(photo_url, "Describe it.", max_tokens=6, temperature=0, stream=stream)
    with TestClient(create_app(pipeline, ServerSettings(MODEL, warmup=False))) as http:
        failed = http.post("/v1/chat/completions", json=body)
        if stream and nth > 1:  # the status went out with the first chunk; the failure arrives as an error event
            events = [json.loads(line[6:]) for line in failed.text.splitlines() if line.startswith("data: {")]
            assert failed.status_code == 200 and "error" in events[-1]
            error = events[-1]["error"]
        else:  # before any text: a plain 500
            assert failed.status_code == 500
            error = failed.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "internal_error")
        assert "Traceback" not in failed.text and "terminate" not in failed.text  # details stay in the log
        assert "terminate flag" in caplog.text
        served = http.post("/v1/chat/completions", json={**body, "stream": False})
    assert served.status_code == 200, served.text
    assert served.json()["choices"][0]["message"]["content"] == expected.text
