"""Prefill on one part, decode on a cheaper one (Splitwise, ISCA'24): cost per million tokens.

Prefill is compute-bound and decode memory-bound, so a part with less compute per dollar can
decode about as well as the flagship. `part_from_datasheet` turns a row of data/datasheets.json
into a latency model (the roofline at your MFU/MBU: an estimate) plus the batch its memory holds
after the weights; `compare_parts` finds, for monolithic and xPyD units on either part and for
P on the first part with D on the second, the unit that serves a million output tokens for the
least money at its goodput. The datasheets carry no prices: you give them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from labkit.plan.goodput import (
    SearchSettings,
    capacity_rps,
    cost_per_m_output_tokens,
    max_goodput_rate,
)
from labkit.plan.latency_model import LatencyModel
from labkit.plan.scaling import (
    Efficiency,
    ModelShape,
    datasheet_spec,
    roofline_latency_model,
)
from labkit.plan.search import Network, candidate_layouts
from labkit.plan.simulator import SLO, Layout, Limits, SimResult
from labkit.plan.workload import Requests


@dataclass(frozen=True)
class Part:
    """One kind of device: the served model's latency on it, its price and its scheduler limits."""

    name: str
    latency: LatencyModel
    price_per_device_hour: float
    limits: Limits

    def __post_init__(self) -> None:
        if not self.price_per_device_hour > 0:
            raise ValueError(f"{self.name}: price_per_device_hour must be > 0, got {self.price_per_device_hour}")


