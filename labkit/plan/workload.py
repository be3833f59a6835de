"""What the planner simulates: request arrivals with prompt and output lengths.

`WorkloadShape` is a pair of log-normal length distributions (median and spread), enough to
say "Azure conversation: median 1,020 prompt / 129 output tokens", and easy to move with a
slider. The named presets are the benchmark's (`labkit.bench.workloads`: Azure 2023 traces,
Mooncake, short prompts); `workload_shape(name)` adapts them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class WorkloadShape:
    """Prompt and output lengths in tokens: log-normal with a median and a sigma (of the log)."""

    name: str
    prompt_median_tokens: float
    output_median_tokens: float
    prompt_sigma: float = 0.0  # 0: every prompt has the median length
    output_sigma: float = 0.0
    max_prompt_tokens: int = 32768
    max_output_tokens: int = 4096
    prefix_hit_rate: float = 0.0  # fraction of prompt tokens found in a prefix cache
    source: str = ""

    def __post_init__(self) -> None:
        if not (self.prompt_median_tokens >= 1 and self.output_median_tokens >= 1):
            raise ValueError(
                f"{self.name}: median lengths must be >= 1 token, got "
                f"{self.prompt_median_tokens}/{self.output_median_tokens}"
            )
        if self.prompt_sigma < 0 or self.output_sigma < 0:
            raise ValueError(f"{self.name}: sigmas must be >= 0")
        if not 0.0 <= self.prefix_hit_rate < 1.0:
            raise ValueError(f"{self.name}: prefix_hit_rate must be in [0, 1), got {self.prefix_hit_rate}")

    def with_(self, **changes: Any) -> WorkloadShape:
        """A copy with some fields changed (validated again)."""
        from dataclasses import replace

        return replace(self, **changes)

    @property
    def mean_prompt_tokens(self) -> float:
        return min(self.prompt_median_tokens * math.exp(self.prompt_sigma**2 / 2), self.max_prompt_tokens)

    @property
    def mean_output_tokens(self) -> float:
        return min(self.output_median_tokens * math.exp(self.output_sigma**2 / 2), self.max_output_tokens)


@dataclass(frozen=True)
class Requests:
    """A trace to simulate: arrival times (s, sorted) and lengths (tokens), one entry per request."""

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if n == 0:
            raise ValueError("Requests: empty trace")
        if len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise ValueError("Requests: arrival_s, prompt_tokens and output_tokens differ in length")
        if (np.diff(self.arrival_s) < 0).any():
            raise ValueError("Requests: arrival_s must be sorted")
        if (self.prompt_tokens < 1).any() or (self.output_tokens < 1).any():
            raise ValueError("Requests: every prompt and output needs >= 1 token")

    def __len__(self) -> int:
        return len(self.arrival_s)

    def head(self, n: int) -> Requests:
        """The first `n` requests (all of them when n >= len)."""
        return self if n >= len(self) else Requests(self.arrival_s[:n], self.prompt_tokens[:n], self.output_tokens[:n])

    def repeat_to(self, n: int) -> Requests:
        """The first `n` requests of this trace played over and over (each pass starts one mean gap
        after the previous one ends): a pool long enough for a large unit at a high rate."""
        if n <= len(self):
            return self.head(max(n, 1))
        reps = -(-n // len(self))
        span = float(self.arrival_s[-1] - self.arrival_s[0])
        period = span + (span / (len(self) - 1) if len(self) > 1 and span > 0 else 1.0)
        arrival = np.concatenate([self.arrival_s + k * period for k in range(reps)])
        return Requests(arrival[:n], np.tile(self.prompt_tokens, reps)[:n], np.tile(self.output_tokens, reps)[:n])

    def at_rate(self, rate_rps: float) -> Requests:
        """The same requests with arrival times rescaled to a mean rate (requests/s)."""
        if not rate_rps > 0:
            raise ValueError(f"rate_rps must be > 0, got {rate_rps}")
        span = self.arrival_s[-1] if len(self) > 1 else 1.0
        cur = (len(self) - 1) / span if span > 0 else rate_rps
        return Requests(self.arrival_s * (cur / rate_rps), self.prompt_tokens, self.output_tokens)


def requests_from_records(records: Sequence[Any]) -> Requests:
    """The trace a benchmark run sent (ok requests only; `labkit.bench` RequestRecords): send times
    from the first one, prompt and output tokens."""
    ok = sorted((r for r in records if getattr(r, "ok", True)), key=lambda r: r.start_s)
    if not ok:
        raise ValueError("no successful requests in the run: nothing to replay")
    t0 = ok[0].start_s
    out = [max(1, int(r.output_tokens or r.expected_output_tokens)) for r in ok]
    return Requests(
        np.array([r.start_s - t0 for r in ok], dtype=float),
        np.array([int(r.prompt_tokens) for r in ok], dtype=np.int64),
        np.array(out, dtype=np.int64),
    )


def sample_requests(shape: WorkloadShape, num_requests: int, rate_rps: float, *, seed: int = 0) -> Requests:
    """Poisson arrivals at `rate_rps` with log-normal lengths; deterministic for a seed."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be >= 1, got {num_requests}")
    if not rate_rps > 0:
        raise ValueError(f"rate_rps must be > 0, got {rate_rps}")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate_rps, num_requests)
    gaps[0] = 0.0
    arrival = np.cumsum(gaps)

    def lengths(median: float, sigma: float, cap: int) -> np.ndarray:
        x = median * np.exp(sigma * rng.standard_normal(num_requests)) if sigma > 0 else np.full(num_requests, median)
        return np.clip(np.rint(x), 1, cap).astype(np.int64)

    prompt = lengths(shape.prompt_median_tokens, shape.prompt_sigma, shape.max_prompt_tokens)
    output = lengths(shape.output_median_tokens, shape.output_sigma, shape.max_output_tokens)
    return Requests(arrival, prompt, output)


def workload_names() -> list[str]:
    """The preset names `workload_shape` accepts (the benchmark's presets)."""
    from labkit.bench.workloads import WORKLOADS

    return list(WORKLOADS)


def workload_shape(name: str) -> WorkloadShape:
    """A benchmark preset (`labkit.bench.workloads`) as median/sigma shapes the sliders can move."""
    from labkit.bench.workloads import get_workload

    return shape_from_workload(get_workload(name))


def shape_from_workload(w: Any) -> WorkloadShape:
    """Adapts a `labkit.bench.workloads.Workload`: lognormals keep median and sigma; a uniform
    [low, high] becomes a lognormal with its middle as median and a spread that reaches the ends."""

    def conv(d: Any) -> tuple[float, float, int]:
        if d.kind == "lognormal":
            return float(d.value), float(d.sigma), int(d.high)
        if d.kind == "fixed":
            return float(d.value), 0.0, int(d.value)
        mid = (d.low + d.high) / 2
        return mid, math.log(d.high / mid) / 2 if d.high > mid else 0.0, int(d.high)

    pm, ps, ph = conv(w.prompt_len)
    om, os_, oh = conv(w.output_len)
    return WorkloadShape(
        w.name,
        pm,
        om,
        ps,
        os_,
        ph,
        oh,
        prefix_hit_rate=float(w.prefix_hit_rate),
        source=getattr(w, "source", "") or "labkit.bench.workloads",
    )
