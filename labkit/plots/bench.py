"""Charts of the gains: latency CDFs, percentiles and goodput against rate, per-device
throughput and cost. Every function takes sweep rows / runs and returns a matplotlib Figure.

Rows are the dicts `labkit.bench.sweep.summary_row` builds (`mode`, `rate_rps`,
`itl_p99_ms`, `goodput_rps`, ...); runs map (mode, rate) to a BenchResult.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from labkit.plots.style import MODE_COLORS, new_figure

_EXTRA_COLORS = ["#9467bd", "#17becf", "#bcbd22", "#e377c2", "#7f7f7f"]
_LABELS = {"ttft": "TTFT", "itl": "inter-token latency", "tpot": "TPOT", "e2e": "end-to-end latency"}


def _cap(text: str) -> str:
    """First letter upper case, the rest untouched (str.capitalize would turn TTFT into Ttft)."""
    return text[:1].upper() + text[1:]


def mode_color(mode: str, i: int = 0) -> str:
    """The lab's colour for a serving mode (xPyD other than 1p1d get the spare colours)."""
    return MODE_COLORS.get(mode, _EXTRA_COLORS[i % len(_EXTRA_COLORS)])


def _modes(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["mode"] for r in rows))


def _series(rows: Sequence[Mapping[str, Any]], mode: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = sorted((r["rate_rps"], r.get(key, np.nan)) for r in rows if r["mode"] == mode)
    return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)


def latency_values_ms(res: Any, metric: str) -> np.ndarray:
    """A run's per-request (TTFT, TPOT, E2E) or per-gap (ITL) latencies in ms."""
    ok = [r for r in res.records if r.ok]
    if metric == "itl":
        vals = [g for r in ok for g in r.itl_s]
    elif metric == "tpot":
        vals = [r.tpot_s for r in ok if r.output_tokens > 1]
    elif metric in ("ttft", "e2e"):
        vals = [getattr(r, f"{metric}_s") for r in ok]
    else:
        raise ValueError(f"metric must be ttft, itl, tpot or e2e, got {metric!r}")
    return np.asarray(vals, dtype=float) * 1000.0


def plot_latency_cdf(
    runs: Mapping[tuple[str, float], Any],
    metric: str = "itl",
    *,
    rate_rps: float | None = None,
    slo_ms: float | None = None,
    log_x: bool = True,
    title: str | None = None,
):
    """CDF of `metric` per mode at one rate (default: the highest rate every mode ran)."""
    modes = list(dict.fromkeys(m for m, _ in runs))
    if rate_rps is None:
        common = set.intersection(*({r for m2, r in runs if m2 == m} for m in modes)) if modes else set()
        rate_rps = max(common) if common else max(r for _, r in runs)
    fig, ax = new_figure()
    for i, mode in enumerate(modes):
        res = runs.get((mode, rate_rps))
        if res is None:
            continue
        v = np.sort(latency_values_ms(res, metric))
        if len(v):
            ax.step(
                v,
                np.arange(1, len(v) + 1) / len(v),
                where="post",
                color=mode_color(mode, i),
                label=f"{mode} (p99 {np.percentile(v, 99):,.0f} ms)",
            )
    if slo_ms:
        ax.axvline(slo_ms, color="black", ls="--", lw=1.5, label=f"SLO {slo_ms:g} ms")
    ax.axhline(0.99, color="grey", ls=":", lw=1)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(f"{_LABELS.get(metric, metric)} (ms)")
    ax.set_ylabel("fraction of " + ("gaps" if metric == "itl" else "requests"))
    ax.set_ylim(0, 1.02)
    ax.set_title(title or f"{_cap(_LABELS.get(metric, metric))} CDF at {rate_rps:g} req/s")
    ax.legend(loc="lower right")
    return fig


