"""Selective disaggregation on this machine: where does the best prefill threshold lie, and does the
planner find it? The Azure 2023 conversation and code mixes on 1P1D (prefill worker core 0, decode
worker core 1), swept over the prefill threshold N (0: plain 1P1D; above every prompt: the decode
core serves alone, the prefill core idles).

For each mix:
1. Calibrate: four requests one at a time through plain 1P1D give its unloaded TTFT; the rate is
   RATE_X / that TTFT, so the prefill worker is near saturation on whatever this machine does today
   (where offloading short prompts to the decode side can pay). Lengths x0.25, as the gains sweep.
2. Measure: the same requests at that rate (Poisson) through a router per threshold in front of the
   same two workers (`labkit.bench.selective.shared_1p1d`; prefix caching off). Thresholds: the
   planner's candidates (0, one past the 25/50/75% prompt lengths, one past the longest).
3. Score: goodput under TTFT <= 2 s and TPOT <= 200 ms (the planner's SLO), and under TTFT <= 2 s and
   every gap <= 200 ms; the router's count of prompts it prefilled on each side.
4. Predict: `labkit.plan.selective.best_prefill_threshold` on the lab's calibrated latency model (one
   core, fitted to the 1P1D server's steps by the newest committed plan_validation run) at the same
   rate, and at the rate that loads the model as much as this machine was loaded (the rate scaled by
   model-predicted / measured unloaded TTFT: the box may run slower today than when the model was fit).

Prints a table per mix, writes JSON (docs/results/selective-<date>-<machine>.json by default).

    python benchmarks/selective.py           # small model (about 15 minutes on 2 cores)
    python benchmarks/selective.py --quick   # tiny model, fewer requests
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from typing import Any

from labkit.bench import SLO, get_workload
from labkit.bench.selective import candidates, predict, shared_1p1d, threshold_modes, threshold_of
from labkit.bench.sweep import SweepConfig, parse_mode, run_sweeps, sequential_records
from labkit.links import Link
from labkit.models import get_preset
from labkit.plan.simulator import SLO as PlanSLO
from labkit.plan.validate import served_model
from labkit.reference import write_result

PROFILES: dict[str, dict[str, Any]] = {
    "full": {"model": "small", "n": 24, "scale": 0.25},
    "quick": {"model": "tiny", "n": 12, "scale": 0.25},
}
WORKLOADS = ("azure-conv-2023", "azure-code-2023")
RATE_X = 0.8                      # the rate: this many prompts per unloaded TTFT of plain 1P1D
SLO_TPOT = SLO(ttft_s=2.0, tpot_s=0.2)   # (b): what the planner scores
SLO_GAPS = SLO(ttft_s=2.0, itl_s=0.2)    # (a): every inter-token gap
LINK = Link.from_gbps(20.0, 1e-3)        # shared memory between the two workers, as plan_validation models it


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, fewer requests")
    ap.add_argument("--requests", type=int, default=None, help="requests per threshold")
    ap.add_argument("--rate-x", type=float, default=RATE_X, help="rate = this / plain 1P1D's unloaded TTFT")
    ap.add_argument("--machine", default=f"cpu-{len(os.sched_getaffinity(0))}core")
    ap.add_argument("--note", default="", help="a line about the run's conditions (e.g. other jobs on the box)")
    ap.add_argument("--out", default=None, help="JSON path")
    a = ap.parse_args()
    prof = PROFILES["quick" if a.quick else "full"]
    n = a.requests or prof["n"]
    model = prof["model"]
    max_model_len = get_preset(model).max_position_embeddings
    try:
        latency, model_file = served_model("1p1d", model)
    except FileNotFoundError as e:
        if not a.quick:
            print(f"selective: {e}", file=sys.stderr)
            return 2
        # a smoke run: the engine alone (LABKIT_HOME's calibration), without the server's costs
        from labkit.plan.calibrate import calibration_path, load_or_calibrate

        latency, model_file = load_or_calibrate(model, "ci").model, calibration_path(model, "ci")
    t0, load_start = time.perf_counter(), os.getloadavg()[0]
    report: dict[str, Any] = {
        "benchmark": "selective", "date": dt.date.today().isoformat(), "machine": a.machine,
        "cpu": platform.processor() or platform.machine(), "model": model, "requests_per_threshold": n,
        "length_scale": prof["scale"], "rate_rule": f"{a.rate_x:g} / plain 1P1D's unloaded TTFT",
        "placement": "prefill worker core 0, decode worker core 1 (local_prefill); one router per threshold; "
                     "prefix caching off", "slo_tpot": SLO_TPOT.describe(), "slo_gaps": SLO_GAPS.describe(),
        "latency_model": {"source": model_file.name, **latency.to_dict()}, "note": a.note,
        "load_note": "other jobs may share the 2 cores: compare thresholds within this run", "workloads": {}}
    with shared_1p1d(model) as (factory, placed):
        for name in WORKLOADS:
            w = get_workload(name).scaled(prof["scale"])
            thresholds = candidates(w, max_model_len=max_model_len)
            with factory(parse_mode("1p1d")) as url:   # unloaded: one request at a time, after a warm-up
                probe = sequential_records(url, w, 4, mode="1p1d", max_model_len=max_model_len, model=model)
            ttft_s = statistics.median(r.ttft_s for r in probe)
            # the model's own unloaded TTFT for the same prompts: how much slower the box runs today
            model_ttft_s = statistics.median(float(latency.prefill_s(r.prompt_tokens)) + latency.serve_request_s
                                             + LINK.seconds(r.prompt_tokens * latency.kv_bytes_per_token) for r in probe)
            slowdown = ttft_s / model_ttft_s
            rate = float(f"{a.rate_x / ttft_s:.3g}")
            print(f"== {name}: unloaded 1P1D TTFT {ttft_s * 1e3:,.0f} ms (the model: {model_ttft_s * 1e3:,.0f} ms) -> "
                  f"{rate:g} req/s; thresholds {thresholds}", flush=True)
            cfg = SweepConfig(w, rates_rps=(rate,), modes=threshold_modes(thresholds), n_requests=n, seed=5,
                              slo=SLO_TPOT, warmup_requests=2, request_timeout_s=600.0, max_model_len=max_model_len)
            [res] = run_sweeps([cfg], factory, model=model)
            gaps = res.rescored(SLO_GAPS)
            same = predict(w, thresholds, rate, latency, PlanSLO(2.0, 0.2), max_model_len=max_model_len, link=LINK)
            alike = predict(w, thresholds, rate * slowdown, latency, PlanSLO(2.0, 0.2), max_model_len=max_model_len,
                            link=LINK)
            rows = []
            for k, mode in enumerate(cfg.modes):
                r, g = res.rows[k], gaps.rows[k]
                recs = res.runs[(mode, rate)].records
                rows.append({"threshold": threshold_of(mode), "mode": mode,
                             "share_under_threshold": sum(x.prompt_tokens < threshold_of(mode) for x in recs)
                             / max(1, len(recs)),
                             "router_prefilled": placed.get(mode, {}),
                             "ok": r["ok"], "ttft_p50_ms": r["ttft_p50_ms"], "ttft_p99_ms": r["ttft_p99_ms"],
                             "tpot_p50_ms": r["tpot_p50_ms"], "itl_p99_ms": r["itl_p99_ms"],
                             "goodput_tpot_rps": r["goodput_rps"], "goodput_gaps_rps": g["goodput_rps"],
                             "predicted_goodput_rps": same.goodput_rps[k],
                             "predicted_goodput_same_load_rps": alike.goodput_rps[k]})
            best = max(rows, key=lambda x: (x["goodput_tpot_rps"], -x["threshold"]))
            best_gaps = max(rows, key=lambda x: (x["goodput_gaps_rps"], -x["threshold"]))
            report["workloads"][name] = {
                "workload": w.describe(), "scaling": res.scaling_text, "rate_rps": rate,
                "unloaded_ttft_ms": ttft_s * 1e3, "model_unloaded_ttft_ms": model_ttft_s * 1e3,
                "slowdown_vs_model": slowdown, "rows": rows,
                "best_threshold_measured": best["threshold"], "best_threshold_measured_gaps": best_gaps["threshold"],
                "best_threshold_predicted": same.best_threshold,
                "best_threshold_predicted_same_load": alike.best_threshold}
            print(table(rows))
            print(f"   best threshold: measured {best['threshold']} (TPOT SLO), {best_gaps['threshold']} (every gap); "
                  f"planner {same.best_threshold} at {rate:g} req/s, {alike.best_threshold} at the same load "
                  f"({rate * slowdown:.3g} req/s on the model: this box ran {slowdown:.2f}x its unloaded TTFT)",
                  flush=True)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    report["loadavg_1m_start_end"] = [round(load_start, 1), round(os.getloadavg()[0], 1)]
    suffix = "-quick" if a.quick else ""
    out = write_result("selective", f"{a.machine}{suffix}", report, out=a.out)
    print(f"wall time {report['wall_s']:.0f} s; wrote {out}")
    return 0


def table(rows: list[dict[str, Any]]) -> str:
    """One line per threshold: placement, latency, goodput measured and predicted."""
    head = (f"{'N':>6} {'<N':>5} {'on decode':>9} {'TTFT p50':>9} {'TTFT p99':>9} {'TPOT p50':>9} {'ITL p99':>8} "
            f"{'good(b)':>8} {'good(a)':>8} {'pred(b)':>8} {'pred~':>7}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['threshold']:>6} {r['share_under_threshold']:>5.0%} "
                     f"{r['router_prefilled'].get('decode', 0):>9.0f} {r['ttft_p50_ms']:>9,.0f} {r['ttft_p99_ms']:>9,.0f} "
                     f"{r['tpot_p50_ms']:>9,.0f} {r['itl_p99_ms']:>8,.0f} {r['goodput_tpot_rps']:>8.3f} "
                     f"{r['goodput_gaps_rps']:>8.3f} {r['predicted_goodput_rps']:>8.3f} "
                     f"{r['predicted_goodput_same_load_rps']:>7.3f}")
    lines.append("ms; goodput in req/s: (b) TTFT <= 2 s and TPOT <= 200 ms, (a) TTFT <= 2 s and every gap <= 200 ms; "
                 "pred: the planner at this rate, pred~: at the same load")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
