"""The planner's part of `labkit tour`: a verdict for the Azure 2023 presets on an H100 cluster."""

from __future__ import annotations

from typing import Any

TOUR_WORKLOADS = ("azure-conv-2023", "azure-code-2023")


def tour_section(report: Any, profile: str) -> None:
    """Adds the planner's table (one row per preset), the layouts chart and summary rows to `report`.

    The latency model is a roofline of Llama-3.1-8B on the H100 SXM datasheet (an estimate), so the
    section runs in seconds on any machine; notebook 06 calibrates on the participant's own.
    """
    from labkit.plan.planner import plan
    from labkit.plan.scaling import (
        Efficiency,
        ModelShape,
        datasheet_spec,
        roofline_latency_model,
    )
    from labkit.plan.search import Network, SearchSettings
    from labkit.plan.simulator import SLO, Limits
    from labkit.plan.workload import workload_shape
    from labkit.plots import plan as plan_plots

    s = report.sections[-1]
    hw = datasheet_spec("H100 SXM")
    latency = roofline_latency_model(ModelShape.from_preset("llama-3.1-8b"), hw, Efficiency(0.5, 0.7, 1e-3))
    devices, slo, network = 16, SLO(1.0, 0.05), Network()
    ci = profile == "ci"
    settings = SearchSettings(bisection_steps=3, min_requests=60, max_requests=600) if ci else SearchSettings()
    n = 120 if ci else 1000
    rows = []
    first = None
    for name in TOUR_WORKLOADS:
        rep = plan(
            workload_shape(name),
            latency,
            devices=devices,
            slo=slo,
            network=network,
            limits=Limits(256, 8192),
            num_requests=n,
            settings=settings,
            price_per_device_hour=2.5,
            curve_devices=devices if ci else 64,
        )
        first = first or rep
        rows.append(
            {
                "workload": name,
                "best deployment": rep.search.best.label,
                "gain (best disaggregated / mono-dp)": round(rep.search.disagg_gain, 3),
                "mono-dp goodput/device (req/s)": round(rep.search.mono.goodput_rps_per_device, 3),
                "disaggregation pays from (devices)": rep.curve.pays_from() or f"not up to {rep.curve.devices[-1]}",
                "verdict": rep.checklist.verdict,
            }
        )
        report.add_summary(f"planner: {name}", f"{rep.search.disagg_gain:.2f}x", rep.checklist.verdict.split(":")[0])
    s.paragraphs.append(
        f"Llama-3.1-8B on {devices} x {hw.name} ({latency.note}); SLO TTFT <= 1 s and TPOT <= 50 ms "
        f"for 90% of requests; nodes of {network.devices_per_node}, KV over {network.intra_node.label} inside a node "
        f"and {network.inter_node.label} between nodes."
    )
    s.tables.append(("Should you disaggregate? (simulated)", rows))
    if first is not None:
        report.add_figure(
            s,
            plan_plots.plot_layouts(first.search, title="azure-conv-2023: goodput per device"),
            "plan_layouts",
            "Goodput per device of each unit (azure-conv-2023, simulated)",
        )
        report.add_figure(
            s,
            plan_plots.plot_gain_curve(first.curve, title="azure-conv-2023: gain vs devices"),
            "plan_gain_curve",
            "Best disaggregated deployment over mono-dp, by device count (simulated)",
        )
        s.paragraphs.append("Launch commands for the best disaggregated layout:\n" + first.commands_one_node)
    report.data["plan"] = rows
