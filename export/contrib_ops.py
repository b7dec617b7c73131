"""onnxruntime contrib operators (`com.microsoft`) for the dynamo exporter: the schema onnxscript
needs to emit a node it does not know, from the inputs, outputs and attributes zspa uses
(onnxruntime's ContribOperators.md)."""

from __future__ import annotations

from onnx.defs import OpSchema
from onnxscript import values
from onnxscript._internal.values import Op

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
    return Op(values.Opset("com.microsoft", 1), name, schema)
