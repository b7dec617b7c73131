"""`zspa-profile`: where the latency goes, per pruning setting, with percentiles and memory.

Each setting (method × keep, plus 1.0 unpruned) runs `warmup` untimed generations and `runs`
timed ones of exactly `max_new_tokens` tokens (EOS ignored, so decode work is comparable). The
report follows `profile_schema.json` (schema id `zspa-profile/1`), beside this module.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from zspa.runtime.pipeline import GenerationResult, Pipeline

SCHEMA_ID = "zspa-profile/1"
SCHEMA_PATH = Path(__file__).with_name("profile_schema.json")
STAGES = ("preprocess", "vision", "embed", "prune", "prefill", "time_to_first_token", "decode_per_token", "total")
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ProfileConfig:
    image: str
    prompt: str
    settings: list[tuple[str | None, float]]  # (method, keep); method None for keep 1.0
    warmup: int = 2
    runs: int = 10
    max_new_tokens: int = 32


def percentiles(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(array, 50)), "p90": float(np.percentile(array, 90)),
            "p99": float(np.percentile(array, 99)), "mean": float(array.mean())}


def stage_times(result: GenerationResult) -> dict[str, float]:
    stats = result.stats
    t = stats.timings_ms
    steps = max(stats.tokens_generated - 1, 1)
    return {
        "preprocess": t["preprocess"], "vision": t["vision"], "embed": t["embed"], "prune": t["prune"],
        "prefill": t["prefill"], "time_to_first_token": stats.time_to_first_token_ms,
        "decode_per_token": t["decode"] / steps, "total": stats.time_to_first_token_ms + t["decode"],
    }


def kv_cache_bytes(pipeline: Pipeline, sequence_length: int) -> int:
    """Keys and values of every layer for `sequence_length` positions, batch 1."""
    spec = pipeline.bundle.manifest.decoder
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * _DTYPE_BYTES[spec.kv_dtype] * sequence_length


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def gpu_memory_bytes() -> int | None:
    """Device memory in use on GPU 0 through NVML, or None without an NVIDIA driver / nvidia-ml-py."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).used)
    except pynvml.NVMLError:
        return None


def profile_setting(pipeline: Pipeline, config: ProfileConfig, method: str | None, keep: float, tick) -> dict:
    def generate():
        result = pipeline.generate(config.image, config.prompt, keep=keep, method=method,
                                   max_new_tokens=config.max_new_tokens, ignore_eos=True)
        tick()
        return result

    for _ in range(config.warmup):
        generate()
    results = [generate() for _ in range(config.runs)]
    times = [stage_times(r) for r in results]
    stats = results[0].stats
    return {
        "method": method or "none",
        "keep": keep,
        "visual_tokens": {"total": stats.visual_tokens_total, "kept": stats.visual_tokens_kept},
        "prompt_tokens": stats.prompt_tokens,
        "tokens_generated": stats.tokens_generated,
        "latency_ms": {stage: percentiles([t[stage] for t in times]) for stage in STAGES},
        "decode_tokens_per_s": percentiles([r.stats.decode_tokens_per_s for r in results]),
        "kv_cache_bytes": kv_cache_bytes(pipeline, stats.prompt_tokens + stats.tokens_generated),
        "peak_rss_bytes": peak_rss_bytes(),
        "gpu_memory_bytes": gpu_memory_bytes(),
    }


def machine() -> dict:
    import onnxruntime

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__}


def run_profile(pipeline: Pipeline, config: ProfileConfig, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from zspa.runtime.jetson import TelemetrySampler, clocks_locked, tegrastats_available

    on_jetson = tegrastats_available()
    total = len(config.settings) * (config.warmup + config.runs)
    settings = []
    with tqdm(total=total, desc="profiling", unit="run", disable=not progress) as bar:
        for method, keep in config.settings:
            bar.set_description(f"profiling {method or 'unpruned'} keep {keep:g}")
            if on_jetson:
                with TelemetrySampler() as sampler:
                    row = profile_setting(pipeline, config, method, keep, bar.update)
                row["jetson"] = sampler.summary()
            else:
                row = profile_setting(pipeline, config, method, keep, bar.update)
            settings.append(row)
    manifest = pipeline.bundle.manifest
    return {
        "schema": SCHEMA_ID,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "bundle": str(pipeline.bundle.path.resolve()),
        "model": manifest.source.model_id,
        "machine": machine(),
        "providers": pipeline.providers,
        "jetson": {"clocks_locked": clocks_locked()} if on_jetson else None,
        "config": {"image": str(config.image), "prompt": config.prompt, "warmup": config.warmup,
                   "runs": config.runs, "max_new_tokens": config.max_new_tokens, "positions": pipeline.positions},
        "settings": settings,
    }


def markdown_report(report: dict) -> str:
    lines = [
        f"# zspa-profile: {report['model']}\n",
        f"{report['machine']['processor']}, {report['machine']['cpu_count']} CPUs, "
        f"{', '.join(report['providers'])}; {report['config']['runs']} runs after {report['config']['warmup']} "
        f"warm-up, {report['config']['max_new_tokens']} new tokens; p50 (p90) in ms.\n",
        "| method | keep | visual tokens | vision | prune | prefill | TTFT | decode/token | tokens/s | KV cache MB "
        "| peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    def cell(row: dict, stage: str) -> str:
        latency = row["latency_ms"][stage]
        return f"{latency['p50']:.2f} ({latency['p90']:.2f})"

    for row in report["settings"]:
        lines.append(
            f"| {row['method']} | {row['keep']:g} | {row['visual_tokens']['total']}→{row['visual_tokens']['kept']} | "
            f"{cell(row, 'vision')} | {cell(row, 'prune')} | {cell(row, 'prefill')} | "
            f"{cell(row, 'time_to_first_token')} | {cell(row, 'decode_per_token')} | "
            f"{row['decode_tokens_per_s']['p50']:.1f} | {row['kv_cache_bytes'] / 1e6:.2f} | "
            f"{row['peak_rss_bytes'] / 1e6:.0f} |"
        )
    jetson = report.get("jetson")
    if jetson is not None and not jetson["clocks_locked"]:
        lines.append("\n**Warning**: clocks were not locked (run `sudo jetson_clocks`); latencies are noisy.")
    return "\n".join(lines) + "\n"


def ttft_prediction(row: dict, full: dict) -> float:
    """The stages before the decoder as measured, prefill scaled from keep 1.0 by token count."""
    lat, full_lat = row["latency_ms"], full["latency_ms"]
    before_decoder = lat["time_to_first_token"]["p50"] - lat["prefill"]["p50"]
    return before_decoder + full_lat["prefill"]["p50"] * row["prompt_tokens"] / full["prompt_tokens"]


def write_report(report: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "profile.md").write_text(markdown_report(report))
    return [out / "profile.json", out / "profile.md"]
