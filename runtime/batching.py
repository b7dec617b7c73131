"""Rows of different requests decoding together: one decoder call per step for all of them.

The shared-KV decoder (`--kv-cache shared`, GroupQueryAttention) batches on a cache that never
moves (`SlotDecodeBatch`): per layer [max_batch, Hkv, capacity, Dh], allocated once, a slot per
running request. A request prefills straight into a free slot, each step writes every row's next
position in place (GroupQueryAttention reads each row's own length, `seqlens_k`), and a finished
row frees its slot; nothing is copied when requests join or leave. Several prompts may be under
way at once, each in its own slot: the prefill decoder is rebound to a prompt's slot for its next
chunk, and prompts that have fed nothing in neighbouring slots can feed their first chunks in one
call (`prefill_first_chunks`).

The portable decoder (past → past + new, `--kv-cache concat`) takes a batch with an attention
mask, so rows of different lengths share one KV cache [B, H, T, D]: each row's entries sit at
the right end, the columns to their left are padding the mask hides. A request joins after its
own prefill (batch of one) and leaves when done; the cache is re-laid out only then, never
between steps. Padding changes the order of a few float sums, not what is summed: greedy
answers equal one-at-a-time answers up to that noise (tests/test_batching.py).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from zspa.errors import ZspaError
from zspa.runtime.backends import DecoderSession, OrtDecoder, OrtSharedKVDecoder, kv_buffer
from zspa.runtime.decoder_inputs import Extras


class _OnePrefillAtATime:
    """Batches whose prefill decoder holds one prompt under way (its own cache, slot 0): nothing
    to bind before a prefill or between its chunks, nothing to free when it ends early (the next
    prefill resets that decoder)."""

    max_prefills = 1

    def prepare(self, decoder: DecoderSession) -> int:
        return 0

    def resume(self, slot: int, fed: int) -> None:
        pass

    def release(self, slot: int) -> None:
        pass


class SoloDecode(_OnePrefillAtATime):
    """A batch of one on the prefill's own decoder (any backend): its cache is used in place."""

    def __init__(self, decoder: DecoderSession):
        self.decoder = decoder
        self.rows = 0

    def __len__(self) -> int:
        return self.rows

    def add(self, prefilled: DecoderSession, slot: int = 0) -> None:
        if prefilled is not self.decoder or self.rows:
            raise ZspaError("a batch of one takes only the request its own decoder prefilled")
        self.rows = 1

    def remove(self, rows: set[int]) -> None:
        self.rows -= len(rows)

    def step(self, tokens: list[int], position_ids: np.ndarray) -> np.ndarray:
        mask = np.ones((1, self.decoder.past_length + 1), np.int64)
        return self.decoder.decode(_token_ids(tokens), mask, position_ids)


class DecodeBatch(_OnePrefillAtATime):
    def __init__(self, decoder: OrtDecoder):
        """`decoder`: a portable ORT decoder of its own (it may share the session with the prefill one)."""
        self.decoder = decoder
        self.lengths: list[int] = []  # each row's entries in the cache
        decoder.reset()

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, prefilled: OrtDecoder, slot: int = 0) -> None:
        """Appends the row `prefilled` (the prefill's decoder, batch of one) holds in its cache:
        the join copies it in."""
        past, length = self._arrays(prefilled), prefilled.past_length
        width = max(self.decoder.past_length, length)
        empty = [np.empty((0, p.shape[1], 0, *p.shape[3:]), p.dtype) for p in past]
        current = self._arrays(self.decoder) if self.lengths else empty
        self._store([np.concatenate([_pad_left(c, width), _pad_left(p, width)]) for c, p in zip(current, past)],
                    width)
        self.lengths.append(length)

    def remove(self, rows: set[int]) -> None:
        """Drops finished rows, and the padding columns no remaining row needs."""
        if not rows:
            return
        kept = [i for i in range(len(self.lengths)) if i not in rows]
        self.lengths = [self.lengths[i] for i in kept]
        if not kept:
            self.decoder.reset()
            return
        width = max(self.lengths)
        start = self.decoder.past_length - width
        self._store([a[kept][:, :, start:] for a in self._arrays(self.decoder)], width)

    def step(self, tokens: list[int], position_ids: np.ndarray) -> np.ndarray:
        """One new token per row (rows in `add` order); returns logits [B, V]."""
        total = self.decoder.past_length + 1
        mask = np.zeros((len(self.lengths), total), np.int64)
        for row, length in enumerate(self.lengths):
            mask[row, total - length - 1:] = 1
        logits = self.decoder.decode(_token_ids(tokens), mask, position_ids)
        self.lengths = [length + 1 for length in self.lengths]
        return logits

    def _arrays(self, decoder: OrtDecoder) -> list[np.ndarray]:
        """The cache of `decoder` on the host: the re-layout's copy out (counted)."""
        return [self.decoder.transfers.received(value.numpy()) for value in decoder.past]

    def _store(self, arrays: list[np.ndarray], width: int) -> None:
        sent = self.decoder.transfers.sent
        self.decoder.past = [ort.OrtValue.ortvalue_from_numpy(sent(np.ascontiguousarray(a)), self.decoder.device, 0)
                             for a in arrays]
        self.decoder.past_length = width


