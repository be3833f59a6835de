"""Router policies side by side: one prefix-heavy trace replayed on 2P1D, the same requests for every policy.

    python benchmarks/router_policies.py              # tiny, 64 requests, the five registered policies
    python benchmarks/router_policies.py --quick      # 16 requests, 3 policies (a smoke run)
    python benchmarks/router_policies.py --policies prefix-then-load "dynamo-cost:overlap_weight=0"

The trace: the `mooncake-conv` workload (labkit.bench.workloads: Mooncake's published means, 12,035
prompt and 343 output tokens, and its 36.6% of prefix blocks seen before), with the shared prefixes
spread over `--groups` groups (an assumption: the paper publishes the share, not how many distinct
prefixes carry it), lengths scaled to fit `--max-model-len`, Poisson arrivals at `--rate`. Every
policy gets the very same requests at the very same times (one seed).

Per policy: two fresh prefill workers (cold caches; one core each) and a router with that policy in
front of them and of one decode worker (both cores, kept across policies: its cache plays no part).
Each prefill worker's KV pool is `--kv-mb` MB: room for about half of the groups' prefixes beside
the prompts in flight, so where a policy sends a prefix decides whether it is still cached (the run
prints what every prefix takes).

Per policy: the prefix-cache hit rate (prompt tokens the prefill workers' engines served from their
caches, from each request's waterfall), TTFT p50/p99 as the client saw it, requests per prefill
worker and the balance (busiest worker over the mean), and the waterfall's median and p99 stacks.
Prints a table; writes docs/results/router_policies-<date>-<machine>.json; `--plot PATH` saves the
chart (labkit.plots.serving.plot_router_policies). Measured on a shared machine: compare the
policies within one run, not across runs.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POLICIES = ("round-robin", "least-load", "prefix-then-load", "dynamo-cost", "sglang-cache-aware")


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="16 requests, three policies")
    p.add_argument("--policies", nargs="+", default=None, help="policy specs (labkit.serve.routing)")
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--rate", type=float, default=3.0, help="Poisson arrivals per second")
    p.add_argument("--groups", type=int, default=16, help="distinct shared prefixes")
    p.add_argument("--max-model-len", type=int, default=1024, help="lengths are scaled to fit this context")
    p.add_argument("--kv-mb", type=float, default=8.0, help="each prefill worker's KV pool, MB")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--machine", default=f"cpu-{len(os.sched_getaffinity(0))}core")
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None, help="also save the chart here (PNG)")
    a = p.parse_args()
    policies = a.policies or (("round-robin", "prefix-then-load", "dynamo-cost") if a.quick else DEFAULT_POLICIES)
    n = a.requests or (16 if a.quick else 64)

    from labkit.bench.workloads import get_workload, sample_requests
    from labkit.serve.routing import load_policy

    for spec in policies:
        load_policy(spec)   # a bad spec fails now, not after minutes of runs
    workload = dataclasses.replace(get_workload("mooncake-conv"), prefix_groups=a.groups)
    sampled = sample_requests(workload, n, seed=a.seed, max_model_len=a.max_model_len)
    footprint_mb = prefix_footprint_bytes(sampled.requests) / 1e6
    print(f"every group's longest shared prefix takes {footprint_mb:.1f} MB of KV; each prefill worker has {a.kv_mb:g} MB")
    load_before = os.getloadavg()
    runs = run_policies(policies, sampled.requests, a)
    rows = [row(spec, res) for spec, res in runs.items()]
    print(f"\n{workload.describe()}; {sampled.scaling.describe()}")
    print(f"{n} requests, Poisson {a.rate:g}/s, 2P1D tiny, {a.kv_mb:g} MB KV per prefill worker; measured on a "
          f"shared, busy {a.machine} box (load {load_before[0]:.1f} before)")
    print(table(rows))
    out = Path(a.out) if a.out else ROOT / "docs" / "results" / (
        f"router_policies-{dt.date.today().isoformat()}-{a.machine}{'-quick' if a.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    from labkit.bench.metrics import jsonable

    out.write_text(json.dumps(jsonable({
        "benchmark": "router_policies", "model": "tiny", "machine": a.machine, "topology": "2P1D",
        "workload": workload.describe(), "workload_source": workload.source, "scaling": sampled.scaling.describe(),
        "requests": n, "rate_rps": a.rate, "groups": a.groups, "kv_mb_per_prefill_worker": a.kv_mb, "seed": a.seed,
        "prefix_footprint_mb": footprint_mb,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "load_note": "measured while other engineers' jobs shared the 2 cores", "rows": rows,
        "records": {spec: [r.row() for r in res.records] for spec, res in runs.items()}}), indent=1))
    print(f"wrote {out}")
    if a.plot:
        from labkit.plots.serving import plot_router_policies
        from labkit.plots.style import save

        print(f"wrote {save(plot_router_policies(rows), a.plot)}")
    return 0


def prefix_footprint_bytes(requests: list[Any], block_size: int = 16) -> int:
    """KV bytes of every group's longest shared prefix (whole blocks of `block_size`), on `tiny`."""
    from labkit.kv import kv_bytes_per_token
    from labkit.models import load_config

    mc = load_config("tiny")
    per_token = kv_bytes_per_token(mc["num_hidden_layers"], mc["num_key_value_heads"], mc["head_dim"], "float32")
    longest: dict[int, int] = {}
    for r in requests:
        longest[r.prefix_group] = max(longest.get(r.prefix_group, 0), r.shared_prefix_tokens)
    return sum(t // block_size * block_size for t in longest.values()) * per_token


def run_policies(policies: tuple[str, ...] | list[str], requests: list[Any], a: argparse.Namespace) -> dict[str, Any]:
    """Each policy's BenchResult: fresh prefill workers and a router per policy, one decode worker for all."""
    from tqdm.auto import tqdm

    from labkit.bench.arrivals import Arrivals
    from labkit.bench.loadgen import LoadConfig, run_load
    from labkit.serve.launcher import new_kv_token, start_router, start_worker, stop_all

    token = new_kv_token()
    common = {"model": "tiny", "kv_token": token, "startup_timeout_s": 300}
    decode = start_worker("decode", name="decode0", cpus=[0, 1], **common)
    runs: dict[str, Any] = {}
    try:
        for spec in tqdm(policies, desc="policies"):
            with concurrent.futures.ThreadPoolExecutor(2) as ex:
                futs = [ex.submit(start_worker, "prefill", name=f"prefill{i}", cpus=[i],
                                  kv_cache_bytes=int(a.kv_mb * 1e6), **common) for i in range(2)]
                concurrent.futures.wait(futs)
            prefills = [f.result() for f in futs if f.exception() is None]
            router = None
            try:
                for f in futs:
                    f.result()
                router = start_router(prefill=prefills, decode=[decode], prefill_policy=spec)
                cfg = LoadConfig(router.url, arrivals=Arrivals("poisson", a.rate), seed=a.seed, model="tiny",
                                 request_timeout_s=300, label=spec, progress=False)
                runs[spec] = run_load(cfg, requests, workload="mooncake-conv")
                time.sleep(0.5)
            finally:
                stop_all([x for x in (router, *prefills) if x is not None])
    finally:
        stop_all([decode])
    return runs


def row(spec: str, res: Any) -> dict[str, Any]:
    """One policy's headline numbers (TTFT as the client saw it; hits and placement from the waterfalls)."""
    from labkit.bench.waterfall import prefix_hit_rate, requests_per_upstream, waterfall_stacks

    s = res.summary.flat()
    per = requests_per_upstream(res.records)
    counts = list(per.values()) + [0] * (2 - len(per))
    return {"policy": spec, "ok": s["ok"], "errors": s["errors"], "prefix_hit_rate": prefix_hit_rate(res.records),
            "ttft_p50_ms": s["ttft_p50_ms"], "ttft_p99_ms": s["ttft_p99_ms"], "ttft_mean_ms": s["ttft_mean_ms"],
            "requests_per_worker": per, "balance_max_over_mean": max(counts) / (sum(counts) / len(counts))
            if sum(counts) else None, "kv_flagged": s["kv_flagged"], "waterfall_ms": waterfall_stacks(res.records)}


def table(rows: list[dict[str, Any]]) -> str:
    cols = ("policy", "hit %", "TTFT p50 ms", "TTFT p99 ms", "per worker", "max/mean", "queue p50 ms", "errors")
    lines = ["  ".join(f"{c:>14}" if i else f"{c:<34}" for i, c in enumerate(cols))]
    for r in rows:
        per = "/".join(str(v) for v in r["requests_per_worker"].values())
        queue = r["waterfall_ms"].get("p50", {}).get("queue_ms", float("nan"))
        vals = (f"{100 * r['prefix_hit_rate']:.1f}", f"{r['ttft_p50_ms']:.0f}", f"{r['ttft_p99_ms']:.0f}", per,
                f"{r['balance_max_over_mean']:.2f}", f"{queue:.0f}", str(r["errors"]))
        lines.append(f"{r['policy']:<34}" + "".join(f"  {v:>14}" for v in vals))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
