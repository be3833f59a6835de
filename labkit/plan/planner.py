"""One call that answers "should you disaggregate?": search, curve, checklist, verdict and commands.

`plan(...)` is what the CLI prints and what notebook 06's verdict panel shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from labkit.plan.checklist import Checklist, build_checklist
from labkit.plan.commands import LaunchPlan, render_deployment, render_script
from labkit.plan.curve import GainCurve, gain_curve
from labkit.plan.latency_model import LatencyModel
from labkit.plan.search import (
    Deployment,
    Network,
    SearchResult,
    SearchSettings,
    UnitTable,
    search_layouts,
)
from labkit.plan.simulator import SLO, Limits
from labkit.plan.workload import WorkloadShape, sample_requests

CURVE_DEVICES = 64  # the gain-vs-devices curve runs from 1 to this many devices (or to the budget)


@dataclass(frozen=True)
class PlanReport:
    """Everything the planner found, and `render()` to print it."""

    shape: WorkloadShape
    latency: LatencyModel
    search: SearchResult
    curve: GainCurve
    checklist: Checklist
    commands_one_node: str
    commands_cluster: str
    settings: dict[str, Any] = field(default_factory=dict)

    def deployment_rows(self) -> list[dict[str, Any]]:
        """The best disaggregated deployment of the budget and the monolithic one (N replicas)."""
        rows = []
        mono = self.search.mono
        for name, d in (("disaggregated", self.search.disagg), ("monolithic", mono)):
            if d is None:
                continue
            rows.append(
                {
                    "deployment": name,
                    "layout": d.label,
                    "devices used": d.devices_used,
                    "idle": d.idle_devices,
                    "goodput (req/s)": round(d.goodput_rps, 2),
                    "goodput/device (req/s)": round(d.goodput_rps_per_device, 3),
                    "cost / M output tok": round(d.cost_per_m_output_tokens, 3),
                    "vs monolithic": round(d.goodput_rps / mono.goodput_rps, 3) if mono.goodput_rps else math.nan,
                }
            )
        return rows

    def table_rows(self, top: int = 8) -> list[dict[str, Any]]:
        """The units simulated, best goodput per device first (and the best monolithic one)."""
        picks = self.search.scores[:top]
        mono = next((s for s in self.search.scores if s.unit.kind == "mono"), None)
        if mono is not None and mono not in picks:
            picks = picks + [mono]
        rows = []
        for s in picks:
            summ = s.result.summary(self.search.slo) if s.result is not None else {}
            rows.append(
                {
                    "unit": s.label,
                    "devices": s.unit.num_devices,
                    "goodput/device (req/s)": round(s.goodput_rps_per_device, 3),
                    "unit goodput (req/s)": round(s.max_rate_rps_per_unit, 2),
                    "cost / M output tok": round(s.cost_per_m_output_tokens, 3),
                    "p50 TTFT (ms)": round(1e3 * float(summ.get("ttft_p50_s", math.nan)), 1),
                    "p50 TPOT (ms)": round(1e3 * float(summ.get("tpot_p50_s", math.nan)), 2),
                }
            )
        return rows

    def render(self) -> str:
        s = self.settings
        net: Network = s["network"]
        head = [
            (
                f"Workload {self.shape.name}: prompt median {self.shape.prompt_median_tokens:.0f} tokens, output "
                f"median {self.shape.output_median_tokens:.0f}, prefix hit {self.shape.prefix_hit_rate:.0%} "
                f"({self.shape.source})"
            ),
            f"Latency model ({self.latency.model} on {self.latency.device}; {self.latency.note}):",
            *("  " + line for line in self.latency.describe().splitlines()),
            (
                f"SLO: TTFT <= {self.search.slo.ttft_s * 1e3:.0f} ms and TPOT <= {self.search.slo.tpot_s * 1e3:.0f} ms "
                f"for >= {s.get('attainment', 0.9):.0%} of requests; {self.search.devices} devices at "
                f"{s.get('price_per_device_hour', 0):g}/device-hour; nodes of {net.devices_per_node}, KV over "
                f"{net.intra_node.label} inside a node, {net.inter_node.label} between nodes"
            ),
            "",
        ]
        marks = sorted({n for n in (1, 2, 4, 8, 16, 32, 64, self.search.devices) if n in self.curve.devices})
        gain = self.curve.gain
        at = {n: gain[self.curve.devices.index(n)] for n in marks}
        # one device holds no prefill/decode pair: no gain to print there
        curve = "  ".join(f"{n}: {g:.2f}x" if math.isfinite(g) else f"{n}: no pair fits" for n, g in at.items())
        return "\n".join(
            head
            + [
                f"Deployments of {self.search.devices} devices (simulated):",
                _table(self.deployment_rows()),
                "",
                "Units, best goodput per device first:",
                _table(self.table_rows()),
                "",
                f"Gain vs devices (best disaggregated / mono-dp, simulated): {curve}",
                f"  {self.curve.describe()}",
                "",
                self.checklist.render(),
                "",
                "Launch the best disaggregated deployment (vLLM + NixlConnector):",
                "",
                "## its main unit",
                self.commands_one_node,
                "",
                "## the whole deployment",
                self.commands_cluster,
            ]
        )


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(none)"
    cols = list(rows[0])
    w = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    lines = ["  ".join(c.rjust(w[i]) for i, c in enumerate(cols))]
    lines += ["  ".join(str(r[c]).rjust(w[i]) for i, c in enumerate(cols)) for r in rows]
    return "\n".join(lines)


def _commands(
    d: Deployment | None, network: Network, model: str, tensor_parallel: int, node_hosts: tuple[str, ...]
) -> tuple[str, str]:
    """Launch scripts for the deployment's main xPyD unit, and for the whole deployment."""
    if d is None or d.kind != "disagg":
        none = "(no disaggregated deployment fits: fewer than 2 devices)"
        return none, none
    gpus_per_node = network.devices_per_node * tensor_parallel
    nodes = -(-d.devices // network.devices_per_node)
    hosts = node_hosts or (tuple(f"node{i + 1}" for i in range(nodes)) if nodes > 1 else ())
    main = d.unit
    own_nodes = -(-main.num_devices // network.devices_per_node)
    one = render_script(
        LaunchPlan(
            model,
            main.num_prefill,
            main.num_decode,
            tensor_parallel,
            gpus_per_node,
            hosts[:own_nodes] if own_nodes > 1 else (),
        )
    )
    if len(d.placement) == 1:
        return one, "(the deployment is that one unit: see above)"
    rates = {s.unit: s.max_rate_rps_per_unit for s, _ in d.parts}
    units = [
        (first, u.num_prefill if u.kind == "disagg" else 0, u.num_decode if u.kind == "disagg" else 0, rates[u])
        for first, u in d.placement
    ]
    return one, render_deployment(
        model, units, tensor_parallel=tensor_parallel, devices_per_node=gpus_per_node, node_hosts=hosts
    )


def plan(
    shape: WorkloadShape,
    latency: LatencyModel,
    *,
    devices: int,
    slo: SLO,
    network: Network | None = None,
    rdma: bool = True,
    limits: Limits | None = None,
    price_per_device_hour: float = 2.0,
    num_requests: int = 1000,
    settings: SearchSettings | None = None,
    model_id: str | None = None,
    tensor_parallel: int = 1,
    node_hosts: tuple[str, ...] = (),
    seed: int = 0,
    curve_devices: int | None = CURVE_DEVICES,
) -> PlanReport:
    """Searches deployments of `devices`, draws the gain-vs-devices curve (1 to max(devices,
    curve_devices); None: to `devices`), builds the checklist and the launch commands; returns the report."""
    net = network or Network()
    st = settings or SearchSettings()
    req = sample_requests(shape, num_requests, 1.0, seed=seed)
    table = UnitTable(
        req,
        latency,
        slo,
        network=net,
        limits=limits,
        prefix_hit_rate=shape.prefix_hit_rate,
        price_per_device_hour=price_per_device_hour,
        settings=st,
    )
    top = max(devices, curve_devices or devices)
    curve = gain_curve(req, latency, slo, range(1, top + 1), table=table)
    res = search_layouts(req, latency, devices, slo, table=table)
    notes = list(res.notes)
    if res.disagg is None:
        notes.append("With one device there is nothing to split: disaggregation needs a prefill and a decode device.")
    main = res.disagg.main if res.disagg is not None else None
    kv_link = main.link if main is not None and main.link is not None else net.inter_node
    cl = build_checklist(
        shape,
        latency,
        devices=devices,
        link=kv_link,
        network_link=net.inter_node,
        rdma=rdma,
        gain=res.disagg_gain,
        best_layout=res.best.label,
        ttft_slo_s=slo.ttft_s,
        notes=notes,
        curve=curve,
    )
    one, cluster = _commands(res.disagg, net, model_id or latency.model, tensor_parallel, node_hosts)
    return PlanReport(
        shape,
        latency,
        res,
        curve,
        cl,
        one,
        cluster,
        {
            "attainment": st.attainment,
            "price_per_device_hour": price_per_device_hour,
            "num_requests": num_requests,
            "rdma": rdma,
            "network": net,
        },
    )
