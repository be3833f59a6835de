"""The goodput of one serving unit: the highest request rate it sustains while meeting the SLOs.

DistServe's (OSDI'24) definition: the highest arrival rate at which at least `attainment` (90%)
of requests meet every SLO, found by simulation and bisection, and never above the unit's fluid
capacity (`capacity_rps`), which a short trace at a high rate could otherwise fake.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from labkit.links import LINKS, Link
from labkit.plan.latency_model import LatencyModel
from labkit.plan.simulator import (
    SLO,
    Layout,
    Limits,
    Policy,
    SimResult,
    prefilled_on_decode,
    simulate,
)
from labkit.plan.workload import Requests


@dataclass(frozen=True, slots=True)
class SearchSettings:
    """How hard to search: requests per simulation, bisection steps, the largest unit."""

    attainment: float = 0.9
    bisection_steps: int = 7
    rate_tolerance: float = 0.02  # stop bisecting when the bracket is this narrow (relative)
    max_unit_devices: int | None = None  # None: units up to two nodes (2 x devices_per_node)
    policies: tuple[Policy, ...] = ("prefill_first", "chunked")
    # A short trace at a high rate is one burst a fast unit drains within the TTFT SLO, and would
    # look "sustainable". So each run lasts `horizon_factor` x the slowest SLO-meeting request
    # (TTFT + output x TPOT), taking more requests at higher rates (at least `min_requests`; the
    # pool is played again when a large unit needs more than it holds, up to `max_requests`).
    # With heavy-tailed prompts (Azure code) one mono H100's goodput moved by 14% (sd/mean) between
    # six request seeds at 100 requests a run, 9% at 400, 7% at 1,000; xPyD units by 4%.
    horizon_factor: float = 3.0
    min_requests: int = 1000
    max_requests: int = 3000
    # Stop simulating units once the best packing of simulated units is within this share of what
    # any packing could reach with the units not simulated yet at their upper bounds.
    packing_tolerance: float = 0.05

    def __post_init__(self) -> None:
        if not 0 < self.attainment <= 1:
            raise ValueError(f"attainment must be in (0, 1], got {self.attainment}")
        if self.horizon_factor <= 0 or self.min_requests < 1 or self.max_requests < self.min_requests:
            raise ValueError(f"need horizon_factor > 0 and 1 <= min_requests <= max_requests, got {self}")
        if self.bisection_steps < 1 or not 0 < self.rate_tolerance < 1 or not 0 <= self.packing_tolerance < 1:
            raise ValueError(
                f"need bisection_steps >= 1, 0 < rate_tolerance < 1, 0 <= packing_tolerance < 1, got {self}"
            )
        if self.max_unit_devices is not None and self.max_unit_devices < 1:
            raise ValueError(f"max_unit_devices must be >= 1 (or None), got {self.max_unit_devices}")


def capacity_rps(
    latency: LatencyModel,
    requests: Requests,
    layout: Layout,
    *,
    limits: Limits | None = None,
    link: Link | None = None,
    prefix_hit_rate: float = 0.0,
    decode_latency: LatencyModel | None = None,
) -> float:
    """Fluid upper bound on a unit's throughput (req/s): busy prefill, full decode batches, busy links.

    A finite trace at a rate above this is a burst, not a load the unit can sustain; the search
    never credits a rate above it.
    """
    lim = limits or Limits()
    lk = link or LINKS["100G"]
    dec = decode_latency or latency
    p = requests.prompt_tokens.astype(float)
    o = requests.output_tokens.astype(float)
    cached = np.minimum(np.floor(p * prefix_hit_rate), p - 1)
    new = p - cached
    # prefill seconds per request, the step overhead shared by the prompts of one batch
    share = np.minimum(1.0, new / lim.max_num_batched_tokens)
    b = lim.max_num_seqs
    ctx = float(np.mean(p + o / 2))
    if layout.kind == "mono":
        w_prefill = float(np.mean(latency.chunk_work_s(cached, new) + latency.prefill_a_s * share))
        w_decode = float(np.mean(np.maximum(o - 1, 0))) * float(latency.decode_step_s(b, b * ctx)) / b
        return 1.0 / (w_prefill + w_decode)
    local = prefilled_on_decode(p, cached, layout.prefill_threshold)
    w_remote = float(np.mean(np.where(local, 0.0, latency.chunk_work_s(cached, new) + latency.prefill_a_s * share)))
    w_local = float(np.mean(np.where(local, dec.chunk_work_s(cached, new) + dec.prefill_a_s * share, 0.0)))
    w_decode = float(np.mean(np.maximum(o - 1, 0))) * float(dec.decode_step_s(b, b * ctx)) / b + w_local
    w_link = float(np.mean(np.where(local, 0.0, lk.fixed_s + p * latency.kv_bytes_per_token / lk.bytes_per_s)))
    # each transfer holds a link at the prefill end and one at the decode end
    return min(
        layout.num_prefill / max(w_remote, 1e-12),
        layout.num_decode / max(w_decode, 1e-12),
        min(layout.num_prefill, layout.num_decode) / max(w_link, 1e-12),
    )


def max_goodput_rate(
    requests: Requests,
    latency: LatencyModel,
    layout: Layout,
    slo: SLO,
    *,
    link: Link | None = None,
    limits: Limits | None = None,
    prefix_hit_rate: float = 0.0,
    settings: SearchSettings | None = None,
    decode_latency: LatencyModel | None = None,
    decode_limits: Limits | None = None,
) -> tuple[float, SimResult | None]:
    """Highest arrival rate (req/s) at which >= attainment of requests meet the SLO; with its run.

    `requests` is a pool (arrival times are rescaled); each run takes as many requests as the
    horizon needs at that rate (the pool played again if it is too short), so pass a few hundred
    or more. A rate above the unit's fluid capacity (`capacity_rps`) never counts, however well a
    short trace fared.
    """
    s = settings or SearchSettings()
    horizon_s = s.horizon_factor * (slo.ttft_s + float(requests.output_tokens.mean()) * slo.tpot_s)
    cap = capacity_rps(
        latency,
        requests,
        layout,
        limits=decode_limits or limits,
        link=link,
        prefix_hit_rate=prefix_hit_rate,
        decode_latency=decode_latency,
    )

    def run(rate: float) -> tuple[bool, SimResult]:
        n = min(max(len(requests), s.max_requests), max(s.min_requests, math.ceil(rate * horizon_s)))
        res = simulate(
            requests.repeat_to(n).at_rate(rate),
            latency,
            layout,
            link=link,
            limits=limits,
            prefix_hit_rate=prefix_hit_rate,
            decode_latency=decode_latency,
            decode_limits=decode_limits,
        )
        return rate <= cap and float(res.slo_met(slo).mean()) >= s.attainment, res

    if not (cap > 0 and math.isfinite(cap)):
        return 0.0, None
    ok, res = run(cap)  # nothing above the capacity counts, so try it first
    if ok:
        return cap, res
    lo, lo_res, hi = 0.0, None, cap
    r = cap
    for _ in range(12):  # halve until the SLOs hold
        r /= 2
        ok, res = run(r)
        if ok:
            lo, lo_res = r, res
            break
        hi = r
    if lo > 0.0:
        for _ in range(s.bisection_steps):
            if hi / lo <= 1 + s.rate_tolerance:
                break
            mid = math.sqrt(lo * hi)
            ok, res = run(mid)
            if ok:
                lo, lo_res = mid, res
            else:
                hi = mid
    return lo, lo_res


def cost_per_m_output_tokens(
    price_per_device_hour: float, devices: float, rate_rps: float, mean_output_tokens: float
) -> float:
    """Price per million output tokens when `devices` serve `rate_rps` requests/s (inf at rate 0)."""
    tok_s = rate_rps * mean_output_tokens
    if tok_s <= 0:
        return math.inf
    return price_per_device_hour * devices / 3600.0 / tok_s * 1e6
