"""Charts of lesson 01: the roofline, utilization over time, MFU/MBU, and the sweeps.

Every function takes measurement records (dicts from `labkit.measure`) and returns a
matplotlib Figure in the lab's style; nothing here measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from labkit.plots.style import PHASE_COLORS, new_figure

if TYPE_CHECKING:
    from labkit.hardware import Datasheet, Peaks
    from labkit.telemetry import Sampler


def _label(r: dict[str, Any]) -> str:
    if r["phase"] == "prefill":
        return f"prefill {r['prompt_len']} tok" + (f" ×{r['batch']}" if r["batch"] > 1 else "")
    return f"decode b={r['batch']}"


def roofline_chart(
    peaks: Peaks,
    records: Sequence[dict[str, Any]],
    *,
    dtype: str = "float32",
    datasheet: Datasheet | None = None,
    title: str | None = None,
    extra_intensities: Sequence[float] = (),
):
    """Log-log roofline: measured roofs, the ridge, and each record at (FLOP/byte, achieved FLOP/s).

    extra_intensities widen the x range (for points another function adds)."""
    import numpy as np

    fig, ax = new_figure()
    peak, bw = peaks.peak_flops(dtype), peaks.read_bytes_per_s
    ridge = peak / bw
    xs = [r["intensity_flop_per_byte"] for r in records] + [ridge, *extra_intensities]
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
    several_runners = len({r.get("runner") for r in records}) > 1
    for r in records:
        c = PHASE_COLORS.get(r["phase"], "black")
        text = f"{r['model']}: {_label(r)}" if several_models else _label(r)
        if several_runners:
            text += f" ({r['runner']})"
        ax.scatter(r["intensity_flop_per_byte"], r["achieved_flops_per_s"], s=90, color=c, zorder=3, edgecolor="white")
        ax.annotate(
            text,
            (r["intensity_flop_per_byte"], r["achieved_flops_per_s"]),
            textcoords="offset points",
            xytext=(7, 5),
            fontsize=11,
            color=c,
        )
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
        gpu = [
            m
            for m in ("gpu_util_pct", "tensor_active_pct", "sm_active_pct", "dram_bw_util_pct", "mem_util_pct")
            if m in df.columns
        ]
        metrics = gpu or [c for c in df.columns if c.startswith("cpu") and c.endswith("_pct")]
    for m in metrics:
        if m in df.columns:
            ax.plot(df["t_s"], df[m], label=m.removesuffix("_pct"), lw=1.8 if m != "cpu_util_pct" else 3)
    seen: set[str] = set()
    for p in sampler.phases:
        ax.axvspan(
            p.start_s,
            p.end_s,
            color=PHASE_COLORS.get(p.name, "gray"),
            alpha=0.15,
            label=None if p.name in seen else f"phase: {p.name}",
        )
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


def decode_batch_sweep(
    records: Sequence[dict[str, Any]], critical_batch: int | None = None, title: str = "Decode: batch size sweep"
):
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
        a2.text(
            critical_batch,
            0.96,
            f"critical batch ≈ {critical_batch} ",
            transform=a2.get_xaxis_transform(),
            color="gray",
            fontsize=11,
            va="top",
            ha="right",
        )
    a2.set_xlabel("decode batch (sequences)")
    a2.set_ylabel("% of measured peak")
    a2.set_title("utilization")
    a2.legend()
    fig.suptitle(title, fontweight="bold")
    return fig


def prefill_length_sweep(
    records: Sequence[dict[str, Any]], title: str = "Prefill: prompt length sweep", reference: Sequence[Any] = ()
):
    """Left: prefill time (ms) vs prompt length; right: MFU (%) vs prompt length, with reference
    machines' prefill points (`labkit.reference.PhasePoint`) as dashed grey lines."""
    fig, (a1, a2) = new_figure(1, 2)
    n = [r["prompt_len"] for r in records]
    a1.plot(n, [r["ms"] for r in records], "o-", color=PHASE_COLORS["prefill"])
    a1.set_xlabel("prompt length (tokens)")
    a1.set_ylabel("prefill time (ms)")
    a1.set_title("time")
    a2.plot(n, [100 * (r.get("mfu") or 0) for r in records], "o-", color=PHASE_COLORS["prefill"], label="this machine")
    groups: dict[str, list[Any]] = {}
    for p in reference:
        groups.setdefault(f"{p.machine.split(' (')[0]} (reference): {p.model} ({p.runner})", []).append(p)
    for i, (label, pts) in enumerate(groups.items()):
        pts = sorted(pts, key=lambda p: p.seq_len)
        a2.plot(
            [p.seq_len for p in pts],
            [100 * (p.mfu or 0) for p in pts],
            _REF_MARKERS[i % len(_REF_MARKERS)] + "--",
            color=_REF_GREYS[i % len(_REF_GREYS)],
            label=label,
        )
    a2.set_xlabel("prompt length (tokens)")
    a2.set_ylabel("MFU (% of matmul peak)")
    a2.set_ylim(0, max([105.0] + [110 * (r.get("mfu") or 0) for r in records]))
    a2.set_title("MFU")
    if groups:
        a2.legend(fontsize=9, loc="lower right")
    for a in (a1, a2):
        a.set_xscale("log", base=2)
    fig.suptitle(title, fontweight="bold")
    return fig


