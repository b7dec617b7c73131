"""Continuous batching: rows that join, decode together and leave answer exactly as they would alone."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from zspa.errors import ZspaError
from zspa.runtime.batching import SoloDecode, batch_size, decode_rows
from zspa.runtime.server.metrics import ServerMetrics
from zspa.runtime.server.scheduler import Job, Scheduler

# Different prompt lengths (keep 0.1 keeps 58 of 576 tokens, keep 1.0 all), budgets, stops and
# sampling, so rows join a batch of other lengths and leave it at different steps.
REQUESTS = [
    ("photo", "What is in the picture?", {"keep": 0.1, "max_new_tokens": 12}),
    ("rgba", "Describe it.", {"keep": 1.0, "max_new_tokens": 5}),
    ("photo", "Who is this?", {"keep": 0.25, "max_new_tokens": 9, "temperature": 1.0, "seed": 7}),
    ("rgba", "Where is it?", {"keep": 0.1, "max_new_tokens": 16, "temperature": 0.7, "top_k": 5, "seed": 3}),
    ("photo", "Why?", {"keep": 1.0, "max_new_tokens": 3}),
    ("photo", "Is it day or night?", {"keep": 0.1, "max_new_tokens": 20, "ignore_eos": True}),
    ("both", "Which is brighter?", {"keep": 0.25, "max_new_tokens": 7}),  # two image blocks in one row
]


@pytest.fixture
def images(photo_path, rgba_png_path):
    photo, rgba = Image.open(photo_path).convert("RGB"), Image.open(rgba_png_path)
    return {"photo": photo, "rgba": rgba, "both": [photo, rgba]}


async def _serve(pipeline, images, requests, max_batch: int, max_prefill_tokens: int = 128,
                 events: list | None = None, metrics: ServerMetrics | None = None) -> tuple[list, list[int]]:
    """Submits every request at once to a scheduler of `max_batch`; returns each one's final event
    and the batch size of every decoder step (also appended to `events` as ("step", size, None))."""
    scheduler = Scheduler(pipeline, 64, metrics or ServerMetrics(), max_batch, max_prefill_tokens)
    sizes = []
    step = scheduler._rows.step

    def counted(tokens, position_ids):
        sizes.append(len(tokens))
        if events is not None:
            events.append(("step", len(tokens), None))
        return step(tokens, position_ids)

    scheduler._rows.step = counted
    loop = asyncio.get_running_loop()
    jobs = [Job(pipeline.request(images[image], question, **options), options["keep"], "zspa", True, loop)
            for image, question, options in requests]
    scheduler.start(warmup=False)
    for job in jobs:
        scheduler.submit(job)
    finals = []
    for job in jobs:
        streamed = ""
        while (event := await asyncio.wait_for(job.events.get(), 120))[0] not in ("done", "error"):
            streamed += event[1][0] if event[0] == "delta" else ""
        finals.append((event, streamed))
    scheduler.stop()
    return finals, sizes


@pytest.mark.parametrize("family", ["pipeline", "qwen_pipeline", "qwen2_pipeline", "qwen3_pipeline",
                                    "internvl_pipeline"])
def test_batched_rows_answer_as_they_would_alone(family, images, request):
    """LLaVA's 576-token grid, the Qwen families' dynamic grids with M-RoPE positions ([3, B, 1]
    per step, each row at its own position) under the same left padding, Qwen3-VL's decode steps
    with zero DeepStack planes, InternVL's tiled blocks (3,328 tokens for the photo); a row with
    two images among them."""
    pipeline = request.getfixturevalue(family)
    finals, sizes = asyncio.run(_serve(pipeline, images, REQUESTS, max_batch=3))
    assert max(sizes) == 3 and min(sizes) < 3  # rows really shared steps, and the batch shrank and refilled
    for (image, question, options), ((kind, result), streamed) in zip(REQUESTS, finals):
        assert kind == "done", result
        alone = pipeline.generate(images[image], question, **options)
        assert result.token_ids == alone.token_ids, (question, options)
        assert result.text == alone.text == streamed and result.finish_reason == alone.finish_reason
        assert result.stats.prompt_tokens == alone.stats.prompt_tokens


def test_stop_strings_end_one_row_only(pipeline, images):
    full = pipeline.generate(images["photo"], "What is in the picture?", keep=0.1, max_new_tokens=12).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    requests = [("photo", "What is in the picture?", {"keep": 0.1, "max_new_tokens": 12, "stop": [stop]}),
                ("rgba", "Describe it.", {"keep": 0.1, "max_new_tokens": 12})]
    finals, _ = asyncio.run(_serve(pipeline, images, requests, max_batch=2))
    (stopped, _), (other, _) = [event for event, _ in finals]
    assert stopped == "done" and finals[0][0][1].text == full[: full.find(stop)]
    assert finals[0][0][1].finish_reason == "stop"
    assert other == "done" and finals[1][0][1].text == pipeline.generate(images["rgba"], "Describe it.", keep=0.1,
                                                                         max_new_tokens=12).text


def _alone(pipeline, image, keep: float) -> np.ndarray:
    """The logits of a request's second token, decoded by itself."""
    answer, logits = pipeline.prefill(pipeline.request(image, "Hi", keep=keep, max_new_tokens=4))
    answer.accept(logits)
    solo = SoloDecode(pipeline.decoder)
    solo.add(pipeline.decoder)
    return solo.step([answer.token], pipeline.position_ids([answer.position]))[0]


