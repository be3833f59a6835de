"""Notebook 06's "move the sliders" planner: inputs, one planner run, its verdict panel, the widget.

The logic is plain functions (tested without a browser): `PlannerInputs` (what the sliders set,
validated), `run_planner` (the planner for those inputs plus a simulation of the best monolithic
and the best disaggregated unit at the chosen rate), `verdict_html` (the coloured panel).
`show_planner` draws one run; `planner_widget` wires sliders to it. The sliders redraw on release
(`continuous_update=False`): one run takes seconds, so redrawing while dragging would queue a
run per pixel.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass, field
from typing import Any

from labkit.links import Link
from labkit.plan.latency_model import LatencyModel
from labkit.plan.planner import PlanReport, plan
from labkit.plan.search import Network, SearchSettings
from labkit.plan.simulator import SLO, Limits, SimResult, simulate
from labkit.plan.workload import WorkloadShape, sample_requests

LINK_FIXED_S = 10e-6  # per-transfer cost of the link between nodes (an RDMA round trip)
RDMA_FROM_GBPS = 100.0  # the checklist counts a link this fast or faster as RDMA


@dataclass(frozen=True, slots=True)
class PlannerInputs:
    """What the sliders set: workload lengths (tokens), offered rate per device (req/s), prefix-cache
    hit rate, device budget, the link between nodes (Gbit/s) and the SLOs (ms)."""

    prompt_tokens: int = 1020
    output_tokens: int = 129
    rate_per_device: float = 8.0
    prefix_hit: float = 0.0
    devices: int = 16
    link_gbps: float = 100.0
    ttft_slo_ms: float = 1000.0
    tpot_slo_ms: float = 50.0

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(
                f"prompt_tokens and output_tokens must be >= 1, got {self.prompt_tokens}/{self.output_tokens}"
            )
        if not self.rate_per_device > 0:
            raise ValueError(f"rate_per_device must be > 0 req/s, got {self.rate_per_device}")
        if not 0.0 <= self.prefix_hit < 1.0:
            raise ValueError(f"prefix_hit must be in [0, 1), got {self.prefix_hit}")
        if self.devices < 1:
            raise ValueError(f"devices must be >= 1, got {self.devices}")
        if not self.link_gbps > 0:
            raise ValueError(f"link_gbps must be > 0, got {self.link_gbps}")
        if not (self.ttft_slo_ms > 0 and self.tpot_slo_ms > 0):
            raise ValueError(f"SLOs must be > 0 ms, got TTFT {self.ttft_slo_ms}, TPOT {self.tpot_slo_ms}")

    def shape(self, base: WorkloadShape) -> WorkloadShape:
        """`base` with these median lengths and prefix hit rate (its spreads kept)."""
        return base.with_(
            prompt_median_tokens=float(self.prompt_tokens),
            output_median_tokens=float(self.output_tokens),
            prefix_hit_rate=float(self.prefix_hit),
        )

    @property
    def slo(self) -> SLO:
        return SLO(self.ttft_slo_ms / 1e3, self.tpot_slo_ms / 1e3)

    @property
    def network(self) -> Network:
        """NVLink inside a node, the slider's link between nodes."""
        return Network(inter_node=Link.from_gbps(float(self.link_gbps), LINK_FIXED_S))

    @property
    def rdma(self) -> bool:
        return self.link_gbps >= RDMA_FROM_GBPS


@dataclass(frozen=True)
class PlannerView:
    """One planner run for some inputs: the report, and the best units simulated at the chosen rate."""

    inputs: PlannerInputs
    report: PlanReport
    sims: dict[str, SimResult] = field(default_factory=dict)
    seconds: float = 0.0


def run_planner(
    inputs: PlannerInputs,
    base: WorkloadShape,
    latency: LatencyModel,
    *,
    num_requests: int = 400,
    settings: SearchSettings | None = None,
    limits: Limits | None = None,
    price_per_device_hour: float = 2.5,
    model_id: str | None = None,
    seed: int = 1,
) -> PlannerView:
    """Plans `inputs` on `latency` (no gain curve: a redraw stays in seconds), then simulates the main
    unit of the best monolithic and the best disaggregated deployment at `rate_per_device` x its devices."""
    t0 = time.perf_counter()
    w = inputs.shape(base)
    lim = limits or Limits(256, 8192)
    net = inputs.network
    rep = plan(
        w,
        latency,
        devices=inputs.devices,
        slo=inputs.slo,
        network=net,
        rdma=inputs.rdma,
        limits=lim,
        num_requests=num_requests,
        settings=settings,
        price_per_device_hour=price_per_device_hour,
        model_id=model_id,
        curve_devices=None,
    )
    pool = sample_requests(w, num_requests, 1.0, seed=seed)
    sims: dict[str, SimResult] = {}
    for dep in (rep.search.mono, rep.search.disagg):
        if dep is None or not dep.parts:
            continue
        unit = dep.unit
        link = net.link_for(unit) if unit.kind == "disagg" else None
        sims[unit.label] = simulate(
            pool.at_rate(inputs.rate_per_device * unit.num_devices),
            latency,
            unit,
            link=link,
            limits=lim,
            prefix_hit_rate=w.prefix_hit_rate,
        )
    return PlannerView(inputs, rep, sims, time.perf_counter() - t0)


