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
from zspa.export.graphs import vision_outputs
from zspa.manifest import DecoderSpec
from zspa.runtime.backends import OrtBackend

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
    vision_inputs: dict[str, torch.Tensor], input_ids: torch.Tensor, decoder_spec: DecoderSpec, max_context: int,
    dtype: str,
) -> dict[str, float]:
    """Vision features, embeddings and decoder logits (prefill, then one decode step), ORT vs
    torch. The decoder graph runs through the runtime's own session for its KV-cache kind, so a
    shared-buffer graph is checked exactly as it will run, against transformers' attention."""
    report = {}
    features, *planes = vision_outputs(vision, vision_inputs)
    ours = _session(graphs_dir / "vision.onnx").run(None, {k: v.numpy() for k, v in vision_inputs.items()})
    report["vision_max_abs_diff"] = max(_check("vision", mine, theirs, dtype)
                                        for mine, theirs in zip(ours, (features, *planes), strict=True))

    embeds = embed(input_ids)
    ours = _session(graphs_dir / "embed.onnx").run(None, {"input_ids": input_ids.numpy()})[0]
    report["embed_max_abs_diff"] = _check("embed", ours, embeds, dtype)

    # Prefill: the image features spliced after the text, from an empty cache; then one step.
    # DeepStack planes sit at the image rows of the prefill and are zeros elsewhere and after; the
    # image rows are one bidirectional block where the decoder takes image_block_ids.
    sequence = torch.cat([embeds, features], dim=1)
    optional = {}
    if planes:
        optional["deepstack_embeds"] = torch.cat([torch.zeros(len(planes), *embeds.shape), torch.stack(planes)], 2)
    if decoder_spec.image_blocks:
        optional["image_block_ids"] = torch.cat([torch.zeros_like(input_ids), torch.ones(1, features.shape[1],
                                                                                          dtype=torch.int64)], 1)
    session = OrtBackend().decoder(graphs_dir / "decoder.onnx", decoder_spec, max_context)
    empty = torch.zeros(1, decoder_spec.num_kv_heads, 0, decoder_spec.head_dim, dtype=sequence.dtype)
    past = [empty] * (2 * decoder_spec.num_layers)
    worst, step_inputs, position = 0.0, sequence, 0
    for _ in range(2):
        step = step_inputs.shape[1]
        mask = torch.ones(1, position + step, dtype=torch.int64)
        positions = torch.arange(position, position + step).view(1, step)
        positions = positions.expand(3, 1, step) if decoder_spec.mrope else positions
        reference = decoder(step_inputs, mask, positions, *optional.values(), *past)
        ours = session.step(step_inputs.numpy(), mask.numpy(), positions.numpy(),
                            {name: value.numpy() for name, value in optional.items()})
        worst = max(worst, _check("decoder logits", ours, reference[0][:, -1], dtype))
        past = list(reference[1:])
        position += step
        step_inputs = embed(reference[0].argmax(-1))
        if planes:
            optional["deepstack_embeds"] = torch.zeros(len(planes), *step_inputs.shape)
        if decoder_spec.image_blocks:
            optional["image_block_ids"] = torch.zeros(1, position + 1, dtype=torch.int64)
    report["logits_max_abs_diff"] = worst
    return report
