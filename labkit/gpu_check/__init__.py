"""One prepared call for a GPU session: roofs, prefill MFU, decode MBU, batch sweeps, NVML/GPM telemetry,
the lab engine (eager, CUDA graphs, compile), the lab's server on one GPU (mono and 1P1D: greedy equality,
interference, a short sweep), the notebooks in the gpu profile, and the test suite's GPU tests.

    python scripts/gpu_check.py                 # on a GPU: writes $OUT (default ./gpu_out)
    python scripts/gpu_check.py --smoke         # anywhere: tiny sizes on the CPU, the same code path

Writes to $OUT: results.json (every record, peaks, telemetry means), gpu_check.log, and at most six
PNG charts (the lab's device runner brings back eight files). Each check runs in try/except with a
log line, under one global time budget (--budget-s, default 450 s): a check that would not fit is
skipped and says so. The short table printed last is the headline.

`--only` picks checks (in the order given), `--engine-variants llama-3.1-8b:graphs ...` the engine's
forms, `--notebooks 01 04` the notebooks, `--pytest-k` the GPU tests. Measured costs on an H100
(docs/results/gpu_check-2026-11-27-h100-sxm/): the four default checks before serving took 224 s;
compiling the 8B forward takes over 3 minutes, so it is not a default variant. The serving and
notebook checks need fastapi/uvicorn/pydantic and nbmake/ipykernel, which the device image lacks:
`make gpu-wheels` gathers them (scripts/gpu_wheels.py says how to carry and install them).

To add a check: write `def check_x(ctx: Ctx) -> None` in a module here that puts its results in
`ctx.results[...]` and charts through `ctx.save`, and append `Check("x", check_x, est_s)` to CHECKS.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback
from pathlib import Path

from labkit.gpu_check.core import Check, Ctx
from labkit.gpu_check.engine import check_engine
from labkit.gpu_check.measure import check_8b, check_env, check_peaks, check_roofline_chart, check_small_model
from labkit.gpu_check.notebooks import check_notebooks
from labkit.gpu_check.serving import check_serving
from labkit.gpu_check.tests import check_gpu_tests

CHECKS: list[Check] = [
    Check("env", check_env, 5),
    Check("peaks", check_peaks, 30),
    Check("llama-3.1-8b shape: prefill MFU, decode MBU, sweeps, telemetry", check_8b, 150),
    Check("llama-3.2-1b shape: prefill MFU, decode MBU, sweep", check_small_model, 60),
    Check("roofline chart", check_roofline_chart, 5),
    Check("lab engine: 8B eager vs CUDA graphs, 1B graphs vs compiled+graphs", check_engine, 120),
    Check("serving on one GPU: mono vs 1P1D equality, interference, sweep", check_serving, 150),
    Check("gpu tests: cuda-ipc transfer, bf16 compiled engine", check_gpu_tests, 90),
    Check("notebooks in the gpu profile", check_notebooks, 60),
]


def _summary(ctx: Ctx) -> str:
    lines = [
        "targets (issue 3, H100): 8B bf16 prefill of 2048 tokens at MFU >= 0.5; batch-1 decode at MBU >= 0.6",
        f"{'model':<14}{'phase':<9}{'batch':>6}{'len':>6}{'ms':>9}{'MFU':>7}{'MBU':>7}  {'runner':<24}roofs",
    ]
    p = ctx.peaks
    roofs = (
        f"{p.peak_flops(ctx.dtype) / 1e9:,.0f} GFLOP/s {ctx.dtype}, {p.read_bytes_per_s / 1e9:,.1f} GB/s read"
        if p
        else "peaks not measured"
    )
    for key in ("8b", "1b", "small", "engine"):
        for r in (ctx.results.get(key) or {}).get("headline", []):
            n = r.get("prompt_len", r.get("context_len"))
            lines.append(
                f"{r['model'][:13]:<14}{r['phase']:<9}{r['batch']:>6}{n:>6}{r['ms']:>9.2f}"
                f"{(r.get('mfu') or 0):>7.0%}{(r.get('mbu') or 0):>7.0%}  {r['runner']:<24}{roofs}"
            )
    serving = ctx.results.get("serving") or {}
    if "greedy_equal" in serving:
        stall = serving.get("interference") or {}
        worst = {m: f"{v['decode_stall_max_ms']:,.0f} ms" for m, v in stall.items()}
        lines.append(
            f"serving on one device: greedy mono == 1P1D {serving['greedy_equal']}; worst decode stall {worst}"
        )
    nbs = ctx.results.get("notebooks") or {}
    if nbs:
        lines.append(
            "notebooks: "
            + ", ".join(f"{k} {'ok' if v['passed'] else 'FAILED'} {v['seconds']:.0f} s" for k, v in nbs.items())
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script end to end")
    ap.add_argument("--budget-s", type=float, default=None, help="global time budget (default 450; smoke 240)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_out")
    ap.add_argument(
        "--only", nargs="*", help="run only checks whose name contains one of these words, in the order of the words"
    )
    ap.add_argument(
        "--engine-variants",
        nargs="*",
        default=[],
        help="model:form pairs for the engine check, form one of eager, graphs, compiled, compiled+graphs",
    )
    ap.add_argument("--no-engine-sweep", action="store_true", help="skip the engine's decode batch sweep")
    ap.add_argument("--pytest-k", default=None, help="a pytest -k expression for the GPU tests")
    ap.add_argument(
        "--notebooks", nargs="*", default=[], help="notebook numbers for the notebooks check (default: 01 02 04)"
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import torch

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = "float32" if device == "cpu" else "bfloat16"
    budget = args.budget_s or (240.0 if args.smoke else 450.0)
    with open(out / "gpu_check.log", "w") as log_file:
        ctx = Ctx(
            out,
            device,
            dtype,
            args.smoke,
            time.monotonic() + budget,
            log_file,
            engine_variants=list(args.engine_variants),
            engine_sweep=not args.no_engine_sweep,
            pytest_k=args.pytest_k,
            notebooks=list(args.notebooks),
        )
        ctx.log(f"gpu_check: device={device} dtype={dtype} smoke={args.smoke} budget={budget:.0f} s out={out}")
        if device == "cpu" and not args.smoke:
            ctx.log("no CUDA GPU found: running the CPU path (use --smoke for a quick check)")
        status: dict[str, str] = {}
        chosen = CHECKS if not args.only else [c for w in args.only for c in CHECKS if w.lower() in c.name.lower()]
        for chk in dict.fromkeys(chosen):  # in order, once each
            est = chk.est_s / (10 if args.smoke else 1)
            if ctx.left_s() < est:
                status[chk.name] = f"skipped: {ctx.left_s():.0f} s left, needs ~{est:.0f} s"
                ctx.log(f"SKIP {chk.name}: {status[chk.name]}")
                continue
            t0 = time.monotonic()
            ctx.log(f"RUN  {chk.name}")
            try:
                chk.fn(ctx)
                status[chk.name] = f"ok in {time.monotonic() - t0:.1f} s"
            except Exception as e:  # noqa: BLE001 - one failing check must not lose the others
                status[chk.name] = f"failed: {e.__class__.__name__}: {e}"
                ctx.log(f"FAIL {chk.name}: {e.__class__.__name__}: {e}\n{traceback.format_exc(limit=4)}")
            if device == "cuda":
                torch.cuda.empty_cache()
            ctx.log(f"DONE {chk.name}: {status[chk.name]}")
        ctx.results["status"] = status
        ctx.results["files"] = ctx.files
        (out / "results.json").write_text(json.dumps(ctx.results, indent=1, default=str))
        ctx.log("summary (MFU vs measured matmul peak, MBU vs measured read bandwidth)\n" + _summary(ctx))
    return 0 if all(s.startswith("ok") for s in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
