"""Exporting one torch module to one ONNX graph with the dynamo exporter, and describing it."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch

from zspa.integrity import sha256_file
from zspa.manifest import GraphSpec, TensorSpec
from zspa.onnx_ir import declare_oldest_ir_version

# Graphs whose weights pass this many bytes keep them in an external .data file (protobuf's 2 GB cap).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
}


def export_graph(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    path: Path,
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_axes: dict[str, dict[int, str]],
    opset: int,
    custom_translation_table: dict | None = None,
) -> None:
    """Exports `module(*args)` to `path`.

    `dynamic_axes` names the symbolic axes of inputs and outputs (optimum's names:
    batch_size, sequence_length, past_sequence_length, total_sequence_length); every other axis
    is static. The example batch must be ≥ 2 or torch.export specialises it to 1.
    """
    dynamic = torch.export.Dim.DYNAMIC
    shapes = [{axis: dynamic for axis in dynamic_axes.get(name, {})} or None for name in input_names]
    n_fixed = _positional_count(module)
    dynamic_shapes = (*shapes[:n_fixed], tuple(shapes[n_fixed:])) if n_fixed < len(shapes) else tuple(shapes)
    # The exporter narrates every step on stdout and logs optional-op warnings (torchvision);
    # the caller shows its own progress instead.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            verbose=False,
            custom_translation_table=custom_translation_table,
        )
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_THRESHOLD)
    _tidy(path, dynamic_axes)


def _positional_count(module: torch.nn.Module) -> int:
    """Number of named positional parameters before a `*args` (the flat KV cache), if any."""
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    if params and params[-1].kind is inspect.Parameter.VAR_POSITIONAL:
        return len(params) - 1
    return len(params)


def _tidy(path: Path, dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Names the symbolic axes, drops the exporter's per-node debug metadata (FX node text and
    stack traces, most of a small graph's bytes) and declares the oldest IR version the graph
    needs (older onnxruntime builds refuse newer ones). External weights stay where they are."""
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        del node.metadata_props[:]
    for value in [*model.graph.input, *model.graph.output]:
        for axis, name in dynamic_axes.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            dim.ClearField("dim_value")
            dim.dim_param = name
    declare_oldest_ir_version(model)
    onnx.save(model, str(path))


def describe_graph(path: Path) -> GraphSpec:
    """The manifest entry of a saved graph: file, hashes, inputs and outputs with symbolic dims."""
    model = onnx.load(str(path), load_external_data=False)
    data_files = sorted(
        {
            entry.value
            for tensor in model.graph.initializer
            if tensor.data_location == onnx.TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
    )

    def specs(values) -> list[TensorSpec]:
        return [
            TensorSpec(
                name=v.name,
                dtype=_ONNX_DTYPES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                shape=[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            )
            for v in values
        ]

    return GraphSpec(
        file=path.name,
        sha256=sha256_file(path),
        inputs=specs(model.graph.input),
        outputs=specs(model.graph.output),
        data_files={name: sha256_file(path.parent / name) for name in data_files},
    )


def node_count(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)
