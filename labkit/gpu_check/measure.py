"""The roofline checks: the machine's peaks, prefill MFU and decode MBU of the 8B and 1B shapes with the
transformers runner (eager: on a GPU its decode is bound by kernel launches), sweeps, NVML/GPM telemetry."""

from __future__ import annotations

import time
from typing import Any

from labkit.gpu_check.core import Ctx


def check_env(ctx: Ctx) -> None:
    import torch

    from labkit import hardware

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "device": ctx.device,
        "dtype": ctx.dtype,
        "device_name": hardware.device_name(ctx.device),
    }
    if ctx.device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(
            sm_count=props.multi_processor_count,
            memory_gib=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
        )
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
        rows.append(
            {"what": "read bw / datasheet", "value": p.read_bytes_per_s / sheet.bandwidth_bytes_per_s, "unit": "ratio"}
        )
    ctx.results["peaks"] = p.as_dict()
    ctx.results["peaks_vs_datasheet"] = rows
    for r in rows:
        ctx.log(f"peak {r['what']}: {r['value']:,.3f} {r['unit']}")


def _model_check(
    ctx: Ctx,
    model: str,
    key: str,
    *,
    prompt_len: int,
    context_len: int,
    sweep_batches: list[int],
    sweep_context: int,
    prompt_lens: list[int],
    telemetry: bool,
    sweep_chart: bool = True,
) -> None:
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
    ctx.log(
        f"{key}: built {model} ({runner.shape.parameter_count / 1e9:.2f} B params) in {time.monotonic() - t0:.1f} s"
    )
    sampler = Sampler(ctx.device if ctx.device.startswith("cuda") else "cpu", verbose=False) if telemetry else None
    for note in sampler.notes if sampler else []:
        ctx.log(f"{key}: telemetry: {note}")
    recs: list[dict[str, Any]] = []
    try:
        if sampler:
            sampler.start()
        reps = (1, 2) if ctx.smoke else (5, 20)
        recs.append(
            measure.measure_prefill(
                runner, 1, prompt_len, warmup=1 if ctx.smoke else 2, repeats=reps[0], peaks=ctx.peaks, sampler=sampler
            )
        )
        recs.append(
            measure.measure_decode(
                runner, 1, context_len, warmup=1 if ctx.smoke else 3, repeats=reps[1], peaks=ctx.peaks, sampler=sampler
            )
        )
    finally:
        if sampler:
            sampler.stop()
    ctx.log(f"{key}: headline (transformers runner)\n" + measure.format_records(recs))
    out: dict[str, Any] = {"model": model, "runner": "transformers", "headline": recs}
    if sampler:
        out["telemetry_means"] = sampler.phase_means()
        out["telemetry_notes"] = sampler.notes
        ctx.save(
            rplot.utilization_timeline(sampler, title=f"{model}: utilization during prefill and decode"),
            f"timeline_{key}",
        )
        ctx.save(rplot.util_vs_mfu(out["telemetry_means"], recs), f"util_vs_mfu_{key}")
    ctx.results[key] = out  # headline kept even if a sweep below runs out of time
    sweep: list[dict[str, Any]] = []
    for b in sweep_batches:
        if ctx.left_s() < 20:
            ctx.log(f"{key}: decode sweep stopped before batch {b}: time budget")
            break
        try:
            sweep.append(
                measure.measure_decode(
                    runner,
                    b,
                    sweep_context,
                    warmup=1 if ctx.smoke else 2,
                    repeats=2 if ctx.smoke else 5,
                    peaks=ctx.peaks,
                )
            )
        except torch.OutOfMemoryError:
            ctx.log(f"{key}: decode batch {b} out of memory; sweep ends")
            break
    pre_sweep: list[dict[str, Any]] = []
    for n in prompt_lens:
        if ctx.left_s() < 20:
            ctx.log(f"{key}: prefill sweep stopped before {n} tokens: time budget")
            break
        pre_sweep.append(
            measure.measure_prefill(runner, 1, n, warmup=1, repeats=1 if ctx.smoke else 3, peaks=ctx.peaks)
        )
    runner.close()
    ridge = ctx.peaks.ridge_flop_per_byte(ctx.dtype)
    sheet = lookup_datasheet(ctx.peaks.device_name)
    out.update(
        decode_sweep=sweep,
        prefill_sweep=pre_sweep,
        sweep_context_len=sweep_context,
        critical_batch_measured=critical_batch(runner.shape, ridge, ctx.dtype, sweep_context),
        critical_batch_datasheet=(
            critical_batch(runner.shape, sheet.ridge_flop_per_byte(ctx.dtype), ctx.dtype, sweep_context)
            if sheet and ctx.dtype in sheet.flops
            else None
        ),
    )
    if sweep:
        ctx.log(f"{key}: decode sweep at context {sweep_context}\n" + measure.format_records(sweep))
    if sweep and sweep_chart:
        ctx.save(
            rplot.decode_batch_sweep(
                sweep, out["critical_batch_measured"], title=f"{model}: decode batch sweep (context {sweep_context})"
            ),
            f"decode_sweep_{key}",
        )
    if pre_sweep:
        ctx.log(f"{key}: prefill sweep\n" + measure.format_records(pre_sweep))
    ctx.results[key] = out
    ctx.results.setdefault("roofline_points", []).extend(recs + sweep[-1:] + pre_sweep)


def check_small_model(ctx: Ctx) -> None:
    if ctx.smoke:
        _model_check(
            ctx,
            "tiny",
            "small",
            prompt_len=32,
            context_len=32,
            sweep_batches=[1, 4],
            sweep_context=16,
            prompt_lens=[16],
            telemetry=False,
            sweep_chart=False,
        )
    else:  # its sweep is in results.json; the six charts go to the 8B shape, the engine and serving
        _model_check(
            ctx,
            "llama-3.2-1b",
            "1b",
            prompt_len=2048,
            context_len=2048,
            sweep_batches=[1, 16, 64, 256],
            sweep_context=64,
            prompt_lens=[512, 2048],
            telemetry=False,
            sweep_chart=False,
        )


def check_8b(ctx: Ctx) -> None:
    if ctx.smoke:
        _model_check(
            ctx,
            "tiny",
            "8b",
            prompt_len=64,
            context_len=32,
            sweep_batches=[1, 4, 16],
            sweep_context=16,
            prompt_lens=[32, 64],
            telemetry=True,
        )
    else:
        _model_check(
            ctx,
            "llama-3.1-8b",
            "8b",
            prompt_len=2048,
            context_len=2048,
            sweep_batches=[1, 8, 32, 64, 128, 256, 384, 512],
            sweep_context=64,
            prompt_lens=[256, 1024, 2048, 4096],
            telemetry=True,
        )


def check_roofline_chart(ctx: Ctx) -> None:
    from labkit.hardware import lookup_datasheet
    from labkit.plots import roofline as rplot

    pts = ctx.results.get("roofline_points") or []
    if ctx.peaks is None or not pts:
        raise RuntimeError("nothing measured to chart")
    fig = rplot.roofline_chart(
        ctx.peaks,
        pts,
        dtype=ctx.dtype,
        datasheet=lookup_datasheet(ctx.peaks.device_name),
        title=f"Roofline: {ctx.peaks.device_name[:30]} ({ctx.dtype})",
    )
    ctx.save(fig, "roofline")
