"""Search over deployments: how to fill N devices with serving units for the most goodput, and its cost.

Goodput follows DistServe (OSDI'24): the highest request rate a unit sustains while at least
`attainment` (90%) of requests meet every SLO. A unit is one monolithic replica or one xPyD
group. The monolithic deployment is N replicas (mono-dp); the disaggregated one fills the N
devices with xPyD units (copies of one, plus remainder units, a mono replica on a device left
over in a node: `labkit.plan.packing`). A deployment serves the sum of its units' rates, and its
goodput per device divides by all N devices, idle ones included. Units that fit a node move
their KV over the node's link (NVLink by default); units larger than a node over the network
between nodes.

Only xPyD splits with no common factor are units of their own: with the router's round-robin,
2P2D hands every instance exactly the requests two 1P1D copies would, so replication covers it.
Units go up to two nodes by default (`max_unit_devices` raises it): for Llama-3.1-8B on H100s
with 100 Gbps between nodes, larger units lost to node-sized ones on both Azure 2023 presets
(64 devices: 8 x 5P3D for conversation, 8 x 7P1D for code, either way; `labkit plan` took 53 s
uncapped against 19 s on a busy 2-core box), as every KV of a unit across nodes enters its decode
devices over that link. Even then, simulating every unit
would be slow, so the search is lazy: every unit has
a fluid upper bound on its rate (`capacity_rps`, which the search never credits past), the packer
runs on bounds for the units not simulated yet, and only the units the best packings pick are
simulated, until the best packing of simulated units reaches `packing_tolerance` (5%) of the best
any packing could reach with the others at their bounds. So the answer is within 5% of the best
deployment of every candidate unit; with packing_tolerance=0 it is the best.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import cast

from labkit.links import LINKS, Link
from labkit.plan.goodput import (
    SearchSettings,
    capacity_rps,
    cost_per_m_output_tokens,
    max_goodput_rate,
)
from labkit.plan.latency_model import LatencyModel
from labkit.plan.packing import Item, best_packings
from labkit.plan.simulator import SLO, Layout, Limits, SimResult
from labkit.plan.workload import Requests

__all__ = [
    "Deployment",
    "LayoutScore",
    "Network",
    "SearchResult",
    "SearchSettings",
    "UnitTable",
    "candidate_layouts",
    "capacity_rps",
    "cost_per_m_output_tokens",
    "max_goodput_rate",
    "search_layouts",
]


@dataclass(frozen=True, slots=True)
class Network:
    """Where a unit's KV travels: over the node's own link when the unit fits one node of
    `devices_per_node` devices, over the network between nodes when it spans several."""

    inter_node: Link = LINKS["100G"]
    intra_node: Link = LINKS["nvlink"]
    devices_per_node: int = 8

    def __post_init__(self) -> None:
        if self.devices_per_node < 1:
            raise ValueError(f"devices_per_node must be >= 1, got {self.devices_per_node}")

    @classmethod
    def single(cls, link: Link, devices_per_node: int = 8) -> Network:
        """The same link inside and between nodes."""
        return cls(link, link, devices_per_node)

    def spans_nodes(self, layout: Layout) -> bool:
        return layout.num_devices > self.devices_per_node

    def link_for(self, layout: Layout) -> Link:
        """The link this unit's KV crosses."""
        return self.inter_node if self.spans_nodes(layout) else self.intra_node


@dataclass(frozen=True)
class LayoutScore:
    """One unit: the layout, the link its KV crosses, and the highest rate it sustains."""

    unit: Layout
    max_rate_rps_per_unit: float  # highest rate meeting the attainment target (0: never)
    result: SimResult | None  # the simulation at that rate
    cost_per_m_output_tokens: float  # price units (e.g. USD) per million output tokens; inf if 0 rate
    link: Link | None = None  # None for a monolithic unit
    spans_nodes: bool = False

    @property
    def goodput_rps_per_device(self) -> float:
        return self.max_rate_rps_per_unit / self.unit.num_devices

    @property
    def label(self) -> str:
        return self.unit.label + (" (across nodes)" if self.spans_nodes else "")