def kv_limited_seqs(
    memory_bytes: float,
    weight_bytes: float,
    kv_bytes_per_token: int,
    context_tokens: float,
    memory_utilization: float = 0.9,
) -> int:
    """Sequences of `context_tokens` whose KV fits beside the weights in `memory_utilization` of the
    memory (0 when the weights alone do not fit)."""
    free = memory_bytes * memory_utilization - weight_bytes
    return max(0, int(free // (kv_bytes_per_token * max(context_tokens, 1.0))))


def part_from_datasheet(
    name: str,
    model: ModelShape,
    price_per_device_hour: float,
    *,
    efficiency: Efficiency | None = None,
    limits: Limits | None = None,
    context_tokens: float,
    memory_utilization: float = 0.9,
) -> Part:
    """A part from data/datasheets.json: the roofline model of `model` on it, and max_num_seqs cut to
    the sequences of `context_tokens` (prompt + output: the most a request holds) that its memory holds.
    ValueError when the weights do not fit."""
    spec = datasheet_spec(name, model.dtype)
    lim = limits or Limits()
    seqs = kv_limited_seqs(
        spec.memory_bytes, model.param_bytes, model.kv_bytes_per_token, context_tokens, memory_utilization
    )
    if seqs < 1:
        raise ValueError(
            f"{model.name} ({model.param_bytes / 1e9:.0f} GB of weights) leaves no room for the KV cache "
            f"of one {context_tokens:.0f}-token request in {spec.name}'s {spec.memory_bytes / 1e9:.0f} GB"
        )
    return Part(
        spec.name,
        roofline_latency_model(model, spec, efficiency),
        price_per_device_hour,
        replace(lim, max_num_seqs=min(lim.max_num_seqs, seqs)),
    )


@dataclass(frozen=True)
class MixScore:
    """A unit on given parts (mono: `prefill` is the part) and the rate it sustains."""

    unit: Layout
    prefill: Part
    decode: Part
    rate_rps: float
    result: SimResult | None
    mean_output_tokens: float

    @property
    def price_per_hour(self) -> float:
        if self.unit.kind == "mono":
            return self.unit.num_replicas * self.prefill.price_per_device_hour
        return (
            self.unit.num_prefill * self.prefill.price_per_device_hour
            + self.unit.num_decode * self.decode.price_per_device_hour
        )

    @property
    def cost_per_m_output_tokens(self) -> float:
        """Price of the unit per million output tokens at its goodput (inf when it meets no SLO)."""
        return cost_per_m_output_tokens(self.price_per_hour, 1, self.rate_rps, self.mean_output_tokens)

    @property
    def group(self) -> str:
        if self.unit.kind == "mono":
            return f"mono on {self.prefill.name}"
        if self.prefill.name == self.decode.name:
            return f"xPyD on {self.prefill.name}"
        return f"P on {self.prefill.name}, D on {self.decode.name}"

    @property
    def label(self) -> str:
        return f"{self.unit.label} ({self.group})"


@dataclass(frozen=True)
class PartsComparison:
    """The cheapest unit of each group (mono per part, xPyD per part, P and D on different parts)."""

    scores: list[MixScore]

    @property
    def cheapest(self) -> MixScore:
        return self.scores[0]

    def best_of(self, group: str) -> MixScore | None:
        return next((s for s in self.scores if s.group == group), None)

    def rows(self) -> list[dict[str, Any]]:
        """The cheapest unit of each group, cheapest first."""
        out, seen = [], set()
        for s in self.scores:
            if s.group in seen:
                continue
            seen.add(s.group)
            out.append(
                {
                    "parts": s.group,
                    "unit": s.unit.label,
                    "goodput (req/s)": round(s.rate_rps, 2),
                    "price / hour": round(s.price_per_hour, 2),
                    "goodput per price-hour": round(s.rate_rps / s.price_per_hour, 3),
                    "cost / M output tok": round(s.cost_per_m_output_tokens, 3),
                }
            )
        return out

    def render(self) -> str:
        rows = self.rows()
        cols = list(rows[0]) if rows else []
        w = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
        lines = [
            "Prefill and decode on different parts (simulated; roofline estimates of each part):",
            "  ".join(c.rjust(w[i]) for i, c in enumerate(cols)),
        ]
        lines += ["  ".join(str(r[c]).rjust(w[i]) for i, c in enumerate(cols)) for r in rows]
        return "\n".join(lines)


def compare_parts(
    requests: Requests,
    slo: SLO,
    prefill: Part,
    decode: Part,
    *,
    network: Network | None = None,
    prefix_hit_rate: float = 0.0,
    settings: SearchSettings | None = None,
    max_unit_devices: int | None = None,
    tolerance: float = 0.05,
) -> PartsComparison:
    """Cheapest unit per million output tokens in each group: mono on either part, xPyD on either
    part (KV over the node's link), and P on `prefill` with D on `decode` (KV between nodes).

    Units up to `max_unit_devices` (default: a node). In each group the units are simulated in order
    of their cost bound (price over fluid capacity) until none left could be `tolerance` cheaper.
    """
    net = network or Network()
    st = settings or SearchSettings()
    top = max_unit_devices or net.devices_per_node
    xpyd = [u for u in candidate_layouts(top, replace(st, max_unit_devices=top)) if u.kind == "disagg"]
    monos = [Layout.mono(1, p) for p in st.policies]
    mean_out = float(requests.output_tokens.mean())
    groups: list[tuple[Sequence[Layout], Part, Part, Callable[[Layout], Any]]] = [
        (monos, prefill, prefill, lambda u: None),
        (monos, decode, decode, lambda u: None),
        (xpyd, prefill, prefill, net.link_for),
        (xpyd, decode, decode, net.link_for),
        (xpyd, prefill, decode, lambda u: net.inter_node),
    ]
    scores: list[MixScore] = []
    for units, p_part, d_part, link_of in groups:

        def price(u: Layout, p: Part = p_part, d: Part = d_part) -> float:
            return (
                p.price_per_device_hour
                if u.kind == "mono"
                else u.num_prefill * p.price_per_device_hour + u.num_decode * d.price_per_device_hour
            )

        def lower_bound(
            u: Layout, p: Part = p_part, d: Part = d_part, link_of: Callable[[Layout], Any] = link_of
        ) -> float:
            cap = capacity_rps(
                p.latency,
                requests,
                u,
                limits=d.limits if u.kind == "disagg" else p.limits,
                link=link_of(u),
                prefix_hit_rate=prefix_hit_rate,
                decode_latency=d.latency,
            )
            return cost_per_m_output_tokens(price(u), 1, cap, mean_out)

        best = math.inf
        for u in sorted(units, key=lower_bound):
            if lower_bound(u) >= best * (1 - tolerance):
                break
            disagg = u.kind == "disagg"
            rate, res = max_goodput_rate(
                requests,
                p_part.latency,
                u,
                slo,
                link=link_of(u),
                limits=p_part.limits,
                prefix_hit_rate=prefix_hit_rate,
                settings=st,
                decode_latency=d_part.latency if disagg else None,
                decode_limits=d_part.limits if disagg else None,
            )
            s = MixScore(u, p_part, d_part, rate, res, mean_out)
            scores.append(s)
            best = min(best, s.cost_per_m_output_tokens)
    scores.sort(key=lambda s: (s.cost_per_m_output_tokens, s.unit.num_devices))
    return PartsComparison(scores)