def test_padding_is_masked_and_trimmed(pipeline, images):
    """A short row beside a long one: the short one's cache is padded on the left, the mask hides
    the padding (same logits as alone), and the padding goes when the long row leaves."""
    batch = decode_rows(pipeline.decoder, 2)
    rows = []
    for keep in (0.1, 1.0):
        answer, logits = pipeline.prefill(pipeline.request(images["photo"], "Hi", keep=keep, max_new_tokens=4))
        answer.accept(logits)
        batch.add(pipeline.decoder)
        rows.append(answer)
    short, long = rows
    assert batch.lengths == [short.length, long.length] and batch.decoder.past_length == long.length
    logits = batch.step([r.token for r in rows], pipeline.position_ids([r.position for r in rows]))
    for row, keep in enumerate((0.1, 1.0)):
        np.testing.assert_allclose(logits[row], _alone(pipeline, images["photo"], keep), rtol=0, atol=1e-4)
    batch.remove({1})
    assert batch.lengths == [short.length + 1] and batch.decoder.past_length == short.length + 1


def test_batch_size_defaults_and_refusals(pipeline):
    assert batch_size(pipeline.decoder, None) == 8 and batch_size(pipeline.decoder, 3) == 3
    assert isinstance(decode_rows(pipeline.decoder, 1), SoloDecode)

    class OtherDecoder:  # a TensorRT decoder: one request at a time
        past_length = 0

    assert batch_size(OtherDecoder(), None) == 1
    with pytest.raises(ZspaError, match="--max-batch 4 needs a decoder on onnxruntime"):
        decode_rows(OtherDecoder(), 4)


@pytest.fixture(scope="module", params=[("tiny-random-llava", "shared"), ("tiny-random-qwen3-vl", "shared"),
                                        ("tiny-random-llava", "static")], ids="-".join)
def shared_pipeline(request, tmp_path_factory):
    """The model exported with an in-place KV cache: --kv-cache shared (GroupQueryAttention) or
    static (TensorScatter + Attention, TensorRT's form), both served by the same slot cache."""
    from zspa.export.exporter import ExportOptions, export_bundle
    from zspa.runtime.pipeline import Pipeline

    model, kv_cache = request.param
    if kv_cache == "static":
        out = request.getfixturevalue("static_bundle")
    else:
        out = tmp_path_factory.mktemp(kv_cache) / model
        export_bundle(ExportOptions(model, out, keeps=[0.1, 0.25], kv_cache=kv_cache, progress=False))
    return Pipeline.load(out, max_context=2048)


