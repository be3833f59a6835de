"""Lab mono, lab 1P1D, vLLM mono, vLLM P/D (NixlConnector): one workload, one seed, one table.

Every mode sits behind the lab's router (vLLM's through `--backend vllm`), so one load generator
and one URL shape measure all four. On a 2-core CPU: 1P1D puts prefill on core 0 and decode on
core 1 (lab and vLLM alike), mono uses both. Each mode gets fresh servers; the seed picks the
requests (a fresh seed per run avoids nothing here, as no server outlives its mode). Also
records the decode server's NIXL totals of the vLLM P/D run and the lab-vs-vLLM greedy check.

    python benchmarks/vllm_compare.py            # tiny model, 3 rates x 24 requests (~10 min on 2 cores)
    python benchmarks/vllm_compare.py --quick    # 1 rate x 8 requests (~4 min)

Writes docs/results/vllm_compare-<date>-<machine>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import sys
import time

from labkit.bench import SLO, get_workload
from labkit.bench.sweep import SweepConfig, table
from labkit.reference import write_result
from labkit.vllm.bench import compare_modes
from labkit.vllm.launch import VllmServerConfig, install_hint, launch, vllm_available, vllm_version

COLUMNS = ("mode", "rate_rps", "ok", "errors", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms",
           "tpot_p50_ms", "goodput_rps", "output_tps_per_device")


def greedy_rows(model: str, n: int, seed: int, max_model_len: int) -> list[dict]:
    from labkit.vllm.greedy import check_greedy

    rng = random.Random(seed)
    prompts = [[256] + [rng.randrange(256) for _ in range(rng.randrange(32, 400))] for _ in range(n)]
    server = launch(VllmServerConfig(model=model, max_model_len=max_model_len))
    try:
        return [g.as_row() for g in check_greedy(server.url, prompts, 32, model=model)]
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one rate, 8 requests")
    p.add_argument("--model", default="tiny")
    p.add_argument("--seed", type=int, default=int(time.time()) % 100_000,
                   help="requests' seed (default: from the clock, so repeated runs differ)")
    p.add_argument("--machine", default=f"cpu-{len(os.sched_getaffinity(0))}core")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    if not vllm_available():
        print(install_hint(), file=sys.stderr)
        return 2
    max_model_len = 1024
    cfg = SweepConfig(get_workload("azure-conv-2023").scaled(0.25),
                      rates_rps=(2.0,) if a.quick else (1.0, 2.0, 4.0), n_requests=8 if a.quick else 24,
                      seed=a.seed, slo=SLO(ttft_s=1.0, tpot_s=0.1), max_model_len=max_model_len,
                      warmup_requests=2, request_timeout_s=300)
    t0 = time.perf_counter()
    cmp = compare_modes(cfg, model=a.model, vllm_base=VllmServerConfig(model=a.model, max_model_len=max_model_len,
                                                                      max_num_seqs=32))
    greedy = greedy_rows(a.model, 4, a.seed, max_model_len)
    wall_s = time.perf_counter() - t0
    print(table(cmp.rows, COLUMNS))
    for mode, st in cmp.nixl.items():
        print(f"{mode}: {st.transfers:.0f} NIXL reads, {st.mean_bytes / 2**20:.2f} MiB and "
              f"{st.mean_xfer_time_s * 1e3:.1f} ms each ({st.bandwidth_gbps:.3f} GB/s), {st.failed_transfers:.0f} failed")
    print("greedy equality:", all(g["equal"] for g in greedy), [g["near_ties"] for g in greedy])
    report = {"benchmark": "vllm_compare", "date": dt.date.today().isoformat(), "machine": a.machine,
              "cpu": platform.processor() or platform.machine(), "load_avg_1m_at_end": os.getloadavg()[0],
              "vllm": vllm_version(), "model": a.model, "seed": a.seed, "quick": a.quick, "wall_s": wall_s,
              "workload": cfg.workload_obj.describe(), "slo": {"ttft_s": cfg.slo.ttft_s, "tpot_s": cfg.slo.tpot_s},
              "cores": {"mono": "all", "1p1d": "prefill core 0, decode core 1"},
              "rows": cmp.rows, "nixl": {m: s.as_dict() for m, s in cmp.nixl.items()}, "greedy": greedy}
    out = write_result("vllm_compare", f"{a.machine}{'-quick' if a.quick else ''}", report, out=a.out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
