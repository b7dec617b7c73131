"""One decode step on a GPU backend against onnxruntime on the CPU, and the bytes it moved."""

from __future__ import annotations

import numpy as np

from zspa.runtime.batching import SoloDecode
from zspa.runtime.pipeline import Pipeline


def _second_logits(pipeline: Pipeline, image) -> tuple[np.ndarray, tuple[int, int], int]:
    """The logits of the answer's second token (a `decode` step), the bytes (sent, received) that
    step moved, and the row's KV length before it."""
    answer, logits = pipeline.prefill(pipeline.request(image, "What is this?", max_new_tokens=4, ignore_eos=True))
    answer.accept(logits)
    solo = SoloDecode(pipeline.decoder)
    solo.add(pipeline.decoder)
    before = pipeline.decoder.transfers.snapshot()
    logits = solo.step([answer.token], pipeline.position_ids([answer.position]))
    return logits[0], tuple(np.subtract(pipeline.decoder.transfers.snapshot(), before)), answer.length


def check_decode_step(gpu: Pipeline, cpu: Pipeline, image) -> None:
    """The GPU's decode step gives the CPU's logits and moves the token id, mask and position in
    and the logits out: no embeddings, no KV."""
    ours, (sent, received), length = _second_logits(gpu, image)
    reference, _, _ = _second_logits(cpu, image)
    np.testing.assert_allclose(ours, reference, atol=1e-3, rtol=1e-3)
    position_rows = 3 if gpu.bundle.manifest.decoder.mrope else 1
    assert sent == 8 + 8 * (length + 1) + 8 * position_rows
    assert received == gpu.bundle.manifest.decoder.vocab_size * 4
