"""Search over layouts: the prefill:decode split that maximizes goodput per device, and its cost.

Goodput per device follows DistServe (OSDI'24): the highest request rate a layout sustains while
at least `attainment` (90%) of requests meet every SLO, divided by the devices it uses. As in
DistServe, a small placement unit (xPyD, or one monolithic replica) is simulated and replicated
to fill the device budget, with the load split evenly between replicas.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from labkit.plan.latency_model import LatencyModel
from labkit.plan.simulator import SLO, Layout, Limits, Link, SimResult, simulate
from labkit.plan.workload import Requests


@dataclass(frozen=True, slots=True)
class SearchSettings:
    """How hard to search: requests per simulation, bisection steps, largest xPyD unit."""

    attainment: float = 0.9
    bisection_steps: int = 7
    max_unit_devices: int = 8
    policies: tuple[str, ...] = ("prefill_first", "chunked")
    # A short trace at a high rate is one burst a fast unit drains within the TTFT SLO, and would
    # look "sustainable". So each run lasts `horizon_factor` x the slowest SLO-meeting request
    # (TTFT + output x TPOT), taking more of the pool at higher rates (at least `min_requests`).
    horizon_factor: float = 3.0
    min_requests: int = 100

    def __post_init__(self) -> None:
        if not 0 < self.attainment <= 1:
            raise ValueError(f"attainment must be in (0, 1], got {self.attainment}")
        if self.horizon_factor <= 0 or self.min_requests < 1:
            raise ValueError(f"need horizon_factor > 0 and min_requests >= 1, got {self}")
        if self.bisection_steps < 1 or self.max_unit_devices < 2:
            raise ValueError(f"need bisection_steps >= 1 and max_unit_devices >= 2, got {self}")


@dataclass(frozen=True)
class LayoutScore:
    """One candidate: the unit layout, how many copies fit, and what it sustains."""

    unit: Layout
    units: int
    max_rate_rps_per_unit: float        # highest rate meeting the attainment target (0: never)
    result: SimResult | None            # the simulation at that rate
    cost_per_m_output_tokens: float     # price units (e.g. USD) per million output tokens; inf if 0 rate

    @property
    def devices_used(self) -> int:
        return self.units * self.unit.num_devices

    @property
    def goodput_rps(self) -> float:
        """Requests/s the whole cluster serves within SLO."""
        return self.units * self.max_rate_rps_per_unit

    @property
    def goodput_rps_per_device(self) -> float:
        return self.max_rate_rps_per_unit / self.unit.num_devices

    @property
    def label(self) -> str:
        return self.unit.label if self.units == 1 else f"{self.units} x {self.unit.label}"


@dataclass(frozen=True)
class SearchResult:
    """Every candidate, sorted best first, plus the best of each kind."""

    scores: list[LayoutScore]
    devices: int
    slo: SLO
    notes: list[str] = field(default_factory=list)

    @property
    def best(self) -> LayoutScore:
        return self.scores[0]

    def best_of(self, kind: str) -> LayoutScore | None:
        return next((s for s in self.scores if s.unit.kind == kind), None)

    @property
    def disagg_gain(self) -> float:
        """Goodput per device of the best xPyD over the best monolithic (>1: disaggregation wins)."""
        m, d = self.best_of("mono"), self.best_of("disagg")
        if d is None or m is None:
            return math.nan
        if m.goodput_rps_per_device == 0:
            return math.inf if d.goodput_rps_per_device > 0 else math.nan
        return d.goodput_rps_per_device / m.goodput_rps_per_device


def candidate_layouts(devices: int, settings: SearchSettings | None = None) -> list[Layout]:
    """Monolithic replicas (each policy) and every xPyD unit with P + D <= min(devices, max unit)."""
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    s = settings or SearchSettings()
    out = [Layout.mono(1, p) for p in s.policies]  # type: ignore[arg-type]
    top = min(devices, s.max_unit_devices)
    out += [Layout.disagg(p, d) for total in range(2, top + 1) for p in range(1, total) for d in [total - p]]
    return out


def capacity_rps(latency: LatencyModel, requests: Requests, layout: Layout, *, limits: Limits | None = None,
                 link: Link | None = None, prefix_hit_rate: float = 0.0) -> float:
    """Fluid upper bound on a unit's throughput (req/s): busy prefill, full decode batches, busy links.

    A finite trace at a rate above this is a burst, not a load the unit can sustain; the search
    never credits a rate above it.
    """
    lim = limits or Limits()
    lk = link or Link()
    p = requests.prompt_tokens.astype(float)
    o = requests.output_tokens.astype(float)
    cached = np.minimum(np.floor(p * prefix_hit_rate), p - 1)
    new = p - cached
    # prefill seconds per request, the step overhead shared by the prompts of one batch
    share = np.minimum(1.0, new / lim.max_num_batched_tokens)
    w_prefill = float(np.mean(latency.chunk_work_s(cached, new) + latency.prefill_a_s * share))
    b = lim.max_num_seqs
    ctx = float(np.mean(p + o / 2))
    w_decode = float(np.mean(np.maximum(o - 1, 0))) * float(latency.decode_step_s(b, b * ctx)) / b
    if layout.kind == "mono":
        return 1.0 / (w_prefill + w_decode)
    w_link = float(np.mean([lk.transfer_s(x * latency.kv_bytes_per_token) for x in p]))
    return min(layout.num_prefill / w_prefill, layout.num_decode / max(w_decode, 1e-12),
               layout.num_prefill / max(w_link, 1e-12))


def max_goodput_rate(requests: Requests, latency: LatencyModel, layout: Layout, slo: SLO, *,
                     link: Link | None = None, limits: Limits | None = None, prefix_hit_rate: float = 0.0,
                     settings: SearchSettings | None = None) -> tuple[float, SimResult | None]:
    """Highest arrival rate (req/s) at which >= attainment of requests meet the SLO; with its run.

    `requests` is a pool (arrival times are rescaled); each run takes as many of its first requests
    as the horizon needs at that rate, so pass a few hundred or more. A rate above the unit's fluid
    capacity (`capacity_rps`) never counts, however well a short trace fared.
    """
    s = settings or SearchSettings()
    horizon_s = s.horizon_factor * (slo.ttft_s + float(requests.output_tokens.mean()) * slo.tpot_s)

    cap = capacity_rps(latency, requests, layout, limits=limits, link=link, prefix_hit_rate=prefix_hit_rate)

    def run(rate: float) -> tuple[bool, SimResult]:
        n = int(min(len(requests), max(s.min_requests, math.ceil(rate * horizon_s))))
        res = simulate(requests.head(n).at_rate(rate), latency, layout, link=link, limits=limits,
                       prefix_hit_rate=prefix_hit_rate)
        return rate <= cap and float(res.slo_met(slo).mean()) >= s.attainment, res

    if not (cap > 0 and math.isfinite(cap)):
        return 0.0, None
    ok, res = run(cap)                         # nothing above the capacity counts, so try it first
    if ok:
        return cap, res
    lo, lo_res, hi = 0.0, None, cap
    r = cap
    for _ in range(12):                        # halve until the SLOs hold
        r /= 2
        ok, res = run(r)
        if ok:
            lo, lo_res = r, res
            break
        hi = r
    if lo > 0.0:
        for _ in range(s.bisection_steps):
            mid = math.sqrt(lo * hi)
            ok, res = run(mid)
            if ok:
                lo, lo_res = mid, res
            else:
                hi = mid
    return lo, lo_res


def cost_per_m_output_tokens(price_per_device_hour: float, devices: int, rate_rps: float,
                             mean_output_tokens: float) -> float:
    """Price per million output tokens when `devices` serve `rate_rps` requests/s (inf at rate 0)."""
    tok_s = rate_rps * mean_output_tokens
    if tok_s <= 0:
        return math.inf
    return price_per_device_hour * devices / 3600.0 / tok_s * 1e6


def search_layouts(requests: Requests, latency: LatencyModel, devices: int, slo: SLO, *,
                   link: Link | None = None, limits: Limits | None = None, prefix_hit_rate: float = 0.0,
                   price_per_device_hour: float = 2.0, settings: SearchSettings | None = None,
                   layouts: list[Layout] | None = None) -> SearchResult:
    """Scores every candidate layout for `devices`; returns them best first (goodput per device)."""
    s = settings or SearchSettings()
    cands = layouts if layouts is not None else candidate_layouts(devices, s)
    mean_out = float(requests.output_tokens.mean())
    scores = []
    for lay in cands:
        if lay.num_devices > devices:
            raise ValueError(f"layout {lay.label} needs {lay.num_devices} devices, budget is {devices}")
        rate, res = max_goodput_rate(requests, latency, lay, slo, link=link, limits=limits,
                                     prefix_hit_rate=prefix_hit_rate, settings=s)
        units = devices // lay.num_devices
        scores.append(LayoutScore(lay, units, rate, res,
                                  cost_per_m_output_tokens(price_per_device_hour, lay.num_devices, rate, mean_out)))
    scores.sort(key=lambda x: (-x.goodput_rps_per_device, x.unit.num_devices))
    notes = []
    if scores and scores[0].max_rate_rps_per_unit == 0:
        notes.append("No layout meets the SLOs even at a trickle of requests: the SLO is tighter than one "
                     "prefill or one decode step. Loosen it or use faster hardware.")
    return SearchResult(scores, devices, slo, notes)
