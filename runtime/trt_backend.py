"""`--backend trt`: the engines `zspa-build` wrote, run by the TensorRT runtime (TensorRT 10 API).

Named tensors: `set_input_shape`, `set_tensor_address`, `execute_async_v3` on one CUDA stream,
device memory through cuda-python. Graph runners keep grow-only device buffers per tensor, and
grow-only page-locked host buffers that every copy goes through (a copy from pageable memory is
staged by the driver and blocks). The decoder keeps its KV cache on the device across steps:
two buffers per cache tensor, sized for the engines' context, serve alternately as past and
present (the portable graph writes past+new into present), so no cache byte crosses to the host.
A decode step (`decode`) runs the embed engine in a context of its own and points the decoder's
`inputs_embeds` at its output: token ids go in, logits come out. CUDA graphs are not used for
the decode step: the portable graph's past length changes every step, and a captured graph
fixes shapes. A static-cache decoder (`kv_cache: static`, TensorRT ≥ 10.15) has one buffer per
cache tensor, bound as both past and present at the engines' full context, which TensorRT's
KV-cache update layer writes in place: its decode steps all have the same shapes.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np

from zspa.errors import BundleError, InvalidInputError, ZspaError
from zspa.manifest import DecoderSpec
from zspa.runtime.bundle import Bundle
from zspa.runtime.cuda import check, cuda_device, cudart, import_tensorrt
from zspa.runtime.decoder_inputs import Extras, OptionalInput, optional_inputs
from zspa.runtime.engines import BuildRecord, engine_dir_name
from zspa.runtime.transfers import Transfers


class _Device:
    """A CUDA stream, the copies and allocations the runners need, and the count of the copies."""

    def __init__(self):
        self.rt = cudart()
        self.stream = check(self.rt.cudaStreamCreate())
        self.transfers = Transfers()

    def alloc(self, nbytes: int) -> int:
        return check(self.rt.cudaMalloc(max(nbytes, 1)))

    def alloc_pinned(self, nbytes: int) -> int:
        return check(self.rt.cudaMallocHost(max(nbytes, 1)))

    def to_device(self, pointer: int, staged: np.ndarray) -> None:
        """Copies `staged` (page-locked: an `_EngineRunner.staging` view) to `pointer`, in stream order."""
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self.transfers.sent(staged)
        check(self.rt.cudaMemcpyAsync(pointer, staged.ctypes.data, staged.nbytes, kind, self.stream))

    def to_host(self, staged: np.ndarray, pointer: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self.transfers.received(staged)
        check(self.rt.cudaMemcpyAsync(staged.ctypes.data, pointer, staged.nbytes, kind, self.stream))

    def synchronize(self) -> None:
        check(self.rt.cudaStreamSynchronize(self.stream))


class _EngineRunner:
    """An execution context with a grow-only device buffer per tensor."""

    def __init__(self, trt, engine, device: _Device):
        self.trt, self.engine, self.device = trt, engine, device
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._buffers: dict[str, tuple[int, int]] = {}
        self._staging: dict[str, tuple[int, int]] = {}  # page-locked host buffers, by tensor
        self._host_inputs: dict[str, np.ndarray] = {}

    def dtype(self, name: str) -> type:
        return self.trt.nptype(self.engine.get_tensor_dtype(name))

    def buffer(self, name: str, nbytes: int) -> int:
        pointer, size = self._buffers.get(name, (0, -1))
        if size < nbytes:
            if pointer:
                check(self.device.rt.cudaFree(pointer))
            pointer = self.device.alloc(nbytes)
            self._buffers[name] = (pointer, nbytes)
        return pointer

    def staging(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A page-locked host array of `name`'s dtype and `shape`, reused across calls: a copy
        from it runs asynchronously, and every run synchronizes before the next reuses it."""
        dtype = np.dtype(self.dtype(name))
        count = int(np.prod(shape))
        pointer, size = self._staging.get(name, (0, -1))
        if size < count * dtype.itemsize:
            if pointer:
                check(self.device.rt.cudaFreeHost(pointer))
            pointer = self.device.alloc_pinned(count * dtype.itemsize)
            self._staging[name] = (pointer, count * dtype.itemsize)
        raw = (ctypes.c_uint8 * max(count * dtype.itemsize, 1)).from_address(pointer)
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def feed(self, name: str, array: np.ndarray) -> None:
        array = np.asarray(array)
        self.context.set_input_shape(name, array.shape)
        if self.engine.is_shape_inference_io(name):  # the pruners' budget: read on the host as a shape
            self._host_inputs[name] = np.ascontiguousarray(array, dtype=self.dtype(name))  # alive until the next feed
            self.context.set_tensor_address(name, self._host_inputs[name].ctypes.data)
            return
        staged = self.staging(name, array.shape)
        staged[...] = array
        pointer = self.buffer(name, staged.nbytes)
        self.device.to_device(pointer, staged)
        self.context.set_tensor_address(name, pointer)

    def device_output(self, name: str) -> tuple[tuple[int, ...], int]:
        """`name`'s shape for the shapes set so far, and the device buffer it is written to."""
        shape = tuple(self.context.get_tensor_shape(name))
        pointer = self.buffer(name, int(np.prod(shape)) * np.dtype(self.dtype(name)).itemsize)
        self.context.set_tensor_address(name, pointer)
        return shape, pointer

    def output(self, name: str) -> tuple[np.ndarray, int]:
        """`name`'s page-locked host array (valid after the stream synchronizes) and device buffer."""
        shape, pointer = self.device_output(name)
        return self.staging(name, shape), pointer

    def execute(self) -> None:
        if not self.context.execute_async_v3(int(self.device.stream)):  # TensorRT takes the raw handle
            raise BundleError("TensorRT failed to run an engine (see its log)")


