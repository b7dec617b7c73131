"""Per-request pruner (one graph, ONNX Loop, K an input) against the unrolled static-K graphs zspa
0.1 exported (one traced graph per keep): node count, file size and time at N = 576 and N = 2916.
`--against dart`: ZSPAPrune's graph against DART's (TensorRT Edge-LLM's pruner) at keep 0.1 for
N = 1196 (Qwen2.5-VL at 1280×720) and 2916, D = 2048 and 4096.

Each side runs in its own process; the sides alternate over `--rounds`, and every ratio is
printed with the min / median / max of the per-round medians. onnxruntime CPU.

    python benchmarks/pruner_graphs.py [--hidden 1024] [--rounds 5] [--runs 20] [--against static|dart]
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

PARAMS = {"relevance_ratio": 0.25, "pooling": "mean"}


def time_graph(path: Path, n: int, k: int, hidden: int, runs: int) -> float:
    """Median milliseconds of one pruning call (batch 1, 12 question tokens), after a warm-up."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"image_features": rng.standard_normal((1, n, hidden)).astype(np.float32),
             "prompt_embeds": rng.standard_normal((1, 12, hidden)).astype(np.float32),
             "prompt_mask": np.ones((1, 12), np.int64)}
    if "budget" in [i.name for i in session.get_inputs()]:
        feeds["budget"] = np.array([k], np.int64)
    return median_ms(lambda: session.run(None, feeds), runs)


def worker(args) -> None:
    print(json.dumps({"ms": time_graph(Path(args.path), args.n, args.k, args.hidden, args.runs)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024, help="D (default 1024; LLaVA-1.5-7B's is 4096)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=20, help="timed calls per round")
    parser.add_argument("--against", choices=["static", "dart"], default="static",
                        help="the unrolled static-K graphs (default), or DART's per-request graph")
    parser.add_argument("--worker", choices=["time"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    import onnx

    from zspa.export.static_pruner import export_static_pruner
    from zspa.pruning.budget import token_budget
    from zspa.pruning.onnx_pruner import save_pruner

    print(f"machine: {describe_machine()}")
    if args.against == "dart":
        return against_dart(args)
    with tempfile.TemporaryDirectory() as tmp:
        per_request = Path(tmp) / "pruner-zspa.onnx"
        save_pruner("zspa", PARAMS, per_request, hidden=args.hidden)
        for n in (576, 2916):
            k = token_budget(0.1, n)
            static = Path(tmp) / f"pruner-zspa-k{k}-n{n}.onnx"
            export_static_pruner("zspa", PARAMS, n, k, args.hidden, static)
            sides = {"static": static, "per-request": per_request}
            for name, path in sides.items():
                model = onnx.load(str(path))
                print(f"N={n} K={k} D={args.hidden} {name:>11}: {len(model.graph.node)} nodes, "
                      f"{path.stat().st_size / 1024:.0f} KiB")
            medians: dict[str, list[float]] = {name: [] for name in sides}
            for _ in range(args.rounds):
                for name, path in sides.items():  # alternate the sides, a fresh process each
                    medians[name].append(run_worker(__file__, "time", path=path, n=n, k=k, hidden=args.hidden,
                                                    runs=args.runs)["ms"])
            for name, values in medians.items():
                print(f"N={n} K={k} {name:>11}: {spread(values)} ms over rounds")
            print(f"N={n} K={k} per-request / static time: "
                  f"{spread(ratios(medians['per-request'], medians['static']))} over {args.rounds} rounds")


def against_dart(args) -> None:
    """ZSPAPrune and DART, each one per-request graph, at keep 0.1 over realistic N and D."""
    from zspa.pruning import METHOD_DEFAULTS
    from zspa.pruning.budget import token_budget
    from zspa.pruning.onnx_pruner import save_pruner

    with tempfile.TemporaryDirectory() as tmp:
        for hidden in (2048, 4096):
            paths = {}
            for method in ("zspa", "dart"):
                paths[method] = Path(tmp) / f"pruner-{method}-{hidden}.onnx"
                save_pruner(method, METHOD_DEFAULTS[method], paths[method], hidden=hidden)
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
