"""Operators onnxscript's torch library does not emit, for the dynamo exporter's translation
tables: onnxruntime contrib operators (`com.microsoft`), from the inputs, outputs and attributes
zspa uses (onnxruntime's ContribOperators.md), and standard ONNX operators newer than the
library's opset (`TensorScatter` and `Attention` of opset 24), from onnx's own schemas."""

from __future__ import annotations

import onnx.defs
from onnx.defs import OpSchema
from onnxscript.values import Op, Opset

FLOATS = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]


def contrib_op(name: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str]],
               types: dict[str, list[str]], attributes: dict[str, OpSchema.AttrType]) -> Op:
    """An onnxscript op for `com.microsoft.{name}`; inputs and outputs as (name, type variable)."""
    parameter = OpSchema.FormalParameter
    schema = OpSchema(
        name, "com.microsoft", 1,
        inputs=[parameter(n, t) for n, t in inputs], outputs=[parameter(n, t) for n, t in outputs],
        type_constraints=[(variable, allowed, "") for variable, allowed in types.items()],
        attributes=[OpSchema.Attribute(attribute, kind, "") for attribute, kind in attributes.items()],
    )
    return Op(Opset("com.microsoft", 1), name, schema)


def standard_op(name: str, version: int) -> Op:
    """An onnxscript op for the standard ONNX `name` as of opset `version` (the graph must be
    exported at that opset). Ops with optional outputs return them all: take the ones used."""
    return Op(Opset("", version), name, onnx.defs.get_schema(name, version, ""))
