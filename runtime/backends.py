"""Graph execution behind one small interface; this module holds the onnxruntime backend.

The pipeline asks a backend for two things: a plain graph runner (vision, embed, pruner) and a
decoder session that owns the KV cache. The onnxruntime decoder keeps the cache as OrtValues
bound through IO binding: each step's `present` outputs become the next step's `past` inputs
without a round trip through numpy (on CUDA they stay in device memory). A decode step takes
token ids (`decode`): the embed graph's output is bound to the decoder's input where it lies, so
ids, mask and positions go in and the logits come out (counted in `Transfers`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort

from zspa.errors import BundleError, InvalidInputError, ZspaError
from zspa.manifest import DecoderSpec, GraphSpec
from zspa.runtime.bundle import Bundle
from zspa.runtime.decoder_inputs import Extras, OptionalInput, optional_inputs
from zspa.runtime.transfers import Transfers

ORT_BACKENDS = ("ort-cpu", "ort-cuda", "ort-trt")
BACKENDS = (*ORT_BACKENDS, "trt")
Provider = str | tuple[str, dict[str, str]]
# KV-cache kinds whose past and present are one buffer per layer (manifest `decoder.kv_cache`): both
# read each row's valid length off the attention mask, so one session and one slot batch serve them.
IN_PLACE_KV_CACHES = ("shared", "static")
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}


class GraphRunner(Protocol):
    input_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]: ...


class DecoderSession(Protocol):
    past_length: int

    def reset(self) -> None: ...

    def decode(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """One decode step from token ids [B, 1] (the embeddings never reach the host); returns
        logits [B, V] as float32. Needs the session opened with the embed graph."""
        ...

    def step(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             extras: Extras | None = None) -> np.ndarray:
        """Runs one prefill or decode step; returns last-position logits [B, V] as float32.
        `extras`: the optional inputs the decoder takes, by name (runtime/decoder_inputs.py;
        zeros for those not given)."""
        ...


class Backend(Protocol):
    """What the pipeline needs from a backend; it never knows which one runs."""

    providers: list[str]
    transfers: Transfers  # every host↔device copy its graphs and decoders made

    def graph(self, path: Path) -> GraphRunner: ...

    def decoder(self, path: Path, spec: DecoderSpec, capacity: int, embed: GraphRunner | None = None
                ) -> DecoderSession:
        """`embed`: this backend's runner of the embed graph, which `decode` runs on the device."""
        ...


def make_backend(name: str, bundle: Bundle, threads: int | None = None) -> Backend:
    """`trt`: the bundle's zspa-build engines through TensorRT; `ort-*`: onnxruntime providers."""
    if name == "trt":
        from zspa.runtime.trt_backend import TrtBackend

        return TrtBackend(bundle)
    providers = execution_providers(name, bundle.path / "engines" / "ort-trt", fp16=bundle.manifest.dtype == "float16")
    return OrtBackend(providers, threads, bundle.manifest.graphs)


class OrtGraph:
    def __init__(self, session: ort.InferenceSession, transfers: Transfers):
        self.session, self.transfers = session, transfers
        self.input_names = [i.name for i in session.get_inputs()]
        self.input_dtypes = {i.name: _numpy_dtype(i.type) for i in session.get_inputs()}

    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        sent = {k: self.transfers.sent(np.asarray(v, dtype=self.input_dtypes[k])) for k, v in feeds.items()}
        return [self.transfers.received(output) for output in self.session.run(None, sent)]


