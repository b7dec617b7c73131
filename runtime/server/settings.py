"""The service's limits and switches, in one place, with the defaults `zspa-serve --help` shows."""

from __future__ import annotations

from dataclasses import dataclass

from zspa.runtime.images import DEFAULT_MAX_PIXELS
from zspa.runtime.server.remote_images import FetchPolicy

MiB = 1024 * 1024
API_KEY_ENV = "ZSPA_API_KEY"
METRICS_KEY_ENV = "ZSPA_METRICS_KEY"
LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})
WILDCARD = frozenset({"0.0.0.0", "::", ""})


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    api_key: str | None = None
    metrics_key: str | None = None  # when set, /metrics needs 'Authorization: Bearer <metrics key>'
    max_queue: int = 64  # requests waiting for the pipeline; past it, 429
    max_batch: int | None = None  # rows decoding together; None: DEFAULT_MAX_BATCH where the bundle can batch, else 1
    # Prompt tokens fed between two decode steps, a longer prompt in chunks: while rows decode, a
    # long prompt or a burst of arrivals costs them this much prefill per step, not whole prompts
    # (serve_load, LLaVA-shaped, in separate runs: p99 gap 715 ms with whole prompts within 512,
    # 473 ms chunked at 128, 393 ms at 64, at the same throughput).
    max_prefill_tokens: int = 128
    request_timeout_s: float = 300.0  # queueing plus generation
    max_body_bytes: int = 32 * MiB
    max_image_bytes: int = 20 * MiB
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    max_concurrent_images: int = 2  # decoded and preprocessed at once: ≤ 7 bytes per pixel each (RGBA)
    max_images: int = 8  # image_url parts in one request's messages, every turn counted; past it, 400
    # Preprocessed images held by requests not yet prefilled (queued or preparing); past it, 429.
    max_image_memory_bytes: int = 1024 * MiB
    max_prompt_tokens: int | None = None  # None: the model's context is the only limit
    default_max_tokens: int = 256  # when a request sets neither max_tokens nor max_completion_tokens
    allow_remote_images: bool = False
    remote_image_timeout_s: float = 10.0  # the whole download, redirects included
    allow_private_image_hosts: bool = False  # loopback, private, link-local … addresses too
    allowed_image_domains: tuple[str, ...] = ()  # empty: any public host
    image_ca_file: str | None = None  # https image hosts are checked against this CA bundle, not the system's
    warmup: bool = True
    max_connections: int = 512  # open connections and requests in flight; past it, uvicorn answers 503
    header_timeout_s: float = 10.0  # a request's headers must be complete this long after connecting or a response
    keep_alive_timeout_s: float = 5.0  # an idle keep-alive connection is closed after this
    tune_malloc: bool = True  # glibc: a fixed mmap threshold and 2 arenas (runtime/malloc.py)
    # Host header names requests may carry (any port); None: any. zspa-serve fills it from the bound
    # address: loopback names when bound to loopback, so a web page cannot reach the service
    # through DNS rebinding.
    allowed_hosts: frozenset[str] | None = None

    @property
    def fetch_policy(self) -> FetchPolicy | None:
        """How remote images are fetched; None when they are disabled."""
        if not self.allow_remote_images:
            return None
        return FetchPolicy(self.max_image_bytes, self.remote_image_timeout_s, self.allow_private_image_hosts,
                           self.allowed_image_domains, self.image_ca_file)

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_body_bytes", "max_image_bytes", "max_image_pixels", "max_concurrent_images",
                     "max_images", "max_image_memory_bytes", "default_max_tokens", "max_connections",
                     "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.max_batch is not None and not 1 <= self.max_batch <= 256:
            raise ValueError(f"max_batch must be in [1, 256], got {self.max_batch}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be ≥ 1, got {self.max_prompt_tokens}")
        for name in ("request_timeout_s", "remote_image_timeout_s", "header_timeout_s", "keep_alive_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


def allowed_hosts(bound: str, extra: list[str] | None) -> frozenset[str] | None:
    """The Host names the service answers: loopback names on loopback, the bound address when bound
    to one, anything on a wildcard bind; plus `extra` ('*': anything)."""
    extra = extra or []
    if "*" in extra or (bound in WILDCARD and not extra):
        return None
    own = LOOPBACK if bound in LOOPBACK else set() if bound in WILDCARD else {bound.strip("[]").lower()}
    return frozenset(own | set(extra))
