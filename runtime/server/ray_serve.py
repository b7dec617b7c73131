"""zspa-serve on Ray Serve: the same FastAPI app, one pipeline per replica; Ray adds replicas,
autoscaling, health checks, restarts and placement across nodes (x86 or aarch64, CPU or GPU).

Two ways in: `zspa-serve BUNDLE --ray --replicas N` (a local Ray instance, or the cluster
RAY_ADDRESS names), and Ray's own `serve run deploy/ray-serve.yaml`, whose `args` are
`ray_app`'s. Ray routes each request to a replica that has room (`max_ongoing_requests`) and,
with autoscaling, adds replicas while requests wait (`target_ongoing_requests`). Import this
module only with the `[ray]` extra installed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve

from zspa.runtime.batching import DEFAULT_MAX_BATCH
from zspa.runtime.malloc import tune_malloc
from zspa.runtime.pipeline import Pipeline
from zspa.runtime.server.app import create_app
from zspa.runtime.server.scheduler import warm_up
from zspa.runtime.server.settings import API_KEY_ENV, LOOPBACK, ServerSettings
from zspa.signing import TrustPolicy

log = logging.getLogger("zspa.serve")
REPLICA_HEADER = "x-zspa-replica"  # which replica answered: Ray's replica id, for operators and tests
_PIPELINE_KEYS = ("backend", "threads", "positions", "max_context", "vision_cache_bytes", "max_image_pixels")


@dataclasses.dataclass(frozen=True)
class ReplicaSpec:
    """What every replica loads and how it serves: a bundle, `Pipeline.load` keywords, settings."""

    bundle: str
    pipeline: dict[str, Any]
    settings: ServerSettings


class ZspaReplica:
    """The replica Ray runs. Ray builds its app after the constructor (`serve.ingress()` without an
    app), so each replica loads its own pipeline; it calls `check_health` every few seconds and
    replaces a replica that fails it."""

    def __init__(self, spec: ReplicaSpec):
        self.spec = spec
        self.served: FastAPI | None = None  # not `app`: the wrapper Ray adds owns that name

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Loads and warms the pipeline before Ray sends this replica anything."""
        if self.spec.settings.tune_malloc:
            tune_malloc()
        pipeline = Pipeline.load(self.spec.bundle, **self.spec.pipeline)
        if self.spec.settings.warmup:
            warm_up(pipeline)
        app = create_app(pipeline, dataclasses.replace(self.spec.settings, warmup=False))
        replica = serve.get_replica_context().replica_id.unique_id

        @app.middleware("http")
        async def name_the_replica(request, call_next):
            response = await call_next(request)
            response.headers[REPLICA_HEADER] = replica
            return response

        self.served = app
        return app

    def check_health(self) -> None:
        problem = self.served.state.scheduler.problem if self.served is not None else None
        if problem:
            raise RuntimeError(problem)


def zspa_application(spec: ReplicaSpec, *, replicas: int = 1, autoscaling: dict[str, Any] | None = None,
                     num_cpus: float = 1.0, num_gpus: float = 0.0, drain_timeout_s: float = 30.0) -> serve.Application:
    """The Serve application: `replicas` fixed replicas, or Ray's `autoscaling` config; each
    replica reserves `num_cpus` and `num_gpus` (a fraction shares a GPU) and, when stopped, lets
    its requests finish for up to `drain_timeout_s`."""
    max_batch = spec.settings.max_batch or DEFAULT_MAX_BATCH
    options: dict[str, Any] = {
        "name": "zspa",
        "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus},
        # a replica takes what it can batch plus one batch waiting; the rest waits in Ray's router
        "max_ongoing_requests": 2 * max_batch,
        "health_check_period_s": 5,
        "graceful_shutdown_wait_loop_s": 0.5,
        "graceful_shutdown_timeout_s": drain_timeout_s,
    }
    if autoscaling is not None:
        options["autoscaling_config"] = {"target_ongoing_requests": max_batch, **autoscaling}
    else:
        options["num_replicas"] = replicas
    return serve.deployment(**options)(serve.ingress()(ZspaReplica)).bind(spec)


def ray_app(args: dict[str, Any]) -> serve.Application:
    """Builder for Ray's `serve run` config files (`import_path: zspa.runtime.server.ray_serve:ray_app`).

    `args`: `bundle` (required), `Pipeline.load`'s keywords (`backend`, `threads`, `positions`,
    `max_context`, `vision_cache_mb`), `verify_key` or `verify_certificate_chain`, and
    `ServerSettings`' fields (`served_model_name` for `model_name`; `allowed_hosts` a list, default
    the loopback names). Replica counts, autoscaling and `ray_actor_options` belong in the config's
    `deployments:` section (deployment name `zspa`)."""
    args = dict(args)
    if "bundle" not in args:
        raise ValueError("ray_app needs args.bundle: the bundle directory on every node")
    bundle = str(args.pop("bundle"))
    pipeline = {key: args.pop(key) for key in _PIPELINE_KEYS if key in args}
    if "vision_cache_mb" in args:
        pipeline["vision_cache_bytes"] = int(float(args.pop("vision_cache_mb")) * 1024 * 1024)
    key, roots = args.pop("verify_key", None), args.pop("verify_certificate_chain", None)
    if key or roots:
        pipeline["trust"] = TrustPolicy(public_key=Path(key) if key else None,
                                        certificate_roots=tuple(Path(r) for r in roots or ()))
    hosts = args.pop("allowed_hosts", None)
    names = frozenset(LOOPBACK) if hosts is None else None if "*" in hosts else frozenset(hosts)
    fields = {field.name for field in dataclasses.fields(ServerSettings)}
    unknown = sorted(set(args) - fields - {"served_model_name"})
    if unknown:
        raise ValueError(f"ray_app: unknown args {', '.join(unknown)} (known: bundle, served_model_name, "
                         f"{', '.join(sorted(fields | set(_PIPELINE_KEYS)))})")
    settings = ServerSettings(model_name=args.pop("served_model_name", Path(bundle).name),
                              api_key=args.pop("api_key", None) or os.environ.get(API_KEY_ENV) or None,
                              allowed_hosts=names, **args)
    return zspa_application(ReplicaSpec(bundle, pipeline, settings))