class _OrtDecoderBase:
    """IO binding shared by both KV-cache kinds: the step's inputs bound from numpy. Subclasses bind
    `logits` (to the host) before the present outputs: `get_outputs` follows binding order."""

    def __init__(self, session: ort.InferenceSession, spec: DecoderSpec, device: str, transfers: Transfers,
                 embed: OrtGraph | None = None):
        self.session = session
        self.spec = spec
        self.device = device
        self.transfers = transfers
        self.input_dtypes = {i.name: _numpy_dtype(i.type) for i in session.get_inputs()}
        self.embeds_dtype = self.input_dtypes["inputs_embeds"]
        self.past_names, self.present_names = spec.past_names, spec.present_names
        self.binding = session.io_binding()
        self.past_length = 0
        self._zeros: dict[str, ort.OrtValue] = {}  # uint8 zeros by input name (`_bind_zeros`)
        self.embed = embed
        if embed is not None:
            produced = _numpy_dtype(embed.session.get_outputs()[0].type)
            if produced != self.embeds_dtype:
                raise BundleError(f"the embed graph gives {np.dtype(produced).name} embeddings but the decoder takes "
                                  f"{np.dtype(self.embeds_dtype).name}; re-export the bundle")
            self.embed_binding = embed.session.io_binding()

    def _bind_host(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.input_dtypes[name])
        self.binding.bind_cpu_input(name, self.transfers.sent(array))

    def _bind_zeros(self, name: str, item: OptionalInput) -> None:
        """Binds `name` to zeros on the device: one zeroed buffer per input, viewed at the step's
        shape and grown to twice the need when a step outgrows it (the only copy it costs)."""
        buffer = self._zeros.get(name)
        if buffer is None or buffer.shape()[0] < item.nbytes:
            zeros = self.transfers.sent(np.zeros(2 * item.nbytes, np.uint8))
            buffer = self._zeros[name] = ort.OrtValue.ortvalue_from_numpy(zeros, self.device, 0)
        self.binding.bind_input(name, self.device, 0, item.dtype, list(item.shape), buffer.data_ptr())

    def _run(self, inputs_embeds: np.ndarray | ort.OrtValue, attention_mask: np.ndarray, position_ids: np.ndarray,
             extras: Extras | None) -> list:
        if isinstance(inputs_embeds, ort.OrtValue):  # already where the decoder runs
            self.binding.bind_ortvalue_input("inputs_embeds", inputs_embeds)
        else:
            self._bind_host("inputs_embeds", inputs_embeds)
        shape = _shape(inputs_embeds)
        self._bind_host("attention_mask", attention_mask)
        self._bind_host("position_ids", position_ids)
        for name, item in optional_inputs(self.spec, shape, self.embeds_dtype, attention_mask.shape, extras).items():
            if item.value is None:
                self._bind_zeros(name, item)
            else:
                self._bind_host(name, item.value)
        self.session.run_with_iobinding(self.binding)
        self.past_length += shape[1]
        return self.binding.get_outputs()

    def _last_logits(self, logits: ort.OrtValue) -> np.ndarray:
        return self.transfers.received(logits.numpy())[:, -1, :].astype(np.float32, copy=False)

    def decode(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """The embed graph writes the step's embeddings on the device; the decoder reads them there."""
        if self.embed is None:
            raise ZspaError("this decoder session was opened without the embed graph: it takes embeddings (step)")
        ids = self.transfers.sent(np.ascontiguousarray(input_ids, dtype=np.int64))
        self.embed_binding.bind_cpu_input("input_ids", ids)
        self.embed_binding.bind_output("inputs_embeds", self.device)  # unallocated: its batch size varies
        self.embed.session.run_with_iobinding(self.embed_binding)
        return self.step(self.embed_binding.get_outputs()[0], attention_mask, position_ids)


class OrtDecoder(_OrtDecoderBase):
    """The portable decoder graph (past → past + new) with its KV cache bound across steps."""

    def __init__(self, session: ort.InferenceSession, spec: DecoderSpec, device: str, transfers: Transfers,
                 embed: OrtGraph | None = None):
        super().__init__(session, spec, device, transfers, embed)
        self.past: list[ort.OrtValue] = []
        self._previous_binding: ort.IOBinding | None = None
        self.reset()

    def reset(self) -> None:
        empty = np.zeros((1, self.spec.num_kv_heads, 0, self.spec.head_dim), dtype=self.embeds_dtype)
        self.past = [ort.OrtValue.ortvalue_from_numpy(empty, self.device, 0) for _ in self.past_names]
        self.past_length = 0

    def step(self, inputs_embeds: np.ndarray | ort.OrtValue, attention_mask: np.ndarray, position_ids: np.ndarray,
             extras: Extras | None = None) -> np.ndarray:
        # A fresh binding per step, the previous one kept alive: the past is its outputs, and
        # onnxruntime 1.23 (the last for Python 3.10) frees them when their binding is cleared.
        self._previous_binding, self.binding = self.binding, self.session.io_binding()
        self.binding.bind_output("logits", "cpu")
        for name in self.present_names:
            self.binding.bind_output(name, self.device)
        for name, value in zip(self.past_names, self.past):
            self.binding.bind_ortvalue_input(name, value)
        outputs = self._run(inputs_embeds, attention_mask, position_ids, extras)
        self.past = list(outputs[1:])
        return self._last_logits(outputs[0])


class OrtSharedKVDecoder(_OrtDecoderBase):
    """The in-place decoder graphs (`kv_cache: shared` or `static`): one [1, Hkv, capacity, Dh]
    buffer per layer, bound once as both past and present, so a step writes only its new positions."""

    def __init__(self, session: ort.InferenceSession, spec: DecoderSpec, device: str, transfers: Transfers,
                 capacity: int, embed: OrtGraph | None = None, allocate: bool = True):
        """`allocate` False: no buffers of its own until `bind_cache` (a batch's step decoder)."""
        super().__init__(session, spec, device, transfers, embed)
        self.capacity = capacity
        self.binding.bind_output("logits", "cpu")
        self.buffers: object = None
        if allocate:
            shape = [1, spec.num_kv_heads, capacity, spec.head_dim]
            self.buffers = [kv_buffer(spec, shape, self.embeds_dtype, device, transfers) for _ in self.past_names]
            for past, present, buffer in zip(self.past_names, self.present_names, self.buffers):
                self.binding.bind_ortvalue_input(past, buffer)
                self.binding.bind_ortvalue_output(present, buffer)

    def bind_cache(self, pointers: list[int], rows: int, owner: object) -> None:
        """Past and present become `rows` rows of memory the caller owns, [rows, Hkv, capacity, Dh]
        at each of `pointers` (one per cache tensor, in `past_names` order): one slot of a batch's
        cache for a prefill, or its first `rows` slots for a step. `owner` keeps that memory alive;
        the decoder's own buffers are released."""
        shape = [rows, self.spec.num_kv_heads, self.capacity, self.spec.head_dim]
        self.binding.bind_output("logits", "cpu")  # unallocated again: a bound one keeps its first batch size
        for past, present, pointer in zip(self.past_names, self.present_names, pointers):
            self.binding.bind_input(past, self.device, 0, self.embeds_dtype, shape, pointer)
            self.binding.bind_output(present, self.device, 0, self.embeds_dtype, shape, pointer)
        self.buffers = owner

    def reset(self) -> None:
        self.past_length = 0  # positions past the valid length are never read

    def step(self, inputs_embeds: np.ndarray | ort.OrtValue, attention_mask: np.ndarray, position_ids: np.ndarray,
             extras: Extras | None = None) -> np.ndarray:
        if self.past_length + _shape(inputs_embeds)[1] > self.capacity:
            raise InvalidInputError(f"the KV cache holds {self.capacity} positions; this step needs "
                                    f"{self.past_length + _shape(inputs_embeds)[1]}")
        return self._last_logits(self._run(inputs_embeds, attention_mask, position_ids, extras)[0])


def kv_buffer(spec: DecoderSpec, shape: list[int], dtype: type, device: str, transfers: Transfers) -> ort.OrtValue:
    """One in-place cache tensor. A static cache's attention reads every position under its mask,
    and a masked probability of 0 times uninitialised memory that happens to hold NaN is NaN, so
    its buffers start zeroed (a CPU calloc; one copy on a GPU); GroupQueryAttention reads only each
    row's valid prefix."""
    if spec.kv_cache == "static":
        return ort.OrtValue.ortvalue_from_numpy(transfers.sent(np.zeros(shape, dtype)), device, 0)
    return ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, device, 0)


