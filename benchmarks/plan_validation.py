"""Does the planner's simulator predict what the real servers do? Mono and 1P1D on this machine.

1. Calibrate the latency model the way the servers run: on all cores (mono's worker) right before
   the mono runs, pinned to one core (each 1P1D worker: prefill on core 0, decode on core 1) right
   before the 1P1D runs.
2. Run the lab's servers (`labkit.serve.launcher` via `labkit.bench.sweep`) at three request rates
   with the benchmark client, mono then 1P1D, the same requests in both.
3. Before each mode's measured runs, send 4 requests one at a time through its server with every
   worker logging its steps: the decode formula is moved to the steps the server ran
   (`fit_server_steps`: on 2 cores the server's threads and processes take time from the
   model's), and what remains per request (HTTP, routing, first SSE event) and per step becomes
   part of the model (`serving_overhead`).
4. Replay each run's exact trace (send times, lengths) in the simulator and compare p50 and p99
   of TTFT, TPOT and ITL and output throughput, predicted against measured: the report card
   (`labkit.plan.card`). Targets: every p50 within 10%, every p99 within 20%, throughput within 10%.

Prints the card, writes JSON (docs/results/plan_validation-<date>-<machine>.json by default) with
the rows and the card, which notebook 06 shows. `--modes` takes any mode the lab's servers run
(`labkit.bench.sweep.parse_mode`; the simulator's layout for each: `labkit.plan.validate.mode_layout`):
mono-dp (one engine per core behind the router; the simulator spreads requests by load, as the router
does) and selective 1P1D (`1p1d-selective` with `--prefill-threshold N`, or `1p1d-selective-N`) fill
the card's slots of those names. vLLM's servers behind the lab's router (`vllm-pd`: 1P1D over NIXL,
`vllm-mono`) write no step log: their model is fitted to a probe of requests sent one at a time and
all together, with the KV link NIXL achieved in that probe (`labkit.plan.validate.measure_and_compare_vllm`).
`--add-to FILE` adds this run's modes to the card of an earlier run of the same requests.

    python benchmarks/plan_validation.py --requests 24   # small model (the committed run: 1,469 s on 2 cores)
    python benchmarks/plan_validation.py --requests 4 --out /tmp/pv.json   # end to end, fewer requests: a smoke run
    python benchmarks/plan_validation.py --quick         # tiny model
    python benchmarks/plan_validation.py --quick --modes mono,mono-dp,1p1d,1p1d-selective --prefill-threshold 64
    python benchmarks/plan_validation.py --modes vllm-pd --add-to docs/results/plan_validation-2026-12-07-cpu-2core.json
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from labkit.bench import SLO
from labkit.bench.metrics import jsonable
from labkit.bench.sweep import parse_mode
from labkit.config import repo_root
from labkit.links import Link
from labkit.plan.latency_model import Calibration
from labkit.plan.validate import (
    VLLM_SWEEP_NAMES,
    check_same_run,
    measure_and_compare,
    measure_and_compare_vllm,
    merge_results,
    mode_layout,
    report_card,
    rows_of,
    server_mode,
)
from labkit.proc import owned_preexec
from labkit.vllm.launch import install_hint, vllm_available

PROFILES = {
    "full": {"model": "small", "profile": "full", "n": 16, "scale": 0.25, "rates": (0.2, 0.4, 0.7),
             "slo": SLO(ttft_s=4.0, tpot_s=0.25)},
    "quick": {"model": "tiny", "profile": "ci", "n": 12, "scale": 0.25, "rates": (2.0, 4.0, 8.0),
              "slo": SLO(ttft_s=1.0, tpot_s=0.05)},
}


def calibrate_pinned(model: str, profile: str, cpus: list[int], out: Path, timeout_s: float = 900.0) -> Calibration:
    """Runs `python -m labkit.plan.calibrate` pinned to `cpus` with one torch thread per core."""
    env = {**os.environ, "OMP_NUM_THREADS": str(len(cpus)), "MKL_NUM_THREADS": str(len(cpus))}
    argv = [sys.executable, "-m", "labkit.plan.calibrate", "--model", model, "--profile", profile,
            "--out", str(out), "--threads", str(len(cpus))]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout_s, check=False,
                          preexec_fn=owned_preexec(cpus))  # pinned, and ends if this script is killed
    if proc.returncode != 0:
        raise RuntimeError(f"calibration on cpus {cpus} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return Calibration.load(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, fewer requests")
    ap.add_argument("--rates", type=float, nargs="*", default=None, help="request rates (req/s)")
    ap.add_argument("--requests", type=int, default=None, help="requests per rate")
    ap.add_argument("--link-gbps", type=float, default=20.0, help="shared-memory KV transfer, Gbit/s")
    ap.add_argument("--link-latency-ms", type=float, default=1.0, help="per-transfer latency, ms")
    ap.add_argument("--modes", default="mono,1p1d", help="serving modes, comma-separated (mono, 1p1d, mono-dp, "
                    "1p1d-selective where the servers offer them)")
    ap.add_argument("--prefill-threshold", type=int, default=0, help="tokens, for 1p1d-selective")
    ap.add_argument("--calibration-timeout-s", type=float, default=1800.0,
                    help="give up on a calibration after this long (on a busy 2-core box `small` took over 900 s)")
    ap.add_argument("--out", default=None, help="JSON path (with --add-to: default that file)")
    ap.add_argument("--add-to", default=None, help="a validation JSON of the same requests and model: this run's "
                    "modes are added to its card (a mode in both: this run replaces it)")
    a = ap.parse_args()
    prof = PROFILES["quick" if a.quick else "full"]
    rates = tuple(a.rates) if a.rates else prof["rates"]
    n = a.requests or prof["n"]
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        print("plan_validation needs 2 cores (prefill and decode each get one)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    link = Link.from_gbps(a.link_gbps, a.link_latency_ms / 1e3)
    machine = f"cpu-{len(cores)}core"
    same_run = {"model": prof["model"], "machine": machine, "workload": "azure-conv-2023",
                "length_scale": prof["scale"], "rates_rps": list(rates), "requests_per_rate": n}
    earlier: dict[str, Any] = {}   # the --add-to card, read once
    try:   # the names the servers run under ("1p1d-selective" takes the threshold into its name)
        modes = [server_mode(m, a.prefill_threshold) for m in a.modes.split(",") if m]
        for m in modes:
            mode_layout(m)
        if a.add_to:   # before the run, not after it: these requests must be the ones already on that card
            earlier = json.loads(Path(a.add_to).read_text())
            check_same_run(earlier, same_run)
    except (ValueError, OSError) as e:
        print(f"plan_validation: {e}", file=sys.stderr)
        return 2
    if any(m in VLLM_SWEEP_NAMES for m in modes) and not vllm_available():
        print(f"plan_validation: vLLM's modes need vLLM here: {install_hint()}", file=sys.stderr)
        return 2
    rows, cals = [], {}
    serving: dict[str, tuple[float, float, float]] = {}   # mode -> the server's costs (serving_overhead)
    fitted: dict[str, Any] = {}                            # mode -> the model refitted to the server's steps
    links: dict[str, Link] = {}                            # vLLM P/D -> the link NIXL achieved in the probe
    # Calibrate right before measuring each mode: other work on a shared machine changes step times
    # from one minute to the next, and the model must describe the machine the servers ran on.
    for mode in modes:
        if mode in VLLM_SWEEP_NAMES:   # vLLM writes no step log: its model is fitted from requests
            print(f"== measuring {mode} at {rates} req/s, {n} requests each (its model: from a probe of requests)")
            rows += measure_and_compare_vllm(prof["model"], rates_rps=rates, n_requests=n, scale=prof["scale"],
                                             slo=prof["slo"], modes=(mode,), fitted=fitted, serving=serving,
                                             links=links)
            print(f"   {mode}: fitted to the probe\n{fitted[mode].describe()}")
            if mode in links:
                print(f"   {mode}: KV over NIXL at {links[mode].bytes_per_s / 1e9:.3f} GB/s in the probe")
            continue
        # one engine on every core (mono), or one engine per core (each 1P1D worker, each mono-dp replica)
        spec = parse_mode(mode)
        cpus = cores if spec.mode == "mono" and spec.replicas == 1 else cores[:1]
        print(f"== calibrating {prof['model']} on cores {cpus} (each {mode} engine)")
        with tempfile.TemporaryDirectory() as tmp:
            cals[mode] = calibrate_pinned(prof["model"], prof["profile"], cpus, Path(tmp) / "cal.json",
                                          timeout_s=a.calibration_timeout_s)
        print(cals[mode].model.describe())
        print(f"== measuring {mode} at {rates} req/s, {n} requests each")
        rows += measure_and_compare(prof["model"], cals[mode].model, cals[mode].model, rates_rps=rates,
                                    n_requests=n, scale=prof["scale"], link=link, slo=prof["slo"], modes=(mode,),
                                    serving=serving, fitted=fitted, prefill_threshold=a.prefill_threshold)
        req_s, tok_s, seq_s = serving[mode]
        print(f"   {mode}: moved to the server's steps during the probe\n{fitted[mode].describe()}")
        print(f"   {mode} server, beyond those steps: +{req_s * 1e3:.0f} ms per request, "
              f"+{tok_s * 1e3:.1f} ms per decode step + {seq_s * 1e3:.1f} ms per running sequence")
    card = report_card(rows)
    print("\nThe simulator's report card (error = predicted / measured - 1)")
    print(card.table())
    print(f"({time.perf_counter() - t0:.0f} s; other work on this machine adds noise)")

    date = dt.date.today().isoformat()
    suffix = "-quick" if a.quick else ""   # a smoke run: never the card notebook 06 shows (latest_result skips it)
    out = Path(a.out) if a.out else Path(a.add_to) if a.add_to else repo_root() / "docs" / "results" / f"plan_validation-{date}-{machine}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"what": "simulator vs measured: p50/p99 TTFT, TPOT and ITL, output tokens/s, per mode; the report card",
           "date": date, "cpu": platform.processor() or platform.machine(), "modes": modes, **same_run,
           "link": {"bytes_per_s": link.bytes_per_s, "fixed_s": link.fixed_s},
           "latency_model": {m: c.model.to_dict() for m, c in cals.items()},
           "calibration": {m: {"prefill": [vars_(s) for s in c.prefill_samples],
                               "decode": [vars_(s) for s in c.decode_samples]} for m, c in cals.items()},
           "latency_model_in_server": {m: v.to_dict() for m, v in fitted.items()},
           "serving_overhead_s": {m: {"per_request": v[0], "per_decode_step": v[1], "per_sequence_per_step": v[2]}
                                  for m, v in serving.items()},
           "kv_link_measured": {m: {"bytes_per_s": v.bytes_per_s, "fixed_s": v.fixed_s} for m, v in links.items()},
           "rows": [r.as_dict() for r in rows], "report_card": card.to_dict(),
           "seconds": time.perf_counter() - t0}
    if a.add_to:
        try:
            doc = merge_results(earlier, doc)
        except ValueError as e:
            print(f"plan_validation: {e}", file=sys.stderr)
            return 2
        print("\nThe card with the runs already in " + a.add_to)
        print(report_card(rows_of(doc)).table())
    out.write_text(json.dumps(jsonable(doc), indent=1))
    print(f"wrote {out}")
    return 0


def vars_(sample: object) -> dict[str, float]:
    return {k: getattr(sample, k) for k in sample.__slots__}  # type: ignore[attr-defined]


if __name__ == "__main__":
    raise SystemExit(main())
