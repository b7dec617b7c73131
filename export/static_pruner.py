"""The zspa 0.1 pruner format: one torch selector traced per keep, K unrolled and N fixed.

zspa-export writes per-request graphs now (`zspa.pruning.onnx_pruner`); this stays to measure them
against the format they replaced (`benchmarks/pruner_graphs.py`) and to make the older bundles the
runtime still loads (tests).
"""

from __future__ import annotations

from pathlib import Path

import torch

from zspa.export.onnx_io import export_graph
from zspa.pruning.graph import PrunerGraph
from zspa.pruning.methods import make_selector


def export_static_pruner(method: str, params: dict, n: int, k: int, hidden: int, path: Path, opset: int = 18) -> None:
    """`image_features [B,N,D], prompt_embeds, prompt_mask → kept_features [B,K,D], kept_indices [B,K]`."""
    generator = torch.Generator().manual_seed(0)
    args = (torch.randn(2, n, hidden, generator=generator), torch.randn(2, 7, hidden, generator=generator),
            torch.ones(2, 7, dtype=torch.int64))
    export_graph(PrunerGraph(make_selector(method, params), k), args, path,
                 input_names=["image_features", "prompt_embeds", "prompt_mask"],
                 output_names=["kept_features", "kept_indices"],
                 dynamic_axes={"image_features": {0: "batch_size"},
                               "prompt_embeds": {0: "batch_size", 1: "prompt_length"},
                               "prompt_mask": {0: "batch_size", 1: "prompt_length"}}, opset=opset)
