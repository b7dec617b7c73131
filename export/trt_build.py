"""`zspa-build`: TensorRT engines for this GPU from a bundle's ONNX graphs (TensorRT 10 Python API).

Each graph is parsed by TensorRT's ONNX parser and built with one optimisation profile from the
manifest (`engines.optimisation_profile`), at the precision `engines.engine_sources` picks
(pruners in fp32); graphs with Q/DQ nodes build strongly typed. One timing cache per bundle is
reused across builds. Engines are written to a staging folder and renamed into
`engines/<gpu>-sm<cc>-trt<version>/` with a build record.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from zspa.errors import BundleError, ZspaError
from zspa.runtime import engines
from zspa.runtime.bundle import Bundle
from zspa.runtime.cuda import cuda_device, import_tensorrt
from zspa.signing import TrustPolicy

TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class BuildOptions:
    bundle: Path
    precision: str = "fp16"
    max_context: int | None = None
    workspace_gb: float = 4.0
    force: bool = False
    progress: bool = True
    trust: TrustPolicy | None = None  # refuse a bundle no signer it names signed


def build_engines(options: BuildOptions) -> Path:
    bundle = Bundle.open(options.bundle, trust=options.trust)
    trt = import_tensorrt()
    gpu, capability = cuda_device()
    engines.check_precision(options.precision, capability)
    ranges = engines.ShapeRanges.for_manifest(bundle.manifest, options.max_context)
    engine_root = bundle.path / "engines"
    target = engine_root / engines.engine_dir_name(gpu, capability, trt.__version__)
    if target.exists() and not options.force:
        raise ZspaError(f"{target} exists; pass --force to rebuild")
    staging = engine_root / f".{target.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = engine_root / TIMING_CACHE
    try:
        sources = engines.engine_sources(bundle.manifest, options.precision)
        for name, (graph, precision) in tqdm(sources.items(), desc="building engines", unit="engine",
                                             disable=not options.progress):
            spec = bundle.manifest.graphs[graph]
            plan = _build(trt, logger, bundle.graph_file(graph), engines.optimisation_profile(spec, ranges),
                          ranges.shape_input_values, precision, engines.strongly_typed(spec),
                          int(options.workspace_gb * 2**30), cache_path)
            (staging / f"{name}.plan").write_bytes(plan)
        engines.BuildRecord(trt.__version__, gpu, list(capability), options.precision, ranges.max_context,
                    ranges.max_prefill, int(options.workspace_gb * 2**30),
                    {graph: bundle.manifest.graphs[graph].sha256 for graph, _ in sources.values()}).write(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _build(trt, logger, onnx_path: Path, profile_shapes, shape_input_values, precision: str, typed: bool,
           workspace: int, cache_path: Path) -> bytes:
    """One engine. Inputs TensorRT reads as shapes (the pruners' `budget`, which sizes their
    outputs and bounds their loops) get value ranges besides their dimensions."""
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(f"{onnx_path.name}: TensorRT's ONNX parser refused the graph ({errors})")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace)
    if not typed and precision in ("fp16", "bf16"):
        config.set_flag(trt.BuilderFlag.FP16 if precision == "fp16" else trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in profile_shapes.items():
        profile.set_shape(name, low, opt, high)
    for tensor in (network.get_input(i) for i in range(network.num_inputs)):
        if tensor.is_shape_tensor:
            profile.set_shape_input(tensor.name, *shape_input_values(tensor.name))
    config.add_optimization_profile(profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BundleError(f"{onnx_path.name}: TensorRT could not build an engine (see the log above)")
    cache_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(plan)
