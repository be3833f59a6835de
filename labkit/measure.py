"""Time prefill and decode on a runner; say what the hardware did (MFU, MBU), as gpt-fast does.

    >>> from labkit.runners import TransformersRunner
    >>> r = TransformersRunner("small", "float32")
    >>> measure_prefill(r, batch=1, prompt_len=512)["mfu"]     # near the compute roof
    >>> measure_decode(r, batch=1, context_len=512)["mbu"]     # near the bandwidth roof

Each record is a flat dict (a row of a pandas DataFrame): median ms, tokens/s, FLOPs and
bytes of the step (labkit.roofline), achieved FLOP/s and bytes/s, MFU against the measured
matmul peak and MBU against the measured read bandwidth (labkit.hardware), and which runner
produced it. Also here: the `labkit measure` command and the tour's two sections.

To compare runners, give them all one `hardware.Roof`: it is sampled before each measurement,
and `roof.rescore(records)` then takes every MFU and MBU against its final medians:

    >>> roof = hardware.Roof("cpu")
    >>> recs = [measure_decode(r, 1, 512, peaks=roof) for r in (engine, hf)]
    >>> roof.sample(); roof.rescore(recs); print(roof.describe())
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from labkit.hardware import Peaks, Roof, sync, time_fn
from labkit.roofline import PhaseCost, decode_cost, prefill_cost

if TYPE_CHECKING:
    from labkit.runners import Runner
    from labkit.telemetry import Sampler


RUNNER_LABELS = {"labkit-engine": "lab engine", "transformers": "transformers"}


def _record(runner: Runner, cost: PhaseCost, times: list[float], peaks: Peaks | Roof | None) -> dict[str, Any]:
    median_s = statistics.median(times)
    rec: dict[str, Any] = {
        "runner": runner.name,
        "runner_detail": getattr(runner, "detail", ""),
        "model": runner.model,
        "device": runner.device,
        "dtype": runner.dtype,
        "phase": cost.phase,
        "batch": cost.batch,
        "prompt_len" if cost.phase == "prefill" else "context_len": cost.seq_len,
        "ms": median_s * 1e3,
        "ms_min": min(times) * 1e3,
        "repeats": len(times),
        "tokens_per_s": cost.tokens / median_s,
        "flops": cost.flops,
        "bytes": cost.bytes,
        "intensity_flop_per_byte": cost.intensity_flop_per_byte,
        "achieved_flops_per_s": cost.flops / median_s,
        "achieved_bytes_per_s": cost.bytes / median_s,
    }
    if isinstance(peaks, Roof):
        peaks.rescore([rec])
    elif peaks is not None:
        peak_flops = peaks.matmul_flops.get(runner.dtype)
        rec.update(
            peak_flops=peak_flops,
            peak_bytes_per_s=peaks.read_bytes_per_s,
            mfu=cost.mfu(median_s, peak_flops) if peak_flops else None,
            mbu=cost.mbu(median_s, peaks.read_bytes_per_s),
        )
    return rec


def _sample(roof: Peaks | Roof | None, dtype: str, matmul: bool) -> None:
    """A Roof is sampled before each measurement: its read roof always, the dtype's matmul roof before a
    prefill (the MFU's roof, interleaved with the work like the read roof) or when it has none yet."""
    if isinstance(roof, Roof):
        roof.sample(matmul=matmul or not roof.flops_samples.get(dtype), dtype=dtype)


def _phase(sampler: Sampler | None, name: str):
    return sampler.phase(name) if sampler is not None else contextlib.nullcontext()


def _timed(fn: Any, device: str, warmup: int, repeats: int, sampler: Sampler | None, phase: str) -> list[float]:
    """Warm-up runs, then the timed ones inside the sampler's phase: the phase's telemetry covers what
    MFU and MBU describe (a first call's lazy initialisation stays out of it)."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        fn()
    sync(device)  # queued warm-up kernels finish before the phase starts
    with _phase(sampler, phase):
        return time_fn(fn, device, warmup=0, repeats=repeats)


def measure_prefill(
    runner: Runner,
    batch: int = 1,
    prompt_len: int = 512,
    *,
    warmup: int = 1,
    repeats: int = 3,
    peaks: Peaks | Roof | None = None,
    sampler: Sampler | None = None,
) -> dict[str, Any]:
    """Times `repeats` prefills (after `warmup`) of batch × prompt_len tokens; returns one record (median ms).

    FLOPs count causal attention and last-token logits (labkit.roofline). peaks=None: no MFU/MBU;
    a Roof is sampled first, and the record names it (see the module's docstring).
    """
    _sample(peaks, runner.dtype, matmul=True)
    times = _timed(runner.prefill_fn(batch, prompt_len), runner.device, warmup, repeats, sampler, "prefill")
    return _record(runner, prefill_cost(runner.shape, prompt_len, batch, runner.dtype), times, peaks)


def measure_decode(
    runner: Runner,
    batch: int = 1,
    context_len: int = 512,
    *,
    warmup: int = 2,
    repeats: int = 5,
    peaks: Peaks | Roof | None = None,
    sampler: Sampler | None = None,
) -> dict[str, Any]:
    """Times `repeats` decode steps of `batch` sequences at context_len; returns one record (median ms per step).

    tokens_per_s is output tokens per second (batch / step time); MBU counts weights + KV read.
    """
    _sample(peaks, runner.dtype, matmul=False)
    times = _timed(runner.decode_fn(batch, context_len), runner.device, warmup, repeats, sampler, "decode")
    return _record(runner, decode_cost(runner.shape, batch, context_len, runner.dtype), times, peaks)


def measure_decode_beside_bandwidth(
    runner: Runner, batch: int = 1, context_len: int = 512, *, repeats: int = 5, peaks: Peaks | None = None
) -> dict[str, Any]:
    """measure_decode, with the read bandwidth measured right before and right after it.

    On a shared machine the roof moves between rounds (up to 2x on a VM), so a step is compared
    with a roof measured beside it. Adds `read_bytes_per_s_beside`: the higher of the two (best of
    3 each), the one other processes disturbed least, in bytes/s.
    """
    from labkit.hardware import measure_read_bandwidth

    before = measure_read_bandwidth(runner.device, repeats=3, stat="best")
    rec = measure_decode(runner, batch, context_len, repeats=repeats, peaks=peaks)
    after = measure_read_bandwidth(runner.device, repeats=3, stat="best")
    rec["read_bytes_per_s_beside"] = max(before, after)
    return rec


def sweep_decode(runner: Runner, batches: Iterable[int], context_len: int = 256, **kw: Any) -> list[dict[str, Any]]:
    """measure_decode at each batch size; returns the records in order."""
    return [measure_decode(runner, b, context_len, **kw) for b in _progress(list(batches), "decode batch sweep")]


def sweep_prefill(runner: Runner, prompt_lens: Iterable[int], batch: int = 1, **kw: Any) -> list[dict[str, Any]]:
    """measure_prefill at each prompt length; returns the records in order."""
    return [measure_prefill(runner, batch, n, **kw) for n in _progress(list(prompt_lens), "prefill length sweep")]


def run_for(fn: Any, seconds: float, device: str, max_calls: int = 1_000_000) -> int:
    """Calls `fn` again and again for at least `seconds` (at least once); returns the number of calls.

    For telemetry: keeps one phase busy long enough for a sampler to see it.
    """
    import time

    from labkit.hardware import sync

    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    end, n = time.perf_counter() + seconds, 0
    while n < max_calls:
        fn()
        n += 1
        if time.perf_counter() >= end:
            break
    sync(device)
    return n


def _progress(items: list[Any], desc: str) -> Iterable[Any]:
    try:
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, leave=False)
    except ImportError:  # tqdm is a dependency; a bare install still measures
        return items


def label_runners(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies whose `model` names the runner ("lab engine", "transformers"): charts that label points by
    model then tell the runners apart."""
    return [dict(r, model=RUNNER_LABELS.get(r["runner"], r["runner"])) for r in records]


def to_frame(records: list[dict[str, Any]]):
    """The records as a pandas DataFrame."""
    import pandas as pd

    return pd.DataFrame.from_records(records)


def format_records(records: list[dict[str, Any]]) -> str:
    """A short fixed-width table: phase, batch, length, ms, tokens/s, GFLOP/s, GB/s, MFU, MBU, runner."""
    head = f"{'phase':<8}{'batch':>6}{'len':>6}{'ms':>10}{'tok/s':>10}{'GFLOP/s':>10}{'GB/s':>8}{'MFU':>7}{'MBU':>7}  runner"
    lines = [head]
    for r in records:
        n = r.get("prompt_len", r.get("context_len"))
        pct = lambda v: f"{v:7.0%}" if v is not None else "      -"
        noisy = f"  ({r['roof_note']})" if r.get("roof_note") else ""
        lines.append(
            f"{r['phase']:<8}{r['batch']:>6}{n:>6}{r['ms']:>10.2f}{r['tokens_per_s']:>10.1f}"
            f"{r['achieved_flops_per_s'] / 1e9:>10.1f}{r['achieved_bytes_per_s'] / 1e9:>8.2f}"
            f"{pct(r.get('mfu'))}{pct(r.get('mbu'))}  {r['runner']}{noisy}"
        )
    return "\n".join(lines)


# --- the `labkit measure` command -------------------------------------------------------


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="preset or model dir (default: small; tiny in the ci profile)")
    parser.add_argument("--runner", default="transformers", choices=["transformers", "engine"])
    parser.add_argument("--dtype", default=None, help="float32 on CPU (default), bfloat16 on GPU")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="decode batch sizes")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--context-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--refresh-peaks", action="store_true", help="remeasure the device's peaks")
    parser.add_argument("--json", default=None, help="also write the records and peaks to this file")
    parser.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from labkit import hardware
    from labkit.config import profile
    from labkit.runners import make_runner

    device = args.device or hardware.default_device()
    dtype = args.dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    model = args.model or ("tiny" if profile() == "ci" else "small")
    peaks = hardware.peaks(device, refresh=args.refresh_peaks)
    print("\n".join(f"peak {r['what']}: {r['value']:,.2f} {r['unit']}" for r in peaks.summary_rows()))
    runner = make_runner(args.runner, model, dtype, device)
    recs = [measure_prefill(runner, 1, args.prompt_len, repeats=max(1, args.repeats // 2), peaks=peaks)]
    recs += [measure_decode(runner, b, args.context_len, repeats=args.repeats, peaks=peaks) for b in args.batch]
    runner.close()
    print(
        f"\n{model} {dtype} on {peaks.device_name} ({device}); MFU vs measured {dtype} matmul peak, "
        f"MBU vs measured read bandwidth"
    )
    print(format_records(recs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peaks": peaks.as_dict(), "records": recs}, f, indent=1)
    return 0


# --- tour sections ----------------------------------------------------------------------


def hardware_section(report: Any, profile: str) -> None:
    """Tour: "Hardware: measured peaks" — this machine's roofs next to common accelerators' datasheets."""
    from labkit import hardware

    s = report.sections[-1]
    device = hardware.default_device()
    p = hardware.peaks(device, quick=profile == "ci")
    s.paragraphs.append(
        f"Measured on {p.device_name} ({device}, {p.threads} threads): a {p.matmul_size}² matmul "
        f"per dtype, and a sum over a {p.buffer_bytes >> 20} MiB buffer (larger than the caches) "
        "for read bandwidth. Other work on the machine lowers these numbers."
    )
    s.tables.append(
        (
            "Measured roofs",
            [{"what": r["what"], "value": round(r["value"], 2), "unit": r["unit"]} for r in p.summary_rows()],
        )
    )
    s.tables.append(
        (
            "Datasheet roofs (dense)",
            [
                {
                    "part": d.name,
                    "bf16 TFLOP/s": d.flops["bfloat16"] / 1e12,
                    "TB/s": d.bandwidth_bytes_per_s / 1e12,
                    "memory GB": d.memory_bytes / 1e9,
                    "ridge bf16 FLOP/B": round(d.ridge_flop_per_byte("bfloat16"), 1),
                }
                for d in hardware.datasheets().values()
            ],
        )
    )
    for dt, v in p.matmul_flops.items():
        report.add_summary(f"peak matmul {dt}", f"{v / 1e9:,.0f} GFLOP/s", p.device_name)
    report.add_summary(
        "peak read bandwidth",
        f"{p.read_bytes_per_s / 1e9:,.1f} GB/s",
        f"ridge fp32 {p.ridge_flop_per_byte(next(iter(p.matmul_flops))):.1f} FLOP/B",
    )
    report.data["peaks"] = p.as_dict()


def prefill_decode_section(report: Any, profile: str) -> None:
    """Tour: "Prefill vs decode on the default model" — the lab engine and transformers against one roof:
    roofline chart, MFU/MBU bars, the engine's decode batch sweep, summary rows."""
    from labkit import hardware
    from labkit.plots import roofline as rplot
    from labkit.roofline import critical_batch
    from labkit.runners import EngineRunner, TransformersRunner

    s = report.sections[-1]
    ci = profile == "ci"
    device = hardware.default_device()
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    model, prompt_len, ctx = ("tiny", 128, 128) if ci else ("small", 512, 512)
    # The batch sweep uses a short context: filling 64 caches of 512 tokens would cost more than the tour allows.
    batches, sweep_ctx = ([4, 16], 32) if ci else ([4, 16, 64], 64)
    # One roof for both runners, sampled before each measurement: on a shared machine it moves.
    roof = hardware.Roof(device, (dtype,), **({"buffer_bytes": 128 << 20, "matmul_size": 768} if ci else {}))
    recs: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    for make in (EngineRunner, TransformersRunner):
        runner = make(model, dtype, device)
        recs += [
            measure_prefill(runner, 1, prompt_len, repeats=3, peaks=roof),
            measure_decode(runner, 1, ctx, repeats=5, peaks=roof),
        ]
        if make is EngineRunner:
            sweep = [measure_decode(runner, b, sweep_ctx, repeats=3, peaks=roof) for b in batches]
        shape = runner.shape
        runner.close()
    roof.sample()
    roof.rescore(recs + sweep)
    roof.close()
    p = roof.peaks()
    (pre, dec1), (hf_pre, hf_dec1) = recs[:2], recs[2:]
    ridge = p.ridge_flop_per_byte(dtype)
    crit = critical_batch(shape, ridge, dtype, sweep_ctx)
    s.paragraphs.append(
        f"{model} ({shape.parameter_count / 1e6:,.1f} M parameters, {dtype}), measured with the lab engine "
        f"({pre['runner_detail'] or 'labkit.engine'}) and, beside it, the transformers loop. Prefill of "
        f"{prompt_len} tokens: {pre['intensity_flop_per_byte']:,.0f} FLOP/byte, right of the ridge ({ridge:.1f}); "
        f"batch-1 decode: {dec1['intensity_flop_per_byte']:.2f} FLOP/byte, on the bandwidth slope, where the "
        f"engine reads its weights at {dec1['mbu']:.0%} of the read roof and transformers at {hf_dec1['mbu']:.0%}. "
        f"At context {sweep_ctx}, decode turns compute-bound at batch "
        f"{crit or 'never (KV bytes grow with the batch)'}."
    )
    s.paragraphs.append(
        f"Roof: {roof.describe()}." + (f" {roof.noise_note()}: read the ratios with care." if roof.noisy else "")
    )
    s.tables.append(
        (
            "Measurements",
            [
                {
                    k: (round(v, 3) if isinstance(v, float) else v)
                    for k, v in r.items()
                    if k
                    in (
                        "phase",
                        "batch",
                        "prompt_len",
                        "context_len",
                        "ms",
                        "tokens_per_s",
                        "mfu",
                        "mbu",
                        "runner",
                        "noisy",
                    )
                }
                for r in recs + sweep
            ],
        )
    )
    fig = rplot.roofline_chart(p, label_runners(recs + sweep), dtype=dtype, datasheet=None)
    report.add_figure(
        s, fig, "roofline", "Roofline of this machine: the lab engine's points and transformers' beside them"
    )
    fig = rplot.utilization_bars([pre, dec1], title=f"{model}: MFU in prefill, MBU in decode (lab engine)")
    report.add_figure(s, fig, "mfu_mbu", "MFU and MBU per phase, lab engine (transformers' in the table)")
    fig = rplot.decode_batch_sweep(
        [dec1] + sweep if sweep_ctx == ctx else sweep,
        crit,
        title=f"{model}: decode batch sweep, lab engine (context {sweep_ctx})",
    )
    report.add_figure(s, fig, "decode_sweep", "Decode tokens/s, MFU and MBU against the batch size (lab engine)")
    noisy = " (noisy machine)" if roof.noisy else ""
    for label, a, b in (("prefill MFU", pre, hf_pre), ("decode MBU", dec1, hf_dec1)):
        key = "mfu" if label.startswith("prefill") else "mbu"
        what = f"{model}, {prompt_len} tok" if key == "mfu" else f"{model}, batch 1"
        report.add_summary(f"{label} ({what})", f"{a[key]:.0%}", f"lab engine; transformers {b[key]:.0%}{noisy}")
    report.data["prefill_vs_decode"] = recs + sweep
    report.data["roof"] = roof.as_dict()