def util_vs_mfu(
    phase_means: dict[str, dict[str, float]],
    records: Sequence[dict[str, Any]],
    title: str = "What 'GPU utilization' says vs what the hardware did",
):
    """Per phase: NVML GPU utilization, tensor-core activity (GPM), DRAM bandwidth util, MFU and MBU (%).

    On a CPU the first bar is the mean per-core utilization instead.
    """
    import numpy as np

    fig, ax = new_figure()
    phases = [p for p in ("prefill", "decode") if p in phase_means]
    by_phase = {r["phase"]: r for r in records}
    series = [
        ("gpu_util_pct", "NVML GPU util"),
        ("cpu_util_pct", "CPU core util"),
        ("tensor_active_pct", "tensor-core active (GPM)"),
        ("dram_bw_util_pct", "DRAM BW util (GPM)"),
    ]
    series = [(k, lab) for k, lab in series if any(k in phase_means[p] for p in phases)]
    bars = [(lab, [phase_means[p].get(k, 0.0) for p in phases]) for k, lab in series]
    bars += [
        ("MFU", [100 * (by_phase.get(p, {}).get("mfu") or 0) for p in phases]),
        ("MBU", [100 * (by_phase.get(p, {}).get("mbu") or 0) for p in phases]),
    ]
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


# --- reference machines beside the learner's (labkit.reference) ---------------------------------

_REF_MARKERS = ("D", "^", "s", "v", "P")
_REF_GREYS = ("#555555", "#8c8c8c", "#b0b0b0")


def _ref_label(p: Any) -> str:
    return f"{p.machine.split(' (')[0]} (reference): {p.model} {p.phase} ({p.runner})"


def add_reference_roofs(ax: Any, references: Sequence[tuple[Any, Sequence[Any]]], lo: float, hi: float) -> None:
    """Draws each reference machine's measured roof (dashed grey) and its points (hollow, phase-coloured edge)."""
    import numpy as np

    x = np.logspace(np.log10(lo), np.log10(hi), 200)
    for i, (roofs, points) in enumerate(references):
        grey, marker = _REF_GREYS[i % len(_REF_GREYS)], _REF_MARKERS[i % len(_REF_MARKERS)]
        ax.loglog(
            x,
            np.minimum(roofs.peak_flops, roofs.read_bytes_per_s * x),
            color=grey,
            ls="--",
            lw=1.5,
            label=f"{roofs.machine.split(' (')[0]} roof ({roofs.dtype}, measured)",
        )
        for p in points:
            c = PHASE_COLORS.get(p.phase, "black")
            ax.scatter(
                p.intensity_flop_per_byte,
                p.achieved_flops_per_s,
                s=80,
                marker=marker,
                facecolor="white",
                edgecolor=c,
                linewidth=2,
                zorder=3,
            )
            ax.annotate(
                _ref_label(p),
                (p.intensity_flop_per_byte, p.achieved_flops_per_s),
                textcoords="offset points",
                xytext=(7, -12),
                fontsize=9,
                color=grey,
            )