class TrtGraph(_EngineRunner):
    def run(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for name in self.input_names:
            self.feed(name, feeds[name])
        outputs = [self.output(name) for name in self.output_names]
        self.execute()
        for host, pointer in outputs:
            self.device.to_host(host, pointer)
        self.device.synchronize()
        return [host.copy() for host, _ in outputs]  # the staging buffers are reused by the next run


class TrtDecoder(_EngineRunner):
    """The portable decoder engine with its KV cache in device memory, ping-ponged between steps.
    `embed`: the embed engine's graph runner; `decode` runs that engine in a context of its own
    (an execution context is not shared across threads, and the service's request threads run
    the graph runner's)."""

    def __init__(self, trt, engine, device: _Device, spec: DecoderSpec, capacity: int,
                 embed: TrtGraph | None = None):
        super().__init__(trt, engine, device)
        self.transfers = device.transfers
        self.embedder = _EngineRunner(trt, embed.engine, device) if embed is not None else None
        self.spec, self.capacity, self.past_length = spec, capacity, 0
        self.past_names, self.present_names = spec.past_names, spec.present_names
        itemsize = np.dtype(self.dtype(self.past_names[0])).itemsize
        nbytes = spec.num_kv_heads * capacity * spec.head_dim * itemsize
        self.caches = [self._cache_pair(nbytes) for _ in self.past_names]
        self.current = 0  # which buffer of each pair holds the past
        self._zeros: dict[str, tuple[int, int]] = {}  # optional inputs' zeroed buffers: pointer, bytes

    def _cache_pair(self, nbytes: int) -> tuple[int, int]:
        """The (past, present) buffers of one cache tensor: two, used alternately."""
        return self.device.alloc(nbytes), self.device.alloc(nbytes)

    def _past_shape(self) -> tuple[int, ...]:
        return 1, self.spec.num_kv_heads, self.past_length, self.spec.head_dim

    def reset(self) -> None:
        self.past_length, self.current = 0, 0

    def step(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             extras: Extras | None = None) -> np.ndarray:
        self._check_room(inputs_embeds.shape[1])
        self.feed("inputs_embeds", inputs_embeds)
        return self._run(inputs_embeds.shape, attention_mask, position_ids, extras)

    def decode(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
        """The embed engine writes the step's embeddings into a device buffer the decoder reads."""
        if self.embedder is None:
            raise ZspaError("this decoder session was opened without the embed engine: it takes embeddings (step)")
        self._check_room(input_ids.shape[1])
        self.embedder.feed("input_ids", input_ids)
        shape, pointer = self.embedder.device_output("inputs_embeds")
        self.embedder.execute()  # on the same stream: the decoder's run below follows it
        self.context.set_input_shape("inputs_embeds", shape)
        self.context.set_tensor_address("inputs_embeds", pointer)
        return self._run(shape, attention_mask, position_ids, None)

    def _bind_zeros(self, name: str, item: OptionalInput) -> None:
        """Points `name` at a device buffer cleared once (cudaMemsetAsync) and grown to twice the
        need when a step outgrows it: a decode step copies no zeros."""
        pointer, size = self._zeros.get(name, (0, -1))
        if size < item.nbytes:
            if pointer:
                check(self.device.rt.cudaFree(pointer))
            pointer, size = self.device.alloc(2 * item.nbytes), 2 * item.nbytes
            check(self.device.rt.cudaMemsetAsync(pointer, 0, size, self.device.stream))
            self._zeros[name] = (pointer, size)
        self.context.set_input_shape(name, item.shape)
        self.context.set_tensor_address(name, pointer)

    def _check_room(self, steps: int) -> None:
        if self.past_length + steps > self.capacity:
            raise InvalidInputError(f"the engines hold {self.capacity} positions; this step needs "
                                    f"{self.past_length + steps} (rebuild with a larger zspa-build --max-context)")

    def _run(self, embeds_shape: tuple[int, ...], attention_mask: np.ndarray, position_ids: np.ndarray,
             extras: Extras | None) -> np.ndarray:
        """Runs a step whose `inputs_embeds` are bound; returns the last position's logits."""
        total = self.past_length + embeds_shape[1]
        self.feed("attention_mask", attention_mask)
        self.feed("position_ids", position_ids)
        dtype = self.dtype("inputs_embeds")
        for name, item in optional_inputs(self.spec, embeds_shape, dtype, attention_mask.shape, extras).items():
            if item.value is None:
                self._bind_zeros(name, item)
            else:
                self.feed(name, item.value)
        past_shape = self._past_shape()
        for name, present, buffers in zip(self.past_names, self.present_names, self.caches):
            self.context.set_input_shape(name, past_shape)
            self.context.set_tensor_address(name, buffers[self.current])
            self.context.set_tensor_address(present, buffers[1 - self.current])
        logits, pointer = self.output("logits")
        self.execute()
        self.device.to_host(logits, pointer)
        self.device.synchronize()
        self.current, self.past_length = 1 - self.current, total
        return logits[:, -1, :].astype(np.float32)  # a copy: the staging buffer is reused by the next step


class TrtStaticDecoder(TrtDecoder):
    """The static-cache decoder engine: one [1, Hkv, capacity, Dh] buffer per cache tensor, bound
    as both past and present (the engine's KV-cache update writes each step's new positions in
    place), so every decode step binds the same shapes. The buffers start zeroed: attention reads
    the whole capacity under its mask, and a masked 0 times uninitialised NaN is NaN."""

    def _cache_pair(self, nbytes: int) -> tuple[int, int]:
        pointer = self.device.alloc(nbytes)
        check(self.device.rt.cudaMemsetAsync(pointer, 0, nbytes, self.device.stream))
        return pointer, pointer

    def _past_shape(self) -> tuple[int, ...]:
        return 1, self.spec.num_kv_heads, self.capacity, self.spec.head_dim


class TrtBackend:
    """Engines from `BUNDLE/engines/<gpu>-sm<cc>-trt<version>/`, checked against this device,
    this TensorRT and the bundle's graphs before anything runs."""

    def __init__(self, bundle: Bundle):
        trt = import_tensorrt()
        gpu, capability = cuda_device()
        folder = bundle.path / "engines" / engine_dir_name(gpu, capability, trt.__version__)
        if not folder.is_dir():
            raise BundleError(f"no TensorRT engines for this {gpu} and TensorRT {trt.__version__} in "
                              f"{bundle.path / 'engines'}; build them here with: zspa-build {bundle.path}")
        self.record = BuildRecord.read(folder)
        self.record.check(bundle.manifest, gpu, capability, trt.__version__)
        self.trt, self.folder = trt, folder
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.device = _Device()
        self.providers = [f"TensorRT {trt.__version__} ({gpu})"]
        self.transfers = self.device.transfers

    def _engine(self, path: Path):
        plan = self.folder / f"{path.stem}.plan"
        if not plan.is_file():
            raise BundleError(f"{plan}: missing; rebuild with zspa-build")
        engine = self.runtime.deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise BundleError(f"{plan}: TensorRT cannot load this engine; rebuild with zspa-build")
        return engine

    def graph(self, path: Path) -> TrtGraph:
        return TrtGraph(self.trt, self._engine(path), self.device)

    def decoder(self, path: Path, spec: DecoderSpec, capacity: int, embed: TrtGraph | None = None) -> TrtDecoder:
        """A static cache is the engines' whole context (its capacity is a fixed dimension of the
        engine); the pipeline's `capacity` still bounds what requests may use."""
        if spec.kv_cache == "static":
            return TrtStaticDecoder(self.trt, self._engine(path), self.device, spec, self.record.max_context, embed)
        return TrtDecoder(self.trt, self._engine(path), self.device, spec, min(capacity, self.record.max_context),
                          embed)
