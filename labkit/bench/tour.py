"""The tour's serving sections: "Interference" (`interference_section`) and "Mono vs 1P1D" (`tour_section`:
one workload, one rate, 1P1D against the fair baselines, charts and summary rows).

On the lab's 2-core CPU: 1P1D puts the prefill worker on core 0 and the decode worker on core 1;
mono runs one engine on both; mono-dp runs one engine per core behind the router (data parallel);
mono-chunked-N is mono with chunked prefill, N prompt tokens per step. First a calibration (mono,
three requests one at a time) sets the rate; the SLO comes from mono's median latencies at that
rate. The full profile runs every fair baseline (`labkit.bench.sweep.DEFAULT_MODES`) on the default
model (`small`); the ci profile keeps mono, mono-dp and 1P1D on `tiny` (chunked prefill has its own
section, "Interference"), about a minute and a half.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from labkit.bench.metrics import jsonable
from labkit.bench.sweep import (
    DEFAULT_MODES,
    TABLE_COLUMNS,
    ServerFactory,
    SweepConfig,
    SweepResult,
    calibrate_url,
    fixed_url_factory,
    lab_server_factory,
    parse_mode,
    run_sweep,
)
from labkit.bench.workloads import get_workload
from labkit.models import CI_MODEL, DEFAULT_MODEL, get_preset


@dataclass(frozen=True, slots=True)
class TourPlan:
    """How big the tour's comparison is in one profile. The rate is `rate_x` times what mono serves
    one request at a time (calibrated first), so the comparison means the same on any machine."""

    model: str
    n_requests: int
    rate_x: float
    conv_scale: float
    slo_ttft_x: float = 3.0
    slo_tpot_x: float = 2.0
    modes: tuple[str, ...] = DEFAULT_MODES  # mono first: the calibration runs on its server


PLANS = {
    "full": TourPlan(DEFAULT_MODEL, 10, 1.0, 0.25),
    "ci": TourPlan(CI_MODEL, 8, 1.0, 0.25, modes=("mono", "mono-dp", "1p1d")),
}


def server_factory(model: str) -> ServerFactory:
    """The servers the tour starts (the lab's launcher); a test may swap in its own."""
    return lab_server_factory(model)


def _fmt_ms(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.0f} ms"


def tour_section(report: Any, profile: str) -> None:
    """Runs 1P1D and the fair baselines (the plan's modes) on one workload and rate; adds a table, two CDF
    charts, the TTFT vs p99-ITL plane and summary rows."""
    from labkit.plots import bench as pb

    plan = PLANS["ci" if profile == "ci" else "full"]
    s = report.sections[-1]
    w = get_workload("azure-conv-2023").scaled(plan.conv_scale)
    max_model_len = get_preset(plan.model).max_position_embeddings
    factory = server_factory(plan.model)
    cfg = SweepConfig(
        w,
        rates_rps=(1.0,),
        modes=plan.modes,
        n_requests=plan.n_requests,
        seed=11,
        warmup_requests=2,
        request_timeout_s=600.0,
        max_model_len=max_model_len,
        progress=False,
    )
    # Calibrate on the mono server the comparison then uses: one server start fewer.
    with factory(parse_mode("mono")) as mono_url:
        (cal,) = calibrate_url(mono_url, [w], n=3, max_model_len=max_model_len)
        rate = cal.rates((plan.rate_x,))[0]
        cfg = replace(cfg, rates_rps=(rate,))
        mono = run_sweep(replace(cfg, modes=("mono",)), fixed_url_factory({"mono": mono_url}))
    rest = run_sweep(replace(cfg, modes=tuple(m for m in plan.modes if m != "mono")), factory)
    raw = SweepResult(cfg, mono.rows + rest.rows, {**mono.runs, **rest.runs}, mono.scaling_text)
    slo = raw.slo_from("mono", ttft_x=plan.slo_ttft_x, tpot_x=plan.slo_tpot_x)
    res = raw.rescored(slo)
    by = {r["mode"]: r for r in res.rows}
    m, d = by["mono"], by["1p1d"]
    s.paragraphs.append(
        f"The same {plan.n_requests} requests (Azure 2023 conversation lengths x{plan.conv_scale:g}: "
        f"mean prompt {m['mean_prompt_tokens']:,.0f}, output {m['mean_output_tokens']:,.0f} tokens) at "
        f"{rate:g} req/s (Poisson; mono serves {cal.sequential_rps:.3g} req/s one at a time, unloaded TTFT "
        f"{cal.ttft_s * 1000:,.0f} ms, TPOT {cal.tpot_s * 1000:,.1f} ms) through {', '.join(plan.modes)}, model "
        f"{plan.model}: mono is one engine on every core, mono-dp one engine per core behind the router (which "
        "sends each request to the least loaded), mono-chunked-N mono with N prompt tokens per step at most, and "
        "1P1D a prefill worker and a decode worker on separate cores with the KV cache moved between them."
    )
    s.paragraphs.append(
        "In mono every prefill runs in the same steps as the running decodes, so each long prompt stalls "
        "every stream: the tail of the inter-token latency (ITL) grows. In 1P1D decode steps never wait "
        "for a prefill; the price is half the cores per phase, a KV transfer, and a longer TTFT under load."
    )
    cols = TABLE_COLUMNS
    s.tables.append(
        (
            (
                f"1P1D and the baselines at {rate:g} req/s (SLO: {slo.describe()}, from mono's p50 x{plan.slo_ttft_x:g} "
                f"TTFT and x{plan.slo_tpot_x:g} TPOT)"
            ),
            [{c: r[c] for c in cols} for r in res.rows],
        )
    )
    report.add_figure(
        s,
        pb.plot_latency_cdf(res.runs, "itl"),
        "bench_itl_cdf",
        "Inter-token latency CDF: the mono tail is the prefill stalls",
    )
    report.add_figure(
        s,
        pb.plot_latency_cdf(res.runs, "ttft", slo_ms=slo.ttft_s * 1000 if slo.ttft_s else None),
        "bench_ttft_cdf",
        "Time to first token CDF",
    )
    report.add_figure(
        s,
        pb.plot_ttft_itl_plane(res.rows, slo_ttft_ms=slo.ttft_s * 1000 if slo.ttft_s else None),
        "bench_ttft_itl_plane",
        "Every mode on the TTFT vs p99-ITL plane (lower left is better)",
    )
    from labkit.bench.waterfall import with_waterfall
    from labkit.plots.serving import plot_ttft_waterfall

    at_rate = {mode: res.runs[(mode, rate)] for mode in plan.modes}
    if any(with_waterfall(run.records) for run in at_rate.values()):  # the lab's router times each request
        report.add_figure(
            s,
            plot_ttft_waterfall(at_rate).figure,
            "bench_ttft_waterfall",
            "Where the TTFT went: median and p99 requests per mode",
        )
    ratio = m["itl_p99_ms"] / d["itl_p99_ms"] if d["itl_p99_ms"] else math.nan
    report.add_summary(
        "p99 ITL mono vs 1P1D",
        f"{_fmt_ms(m['itl_p99_ms'])} vs {_fmt_ms(d['itl_p99_ms'])}",
        f"{ratio:.1f}x, {plan.model}, {rate:g} req/s",
    )
    report.add_summary("p50 TTFT mono vs 1P1D", f"{_fmt_ms(m['ttft_p50_ms'])} vs {_fmt_ms(d['ttft_p50_ms'])}")
    report.add_summary(
        "goodput mono vs 1P1D", f"{m['goodput_rps']:.2f} vs {d['goodput_rps']:.2f} req/s", slo.describe()
    )
    best = max(res.rows, key=lambda r: r["goodput_rps"])
    report.add_summary(
        "goodput per mode",
        ", ".join(f"{r['mode']} {r['goodput_rps']:.2f}" for r in res.rows),
        f"req/s within the SLO; most: {best['mode']}",
    )
    errors = sum(r["errors"] for r in res.rows)
    if errors:
        s.paragraphs.append(
            f"{errors} request(s) failed; first errors: "
            + "; ".join(e for mode in plan.modes for e in res.runs[(mode, rate)].meta["first_errors"])
        )
    report.data["mono_vs_1p1d"] = jsonable(
        {
            "rows": res.rows,
            "scaling": res.scaling_text,
            "calibration": {"ttft_s": cal.ttft_s, "tpot_s": cal.tpot_s, "e2e_s": cal.e2e_s},
            "plan": {"model": plan.model, "rate_rps": rate, "n_requests": plan.n_requests, "slo": slo.as_dict()},
        }
    )


def interference_section(report: Any, profile: str) -> None:
    """The tour's "Interference" section: the long-prefill stall in mono, mono + chunked prefill, and 1P1D.

    Runs `labkit.bench.interference.run_modes` once per mode (each server started and stopped by
    the launcher), adds the stall chart, the mono and 1P1D token timelines, a table and summary rows.
    The ci profile uses `tiny` and a 1,536-token long prompt (about a minute and a half on 2 cores);
    full uses `small` and 2,048 tokens.
    """
    from labkit.bench.interference import InterferenceScenario, run_modes, stats_table
    from labkit.plots import serving

    s = report.sections[-1]
    model, long_tokens = ("tiny", 1536) if profile == "ci" else ("small", 2048)
    sc = InterferenceScenario(num_decodes=4, long_prompt_tokens=long_tokens, variant=1000)
    results = run_modes(model, sc, progress=True)
    by = {r.label: r for r in results}
    s.paragraphs.append(
        f"Four requests stream tokens from `{model}`; then one {long_tokens:,}-token prompt arrives. In one engine "
        "(mono) its prefill takes the step loop and every decode stalls for about as long as the prefill; chunked "
        "prefill cuts the stall into smaller ones; with the prefill on another worker (1P1D: prefill on core 0, "
        "decode on core 1) the decode gaps stay flat. Times are what the client saw."
    )
    s.tables.append(("Decode gaps around the long prefill (ms)", stats_table(results)))
    report.add_figure(
        s,
        serving.stall_comparison(results).figure,
        "interference_stalls",
        "Mean decode gap outside the prefill vs the worst gap during it, per mode",
    )
    for mode in ("mono", "1p1d"):
        report.add_figure(
            s,
            serving.interference_figure(by[mode]),
            f"interference_{mode}",
            f"{mode}: every request's tokens as the client received them; red: the long prefill",
        )
    st = {m: r.stats() for m, r in by.items()}
    report.add_summary(
        "decode stall during a long prefill",
        " / ".join(f"{m} {st[m]['decode_stall_max_ms']:,.0f} ms" for m in by),
        f"{long_tokens:,}-token prompt, {model}",
    )
    report.data["interference"] = [r.to_json() for r in results]
