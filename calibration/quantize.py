"""Quantizing one bundle graph: each function writes `target` and returns its manifest record.

- INT8 static Q/DQ (onnxruntime): symmetric int8 activations and per-channel int8 weights on
  Conv/MatMul/Gemm, ranges by MinMax over the calibration feeds. Symmetric because ARM cores
  (Jetson) and TensorRT both want it; only the matrix products, because LayerNorm and softmax
  lose more accuracy in int8 than they save. Weights use 7 bits of the 8 (`reduce_range`): x86
  CPUs without VNNI (AVX2 only, AMD Zen 2/3 among them) run u8×s8 products with VPMADDUBSW, which
  saturates a pair of products at 16 bits; with |w| ≤ 64 a pair is at most 2·255·64 = 32,640 and
  never saturates, so a bundle keeps the same accuracy on whatever CPU runs it (onnxruntime's
  quantization docs: reduce_range or U8U8 there).
- INT4 / INT8 weight-only (onnxruntime MatMulNBits): block-wise symmetric round-to-nearest
  weights, activations kept in float; the decoder's memory traffic per token drops about 8x
  (int4) or 4x (int8) from fp32. INT8 is the closer of the two to fp32, llama.cpp's q8_0 peer.
- ModelOpt ONNX PTQ (INT8 / FP8): explicit Q/DQ graphs for TensorRT, calibrated on the same feeds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

from zspa.calibration.recording import Feeds
from zspa.errors import ZspaError
from zspa.onnx_ir import declare_oldest_ir_version, declare_oldest_ir_version_in_file

# The module configures the root logger at INFO on import and then logs every node; keep it to warnings.
logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

MODELOPT_PRECISIONS = ("int8", "fp8")


class _FeedReader(CalibrationDataReader):
    def __init__(self, feeds: list[Feeds]):
        self._feeds: Iterator[Feeds] = iter(feeds)

    def get_next(self) -> Feeds | None:
        return next(self._feeds, None)


def quantize_int8_static(source: Path, target: Path, feeds: list[Feeds], external_data: bool = False) -> dict[str, Any]:
    quantize_static(
        str(source), str(target), _FeedReader(feeds), quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True, activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        reduce_range=True, use_external_data_format=external_data,
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )
    declare_oldest_ir_version_in_file(target)
    return {"precision": "int8", "method": "onnxruntime static QDQ", "activations": "int8 symmetric, MinMax",
            "weights": "int8 symmetric per-channel, 7-bit range [-64, 64]", "reduce_range": True,
            "why_reduce_range": "no 16-bit saturation in x86 u8s8 kernels without VNNI (AVX2-only CPUs)",
            "ops": ["Conv", "MatMul", "Gemm"], "samples": len(feeds)}


WEIGHT_ONLY_BITS = {"int4": 4, "int8": 8}


def quantize_weights(source: Path, target: Path, precision: str, block_size: int = 32,
                     external_data: bool = False) -> dict[str, Any]:
    """Every MatMul's weights to `precision` ("int4" or "int8") in blocks of `block_size`.
    `accuracy_level` 4 lets the CPU kernel run the products in int8, as onnxruntime-genai does."""
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=WEIGHT_ONLY_BITS[precision],
                                     block_size=block_size, is_symmetric=True, accuracy_level=4)
    quantizer.process()
    declare_oldest_ir_version(quantizer.model.model)
    quantizer.model.save_model_to_file(str(target), use_external_data_format=external_data)
    return {"precision": precision, "method": "onnxruntime MatMulNBits (weight-only, round to nearest)",
            "weights": f"{precision} symmetric, blocks of {block_size}", "activations": "float", "accuracy_level": 4}


def quantize_modelopt(source: Path, target: Path, feeds: list[Feeds], precision: str,
                      external_data: bool = False) -> dict[str, Any]:
    """NVIDIA ModelOpt's ONNX PTQ: Q/DQ placed for TensorRT's explicit quantization. ModelOpt takes one
    array per input, so feeds of different lengths are cut to their common prefix (a causal decoder's
    prefix of a real sequence is itself a real input)."""
    if precision not in MODELOPT_PRECISIONS:
        raise ZspaError(f"ModelOpt precision must be one of {MODELOPT_PRECISIONS}, got {precision!r}")
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError:
        raise ZspaError("TensorRT quantization needs NVIDIA ModelOpt: pip install 'nvidia-modelopt[onnx]'") from None
    calibration = {name: np.concatenate(_common_prefix([f[name] for f in feeds])) for name in feeds[0]}
    # ModelOpt's default execution providers include CUDA and TensorRT; a workstation may have neither.
    providers = ["cuda:0", "cpu"] if "CUDAExecutionProvider" in ort.get_available_providers() else ["cpu"]
    quantize(onnx_path=str(source), quantize_mode=precision, calibration_data=calibration,
             calibration_method="max", calibration_eps=providers, output_path=str(target),
             use_external_data_format=external_data)
    declare_oldest_ir_version_in_file(target)
    return {"precision": precision, "method": "NVIDIA ModelOpt ONNX PTQ (max calibration)", "samples": len(feeds),
            "target": "TensorRT explicit quantization"}


def _common_prefix(arrays: list[np.ndarray]) -> list[np.ndarray]:
    shape = np.min([a.shape for a in arrays], axis=0)
    return [a[tuple(slice(0, n) for n in shape)] for a in arrays]