def plot_percentiles_vs_rate(
    rows: Sequence[Mapping[str, Any]],
    metric: str = "itl",
    percentiles: Sequence[int] = (50, 99),
    *,
    slo_ms: float | None = None,
    title: str | None = None,
):
    """`metric` p50 (dashed) and p99 (solid) against request rate, one colour per mode."""
    fig, ax = new_figure()
    for i, mode in enumerate(_modes(rows)):
        for q in percentiles:
            x, y = _series(rows, mode, f"{metric}_p{q}_ms")
            ax.plot(
                x,
                y,
                marker="o",
                ls="-" if q == max(percentiles) else "--",
                color=mode_color(mode, i),
                label=f"{mode} p{q}",
            )
    if slo_ms:
        ax.axhline(slo_ms, color="black", ls=":", lw=1.5, label=f"SLO {slo_ms:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel(f"{_LABELS.get(metric, metric)} (ms)")
    ax.set_title(title or f"{_cap(_LABELS.get(metric, metric))} against load")
    ax.legend(ncol=2, fontsize=11)
    return fig


def plot_goodput_vs_rate(
    rows: Sequence[Mapping[str, Any]], *, slo_text: str = "", min_attainment: float = 0.9, title: str | None = None
):
    """Goodput (req/s meeting every SLO) against offered rate; the dotted line is `min_attainment`
    of the offered rate: a mode below it has left its SLO."""
    fig, ax = new_figure()
    rates = sorted({r["rate_rps"] for r in rows})
    ax.plot(rates, rates, color="grey", lw=1, label="offered rate (all good)")
    ax.plot(
        rates,
        [min_attainment * r for r in rates],
        color="black",
        ls=":",
        lw=1.5,
        label=f"{min_attainment:.0%} attainment",
    )
    for i, mode in enumerate(_modes(rows)):
        x, y = _series(rows, mode, "goodput_rps")
        ax.plot(x, y, marker="o", color=mode_color(mode, i), label=mode)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("goodput (req/s within SLO)")
    ax.set_title(title or "Goodput against load" + (f"\nSLO: {slo_text}" if slo_text else ""))
    ax.legend(fontsize=11)
    return fig


def plot_per_device(
    rows: Sequence[Mapping[str, Any]],
    key: str = "output_tps_per_device",
    *,
    ylabel: str = "output tokens/s per device",
    title: str | None = None,
):
    """A per-mode line of `key` against rate (throughput per device, cost per 1M tokens, ...)."""
    fig, ax = new_figure()
    for i, mode in enumerate(_modes(rows)):
        x, y = _series(rows, mode, key)
        ax.plot(x, y, marker="o", color=mode_color(mode, i), label=mode)
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel(ylabel)
    ax.set_title(title or _cap(ylabel) + " against load")
    ax.legend()
    return fig


def plot_cost(rows: Sequence[Mapping[str, Any]], *, price_per_device_hour: float, unit: str = "$"):
    """Cost per million output tokens against rate, at `price_per_device_hour`."""
    return plot_per_device(
        rows,
        "cost_per_m_output_tokens",
        ylabel=f"{unit} per 1M output tokens",
        title=f"Cost per million output tokens at {unit}{price_per_device_hour:g} per device-hour",
    )


def plot_ratio_bars(ratios: Mapping[str, float], *, ylabel: str, title: str, better: str = "higher"):
    """Bars of named ratios (e.g. p99 ITL mono / 1P1D per rate) with the parity line at 1."""
    fig, ax = new_figure()
    names, vals = list(ratios), [ratios[k] for k in ratios]
    colors = ["#2ca02c" if (v >= 1) == (better == "higher") else "#d62728" for v in vals]
    ax.bar(names, vals, color=colors)
    ax.axhline(1.0, color="black", lw=1)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f}x", ha="center", va="bottom", fontsize=12)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig


