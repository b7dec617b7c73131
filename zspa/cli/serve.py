"""`zspa-serve`: an OpenAI-compatible chat-completions service for one bundle. Imports no torch.

Binds 127.0.0.1 unless told otherwise; SIGTERM (systemd stop, docker stop) stops accepting
connections, lets queued and running requests finish within --drain-timeout, then exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from zspa.cli.common import add_backend_flags, add_debug_flag, backend_options, run_command
from zspa.errors import ZspaError
from zspa.runtime.server.settings import API_KEY_ENV, LOOPBACK, METRICS_KEY_ENV, allowed_hosts

_CUT_GRACE_S = 2.0  # after the drain timeout, for the error events that end the cut answers to go out


def build_parser() -> argparse.ArgumentParser:
    from zspa.runtime.server.settings import ServerSettings

    defaults = ServerSettings(model_name="")
    parser = argparse.ArgumentParser(
        prog="zspa-serve", description="Serve a zspa bundle over OpenAI's chat-completions API.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("bundle", help="bundle directory written by zspa-export")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes it to the network")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--allowed-hosts", type=_names, default=None, metavar="NAMES",
                        help="Host header names accepted besides the bound address, comma-separated; '*' accepts "
                             "any (default: loopback names when bound to loopback, the bound address otherwise, "
                             "any for 0.0.0.0 / ::)")
    parser.add_argument("--served-model-name", default=None,
                        help="the `model` clients must send (default: the bundle directory's name)")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1 (prefer the {API_KEY_ENV} environment "
                             "variable: arguments show in `ps`)")
    parser.add_argument("--metrics-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /metrics (prefer {METRICS_KEY_ENV}; default: "
                             "/metrics is open, like /health, to whoever can reach the port)")
    limits = parser.add_argument_group("load and limits")
    limits.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="requests that may wait for the pipeline; past it, 429 with Retry-After")
    limits.add_argument("--max-batch", type=int, default=None,
                        help="requests decoding together, one decoder call per step (continuous batching); "
                             "default 8 where the bundle can batch (portable decoder on onnxruntime), else 1")
    limits.add_argument("--max-prefill-tokens", type=int, default=defaults.max_prefill_tokens,
                        help="prompt tokens fed between two decode steps, a longer prompt in chunks (chunked prefill), "
                             "so running requests wait at most this much prefill per token (default: %(default)s)")
    limits.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s,
                        help="seconds a request may take, queueing included; past it, 504")
    limits.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    limits.add_argument("--max-image-bytes", type=int, default=defaults.max_image_bytes)
    limits.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    limits.add_argument("--max-concurrent-images", type=int, default=defaults.max_concurrent_images,
                        help="images decoded and preprocessed at once, whatever the number of requests (memory: up "
                             "to 7 bytes per pixel of --max-image-pixels each, for an image with transparency)")
    limits.add_argument("--max-images", type=int, default=defaults.max_images,
                        help="image_url parts one request may carry, earlier turns counted; past it, 400 "
                             "(each image is its own block of visual tokens, and the context bounds their sum)")
    limits.add_argument("--max-image-memory-mb", type=float, default=defaults.max_image_memory_bytes / 2**20,
                        metavar="MB", help="preprocessed images that requests waiting for the decoder may hold, "
                                           "all together; past it, 429 (default: %(default)g)")
    limits.add_argument("--max-prompt-tokens", type=int, default=None,
                        help="refuse longer prompts (default: only the model's context limits them)")
    limits.add_argument("--default-max-tokens", type=int, default=defaults.default_max_tokens,
                        help="completion length when a request sets neither max_tokens nor max_completion_tokens")
    limits.add_argument("--allow-remote-images", action="store_true",
                        help="fetch http(s) image URLs from public hosts (resolved once, every redirect checked)")
    limits.add_argument("--allow-private-image-hosts", action="store_true",
                        help="with --allow-remote-images: also loopback, private and link-local addresses")
    limits.add_argument("--allowed-image-domains", type=_names, default=[], metavar="DOMAINS",
                        help="with --allow-remote-images: only these domains and their subdomains, comma-separated")
    limits.add_argument("--image-ca-file", default=None, metavar="PEM",
                        help="with --allow-remote-images: trust this CA bundle for https image hosts (a private PKI)")
    limits.add_argument("--remote-image-timeout", type=float, default=defaults.remote_image_timeout_s,
                        help="seconds for a whole image download, redirects included")
    limits.add_argument("--vision-cache-mb", type=float, default=64.0,
                        help="memory for vision outputs of images seen again (several questions about one frame); "
                             "0 turns the cache off")
    limits.add_argument("--max-connections", type=int, default=defaults.max_connections,
                        help="open connections and requests in flight; past it, 503 (the open-file limit is raised "
                             "to fit at start-up)")
    limits.add_argument("--header-timeout", type=float, default=defaults.header_timeout_s,
                        help="seconds a connection has to send a request's headers, after connecting or after its "
                             "previous response; then it is closed (idle sockets, slowloris)")
    limits.add_argument("--keep-alive-timeout", type=float, default=defaults.keep_alive_timeout_s,
                        help="seconds an idle keep-alive connection stays open")
    limits.add_argument("--drain-timeout", type=float, default=30.0,
                        help="seconds SIGTERM waits for in-flight requests before cancelling them")
    runtime = parser.add_argument_group("runtime")
    add_backend_flags(runtime)
    runtime.add_argument("--positions", choices=["contiguous", "original"], default=None,
                         help="position ids of kept visual tokens (default: the bundle's)")
    runtime.add_argument("--no-warmup", action="store_true", help="report ready without a warm-up generation")
    runtime.add_argument("--malloc", choices=["tuned", "glibc"], default="tuned",
                         help="tuned: glibc's mmap threshold fixed at 128 KiB and 2 arenas, so memory requests "
                              "free goes back to the system (MALLOC_MMAP_THRESHOLD_ and MALLOC_ARENA_MAX still win); "
                              "glibc: its own defaults")
    runtime.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    scale = parser.add_argument_group("scale-out on Ray Serve (pip install 'zspa[ray]')")
    scale.add_argument("--ray", action="store_true",
                       help="serve through Ray Serve: one pipeline per replica, health checks and restarts; Ray's "
                            "proxy listens on --host/--port (a local Ray instance, or the cluster RAY_ADDRESS names)")
    scale.add_argument("--replicas", type=int, default=1, help="with --ray: replicas (fixed)")
    scale.add_argument("--autoscale", type=_replica_range, default=None, metavar="MIN:MAX",
                       help="with --ray: autoscale between MIN and MAX replicas on requests waiting per replica")
    scale.add_argument("--replica-cpus", type=float, default=1.0, help="with --ray: CPUs each replica reserves")
    scale.add_argument("--replica-gpus", type=float, default=0.0,
                       help="with --ray: GPUs each replica reserves (0.5: two replicas share one)")
    add_debug_flag(parser)
    return parser


def _replica_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        low_n, high_n = int(low), int(high)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX replicas, got {text!r}") from None
    if not 0 <= low_n <= high_n or high_n < 1:
        raise argparse.ArgumentTypeError(f"need 0 ≤ MIN ≤ MAX and MAX ≥ 1, got {text!r}")
    return low_n, high_n


def _serve(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from zspa.runtime.server.app import create_app
        from zspa.runtime.server.connections import connection_limit, http_protocol
        from zspa.runtime.server.errors import DRAIN_TIMED_OUT
    except ImportError as exc:
        raise ZspaError(f"zspa-serve needs the serve extra ({exc.name} is missing): "
                        "pip install 'zspa[serve]'") from None
    from zspa.runtime.malloc import tune_malloc
    from zspa.runtime.pipeline import Pipeline
    from zspa.runtime.server.settings import ServerSettings

    if args.malloc == "tuned":
        tune_malloc()  # before the model loads: freed request memory goes back to the system
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = ServerSettings(
            model_name=args.served_model_name or Path(args.bundle).resolve().name,
            api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
            metrics_key=args.metrics_key or os.environ.get(METRICS_KEY_ENV) or None,
            max_queue=args.max_queue, max_batch=args.max_batch, max_prefill_tokens=args.max_prefill_tokens,
            request_timeout_s=args.request_timeout,
            max_body_bytes=args.max_body_bytes,
            max_image_bytes=args.max_image_bytes, max_image_pixels=args.max_image_pixels,
            max_concurrent_images=args.max_concurrent_images, max_images=args.max_images,
            max_image_memory_bytes=int(args.max_image_memory_mb * 2**20),
            max_prompt_tokens=args.max_prompt_tokens, default_max_tokens=args.default_max_tokens,
            allow_remote_images=args.allow_remote_images, remote_image_timeout_s=args.remote_image_timeout,
            allow_private_image_hosts=args.allow_private_image_hosts,
            allowed_image_domains=tuple(args.allowed_image_domains), image_ca_file=args.image_ca_file,
            warmup=not args.no_warmup, allowed_hosts=allowed_hosts(args.host, args.allowed_hosts),
            max_connections=args.max_connections, header_timeout_s=args.header_timeout,
            keep_alive_timeout_s=args.keep_alive_timeout, tune_malloc=args.malloc == "tuned",
        )
    except ValueError as exc:
        raise ZspaError(str(exc)) from None
    if args.vision_cache_mb < 0:
        raise ZspaError(f"--vision-cache-mb must be ≥ 0, got {args.vision_cache_mb:g}")
    options = {**backend_options(args), "positions": args.positions, "max_image_pixels": args.max_image_pixels,
               "vision_cache_bytes": int(args.vision_cache_mb * 1024 * 1024)}
    if args.host not in LOOPBACK and settings.api_key is None:
        logging.getLogger("zspa.serve").warning(
            "listening on %s without an API key: anyone who can reach this port can use the model "
            "(set %s or --api-key)", args.host, API_KEY_ENV)
    if args.ray:
        _serve_on_ray(args, settings, options)
        return
    pipeline = Pipeline.load(args.bundle, **options)
    app = create_app(pipeline, settings)
    # uvicorn cancels what is left at its own timeout: first the scheduler ends every answer with an
    # error event, and uvicorn waits a little longer for those to go out.
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.drain_timeout + _CUT_GRACE_S,
                            http=http_protocol(settings.header_timeout_s),
                            limit_concurrency=connection_limit(settings.max_connections),
                            timeout_keep_alive=settings.keep_alive_timeout_s)

    class DrainingServer(uvicorn.Server):
        """Marks the app as draining the moment a shutdown signal arrives, so /ready turns 503."""

        def handle_exit(self, sig, frame) -> None:
            if not app.state.draining:
                app.state.draining = True
                cut = threading.Timer(args.drain_timeout, app.state.scheduler.cut_all, (DRAIN_TIMED_OUT,))
                cut.daemon = True
                cut.start()
            super().handle_exit(sig, frame)

    DrainingServer(config).run()


def _serve_on_ray(args: argparse.Namespace, settings, options: dict) -> None:
    """The same app on Ray Serve; returns after SIGTERM or Ctrl-C, once Serve has shut down."""
    import signal
    import threading

    from zspa.runtime.bundle import Bundle

    if args.replicas < 1:
        raise ZspaError(f"--replicas must be ≥ 1, got {args.replicas}")
    Bundle.open(args.bundle, trust=options["trust"])  # a bad bundle fails here, not in every replica
    try:
        import ray
        from ray import serve

        from zspa.runtime.server.ray_serve import ReplicaSpec, zspa_application
    except ImportError as exc:
        raise ZspaError(f"--ray needs the ray extra ({exc.name} is missing): pip install 'zspa[ray]'") from None
    autoscaling = None if args.autoscale is None else {"min_replicas": args.autoscale[0],
                                                       "max_replicas": args.autoscale[1]}
    spec = ReplicaSpec(str(Path(args.bundle).resolve()), options, settings)
    ray.init(**({} if os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}))
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(zspa_application(spec, replicas=args.replicas, autoscaling=autoscaling, num_cpus=args.replica_cpus,
                                   num_gpus=args.replica_gpus, drain_timeout_s=args.drain_timeout),
                  name="zspa", route_prefix="/")
        logging.getLogger("zspa.serve").info("serving on Ray Serve at http://%s:%d", args.host, args.port)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):  # after ray.init: replaces Ray's own stack-dumping handler
            signal.signal(sig, lambda *_: stop.set())
        while not stop.wait(1.0):
            pass
    finally:
        serve.shutdown()
        ray.shutdown()


def _names(text: str) -> list[str]:
    return [name.strip().lower() for name in text.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser(), _serve, argv)


if __name__ == "__main__":
    sys.exit(main())
