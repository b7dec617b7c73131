"""How far a quantized bundle strays from its source: the same prompts through both, greedily."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from zspa.calibration.dataset import CalibrationSample
from zspa.evaluation import kl_divergence
from zspa.manifest import Manifest
from zspa.runtime.pipeline import Pipeline


def measure_fidelity(reference: Pipeline, candidate: Pipeline, samples: list[CalibrationSample], *, keep: float,
                     method: str | None, max_new_tokens: int, progress: bool = True) -> dict[str, float]:
    """Greedy answers equal token for token, first tokens equal, and the mean KL(reference ‖
    candidate) of the first-token distributions."""
    same_answer, same_first, kls = [], [], []
    for sample in tqdm(samples, desc="fidelity", unit="prompt", disable=not progress):
        ref, out = (p.generate(sample.image, sample.prompt, keep=keep, method=method, max_new_tokens=max_new_tokens)
                    for p in (reference, candidate))
        same_answer.append(ref.token_ids == out.token_ids)
        same_first.append(int(np.argmax(ref.first_token_logits)) == int(np.argmax(out.first_token_logits)))
        kls.append(kl_divergence(ref.first_token_logits, out.first_token_logits))
    return {"prompts": len(samples), "max_new_tokens": max_new_tokens,
            "greedy_agreement": float(np.mean(same_answer)), "first_token_agreement": float(np.mean(same_first)),
            "mean_first_token_kl": float(np.mean(kls))}


def graph_bytes(root: Path, manifest: Manifest, names: Iterable[str] | None = None) -> int:
    """Bytes on disk of the named graphs (all by default), external data included."""
    total = 0
    for name in names or manifest.graphs:
        spec = manifest.graphs[name]
        total += sum((root / f).stat().st_size for f in [spec.file, *spec.data_files])
    return total
