"""ZSPAPrune's per-request graph (one ONNX Loop, K an input) against DART's (TensorRT Edge-LLM's
pruner) at keep 0.1 for N = 1196 (Qwen2.5-VL at 1280×720) and 2916, D = 2048 and 4096, with each
graph's node count and size.

Each side runs in its own process; the sides alternate over `--rounds`, and every ratio is
printed with the min / median / max of the per-round medians. onnxruntime CPU.

    python benchmarks/pruner_graphs.py [--rounds 3] [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from isolation import median_ms, ratios, run_worker, spread  # noqa: E402
from machine import describe_machine  # noqa: E402


def time_graph(path: Path, n: int, k: int, hidden: int, runs: int) -> float:
    """Median milliseconds of one pruning call (batch 1, 12 question tokens), after a warm-up."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"image_features": rng.standard_normal((1, n, hidden)).astype(np.float32),
             "prompt_embeds": rng.standard_normal((1, 12, hidden)).astype(np.float32),
             "prompt_mask": np.ones((1, 12), np.int64), "budget": np.array([k], np.int64)}
    return median_ms(lambda: session.run(None, feeds), runs)


def worker(args) -> None:
    print(json.dumps({"ms": time_graph(Path(args.path), args.n, args.k, args.hidden, args.runs)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10, help="timed calls per round")
    parser.add_argument("--worker", choices=["time"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--hidden", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import onnx

    from zspa.pruning import METHOD_DEFAULTS
    from zspa.pruning.budget import token_budget
    from zspa.pruning.onnx_pruner import save_pruner

    print(f"machine: {describe_machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        for hidden in (2048, 4096):
            paths = {}
            for method in ("zspa", "dart"):
                paths[method] = Path(tmp) / f"pruner-{method}-{hidden}.onnx"
                save_pruner(method, METHOD_DEFAULTS[method], paths[method], hidden=hidden)
                print(f"D={hidden} {method}: {len(onnx.load(str(paths[method])).graph.node)} nodes, "
                      f"{paths[method].stat().st_size / 1024:.0f} KiB, whatever N and K")
            for n in (1196, 2916):
                k = token_budget(0.1, n)
                medians: dict[str, list[float]] = {method: [] for method in paths}
                for _ in range(args.rounds):
                    for method, path in paths.items():  # alternate the sides, a fresh process each
                        medians[method].append(run_worker(__file__, "time", path=path, n=n, k=k, hidden=hidden,
                                                          runs=args.runs)["ms"])
                print(f"N={n} K={k} D={hidden}: zspa {spread(medians['zspa'])} ms, dart {spread(medians['dart'])} ms; "
                      f"zspa / dart time {spread(ratios(medians['zspa'], medians['dart']))} over {args.rounds} rounds")


if __name__ == "__main__":
    main()
