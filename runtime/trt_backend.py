"""`--backend trt`: the engines `zspa-build` wrote, run by the TensorRT runtime (TensorRT 10 API).

Named tensors: `set_input_shape`, `set_tensor_address`, `execute_async_v3` on one CUDA stream,
device memory through cuda-python. Graph runners keep grow-only device buffers per tensor. The
decoder keeps its KV cache on the device across steps: two buffers per cache tensor, sized for
the engines' context, serve alternately as past and present (the portable graph writes past+new
into present), so no cache byte crosses to the host. CUDA graphs are not used for the decode
step: the portable graph's past length changes every step, and a captured graph fixes shapes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from zspa.errors import BundleError, InvalidInputError
from zspa.manifest import DecoderSpec
from zspa.runtime.bundle import Bundle
from zspa.runtime.cuda import check, cuda_device, cudart, import_tensorrt
from zspa.runtime.decoder_inputs import Extras, optional_inputs
from zspa.runtime.engines import BuildRecord, engine_dir_name


class _Device:
    """A CUDA stream and the copies and allocations the runners need."""

    def __init__(self):
        self.rt = cudart()
        self.stream = check(self.rt.cudaStreamCreate())

    def alloc(self, nbytes: int) -> int:
        return check(self.rt.cudaMalloc(max(nbytes, 1)))

    def to_device(self, pointer: int, array: np.ndarray) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        check(self.rt.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, self.stream))

    def to_host(self, array: np.ndarray, pointer: int) -> None:
        kind = self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        check(self.rt.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes, kind, self.stream))

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

    def feed(self, name: str, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=self.dtype(name))
        self.context.set_input_shape(name, array.shape)
        if self.engine.is_shape_inference_io(name):  # the pruners' budget: read on the host as a shape
            self._host_inputs[name] = array  # kept alive until the next feed
            self.context.set_tensor_address(name, array.ctypes.data)
            return
        pointer = self.buffer(name, array.nbytes)
        self.device.to_device(pointer, array)
        self.context.set_tensor_address(name, pointer)

    def output(self, name: str) -> tuple[np.ndarray, int]:
        host = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtype(name))
        pointer = self.buffer(name, host.nbytes)
        self.context.set_tensor_address(name, pointer)
        return host, pointer

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
        return [host for host, _ in outputs]


class TrtDecoder(_EngineRunner):
    """The portable decoder engine with its KV cache in device memory, ping-ponged between steps."""

    def __init__(self, trt, engine, device: _Device, spec: DecoderSpec, capacity: int):
        super().__init__(trt, engine, device)
        self.spec, self.capacity, self.past_length = spec, capacity, 0
        self.past_names, self.present_names = spec.past_names, spec.present_names
        itemsize = np.dtype(self.dtype(self.past_names[0])).itemsize
        nbytes = spec.num_kv_heads * capacity * spec.head_dim * itemsize
        self.caches = [(device.alloc(nbytes), device.alloc(nbytes)) for _ in self.past_names]
        self.current = 0  # which buffer of each pair holds the past

    def reset(self) -> None:
        self.past_length, self.current = 0, 0

    def step(self, inputs_embeds: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             extras: Extras | None = None) -> np.ndarray:
        total = self.past_length + inputs_embeds.shape[1]
        if total > self.capacity:
            raise InvalidInputError(f"the engines hold {self.capacity} positions; this step needs {total} "
                                    "(rebuild with a larger zspa-build --max-context)")
        self.feed("inputs_embeds", inputs_embeds)
        self.feed("attention_mask", attention_mask)
        self.feed("position_ids", position_ids)
        for name, value in optional_inputs(self.spec, inputs_embeds, attention_mask, extras).items():
            self.feed(name, value)
        past_shape = (1, self.spec.num_kv_heads, self.past_length, self.spec.head_dim)
        for name, present, buffers in zip(self.past_names, self.present_names, self.caches):
            self.context.set_input_shape(name, past_shape)
            self.context.set_tensor_address(name, buffers[self.current])
            self.context.set_tensor_address(present, buffers[1 - self.current])
        logits, pointer = self.output("logits")
        self.execute()
        self.device.to_host(logits, pointer)
        self.device.synchronize()
        self.current, self.past_length = 1 - self.current, total
        return logits[:, -1, :].astype(np.float32, copy=False)


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

    def decoder(self, path: Path, spec: DecoderSpec, capacity: int) -> TrtDecoder:
        return TrtDecoder(self.trt, self._engine(path), self.device, spec, min(capacity, self.record.max_context))