def test_shared_kv_rows_batch_on_slots_and_answer_as_alone(shared_pipeline, images):
    """The slot cache: rows of different lengths (LLaVA's 1-D positions; Qwen3-VL's M-RoPE and
    zero DeepStack planes) join, share steps and leave, each answering as it does alone."""
    from zspa.runtime.batching import SlotDecodeBatch

    assert batch_size(shared_pipeline.decoder, None) == 8
    metrics = ServerMetrics()
    finals, sizes = asyncio.run(_serve(shared_pipeline, images, REQUESTS, max_batch=3, metrics=metrics))
    assert max(sizes) == 3 and min(sizes) < 3
    for (image, question, options), ((kind, result), streamed) in zip(REQUESTS, finals):
        assert kind == "done", result
        alone = shared_pipeline.generate(images[image], question, **options)
        assert result.token_ids == alone.token_ids and result.text == alone.text == streamed, (question, options)
    # A gap per row of every step: each token after an answer's first (which prefill gives), and
    # the end-of-sequence token of an answer that stopped on one (not in its token ids).
    gaps = metrics.registry.get_sample_value("zspa_inter_token_latency_seconds_count")
    answered = [len(result.token_ids) for (_, result), _ in finals]
    assert gaps == sum(sizes) and sum(answered) - len(answered) <= gaps <= sum(answered)
    assert isinstance(decode_rows(shared_pipeline.decoder, 2), SlotDecodeBatch)


def test_slots_never_move(shared_pipeline, images):
    """A row prefills into its slot in place, and when another leaves its slot's entries stay where
    they are, byte for byte; the freed slot is the next one taken."""
    batch = decode_rows(shared_pipeline.decoder, 3)
    pointers = [value.data_ptr() for value in batch.cache]
    rows = []
    for keep in (0.1, 1.0, 0.25):
        slot = batch.prepare(shared_pipeline.decoder)
        answer, logits = shared_pipeline.prefill(shared_pipeline.request(images["photo"], "Hi", keep=keep,
                                                                          max_new_tokens=4))
        answer.accept(logits)
        batch.add(shared_pipeline.decoder, slot)
        rows.append(answer)
    assert batch.slots == [0, 1, 2] and [batch.lengths[s] for s in range(3)] == [r.length for r in rows]
    logits = batch.step([r.token for r in rows],
                        shared_pipeline.position_ids([r.position for r in rows]))
    for row, keep in enumerate((0.1, 1.0, 0.25)):
        np.testing.assert_allclose(logits[row], _alone(shared_pipeline, images["photo"], keep), rtol=0, atol=1e-4)
    slot_two = batch.cache[0].numpy()[2].copy()
    batch.remove({1})
    assert batch.slots == [0, 2] and [value.data_ptr() for value in batch.cache] == pointers
    np.testing.assert_array_equal(batch.cache[0].numpy()[2], slot_two)
    assert batch.prepare(shared_pipeline.decoder) == 1 and batch.pending == {1: 0}
    batch.release(1)
    vocab = shared_pipeline.bundle.manifest.decoder.vocab_size
    rows = [rows[0], rows[2]]
    for expected_slots in ([0, 2], [0]):  # the call narrows from 3 slots to 1 once slot 2 frees
        assert batch.slots == expected_slots
        logits = batch.step([r.token for r in rows],
                            shared_pipeline.position_ids([r.position for r in rows]))
        assert logits.shape == (len(rows), vocab) and np.isfinite(logits).all()
        batch.remove({1} if len(rows) > 1 else {0})
        rows = rows[:1]


def _joined(pipeline, batch, image, keep: float):
    """Encodes and prefills one request into `batch`; returns its sequence, its encoded request,
    and the bytes (sent, received) the prefill and the join moved between host and device."""
    decoder = pipeline.decoder
    slot = batch.prepare(decoder)
    request = pipeline.encode(pipeline.request(image, "Hi", keep=keep, max_new_tokens=4, ignore_eos=True))
    before = decoder.transfers.snapshot()
    answer, logits = pipeline.prefill(request)
    answer.accept(logits)
    batch.add(decoder, slot)
    return answer, request, np.subtract(decoder.transfers.snapshot(), before)


def _stepped(pipeline, batch, rows) -> tuple[int, int]:
    """One batch step for `rows`; the bytes (sent, received) it moved."""
    before = pipeline.decoder.transfers.snapshot()
    logits = batch.step([r.token for r in rows], pipeline.position_ids([r.position for r in rows]))
    moved = np.subtract(pipeline.decoder.transfers.snapshot(), before)
    for row, answer in enumerate(rows):
        answer.advance()
        answer.accept(logits[row])
    return moved