def verdict_color(verdict: str) -> str:
    """Green for DISAGGREGATE, red for STAY MONOLITHIC, orange otherwise (marginal, no verdict)."""
    if verdict.startswith("DISAGG"):
        return "#2ca02c"
    if verdict.startswith("STAY"):
        return "#d62728"
    return "#ff7f0e"


def verdict_html(report: PlanReport) -> str:
    """The verdict panel: the verdict in its colour, the best deployment, one row per checklist item."""
    cl = report.checklist
    color = verdict_color(cl.verdict)
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(i.name)}</td><td>{esc(i.value)}</td><td><b>{esc(i.verdict)}</b></td></tr>" for i in cl.items
    )
    return (
        f"<div style='border:3px solid {color};padding:8px;font-size:15px'><b style='color:{color}'>"
        f"{esc(cl.verdict)}</b><br>best deployment: {esc(report.search.best.label)}"
        f"<table>{rows}</table></div>"
    )


def show_planner(view: PlannerView, *, model: str = "", hardware: str = "") -> None:
    """Displays one run: the verdict panel, goodput per device of each unit, and the two best units'
    simulated latencies at the chosen rate."""
    import matplotlib.pyplot as plt
    from IPython.display import HTML, display

    from labkit.plots import plan as plan_plots

    display(HTML(verdict_html(view.report)))
    where = f", {model} on {hardware}" if model or hardware else ""
    plan_plots.plot_layouts(view.report.search, title=f"Goodput per device of each unit{where}")
    plt.show()
    if view.sims:
        plan_plots.plot_sim_compare(
            view.sims, view.inputs.slo, title=f"Best of each at {view.inputs.rate_per_device:g} req/s per device"
        )
        plt.show()
    print(f"planned in {view.seconds:.1f} s")


# name -> (slider kind, min, max, step, label); FloatLog's min/max are powers of ten
SLIDERS: dict[str, tuple[str, float, float, float, str]] = {
    "prompt_tokens": ("int", 32, 16384, 32, "prompt tok"),
    "output_tokens": ("int", 4, 2048, 4, "output tok"),
    "rate_per_device": ("float", 0.5, 64.0, 0.5, "req/s/dev"),
    "prefix_hit": ("float", 0.0, 0.95, 0.05, "prefix hit"),
    "devices": ("int", 2, 64, 1, "devices"),
    "link_gbps": ("log", 0, 3, 0.1, "link Gbps"),
    "ttft_slo_ms": ("int", 50, 5000, 50, "TTFT SLO ms"),
    "tpot_slo_ms": ("int", 5, 300, 5, "TPOT SLO ms"),
}


def build_sliders(defaults: PlannerInputs | None = None) -> dict[str, Any]:
    """One ipywidgets slider per PlannerInputs field, at `defaults`, each redrawing on release only."""
    import ipywidgets as widgets

    d = defaults or PlannerInputs()
    kinds = {"int": widgets.IntSlider, "float": widgets.FloatSlider, "log": widgets.FloatLogSlider}
    out = {}
    for name, (kind, lo, hi, step, label) in SLIDERS.items():
        extra = {"base": 10} if kind == "log" else {}
        out[name] = kinds[kind](
            value=getattr(d, name), min=lo, max=hi, step=step, description=label, continuous_update=False, **extra
        )
    return out


def planner_widget(
    base: WorkloadShape,
    latency: LatencyModel,
    *,
    defaults: PlannerInputs | None = None,
    model: str = "",
    hardware: str = "",
    **run_kw: Any,
) -> Any:
    """The sliders and the output they redraw (an ipywidgets VBox to `display`); `run_kw` go to run_planner."""
    import ipywidgets as widgets

    sliders = build_sliders(defaults)

    def draw(**values: Any) -> None:
        show_planner(run_planner(PlannerInputs(**values), base, latency, **run_kw), model=model, hardware=hardware)

    out = widgets.interactive_output(draw, sliders)
    names = list(sliders.values())
    return widgets.VBox([widgets.HBox(names[:4]), widgets.HBox(names[4:]), out])
