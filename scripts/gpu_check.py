#!/usr/bin/env python
"""One prepared call for a GPU session: roofs, prefill MFU, decode MBU, batch sweep, NVML/GPM telemetry,
the lab engine (eager, CUDA graphs, compile), and the test suite's GPU tests.

    python scripts/gpu_check.py                 # on a GPU: writes $OUT (default ./gpu_out)
    python scripts/gpu_check.py --smoke         # anywhere: tiny sizes on the CPU, same code path

Writes to $OUT: results.json (every record, peaks, telemetry means), gpu_check.log, and PNG charts
(at most 8 files in all, what the lab's device runner brings back). Each check runs in try/except
with a log line, under one global time budget (--budget-s, default 420 s): a check that would not
fit is skipped and says so. The short table printed last is the headline.

A default run takes about 4 minutes on an H100 (docs/results/gpu_check-2026-11-27-h100-sxm/).
`--only` picks checks (in the order given), `--engine-variants llama-3.1-8b:graphs ...` the
engine's forms, `--pytest-k` the GPU tests. Compiling the 8B forward takes over 3 minutes: it is
not in the default variants.

To add a check: write `def check_x(ctx: Ctx) -> None` that puts its results in `ctx.results[...]`,
and append `Check("x", check_x, est_s)` to CHECKS.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo copy, installed or not

import matplotlib  # noqa: E402

matplotlib.use("Agg")


@dataclass
class Ctx:
    """Everything a check needs: where to write, the device, the clock, and the shared results."""

    out: Path
    device: str
    dtype: str
    smoke: bool
    deadline: float
    log_file: Any
    results: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    peaks: Any = None
    engine_variants: list[str] = field(default_factory=list)   # "model:form"; empty: the default four
    engine_sweep: bool = True
    pytest_k: str | None = None

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def save(self, fig: Any, name: str) -> None:
        import matplotlib.pyplot as plt

        path = self.out / f"{name}.png"
        fig.savefig(path)
        plt.close(fig)
        self.files.append(path.name)


@dataclass(frozen=True)
class Check:
    name: str
    fn: Callable[[Ctx], None]
    est_s: float  # on an H100; a check is skipped when less time than this is left


# --- checks ------------------------------------------------------------------------------

def check_env(ctx: Ctx) -> None:
    import torch

    from labkit import hardware

    info: dict[str, Any] = {"torch": torch.__version__, "device": ctx.device, "dtype": ctx.dtype,
                            "device_name": hardware.device_name(ctx.device)}
    if ctx.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(sm_count=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                    capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda)
    sheet = hardware.lookup_datasheet(info["device_name"])
    info["datasheet"] = sheet.name if sheet else None
    ctx.results["env"] = info
    ctx.log(f"env: {info}")


def check_peaks(ctx: Ctx) -> None:
    from labkit import hardware

    p = hardware.measure_peaks(ctx.device, quick=ctx.smoke)
    ctx.peaks = p
    sheet = hardware.lookup_datasheet(p.device_name)
    rows = p.summary_rows()
    if sheet:
        for dt, v in p.matmul_flops.items():
            if dt in sheet.flops:
                rows.append({"what": f"matmul {dt} / datasheet", "value": v / sheet.flops[dt], "unit": "ratio"})
        rows.append({"what": "read bw / datasheet", "value": p.read_bytes_per_s / sheet.bandwidth_bytes_per_s,
                     "unit": "ratio"})
    ctx.results["peaks"] = p.as_dict()
    ctx.results["peaks_vs_datasheet"] = rows
    for r in rows:
        ctx.log(f"peak {r['what']}: {r['value']:,.3f} {r['unit']}")


def _model_check(ctx: Ctx, model: str, key: str, *, prompt_len: int, context_len: int, sweep_batches: list[int],
                 sweep_context: int, prompt_lens: list[int], telemetry: bool) -> None:
    import torch

    from labkit import measure
    from labkit.hardware import lookup_datasheet
    from labkit.plots import roofline as rplot
    from labkit.roofline import critical_batch
    from labkit.runners import TransformersRunner
    from labkit.telemetry import Sampler

    if ctx.peaks is None:
        raise RuntimeError("peaks were not measured (check_peaks failed): MFU/MBU need them")
    t0 = time.monotonic()
    runner = TransformersRunner(model, ctx.dtype, ctx.device, random_weights=True)
    ctx.log(f"{key}: built {model} ({runner.shape.parameter_count / 1e9:.2f} B params) in {time.monotonic() - t0:.1f} s")
    sampler = Sampler(ctx.device if ctx.device.startswith("cuda") else "cpu", verbose=False) if telemetry else None
    for n in (sampler.notes if sampler else []):
        ctx.log(f"{key}: telemetry: {n}")
    recs: list[dict[str, Any]] = []
    try:
        if sampler:
            sampler.start()
        reps = (1, 2) if ctx.smoke else (5, 20)
        recs.append(measure.measure_prefill(runner, 1, prompt_len, warmup=1 if ctx.smoke else 2, repeats=reps[0],
                                            peaks=ctx.peaks, sampler=sampler))
        recs.append(measure.measure_decode(runner, 1, context_len, warmup=1 if ctx.smoke else 3, repeats=reps[1],
                                           peaks=ctx.peaks, sampler=sampler))
    finally:
        if sampler:
            sampler.stop()
    ctx.log(f"{key}: headline (transformers runner)\n" + measure.format_records(recs))
    out: dict[str, Any] = {"model": model, "runner": "transformers", "headline": recs}
    if sampler:
        out["telemetry_means"] = sampler.phase_means()
        out["telemetry_notes"] = sampler.notes
        ctx.save(rplot.utilization_timeline(sampler, title=f"{model}: utilization during prefill and decode"),
                 f"timeline_{key}")
        ctx.save(rplot.util_vs_mfu(out["telemetry_means"], recs), f"util_vs_mfu_{key}")
    ctx.results[key] = out  # headline kept even if a sweep below runs out of time
    sweep: list[dict[str, Any]] = []
    for b in sweep_batches:
        if ctx.left_s() < 20:
            ctx.log(f"{key}: decode sweep stopped before batch {b}: time budget")
            break
        try:
            sweep.append(measure.measure_decode(runner, b, sweep_context, warmup=1 if ctx.smoke else 2,
                                                repeats=2 if ctx.smoke else 5, peaks=ctx.peaks))
        except torch.OutOfMemoryError:
            ctx.log(f"{key}: decode batch {b} out of memory; sweep ends")
            break
    pre_sweep: list[dict[str, Any]] = []
    for n in prompt_lens:
        if ctx.left_s() < 20:
            ctx.log(f"{key}: prefill sweep stopped before {n} tokens: time budget")
            break
        pre_sweep.append(measure.measure_prefill(runner, 1, n, warmup=1, repeats=1 if ctx.smoke else 3,
                                                 peaks=ctx.peaks))
    runner.close()
    ridge = ctx.peaks.ridge_flop_per_byte(ctx.dtype)
    sheet = lookup_datasheet(ctx.peaks.device_name)
    out.update(decode_sweep=sweep, prefill_sweep=pre_sweep, sweep_context_len=sweep_context,
               critical_batch_measured=critical_batch(runner.shape, ridge, ctx.dtype, sweep_context),
               critical_batch_datasheet=(critical_batch(runner.shape, sheet.ridge_flop_per_byte(ctx.dtype), ctx.dtype,
                                                        sweep_context) if sheet and ctx.dtype in sheet.flops else None))
    if sweep:
        ctx.log(f"{key}: decode sweep at context {sweep_context}\n" + measure.format_records(sweep))
        ctx.save(rplot.decode_batch_sweep(sweep, out["critical_batch_measured"],
                                          title=f"{model}: decode batch sweep (context {sweep_context})"),
                 f"decode_sweep_{key}")
    if pre_sweep:
        ctx.log(f"{key}: prefill sweep\n" + measure.format_records(pre_sweep))
    ctx.results[key] = out
    ctx.results.setdefault("roofline_points", []).extend(recs + sweep[-1:] + pre_sweep)


def check_small_model(ctx: Ctx) -> None:
    if ctx.smoke:
        _model_check(ctx, "tiny", "small", prompt_len=32, context_len=32, sweep_batches=[1, 4], sweep_context=16,
                     prompt_lens=[16], telemetry=False)
    else:
        _model_check(ctx, "llama-3.2-1b", "1b", prompt_len=2048, context_len=2048,
                     sweep_batches=[1, 16, 64, 256], sweep_context=64, prompt_lens=[512, 2048], telemetry=False)


def check_8b(ctx: Ctx) -> None:
    if ctx.smoke:
        _model_check(ctx, "tiny", "8b", prompt_len=64, context_len=32, sweep_batches=[1, 4, 16],
                     sweep_context=16, prompt_lens=[32, 64], telemetry=True)
    else:
        _model_check(ctx, "llama-3.1-8b", "8b", prompt_len=2048, context_len=2048,
                     sweep_batches=[1, 8, 32, 64, 128, 256, 384, 512], sweep_context=64,
                     prompt_lens=[256, 1024, 2048, 4096], telemetry=True)


def check_roofline_chart(ctx: Ctx) -> None:
    from labkit.hardware import lookup_datasheet
    from labkit.plots import roofline as rplot

    pts = ctx.results.get("roofline_points") or []
    if ctx.peaks is None or not pts:
        raise RuntimeError("nothing measured to chart")
    fig = rplot.roofline_chart(ctx.peaks, pts, dtype=ctx.dtype, datasheet=lookup_datasheet(ctx.peaks.device_name),
                               title=f"Roofline: {ctx.peaks.device_name[:30]} ({ctx.dtype})")
    ctx.save(fig, "roofline")


def check_engine(ctx: Ctx) -> None:
    """The lab's own engine (paged KV cache), random weights built on the device, in three forms.

    eager, `cuda_graphs=True` (decode steps replayed as CUDA graphs) and, for the 1B shape,
    `compile_decode` + graphs: the same headline measurements as the transformers runner, then a
    decode batch sweep with graphs. Each variant is caught on its own, so one failing keeps the rest.
    """
    import torch

    from labkit import measure
    from labkit.plots import roofline as rplot
    from labkit.roofline import critical_batch
    from labkit.runners import EngineRunner

    if ctx.peaks is None:
        raise RuntimeError("peaks were not measured (check_peaks failed)")
    gpu = ctx.device.startswith("cuda")
    big, small, n, sweep_ctx = ("llama-3.1-8b", "llama-3.2-1b", 2048, 512) if not ctx.smoke else ("tiny", "tiny-qwen2", 32, 16)
    forms = {"eager": {}, "graphs": {"cuda_graphs": True}, "compiled": {"compile_decode": gpu},
             "compiled+graphs": {"cuda_graphs": True, "compile_decode": gpu}}
    picked = ctx.engine_variants or [f"{big}:eager", f"{big}:graphs", f"{small}:graphs", f"{small}:compiled+graphs"]
    variants = []
    for v in picked:
        model, _, form = v.partition(":")
        if form not in forms:
            raise ValueError(f"engine variant {v!r}: form must be one of {sorted(forms)}")
        variants.append((model, form, forms[form]))
    out: dict[str, Any] = {"runner": "labkit-engine", "variants": {}, "errors": {}}
    ctx.results["engine"] = out
    failures = 0
    for model, form, kw in variants:
        name = f"{model} {form}"
        if ctx.left_s() < 40:
            ctx.log(f"engine: {name} skipped: time budget")
            continue
        t0 = time.monotonic()
        runner = None
        try:
            runner = EngineRunner(model, ctx.dtype, ctx.device, kv_cache_bytes=(64 << 20) if ctx.smoke else (24 << 30),
                                  random_weights=True, **kw)
            built = time.monotonic() - t0
            recs = [measure.measure_prefill(runner, 1, n, warmup=1, repeats=2 if ctx.smoke else 3, peaks=ctx.peaks),
                    measure.measure_decode(runner, 1, n, warmup=3, repeats=3 if ctx.smoke else 10, peaks=ctx.peaks)]
            for r in recs:
                r["runner"] = f"engine {form}"
            sweep: list[dict[str, Any]] = []
            if model == big and form == "graphs" and ctx.engine_sweep:
                for b in ([1, 4] if ctx.smoke else [1, 16, 64, 128, 256]):
                    if ctx.left_s() < 25:
                        ctx.log(f"engine: sweep stopped before batch {b}: time budget")
                        break
                    r = measure.measure_decode(runner, b, sweep_ctx, warmup=2, repeats=3 if ctx.smoke else 5,
                                               peaks=ctx.peaks)
                    r["runner"] = f"engine {form}"
                    sweep.append(r)
            # (no local reference to the graphs: they hold the KV cache and weights past runner.close())
            captured = runner.engine._graphs.num_captures if runner.engine._graphs else 0
            v = {"model": model, "form": form, "build_s": built, "headline": recs, "decode_sweep": sweep,
                 "sweep_context_len": sweep_ctx, "graphs_captured": captured,
                 "seconds": time.monotonic() - t0}
            out["variants"][name] = v
            ctx.log(f"engine: {name} (built in {built:.1f} s, {v['graphs_captured']} graphs captured)\n"
                    + measure.format_records(recs + sweep))
            if sweep:
                shape = runner.shape
                ctx.save(rplot.decode_batch_sweep(sweep, critical_batch(shape, ctx.peaks.ridge_flop_per_byte(ctx.dtype),
                                                                        ctx.dtype, sweep_ctx),
                                                  title=f"{model}: lab engine decode with CUDA graphs "
                                                        f"(context {sweep_ctx})"),
                         "engine_decode_sweep")
                ctx.results.setdefault("roofline_points", []).extend(sweep[-1:])
        except Exception as e:  # noqa: BLE001 - one variant failing must not lose the others
            failures += 1
            out["errors"][name] = f"{e.__class__.__name__}: {e}"
            ctx.log(f"engine: {name} FAILED: {e.__class__.__name__}: {e}\n{traceback.format_exc(limit=6)}")
        finally:
            if runner is not None:
                runner.close()
            del runner
            gc.collect()
            if gpu:
                torch.cuda.empty_cache()
    out["headline"] = [r for v in out["variants"].values() for r in v["headline"]]
    if failures:
        raise RuntimeError(f"{failures} engine variant(s) failed: {out['errors']}")


def check_gpu_tests(ctx: Ctx) -> None:
    """The test suite's GPU tests (cuda-ipc KV transfer between processes, bf16 + compiled engine decode).

    They are skipped on a machine without a GPU, so this is where they run. pytest runs in a child
    process with its own timeout; its summary line and the tail of its output go to the log.
    """
    import re
    import subprocess

    root = Path(__file__).resolve().parent.parent
    marker = "gpu" if ctx.device.startswith("cuda") else "not gpu"  # smoke: the same files' CPU tests
    files = ["tests/test_transfer_cuda_ipc.py", *(["tests/test_engine.py"] if ctx.device.startswith("cuda") else [])]
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", "--tb=short", "-rfE",
           "-m", marker, *(["-k", ctx.pytest_k] if ctx.pytest_k else []), "--timeout", "240", *files]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    limit = max(30.0, ctx.left_s() - 10)
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=limit)
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        text, rc = text + f"\n(pytest killed after {limit:.0f} s)", -9
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", text)}
    ctx.results["gpu_tests"] = {"command": " ".join(cmd[1:]), "returncode": rc, "counts": counts,
                                "output_tail": text[-6000:]}
    ctx.log(f"gpu tests: rc={rc} {counts}\n{text[-3000:]}")
    if rc != 0:
        raise RuntimeError(f"pytest -m {marker} returned {rc}: {counts}")


CHECKS: list[Check] = [
    Check("env", check_env, 5),
    Check("peaks", check_peaks, 30),
    Check("llama-3.1-8b shape: prefill MFU, decode MBU, sweeps, telemetry", check_8b, 150),
    Check("llama-3.2-1b shape: prefill MFU, decode MBU, sweep", check_small_model, 60),
    Check("roofline chart", check_roofline_chart, 5),
    Check("lab engine: 8B eager vs CUDA graphs, 1B graphs vs compiled+graphs", check_engine, 120),
    Check("gpu tests: cuda-ipc transfer, bf16 compiled engine", check_gpu_tests, 90),
]


def _summary(ctx: Ctx) -> str:
    lines = ["targets (issue 3, H100): 8B bf16 prefill of 2048 tokens at MFU >= 0.5; batch-1 decode at MBU >= 0.6",
             f"{'model':<14}{'phase':<9}{'batch':>6}{'len':>6}{'ms':>9}{'MFU':>7}{'MBU':>7}  {'runner':<24}roofs"]
    p = ctx.peaks
    roofs = (f"{p.peak_flops(ctx.dtype) / 1e9:,.0f} GFLOP/s {ctx.dtype}, {p.read_bytes_per_s / 1e9:,.1f} GB/s read"
             if p else "peaks not measured")
    for key in ("8b", "1b", "small", "engine"):
        for r in (ctx.results.get(key) or {}).get("headline", []):
            n = r.get("prompt_len", r.get("context_len"))
            lines.append(f"{r['model'][:13]:<14}{r['phase']:<9}{r['batch']:>6}{n:>6}{r['ms']:>9.2f}"
                         f"{(r.get('mfu') or 0):>7.0%}{(r.get('mbu') or 0):>7.0%}  {r['runner']:<24}{roofs}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the script end to end")
    ap.add_argument("--budget-s", type=float, default=None, help="global time budget (default 420; smoke 120)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_out")
    ap.add_argument("--only", nargs="*", help="run only checks whose name contains one of these words, "
                                              "in the order of the words")
    ap.add_argument("--engine-variants", nargs="*", default=[],
                    help="model:form pairs for the engine check, form one of eager, graphs, compiled, compiled+graphs")
    ap.add_argument("--no-engine-sweep", action="store_true", help="skip the engine's decode batch sweep")
    ap.add_argument("--pytest-k", default=None, help="a pytest -k expression for the GPU tests")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    dtype = "float32" if device == "cpu" else "bfloat16"
    budget = args.budget_s or (120.0 if args.smoke else 420.0)
    with open(out / "gpu_check.log", "w") as log_file:
        ctx = Ctx(out, device, dtype, args.smoke, time.monotonic() + budget, log_file,
                  engine_variants=list(args.engine_variants), engine_sweep=not args.no_engine_sweep,
                  pytest_k=args.pytest_k)
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
        ctx.log("summary (MFU vs measured matmul peak, MBU vs measured read bandwidth)\n"
                + _summary(ctx))
    return 0 if all(s.startswith("ok") for s in status.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
