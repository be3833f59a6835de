"""Selective disaggregation (llm-d's decider): which prefill threshold suits a workload?

With `Layout.disagg(P, D, prefill_threshold=N)`, a prompt whose uncached suffix is shorter than N
tokens is prefilled on its decode device (no transfer, but a stall for that device's running
decodes), the rest on the prefill pool. N = 0 is plain xPyD; N above every prompt is mono on the
decode devices with the prefill pool idle. `best_prefill_threshold` sweeps N in the simulator and
returns the goodput at each, best first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from labkit.links import Link
from labkit.plan.goodput import SearchSettings, max_goodput_rate
from labkit.plan.latency_model import LatencyModel
from labkit.plan.simulator import SLO, Layout, Limits, SimResult, simulate
from labkit.plan.workload import Requests


def threshold_candidates(requests: Requests, prefix_hit_rate: float = 0.0, count: int = 8) -> list[int]:
    """0, thresholds that send each decile-ish share of prompts to the decode side (one past the
    uncached length at `count` quantiles), and one above every prompt; sorted, distinct."""
    p = requests.prompt_tokens.astype(np.int64)
    uncached = p - np.minimum(np.floor(p * prefix_hit_rate), p - 1).astype(np.int64)
    qs = np.quantile(uncached, np.linspace(0, 1, count + 1)[1:-1]) if count > 1 else np.array([])
    return sorted({0, *(int(q) + 1 for q in qs), int(uncached.max()) + 1})


@dataclass(frozen=True)
class ThresholdSweep:
    """Goodput (req/s meeting the SLOs) of one xPyD unit at each prefill threshold (tokens)."""

    unit: Layout
    thresholds: tuple[int, ...]
    goodput_rps: tuple[float, ...]
    share_on_decode: tuple[float, ...]  # share of prompts each threshold prefills on the decode side
    results: tuple[SimResult | None, ...]
    rate_rps: float | None  # None: each goodput is the highest rate the unit sustains

    @property
    def best_index(self) -> int:
        """The threshold with the most goodput (the smallest one on a tie: fewer stalls on decode)."""
        g = np.asarray(self.goodput_rps)
        return int(np.flatnonzero(g >= g.max() - 1e-12)[0])

    @property
    def best_threshold(self) -> int:
        return self.thresholds[self.best_index]

    def gain_over_plain(self) -> float:
        """Goodput at the best threshold over threshold 0 (plain xPyD)."""
        base = self.goodput_rps[self.thresholds.index(0)] if 0 in self.thresholds else math.nan
        return self.goodput_rps[self.best_index] / base if base else math.inf

    def rows(self) -> list[dict[str, Any]]:
        return [
            {"threshold (tokens)": t, "prefilled on decode": round(s, 3), "goodput (req/s)": round(g, 3)}
            for t, s, g in zip(self.thresholds, self.share_on_decode, self.goodput_rps)
        ]


def best_prefill_threshold(
    requests: Requests,
    latency: LatencyModel,
    slo: SLO,
    *,
    num_prefill: int = 1,
    num_decode: int = 1,
    thresholds: Sequence[int] | None = None,
    rate_rps: float | None = None,
    link: Link | None = None,
    limits: Limits | None = None,
    prefix_hit_rate: float = 0.0,
    settings: SearchSettings | None = None,
    decode_latency: LatencyModel | None = None,
    first_token_at: Literal["adopted", "landed"] = "adopted",
) -> ThresholdSweep:
    """Sweeps the threshold of a PxD unit. With `rate_rps`, each point is the goodput of `requests`
    replayed at that rate; without, the highest rate the unit sustains at >= the attainment target
    (`max_goodput_rate`, DistServe's goodput). Returns the sweep; `.best_threshold` is the answer."""
    ts = sorted(set(thresholds)) if thresholds is not None else threshold_candidates(requests, prefix_hit_rate)
    if not ts or ts[0] < 0:
        raise ValueError(f"thresholds must be >= 0 tokens, got {ts}")
    p = requests.prompt_tokens
    cached = np.minimum(np.floor(p * prefix_hit_rate), p - 1)
    goodput, share, results = [], [], []
    for t in ts:
        unit = Layout.disagg(num_prefill, num_decode, prefill_threshold=t)
        share.append(float(np.mean(p - cached < t)))
        if rate_rps is None:
            g, res = max_goodput_rate(
                requests,
                latency,
                unit,
                slo,
                link=link,
                limits=limits,
                prefix_hit_rate=prefix_hit_rate,
                settings=settings,
                decode_latency=decode_latency,
            )
        else:
            res = simulate(
                requests.at_rate(rate_rps),
                latency,
                unit,
                link=link,
                limits=limits,
                prefix_hit_rate=prefix_hit_rate,
                decode_latency=decode_latency,
                first_token_at=first_token_at,
            )
            g = res.goodput_rps(slo)
        goodput.append(float(g))
        results.append(res)
    return ThresholdSweep(
        Layout.disagg(num_prefill, num_decode), tuple(ts), tuple(goodput), tuple(share), tuple(results), rate_rps
    )
