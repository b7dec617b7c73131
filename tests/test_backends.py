"""Backend names → onnxruntime execution providers, and a clear error where a provider is missing."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from zspa.errors import InvalidInputError, ZspaError
from zspa.runtime.backends import ORT_BACKENDS, OrtBackend, execution_providers

HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def test_each_backend_falls_back_to_cpu(tmp_path):
    for backend in ORT_BACKENDS:
        providers = execution_providers(backend, tmp_path, fp16=False)
        assert providers[-1] == "CPUExecutionProvider"
    assert execution_providers("ort-cuda", tmp_path, fp16=False)[0] == "CUDAExecutionProvider"


@pytest.mark.parametrize("fp16", [True, False])
def test_tensorrt_provider_caches_engines_in_the_bundle(tmp_path, fp16):
    name, options = execution_providers("ort-trt", tmp_path / "engines" / "ort-trt", fp16=fp16)[0]
    assert name == "TensorrtExecutionProvider"
    assert options["trt_engine_cache_enable"] == "True" and options["trt_timing_cache_enable"] == "True"
    assert Path(options["trt_engine_cache_path"]) == tmp_path / "engines" / "ort-trt"
    assert options["trt_fp16_enable"] == str(fp16)


def test_unknown_backend_is_refused(tmp_path):
    with pytest.raises(InvalidInputError, match="ort-cpu, ort-cuda, ort-trt"):
        execution_providers("tensorflow", tmp_path, fp16=False)


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has CUDA; tests/gpu covers the GPU backends")
def test_missing_gpu_provider_says_what_to_install(tiny_bundle, photo_path, capsys):
    with pytest.raises(ZspaError, match="onnxruntime-gpu"):
        OrtBackend(execution_providers("ort-cuda", Path("unused"), fp16=False))
    from zspa.cli.run import main

    assert main([str(tiny_bundle), "--image", str(photo_path), "--prompt", "hi", "--backend", "ort-trt"]) == 1
    assert "TensorrtExecutionProvider" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None,
                    reason="TensorRT is installed: tests/gpu runs the trt backend")
def test_trt_backend_without_tensorrt_says_what_to_install(tiny_bundle, photo_path, capsys):
    from zspa.cli.run import main

    assert main([str(tiny_bundle), "--image", str(photo_path), "--prompt", "hi", "--backend", "trt"]) == 1
    assert "needs TensorRT" in capsys.readouterr().err


def one_node_graph(path: Path, op: str, inputs: list[str], shape: list[int], constants=()) -> Path:
    """Saves a float graph of one `op` node with input x and output y of `shape` at `path`."""
    value = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node(op, inputs, ["y"])], op, [value("x", TensorProto.FLOAT, shape)],
                              [value("y", TensorProto.FLOAT, shape)], list(constants))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_cpu_sessions_flush_denormals_in_their_worker_threads(tmp_path):
    """Halving the smallest normal float gives a denormal under IEEE rules, zero when flushed. The
    calling thread keeps IEEE rules, and how much of the work the workers take is onnxruntime's
    choice (over half on a Xeon, 5/8 on an EPYC, 3/16 once on a loaded CI runner), so the test
    asserts only that the workers' part, over a few runs, comes back flushed."""
    size = 1 << 22
    path = one_node_graph(tmp_path / "halve.onnx", "Mul", ["x", "half"], [size],
                          [helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])])
    x = np.full(size, np.finfo(np.float32).tiny, np.float32)

    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    flushing = OrtBackend(threads=4).graph(path)
    flushed_counts = [int(np.count_nonzero(flushing.run({"x": x})[0] == 0)) for _ in range(5)]
    assert np.count_nonzero(plain == 0) == 0
    assert max(flushed_counts) > 0, flushed_counts


def test_cpu_sessions_spin_only_while_they_run(tmp_path):
    """Worker threads spin between a run's parallel sections (a decode step is hundreds of small
    nodes) and stop when the run returns: left spinning, a session burns a core for tens of
    milliseconds after each run, taken from whichever graph runs next. The control session, which
    spins without stopping, shows that the measurement sees spinning."""
    path = one_node_graph(tmp_path / "square.onnx", "MatMul", ["x", "x"], [512, 512])
    x = np.ones((512, 512), np.float32)

    def idle_cpu_ms(run) -> float:
        run()
        start = time.process_time()
        time.sleep(0.2)
        return (time.process_time() - start) * 1000

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    control = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ours = OrtBackend(threads=2).graph(path)
    assert idle_cpu_ms(lambda: control.run(None, {"x": x})) > 5
    assert idle_cpu_ms(lambda: ours.run({"x": x})) < 5
