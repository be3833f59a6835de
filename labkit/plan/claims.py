"""Cited claims about disaggregation, held against what the planner computes for the same setups.

Two sources are confronted in notebook 06 (`labkit.reference` holds their figures):
- the seed article: 2-6.4x throughput and 15-40% lower cost where prompts are long, prefix reuse
  is low, the cluster has more than 16 GPUs and links beat 100 Gbps (RDMA);
- BentoML's LLM inference handbook: disaggregation can lose 20-30% on small setups.

`plan_rows(article_scenarios(), ...)` plans the article's own conditions (two long-prompt traces)
and `article_verdict` says, per figure, whether the planner lands inside the claimed range;
`small_setup_scenarios` and `small_setup_verdict` do the same for short prompts on few devices. One identity links the article's two figures: on the same devices,
cost per token scales as 1 / goodput, so a saving s is a gain 1 / (1 - s) (`gain_for_saving`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from labkit.links import LINKS, Link
from labkit.plan.latency_model import LatencyModel
from labkit.plan.search import Network, SearchSettings
from labkit.plan.simulator import SLO, Limits
from labkit.plan.workload import WorkloadShape, workload_shape

# The SLO notebook 06 plans with throughout: a chat-like TTFT bound, a decode-speed bound.
DEFAULT_SLO = SLO(ttft_s=1.0, tpot_s=0.05)
DEFAULT_LIMITS = Limits(256, 8192)


def saving_for_gain(gain: float) -> float:
    """The cost saving (a fraction) that a goodput gain gives on the same devices: 1 - 1 / gain."""
    if not gain > 0:
        raise ValueError(f"gain must be > 0, got {gain!r}")
    return 1.0 - 1.0 / gain


def gain_for_saving(saving: float) -> float:
    """The goodput gain (x) that a cost saving (a fraction in [0, 1)) means on the same devices."""
    if not 0.0 <= saving < 1.0:
        raise ValueError(f"saving must be in [0, 1), got {saving!r}")
    return 1.0 / (1.0 - saving)


@dataclass(frozen=True, slots=True)
class Scenario:
    """A setup to plan: a workload on `devices` devices whose KV crosses `link`: between nodes
    (NVLink inside a node of 8), or everywhere when `one_network` (a small cluster on one TCP network)."""

    name: str
    shape: WorkloadShape
    devices: int
    link: Link
    rdma: bool = True
    one_network: bool = False
    slo: SLO = DEFAULT_SLO

    @property
    def network(self) -> Network:
        return Network.single(self.link) if self.one_network else Network(inter_node=self.link)


def article_scenarios(devices: int = 32, link: Link = LINKS["400G"]) -> list[Scenario]:
    """The article's conditions, made concrete: more than 16 devices (32), 400 Gbps RDMA between
    nodes, no prefix reuse, long prompts: the Azure 2023 conversation trace with prompts four times
    longer (median 4,080 tokens), and the Azure 2023 code trace (median 1,469 prompt tokens for 13
    output tokens: prefill-heavy)."""
    conv = workload_shape("azure-conv-2023")
    long_conv = conv.with_(
        name="azure-conv-2023, prompts x4",
        prompt_median_tokens=4 * conv.prompt_median_tokens,
        max_prompt_tokens=4 * conv.max_prompt_tokens,
        prefix_hit_rate=0.0,
    )
    code = workload_shape("azure-code-2023").with_(prefix_hit_rate=0.0)
    return [Scenario(long_conv.name, long_conv, devices, link), Scenario(code.name, code, devices, link)]


@dataclass(frozen=True)
class ClaimRow:
    """One planned setup: the best disaggregated deployment against mono-dp on the same devices."""

    scenario: str
    devices: int
    link: str
    disagg: str
    mono: str
    gain: float  # goodput, best disaggregated / mono-dp (x)
    cost_saving: float  # 1 - cost per M output tokens disaggregated / mono-dp (fraction)
    pays_from: int | None = None  # the device count from which the gain stays >= 1.10 up to `devices`

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "devices": self.devices,
            "link": self.link,
            "disaggregated": self.disagg,
            "monolithic": self.mono,
            "gain (x)": round(self.gain, 2),
            "cost saving": f"{self.cost_saving:.0%}" if math.isfinite(self.cost_saving) else "n/a",
            "pays from (devices)": self.pays_from if self.pays_from is not None else "never",
        }


def plan_row(
    scenario: Scenario,
    latency: LatencyModel,
    *,
    num_requests: int = 400,
    settings: SearchSettings | None = None,
    limits: Limits = DEFAULT_LIMITS,
    seed: int = 0,
) -> ClaimRow:
    """Plans `scenario` (the search over its devices and the gain curve up to them) and returns its row."""
    from labkit.plan.planner import plan

    rep = plan(
        scenario.shape,
        latency,
        devices=scenario.devices,
        slo=scenario.slo,
        network=scenario.network,
        rdma=scenario.rdma,
        limits=limits,
        num_requests=num_requests,
        settings=settings,
        curve_devices=None,
        seed=seed,
    )
    mono, dis = rep.search.mono, rep.search.disagg
    saving = (
        1.0 - dis.cost_per_m_output_tokens / mono.cost_per_m_output_tokens
        if dis is not None and math.isfinite(mono.cost_per_m_output_tokens)
        else math.nan
    )
    return ClaimRow(
        scenario.name,
        scenario.devices,
        scenario.link.label,
        dis.label if dis else "-",
        mono.label,
        rep.search.disagg_gain,
        saving,
        rep.curve.pays_from(),
    )


def plan_rows(
    scenarios: Sequence[Scenario],
    latency: LatencyModel,
    *,
    num_requests: int = 400,
    settings: SearchSettings | None = None,
    progress: str = "",
) -> list[ClaimRow]:
    """One row per scenario; `progress`: a tqdm bar with that description ("" : none)."""
    todo: Any = list(scenarios)
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(todo, desc=progress)
    return [plan_row(s, latency, num_requests=num_requests, settings=settings) for s in todo]


def small_setup_scenarios(devices: Sequence[int] = (2, 4)) -> list[Scenario]:
    """Where the handbook says disaggregation loses: short prompts (16-64 tokens) and the Azure
    conversation trace, each on few devices joined by one 25 Gbps TCP network."""
    return [
        Scenario(w.name, w, n, LINKS["25GbE"], rdma=False, one_network=True)
        for w in (workload_shape("short-prompt"), workload_shape("azure-conv-2023"))
        for n in devices
    ]


def within(value: float, low: float, high: float) -> bool:
    """low <= value <= high (False for nan)."""
    return bool(low <= value <= high)


def article_verdict(rows: Sequence[ClaimRow], claims: Any) -> str:
    """Markdown: where the planner's gains and savings land against the article's ranges
    (`claims`: `labkit.reference.ARTICLE`), and what the two ranges imply of each other."""
    g_lo, g_hi = claims.throughput_gain
    s_lo, s_hi = claims.cost_saving_pct
    lines = []
    for r in rows:
        if not (math.isfinite(r.gain) and math.isfinite(r.cost_saving)):
            lines.append(f"- **{r.scenario}**: no disaggregated deployment to compare.")
            continue
        g_ok = within(r.gain, g_lo, g_hi)
        s_ok = within(100 * r.cost_saving, s_lo, s_hi)
        lines.append(
            f"- **{r.scenario}**, {r.devices} devices, {r.link}: {r.gain:.2f}x goodput "
            f"({'inside' if g_ok else 'below' if r.gain < g_lo else 'above'} the article's {g_lo:g}-{g_hi:g}x), "
            f"{r.cost_saving:.0%} lower cost per output token "
            f"({'inside' if s_ok else 'below' if 100 * r.cost_saving < s_lo else 'above'} its "
            f"{s_lo:g}-{s_hi:g}%)."
        )
    lines.append(
        f"- On the same devices a cost saving s is a goodput gain 1 / (1 - s): the article's "
        f"{s_lo:g}-{s_hi:g}% is {gain_for_saving(s_lo / 100):.2f}-{gain_for_saving(s_hi / 100):.2f}x, "
        f"and its {g_lo:g}-{g_hi:g}x would save {saving_for_gain(g_lo):.0%}-{saving_for_gain(g_hi):.0%}. "
        "The two figures cannot describe the same comparison on equal hardware."
    )
    return "\n".join(lines)


def small_setup_verdict(rows: Sequence[ClaimRow], claim: Any) -> str:
    """Markdown: the planner's loss on each small setup against the handbook's range (`claim`:
    `labkit.reference.HANDBOOK_SMALL_SETUP_LOSS`)."""
    lines = []
    for r in rows:
        head = f"- **{r.scenario}** on {r.devices} devices over {r.link}: "
        if not math.isfinite(r.gain):
            lines.append(head + "no disaggregated deployment fits.")
            continue
        loss = 100 * (1 - r.gain)
        if loss < 0:
            tail = f"a {-loss:.0f}% gain, where the handbook reports a {claim.text()} loss."
        elif within(loss, claim.low, claim.high):
            tail = f"a {loss:.0f}% loss, inside the handbook's {claim.text()}."
        else:
            tail = f"a {loss:.0f}% loss, {'less' if loss < claim.low else 'more'} than the handbook's {claim.text()}."
        lines.append(head + f"{r.gain:.2f}x the goodput of mono-dp, " + tail)
    return "\n".join(lines)
