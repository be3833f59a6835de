"""Charts of notebook 06 (the planner): the fit, the units, simulated latencies, the gain-vs-devices
curve, the gain map, validation and the simulator's report card."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from labkit.plots.style import MODE_COLORS, PHASE_COLORS, new_figure


def _mode_color(label: str) -> str:
    if label.startswith("mono-chunked") or "chunked" in label:
        return MODE_COLORS["mono-chunked"]
    if "mono" in label:
        return MODE_COLORS["mono"]
    return MODE_COLORS["disagg"]


def plot_fit(
    cal: Any,
    title: str = "The latency model, fitted on your measurements",
    *,
    other: Any = None,
    other_label: str = "your fit",
    held_out: Sequence[Any] = (),
) -> Any:
    """Two panels: prefill time against prompt tokens, decode step time against context, fit and points.

    `other`: a second LatencyModel whose decode formula is drawn dashed beside the lab's fit;
    `held_out`: decode samples to mark hollow (the steps a fit did not see).
    """
    fig, (ax1, ax2) = new_figure(1, 2)
    m = cal.model
    t = np.array([s.num_tokens for s in cal.prefill_samples])
    y = np.array([s.elapsed_s for s in cal.prefill_samples]) * 1e3
    grid = np.linspace(1, t.max() * 1.1, 200)
    ax1.plot(t, y, "o", color=PHASE_COLORS["prefill"], label="measured")
    ax1.plot(
        grid, m.prefill_s(grid) * 1e3, "-", color="black", lw=1.6, label=f"a + b·T + c·T²  (R² {m.r2_prefill:.3f})"
    )
    ax1.set(xlabel="prompt tokens T", ylabel="prefill time (ms)", title="Prefill: compute grows with T")
    ax1.legend()
    batches = sorted({s.batch_size for s in cal.decode_samples})
    cmap = __import__("matplotlib").colormaps["Blues"]
    for i, b in enumerate(batches):
        pts = [s for s in cal.decode_samples if s.batch_size == b]
        c = np.array([s.context_tokens for s in pts])
        yy = np.array([s.elapsed_s for s in pts]) * 1e3
        col = cmap(0.4 + 0.6 * i / max(1, len(batches) - 1))
        held = np.array([s in held_out for s in pts], dtype=bool)
        if (~held).any():
            ax2.plot(c[~held], yy[~held], "o", color=col, label=f"batch {b}")
        if held.any():
            ax2.plot(c[held], yy[held], "o", color=col, mfc="none", mew=2, label=f"batch {b} (held out)")
        cg = np.linspace(c.min(), c.max(), 20)
        ax2.plot(cg, m.decode_step_s(b, cg) * 1e3, "-", color=col, lw=1.4)
        if other is not None:
            ax2.plot(cg, other.decode_step_s(b, cg) * 1e3, "--", color=col, lw=1.6)
    if other is not None:
        ax2.plot([], [], "--", color="gray", label=other_label)
    ax2.set(
        xlabel="KV tokens in the batch S",
        ylabel="decode step time (ms)",
        title=f"Decode: a + b·S + c·B  (R² {m.r2_decode:.3f})",
    )
    ax2.legend(fontsize=10)
    fig.suptitle(title, fontsize=16, fontweight="bold")
    fig.tight_layout()
    return fig


def plot_layouts(search: Any, title: str = "Goodput per device of each layout") -> Any:
    """Horizontal bars: goodput per device (req/s) of every candidate, best on top."""
    scores = search.scores[:12]
    fig, ax = new_figure(figsize=(10, 0.45 * len(scores) + 1.8))
    labels = [s.label for s in scores][::-1]
    vals = [s.goodput_rps_per_device for s in scores][::-1]
    ax.barh(labels, vals, color=[_mode_color(lbl) for lbl in labels])
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=11)
    ax.set(xlabel="goodput per device (req/s meeting every SLO at >= 90% attainment)", title=title)
    ax.grid(axis="y", alpha=0)
    fig.tight_layout()
    return fig


def plot_gain_curve(curve: Any, title: str = "Does disaggregation pay at this many devices?") -> Any:
    """Two panels over the device count: goodput per device of the best disaggregated deployment and
    of mono-dp (idle devices counted), and their ratio with the 1.10 / 0.95 verdict lines."""
    fig, (ax1, ax2) = new_figure(1, 2, figsize=(16, 5.2))
    n = np.asarray(curve.devices)
    ax1.plot(n, curve.per_device("mono"), "-", color=MODE_COLORS["mono"], label="mono-dp (N replicas)")
    ax1.plot(n, curve.per_device("disagg"), "-o", ms=4, color=MODE_COLORS["disagg"], label="best disaggregated")
    ax1.set(xlabel="devices", ylabel="goodput per device (req/s)", title="Goodput per device, idle devices counted")
    ax1.set_ylim(bottom=0)
    ax1.legend()
    g = curve.gain
    ax2.plot(n, g, "-o", ms=4, color="black", label="gain")
    ax2.axhline(1.10, color=MODE_COLORS["disagg"], ls="--", lw=1.4, label="1.10: disaggregate")
    ax2.axhline(0.95, color=MODE_COLORS["mono"], ls="--", lw=1.4, label="0.95: stay monolithic")
    k = curve.pays_from()
    if k is not None:
        ax2.axvline(k, color="gray", ls=":", lw=1.5, label=f"pays from {k}")
    ax2.set(xlabel="devices", ylabel="best disaggregated / mono-dp (x)", title="Gain")
    ax2.legend(fontsize=10)
    for ax in (ax1, ax2):
        ax.set_xlim(n.min() - 0.5, n.max() + 0.5)
    fig.suptitle(title, fontsize=16, fontweight="bold")
    fig.tight_layout()
    return fig


def plot_sim_compare(results: Mapping[str, Any], slo: Any, title: str = "Simulated latencies at this rate") -> Any:
    """Three panels: TTFT CDF, TPOT CDF (with the SLOs), goodput per device (bars)."""
    fig, axes = new_figure(1, 3, figsize=(17, 4.8))
    for label, r in results.items():
        col = _mode_color(label)
        for ax, vals in ((axes[0], r.ttft_s), (axes[1], r.tpot_s)):
            v = np.sort(vals) * 1e3
            ax.plot(
                v, np.arange(1, len(v) + 1) / len(v), color=col, label=label, ls="--" if "chunked" in label else "-"
            )
    for ax, lim, name in ((axes[0], slo.ttft_s, "TTFT"), (axes[1], slo.tpot_s, "TPOT")):
        ax.axvline(lim * 1e3, color="black", ls=":", lw=1.5, label=f"SLO {lim * 1e3:g} ms")
        ax.set(xlabel=f"{name} (ms)", ylabel="share of requests", title=f"{name}, cumulative")
        ax.set_xscale("log")
        ax.legend(fontsize=10)
    labels = list(results)
    gp = [results[k].goodput_rps(slo) / results[k].layout.num_devices for k in labels]
    axes[2].bar(labels, gp, color=[_mode_color(k) for k in labels])
    axes[2].set(ylabel="goodput per device (req/s)", title="Goodput per device")
    axes[2].tick_params(axis="x", rotation=20)
    fig.suptitle(title, fontsize=16, fontweight="bold")
    fig.tight_layout()
    return fig


def plot_validation(
    rows: Sequence[Any], tolerance: float | None = None, title: str = "Simulator against measurement"
) -> Any:
    """Predicted against measured per metric (log-log), with the y = x line and the band of each
    metric's target (p50 10%, p99 20%, throughput 10%; or one `tolerance` for all). One panel per
    metric the rows hold."""
    from labkit.plan.card import METRICS, NAMES, target_for

    metrics = [m for m in METRICS if any(r.metric == m for r in rows)]
    cols = min(4, max(1, len(metrics)))
    nrows = -(-len(metrics) // cols) or 1
    fig, axes = new_figure(nrows, cols, figsize=(4.6 * cols, 4.4 * nrows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[len(metrics) :]:
        ax.set_visible(False)
    for ax, metric in zip(flat, metrics):
        pts = [r for r in rows if r.metric == metric]
        tol = target_for(metric) if tolerance is None else tolerance
        for mode in sorted({r.mode for r in pts}):
            sel = [r for r in pts if r.mode == mode]
            ax.plot(
                [r.measured for r in sel],
                [r.predicted for r in sel],
                "o",
                ms=10,
                color=MODE_COLORS.get(mode, "#333333"),
                label=mode,
            )
        lo = min(min(r.measured, r.predicted) for r in pts) * 0.7
        hi = max(max(r.measured, r.predicted) for r in pts) * 1.3
        g = np.geomspace(lo, hi, 50)
        ax.plot(g, g, "-", color="black", lw=1)
        ax.fill_between(g, g * (1 - tol), g * (1 + tol), color="gray", alpha=0.2, label=f"±{tol:.0%}")
        unit = "" if metric == "output_tok_s" else " (ms)"
        ax.set(xscale="log", yscale="log", xlabel=f"measured{unit}", ylabel=f"predicted{unit}", title=NAMES[metric])
        ax.legend(fontsize=10)
    fig.suptitle(title, fontsize=16, fontweight="bold")
    fig.tight_layout()
    return fig


def plot_report_card(card: Any, title: str = "The simulator's report card") -> Any:
    """One cell per run (row) and figure (column): the error, green within its target, red beyond
    (the shade grows with |error| / target), grey where the file has no such figure."""
    from matplotlib.colors import LinearSegmentedColormap

    from labkit.plan.card import METRICS, NAMES

    runs = card.runs
    fig, ax = new_figure(figsize=(1.6 * len(METRICS) + 3, 0.55 * max(len(runs), 1) + 2.6))
    score = np.full((max(len(runs), 1), len(METRICS)), np.nan)
    for i, (mode, rate) in enumerate(runs):
        for j, m in enumerate(METRICS):
            r = card.cell(mode, rate, m)
            if r is not None and np.isfinite(r.error):
                score[i, j] = min(abs(r.error) / r.target, 2.0)
                ax.text(
                    j,
                    i,
                    f"{r.error:+.1%}",
                    ha="center",
                    va="center",
                    fontsize=12,
                    fontweight="normal" if r.met else "bold",
                )
            else:
                ax.text(j, i, "missing", ha="center", va="center", fontsize=10, color="#555555")
    cmap = LinearSegmentedColormap.from_list("card", ["#2ca02c", "#c7e9c0", "#fdd0a2", "#d62728"]).with_extremes(
        bad="#dddddd"
    )
    im = ax.imshow(np.ma.masked_invalid(score), cmap=cmap, vmin=0, vmax=2, aspect="auto")
    ax.set_xticks(range(len(METRICS)), [NAMES[m] for m in METRICS], rotation=25, ha="right")
    ax.set_yticks(range(len(runs)), [f"{m} @ {r:g} req/s" for m, r in runs])
    ax.grid(False)
    fig.colorbar(im, ax=ax, label="|error| / target (1 = at the target)")
    met = {k: (sum(r.met for r in card.scored(k)), len(card.scored(k))) for k in ("p50", "p99", "throughput")}
    sub = "; ".join(f"{k}: {a} of {b} met" if b else f"{k}: none" for k, (a, b) in met.items())
    ax.set_title(f"{title}\n{sub}", fontsize=15)
    fig.tight_layout()
    return fig


def plot_gain_map(
    xs: Sequence[float],
    ys: Sequence[float],
    gain: np.ndarray,
    xlabel: str,
    ylabel: str,
    title: str = "Where disaggregation pays (goodput per device, xPyD / mono)",
) -> Any:
    """A heat map of the simulated gain over two knobs; > 1 (green) means disaggregation wins."""
    from matplotlib.colors import TwoSlopeNorm

    fig, ax = new_figure(figsize=(9, 6))
    g = np.asarray(gain, dtype=float)
    vmin, vmax = min(float(np.nanmin(g)), 0.99), max(float(np.nanmax(g)), 1.01)
    im = ax.imshow(g, origin="lower", aspect="auto", cmap="RdYlGn", norm=TwoSlopeNorm(1.0, vmin, vmax))
    ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    for i in range(len(ys)):
        for j in range(len(xs)):
            ax.text(j, i, f"{g[i, j]:.2f}", ha="center", va="center", fontsize=11)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(False)
    fig.colorbar(im, ax=ax, label="gain (x)")
    fig.tight_layout()
    return fig


def plot_transfer_vs_prefill(
    latency: Any,
    prompt_tokens: int,
    gbps: Sequence[float],
    *,
    mark_gbps: float | None = None,
    links: Mapping[str, float] | None = None,
    title: str = "KV transfer against the prefill it follows",
) -> Any:
    """Transfer time of one prompt's KV against link speed (log-log), the prefill time as a line,
    `mark_gbps` (e.g. the learner's break-even) and named `links` (label -> Gbit/s) as dots."""
    from labkit.links import Link

    fig, ax = new_figure(figsize=(10, 5))
    nbytes = prompt_tokens * latency.kv_bytes_per_token
    g = np.asarray(gbps, dtype=float)
    ax.plot(
        g,
        [Link.from_gbps(x).seconds(nbytes) * 1e3 for x in g],
        "-",
        color=MODE_COLORS["disagg"],
        lw=2,
        label=f"KV of {prompt_tokens:,} tokens ({nbytes / 1e6:,.0f} MB)",
    )
    pre_ms = float(latency.prefill_s(prompt_tokens)) * 1e3
    ax.axhline(pre_ms, color=PHASE_COLORS["prefill"], ls="--", lw=1.8, label=f"its prefill: {pre_ms:,.0f} ms")
    for name, x in (links or {}).items():
        ax.plot([x], [Link.from_gbps(x).seconds(nbytes) * 1e3], "o", ms=9, color="black")
        ax.annotate(name, (x, Link.from_gbps(x).seconds(nbytes) * 1e3), textcoords="offset points", xytext=(6, 6))
    if mark_gbps is not None and mark_gbps > 0:
        ax.axvline(mark_gbps, color="gray", ls=":", lw=1.6, label=f"your break-even: {mark_gbps:,.3g} Gbit/s")
    ax.set(xscale="log", yscale="log", xlabel="link speed (Gbit/s)", ylabel="ms", title=title)
    ax.legend(fontsize=10)
    fig.tight_layout()
    return fig


def plot_claims(rows: Sequence[Any], article: Any, title: str = "The article's figures against the planner") -> Any:
    """Two panels, one bar per planned scenario (`labkit.plan.claims.ClaimRow`): the goodput gain and
    the cost saving, each with the article's claimed range shaded (`article`: labkit.reference.ARTICLE)."""
    fig, (ax1, ax2) = new_figure(1, 2, figsize=(15, 5))
    names = [r.scenario for r in rows]
    x = np.arange(len(rows))
    for ax, vals, (lo, hi), unit, label in (
        (ax1, [r.gain for r in rows], article.throughput_gain, "x", "goodput, best disaggregated / mono-dp (x)"),
        (ax2, [100 * r.cost_saving for r in rows], article.cost_saving_pct, "%", "lower cost per output token (%)"),
    ):
        ax.axhspan(lo, hi, color="gray", alpha=0.25, label=f"the article: {lo:g}-{hi:g}{unit}")
        ax.bar(x, vals, color=MODE_COLORS["disagg"], width=0.5, label="the planner")
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.2f}{unit}" if unit == "x" else f"{v:.0f}{unit}", ha="center", va="bottom", fontsize=12)
        ax.set_xticks(x, names, rotation=10)
        ax.set(ylabel=label)
        ax.set_ylim(bottom=min(0.0, *vals) if unit == "%" else 0.0)
        ax.legend(fontsize=10)
    ax1.axhline(1.0, color="black", lw=1)
    ax1.set_title("Throughput (goodput)")
    ax2.set_title("Cost")
    fig.suptitle(title, fontsize=16, fontweight="bold")
    fig.tight_layout()
    return fig