def _at_rate(rows: Sequence[Mapping[str, Any]], rate_rps: float | None) -> tuple[float, list[Mapping[str, Any]]]:
    """The rows at `rate_rps` (default: the highest rate every mode ran); (rate, rows)."""
    modes = _modes(rows)
    if rate_rps is None:
        common = set.intersection(*({r["rate_rps"] for r in rows if r["mode"] == m} for m in modes)) if modes else set()
        if not common:
            raise ValueError("no rate that every mode ran; pass rate_rps")
        rate_rps = max(common)
    at = [r for r in rows if r["rate_rps"] == rate_rps]
    if not at:
        raise ValueError(f"no row at {rate_rps:g} req/s")
    return float(rate_rps), at


def plot_ttft_itl_plane(
    rows: Sequence[Mapping[str, Any]],
    *,
    rate_rps: float | None = None,
    ttft_key: str = "ttft_p50_ms",
    itl_key: str = "itl_p99_ms",
    slo_ttft_ms: float | None = None,
    slo_itl_ms: float | None = None,
    title: str | None = None,
):
    """Every mode as one point on the TTFT vs p99-ITL plane at one rate (default: the highest rate
    every mode ran); lower left is better. Chunked prefill's points (`mono-chunked-N`) are joined
    into its Pareto curve, ordered by chunk and ending at plain mono (no chunking), each labelled
    with its chunk; mono-dp, 1P1D and the others stand as single points. Dashed lines: the SLOs."""
    from labkit.bench.sweep import parse_mode

    rate, at = _at_rate(rows, rate_rps)
    fig, ax = new_figure()
    chunked = sorted(
        (r for r in at if parse_mode(r["mode"]).chunked_prefill), key=lambda r: parse_mode(r["mode"]).chunk_tokens or 0
    )
    mono = [r for r in at if r["mode"] == "mono"]
    curve = chunked + mono
    if chunked:
        ax.plot(
            [r[itl_key] for r in curve],
            [r[ttft_key] for r in curve],
            "-o",
            color=mode_color("mono-chunked"),
            label="mono-chunked (Pareto curve over chunks)" + (" to mono" if mono else ""),
            zorder=2,
        )
        for r in chunked:
            chunk = parse_mode(r["mode"]).chunk_tokens
            ax.annotate(
                f"{chunk:,}" if chunk else "chunked",
                (r[itl_key], r[ttft_key]),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=12,
                color=mode_color("mono-chunked"),
            )
    singles = [r for r in at if r not in chunked]
    markers = {"mono": "s", "mono-dp": "D", "1p1d": "*"}
    for i, r in enumerate(singles):
        m = r["mode"]
        ax.scatter(
            [r[itl_key]],
            [r[ttft_key]],
            s=260 if m == "1p1d" else 130,
            marker=markers.get(m, "^"),
            color=mode_color(m, i),
            edgecolor="black",
            zorder=3,
            label=m,
        )
    if slo_itl_ms:
        ax.axvline(slo_itl_ms, color="black", ls="--", lw=1.5, label=f"SLO: every gap <= {slo_itl_ms:g} ms")
    if slo_ttft_ms:
        ax.axhline(slo_ttft_ms, color="grey", ls="--", lw=1.5, label=f"SLO TTFT {slo_ttft_ms:g} ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(f"{_short(itl_key)} (ms)")
    ax.set_ylabel(f"{_short(ttft_key)} (ms)")
    ax.set_title(title or f"TTFT against tail inter-token latency at {rate:g} req/s (lower left is better)")
    ax.legend(fontsize=11)
    return fig


def plot_threshold_sweep(
    workloads: Mapping[str, Mapping[str, Any]],
    *,
    measured_key: str = "goodput_tpot_rps",
    predicted_key: str = "predicted_goodput_rps",
    slo_text: str = "TTFT <= 2 s, TPOT <= 200 ms",
    title: str | None = None,
):
    """Goodput against the prefill threshold of selective 1P1D, one panel per workload: measured (solid)
    and the planner's prediction (dashed), the best of each marked (star: measured, triangle: predicted).
    `workloads`: name -> a dict with `rows` (each with `threshold` in tokens and the two goodput keys,
    req/s) and `rate_rps`, as benchmarks/selective.py writes them. Threshold 0 is plain 1P1D."""
    names = list(workloads)
    if not names:
        raise ValueError("no workloads to draw")
    fig, axes = new_figure(1, len(names), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = sorted(workloads[name]["rows"], key=lambda r: r["threshold"])
        x = [r["threshold"] for r in rows]
        measured = [r[measured_key] for r in rows]
        predicted = [r[predicted_key] for r in rows]
        ax.plot(x, measured, "-o", color=mode_color("1p1d"), label="measured")
        ax.plot(x, predicted, "--s", color="grey", label="planner")
        bm = max(range(len(rows)), key=lambda i: (measured[i], -x[i]))
        bp = max(range(len(rows)), key=lambda i: (predicted[i], -x[i]))
        ax.scatter(
            [x[bm]],
            [measured[bm]],
            marker="*",
            s=420,
            color=mode_color("1p1d"),
            edgecolor="black",
            zorder=3,
            label=f"best measured: {x[bm]:,}",
        )
        ax.scatter(
            [x[bp]],
            [predicted[bp]],
            marker="^",
            s=200,
            color="grey",
            edgecolor="black",
            zorder=3,
            label=f"best predicted: {x[bp]:,}",
        )
        ax.set_xlabel("prefill threshold (tokens; 0 = plain 1P1D)")
        ax.set_ylabel("goodput (req/s within SLO)")
        rate = workloads[name].get("rate_rps")
        ax.set_title(name + (f" at {rate:g} req/s" if rate else ""), fontsize=15)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=10)
    fig.suptitle(
        title or f"Selective 1P1D: goodput against the prefill threshold ({slo_text})", fontsize=16, fontweight="bold"
    )
    fig.tight_layout()
    return fig


def _short(key: str) -> str:
    """'itl_p99_ms' -> 'ITL p99'."""
    parts = key.removesuffix("_ms").split("_")
    return " ".join([parts[0].upper(), *parts[1:]])


def plot_lengths(
    samples: Mapping[str, tuple[Sequence[int], Sequence[int]]],
    *,
    bins: int = 40,
    title: str = "Prompt and output lengths",
):
    """Histograms (log-spaced bins) of prompt and output tokens, one step line per named (prompts, outputs)."""
    fig, axes = new_figure(1, 2)
    for j, (ax, what) in enumerate(zip(axes, ("prompt", "output"))):
        arrays = [np.asarray(v[j], dtype=float) for v in samples.values()]
        lo = max(1.0, min(a.min() for a in arrays if len(a)))
        hi = max(a.max() for a in arrays if len(a))
        edges = np.logspace(np.log10(lo), np.log10(max(hi, lo * 1.01)), bins)
        for i, (name, a) in enumerate(zip(samples, arrays)):
            ax.hist(
                a,
                bins=edges,
                histtype="step",
                lw=2.2,
                weights=np.full(len(a), 1.0 / max(1, len(a))),
                color=_EXTRA_COLORS[i % len(_EXTRA_COLORS)],
                label=f"{name} (median {np.median(a):,.0f})",
            )
        ax.set_xscale("log")
        ax.set_xlabel(f"{what} length (tokens)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{_cap(what)} tokens")
        ax.legend(fontsize=10)
    fig.suptitle(title, fontsize=17, fontweight="bold")
    fig.tight_layout()
    return fig


# --- repeated sweeps: intervals, the reference machine, why the SLO decides, claims ---------

_BOUNDS = (("error", "failed"), ("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "a gap (ITL)"), ("e2e", "E2E"))


def reference_series(
    rows: Sequence[Any], stat: str, fractions: Sequence[float]
) -> dict[str, tuple[list[float], list[float]]]:
    """Per mode, (load, value) of a committed run's serving rows (`labkit.reference.ServingRow`s): its
    rates, in order, are the loads `fractions` (multiples of mono's one-at-a-time rate)."""
    rates = sorted({r.rate_rps for r in rows})
    if len(rates) != len(fractions):
        raise ValueError(f"{len(rates)} rates but {len(fractions)} load fractions")
    load = dict(zip(rates, sorted(fractions)))
    out: dict[str, tuple[list[float], list[float]]] = {}
    for r in sorted(rows, key=lambda r: r.rate_rps):
        xs, ys = out.setdefault(r.mode, ([], []))
        xs.append(load[r.rate_rps])
        ys.append(float(getattr(r, stat, r.raw.get(stat, np.nan))))
    return out


def plot_intervals(
    points: Sequence[Mapping[str, Any]],
    stat: str,
    *,
    x: str = "rate_rps",
    xlabel: str | None = None,
    ylabel: str = "",
    title: str = "",
    slo_ms: float | None = None,
    log_y: bool = False,
    reference: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None,
    reference_label: str = "reference",
    ax: Any = None,
):
    """`stat` per mode against `x` (`rate_rps` or `load_x`), from `RepeatedSweep.points` rows: the pooled
    value with its interval as an error bar, each repeat as a small dot; `reference`: a committed run's
    (x, y) per mode, dashed with hollow markers. Returns the Figure."""
    if ax is None:
        fig, ax = new_figure()
    else:
        fig = ax.figure
    for i, mode in enumerate(_modes(points)):
        rows = sorted((p for p in points if p["mode"] == mode), key=lambda p: p[x])
        xs = np.array([p[x] for p in rows], dtype=float)
        val = np.array([p[stat] for p in rows], dtype=float)
        lo = np.array([p.get(f"{stat}_lo", v) for p, v in zip(rows, val)], dtype=float)
        hi = np.array([p.get(f"{stat}_hi", v) for p, v in zip(rows, val)], dtype=float)
        c = mode_color(mode, i)
        with_iv = any(f"{stat}_lo" in p for p in rows)
        ax.errorbar(
            xs,
            val,
            yerr=[np.clip(val - lo, 0, None), np.clip(hi - val, 0, None)],
            marker="o",
            color=c,
            capsize=6,
            label=f"{mode} (every repeat pooled, 95% interval)" if with_iv else mode,
        )
        for p in rows:
            reps = p.get(f"{stat}_repeats") or ()
            ax.plot([p[x]] * len(reps), reps, linestyle="none", marker=".", markersize=9, alpha=0.45, color=c)
    for i, (mode, (rx, ry)) in enumerate((reference or {}).items()):
        ax.plot(
            rx,
            ry,
            ls="--",
            marker="o",
            mfc="none",
            color=mode_color(mode, i),
            alpha=0.7,
            label=f"{mode}: {reference_label}",
        )
    if slo_ms:
        ax.axhline(slo_ms, color="black", ls=":", lw=1.5, label=f"SLO {slo_ms:g} ms")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or ("load (x mono's one-at-a-time rate)" if x == "load_x" else "request rate (req/s)"))
    ax.set_ylabel(ylabel or stat)
    ax.set_title(title or f"{stat} against load")
    ax.legend(fontsize=10)
    return fig


def plot_slo_misses(misses_by_slo: Mapping[str, Mapping[str, Mapping[str, int]]], *, title: str = ""):
    """One panel per SLO: per bound (failed, TTFT, TPOT, a gap, E2E), the share of each mode's requests
    that broke it (`labkit.bench.repeats.misses` per SLO name and mode). Bounds an SLO does not set are left out."""
    names = list(misses_by_slo)
    fig, axes = new_figure(1, len(names), figsize=(7.5 * len(names), 5.5), sharey=True)
    axes = np.atleast_1d(axes)
    for ax, name in zip(axes, names):
        by_mode = misses_by_slo[name]
        modes = list(by_mode)
        bounds = [(k, lbl) for k, lbl in _BOUNDS if any(by_mode[m][k] for m in modes) or k in ("error",)]
        xs = np.arange(len(bounds))
        w = 0.8 / max(1, len(modes))
        for i, mode in enumerate(modes):
            n = max(1, by_mode[mode]["requests"])
            ax.bar(
                xs + (i - (len(modes) - 1) / 2) * w,
                [by_mode[mode][k] / n for k, _ in bounds],
                w,
                color=mode_color(mode, i),
                label=mode,
            )
        ax.set_xticks(xs, [lbl for _, lbl in bounds])
        ax.set_ylim(0, 1.05)
        ax.set_title(name, fontsize=14)
        ax.set_xlabel("bound broken")
    axes[0].set_ylabel("share of requests")
    axes[0].legend()
    fig.suptitle(title or "Which bound each mode's requests broke", fontsize=17, fontweight="bold")
    fig.tight_layout()
    return fig


def plot_versus_claims(
    rows: Sequence[Mapping[str, Any]],
    *,
    throughput_gain: tuple[float, float],
    cost_saving_pct: tuple[float, float],
    x: str = "rate_rps",
    xlabel: str | None = None,
    claim_label: str = "the article's claim",
    contender: str = "1p1d",
    baseline: str = "mono",
):
    """Two panels from `labkit.bench.verdicts.versus` rows: the throughput and goodput ratios against the
    claimed gain (a shaded band, log axis; a goodput ratio with no baseline goodput is drawn at the top
    as ▲), and the cost saved per output token against the claimed saving."""
    fig, (a, b) = new_figure(1, 2, figsize=(15, 6))
    xs = [r[x] for r in rows]
    series = [("throughput_ratio", "raw output throughput")] + [
        (k, f"goodput, {k.split(' ', 1)[1]}") for k in (rows[0] if rows else {}) if k.startswith("goodput_ratio")
    ]
    finite = [r[k] for r in rows for k, _ in series if np.isfinite(r[k]) and r[k] > 0]
    top = max([throughput_gain[1] * 2, *finite]) * 1.5
    bottom = min([0.5, *finite]) / 1.5
    a.axhspan(
        *throughput_gain,
        color="#bbbbbb",
        alpha=0.5,
        label=f"{claim_label}: {throughput_gain[0]:g}-{throughput_gain[1]:g}x",
    )
    a.axhline(1.0, color="black", lw=1)
    for i, (k, label) in enumerate(series):
        ys = np.array([r[k] for r in rows], dtype=float)
        color = _EXTRA_COLORS[i % len(_EXTRA_COLORS)]
        shown = np.where(np.isinf(ys), top / 1.2, np.where(ys > 0, ys, bottom * 1.2))
        a.plot(xs, shown, marker="o", color=color, label=label)
        up = np.isinf(ys)
        if up.any():
            a.plot(np.asarray(xs)[up], shown[up], linestyle="none", marker="^", markersize=16, color=color)
    a.set_yscale("log")
    a.set_ylim(bottom, top)
    a.set_ylabel(f"{contender} / {baseline}")
    a.set_title("Gain: ratios on the same devices")
    a.legend(fontsize=10)
    saved = [100 * (1 - r["cost_ratio"]) for r in rows]
    b.axhspan(
        *cost_saving_pct,
        color="#bbbbbb",
        alpha=0.5,
        label=f"{claim_label}: {cost_saving_pct[0]:g}-{cost_saving_pct[1]:g}% saved",
    )
    b.axhline(0, color="black", lw=1)
    b.plot(xs, saved, marker="o", color=mode_color(contender), label=f"{contender} against {baseline}")
    b.set_ylabel("cost per output token saved (%)")
    b.set_title("Cost: saved per output token")
    b.legend(fontsize=10)
    for ax in (a, b):
        ax.set_xlabel(xlabel or ("load (x mono's one-at-a-time rate)" if x == "load_x" else "request rate (req/s)"))
    fig.tight_layout()
    return fig
