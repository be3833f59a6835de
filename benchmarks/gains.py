"""The gains of 1P1D over mono and the fair baselines on this machine: p99 ITL and goodput at three rates.

On a 2-core CPU: the prefill worker on core 0, the decode worker on core 1, mono on both (the
lab's launcher default split); beside them the fair baselines (`labkit.bench.sweep.DEFAULT_MODES`):
mono-dp (one engine per core behind the router, which sends each request to the least loaded) and
mono-chunked-256/-512 (chunked prefill). The quick profile keeps mono, mono-dp and 1P1D. Two
workloads, same seed and requests in every mode:
- conversation: the Azure 2023 conversation preset, lengths scaled for the `small` model on a CPU;
- short prompts: 16-64 prompt tokens, where there is no prefill to take off the decode path.

Prints a table and the ratios, writes JSON (docs/results/gains-<date>-<machine>.json by default).

    python benchmarks/gains.py            # small model, five modes (mono and 1P1D alone took ~10 minutes)
    python benchmarks/gains.py --quick    # tiny model, fewer requests and modes, a few minutes
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import sys
import time
from dataclasses import asdict
from typing import Any

from labkit.bench import get_workload
from labkit.bench.sweep import (
    DEFAULT_MODES,
    SweepConfig,
    SweepResult,
    calibrate,
    lab_server_factory,
    run_sweeps,
    table,
)
from labkit.models import get_preset
from labkit.reference import write_result

# Per profile: model, requests per rate, the conversation preset's length scale, the short-prompt
# output scale. Rates and SLOs are not fixed numbers: they come from a calibration on this machine
# (mono, unloaded, one request at a time), so the benchmark means the same on a laptop and on a
# busy 2-core VM: rates are multiples of mono's one-at-a-time capacity, SLOs multiples of what
# mono delivers at the lowest rate.
PROFILES: dict[str, dict[str, Any]] = {
    "full": {"model": "small", "n": 10, "conv_scale": 0.25, "short_output_scale": 0.25, "modes": DEFAULT_MODES},
    "quick": {"model": "tiny", "n": 10, "conv_scale": 0.25, "short_output_scale": 0.25, "modes": ("mono", "mono-dp", "1p1d")},
}
RATE_FRACTIONS = (0.5, 1.0, 1.5)   # low, moderate, high: x mono's one-at-a-time request rate
SLO_TTFT_X, SLO_TPOT_X = 3.0, 2.0  # SLO = these x mono's p50 TTFT and TPOT at the lowest rate


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) and not math.isnan(a) else math.nan


def gains(res: SweepResult) -> list[dict[str, Any]]:
    """Per rate: p99 ITL mono / 1P1D (>1: 1P1D better), goodput 1P1D / mono (>1: 1P1D better), and
    goodput 1P1D / the best baseline at that rate (mono, mono-dp or mono-chunked-N, whichever has most)."""
    by = {(r["mode"], r["rate_rps"]): r for r in res.rows}
    out = []
    for rate in res.config.rates_rps:
        m, d = by[("mono", rate)], by[("1p1d", rate)]
        base = max((r for r in res.rows if r["rate_rps"] == rate and r["mode"] != "1p1d"),
                   key=lambda r: r["goodput_rps"])
        out.append({"rate_rps": rate, "itl_p99_mono_ms": m["itl_p99_ms"], "itl_p99_1p1d_ms": d["itl_p99_ms"],
                    "itl_p99_mono_over_1p1d": ratio(m["itl_p99_ms"], d["itl_p99_ms"]),
                    "goodput_mono_rps": m["goodput_rps"], "goodput_1p1d_rps": d["goodput_rps"],
                    "goodput_1p1d_over_mono": ratio(d["goodput_rps"], m["goodput_rps"]),
                    "ttft_p50_mono_ms": m["ttft_p50_ms"], "ttft_p50_1p1d_ms": d["ttft_p50_ms"],
                    "tpot_p50_mono_ms": m["tpot_p50_ms"], "tpot_p50_1p1d_ms": d["tpot_p50_ms"],
                    "best_baseline": base["mode"], "goodput_best_baseline_rps": base["goodput_rps"],
                    "goodput_1p1d_over_best_baseline": ratio(d["goodput_rps"], base["goodput_rps"])})
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny model, fewer requests (a few minutes)")
    p.add_argument("--out", default=None, help="JSON path (default docs/results/gains-<date>-cpu-<n>core[-quick].json)")
    p.add_argument("--machine", default=f"cpu-{len(os.sched_getaffinity(0))}core")
    a = p.parse_args()
    prof = PROFILES["quick" if a.quick else "full"]
    conv = get_workload("azure-conv-2023").scaled(prof["conv_scale"])
    short = get_workload("short-prompt").scaled(1.0, prof["short_output_scale"])
    max_model_len = get_preset(prof["model"]).max_position_embeddings
    common = {"modes": tuple(prof["modes"]), "n_requests": prof["n"], "seed": 7, "warmup_requests": 2,
                  "request_timeout_s": 600.0, "max_model_len": max_model_len}
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    factory = lab_server_factory(prof["model"])
    cal = calibrate(factory, [conv, short], max_model_len=max_model_len)
    for c in cal:
        print(f"calibration {c.workload} on mono: TTFT {c.ttft_s * 1000:,.0f} ms, TPOT {c.tpot_s * 1000:,.1f} ms, "
              f"E2E {c.e2e_s:,.2f} s -> {c.sequential_rps:.3g} req/s one at a time", flush=True)
    cfgs = [SweepConfig(w, rates_rps=c.rates(RATE_FRACTIONS), **common) for w, c in ((conv, cal[0]), (short, cal[1]))]
    results = run_sweeps(cfgs, factory)
    wall_s = time.perf_counter() - t0
    # SLOs from what mono delivers at the lowest rate (p50 x a margin), then goodput re-scored from the
    # records: on a shared machine unloaded latencies drift too much to be the yardstick.
    conv_res, short_res = [res.rescored(res.slo_from("mono", ttft_x=SLO_TTFT_X, tpot_x=SLO_TPOT_X))
                           for res in results]

    report: dict[str, object] = {
        "benchmark": "gains", "date": dt.date.today().isoformat(), "machine": a.machine,
        "cpu": platform.processor() or platform.machine(), "model": prof["model"], "quick": a.quick,
        "placement": "1p1d: prefill worker core 0, decode worker core 1; mono and mono-chunked-N: one engine on "
                     "cores 0-1; mono-dp: one engine on each core behind the router (least loaded first)",
        "modes": list(prof["modes"]),
        "rate_fractions_of_mono_sequential": RATE_FRACTIONS, "slo_rule": f"TTFT <= {SLO_TTFT_X:g}x and TPOT <= "
        f"{SLO_TPOT_X:g}x mono's p50 at the lowest rate", "calibration": [asdict(c) for c in cal],
        "requests_per_rate": prof["n"], "wall_s": round(wall_s, 1),
        "load_note": "other jobs may share the 2 cores: compare modes within this run, as ratios",
        "loadavg_1m_start_end": [round(load_start, 1), round(os.getloadavg()[0], 1)],
    }
    for name, res, w in (("conversation", conv_res, conv), ("short_prompt", short_res, short)):
        print(f"\n== {name}: {w.describe()}\n   {res.scaling_text}; SLO {res.config.slo.describe()}")
        print(table(res.rows))
        g = gains(res)
        for row in g:
            print(f"   {row['rate_rps']:>5g} req/s: p99 ITL mono/1P1D = {row['itl_p99_mono_over_1p1d']:.2f}x, "
                  f"goodput 1P1D/mono = {row['goodput_1p1d_over_mono']:.2f}x "
                  f"({row['goodput_1p1d_rps']:.3g} vs {row['goodput_mono_rps']:.3g} req/s), 1P1D/best baseline "
                  f"({row['best_baseline']}) = {row['goodput_1p1d_over_best_baseline']:.2f}x")
        report[name] = {"workload": w.describe(), "slo": res.config.slo.describe(), "rows": res.rows, "gains": g,
                        "capacity_rps": res.capacity_rps()}
    print(f"\nwall time {wall_s:.0f} s")
    out = write_result("gains", f"{a.machine}{'-quick' if a.quick else ''}", report, out=a.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
