"""Declaring the oldest ONNX IR version a graph needs, so that bundles load on older onnxruntime
builds: onnx 1.23 stamps IR 14 on everything it writes, while JetPack 6's onnxruntime (1.18–1.20)
reads IR ≤ 10 and the last onnxruntime wheels for Python 3.10 (1.23) IR ≤ 11. An opset-18 graph
needs IR 8 only."""

from __future__ import annotations

from pathlib import Path


def oldest_ir_version(model) -> int:
    """The IR version of the first onnx release that shipped the graph's default-domain opset."""
    from onnx import helper

    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)
    return min(ir for _release, ir, ai_onnx, *_ in helper.VERSION_TABLE if ai_onnx >= opset)


def declare_oldest_ir_version(model) -> None:
    model.ir_version = min(model.ir_version, oldest_ir_version(model))


def declare_oldest_ir_version_in_file(path: Path) -> None:
    """The same, on a saved graph (its external weights stay where they are)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    declare_oldest_ir_version(model)
    onnx.save(model, str(path))