@dataclass(frozen=True)
class Deployment:
    """N devices filled with units: `parts` are (unit score, copies); the rest of the N is idle."""

    parts: tuple[tuple[LayoutScore, int], ...]
    devices: int
    price_per_device_hour: float
    mean_output_tokens: float
    placement: tuple[tuple[int, Layout], ...] = ()  # (first device, unit) of every copy

    @property
    def goodput_rps(self) -> float:
        """Requests/s the deployment serves within SLO (the sum of its units' rates)."""
        return sum(s.max_rate_rps_per_unit * k for s, k in self.parts)

    @property
    def goodput_rps_per_device(self) -> float:
        """Goodput over all `devices`, idle ones included."""
        return self.goodput_rps / self.devices

    @property
    def devices_used(self) -> int:
        return sum(s.unit.num_devices * k for s, k in self.parts)

    @property
    def idle_devices(self) -> int:
        return self.devices - self.devices_used

    @property
    def kind(self) -> str:
        """ "disagg" if any unit is xPyD, else "mono"."""
        return "disagg" if any(s.unit.kind == "disagg" for s, _ in self.parts) else "mono"

    @property
    def main(self) -> LayoutScore:
        """The unit taking most devices (the xPyD one first on a tie)."""
        return max(self.parts, key=lambda p: (p[0].unit.num_devices * p[1], p[0].unit.kind == "disagg"))[0]

    @property
    def unit(self) -> Layout:
        return self.main.unit

    @property
    def result(self) -> SimResult | None:
        return self.main.result

    @property
    def cost_per_m_output_tokens(self) -> float:
        """Price of all N devices per million output tokens at the deployment's goodput (inf at 0)."""
        return cost_per_m_output_tokens(
            self.price_per_device_hour, self.devices, self.goodput_rps, self.mean_output_tokens
        )

    @property
    def label(self) -> str:
        """ "2 x 4P1D", "7P1D + 1P1D", "mono-dp x10", "7P1D + 2 idle"."""
        bits = []
        for s, k in self.parts:
            if s.unit.kind == "mono" and len(self.parts) == 1 and k > 1:
                bits.append(Layout.mono_dp(k, s.unit.policy).label)
            else:
                bits.append(s.label if k == 1 else f"{k} x {s.label}")
        if self.idle_devices:
            bits.append(f"{self.idle_devices} idle")
        return " + ".join(bits) if bits else f"{self.devices} idle"


@dataclass(frozen=True)
class SearchResult:
    """The best deployment of `devices`, the best monolithic and the best with xPyD, and every
    unit simulated on the way (sorted by goodput per device)."""

    scores: list[LayoutScore]
    devices: int
    slo: SLO
    best: Deployment
    mono: Deployment
    disagg: Deployment | None
    notes: list[str] = field(default_factory=list)

    def best_of(self, kind: str) -> Deployment | None:
        """The best deployment with only monolithic replicas ("mono") or with xPyD ("disagg")."""
        if kind not in ("mono", "disagg"):
            raise ValueError(f"kind must be 'mono' or 'disagg', got {kind!r}")
        return self.mono if kind == "mono" else self.disagg

    @property
    def disagg_gain(self) -> float:
        """Goodput of the best deployment with xPyD over the best monolithic one, on the same N
        devices (>1: disaggregation wins)."""
        return _gain(self.mono, self.disagg)


def _gain(mono: Deployment, disagg: Deployment | None) -> float:
    if disagg is None:
        return math.nan
    if mono.goodput_rps == 0:
        return math.inf if disagg.goodput_rps > 0 else math.nan
    return disagg.goodput_rps / mono.goodput_rps


def candidate_layouts(devices: int, settings: SearchSettings | None = None, devices_per_node: int = 8) -> list[Layout]:
    """Monolithic replicas (each policy) and every xPyD split with no common factor that fits the
    budget and `max_unit_devices` (default: two nodes)."""
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    s = settings or SearchSettings()
    out = [Layout.mono(1, p) for p in s.policies]
    top = min(devices, s.max_unit_devices or 2 * devices_per_node)
    out += [
        Layout.disagg(p, total - p)
        for total in range(2, top + 1)
        for p in range(1, total)
        if math.gcd(p, total - p) == 1
    ]
    return out


