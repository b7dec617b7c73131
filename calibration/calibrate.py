"""`zspa-calibrate`: a bundle → a new bundle with quantized graphs, calibrated on real inputs.

The source bundle runs the user's images and prompts at its keep ratio while a recording backend
keeps what the vision graph and the decoder's prefill were fed; those feeds calibrate the
quantizers. The new bundle is written atomically, with each quantized graph's method in the
manifest, the calibration set's digest, and its measured fidelity to the source.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from zspa.calibration.dataset import MIN_SAMPLES, CalibrationSet
from zspa.calibration.fidelity import graph_bytes, measure_fidelity
from zspa.calibration.quantize import WEIGHT_ONLY_BITS, quantize_int8_static, quantize_modelopt, quantize_weights
from zspa.calibration.recording import RecordingBackend
from zspa.errors import InvalidInputError
from zspa.export.onnx_io import describe_graph
from zspa.manifest import MANIFEST_NAME, GraphSpec, Manifest
from zspa.pruning.budget import validate_keep
from zspa.runtime.bundle import Bundle
from zspa.runtime.pipeline import Pipeline
from zspa.runtime.staging import staged_directory

VISION_PRECISIONS = ("int8", "fp32")
DECODER_PRECISIONS = (*WEIGHT_ONLY_BITS, "fp32")
TENSORRT_PRECISIONS = ("int8", "fp8")
_EXTERNAL_DATA_BYTES = 2**30  # past this, write external data: protobuf stops at 2 GB


@dataclass(frozen=True)
class CalibrateOptions:
    bundle: Path
    images: Path
    prompts: Path
    output: Path
    vision: str = "int8"  # fp32 keeps the exported graph
    decoder: str = "int4"
    tensorrt: str | None = None  # also write ModelOpt Q/DQ graphs for TensorRT: int8 or fp8
    keep: float | None = None  # default: the bundle's smallest
    method: str | None = None
    max_samples: int = 64
    min_samples: int = MIN_SAMPLES
    block_size: int = 32
    fidelity_tokens: int = 16
    force: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        for name, value, choices in (("vision", self.vision, VISION_PRECISIONS),
                                     ("decoder", self.decoder, DECODER_PRECISIONS),
                                     ("tensorrt", self.tensorrt, (None, *TENSORRT_PRECISIONS))):
            if value not in choices:
                raise InvalidInputError(f"--{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise InvalidInputError(f"--block-size must be a power of two ≥ 16, got {self.block_size}")


def calibrate_bundle(options: CalibrateOptions) -> Manifest:
    source = Bundle.open(options.bundle)
    if options.output.resolve() == source.path.resolve():
        raise InvalidInputError("the output must be a new bundle, not the source")
    calibration = CalibrationSet.load(options.images, options.prompts, min_samples=options.min_samples,
                                      max_samples=options.max_samples)
    keep = source.keeps(options.method)[0] if options.keep is None else validate_keep(options.keep)
    source.pruner_for(keep, options.method)  # refuses a keep the bundle cannot run
    reference, feeds = _record_feeds(source, calibration, keep, options)
    with staged_directory(options.output, force=options.force) as out:
        for name in source.listed_files():  # what the verified manifest lists, nothing else (no engines)
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.member(name), out / name)
        graphs = dict(source.manifest.graphs)
        graphs.update(_quantize(source, out, feeds, options))
        manifest = dataclasses.replace(source.manifest, graphs=graphs)
        (out / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        fidelity = measure_fidelity(reference, Pipeline.load(out), calibration.samples,
                                    keep=keep, method=options.method, max_new_tokens=options.fidelity_tokens,
                                    progress=options.progress)
        runtime_graphs = [name for name in graphs if "-trt-" not in name]
        manifest = dataclasses.replace(manifest, calibration={
            "digest": calibration.digest, "samples": len(calibration.samples), "keep": keep,
            "method": options.method or source.default_method, "fidelity": fidelity,
            "graph_bytes": {"source": graph_bytes(source.path, source.manifest),
                            "calibrated": graph_bytes(out, manifest, runtime_graphs)},
        })
        (out / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return manifest


def _record_feeds(source: Bundle, calibration: CalibrationSet, keep: float, options: CalibrateOptions):
    """(the source pipeline, no longer recording, for the fidelity check; the recorded feeds)."""
    backend = RecordingBackend()
    pipeline = Pipeline(source, backend)
    for sample in tqdm(calibration.samples, desc="calibration inputs", unit="sample", disable=not options.progress):
        pipeline.generate(sample.image, sample.prompt, keep=keep, method=options.method, max_new_tokens=1)
    backend.recording = False
    return pipeline, backend.records


def _quantize(source: Bundle, out: Path, feeds, options: CalibrateOptions) -> dict[str, GraphSpec]:
    """Writes the quantized graphs into `out` and returns their manifest entries."""
    jobs = []
    if options.vision == "int8":
        jobs.append(("vision", "vision", lambda src, dst, ext: quantize_int8_static(src, dst, feeds["vision"], ext)))
    if options.decoder in WEIGHT_ONLY_BITS:
        jobs.append(("decoder", "decoder",
                     lambda src, dst, ext: quantize_weights(src, dst, options.decoder, options.block_size, ext)))
    if options.tensorrt:
        for name in ("vision", "decoder"):
            jobs.append((name, f"{name}-trt-{options.tensorrt}", lambda src, dst, ext, name=name:
                         quantize_modelopt(src, dst, feeds[name], options.tensorrt, ext)))
    specs = {}
    for name, target, run in tqdm(jobs, desc="quantizing", unit="graph", disable=not options.progress):
        spec = source.manifest.graphs[name]
        for stale in {spec.file, *spec.data_files} if target == name else ():
            (out / source.member(stale).relative_to(source.path)).unlink()  # only what the manifest may name
        external = graph_bytes(source.path, source.manifest, [name]) > _EXTERNAL_DATA_BYTES
        record = run(source.member(spec.file), out / f"{target}.onnx", external)
        specs[target] = dataclasses.replace(describe_graph(out / f"{target}.onnx"), quantization=record)
    return specs
