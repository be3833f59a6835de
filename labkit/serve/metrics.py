"""Prometheus metrics of the router and the workers (prometheus_client, one registry each).

The router measures what clients see (TTFT, ITL, end-to-end latency, queue depth, routing
decisions, predicted prefix-cache hits, the TTFT's parts and the KV's achieved speed per request)
and re-exports what it polls from each worker's
/health (KV blocks in use, running requests, KV transfer bytes and seconds), labelled by
upstream, so one scrape of the public URL shows the whole server.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from labkit.serve.messages import WorkerHealth

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Buckets: CPU runs reach seconds, GPU runs milliseconds; both should land inside.
TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5, 5)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TRANSFER_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5)
PART_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
GB_PER_S_BUCKETS = (0.01, 0.03, 0.1, 0.3, 1, 3, 10, 30, 100, 300)


class RouterMetrics:
    """Everything the router's /metrics shows. `workers()`: (upstream name, role, last /health) of
    each lab worker, re-exported as `labkit_worker_*` series."""

    def __init__(self, workers: Callable[[], Iterable[tuple[str, str, WorkerHealth]]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("labkit_router_requests", "Completion requests by outcome", ["outcome"], registry=r)
        self.ttft_s = Histogram(
            "labkit_router_ttft_seconds", "Time to first token seen by the router", buckets=TTFT_BUCKETS_S, registry=r
        )
        self.itl_s = Histogram(
            "labkit_router_itl_seconds", "Inter-token latency seen by the router", buckets=ITL_BUCKETS_S, registry=r
        )
        self.e2e_s = Histogram(
            "labkit_router_e2e_seconds",
            "Request latency, first byte in to last byte out",
            buckets=E2E_BUCKETS_S,
            registry=r,
        )
        self.queue_depth = Gauge("labkit_router_queue_depth", "Requests inside the router now", registry=r)
        self.prompt_tokens = Counter("labkit_router_prompt_tokens", "Prompt tokens routed", registry=r)
        self.generation_tokens = Counter("labkit_router_generation_tokens", "Tokens sent to clients", registry=r)
        self.decisions = Counter(
            "labkit_router_decisions", "Routing decisions", ["role", "upstream", "reason"], registry=r
        )
        self.prefills = Counter(
            "labkit_router_prefills",
            "Prompts by where they were prefilled: a mono worker, a prefill worker, or the "
            "decode worker itself (selective disaggregation)",
            ["where", "upstream"],
            registry=r,
        )
        self.prefix_hit_tokens = Counter(
            "labkit_router_prefix_hit_tokens",
            "Prompt tokens routed to an instance that already caches them",
            ["upstream"],
            registry=r,
        )
        self.upstream_up = Gauge(
            "labkit_router_upstream_up", "1 while an upstream answers /health", ["upstream", "role"], registry=r
        )
        # The per-request waterfall (labkit.serve.waterfall): the TTFT's parts, the KV's achieved speed.
        self.ttft_part_s = Histogram(
            "labkit_router_ttft_part_seconds",
            "Time to first token by part: router, http, queue, prefill, kv_transfer, "
            "first_token_out (they sum to the TTFT)",
            ["part"],
            buckets=PART_BUCKETS_S,
            registry=r,
        )
        self.decode_admit_s = Histogram(
            "labkit_router_decode_admit_seconds",
            "Decode worker: request taken to its KV received and adopted",
            buckets=PART_BUCKETS_S,
            registry=r,
        )
        self.kv_gb_per_s = Histogram(
            "labkit_router_kv_transfer_gb_per_s",
            "KV bytes over the transfer's window, per request (1e9 B/s)",
            ["transport"],
            buckets=GB_PER_S_BUCKETS,
            registry=r,
        )
        self.kv_slow = Counter(
            "labkit_router_kv_slow_transfers",
            "KV transfers a prefill worker flagged as far below this host's measured figure",
            ["upstream"],
            registry=r,
        )
        if workers is not None:
            r.register(_WorkerCollector(workers))

    def observe_waterfall(self, report: Mapping[str, Any]) -> None:
        """One request's waterfall (labkit.serve.waterfall.RequestTiming.report) into the histograms."""
        from labkit.serve.waterfall import PARTS

        for part in PARTS:
            self.ttft_part_s.labels(part.removesuffix("_s")).observe(max(0.0, float(report[part])))
        if report.get("decode_admit_s") is not None:
            self.decode_admit_s.observe(float(report["decode_admit_s"]))
        if report.get("kv_gb_per_s") is not None:
            self.kv_gb_per_s.labels(report.get("kv_transport") or "?").observe(float(report["kv_gb_per_s"]))

    def render(self) -> bytes:
        return generate_latest(self.registry)