class UnitTable:
    """Every candidate unit of one workload, SLO and network: its fluid bound at once, its
    simulated rate when asked (then kept). One table serves a search for N devices, the
    gain-vs-devices curve and a map over device counts, so no unit is simulated twice."""

    def __init__(
        self,
        requests: Requests,
        latency: LatencyModel,
        slo: SLO,
        *,
        network: Network | None = None,
        limits: Limits | None = None,
        prefix_hit_rate: float = 0.0,
        price_per_device_hour: float = 2.0,
        settings: SearchSettings | None = None,
    ) -> None:
        self.requests, self.latency, self.slo = requests, latency, slo
        self.network = network or Network()
        self.limits, self.prefix_hit_rate = limits, prefix_hit_rate
        self.price_per_device_hour = price_per_device_hour
        self.settings = settings or SearchSettings()
        self.mean_output_tokens = float(requests.output_tokens.mean())
        self.scores: dict[Layout, LayoutScore] = {}
        self._bounds: dict[Layout, float] = {}

    def bound(self, unit: Layout) -> float:
        """The unit's fluid capacity (req/s): no simulated rate exceeds it."""
        if unit not in self._bounds:
            link = self.network.link_for(unit) if unit.kind == "disagg" else None
            self._bounds[unit] = capacity_rps(
                self.latency, self.requests, unit, limits=self.limits, link=link, prefix_hit_rate=self.prefix_hit_rate
            )
        return self._bounds[unit]

    def score(self, unit: Layout) -> LayoutScore:
        """Simulates the unit (once) and returns its score."""
        if unit not in self.scores:
            link = self.network.link_for(unit) if unit.kind == "disagg" else None
            rate, res = max_goodput_rate(
                self.requests,
                self.latency,
                unit,
                self.slo,
                link=link,
                limits=self.limits,
                prefix_hit_rate=self.prefix_hit_rate,
                settings=self.settings,
            )
            cost = cost_per_m_output_tokens(self.price_per_device_hour, unit.num_devices, rate, self.mean_output_tokens)
            self.scores[unit] = LayoutScore(
                unit, rate, res, cost, link, unit.kind == "disagg" and self.network.spans_nodes(unit)
            )
        return self.scores[unit]

    def deployments(
        self, budgets: Iterable[int], layouts: Sequence[Layout] | None = None, *, progress: bool = False
    ) -> dict[int, tuple[Deployment, Deployment, Deployment | None]]:
        """For each budget N: (best deployment, best monolithic, best with xPyD), simulating only
        the units the packings pick (see the module docstring); `progress` counts them in a bar."""
        budgets = sorted(set(budgets))
        if not budgets or budgets[0] < 1:
            raise ValueError(f"budgets must be >= 1 device, got {budgets}")
        cands = (
            list(layouts)
            if layouts is not None
            else candidate_layouts(budgets[-1], self.settings, self.network.devices_per_node)
        )
        for lay in cands:
            if lay.kind == "mono":
                if lay.num_replicas != 1:
                    raise ValueError(f"units are single replicas; {lay.label} is {lay.num_replicas} of them")
                self.score(lay)
        tol = self.settings.packing_tolerance
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc="units simulated", unit="unit")
        while True:
            simulated = [
                Item(u, u.num_devices, self.scores[u].max_rate_rps_per_unit, u.kind == "disagg")
                for u in cands
                if u in self.scores
            ]
            optimistic = simulated + [
                Item(u, u.num_devices, self.bound(u), True) for u in cands if u not in self.scores
            ]
            packs = best_packings(simulated, budgets, self.network.devices_per_node)
            hopes = best_packings(optimistic, budgets, self.network.devices_per_node)
            # the packings' keys are the Layouts given as Item keys above
            todo = {
                cast(Layout, key)
                for n, h in hopes.items()
                if h is not None and ((got := packs[n]) is None or got.rate < (1 - tol) * h.rate)
                for key, _ in h.counts
                if key not in self.scores
            }
            if not todo:
                break
            for unit in sorted(todo, key=lambda u: u.num_devices):
                self.score(unit)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        monos = [self.scores[u] for u in cands if u.kind == "mono"]
        best_mono = max(monos, key=lambda s: s.max_rate_rps_per_unit) if monos else None
        out = {}
        for n, p in packs.items():
            mono = (
                self._deployment(((best_mono.unit, n),), n, tuple((i, best_mono.unit) for i in range(n)))
                if best_mono
                else self._deployment((), n)
            )
            # the packings' keys are the Layouts given as Item keys above
            disagg = (
                self._deployment(
                    cast("tuple[tuple[Layout, int], ...]", p.counts),
                    n,
                    cast("tuple[tuple[int, Layout], ...]", p.placement),
                )
                if p is not None
                else None
            )
            best = disagg if disagg is not None and disagg.goodput_rps > mono.goodput_rps else mono
            out[n] = (best, mono, disagg)
        return out

    def _deployment(
        self, counts: Sequence[tuple[Layout, int]], devices: int, placement: tuple[tuple[int, Layout], ...] = ()
    ) -> Deployment:
        parts = tuple((self.scores[u], k) for u, k in counts)
        return Deployment(parts, devices, self.price_per_device_hour, self.mean_output_tokens, placement)

    def sorted_scores(self) -> list[LayoutScore]:
        """Every simulated unit, best goodput per device first."""
        return sorted(self.scores.values(), key=lambda x: (-x.goodput_rps_per_device, x.unit.num_devices))


def search_layouts(
    requests: Requests,
    latency: LatencyModel,
    devices: int,
    slo: SLO,
    *,
    network: Network | None = None,
    limits: Limits | None = None,
    prefix_hit_rate: float = 0.0,
    price_per_device_hour: float = 2.0,
    settings: SearchSettings | None = None,
    layouts: list[Layout] | None = None,
    table: UnitTable | None = None,
) -> SearchResult:
    """The best way to fill `devices` devices, the best monolithic one and the best with xPyD.

    `layouts` restricts the candidate units; `table` reuses units simulated before (same workload,
    SLO and network).
    """
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    for lay in layouts or ():
        if lay.num_devices > devices:
            raise ValueError(f"layout {lay.label} needs {lay.num_devices} devices, budget is {devices}")
    t = table or UnitTable(
        requests,
        latency,
        slo,
        network=network,
        limits=limits,
        prefix_hit_rate=prefix_hit_rate,
        price_per_device_hour=price_per_device_hour,
        settings=settings,
    )
    best, mono, disagg = t.deployments([devices], layouts)[devices]
    notes = []
    if best.goodput_rps == 0:
        notes.append(
            "No layout meets the SLOs even at a trickle of requests: the SLO is tighter than one "
            "prefill or one decode step. Loosen it or use faster hardware."
        )
    if best.idle_devices:
        notes.append(
            f"{best.idle_devices} of {devices} devices stay idle in the best deployment: no unit adds goodput "
            "there. Their price is still counted."
        )
    return SearchResult(t.sorted_scores(), devices, slo, best, mono, disagg, notes)
