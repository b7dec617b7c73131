"""Full attention over an image's patches through onnxruntime's fused `MultiHeadAttention`.

The Qwen-VL towers attend over every patch of the image in their full-attention blocks. Spelled
as MatMul → Softmax → MatMul, onnxruntime materialises the P×P scores of every head: at 896×672
(2,352 patches at 16 px, 16 heads of 64) one such attention took 152 ms and 1.45 GB more memory
on 2 Xeon cores, 388 ms and 3.35 GB at 1280×720. `com.microsoft.MultiHeadAttention` runs it
tiled: 99 ms and 40 MB (319 ms and 62 MB at 1280×720); ONNX's opset-23 `Attention` measured
149 ms and 364 MB, and onnxruntime before 1.23 (JetPack 6 ships 1.18–1.20) lacks it
(`benchmarks/vision_attention.py`).

TensorRT's ONNX parser cannot take the contrib op, and JetPack 6's TensorRT 10.3 has no
`Attention` importer either; it fuses the primitive pattern itself. So `zspa-build` expands each
node back into that pattern, query scaled before the first product as TensorRT's fusion asks
(`trt_build.expand_for_tensorrt`); the bundle keeps one vision graph for every backend.
"""

from __future__ import annotations

import torch
from onnx.defs import OpSchema

from zspa.export.contrib_ops import FLOATS, contrib_op

_MHA_OP = contrib_op(
    "MultiHeadAttention",
    inputs=[("query", "T"), ("key", "T"), ("value", "T")],
    outputs=[("output", "T")],
    types={"T": FLOATS},
    attributes={"num_heads": OpSchema.AttrType.INT, "scale": OpSchema.AttrType.FLOAT},
)


@torch.library.custom_op("zspa::multi_head_attention", mutates_args=())
def multi_head_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, num_heads: int,
                         scale: float) -> torch.Tensor:
    """Eager reference of the contrib op: q, k, v [B, S, heads·Dh] → softmax(q·kᵀ·scale)·v per head,
    [B, S, heads·Dh] (softmax in float32, as transformers' eager attention)."""
    batch, steps, width = query.shape
    q, k, v = (t.view(batch, -1, num_heads, width // num_heads).transpose(1, 2) for t in (query, key, value))
    weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * scale, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v).transpose(1, 2).reshape(batch, steps, width)


@multi_head_attention.register_fake
def _(query, key, value, num_heads, scale):
    return torch.empty_like(query)


def _multi_head_attention_onnx(query, key, value, num_heads: int, scale: float):
    return _MHA_OP(query, key, value, num_heads=num_heads, scale=scale)


TRANSLATION_TABLE = {torch.ops.zspa.multi_head_attention.default: _multi_head_attention_onnx}


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Every patch attends to every patch of its image (one image per call): q, k, v
    [patches, heads, head_dim] → [patches, heads, head_dim]."""
    patches, heads, head_dim = q.shape
    flat = [t.reshape(1, patches, heads * head_dim) for t in (q, k, v)]
    return torch.ops.zspa.multi_head_attention(*flat, heads, float(scaling)).view(patches, heads, head_dim)


def tower_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0, **kwargs):
    """transformers' attention-function signature over the fused op, for towers whose blocks attend
    over a whole tile without a mask (InternViT): q, k, v [B, heads, S, Dh] → ([B, S, heads, Dh], None)."""
    if attention_mask is not None:
        raise ValueError("the fused tower attention takes no mask")
    batch, heads, steps, head_dim = query.shape
    flat = [t.transpose(1, 2).reshape(batch, steps, heads * head_dim) for t in (query, key, value)]
    output = torch.ops.zspa.multi_head_attention(*flat, heads, float(scaling))
    return output.view(batch, steps, heads, head_dim), None


FUSED_TOWER = "zspa_fused_tower"  # the transformers attention-function name `tower_attention` is registered under


class TiledImageFeatures(torch.nn.Module):
    """`pixel_values [T, 3, H, W] → image_features [1, T·n, D]`: a transformers VLM's own
    `get_image_features` over one image's tiles or views (InternVL's tiles, Gemma 3's pan&scan
    views), their tokens in order as one block, its tower's attention through the fused op
    (`tower_attention`, registered as a transformers attention function, so transformers' own
    blocks are what is exported). `feature_kwargs` go to `get_image_features`."""

    def __init__(self, model: torch.nn.Module, **feature_kwargs):
        super().__init__()
        from transformers import AttentionInterface

        AttentionInterface.register(FUSED_TOWER, tower_attention)
        model.model.vision_tower.set_attn_implementation(FUSED_TOWER)
        self.model = model.model
        self.feature_kwargs = feature_kwargs

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.model.get_image_features(pixel_values, **self.feature_kwargs).pooler_output
        return features.reshape(1, -1, features.shape[-1])
