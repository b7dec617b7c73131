"""Export-time parity: each exported graph against the transformers module it came from.

The figures (max absolute difference) go into the manifest, so a bundle carries the evidence
that it computes what the source model computes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from zspa.errors import ZspaError

# fp32 graphs must agree to this relative tolerance (of the reference's largest magnitude).
RELATIVE_TOLERANCE = {"float32": 1e-4, "float16": 2e-2}


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _check(what: str, ours: np.ndarray, reference: torch.Tensor, dtype: str) -> float:
    ref = reference.float().numpy()
    diff = float(np.abs(ours.astype(np.float32) - ref).max())
    scale = max(1.0, float(np.abs(ref).max()))
    if not diff <= RELATIVE_TOLERANCE[dtype] * scale:
        raise ZspaError(f"parity check failed for {what}: max abs diff {diff:.3g} against transformers")
    return diff


@torch.no_grad()
def check_parity(
    graphs_dir: Path, vision: torch.nn.Module, decoder: torch.nn.Module, embed: torch.nn.Module, *,
    pixel_values: torch.Tensor, input_ids: torch.Tensor, num_kv_heads: int, head_dim: int, num_layers: int,
    dtype: str,
) -> dict[str, float]:
    """Vision features, embeddings and decoder logits (prefill, then one decode step), ORT vs torch."""
    report = {}
    features = vision(pixel_values)
    ours = _session(graphs_dir / "vision.onnx").run(None, {"pixel_values": pixel_values.numpy()})[0]
    report["vision_max_abs_diff"] = _check("vision", ours, features, dtype)

    embeds = embed(input_ids)
    ours = _session(graphs_dir / "embed.onnx").run(None, {"input_ids": input_ids.numpy()})[0]
    report["embed_max_abs_diff"] = _check("embed", ours, embeds, dtype)

    # Prefill: the image features spliced after the text, from an empty cache; then one step.
    sequence = torch.cat([embeds, features], dim=1)
    batch = sequence.shape[0]
    empty = torch.zeros(batch, num_kv_heads, 0, head_dim, dtype=sequence.dtype)
    session = _session(graphs_dir / "decoder.onnx")
    names = [i.name for i in session.get_inputs()]
    worst = 0.0
    past = [empty] * (2 * num_layers)
    step_inputs = sequence
    position = 0
    for _ in range(2):
        step = step_inputs.shape[1]
        mask = torch.ones(batch, position + step, dtype=torch.int64)
        positions = torch.arange(position, position + step).expand(batch, step).contiguous()
        reference = decoder(step_inputs, mask, positions, *past)
        feeds = dict(zip(names, [t.numpy() for t in (step_inputs, mask, positions, *past)]))
        ours = session.run(None, feeds)
        worst = max(worst, _check("decoder logits", ours[0], reference[0], dtype))
        past = list(reference[1:])
        position += step
        step_inputs = embed(reference[0].argmax(-1))
    report["logits_max_abs_diff"] = worst
    return report
