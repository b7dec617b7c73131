"""An onnxruntime backend that also records what each graph was fed: calibration inputs taken
from the real pipeline, so the decoder is calibrated on pruned sequences at the bundle's keep —
what it will see in use — rather than on unpruned ones."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from zspa.manifest import DecoderSpec
from zspa.runtime.backends import DecoderSession, GraphRunner, OrtBackend
from zspa.runtime.decoder_inputs import Extras, optional_inputs

Feeds = dict[str, np.ndarray]


class _RecordingGraph:
    def __init__(self, runner: GraphRunner, backend: RecordingBackend, records: list[Feeds]):
        self.runner, self.backend, self.records = runner, backend, records
        self.input_names = runner.input_names

    def run(self, feeds: Feeds) -> list[np.ndarray]:
        if self.backend.recording:
            self.records.append({name: np.array(value) for name, value in feeds.items()})
        return self.runner.run(feeds)


class _RecordingDecoder:
    """Records prefill steps only (empty past), the inputs a prefill-calibrated decoder needs;
    decode steps (`decode`, from token ids) pass through."""

    def __init__(self, decoder: DecoderSession, backend: RecordingBackend, spec: DecoderSpec, dtype: type,
                 records: list[Feeds]):
        self.decoder, self.backend, self.records, self.spec = decoder, backend, records, spec
        empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype=dtype)
        self.empty_past = dict.fromkeys(spec.past_names, empty)

    @property
    def past_length(self) -> int:
        return self.decoder.past_length

    def reset(self) -> None:
        self.decoder.reset()

    def step(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             extras: Extras | None = None) -> np.ndarray:
        if self.backend.recording and self.decoder.past_length == 0:
            record = {"inputs_embeds": np.array(inputs_embeds), "attention_mask": np.array(attention_mask),
                      "position_ids": np.array(position_ids), **self.empty_past,
                      **{name: item.array() for name, item in optional_inputs(
                          self.spec, inputs_embeds.shape, inputs_embeds.dtype, attention_mask.shape, extras).items()}}
            self.records.append(record)
        return self.decoder.step(inputs_embeds, attention_mask, position_ids, extras)

    def decode(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        return self.decoder.decode(input_ids, attention_mask, position_ids)


class RecordingBackend(OrtBackend):
    """`records[graph file stem]`: the feeds of every run, in order, while `recording` is true;
    set it false to keep using the same sessions without recording (one load of the bundle)."""

    def __init__(self, providers: list[str] | None = None, threads: int | None = None):
        super().__init__(providers, threads)
        self.records: dict[str, list[Feeds]] = defaultdict(list)
        self.recording = True

    def graph(self, path: Path) -> _RecordingGraph:
        return _RecordingGraph(super().graph(path), self, self.records[path.stem])

    def decoder(self, path: Path, spec: DecoderSpec, capacity: int, embed: _RecordingGraph | None = None
                ) -> DecoderSession:
        """`embed`: this backend's recording runner; the decode steps run its graph unrecorded."""
        inner = super().decoder(path, spec, capacity, embed.runner if embed is not None else None)
        return _RecordingDecoder(inner, self, spec, inner.embeds_dtype, self.records[path.stem])