def execution_providers(backend: str, engine_cache: Path, fp16: bool) -> list[Provider]:
    """onnxruntime's providers for a backend name, best first; nodes a provider cannot run fall
    back to the next. `ort-trt` caches its engines and timing cache in `engine_cache`, so only the
    first session on a device pays for the TensorRT build."""
    if backend == "ort-cpu":
        return ["CPUExecutionProvider"]
    if backend == "ort-cuda":
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if backend == "ort-trt":
        cache = str(engine_cache)
        options = {"trt_engine_cache_enable": "True", "trt_engine_cache_path": cache, "trt_timing_cache_enable": "True",
                   "trt_timing_cache_path": cache, "trt_fp16_enable": str(fp16)}
        return [("TensorrtExecutionProvider", options), "CUDAExecutionProvider", "CPUExecutionProvider"]
    raise InvalidInputError(f"onnxruntime backend must be one of {', '.join(ORT_BACKENDS)}, got {backend!r}")


class OrtBackend:
    """onnxruntime with the given execution providers (CPU by default)."""

    def __init__(self, providers: list[Provider] | None = None, threads: int | None = None,
                 graphs: dict[str, GraphSpec] | None = None):
        """`graphs`: the manifest's graph entries; a graph whose inputs or outputs differ from its
        entry's is refused on load, not with an onnxruntime error mid-request."""
        self.graphs = {Path(spec.file).name: spec for spec in (graphs or {}).values()}
        available = ort.get_available_providers()
        self.provider_list = providers or ["CPUExecutionProvider"]
        self.providers = [p if isinstance(p, str) else p[0] for p in self.provider_list]
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise ZspaError(
                f"this onnxruntime lacks {', '.join(missing)} (available: {', '.join(available)}); GPU backends need "
                "onnxruntime-gpu on a desktop (pip install 'zspa[gpu]') or NVIDIA's onnxruntime build for Jetson"
            )
        self.options = ort.SessionOptions()
        self.options.log_severity_level = 3
        # Worker threads spin between a run's parallel sections: a decode step is some 400 small
        # nodes, and waking sleeping workers for each cost a share of it (INT4 decode 1.36x faster
        # at keep 0.1 on a 2-core EPYC: benchmarks/decode_step_levers.py). They stop when the run
        # returns, so an idle session never steals cores from the busy one (left spinning, prefill
        # ran 2.5x slower).
        self.options.add_session_config_entry("session.intra_op.allow_spinning", "1")
        self.options.add_session_config_entry("session.force_spinning_stop", "1")
        # Peaked attention leaves denormal probabilities (7 % of them in a measured prefill); on
        # Intel cores every multiply-add on one traps to microcode, and prefill ran 1.6x slower.
        # onnxruntime flushes them in its worker threads (the calling thread keeps IEEE rules).
        self.options.add_session_config_entry("session.set_denormal_as_zero", "1")
        if threads:
            self.options.intra_op_num_threads = threads
        self.transfers = Transfers()
        self.device = "cuda" if self.providers[0] in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"

    def session(self, path: Path) -> ort.InferenceSession:
        try:
            session = ort.InferenceSession(os.fspath(path), self.options, providers=self.provider_list)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
            raise BundleError(f"{path}: onnxruntime cannot load this graph ({exc})") from None
        spec = self.graphs.get(path.name)
        if spec is not None:
            for kind, declared, actual in (("inputs", spec.inputs, session.get_inputs()),
                                           ("outputs", spec.outputs, session.get_outputs())):
                if sorted(t.name for t in declared) != sorted(t.name for t in actual):
                    raise BundleError(f"{path.name}: the graph's {kind} {sorted(t.name for t in actual)} are not "
                                      f"manifest.json's {sorted(t.name for t in declared)}; re-export the bundle")
        return session

    def graph(self, path: Path) -> OrtGraph:
        return OrtGraph(self.session(path), self.transfers)

    def decoder(self, path: Path, spec: DecoderSpec, capacity: int, embed: OrtGraph | None = None
                ) -> DecoderSession:
        """A decoder session for the graph's KV-cache kind; `capacity` sizes an in-place buffer."""
        if spec.kv_cache in IN_PLACE_KV_CACHES:
            return OrtSharedKVDecoder(self.session(path), spec, self.device, self.transfers, capacity, embed)
        return OrtDecoder(self.session(path), spec, self.device, self.transfers, embed)


def _shape(inputs_embeds: np.ndarray | ort.OrtValue) -> tuple[int, ...]:
    return tuple(inputs_embeds.shape()) if isinstance(inputs_embeds, ort.OrtValue) else inputs_embeds.shape


def _numpy_dtype(onnx_type: str) -> type:
    name = onnx_type.removeprefix("tensor(").removesuffix(")")
    return _NUMPY_DTYPES.get({"float": "float32", "float16": "float16"}.get(name, name), np.float32)
