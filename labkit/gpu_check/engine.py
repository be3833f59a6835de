"""The lab's own engine on the device, in its forms: eager, CUDA graphs, compiled, compiled + graphs."""

from __future__ import annotations

import gc
import time
import traceback
from typing import Any

from labkit.gpu_check.core import Ctx


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
    big, small, n, sweep_ctx = (
        ("llama-3.1-8b", "llama-3.2-1b", 2048, 512) if not ctx.smoke else ("tiny", "tiny-qwen2", 32, 16)
    )
    forms = {
        "eager": {},
        "graphs": {"cuda_graphs": True},
        "compiled": {"compile_decode": gpu},
        "compiled+graphs": {"cuda_graphs": True, "compile_decode": gpu},
    }
    picked = ctx.engine_variants or [f"{big}:eager", f"{big}:graphs", f"{small}:graphs", f"{small}:compiled+graphs"]
    variants = []
    for spec in picked:
        model, _, form = spec.partition(":")
        if form not in forms:
            raise ValueError(f"engine variant {spec!r}: form must be one of {sorted(forms)}")
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
            runner = EngineRunner(
                model,
                ctx.dtype,
                ctx.device,
                kv_cache_bytes=(64 << 20) if ctx.smoke else (24 << 30),
                random_weights=True,
                **kw,
            )
            built = time.monotonic() - t0
            recs = [
                measure.measure_prefill(runner, 1, n, warmup=1, repeats=2 if ctx.smoke else 3, peaks=ctx.peaks),
                measure.measure_decode(runner, 1, n, warmup=3, repeats=3 if ctx.smoke else 10, peaks=ctx.peaks),
            ]
            for r in recs:
                r["runner"] = f"engine {form}"
            sweep: list[dict[str, Any]] = []
            if model == big and form == "graphs" and ctx.engine_sweep:
                for b in [1, 4] if ctx.smoke else [1, 16, 64, 128, 256]:
                    if ctx.left_s() < 25:
                        ctx.log(f"engine: sweep stopped before batch {b}: time budget")
                        break
                    r = measure.measure_decode(
                        runner, b, sweep_ctx, warmup=2, repeats=3 if ctx.smoke else 5, peaks=ctx.peaks
                    )
                    r["runner"] = f"engine {form}"
                    sweep.append(r)
            # (no local reference to the graphs: they hold the KV cache and weights past runner.close())
            captured = runner.engine._graphs.num_captures if runner.engine._graphs else 0
            v = {
                "model": model,
                "form": form,
                "build_s": built,
                "headline": recs,
                "decode_sweep": sweep,
                "sweep_context_len": sweep_ctx,
                "graphs_captured": captured,
                "seconds": time.monotonic() - t0,
            }
            out["variants"][name] = v
            ctx.log(
                f"engine: {name} (built in {built:.1f} s, {v['graphs_captured']} graphs captured)\n"
                + measure.format_records(recs + sweep)
            )
            if sweep:
                shape = runner.shape
                ctx.save(
                    rplot.decode_batch_sweep(
                        sweep,
                        critical_batch(shape, ctx.peaks.ridge_flop_per_byte(ctx.dtype), ctx.dtype, sweep_ctx),
                        title=f"{model}: lab engine decode with CUDA graphs (context {sweep_ctx})",
                    ),
                    "engine_decode_sweep",
                )
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
