"""onnxruntime-genai on the same decoder weights: the reference zspa's decode loop is measured against.

Its model builder turns a text-only Hugging Face directory (the VLM's decoder saved as a
LlamaForCausalLM or Qwen2ForCausalLM) into its own graph with its own fusions (GroupQueryAttention,
SkipSimplifiedLayerNormalization, RotaryEmbedding; MatMulNBits at int4). Needs
`pip install onnxruntime-genai`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The OrtBackend setting (runtime/backends.py) that is not about threads, as a genai config entry.
SESSION_SETTINGS = {"session.set_denormal_as_zero": "1"}


def build_genai_model(text_model: Path, out: Path, precision: str = "fp32") -> Path | None:
    """The builder's CPU model for `text_model` at `precision` (fp32 or int4), or None with the reason
    printed. Its decoder session flushes denormals as zspa's sessions do (1.07x its decode speed at
    context 76, 1.35x at 594 on a 2-core Xeon); its own threading defaults stay."""
    built = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(text_model),
                            "-o", str(out), "-p", precision, "-e", "cpu"], capture_output=True, text=True)
    if built.returncode != 0:
        print(f"onnxruntime-genai model builder ({precision}) failed:\n{built.stderr[-2000:]}")
        return None
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    config["model"]["decoder"]["session_options"].update(SESSION_SETTINGS)
    config_path.write_text(json.dumps(config, indent=4))
    return out


def genai_decode_tokens_per_s(model_dir: str, context: int, tokens: int, runs: int) -> float:
    """Median decode tokens/s after a `context`-token prefill (the prefill untimed, as zspa's
    decode_tokens_per_s), greedy, `tokens` new tokens per run."""
    import numpy as np
    import onnxruntime_genai as og

    model = og.Model(model_dir)

    def tokens_per_s() -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=context + tokens, min_length=context + tokens, do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(np.random.default_rng(0).integers(10, 400, size=(1, context)).astype(np.int32))
        generator.generate_next_token()
        start, steps = time.perf_counter(), 0
        while not generator.is_done():
            generator.generate_next_token()
            steps += 1
        return steps / (time.perf_counter() - start)

    tokens_per_s()
    return statistics.median(tokens_per_s() for _ in range(runs))
