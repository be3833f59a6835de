"""Soak: minutes of mixed load through 1P1D; zero errors, zero leaked KV blocks, RSS growth < 10%.

    python benchmarks/soak.py               # 5 minutes at 1 request/s (tiny model)
    python benchmarks/soak.py --quick       # 1 minute (CI-sized)
    python benchmarks/soak.py --minutes 30 --rate 4 --model small

Starts a router + prefill + decode (real processes, labkit.serve.launcher), sends a Poisson
stream of mixed requests with labkit.bench (chat-like short prompts, long prompts, requests
sharing a prefix), and samples every process's resident memory (psutil) and KV pool while it
runs. The first quarter of the requests is a warm-up (allocator pools, torch caches and the
prefix cache fill first); RSS growth compares idle after the soak with idle after the warm-up. After the load the pools must drain to full: a block still
in use with nothing running is a leak. Prints a table; writes
docs/results/soak-<date>-<machine>[-quick].json. Exits 1 if a check fails.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
RSS_GROWTH_LIMIT = 0.10


def mixed_requests(n: int, seed: int, max_model_len: int) -> list[Any]:
    """`n` requests: 60% chat (short prompt, medium output), 25% long prompt, 15% shared prefix."""
    from labkit.bench.workloads import build_requests

    rng = np.random.default_rng(seed)
    kinds = rng.choice(3, size=n, p=[0.6, 0.25, 0.15])
    prompt = np.where(kinds == 0, rng.integers(16, 256, n), np.where(kinds == 1, rng.integers(800, 1600, n),
                                                                       rng.integers(300, 600, n)))
    output = np.where(kinds == 1, rng.integers(4, 32, n), rng.integers(16, 128, n))
    prompt = np.minimum(prompt, max_model_len - output - 1)
    plain = build_requests(prompt, output, seed=seed)
    shared = build_requests(prompt, output, seed=seed, prefix_hit_rate=0.75, prefix_groups=3)
    return [shared[i] if kinds[i] == 2 else plain[i] for i in range(n)]


def rss_bytes(pid: int) -> int:
    """Resident memory of `pid` plus its children (bytes)."""
    p = psutil.Process(pid)
    return int(p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--quick", action="store_true", help="1 minute")
    p.add_argument("--rate", type=float, default=1.0, help="requests per second (Poisson)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--transfer", default=None, help="KV transport (default: the workers', WorkerConfig's)")
    p.add_argument("--sample-s", type=float, default=2.0, help="RSS / KV pool sampling interval")
    p.add_argument("--machine", default=f"cpu-{os.cpu_count()}core")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    minutes = 1.0 if a.quick else a.minutes
    if minutes <= 0 or a.rate <= 0:
        raise SystemExit("--minutes and --rate must be > 0")

    from labkit.bench.arrivals import Arrivals
    from labkit.bench.loadgen import LoadConfig, run_load
    from labkit.bench.metrics import jsonable
    from labkit.models import ensure_model, load_config
    from labkit.serve.launcher import default_cpu_split, launch

    ensure_model(a.model, quiet=True)
    max_len = int(load_config(a.model).get("max_position_embeddings") or 2048)
    duration_s = minutes * 60
    n = max(1, int(round(a.rate * duration_s)))
    reqs = mixed_requests(n, seed=11, max_model_len=max_len)
    cpus = default_cpu_split()
    load_before = os.getloadavg()
    srv = launch("disagg", model=a.model, transfer=a.transfer, prefill_cpus=cpus["prefill"],
                 decode_cpus=cpus["decode"])
    transfer = httpx.get(srv.workers[0].url + "/health", timeout=10).json()["transfer"]  # what the workers use
    print(f"soak: {minutes:g} min, {n} requests at {a.rate:g}/s, model {a.model}, 1P1D over {transfer} ...",
          flush=True)
    procs = [srv.router, *srv.workers]
    samples: list[dict[str, Any]] = []
    n_warm = max(1, n // 4)

    def drain() -> dict[str, int]:
        """Waits (bounded) until nothing runs; returns each worker's KV blocks still in use."""
        used: dict[str, int] = {}
        for w in srv.workers:
            deadline = time.monotonic() + 30
            while True:
                h = httpx.get(w.url + "/health", timeout=10).json()
                if (h["kv_blocks_used"] == 0 and h["running_requests"] == 0) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            used[w.name] = int(h["kv_blocks_used"])
        time.sleep(1.0)  # let the router settle its own per-request state too
        return used

    try:
        start_rss = {x.name: rss_bytes(x.pid) for x in procs}
        # warm-up: the first quarter of the same mix at the same rate; then idle RSS is the baseline
        warm_cfg = LoadConfig(srv.url, arrivals=Arrivals("poisson", a.rate), request_timeout_s=120.0,
                              progress=False, label="soak-warmup", seed=10)
        warm = run_load(warm_cfg, reqs[:n_warm], workload="soak-mixed")
        drain()
        warm_rss = {x.name: rss_bytes(x.pid) for x in procs}
        cfg = LoadConfig(srv.url, arrivals=Arrivals("poisson", a.rate), request_timeout_s=120.0, progress=False,
                         label="soak", seed=11)
        box: dict[str, Any] = {}
        th = threading.Thread(target=lambda: box.update(result=run_load(cfg, reqs[n_warm:], workload="soak-mixed")),
                              daemon=True)
        t0 = time.monotonic()
        th.start()
        while th.is_alive():
            th.join(a.sample_s)
            row: dict[str, Any] = {"t_s": round(time.monotonic() - t0, 2)}
            for x in procs:
                row[f"rss_{x.name}"] = rss_bytes(x.pid)
            for w in srv.workers:
                h = httpx.get(w.url + "/health", timeout=10).json()
                row[f"kv_used_{w.name}"] = h["kv_blocks_used"]
                row[f"running_{w.name}"] = h["running_requests"]
            samples.append(row)
            if time.monotonic() - t0 > duration_s + 300:
                raise RuntimeError("the load generator did not finish 5 minutes after the last arrival")
        result = box["result"]
        leaked = drain()
        end_rss = {x.name: rss_bytes(x.pid) for x in procs}
        pids_same = all(x.alive() for x in procs)
    finally:
        srv.stop()

    s = result.summary
    rows = []
    for x in procs:
        base = warm_rss[x.name]
        peak = max([int(r[f"rss_{x.name}"]) for r in samples] or [end_rss[x.name]])
        growth = (end_rss[x.name] - base) / base
        rows.append({"process": x.name, "role": x.role, "pid": x.pid, "rss_start_mib": start_rss[x.name] / 2**20,
                     "rss_warm_mib": base / 2**20, "rss_end_mib": end_rss[x.name] / 2**20,
                     "rss_peak_mib": peak / 2**20, "rss_growth": growth})
    sent = s.sent + warm.summary.sent
    ok = s.ok + warm.summary.ok
    errors = s.errors + warm.summary.errors
    checks = {"zero_errors": errors == 0, "count_holds": sent == ok + errors == n,
              "zero_leaked_blocks": all(v == 0 for v in leaked.values()),
              "rss_growth_under_10pct": all(r["rss_growth"] < RSS_GROWTH_LIMIT for r in rows),
              "processes_alive": pids_same}

    flat = s.flat()
    print(f"\nwarm-up: {warm.summary.sent} requests, {warm.summary.errors} errors; soak: sent {s.sent}, ok {s.ok}, "
          f"errors {s.errors} in {s.duration_s:.0f} s "
          f"({s.request_throughput_rps:.2f} req/s, {s.output_throughput_tps:.0f} output tok/s); "
          f"TTFT p50 {flat.get('ttft_p50_ms', float('nan')):.0f} ms p99 {flat.get('ttft_p99_ms', float('nan')):.0f} ms; "
          f"ITL p50 {flat.get('itl_p50_ms', float('nan')):.1f} ms")
    print(f"leaked KV blocks after drain: {leaked}; RSS growth: idle after the soak vs idle after the warm-up")
    print(f"{'process':<10}{'pid':>8}{'start MiB':>11}{'warm MiB':>10}{'end MiB':>9}{'peak MiB':>10}{'growth':>9}")
    for r in rows:
        print(f"{r['process']:<10}{r['pid']:>8}{r['rss_start_mib']:>11.1f}{r['rss_warm_mib']:>10.1f}"
              f"{r['rss_end_mib']:>9.1f}{r['rss_peak_mib']:>10.1f}{r['rss_growth']:>+9.1%}")
    print("checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks.items()))

    date = dt.date.today().isoformat()
    suffix = "-quick" if a.quick else ""
    out = Path(a.out) if a.out else ROOT / "docs" / "results" / f"soak-{date}-{a.machine}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "soak", "date": date, "machine": a.machine, "model": a.model, "transfer": transfer,
              "minutes": minutes, "rate_rps": a.rate, "requests": n, "loadavg_before": load_before,
              "loadavg_after": os.getloadavg(), "summary": flat, "first_errors": result.meta["first_errors"],
              "warmup_requests": n_warm, "warmup_summary": warm.summary.flat(), "totals": {"sent": sent, "ok": ok,
              "errors": errors}, "leaked_kv_blocks": leaked,
              "processes": rows, "checks": checks, "samples": samples}
    out.write_text(json.dumps(jsonable(report), indent=1, default=str))
    print(f"wrote {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
