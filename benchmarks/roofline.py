#!/usr/bin/env python
"""Benchmark: prefill MFU and decode MBU of the `small` preset, as ratios to this machine's own roofs.

Targets (issue 3), on a CPU in fp32: prefill of 512 tokens at MFU >= 0.5 of the measured matmul
peak; batch-1 decode at MBU >= 0.75 of the measured read bandwidth.

Other processes may share the machine, so the roof and the workload are measured back to back
in several rounds (matmul peak, prefill, read bandwidth, decode), and each round's ratio is kept:
the median ratio is the figure, the spread says how noisy the machine was. Each runner is
measured: transformers, and the lab's engine when `labkit.engine` is present.

    python benchmarks/roofline.py [--model small] [--rounds 3] [--out docs/results/...json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from labkit import hardware, measure  # noqa: E402
from labkit.runners import make_runner  # noqa: E402

TARGET_MFU, TARGET_MBU = 0.5, 0.75


def bench_runner(kind: str, model: str, dtype: str, device: str, prompt_len: int, context_len: int,
                 rounds: int) -> dict:
    runner = make_runner(kind, model, dtype, device)
    rows = []
    for i in range(rounds):
        # Median and best (fastest) run of each: on a shared machine the best runs of the roof and of the
        # workload are the least disturbed, so best/best estimates the quiet-machine ratio.
        peak = hardware.measure_matmul_flops(dtype, device, repeats=5)
        peak_best = hardware.measure_matmul_flops(dtype, device, repeats=5, stat="best")
        pre = measure.measure_prefill(runner, 1, prompt_len, warmup=1, repeats=5)
        read = hardware.measure_read_bandwidth(device, repeats=5)
        read_best = hardware.measure_read_bandwidth(device, repeats=5, stat="best")
        dec = measure.measure_decode(runner, 1, context_len, warmup=2, repeats=15)
        pre_best = pre["flops"] / (pre["ms_min"] / 1e3)
        dec_best = dec["bytes"] / (dec["ms_min"] / 1e3)
        rows.append({"round": i, "peak_flops": peak, "peak_flops_best": peak_best, "read_bytes_per_s": read,
                     "read_bytes_per_s_best": read_best, "prefill_ms": pre["ms"], "prefill_ms_min": pre["ms_min"],
                     "decode_ms": dec["ms"], "decode_ms_min": dec["ms_min"],
                     "mfu": pre["achieved_flops_per_s"] / peak, "mbu": dec["achieved_bytes_per_s"] / read,
                     "mfu_best": pre_best / peak_best, "mbu_best": dec_best / read_best})
        r = rows[-1]
        print(f"  {kind} round {i}: MFU {r['mfu']:.2f} (best/best {r['mfu_best']:.2f}) of {peak_best / 1e9:.1f} GFLOP/s"
              f" | MBU {r['mbu']:.2f} (best/best {r['mbu_best']:.2f}) of {read_best / 1e9:.1f} GB/s", flush=True)
    runner.close()
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    return {"runner": runner.name, "rounds": rows, "mfu": med("mfu"), "mbu": med("mbu"),
            "mfu_best": med("mfu_best"), "mbu_best": med("mbu_best"),
            "peak_flops_best": med("peak_flops_best"), "read_bytes_per_s_best": med("read_bytes_per_s_best"),
            "mfu_range": [min(r["mfu"] for r in rows), max(r["mfu"] for r in rows)],
            "mbu_range": [min(r["mbu"] for r in rows), max(r["mbu"] for r in rows)],
            "peak_flops": med("peak_flops"), "read_bytes_per_s": med("read_bytes_per_s"),
            "prefill_ms": med("prefill_ms"), "decode_ms": med("decode_ms")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--context-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's choice). Under load from other processes, 1 thread avoids "
                         "the barrier stalls that hit many small multi-threaded ops harder than one big kernel")
    ap.add_argument("--runners", nargs="+", default=["transformers", "engine"])
    ap.add_argument("--machine", default=None, help="machine tag for the file name (default cpu-<cores>core or the GPU)")
    ap.add_argument("--out", default=None, help="JSON path (default docs/results/roofline-<date>-<machine>.json)")
    args = ap.parse_args()
    device = args.device or hardware.default_device()
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    machine = args.machine or (f"cpu-{os.cpu_count()}core" if device == "cpu"
                               else hardware.device_name(device).replace(" ", "-"))
    print(f"roofline benchmark: {args.model} {dtype} on {hardware.device_name(device)} ({device}, "
          f"{torch.get_num_threads()} threads), {args.rounds} rounds", flush=True)
    os.environ.setdefault("TQDM_DISABLE", "1")
    results = []
    for kind in args.runners:
        try:
            results.append(bench_runner(kind, args.model, dtype, device, args.prompt_len, args.context_len, args.rounds))
        except ImportError as e:
            print(f"  {kind}: skipped ({e})")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\n{'runner':<15}{'prefill MFU':>12}{'best/best':>10}{'target':>8}{'decode MBU':>12}{'best/best':>10}"
          f"{'target':>8}   relative to (median of rounds)")
    for r in results:
        print(f"{r['runner']:<15}{r['mfu']:>12.2f}{r['mfu_best']:>10.2f}{TARGET_MFU:>8.2f}{r['mbu']:>12.2f}"
              f"{r['mbu_best']:>10.2f}{TARGET_MBU:>8.2f}   "
              f"{r['peak_flops_best'] / 1e9:.0f} GFLOP/s {dtype} matmul, {r['read_bytes_per_s_best'] / 1e9:.1f} GB/s read; "
              f"prefill {args.prompt_len} tok {r['prefill_ms']:.0f} ms, decode b=1 ctx {args.context_len} "
              f"{r['decode_ms']:.1f} ms/token")
    print(f"load average during the run: {load}")
    suffix = f"-{args.threads}t" if args.threads else ""
    out = Path(args.out or f"docs/results/roofline-{dt.date.today().isoformat()}-{machine}{suffix}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "roofline", "model": args.model, "dtype": dtype, "device": device,
                               "device_name": hardware.device_name(device), "threads": torch.get_num_threads(),
                               "prompt_len": args.prompt_len, "context_len": args.context_len,
                               "targets": {"mfu": TARGET_MFU, "mbu": TARGET_MBU}, "load_average": load,
                               "results": results}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
