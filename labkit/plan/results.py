"""What a simulation returns: per-request times, the ITL distribution, percentiles, goodput under SLOs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from labkit.plan.layout import Layout


@dataclass(frozen=True, slots=True)
class SLO:
    """Service-level objectives a request must meet to count toward goodput."""

    ttft_s: float = 2.0
    tpot_s: float = 0.1

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tpot_s > 0):
            raise ValueError(f"SLO needs ttft_s > 0 and tpot_s > 0, got {self}")


@dataclass(frozen=True)
class SimResult:
    """Per-request times (seconds since the trace began) and the ITL distribution of one run."""

    layout: Layout
    arrival_s: np.ndarray
    first_token_s: np.ndarray
    finish_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    itl_values_s: np.ndarray  # inter-token latencies ...
    itl_weights: np.ndarray  # ... each counted this many times (segments of equal steps)

    @property
    def ttft_s(self) -> np.ndarray:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> np.ndarray:
        return self.finish_s - self.arrival_s

    @property
    def tpot_s(self) -> np.ndarray:
        """(E2E - TTFT) / (output tokens - 1); 0 for one-token outputs."""
        steps = np.maximum(self.output_tokens - 1, 1)
        return np.where(self.output_tokens > 1, (self.finish_s - self.first_token_s) / steps, 0.0)

    @property
    def duration_s(self) -> float:
        return float(self.finish_s.max() - self.arrival_s.min())

    def itl_percentile_s(self, q: float) -> float:
        """Weighted percentile (q in 0..100) of inter-token latency, seconds."""
        if len(self.itl_values_s) == 0:
            return 0.0
        order = np.argsort(self.itl_values_s)
        cw = np.cumsum(self.itl_weights[order])
        k = int(np.searchsorted(cw, q / 100 * cw[-1]))
        return float(self.itl_values_s[order][min(k, len(order) - 1)])

    def slo_met(self, slo: SLO) -> np.ndarray:
        return (self.ttft_s <= slo.ttft_s) & (self.tpot_s <= slo.tpot_s)

    def goodput_rps(self, slo: SLO) -> float:
        """DistServe's goodput: completed requests per second that meet every SLO."""
        return float(self.slo_met(slo).sum()) / max(self.duration_s, 1e-12)

    def summary(self, slo: SLO | None = None) -> dict[str, float | str]:
        """Headline numbers: percentiles in seconds, throughput in requests/s and output tokens/s."""
        d: dict[str, float | str] = {
            "layout": self.layout.label,
            "devices": self.layout.num_devices,
            "requests": len(self.arrival_s),
            "ttft_p50_s": float(np.percentile(self.ttft_s, 50)),
            "ttft_p90_s": float(np.percentile(self.ttft_s, 90)),
            "ttft_p99_s": float(np.percentile(self.ttft_s, 99)),
            "tpot_p50_s": float(np.percentile(self.tpot_s, 50)),
            "tpot_p90_s": float(np.percentile(self.tpot_s, 90)),
            "tpot_p99_s": float(np.percentile(self.tpot_s, 99)),
            "itl_p50_s": self.itl_percentile_s(50),
            "itl_p99_s": self.itl_percentile_s(99),
            "e2e_p50_s": float(np.percentile(self.e2e_s, 50)),
            "throughput_rps": len(self.arrival_s) / max(self.duration_s, 1e-12),
            "output_tok_s": float(self.output_tokens.sum()) / max(self.duration_s, 1e-12),
        }
        if slo is not None:
            d["slo_attainment"] = float(self.slo_met(slo).mean())
            d["goodput_rps"] = self.goodput_rps(slo)
        return d