def roofline_with_references(
    peaks: Peaks,
    records: Sequence[dict[str, Any]],
    references: Sequence[tuple[Any, Sequence[Any]]],
    *,
    dtype: str = "float32",
    title: str | None = None,
):
    """The roofline of this machine with its measured points, and reference machines' roofs and points
    (pairs of `labkit.reference.Roofs` and `PhasePoint`s) on the same log-log axes."""
    ref_xs = [p.intensity_flop_per_byte for _, ps in references for p in ps]
    fig = roofline_chart(peaks, records, dtype=dtype, title=title, extra_intensities=ref_xs)
    ax = fig.axes[0]
    xs = [r["intensity_flop_per_byte"] for r in records] + ref_xs + [peaks.ridge_flop_per_byte(dtype)]
    add_reference_roofs(ax, references, min(xs) / 4, max(xs) * 4)
    ax.legend(loc="lower right", fontsize=10)
    return fig


def mfu_mbu_with_references(
    records: Sequence[dict[str, Any]],
    references: Sequence[Any],
    title: str = "MFU in prefill, MBU in decode: this machine and reference machines",
):
    """Two panels of bars: prefill MFU and decode MBU (%), this machine's records (solid) above the
    reference machines' points (hatched)."""
    fig, axes = new_figure(1, 2, figsize=(15, 5.5))
    for ax, phase, key, what in (
        (axes[0], "prefill", "mfu", "MFU (% of matmul peak)"),
        (axes[1], "decode", "mbu", "MBU (% of read bandwidth)"),
    ):
        rows = [
            (f"this machine: {r['model']} ({r['runner']})", 100 * (r.get(key) or 0), False)
            for r in records
            if r["phase"] == phase
        ]
        rows += [
            (_ref_label(p).replace(f" {phase} ", " "), 100 * (getattr(p, key) or 0), True)
            for p in references
            if p.phase == phase
        ]
        rows = rows[::-1]
        bars = ax.barh(
            [r[0] for r in rows], [r[1] for r in rows], color=PHASE_COLORS[phase], alpha=0.9, edgecolor="black"
        )
        for b, r in zip(bars, rows):
            if r[2]:
                b.set_alpha(0.35)
                b.set_hatch("//")
        ax.bar_label(bars, fmt="%.0f%%", fontsize=10, padding=3)
        ax.set_xlim(0, max([110.0] + [r[1] * 1.15 for r in rows]))
        ax.set_xlabel(what)
        ax.set_title(phase)
        ax.tick_params(axis="y", labelsize=10)
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig


