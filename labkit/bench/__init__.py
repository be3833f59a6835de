"""Benchmarks: workloads, traces, the async load generator, metrics and goodput, sweeps.

The pieces a planner or notebook needs without a server are importable from here:

    >>> from labkit.bench import get_workload, sample_requests, SLO
"""

from __future__ import annotations

from labkit.bench.arrivals import Arrivals
from labkit.bench.metrics import SLO, RequestRecord, Summary, cost_per_million_tokens, summarize
from labkit.bench.workloads import (
    WORKLOADS,
    BenchRequest,
    LengthDist,
    LengthScaling,
    SampledWorkload,
    TokenSpace,
    Workload,
    build_requests,
    fit_to_context,
    get_workload,
    sample_requests,
    synthetic,
)

__all__ = [
    "SLO",
    "WORKLOADS",
    "Arrivals",
    "BenchRequest",
    "LengthDist",
    "LengthScaling",
    "RequestRecord",
    "SampledWorkload",
    "Summary",
    "TokenSpace",
    "Workload",
    "build_requests",
    "cost_per_million_tokens",
    "fit_to_context",
    "get_workload",
    "sample_requests",
    "summarize",
    "synthetic",
]
