"""Prometheus metrics for `/metrics`: what a dashboard of a VLM service plots.

A registry per server instance, not prometheus_client's global one, so that two servers in one
process (tests) never share counters. Label values come from fixed sets, never from a client: a
request's keep ratio is labelled only when it is one the bundle was exported at ("other"
otherwise), so 20,000 requests with 20,000 keep values stay a handful of series.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from zspa.runtime.pipeline import STAGES, GenerationStats

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# A decode step takes milliseconds to tens of them; a gap past a few steps is a row held up.
_TOKEN_GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                      0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, keeps: set[float] | frozenset[float] = frozenset()) -> None:
        self.keep_labels = {f"{keep:g}" for keep in (*keeps, 1.0)}  # 1.0: unpruned
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("zspa_http_requests", "HTTP requests by route and status code", ["route", "status"],
                                registry=r)
        self.queue_depth = Gauge("zspa_queue_depth", "Requests waiting for the pipeline", registry=r)
        self.running = Gauge("zspa_requests_running", "Requests decoding in the batch", registry=r)
        self.cancelled = Counter("zspa_generations_cancelled", "Generations stopped early, by reason", ["reason"],
                                 registry=r)
        self.queue_wait = Histogram("zspa_queue_wait_seconds", "Time from arrival to the pipeline starting",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("zspa_stage_seconds", "Per-stage latency of a generation", ["stage"],
                               buckets=_LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("zspa_time_to_first_token_seconds",
                                             "From the pipeline starting to the first token",
                                             buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "zspa_inter_token_latency_seconds",
            "Between two tokens of one answer, at the scheduler: a decode step, and any prefill chunks fed before it",
            buckets=_TOKEN_GAP_BUCKETS, registry=r)
        self.decode_rate = Histogram("zspa_decode_tokens_per_second", "Decode speed per request",
                                     buckets=_RATE_BUCKETS, registry=r)
        self.keep = Counter("zspa_keep_ratio_requests", "Completed generations by keep ratio and pruning method",
                            ["keep", "method"], registry=r)
        self.prompt_tokens = Counter("zspa_prompt_tokens", "Tokens prefilled (text plus kept visual tokens)",
                                     registry=r)
        self.completion_tokens = Counter("zspa_completion_tokens", "Tokens generated", registry=r)
        self.visual_tokens = Counter("zspa_visual_tokens", "Visual tokens, as produced and as kept", ["kind"],
                                     registry=r)
        self.vision_cache = Counter("zspa_vision_cache_lookups", "Vision-cache lookups, by result (hit, miss)",
                                    ["result"], registry=r)

    def observe_generation(self, stats: GenerationStats, keep: float, method: str) -> None:
        for stage in STAGES:
            self.stage.labels(stage).observe(stats.timings_ms[stage] / 1000.0)
        self.time_to_first_token.observe(stats.time_to_first_token_ms / 1000.0)
        if stats.decode_tokens_per_s > 0:
            self.decode_rate.observe(stats.decode_tokens_per_s)
        label = f"{keep:g}"
        self.keep.labels(label if label in self.keep_labels else "other", method).inc()
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.completion_tokens.inc(stats.tokens_generated)
        self.visual_tokens.labels("total").inc(stats.visual_tokens_total)
        self.visual_tokens.labels("kept").inc(stats.visual_tokens_kept)
        for hit in stats.vision_cache_hits or []:
            self.vision_cache.labels("hit" if hit else "miss").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
