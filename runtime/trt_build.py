"""`zspa-build`: TensorRT engines for this GPU from a bundle's ONNX graphs (TensorRT 10 Python API).

Each graph is parsed by TensorRT's ONNX parser (onnxruntime's fused vision attention expanded
first) and built with one optimisation profile from the
manifest (`engines.optimisation_profile`), at the precision `engines.engine_sources` picks
(pruners in fp32); graphs with Q/DQ nodes build strongly typed. One timing cache per bundle is
reused across builds (replaced atomically: a build reading it never sees half of another's). Engines
are written to a staging folder of the build's own and swapped into
`engines/<gpu>-sm<cc>-trt<version>/` with a build record in one step (runtime/staging.py, as a
bundle is): two builds at once each publish a whole folder, the last one wins, and a runtime
loading the engines meanwhile sees the old folder or the new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from zspa.errors import BundleError, ZspaError
from zspa.runtime import engines
from zspa.runtime.bundle import Bundle
from zspa.runtime.cuda import cuda_device, import_tensorrt
from zspa.runtime.staging import ENGINES_DIR, engine_folder, staged_directory, write_atomically
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
    engines.check_tensorrt_version(bundle.manifest, trt.__version__)
    ranges = engines.ShapeRanges.for_manifest(bundle.manifest, options.max_context)
    engine_root = bundle.path / ENGINES_DIR
    target = engine_root / engines.engine_dir_name(gpu, capability, trt.__version__)
    if target.exists() and not options.force:
        raise ZspaError(f"{target} exists; pass --force to rebuild")
    logger = trt.Logger(trt.Logger.WARNING)
    cache_path = engine_root / TIMING_CACHE
    with staged_directory(target, force=options.force, replaceable=engine_folder) as staging:
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
    return target


def _tensorrt_graph(onnx_path: Path) -> bytes:
    """The graph as TensorRT's parser takes it: onnxruntime's fused vision attention expanded into
    the MatMul/Softmax pattern TensorRT fuses itself (export/vision_attention.py); external
    weights stay in their files, which the parser finds next to `onnx_path`."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    expand_for_tensorrt(model)
    return model.SerializeToString()


def expand_for_tensorrt(model) -> int:
    """Replaces every `com.microsoft.MultiHeadAttention` node of `model` (an onnx ModelProto, in
    place) by Reshape/Transpose → Mul(scale, in the query's type) → MatMul → Softmax → MatMul →
    Transpose/Reshape, standard operators of every opset zspa exports; returns how many."""
    from onnx import shape_inference

    inferred = shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.input, *inferred.value_info]}
    graph, nodes, replaced = model.graph, [], 0
    for node in graph.node:
        if node.domain == "com.microsoft" and node.op_type == "MultiHeadAttention":
            initializers, expanded = _primitive_attention(node, f"{node.name or 'mha'}_{replaced}", types)
            graph.initializer.extend(initializers)
            nodes += expanded
            replaced += 1
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return replaced


def _primitive_attention(node, prefix: str, types: dict[str, int]) -> tuple[list, list]:
    """The initializers and nodes, named under `prefix`, that compute one MultiHeadAttention node."""
    from onnx import TensorProto, helper

    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    query, key, value = node.input[:3]

    def name(suffix: str) -> str:
        return f"{prefix}/{suffix}"

    initializers = [
        helper.make_tensor(name("heads_shape"), TensorProto.INT64, [4], [0, 0, int(attributes["num_heads"]), -1]),
        helper.make_tensor(name("flat_shape"), TensorProto.INT64, [3], [0, 0, -1]),
        helper.make_tensor(name("scale"), types.get(query, TensorProto.FLOAT), [], [float(attributes["scale"])]),
    ]
    nodes = [
        helper.make_node("Reshape", [query, name("heads_shape")], [name("q4")]),
        helper.make_node("Transpose", [name("q4")], [name("q")], perm=[0, 2, 1, 3]),
        helper.make_node("Mul", [name("q"), name("scale")], [name("q_scaled")]),
        helper.make_node("Reshape", [key, name("heads_shape")], [name("k4")]),
        helper.make_node("Transpose", [name("k4")], [name("k_t")], perm=[0, 2, 3, 1]),
        helper.make_node("Reshape", [value, name("heads_shape")], [name("v4")]),
        helper.make_node("Transpose", [name("v4")], [name("v")], perm=[0, 2, 1, 3]),
        helper.make_node("MatMul", [name("q_scaled"), name("k_t")], [name("scores")]),
        helper.make_node("Softmax", [name("scores")], [name("weights")], axis=-1),
        helper.make_node("MatMul", [name("weights"), name("v")], [name("context")]),
        helper.make_node("Transpose", [name("context")], [name("context_t")], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [name("context_t"), name("flat_shape")], [node.output[0]]),
    ]
    return initializers, nodes


def _build(trt, logger, onnx_path: Path, profile_shapes, shape_input_values, precision: str, typed: bool,
           workspace: int, cache_path: Path) -> bytes:
    """One engine. Inputs TensorRT reads as shapes (the pruners' `budget`, which sizes their
    outputs and bounds their loops) get value ranges besides their dimensions."""
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(_tensorrt_graph(onnx_path), str(onnx_path)):
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
    write_atomically(cache_path, bytes(memoryview(config.get_timing_cache().serialize())))
    return bytes(plan)
