"""The decision checklist practitioners use, with this workload's values and the simulated verdict.

Each item has a value, what it does to disaggregation (its effect) and a verdict: "favours",
"neutral" or "against". The thresholds are the rules of thumb from the papers and production
reports the lab cites (DistServe, Splitwise, and the counter-evidence from small setups), except
the device count, which comes from the simulated gain-vs-devices curve of this workload
(`labkit.plan.curve`). The final verdict comes from the simulation (goodput of the best
disaggregated deployment of the N devices over N monolithic replicas), because the rules interact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from labkit.links import Link
from labkit.plan.latency_model import LatencyModel
from labkit.plan.workload import WorkloadShape

if TYPE_CHECKING:
    from labkit.plan.curve import GainCurve

Verdict = Literal["favours", "neutral", "against"]

FACTS = (
    "DistServe (OSDI'24): 7.4x more requests or 12.6x tighter SLO than colocated serving, at >= 90% SLO attainment.",
    "Splitwise (ISCA'24): 1.4x throughput at 20% lower cost, or 2.35x throughput at the same cost and power.",
    "Counter-evidence: BentoML's LLM inference handbook says disaggregation can lose 20-30% on small setups.",
    (
        "The seed article: it pays with long prompts, low prefix reuse, many GPUs (>16) and fast links "
        "(RDMA, >100 Gbps); notebook 06 holds its figures against the planner."
    ),
)


@dataclass(frozen=True, slots=True)
class CheckItem:
    """One line of the checklist."""

    name: str
    value: str
    effect: str
    verdict: Verdict


@dataclass(frozen=True)
class Checklist:
    """The items, the simulated gain (best disaggregated deployment over mono replicas) and the verdict."""

    items: list[CheckItem]
    gain: float
    verdict: str
    best_layout: str
    facts: tuple[str, ...] = FACTS
    notes: list[str] = field(default_factory=list)

    def rows(self) -> list[dict[str, str]]:
        return [{"check": i.name, "value": i.value, "effect": i.effect, "verdict": i.verdict} for i in self.items]

    def render(self) -> str:
        """The checklist as a fixed-width text table, then the verdict and the facts."""
        rows = [("check", "value", "verdict", "effect")] + [(i.name, i.value, i.verdict, i.effect) for i in self.items]
        w = [max(len(r[k]) for r in rows) for k in range(3)]
        lines = ["  ".join(r[k].ljust(w[k]) for k in range(3)) + "  " + r[3] for r in rows]
        lines.insert(1, "-" * (sum(w) + 4 + 40))
        gain = "n/a" if math.isnan(self.gain) else f"{self.gain:.2f}x"
        lines += (
            [
                "",
                (
                    f"Simulated goodput, best disaggregated deployment / monolithic replicas on the same devices: "
                    f"{gain}  (best: {self.best_layout})"
                ),
                f"VERDICT: {self.verdict}",
                "",
            ]
            + [f"- {f}" for f in self.facts]
            + [f"! {n}" for n in self.notes]
        )
        return "\n".join(lines)


def verdict_for_gain(gain: float) -> str:
    """The one-line answer from the simulated gain (>= 1.10: disaggregate, <= 0.95: stay monolithic)."""
    if math.isnan(gain):
        return "no verdict: the simulation could not compare layouts (see notes)"
    if gain >= 1.10:
        return f"DISAGGREGATE: about {gain:.2f}x the goodput of monolithic replicas on the same devices"
    if gain <= 0.95:
        return f"STAY MONOLITHIC: disaggregation would give {gain:.2f}x the goodput (a {1 - gain:.0%} loss)"
    return (
        f"MARGINAL ({gain:.2f}x): either works; pick on operations (scaling prefill and decode separately) and tail ITL"
    )


def build_checklist(
    shape: WorkloadShape,
    latency: LatencyModel,
    *,
    devices: int,
    link: Link,
    rdma: bool,
    gain: float,
    best_layout: str,
    ttft_slo_s: float,
    notes: list[str] | None = None,
    curve: GainCurve | None = None,
    network_link: Link | None = None,
) -> Checklist:
    """The checklist for a workload on a cluster, given the simulated gain and best layout.

    `link`: the one the recommended xPyD unit's KV crosses; `network_link`: the one between nodes
    (default `link`); `curve`: the gain-vs-devices curve the device-count line cites.
    """
    net = network_link or link
    hit = shape.prefix_hit_rate
    prompt = shape.mean_prompt_tokens
    out = shape.mean_output_tokens
    ratio = prompt * (1 - hit) / out
    items = [
        CheckItem(
            "prefill:decode token ratio",
            f"{ratio:.3g} ({prompt:.0f} prompt x {1 - hit:.0%} uncached / {out:.0f} output)",
            "long prompts stall every running decode in a colocated engine; separating them removes the stalls",
            "favours" if ratio >= 4 else "against" if ratio < 1 else "neutral",
        )
    ]

    kv_bytes = prompt * latency.kv_bytes_per_token
    xfer_s = link.seconds(kv_bytes)
    prefill_s = float(latency.prefill_s(max(prompt * (1 - hit), 1)))
    share = xfer_s / max(prefill_s, 1e-12)
    items.append(
        CheckItem(
            "KV bytes per request",
            f"{kv_bytes / 1e6:,.1f} MB -> {xfer_s * 1e3:,.2f} ms over {link.label} "
            f"({share:.0%} of its prefill, {xfer_s / ttft_slo_s:.0%} of the TTFT SLO)",
            "every request's KV crosses the network once; it adds to TTFT and needs link bandwidth",
            "favours"
            if share < 0.1 and xfer_s < 0.05 * ttft_slo_s
            else "against"
            if share > 0.5 or xfer_s > 0.25 * ttft_slo_s
            else "neutral",
        )
    )

    items.append(
        CheckItem(
            "prefix-cache hit rate",
            f"{hit:.0%}",
            "cached prefixes make prefill cheap, so there is less to offload, and split pools cache less",
            "favours" if hit < 0.2 else "against" if hit >= 0.5 else "neutral",
        )
    )

    items.append(_device_item(devices, gain, curve))

    items.append(
        CheckItem(
            "network",
            f"between nodes {net.gbps:g} Gbps, {'RDMA' if rdma else 'TCP'}, {net.fixed_s * 1e6:g} µs per transfer",
            "a unit larger than a node moves its KV between nodes: fast and cheap on CPU with RDMA at 100 Gbps or more",
            "favours" if rdma and net.gbps >= 100 else "against" if net.gbps < 25 else "neutral",
        )
    )
    return Checklist(items, gain, verdict_for_gain(gain), best_layout, notes=list(notes or []))


def _device_item(devices: int, gain: float, curve: GainCurve | None) -> CheckItem:
    """The device count, judged by the simulated gain at this count and the curve's crossing."""
    if math.isnan(gain):
        verdict: Verdict = "against"
    else:
        verdict = "favours" if gain >= 1.10 else "against" if gain <= 0.95 else "neutral"
    value = f"{devices} (simulated gain here: {'n/a' if math.isnan(gain) else f'{gain:.2f}x'})"
    if curve is None:
        return CheckItem("device count", value, "xPyD needs room for the right P:D ratio (no curve simulated)", verdict)
    return CheckItem(
        "device count", value, f"from the simulated gain-vs-devices curve of this workload: {curve.describe()}", verdict
    )