def _token_ids(tokens: list[int]) -> np.ndarray:
    """Each row's next token as the embed graph's `input_ids` [B, 1]."""
    return np.asarray(tokens, dtype=np.int64)[:, None]


def _pad_left(array: np.ndarray, width: int) -> np.ndarray:
    missing = width - array.shape[2]
    if missing == 0:
        return array
    padding = np.zeros((*array.shape[:2], missing, *array.shape[3:]), array.dtype)
    return np.concatenate([padding, array], axis=2)


class SlotDecodeBatch:
    def __init__(self, prefill: OrtSharedKVDecoder, max_batch: int):
        """`prefill`: the shared-KV decoder requests prefill on; it is bound to the slots of this
        batch's cache it prefills (`prepare`, `resume`, `prefill_first_chunks`), so its own
        buffers are released."""
        spec, capacity = prefill.spec, prefill.capacity
        self.prefill, self.max_batch = prefill, max_batch
        self.max_prefills = max_batch  # each prompt under way holds a slot of its own
        shape = [max_batch, spec.num_kv_heads, capacity, spec.head_dim]
        self.slot_bytes = spec.num_kv_heads * capacity * spec.head_dim * np.dtype(prefill.embeds_dtype).itemsize
        try:
            self.cache = [kv_buffer(spec, shape, prefill.embeds_dtype, prefill.device, prefill.transfers)
                          for _ in spec.past_names]
        except (MemoryError, RuntimeError) as exc:  # onnxruntime reports a failed allocation as RuntimeError
            needed = len(spec.past_names) * max_batch * self.slot_bytes / 2**30
            raise ZspaError(f"the KV cache of {max_batch} slots x {capacity} positions needs {needed:.1f} GiB, "
                            f"which this device cannot allocate ({exc}); lower --max-batch or --max-context") from None
        self.decoder = OrtSharedKVDecoder(prefill.session, spec, prefill.device, prefill.transfers, capacity,
                                          prefill.embed, allocate=False)
        self.slots: list[int] = []  # each row's slot, rows in `add` order
        self.lengths: dict[int, int] = {}  # slot → its entries in the cache
        self.pending: dict[int, int] = {}  # slot of a prefill under way → what it has fed
        self.bound: tuple[int, int] | None = None  # (first slot, rows) the prefill decoder is bound to
        self.width = 0  # the slots the step decoder is bound to
        self._bind_prefill(0, 1)

    def __len__(self) -> int:
        return len(self.slots)

    def _pointers(self, slot: int) -> list[int]:
        return [value.data_ptr() + slot * self.slot_bytes for value in self.cache]

    def _bind_prefill(self, first: int, rows: int) -> None:
        """The prefill decoder's cache becomes slots [first, first + rows) (a binding per tensor, so
        only when they change); what it had fed into the slot it leaves is kept in `pending`."""
        if self.bound is not None and self.bound[1] == 1 and self.bound[0] in self.pending:
            self.pending[self.bound[0]] = self.prefill.past_length
        if self.bound != (first, rows):
            self.prefill.bind_cache(self._pointers(first), rows, self.cache)
            self.bound = first, rows

    def prepare(self, decoder: DecoderSession) -> int:
        """Takes the lowest free slot for a prefill, binds the prefill decoder to it and returns it
        (rows stay packed at the front; prompts prepared together get neighbouring slots)."""
        if decoder is not self.prefill:
            raise ZspaError("a slot batch prefills on its own prefill decoder only")
        free = min(set(range(self.max_batch)) - set(self.slots) - set(self.pending), default=None)
        if free is None:
            raise ZspaError(f"every one of the {self.max_batch} cache slots is taken")
        self._bind_prefill(free, 1)
        self.pending[free] = 0
        return free

    def resume(self, slot: int, fed: int) -> None:
        """Binds the prefill decoder to `slot`, whose prefill has fed `fed` tokens, for its next chunk."""
        self._bind_prefill(slot, 1)
        self.prefill.past_length = fed

    def prefill_first_chunks(self, slots: list[int], inputs_embeds: np.ndarray, position_ids: np.ndarray,
                             extras: Extras) -> np.ndarray:
        """The first S tokens of several prompts in one decoder call: `slots` consecutive (ascending,
        prepared), `inputs_embeds` [len(slots), S, H] and positions and extras batched alike.
        Every row starts at past 0 and feeds S tokens: onnxruntime's GroupQueryAttention takes
        several rows of several new tokens only when none has a past, and the graph gives the
        last position's logits, so no row is padded. Returns the logits [len(slots), V]."""
        if slots != list(range(slots[0], slots[0] + len(slots))) or any(self.pending.get(s) != 0 for s in slots):
            raise ZspaError(f"first chunks share a call only in consecutive slots that have fed nothing, not {slots}")
        self._bind_prefill(slots[0], len(slots))
        self.prefill.past_length = 0
        length = inputs_embeds.shape[1]
        logits = self.prefill.step(inputs_embeds, np.ones((len(slots), length), np.int64), position_ids, extras)
        for slot in slots:
            self.pending[slot] = length
        return logits

    def release(self, slot: int) -> None:
        """Frees the slot of a prefill that will not finish (its request ended)."""
        self.pending.pop(slot, None)

    def add(self, prefilled: DecoderSession, slot: int) -> None:
        """The row whose prefill just completed in `slot` joins; nothing is copied."""
        if prefilled is not self.prefill or slot not in self.pending:
            raise ZspaError("a slot batch takes only a request prepared on its prefill decoder")
        self.lengths[slot] = self._fed(slot)
        self.pending.pop(slot)
        self.slots.append(slot)

    def _fed(self, slot: int) -> int:
        """What the prefill under way in `slot` has fed: the prefill decoder's count while bound to it."""
        return self.prefill.past_length if self.bound == (slot, 1) else self.pending[slot]

    def remove(self, rows: set[int]) -> None:
        """Frees the slots of finished rows; the other rows stay where they are."""
        for row in rows:
            self.lengths.pop(self.slots[row])
        self.slots = [slot for row, slot in enumerate(self.slots) if row not in rows]

    def step(self, tokens: list[int], position_ids: np.ndarray) -> np.ndarray:
        """One new token per row (rows in `add` order); returns logits [B, V]. The call covers
        slots 0 to the highest in use; a free slot among them decodes token 0 at its position 0,
        which its next prefill overwrites, and the slot of a prefill under way (in chunks) at the
        end of what it has fed so far, which its next chunk overwrites."""
        width = max(self.slots) + 1
        slots = np.asarray(self.slots)
        ids = np.zeros((width, 1), np.int64)
        ids[slots] = _token_ids(tokens)
        positions = np.zeros((*position_ids.shape[:-2], width, 1), np.int64)
        positions[..., slots, :] = position_ids
        lengths = dict(self.lengths)
        for slot in self.pending:
            if slot < width:
                lengths[slot] = self._fed(slot)
        total = max(lengths.values()) + 1
        mask = np.zeros((width, total), np.int64)
        mask[:, 0] = 1
        for slot, length in lengths.items():
            mask[slot, :length + 1] = 1
        if width != self.width:  # rebound only when the call's rows change (it costs a binding per tensor)
            self.decoder.bind_cache(self._pointers(0), width, self.cache)
            self.width = width
        self.decoder.past_length = total - 1
        logits = self.decoder.decode(ids, mask, positions)
        for slot in self.slots:
            self.lengths[slot] += 1
        return logits[slots]


DEFAULT_MAX_BATCH = 8


def batch_size(decoder: DecoderSession, requested: int | None) -> int:
    """`requested`, or DEFAULT_MAX_BATCH where `decoder` can batch and 1 where it cannot."""
    if requested is not None:
        return requested
    return DEFAULT_MAX_BATCH if type(decoder) in (OrtDecoder, OrtSharedKVDecoder) else 1


def decode_rows(decoder: DecoderSession, max_batch: int) -> SoloDecode | DecodeBatch | SlotDecodeBatch:
    """Where decoding happens for up to `max_batch` rows; `decoder` is the one requests prefill on
    (call the result's `prepare(decoder)` before each prefill)."""
    if max_batch == 1:
        return SoloDecode(decoder)
    if type(decoder) is OrtSharedKVDecoder:
        return SlotDecodeBatch(decoder, max_batch)
    if type(decoder) is not OrtDecoder:
        raise ZspaError(f"--max-batch {max_batch} needs a decoder on onnxruntime (an ort-* backend); TensorRT "
                        "engines decode one request at a time: use --max-batch 1 for them")
    return DecodeBatch(OrtDecoder(decoder.session, decoder.spec, decoder.device, decoder.transfers, decoder.embed))