def test_a_slot_join_and_step_move_no_cache_and_no_embeddings(shared_pipeline, images):
    """Counted by the backend: a join sends its prefill's inputs and receives one row of logits,
    no KV byte either way; a decode step sends each row's token id, mask and positions and
    receives the logits, no embeddings (the embed graph's output feeds the decoder where it lies)
    and no DeepStack zeros (a zeroed device buffer)."""
    spec, vocab = shared_pipeline.bundle.manifest.decoder, shared_pipeline.bundle.manifest.decoder.vocab_size
    position_rows = 3 if spec.mrope else 1
    batch = decode_rows(shared_pipeline.decoder, 3)
    rows = []
    for keep in (0.1, 1.0):
        answer, request, (sent, received) = _joined(shared_pipeline, batch, images["photo"], keep)
        tokens, hidden = answer.length, request.encoded.prompt_embeds.shape[-1]
        planes = spec.deepstack_layers * tokens * hidden * 4  # the kept tokens' planes, zeros elsewhere
        assert received == vocab * 4
        assert sent == tokens * (hidden * 4 + 8 + 8 * position_rows) + planes
        rows.append(answer)
    _stepped(shared_pipeline, batch, rows)  # the first step sizes the zeroed buffers
    total = max(batch.lengths.values()) + 1
    sent, received = _stepped(shared_pipeline, batch, rows)
    assert received == 2 * vocab * 4
    assert sent == 2 * 8 + 2 * total * 8 + 2 * 8 * position_rows


def test_the_portable_decoders_join_copies_the_cache_through_the_host(pipeline, images):
    """What the slot cache saves: the concat decoder's join takes the new row's cache and the
    batch's to the host and sends back the re-laid-out one."""
    batch = decode_rows(pipeline.decoder, 2)
    first, _, _ = _joined(pipeline, batch, images["photo"], 1.0)
    held = sum(value.numpy().nbytes for value in batch.decoder.past)
    decoder = pipeline.decoder
    batch.prepare(decoder)
    request = pipeline.encode(pipeline.request(images["photo"], "Hi", keep=0.1, max_new_tokens=4, ignore_eos=True))
    answer, logits = pipeline.prefill(request)
    row = sum(value.numpy().nbytes for value in decoder.past)
    before = decoder.transfers.snapshot()
    batch.add(decoder)
    sent, received = np.subtract(decoder.transfers.snapshot(), before)
    assert received == held + row
    assert sent == sum(value.numpy().nbytes for value in batch.decoder.past) > held + row  # the short row padded
    answer.accept(logits)
    sent, received = _stepped(pipeline, batch, [first, answer])
    assert received == 2 * pipeline.bundle.manifest.decoder.vocab_size * 4  # a step moves no cache either


def test_a_request_cancelled_mid_prefill_stops_and_frees_its_slot(shared_pipeline, images, monkeypatch):
    """A client that leaves while its long prompt is being fed in chunks: its prefill stops at the
    next chunk and nothing is sent to it; the next request prefills into the freed slot beside a
    row that is decoding, and both answer as they would alone."""
    requests = [("photo", "Why?", {"keep": 0.1, "max_new_tokens": 24, "ignore_eos": True}),
                ("rgba", "Describe it.", {"keep": 1.0, "max_new_tokens": 4}),  # unpruned, the long one: cancelled
                ("photo", "Who is this?", {"keep": 0.25, "max_new_tokens": 6})]
    metrics, chunk, long_chunks = ServerMetrics(), shared_pipeline.prefill_chunk, []

    async def scenario() -> tuple[list, list]:
        loop = asyncio.get_running_loop()
        jobs = [Job(shared_pipeline.request(images[image], question, **options), options["keep"], "zspa", True, loop)
                for image, question, options in requests]

        long_request = jobs[1].request

        def counted(chunks, allowed):
            fed = chunk(chunks, allowed)
            if chunks.request is long_request:
                long_chunks.append(fed)
                if len(long_chunks) == 2:
                    jobs[1].cancel("disconnect")
            return fed

        monkeypatch.setattr(shared_pipeline, "prefill_chunk", counted)
        scheduler = Scheduler(shared_pipeline, 8, metrics, 2, max_prefill_tokens=16)
        scheduler.start(warmup=False)
        for job in jobs:
            scheduler.submit(job)
        finals = [await _final(jobs[0]), await _final(jobs[2])]
        scheduler.stop()
        return finals, [jobs[1].events.get_nowait()[0] for _ in range(jobs[1].events.qsize())]

    finals, sent_to_cancelled = asyncio.run(scenario())
    monkeypatch.undo()
    assert len(long_chunks) == 2 and max(long_chunks) <= 16 and sent_to_cancelled == []  # stopped at once, silent
    assert metrics.registry.get_sample_value("zspa_generations_cancelled_total", {"reason": "disconnect"}) == 1
    for (image, question, options), (kind, result) in zip([requests[0], requests[2]], finals):
        assert kind == "done", result
        assert result.token_ids == shared_pipeline.generate(images[image], question, **options).token_ids


