"""The lab's server on the GPU: mono and 1P1D on ONE GPU (prefill and decode share it, KV by cuda-ipc).

Three measurements, each a real deployment started by `labkit.serve.launcher.launch(gpus=[0])`:
1. greedy equality: the same prompts through mono and 1P1D give the same tokens (fp32, the
   locally written `small`: bf16 tokens flip on near ties, so equality is asked of fp32);
2. interference: a long prompt arrives while decodes stream (labkit.bench.interference): the
   worst decode stall in mono against 1P1D, on the 1B shape in the run's dtype with CUDA graphs;
3. a short sweep, mono vs 1P1D, at a few rates of the Azure conversation mix on the 1B shape.
On the CPU (`--smoke`) the same code runs with `tiny` and no GPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from labkit.gpu_check.core import Ctx

EQUALITY_PROMPT_TOKENS = (40, 200, 700)
EQUALITY_MAX_TOKENS = 24


def _prompt(i: int, n: int) -> list[int]:
    """A deterministic prompt of `n` token ids (BOS, then bytes)."""
    return [256] + [1 + (7 * i + 13 * k + (k * k) % 11) % 255 for k in range(n - 1)]


def _greedy(url: str, model: str, prompt: list[int], max_tokens: int) -> list[int]:
    import httpx

    r = httpx.post(
        url + "/v1/completions",
        timeout=300,
        json={
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
    )
    r.raise_for_status()
    return list(r.json()["choices"][0]["token_ids"])


def _launch_kw(ctx: Ctx, model: str, dtype: str, *, random_weights: bool) -> dict[str, Any]:
    """What every deployment of this check shares: one GPU (or none), graphs on a GPU."""
    return {
        "model": model,
        "dtype": dtype,
        "gpus": [0] if ctx.gpu else None,
        "cuda_graphs": ctx.gpu or None,
        "random_weights": random_weights,
        "startup_timeout_s": 600.0,
    }


def check_serving(ctx: Ctx) -> None:
    from labkit.bench.interference import InterferenceScenario, run_interference
    from labkit.serve.launcher import launch

    out: dict[str, Any] = {}
    ctx.results["serving"] = out
    # 1. greedy equality, fp32
    eq_model = "tiny" if ctx.smoke else "small"
    prompts = [_prompt(i, n) for i, n in enumerate(EQUALITY_PROMPT_TOKENS[:2] if ctx.smoke else EQUALITY_PROMPT_TOKENS)]
    tokens: dict[str, list[list[int]]] = {}
    for mode in ("mono", "disagg"):
        t0 = time.monotonic()
        with launch(mode, **_launch_kw(ctx, eq_model, "float32", random_weights=False)) as srv:
            tokens[mode] = [_greedy(srv.url, eq_model, p, EQUALITY_MAX_TOKENS) for p in prompts]
            if srv.placement is not None:
                out.setdefault("placement", {})[mode] = srv.placement.describe()
        ctx.log(
            f"serving: {mode} {eq_model} fp32 up, {len(prompts)} greedy requests, stopped in "
            f"{time.monotonic() - t0:.1f} s"
        )
    out["greedy_equal"] = tokens["mono"] == tokens["disagg"]
    out["greedy_tokens"] = tokens
    ctx.log(
        f"serving: greedy tokens mono == 1P1D on one device: {out['greedy_equal']}\n"
        f"{out.get('placement', {}).get('disagg', '')}"
    )
    # 2. interference and 3. the sweep, on the 1B shape
    model = "tiny" if ctx.smoke else "llama-3.2-1b"
    kw = _launch_kw(ctx, model, ctx.dtype, random_weights=ctx.gpu)
    scenario = InterferenceScenario(
        num_decodes=4,
        long_prompt_tokens=1024 if ctx.smoke else 8192,
        long_after_tokens=8,
        tail_tokens=16,
        timeout_s=300,
    )
    stalls: dict[str, dict[str, Any]] = {}
    for k, mode in enumerate(("mono", "disagg")):
        with launch(mode, **kw) as srv:
            res = run_interference(srv.url, replace(scenario, variant=k), label=mode, model=model)
        stalls[mode] = res.stats()
        ctx.log(f"serving: interference {mode}: {stalls[mode]}")
    out["interference"] = stalls
    out["sweep"] = _sweep(ctx, model, kw)
    _chart(ctx, model, stalls, out["sweep"])
    if not out["greedy_equal"]:
        raise RuntimeError("greedy tokens differ between mono and 1P1D on one device (fp32)")


def _sweep(ctx: Ctx, model: str, kw: dict[str, Any]) -> list[dict[str, Any]]:
    """Mono vs 1P1D at a few fixed rates of the Azure conversation mix; the rows of labkit.bench.sweep."""
    from labkit.bench.sweep import ModeSpec, SweepConfig, run_sweep
    from labkit.serve.launcher import launch

    @contextmanager
    def factory(spec: ModeSpec) -> Iterator[str]:
        with launch(spec.mode, **kw) as srv:
            yield srv.url

    rates = (8.0,) if ctx.smoke else (4.0, 16.0, 48.0)
    cfg = SweepConfig(
        "azure-conv-2023",
        rates_rps=rates,
        modes=("mono", "1p1d"),
        n_requests=4 if ctx.smoke else 32,
        max_model_len=1024 if ctx.smoke else 8192,
        warmup_requests=1,
        request_timeout_s=300,
        progress=False,
    )
    rows = run_sweep(cfg, factory, model=model).rows
    keep = (
        "mode",
        "rate_rps",
        "ok",
        "errors",
        "ttft_p50_ms",
        "ttft_p99_ms",
        "itl_p50_ms",
        "itl_p99_ms",
        "tpot_p50_ms",
        "output_throughput_tps",
    )
    rows = [{k: r.get(k) for k in keep} for r in rows]
    for r in rows:
        ctx.log(f"serving: sweep {r}")
    return rows


def _chart(ctx: Ctx, model: str, stalls: dict[str, dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    from labkit.plots.style import new_figure

    fig, axes = new_figure(1, 2, figsize=(14, 5))
    modes = list(stalls)
    axes[0].bar(
        [m if m == "mono" else "1P1D" for m in modes],
        [stalls[m]["decode_stall_max_ms"] for m in modes],
        color=["#d62728", "#2ca02c"][: len(modes)],
    )
    axes[0].set_ylabel("worst decode stall (ms)")
    axes[0].set_title("A long prompt arrives while 4 decode")
    for mode, color in (("mono", "#d62728"), ("1p1d", "#2ca02c")):
        pts = [r for r in rows if r["mode"] == mode]
        axes[1].plot(
            [r["rate_rps"] for r in pts], [r["itl_p99_ms"] for r in pts], "o-", color=color, label=f"{mode} p99 ITL"
        )
        axes[1].plot(
            [r["rate_rps"] for r in pts], [r["ttft_p50_ms"] for r in pts], "s--", color=color, label=f"{mode} p50 TTFT"
        )
    axes[1].set_xlabel("request rate (req/s)")
    axes[1].set_ylabel("ms")
    axes[1].set_yscale("log")
    axes[1].set_title("Azure conversation mix")
    axes[1].legend(fontsize=10)
    fig.suptitle(f"The lab's server on one device ({model}, {ctx.device})")
    ctx.save(fig, "serving")
