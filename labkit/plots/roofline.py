"""Charts of lesson 01: the roofline, utilization over time, MFU/MBU, and the sweeps.

Every function takes measurement records (dicts from `labkit.measure`) and returns a
matplotlib Figure in the lab's style; nothing here measures.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from labkit.plots.style import PHASE_COLORS, new_figure

if TYPE_CHECKING:
    from labkit.hardware import Datasheet, Peaks
    from labkit.telemetry import Sampler


def _label(r: dict[str, Any]) -> str:
    if r["phase"] == "prefill":
        return f"prefill {r['prompt_len']} tok" + (f" ×{r['batch']}" if r["batch"] > 1 else "")
    return f"decode b={r['batch']}"


def roofline_chart(peaks: Peaks, records: Sequence[dict[str, Any]], *, dtype: str = "float32",
                   datasheet: Datasheet | None = None, title: str | None = None):
    """Log-log roofline: measured roofs, the ridge, and each record at (FLOP/byte, achieved FLOP/s)."""
    import numpy as np

    fig, ax = new_figure()
    peak, bw = peaks.peak_flops(dtype), peaks.read_bytes_per_s
    ridge = peak / bw
    xs = [r["intensity_flop_per_byte"] for r in records] + [ridge]
    lo, hi = min(xs) / 4, max(xs) * 4
    x = np.logspace(np.log10(lo), np.log10(hi), 200)
    ax.loglog(x, np.minimum(peak, bw * x), color="black", label=f"measured roof ({dtype})")
    ax.axvline(ridge, color="gray", ls="--", lw=1.5)
    ax.annotate(f"ridge {ridge:.1f} FLOP/B", (ridge, peak), textcoords="offset points", xytext=(6, -18), color="gray")
    ax.text(lo * 1.3, bw * lo * 1.6, f"{bw / 1e9:,.1f} GB/s", rotation=0, color="black", fontsize=12)
    ax.text(hi / 1.3, peak * 1.15, f"{peak / 1e9:,.0f} GFLOP/s", ha="right", fontsize=12)
    if datasheet is not None and dtype in datasheet.flops:
        dp, dbw = datasheet.flops[dtype], datasheet.bandwidth_bytes_per_s
        ax.loglog(x, np.minimum(dp, dbw * x), color="gray", ls=":", label=f"{datasheet.name} datasheet")
    several_models = len({r.get("model") for r in records}) > 1
    for r in records:
        c = PHASE_COLORS.get(r["phase"], "black")
        text = f"{r['model']}: {_label(r)}" if several_models else _label(r)
        ax.scatter(r["intensity_flop_per_byte"], r["achieved_flops_per_s"], s=90, color=c, zorder=3,
                   edgecolor="white")
        ax.annotate(text, (r["intensity_flop_per_byte"], r["achieved_flops_per_s"]),
                    textcoords="offset points", xytext=(7, 5), fontsize=11, color=c)
    for ph in dict.fromkeys(r["phase"] for r in records):
        ax.scatter([], [], color=PHASE_COLORS.get(ph, "black"), label=ph)
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(title or f"Roofline: {peaks.device_name[:40]}")
    ax.legend(loc="lower right")
    return fig


def utilization_timeline(sampler: Sampler, metrics: Sequence[str] | None = None, title: str | None = None):
    """Metrics over time (%), with each phase shaded in its colour."""
    fig, ax = new_figure()
    df = sampler.frame()
    if metrics is None:
        gpu = [m for m in ("gpu_util_pct", "tensor_active_pct", "sm_active_pct", "dram_bw_util_pct", "mem_util_pct")
               if m in df.columns]
        metrics = gpu or [c for c in df.columns if c.startswith("cpu") and c.endswith("_pct")]
    for m in metrics:
        if m in df.columns:
            ax.plot(df["t_s"], df[m], label=m.removesuffix("_pct"), lw=1.8 if m != "cpu_util_pct" else 3)
    seen: set[str] = set()
    for p in sampler.phases:
        ax.axvspan(p.start_s, p.end_s, color=PHASE_COLORS.get(p.name, "gray"), alpha=0.15,
                   label=None if p.name in seen else f"phase: {p.name}")
        seen.add(p.name)
    ax.set_ylim(0, 105)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("utilization (%)")
    ax.set_title(title or f"Utilization over time ({sampler.source_name})")
    ax.legend(loc="lower right", ncol=2, fontsize=10)
    return fig


def utilization_bars(records: Sequence[dict[str, Any]], title: str = "MFU and MBU per phase"):
    """Grouped bars: MFU and MBU (%) for each record."""
    import numpy as np

    fig, ax = new_figure()
    labels = [_label(r) for r in records]
    x = np.arange(len(records))
    mfu = [100 * (r.get("mfu") or 0) for r in records]
    mbu = [100 * (r.get("mbu") or 0) for r in records]
    b1 = ax.bar(x - 0.2, mfu, 0.4, label="MFU (of matmul peak)", color=PHASE_COLORS["prefill"])
    b2 = ax.bar(x + 0.2, mbu, 0.4, label="MBU (of read bandwidth)", color=PHASE_COLORS["decode"])
    ax.bar_label(b1, fmt="%.0f%%", fontsize=11)
    ax.bar_label(b2, fmt="%.0f%%", fontsize=11)
    ax.set_xticks(x, labels)
    ax.set_ylabel("% of this machine's measured peak")
    ax.set_ylim(0, max(110, *mfu, *mbu) * 1.1)
    ax.set_title(title)
    ax.legend()
    return fig


def decode_batch_sweep(records: Sequence[dict[str, Any]], critical_batch: int | None = None,
                       title: str = "Decode: batch size sweep"):
    """Left: output tokens/s vs batch; right: MFU and MBU vs batch, with the critical batch marked."""
    fig, (a1, a2) = new_figure(1, 2)
    b = [r["batch"] for r in records]
    a1.plot(b, [r["tokens_per_s"] for r in records], "o-", color=PHASE_COLORS["decode"])
    a1.set_xscale("log", base=2)
    a1.set_xlabel("decode batch (sequences)")
    a1.set_ylabel("output tokens/s")
    a1.set_title("throughput")
    a2.plot(b, [100 * (r.get("mfu") or 0) for r in records], "o-", color=PHASE_COLORS["prefill"], label="MFU")
    a2.plot(b, [100 * (r.get("mbu") or 0) for r in records], "s-", color=PHASE_COLORS["decode"], label="MBU")
    a2.set_xscale("log", base=2)
    if critical_batch:
        for a in (a1, a2):
            a.axvline(critical_batch, color="gray", ls="--", lw=1.5)
        # x in data units, y in axes units: the label stays visible whatever the y range
        a2.text(critical_batch, 0.96, f"critical batch ≈ {critical_batch} ", transform=a2.get_xaxis_transform(),
                color="gray", fontsize=11, va="top", ha="right")
    a2.set_xlabel("decode batch (sequences)")
    a2.set_ylabel("% of measured peak")
    a2.set_title("utilization")
    a2.legend()
    fig.suptitle(title, fontweight="bold")
    return fig


def prefill_length_sweep(records: Sequence[dict[str, Any]], title: str = "Prefill: prompt length sweep"):
    """Left: prefill time (ms) vs prompt length; right: MFU (%) vs prompt length."""
    fig, (a1, a2) = new_figure(1, 2)
    n = [r["prompt_len"] for r in records]
    a1.plot(n, [r["ms"] for r in records], "o-", color=PHASE_COLORS["prefill"])
    a1.set_xlabel("prompt length (tokens)")
    a1.set_ylabel("prefill time (ms)")
    a1.set_title("time")
    a2.plot(n, [100 * (r.get("mfu") or 0) for r in records], "o-", color=PHASE_COLORS["prefill"])
    a2.set_xlabel("prompt length (tokens)")
    a2.set_ylabel("MFU (% of matmul peak)")
    a2.set_ylim(0, 105)
    a2.set_title("MFU")
    for a in (a1, a2):
        a.set_xscale("log", base=2)
    fig.suptitle(title, fontweight="bold")
    return fig


def util_vs_mfu(phase_means: dict[str, dict[str, float]], records: Sequence[dict[str, Any]],
                title: str = "What 'GPU utilization' says vs what the hardware did"):
    """Per phase: NVML GPU utilization, tensor-core activity (GPM), DRAM bandwidth util, MFU and MBU (%).

    On a CPU the first bar is the mean per-core utilization instead.
    """
    import numpy as np

    fig, ax = new_figure()
    phases = [p for p in ("prefill", "decode") if p in phase_means]
    by_phase = {r["phase"]: r for r in records}
    series = [("gpu_util_pct", "NVML GPU util"), ("cpu_util_pct", "CPU core util"),
              ("tensor_active_pct", "tensor-core active (GPM)"), ("dram_bw_util_pct", "DRAM BW util (GPM)")]
    series = [(k, lab) for k, lab in series if any(k in phase_means[p] for p in phases)]
    bars = [(lab, [phase_means[p].get(k, 0.0) for p in phases]) for k, lab in series]
    bars += [("MFU", [100 * (by_phase.get(p, {}).get("mfu") or 0) for p in phases]),
             ("MBU", [100 * (by_phase.get(p, {}).get("mbu") or 0) for p in phases])]
    x = np.arange(len(phases))
    w = 0.8 / len(bars)
    for i, (lab, vals) in enumerate(bars):
        bc = ax.bar(x - 0.4 + w * (i + 0.5), vals, w, label=lab)
        ax.bar_label(bc, fmt="%.0f", fontsize=10)
    ax.set_xticks(x, phases)
    ax.set_ylabel("%")
    ax.set_ylim(0, 115)
    ax.set_title(title)
    ax.legend(ncol=2, fontsize=10, loc="upper center")
    return fig