# (series, help, WorkerHealth field): what the router re-exports of each worker's last /health.
_GAUGES = (
    ("kv_blocks_used", "KV blocks in use", "kv_blocks_used"),
    ("kv_blocks_total", "KV blocks in the pool", "kv_blocks_total"),
    ("running_requests", "Requests running or waiting in the engine", "running_requests"),
)
_COUNTERS = (
    ("kv_transfer_bytes", "KV bytes sent (prefill) or received (decode)", "kv_transfer_bytes_total"),
    ("kv_transfer_seconds", "Seconds of KV transfers, send start to ack (prefill side)", "kv_transfer_seconds_total"),
    (
        "kv_slow_transfers",
        "KV transfers far below this host's measured figure (prefill side)",
        "kv_slow_transfers_total",
    ),
    ("prefill_tokens", "Prompt tokens prefilled", "prefill_tokens_total"),
    ("decode_tokens", "Tokens decoded", "decode_tokens_total"),
)


class _WorkerCollector(Collector):
    def __init__(self, source: Callable[[], Iterable[tuple[str, str, WorkerHealth]]]) -> None:
        self.source = source

    def collect(self) -> Iterable[Any]:
        fams: list[tuple[Any, str]] = [
            *((GaugeMetricFamily(f"labkit_worker_{k}", h, labels=["upstream", "role"]), f) for k, h, f in _GAUGES),
            *((CounterMetricFamily(f"labkit_worker_{k}", h, labels=["upstream", "role"]), f) for k, h, f in _COUNTERS),
        ]
        for name, role, health in self.source():
            for fam, attr in fams:
                fam.add_metric([name, role], float(getattr(health, attr)))
        yield from (fam for fam, _ in fams)


class WorkerMetrics:
    """A worker's statistics, kept once: its /metrics shows them and its /health reads them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("labkit_worker_requests", "Requests by outcome", ["outcome"], registry=r)
        self.step_s = Histogram(
            "labkit_worker_step_seconds", "Engine step time by phase", ["phase"], buckets=ITL_BUCKETS_S, registry=r
        )
        self.tokens = Counter("labkit_worker_tokens", "Tokens processed by phase", ["phase"], registry=r)
        self.engine_errors = Counter("labkit_worker_engine_errors", "Engine steps that raised", registry=r)
        self.kv_blocks_used = Gauge("labkit_worker_kv_blocks_used", "KV blocks in use", registry=r)
        self.kv_blocks_total = Gauge("labkit_worker_kv_blocks_total", "KV blocks in the pool", registry=r)
        self.running = Gauge("labkit_worker_running_requests", "Requests in the engine", registry=r)
        self.transfer_bytes = Counter(
            "labkit_worker_kv_transfer_bytes", "KV bytes moved by this worker", ["direction"], registry=r
        )
        self.transfer_s = Histogram(
            "labkit_worker_kv_transfer_seconds",
            "One request's KV transfer, send start to the receiver's ack (sender side)",
            ["direction"],
            buckets=TRANSFER_BUCKETS_S,
            registry=r,
        )
        self.kv_slow = Counter(
            "labkit_worker_kv_slow_transfers",
            "KV transfers far slower than this host's measured figure for their transport",
            ["transport"],
            registry=r,
        )
        self.kv_wait_s = Histogram(
            "labkit_worker_kv_wait_seconds",
            "Decode side: how long a request waited for its KV to be there",
            buckets=TRANSFER_BUCKETS_S,
            registry=r,
        )

    def on_step(self, out: Any) -> None:
        """Called by the engine thread after each step (a StepOutput)."""
        if out.phase == "idle":
            return
        self.step_s.labels(out.phase).observe(float(out.elapsed_s))
        if out.num_prefill_tokens:
            self.tokens.labels("prefill").inc(out.num_prefill_tokens)
        if out.num_decode_seqs:
            self.tokens.labels("decode").inc(out.num_decode_seqs)

    def value(self, name: str, **labels: str) -> float:
        """A series' current value from the registry (0 before its first observation)."""
        return self.registry.get_sample_value(name, labels) or 0.0

    def totals(self) -> dict[str, Any]:
        """The counters /health reports, read from the registry."""
        return {
            "prefill_tokens_total": int(self.value("labkit_worker_tokens_total", phase="prefill")),
            "decode_tokens_total": int(self.value("labkit_worker_tokens_total", phase="decode")),
            "kv_transfer_bytes_total": int(
                sum(self.value("labkit_worker_kv_transfer_bytes_total", direction=d) for d in ("send", "recv"))
            ),
            "kv_transfer_seconds_total": self.value("labkit_worker_kv_transfer_seconds_sum", direction="send"),
            "engine_errors_total": int(self.value("labkit_worker_engine_errors_total")),
            "kv_slow_transfers_total": int(
                sum(s.value for m in self.kv_slow.collect() for s in m.samples if s.name.endswith("_total"))
            ),
        }

    def render(self) -> bytes:
        return generate_latest(self.registry)
