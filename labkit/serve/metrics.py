"""Prometheus metrics of the router and the workers (prometheus_client, one registry each).

The router measures what clients see (TTFT, ITL, end-to-end latency, queue depth, routing
decisions, predicted prefix-cache hits) and re-exports what it polls from each worker's
/health (KV blocks in use, running requests, KV transfer bytes and seconds), labelled by
upstream, so one scrape of the public URL shows the whole server.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets: CPU runs reach seconds, GPU runs milliseconds; both should land inside.
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TRANSFER_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)


class RouterMetrics:
    """Everything the router's /metrics shows."""

    def __init__(self, worker_stats: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("labkit_router_requests", "Completion requests by outcome", ["outcome"], registry=r)
        self.ttft_s = Histogram("labkit_router_ttft_seconds", "Time to first token seen by the router",
                                buckets=TTFT_BUCKETS_S, registry=r)
        self.itl_s = Histogram("labkit_router_itl_seconds", "Inter-token latency seen by the router",
                               buckets=ITL_BUCKETS_S, registry=r)
        self.e2e_s = Histogram("labkit_router_e2e_seconds", "Request latency, first byte in to last byte out",
                               buckets=E2E_BUCKETS_S, registry=r)
        self.queue_depth = Gauge("labkit_router_queue_depth", "Requests inside the router now", registry=r)
        self.prompt_tokens = Counter("labkit_router_prompt_tokens", "Prompt tokens routed", registry=r)
        self.generation_tokens = Counter("labkit_router_generation_tokens", "Tokens sent to clients", registry=r)
        self.decisions = Counter("labkit_router_decisions", "Routing decisions",
                                 ["role", "upstream", "reason"], registry=r)
        self.prefix_hit_tokens = Counter("labkit_router_prefix_hit_tokens",
                                         "Prompt tokens routed to an instance that already caches them",
                                         ["upstream"], registry=r)
        self.upstream_up = Gauge("labkit_router_upstream_up", "1 while an upstream answers /health",
                                 ["upstream", "role"], registry=r)
        if worker_stats is not None:
            r.register(_WorkerStatsCollector(worker_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _WorkerStatsCollector(Collector):
    """Re-exports the last /health poll of every worker."""

    def __init__(self, source: Callable[[], list[dict[str, Any]]]) -> None:
        self.source = source

    def collect(self) -> Iterable[Any]:
        gauges = {k: GaugeMetricFamily(f"labkit_worker_{k}", h, labels=["upstream", "role"]) for k, h in (
            ("kv_blocks_used", "KV blocks in use"), ("kv_blocks_total", "KV blocks in the pool"),
            ("running_requests", "Requests running or waiting in the engine"))}
        counters = {k: CounterMetricFamily(f"labkit_worker_{k}", h, labels=["upstream", "role"]) for k, h in (
            ("kv_transfer_bytes", "KV bytes sent (prefill) or received (decode)"),
            ("kv_transfer_seconds", "Seconds of KV transfers, send start to ack (prefill side)"),
            ("prefill_tokens", "Prompt tokens prefilled"), ("decode_tokens", "Tokens decoded"))}
        for s in self.source():
            labels = [str(s.get("name", "?")), str(s.get("role", "?"))]
            for k, fam in gauges.items():
                if s.get(k) is not None:
                    fam.add_metric(labels, float(s[k]))
            for k, fam in counters.items():
                if s.get(f"{k}_total") is not None:
                    fam.add_metric(labels, float(s[f"{k}_total"]))
        yield from gauges.values()
        yield from counters.values()


class WorkerMetrics:
    """A worker's own /metrics."""

    def __init__(self, role: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.role = role
        self.requests = Counter("labkit_worker_requests", "Requests by outcome", ["outcome"], registry=r)
        self.step_s = Histogram("labkit_worker_step_seconds", "Engine step time by phase", ["phase"],
                                buckets=ITL_BUCKETS_S, registry=r)
        self.tokens = Counter("labkit_worker_tokens", "Tokens processed by phase", ["phase"], registry=r)
        self.kv_blocks_used = Gauge("labkit_worker_kv_blocks_used", "KV blocks in use", registry=r)
        self.kv_blocks_total = Gauge("labkit_worker_kv_blocks_total", "KV blocks in the pool", registry=r)
        self.running = Gauge("labkit_worker_running_requests", "Requests in the engine", registry=r)
        self.transfer_bytes = Counter("labkit_worker_kv_transfer_bytes", "KV bytes moved by this worker",
                                      ["direction"], registry=r)
        self.transfer_s = Histogram("labkit_worker_kv_transfer_seconds",
                                    "One request's KV transfer, send start to the receiver's ack (sender side)",
                                    ["direction"], buckets=TRANSFER_BUCKETS_S, registry=r)
        self.kv_wait_s = Histogram("labkit_worker_kv_wait_seconds",
                                   "Decode side: how long a request waited for its KV to be there",
                                   buckets=TRANSFER_BUCKETS_S, registry=r)

    def on_step(self, out: Any) -> None:
        """Called by the engine thread after each step."""
        phase = getattr(out, "phase", "idle")
        if phase == "idle":
            return
        self.step_s.labels(phase).observe(float(getattr(out, "elapsed_s", 0.0) or 0.0))
        n_pre = int(getattr(out, "num_prefill_tokens", 0) or 0)
        n_dec = int(getattr(out, "num_decode_seqs", 0) or 0)
        if n_pre:
            self.tokens.labels("prefill").inc(n_pre)
        if n_dec:
            self.tokens.labels("decode").inc(n_dec)

    def render(self) -> bytes:
        return generate_latest(self.registry)