async def _final(job: Job) -> tuple:
    while (event := await asyncio.wait_for(job.events.get(), 120))[0] not in ("done", "error"):
        pass
    return event


def test_a_slot_cache_too_large_for_the_device_is_refused_clearly(shared_pipeline):
    with pytest.raises(ZspaError, match=r"KV cache of 10000000 slots x 2048 positions needs .* lower --max-batch"):
        decode_rows(shared_pipeline.decoder, 10_000_000)


def _chunked_prefills_answer_as_alone(pipeline, images, monkeypatch, budget: int) -> list[int]:
    """--max-prefill-tokens: between two decode steps at most `budget` prompt tokens are fed, a
    longer prompt in chunks with steps of the running rows between them; every answer, of the
    rows decoding meanwhile and of the chunked prompts, equals the request's answer alone.
    Returns how many prompts each call that fed several first chunks together held."""
    events, prefilling, together = [], [], []  # prefilling: kept alive, so each prefill's id stays its own
    chunk, first_chunks = pipeline.prefill_chunk, pipeline.prefill_first_chunks

    def counted(chunks, allowed):
        fed = chunk(chunks, allowed)
        events.append(("chunk", fed, id(chunks)))
        prefilling.append(chunks)
        return fed

    def counted_together(group, length, batch, slots):
        first_chunks(group, length, batch, slots)
        together.append(len(group))
        events.extend(("chunk", length, id(chunks)) for chunks in group)
        prefilling.extend(group)

    monkeypatch.setattr(pipeline, "prefill_chunk", counted)
    monkeypatch.setattr(pipeline, "prefill_first_chunks", counted_together)
    finals, _ = asyncio.run(_serve(pipeline, images, REQUESTS, max_batch=3, max_prefill_tokens=budget, events=events))
    monkeypatch.undo()
    prefills = {key for kind, _, key in events if kind == "chunk"}
    spans = [[i for i, event in enumerate(events) if event[2] == key] for key in prefills]
    assert len(prefills) == len(REQUESTS)
    assert any(events[i][0] == "step" for span in spans for i in range(span[0], span[-1]))  # rows decoded between
    last_chunks = {span[-1] for span in spans}
    waits, fed, joined = [], 0, 0  # what rows already decoding waited for between two of their steps
    for index, (kind, count, _) in enumerate(events):
        if kind == "chunk":
            fed, joined = fed + count, joined + (index in last_chunks)
            continue
        if count > joined:  # some of this step's rows were decoding before the gap
            waits.append(fed)
        fed, joined = 0, 0
    assert 0 < max(waits) <= budget
    for (image, question, options), ((kind, result), streamed) in zip(REQUESTS, finals):
        assert kind == "done", result
        alone = pipeline.generate(images[image], question, **options)
        assert result.token_ids == alone.token_ids and result.text == streamed, (question, options)
    return together


def test_prefill_runs_in_chunks_within_the_budget(pipeline, images, monkeypatch):
    """The portable decoder's prefill decoder holds one prompt at a time: none is fed together."""
    assert _chunked_prefills_answer_as_alone(pipeline, images, monkeypatch, budget=32) == []


def test_a_slot_cache_prefills_in_chunks_beside_decoding_rows(shared_pipeline, images, monkeypatch):
    """The slot of a prefill under way sits among decoding slots: a step writes its dummy token
    where the next chunk goes, so the chunks already fed stay intact."""
    _chunked_prefills_answer_as_alone(shared_pipeline, images, monkeypatch, budget=32)


def test_prompts_admitted_together_prefill_their_first_chunks_in_one_call(shared_pipeline, images, monkeypatch):
    """Three requests admitted at once into neighbouring slots, a budget of 128: their first
    chunks (64 tokens each, as the shortest prompt of the two first is 78 long) go into one
    decoder call, every row at past 0; the rest of each prompt follows in chunks of its own, and
    every answer equals the request's answer alone."""
    together = _chunked_prefills_answer_as_alone(shared_pipeline, images, monkeypatch, budget=128)
    assert together and max(together) >= 2
