"""One call that answers "should you disaggregate?": search, checklist, verdict and commands.

`plan(...)` is what the CLI prints and what notebook 06's verdict panel shows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from labkit.plan.checklist import Checklist, build_checklist
from labkit.plan.commands import LaunchPlan, render_script
from labkit.plan.latency_model import LatencyModel
from labkit.plan.search import SearchResult, SearchSettings, search_layouts
from labkit.plan.simulator import SLO, Limits, Link
from labkit.plan.workload import WorkloadShape, sample_requests


@dataclass(frozen=True)
class PlanReport:
    """Everything the planner found, and `render()` to print it."""

    shape: WorkloadShape
    latency: LatencyModel
    search: SearchResult
    checklist: Checklist
    commands_one_node: str
    commands_cluster: str
    settings: dict[str, Any] = field(default_factory=dict)

    def table_rows(self, top: int = 8) -> list[dict[str, Any]]:
        """The best candidates (and the best monolithic one), one row each."""
        rows, seen = [], set()
        picks = self.search.scores[:top]
        mono = self.search.best_of("mono")
        if mono is not None and mono not in picks:
            picks = picks + [mono]
        for s in picks:
            if s.label in seen:
                continue
            seen.add(s.label)
            summ = s.result.summary(self.search.slo) if s.result is not None else {}
            rows.append({"layout": s.label, "devices used": s.devices_used,
                         "goodput/device (req/s)": round(s.goodput_rps_per_device, 3),
                         "cluster goodput (req/s)": round(s.goodput_rps, 2),
                         "cost / M output tok": round(s.cost_per_m_output_tokens, 3),
                         "p50 TTFT (ms)": round(1e3 * float(summ.get("ttft_p50_s", math.nan)), 1),
                         "p50 TPOT (ms)": round(1e3 * float(summ.get("tpot_p50_s", math.nan)), 2)})
        return rows

    def render(self) -> str:
        s = self.settings
        head = [f"Workload {self.shape.name}: prompt median {self.shape.prompt_median_tokens:.0f} tokens, output median "
                f"{self.shape.output_median_tokens:.0f}, prefix hit {self.shape.prefix_hit_rate:.0%} ({self.shape.source})",
                f"Latency model ({self.latency.model} on {self.latency.device}; {self.latency.note}):",
                *("  " + line for line in self.latency.describe().splitlines()),
                f"SLO: TTFT <= {self.search.slo.ttft_s * 1e3:.0f} ms and TPOT <= {self.search.slo.tpot_s * 1e3:.0f} ms "
                f"for >= {s.get('attainment', 0.9):.0%} of requests; {self.search.devices} devices at "
                f"{s.get('price_per_device_hour', 0):g}/device-hour", ""]
        rows = self.table_rows()
        cols = list(rows[0]) if rows else []
        w = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
        table = ["  ".join(c.rjust(w[i]) for i, c in enumerate(cols))]
        table += ["  ".join(str(r[c]).rjust(w[i]) for i, c in enumerate(cols)) for r in rows]
        return "\n".join(head + ["Layouts, best goodput per device first (simulated):"] + table + ["", self.checklist.render(),
                         "", "Launch the best disaggregated layout (vLLM + NixlConnector):", "", "## one node (one unit)",
                         self.commands_one_node, "", "## the whole cluster, across nodes", self.commands_cluster])


def plan(shape: WorkloadShape, latency: LatencyModel, *, devices: int, slo: SLO, link: Link, rdma: bool = True,
         limits: Limits | None = None, price_per_device_hour: float = 2.0, num_requests: int = 600,
         settings: SearchSettings | None = None, model_id: str | None = None, tensor_parallel: int = 1,
         devices_per_node: int = 8, node_hosts: tuple[str, ...] = (), seed: int = 0) -> PlanReport:
    """Searches layouts for `devices`, builds the checklist and the launch commands; returns the report."""
    st = settings or SearchSettings(max_unit_devices=min(devices, devices_per_node, 8))
    req = sample_requests(shape, num_requests, 1.0, seed=seed)
    res = search_layouts(req, latency, devices, slo, link=link, limits=limits, prefix_hit_rate=shape.prefix_hit_rate,
                         price_per_device_hour=price_per_device_hour, settings=st)
    best_d = res.best_of("disagg")
    notes = list(res.notes)
    if best_d is None:
        notes.append("With one device there is nothing to split: disaggregation needs a prefill and a decode device.")
    cl = build_checklist(shape, latency, devices=devices, link=link, rdma=rdma, gain=res.disagg_gain,
                         best_layout=res.best.label, ttft_slo_s=slo.ttft_s, notes=notes)
    model = model_id or latency.model
    if best_d is not None:
        u = best_d.unit
        one = render_script(LaunchPlan(model, u.num_prefill, u.num_decode, tensor_parallel, devices_per_node))
        per_node = devices_per_node
        tot_p, tot_d = u.num_prefill * best_d.units, u.num_decode * best_d.units
        nodes = -(-(tot_p + tot_d) * tensor_parallel // per_node)
        hosts = node_hosts or tuple(f"node{i + 1}" for i in range(nodes))
        if nodes > 1 or node_hosts:
            cluster = render_script(LaunchPlan(model, tot_p, tot_d, tensor_parallel, per_node, hosts))
        else:
            cluster = "(the whole layout fits one node: see above)"
    else:
        one = cluster = "(fewer than 2 devices: no disaggregated layout)"
    return PlanReport(shape, latency, res, cl, one, cluster,
                      {"attainment": st.attainment, "price_per_device_hour": price_per_device_hour,
                       "num_requests": num_requests, "rdma": rdma})