def decode_intensity_vs_batch(
    shape: Any,
    contexts: Sequence[int],
    ridges: dict[str, float],
    *,
    dtype: str = "bfloat16",
    max_batch: int = 4096,
    title: str | None = None,
):
    """Decode FLOP/byte against the batch at several contexts (labkit.roofline), with ridge lines: a
    context whose curve levels off below a ridge never turns compute-bound on that machine."""
    import numpy as np

    from labkit.roofline import critical_batch, decode_cost

    fig, ax = new_figure(figsize=(11, 6.5))
    batches = np.unique(np.geomspace(1, max_batch, 60).astype(int))
    for i, ctx in enumerate(contexts):
        y = [decode_cost(shape, int(b), ctx, dtype).intensity_flop_per_byte for b in batches]
        (line,) = ax.loglog(
            batches,
            y,
            lw=2.4,
            label=f"context {ctx:,}",
            color=__import__("matplotlib").colormaps["Blues"](0.35 + 0.65 * i / max(1, len(contexts) - 1)),
        )
        for name, ridge in ridges.items():
            b = critical_batch(shape, ridge, dtype, ctx, max_batch=max_batch)
            if b:
                ax.scatter(
                    [b],
                    [decode_cost(shape, b, ctx, dtype).intensity_flop_per_byte],
                    color=line.get_color(),
                    zorder=3,
                    s=60,
                    edgecolor="black",
                )
    for j, (name, ridge) in enumerate(ridges.items()):
        ax.axhline(ridge, color="black", ls=("--", ":")[j % 2], lw=1.5, label=f"ridge: {name} ({ridge:.0f} FLOP/B)")
    ax.set_xlabel("decode batch (sequences)")
    ax.set_ylabel("arithmetic intensity (FLOP / byte)")
    ax.set_title(title or f"{shape.name or 'model'} decode ({dtype}): intensity against batch, per context")
    ax.legend(fontsize=10, loc="upper left")
    return fig


def decode_steps_vs_prediction(
    panels: Sequence[dict[str, Any]], title: str = "Decode steps: measured, and the bytes / bandwidth lower bound"
):
    """One panel per dict {title, batch, measured_ms, predicted_ms}: both against the batch, with each
    point's MBU (predicted / measured) written beside it."""
    fig, axes = new_figure(1, len(panels), figsize=(7.5 * len(panels), 5.5))
    axes = list(axes) if len(panels) > 1 else [axes]
    for ax, p in zip(axes, panels):
        ax.plot(p["batch"], p["measured_ms"], "o-", color=PHASE_COLORS["decode"], label="measured")
        ax.plot(p["batch"], p["predicted_ms"], "s--", color="black", label="predicted lower bound (your function)")
        for b, m, q in zip(p["batch"], p["measured_ms"], p["predicted_ms"]):
            ax.annotate(f"MBU {q / m:.2f}", (b, m), textcoords="offset points", xytext=(4, 6), fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.set_xlabel("decode batch (sequences)")
        ax.set_ylabel("ms per step")
        ax.set_title(p["title"], fontsize=14)
        ax.legend(fontsize=10, loc="upper left")
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig


def first_look(
    flops_per_s: float,
    bytes_per_s: float,
    references: Sequence[Any] = (),
    *,
    title: str = "First look: this machine's two roofs",
):
    """Two panels of bars (log scale): matmul GFLOP/s and read GB/s of this machine, beside the
    reference machines' measured roofs (`labkit.reference.Roofs`)."""
    fig, axes = new_figure(1, 2)
    names = ["this machine"] + [f"{r.machine.split(' (')[0]}\n(reference, {r.dtype})" for r in references]
    colors = [PHASE_COLORS["prefill"]] + ["#bbbbbb"] * len(references)
    for ax, vals, unit, what in (
        (axes[0], [flops_per_s] + [r.peak_flops for r in references], 1e9, "GFLOP/s"),
        (axes[1], [bytes_per_s] + [r.read_bytes_per_s for r in references], 1e9, "GB/s"),
    ):
        bars = ax.bar(
            names,
            [v / unit for v in vals],
            color=colors if what == "GFLOP/s" else [PHASE_COLORS["decode"]] + colors[1:],
            edgecolor="black",
        )
        ax.bar_label(
            bars, labels=[f"{v / unit:,.0f}" if v / unit >= 10 else f"{v / unit:.2g}" for v in vals], fontsize=11
        )
        ax.set_yscale("log")
        ax.set_ylabel(what + " (log scale)")
        ax.tick_params(axis="x", labelsize=10, rotation=10)
    axes[0].set_title("compute: what prefill needs")
    axes[1].set_title("bandwidth: what decode needs")
    fig.suptitle(title, fontweight="bold")
    fig.tight_layout()
    return fig
