"""1P1D against fair baselines, on this machine, under two SLOs (issue 18's performance to reach).

`small`, the Azure 2023 conversation mix (lengths x0.25, as the gains sweep), at the lowest rate of
a ladder where mono's p99 inter-token latency exceeds 200 ms. The modes, the same requests in each:
- mono: one engine on both cores;
- mono-dp: one engine per core behind the router, each request to the least loaded;
- mono-chunked-256 and -512: mono with chunked prefill (the better of the two counts, per SLO);
- 1P1D: prefill worker on core 0, decode worker on core 1;
- selective 1P1D at two thresholds (the better counts, per SLO): the best one the selective sweep
  measured on this mix (docs/results/selective-*.json, when there is one) and the planner's best at
  this rate (`labkit.plan.selective.best_prefill_threshold` on the lab's calibrated model).
Goodput (requests per second meeting every bound) under (a) TTFT <= 2 s and every inter-token gap
<= 200 ms, and (b) TTFT <= 2 s and TPOT <= 200 ms; the winner of each and why, from the data (which
bound the others miss).

1. Find the rate: mono's unloaded latency (4 requests one at a time) sets a ladder of rates (fractions
   of what mono serves one at a time); PROBE_REQUESTS at each, lowest first, until p99 ITL > 200 ms.
2. Run every mode at that rate, REQUESTS requests each (mono on the same server as the probes; 1P1D
   and selective share one pair of workers, a router each: `labkit.bench.selective.shared_1p1d`).

Prints the table and the verdicts, writes JSON (docs/results/baselines-<date>-<machine>.json).
Designed to take 20-30 minutes on 2 cores.

    python benchmarks/baselines.py --note "other engineers' tests running"
    python benchmarks/baselines.py --quick    # tiny model, a few minutes: a smoke run
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

from labkit.bench import SLO, get_workload
from labkit.bench.selective import candidates, predict, shared_1p1d, threshold_modes
from labkit.bench.sweep import (
    ModeSpec,
    SweepConfig,
    SweepResult,
    fixed_url_factory,
    lab_server_factory,
    parse_mode,
    run_sweep,
    run_sweeps,
    sequential_records,
    table,
)
from labkit.config import repo_root
from labkit.links import Link
from labkit.models import get_preset
from labkit.plan.simulator import SLO as PlanSLO
from labkit.reference import write_result

PROFILES: dict[str, dict[str, Any]] = {
    "full": {"model": "small", "requests": 20, "probe_requests": 10},
    "quick": {"model": "tiny", "requests": 10, "probe_requests": 8},
}
SCALE = 0.25
LADDER = (0.15, 0.25, 0.4, 0.6, 0.9)     # x mono's one-at-a-time rate (1 / unloaded E2E)
ITL_BOUND_S = 0.2
SLOS = {"a": SLO(ttft_s=2.0, itl_s=ITL_BOUND_S), "b": SLO(ttft_s=2.0, tpot_s=0.2)}
FAMILIES = {"mono": ("mono",), "mono-dp": ("mono-dp",), "mono-chunked": ("mono-chunked-256", "mono-chunked-512"),
            "1p1d": ("1p1d",)}   # + "selective 1p1d": its thresholds, chosen at run time
LINK = Link.from_gbps(20.0, 1e-3)


def find_rate(url: str, w: Any, model: str, max_model_len: int, probe_requests: int) -> dict[str, Any]:
    """Mono's unloaded latency, then probes up the ladder until p99 ITL exceeds the bound; returns the
    rate, the probes (rate, p99 ITL ms) and why that rate."""
    seq = sequential_records(url, w, 4, mode="mono", max_model_len=max_model_len, model=model)
    e2e = statistics.median(r.e2e_s for r in seq)
    probes = []
    for k, x in enumerate(LADDER):
        rate = float(f"{x / e2e:.3g}")
        res = run_sweep(SweepConfig(w, rates_rps=(rate,), modes=("mono",), n_requests=probe_requests, seed=900 + k,
                                    warmup_requests=0, request_timeout_s=600.0, max_model_len=max_model_len,
                                    progress=False), fixed_url_factory({"mono": url}), model=model)
        itl = res.rows[0]["itl_p99_ms"]
        probes.append({"rate_rps": rate, "x_sequential": x, "itl_p99_ms": itl})
        print(f"   probe {rate:g} req/s: mono p99 ITL {itl:,.0f} ms", flush=True)
        if itl > ITL_BOUND_S * 1e3:
            why = ("the lowest rate of the ladder already exceeds it" if k == 0 else
                   f"the first rate of the ladder where it exceeds {ITL_BOUND_S * 1e3:g} ms")
            return {"rate_rps": rate, "why": why, "probes": probes, "unloaded_e2e_s": e2e,
                    "unloaded_ttft_s": statistics.median(r.ttft_s for r in seq)}
    return {"rate_rps": probes[-1]["rate_rps"], "why": "no rate of the ladder exceeded it: the highest one",
            "probes": probes, "unloaded_e2e_s": e2e, "unloaded_ttft_s": statistics.median(r.ttft_s for r in seq)}


def selective_thresholds(w: Any, rate: float, max_model_len: int, model: str) -> tuple[list[int], dict[str, Any]]:
    """Two thresholds to run: the selective sweep's measured best on this mix (the newest committed
    JSON for this model) and the planner's best at this rate; distinct, > 0 (filled from the prompt
    length quantiles when either is missing or 0). Returns (thresholds, where each came from)."""
    from labkit.plan.validate import served_model

    ts = candidates(w, max_model_len=max_model_len)
    why: dict[str, Any] = {}
    try:
        latency, source = served_model("1p1d", model)
        sweep = predict(w, ts, rate, latency, PlanSLO(2.0, 0.2), max_model_len=max_model_len, link=LINK)
        why["planner"] = {"best": sweep.best_threshold, "model": source.name,
                          "goodput_rps": dict(zip(map(str, ts), sweep.goodput_rps))}
    except FileNotFoundError as e:
        why["planner"] = {"best": None, "error": str(e)}
    found = sorted((repo_root() / "docs" / "results").glob("selective-*.json"), reverse=True)
    measured = None
    for f in found:
        doc = json.loads(f.read_text())
        if doc.get("model") == model and "-quick" not in f.stem and w.name in doc.get("workloads", {}):
            measured = doc["workloads"][w.name]["best_threshold_measured"]
            why["selective_sweep"] = {"best": measured, "file": f.name}
            break
    picked = [t for t in (measured, why["planner"]["best"]) if t]
    for t in ts[2:-1]:   # the median prompt, then the 75% one: when a source is missing or says 0
        if len(set(picked)) >= 2:
            break
        picked.append(t)
    return sorted(set(picked))[:2], why


def verdict(rows: list[dict[str, Any]], slo_key: str, families: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """The best variant of each family under one SLO, the winner, and why: how many of each family's
    requests miss each bound (TTFT, and every gap or TPOT)."""
    by = {r["mode"]: r for r in rows}
    best = {fam: max((by[m] for m in modes), key=lambda r: r[f"goodput_{slo_key}_rps"]) for fam, modes in families.items()}
    order = sorted(best, key=lambda f: -best[f][f"goodput_{slo_key}_rps"])
    win = order[0]
    other = "gap" if slo_key == "a" else "tpot"
    misses = {f: {"ttft": best[f]["miss_ttft"], other: best[f][f"miss_{other}"]} for f in order}
    w = best[win]
    losers = order[1:]
    parts = []
    for f in losers:
        m = misses[f]
        worst = max(m, key=lambda k: m[k])
        parts.append(f"{f} ({best[f]['mode']}) {best[f][f'goodput_{slo_key}_rps']:.3f} req/s, "
                     f"{m[worst]:.0%} miss {'TTFT' if worst == 'ttft' else ('a gap' if worst == 'gap' else 'TPOT')}")
    tie = len(order) > 1 and best[order[1]][f"goodput_{slo_key}_rps"] == w[f"goodput_{slo_key}_rps"]
    text = (f"{'tie: ' if tie else ''}{win} ({w['mode']}) {w[f'goodput_{slo_key}_rps']:.3f} req/s: "
            f"{misses[win]['ttft']:.0%} of its requests miss TTFT, {misses[win][other]:.0%} miss "
            f"{'a gap' if other == 'gap' else 'TPOT'} (TTFT p50 {w['ttft_p50_ms']:,.0f} ms, p99 ITL "
            f"{w['itl_p99_ms']:,.0f} ms, TPOT p50 {w['tpot_p50_ms']:,.0f} ms); " + "; ".join(parts))
    return {"winner": win, "winner_mode": w["mode"], "tie": tie, "why": text,
            "best_per_family": {f: best[f]["mode"] for f in order},
            "goodput_rps": {f: best[f][f"goodput_{slo_key}_rps"] for f in order}, "misses": misses}


def rows_of(res: SweepResult, rate: float) -> list[dict[str, Any]]:
    """Per mode: latency, goodput under both SLOs, and the share of requests missing each bound."""
    out = []
    for row in res.rows:
        recs = list(res.runs[(row["mode"], rate)].records)
        ok = [r for r in recs if r.ok]
        n = max(1, len(recs))
        d = {k: row[k] for k in ("mode", "ok", "errors", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "itl_p50_ms",
                                 "itl_p99_ms", "mean_prompt_tokens", "mean_output_tokens")}
        for key, slo in SLOS.items():
            good = sum(slo.met(r) for r in recs)
            d[f"goodput_{key}_rps"] = good / res.runs[(row["mode"], rate)].summary.duration_s
            d[f"attainment_{key}"] = good / n
        d["miss_ttft"] = (n - sum(r.ttft_s <= 2.0 for r in ok)) / n
        d["miss_gap"] = (n - sum(r.max_itl_s <= ITL_BOUND_S for r in ok)) / n
        d["miss_tpot"] = (n - sum(r.tpot_s <= 0.2 for r in ok)) / n
        out.append(d)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, fewer requests: a smoke run")
    ap.add_argument("--rate", type=float, default=None, help="skip the search: run every mode at this rate")
    ap.add_argument("--machine", default=f"cpu-{len(os.sched_getaffinity(0))}core")
    ap.add_argument("--note", default="", help="a line about the run's conditions (e.g. other jobs on the box)")
    ap.add_argument("--out", default=None, help="JSON path")
    a = ap.parse_args()
    if len(os.sched_getaffinity(0)) < 2:
        print("baselines needs 2 cores (1P1D and mono-dp put one engine on each)", file=sys.stderr)
        return 2
    prof = PROFILES["quick" if a.quick else "full"]
    model = prof["model"]
    max_model_len = get_preset(model).max_position_embeddings
    w = get_workload("azure-conv-2023").scaled(SCALE)
    t0, load_start = time.perf_counter(), os.getloadavg()[0]
    lab = lab_server_factory(model)
    print(f"== finding the rate: mono on {model}, {w.describe()}", flush=True)
    with lab(parse_mode("mono")) as mono_url:
        if a.rate:
            found: dict[str, Any] = {"rate_rps": a.rate, "why": "given (--rate)", "probes": []}
        else:
            found = find_rate(mono_url, w, model, max_model_len, prof["probe_requests"])
        rate = found["rate_rps"]
        thresholds, why_thresholds = selective_thresholds(w, rate, max_model_len, model)
        families = {**FAMILIES, "selective 1p1d": threshold_modes(thresholds)}
        modes = tuple(m for fam in families.values() for m in fam)
        print(f"== {rate:g} req/s ({found['why']}); modes {', '.join(modes)}", flush=True)
        cfg = SweepConfig(w, rates_rps=(rate,), modes=("mono",), n_requests=prof["requests"], seed=21,
                          warmup_requests=2, request_timeout_s=600.0, max_model_len=max_model_len, slo=SLOS["a"])
        mono = run_sweep(cfg, fixed_url_factory({"mono": mono_url}), model=model)
    cfg = SweepConfig(w, rates_rps=(rate,), modes=tuple(m for m in modes if m != "mono"), n_requests=prof["requests"],
                      seed=21, warmup_requests=2, request_timeout_s=600.0, max_model_len=max_model_len, slo=SLOS["a"])
    with shared_1p1d(model) as (pair, placed):
        def factory(spec: ModeSpec) -> Any:
            return pair(spec) if spec.mode == "disagg" else lab(spec)
        [rest] = run_sweeps([cfg], factory, model=model)
    res = SweepResult(cfg, mono.rows + rest.rows, {**mono.runs, **rest.runs}, mono.scaling_text)
    rows = rows_of(res, rate)
    verdicts = {k: verdict(rows, k, families) for k in SLOS}
    wall_s = time.perf_counter() - t0
    print(f"\n{res.scaling_text}; {rate:g} req/s, {prof['requests']} requests per mode")
    print(table(rows, ("mode", "ok", "ttft_p50_ms", "ttft_p99_ms", "itl_p99_ms", "tpot_p50_ms", "goodput_a_rps",
                       "goodput_b_rps", "miss_ttft", "miss_gap", "miss_tpot")))
    for k, v in verdicts.items():
        print(f"\n({k}) {SLOS[k].describe()}: winner {v['winner']}\n    {v['why']}")
    same = verdicts["a"]["winner"] == verdicts["b"]["winner"]
    print(f"\nthe winner {'is the same' if same else 'changes'} with the SLO; wall time {wall_s:.0f} s")
    report = {
        "benchmark": "baselines", "date": dt.date.today().isoformat(), "machine": a.machine,
        "cpu": platform.processor() or platform.machine(), "model": model, "quick": a.quick, "note": a.note,
        "workload": w.describe(), "scaling": res.scaling_text, "requests_per_mode": prof["requests"],
        "rate": found, "slos": {k: s.describe() for k, s in SLOS.items()}, "families": families,
        "selective_thresholds": {"run": thresholds, "from": why_thresholds},
        "router_prefilled": placed, "rows": rows, "verdicts": verdicts, "winner_changes_with_slo": not same,
        "placement": "mono, mono-chunked-N: one engine on cores 0-1; mono-dp: one engine per core; 1p1d and "
                     "selective: prefill worker core 0, decode worker core 1 (one pair, a router per threshold)",
        "load_note": "other jobs may share the 2 cores: compare modes within this run", "wall_s": round(wall_s, 1),
        "loadavg_1m_start_end": [round(load_start, 1), round(os.getloadavg()[0], 1)]}
    out = write_result("baselines", f"{a.machine}{'-quick' if a.quick else ''}", report, out=a.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
