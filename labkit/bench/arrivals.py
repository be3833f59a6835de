"""When each request is sent: Poisson, gamma (burstiness), fixed rate, all at once, or a trace.

Gamma follows `vllm bench serve`: gaps ~ Gamma(shape=burstiness, scale=1 / (rate * burstiness)),
so the mean rate is `rate` for every burstiness; burstiness 1 is Poisson, < 1 burstier, > 1
more even. "burst" sends everything at t=0 (throughput runs, usually with max concurrency).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

ArrivalKind = Literal["poisson", "gamma", "fixed", "burst", "trace"]


@dataclass(frozen=True, slots=True)
class Arrivals:
    """An arrival process; `rate_rps` in requests per second (unused by burst and trace)."""

    kind: ArrivalKind = "poisson"
    rate_rps: float = 1.0
    burstiness: float = 1.0
    trace_speedup: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("poisson", "gamma", "fixed", "burst", "trace"):
            raise ValueError(f"arrival kind {self.kind!r} is not one of poisson, gamma, fixed, burst, trace")
        if self.kind in ("poisson", "gamma", "fixed") and not (self.rate_rps > 0 and math.isfinite(self.rate_rps)):
            raise ValueError(f"{self.kind} arrivals need a finite rate_rps > 0, got {self.rate_rps}")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")
        if not self.trace_speedup > 0:
            raise ValueError(f"trace_speedup must be > 0, got {self.trace_speedup}")

    def times_s(self, n: int, seed: int = 0, trace_s: Sequence[float | None] | None = None) -> np.ndarray:
        """Send times in seconds from the start, non-decreasing, first at 0 (trace: as given / speedup)."""
        if self.kind == "burst":
            return np.zeros(n)
        if self.kind == "trace":
            if trace_s is None or any(t is None for t in trace_s):
                raise ValueError("trace arrivals need every request's arrival_s (load the workload from a trace)")
            t = np.asarray(trace_s, dtype=np.float64)
            return (t - t.min()) / self.trace_speedup if n else t
        if self.kind == "fixed":
            gaps = np.full(n, 1.0 / self.rate_rps)
        else:
            shape = 1.0 if self.kind == "poisson" else self.burstiness
            rng = np.random.default_rng([seed, 3])
            gaps = rng.gamma(shape, 1.0 / (self.rate_rps * shape), size=n)
        if n:
            gaps[0] = 0.0  # the first request goes at once, so the run does not start idle
        return np.cumsum(gaps)

    def describe(self) -> str:
        if self.kind == "burst":
            return "all at once"
        if self.kind == "trace":
            return f"trace timestamps x{self.trace_speedup:g}"
        extra = f", burstiness {self.burstiness:g}" if self.kind == "gamma" else ""
        return f"{self.kind} {self.rate_rps:g} req/s{extra}"
