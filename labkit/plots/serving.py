"""Charts of the serving lessons: per-request token timelines, inter-token gaps, stalls per mode.

Each takes `labkit.bench.interference.InterferenceResult`s; the long prompt's prefill window
(sent until its first token) is shaded in the prefill colour on every time axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from labkit.plots.style import MODE_COLORS, PHASE_COLORS, new_figure


def _shade_window(ax: Any, result: Any, label: bool = True) -> None:
    w0, w1 = result.prefill_window_s
    ax.axvspan(
        w0,
        w1,
        color=PHASE_COLORS["prefill"],
        alpha=0.15,
        lw=0,
        label="long prompt: sent → first token" if label else None,
    )


def token_timeline(result: Any, ax: Any = None, title: str | None = None) -> Any:
    """One row per request, one tick per token as the client received it; returns the Axes."""
    if ax is None:
        _, ax = new_figure(figsize=(11, 4.8))
    traces = list(result.decodes) + [result.long]
    for row, t in enumerate(traces):
        color = PHASE_COLORS["prefill"] if t.kind == "long" else PHASE_COLORS["decode"]
        ax.plot(
            t.token_s,
            [row] * len(t.token_s),
            linestyle="none",
            marker="|",
            markersize=14,
            markeredgewidth=1.6,
            color=color,
        )
        ax.plot([t.sent_s], [row], marker=">", color="black", markersize=7)
    _shade_window(ax, result)
    ax.set_yticks(range(len(traces)), [t.name for t in traces])
    ax.set_ylim(-0.7, len(traces) - 0.3)
    ax.set_xlabel("time since the first request (s)")
    ax.set_title(title or f"{result.label}: every token as the client received it")
    ax.plot([], [], linestyle="none", marker=">", color="black", label="request sent")
    ax.legend(loc="upper left", fontsize=10)
    return ax


def itl_timeline(result: Any, ax: Any = None, title: str | None = None) -> Any:
    """Every decode inter-token gap (ms) at the time it ended; returns the Axes."""
    if ax is None:
        _, ax = new_figure(figsize=(11, 4.5))
    gaps = result.decode_gaps()
    out = [(t, 1e3 * g) for t, g, inside in gaps if not inside]
    ins = [(t, 1e3 * g) for t, g, inside in gaps if inside]
    if out:
        ax.scatter(*zip(*out), s=14, color=PHASE_COLORS["decode"], label="decode gap")
    if ins:
        ax.scatter(
            *zip(*ins), s=30, color=PHASE_COLORS["prefill"], marker="D", label="gap overlapping the long prefill"
        )
    _shade_window(ax, result, label=False)
    st = result.stats()
    ax.axhline(
        st["decode_itl_mean_ms"],
        color="gray",
        ls="--",
        lw=1.5,
        label=f"mean outside: {st['decode_itl_mean_ms']:.0f} ms",
    )
    ax.set_xlabel("time since the first request (s)")
    ax.set_ylabel("inter-token gap (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title(title or f"{result.label}: worst decode stall {st['decode_stall_max_ms']:.0f} ms")
    ax.legend(loc="upper left", fontsize=10)
    return ax


def interference_figure(result: Any) -> Any:
    """Token timeline above the inter-token gaps, shared time axis; returns the Figure."""
    fig, (a, b) = new_figure(2, 1, figsize=(11, 8.5), sharex=True)
    token_timeline(result, a)
    itl_timeline(result, b, title="decode inter-token gaps")
    b.set_xlabel("time since the first request (s)")
    fig.tight_layout()
    return fig


def stall_comparison(results: Sequence[Any], ax: Any = None) -> Any:
    """Per run: mean decode ITL outside the prefill and the worst stall during it (ms); returns the Axes."""
    if ax is None:
        _, ax = new_figure(figsize=(10, 5.5))
    _stall_bars(ax, [r.label for r in results], [r.stats() for r in results])
    ax.set_title("A long prefill stalls the decodes that share its engine")
    return ax


def _stall_bars(ax: Any, labels: Sequence[str], stats: Sequence[Mapping[str, float]]) -> None:
    import numpy as np

    x = np.arange(len(labels))
    colors = [MODE_COLORS.get(lbl.split()[0], "#555555") for lbl in labels]
    ax.bar(
        x - 0.2,
        [s["decode_itl_mean_ms"] for s in stats],
        0.4,
        color=colors,
        alpha=0.45,
        label="mean decode gap, outside the prefill",
    )
    bars = ax.bar(
        x + 0.2,
        [s["decode_stall_max_ms"] for s in stats],
        0.4,
        color=colors,
        label="worst decode gap, during the prefill",
    )
    for b, s in zip(bars, stats):
        ratio = s["decode_stall_max_ms"] / s["decode_itl_mean_ms"] if s["decode_itl_mean_ms"] else float("nan")
        ax.annotate(
            f"{s['decode_stall_max_ms']:,.0f} ms\n({ratio:.0f}x)",
            (b.get_x() + b.get_width() / 2, b.get_height()),
            ha="center",
            va="bottom",
            fontsize=11,
        )
    ax.set_xticks(x, labels)
    ax.set_ylabel("inter-token gap (ms)")
    ax.margins(y=0.2)
    ax.legend(fontsize=10)


def stall_comparison_with_reference(results: Sequence[Any], reference: Any = None) -> Any:
    """`stall_comparison` of this machine's runs (left) beside the committed reference run (right:
    `labkit.reference.serve_interference()`, its modes' median stats), each on its own scale;
    returns the Figure (one panel without a reference)."""
    if reference is None:
        fig, ax = new_figure(figsize=(10, 5.5))
        stall_comparison(results, ax)
        return fig
    fig, (a, b) = new_figure(1, 2, figsize=(16, 6.2))
    _stall_bars(a, [r.label for r in results], [r.stats() for r in results])
    a.set_title("this machine")
    modes = list(reference.stats)
    _stall_bars(b, modes, [reference.stats[m] for m in modes])
    b.set_title(
        f"reference: {reference.model}, {reference.long_prompt_tokens:,}-token prompt,\n"
        f"chunks of {reference.chunk_tokens} ({reference.file.tag}, {reference.file.date})",
        fontsize=14,
    )
    fig.suptitle("A long prefill stalls the decodes that share its engine", fontsize=17, fontweight="bold")
    fig.tight_layout()
    return fig


def chunk_tradeoff(rows: Sequence[Mapping[str, Any]], ax: Any = None, title: str | None = None) -> Any:
    """The chunk-size trade-off (rows of `labkit.bench.chunking.tradeoff_rows`): the long prompt's TTFT
    against the decodes' p99 inter-token gap, one point per run; the chunked runs joined in chunk
    order, mono and 1P1D as single points, the Pareto front circled. Log axes, ms; returns the Axes."""
    if ax is None:
        _, ax = new_figure(figsize=(11, 7))
    chunked = sorted((r for r in rows if r["mode"] == "mono-chunked"), key=lambda r: r["chunk_tokens"])
    if chunked:
        ax.plot(
            [r["long_ttft_ms"] for r in chunked],
            [r["itl_p99_ms"] for r in chunked],
            marker="o",
            color=MODE_COLORS["mono-chunked"],
            label="mono, chunked prefill (chunk size beside each point)",
        )
        for r in chunked:
            ax.annotate(
                f"{r['chunk_tokens']}",
                (r["long_ttft_ms"], r["itl_p99_ms"]),
                xytext=(7, 5),
                textcoords="offset points",
                fontsize=12,
                color=MODE_COLORS["mono-chunked"],
            )
    for mode, marker, text in (("mono", "s", "mono, one prefill step"), ("1p1d", "*", "1P1D (disaggregated)")):
        for r in (r for r in rows if r["mode"] == mode):
            ax.plot(
                [r["long_ttft_ms"]],
                [r["itl_p99_ms"]],
                marker=marker,
                markersize=16 if marker == "*" else 11,
                linestyle="none",
                color=MODE_COLORS[mode],
                label=text,
            )
    front = [r for r in rows if r.get("pareto")]
    ax.plot(
        [r["long_ttft_ms"] for r in front],
        [r["itl_p99_ms"] for r in front],
        linestyle="none",
        marker="o",
        markersize=24,
        markerfacecolor="none",
        markeredgecolor="#333333",
        markeredgewidth=1.2,
        label="Pareto front (nothing beats it on both)",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("long prompt's TTFT: time to first token (ms, log)")
    ax.set_ylabel("decodes' p99 inter-token gap (ms, log)")
    ax.set_title(title or "Chunk size trades the long prompt's TTFT against every decode's ITL")
    ax.legend(fontsize=10, loc="best")
    return ax


def chunk_plan_vs_log(
    predicted: Sequence[int],
    logged: Sequence[Mapping[str, Any]],
    decode_step_ms: float | None = None,
    title: str | None = None,
) -> Any:
    """The long prompt's steps: prompt tokens per step as predicted (bars) and as the engine's step log
    recorded them (dots), above each logged step's time (ms) beside a decode-only step's; returns the Figure."""
    import numpy as np

    fig, (a, b) = new_figure(2, 1, figsize=(11, 7.5), sharex=True)
    n = max(len(predicted), len(logged))
    a.bar(
        np.arange(1, len(predicted) + 1),
        predicted,
        color=PHASE_COLORS["prefill"],
        alpha=0.35,
        label="your chunked_step, step after step",
    )
    a.plot(
        np.arange(1, len(logged) + 1),
        [s["prefill_tokens"] for s in logged],
        linestyle="none",
        marker="o",
        color=PHASE_COLORS["prefill"],
        label="the engine's step log",
    )
    a.set_ylabel("prompt tokens in the step")
    a.set_title(title or "The long prompt, step by step: predicted and logged")
    a.legend(fontsize=10, loc="lower left")
    b.bar(
        np.arange(1, len(logged) + 1),
        [1e3 * s["seconds"] for s in logged],
        color=PHASE_COLORS["mixed"],
        label="a step with a prompt chunk (logged)",
    )
    if decode_step_ms:
        b.axhline(
            decode_step_ms, color=PHASE_COLORS["decode"], ls="--", label=f"a decode-only step: {decode_step_ms:,.0f} ms"
        )
    b.set_xlabel("step of the long prompt")
    b.set_ylabel("step time (ms)")
    b.set_xlim(0.4, n + 0.6)
    b.legend(fontsize=10, loc="lower left")
    fig.tight_layout()
    return fig


def one_request_bars(parts: Sequence[tuple[str, float, str]], title: str, ax: Any = None) -> Any:
    """One request's phases end to end, one bar: `parts` are (label, seconds, PHASE_COLORS key) in order,
    each labelled with its ms in the legend; returns the Axes."""
    if ax is None:
        _, ax = new_figure(figsize=(10, 2.8))
    left = 0.0
    for name, sec, phase in parts:
        ax.barh([0], [1e3 * sec], left=left, color=PHASE_COLORS[phase], label=f"{name}: {1e3 * sec:,.1f} ms")
        left += 1e3 * sec
    ax.set_yticks([])
    ax.set_xlabel("time (ms)")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=len(parts), fontsize=10)
    return ax


def kv_stream_timeline(results: Mapping[str, Mapping[str, Any]], ax: Any = None, title: str | None = None) -> Any:
    """One row per KV streaming mode of one request's prefill answer (a PrefillResult as a dict, by
    mode: "whole", "layers"): the prefill, when each layer's KV left (layer-wise), and the transfer
    the request still waited for after its prefill. Times in ms from the request's arrival; returns the Axes."""
    if ax is None:
        _, ax = new_figure(figsize=(11, 3.6))
    modes = list(results)
    for row, mode in enumerate(modes):
        r = results[mode]
        pre, acked = 1e3 * r["prefill_s"], 1e3 * r["kv_acked_s"]
        ax.barh(row, pre, height=0.5, color=PHASE_COLORS["prefill"], label="prefill" if row == 0 else None)
        ax.barh(
            row,
            acked - pre,
            left=pre,
            height=0.5,
            color=PHASE_COLORS["transfer"],
            label="KV transfer after the prefill" if row == 0 else None,
        )
        sent = [1e3 * t for t in r.get("layer_sent_s") or []]
        if sent:
            ax.plot(
                sent,
                [row + 0.38] * len(sent),
                linestyle="none",
                marker="v",
                markersize=9,
                color=PHASE_COLORS["transfer"],
                label="a layer's KV left",
            )
        ax.annotate(
            f"waited {acked - pre:,.1f} ms",
            (acked, row),
            xytext=(6, 0),
            textcoords="offset points",
            va="center",
            fontsize=11,
        )
    ax.set_yticks(range(len(modes)), [f"{m}-KV" if m == "whole" else "layer-wise" for m in modes])
    ax.set_ylim(-0.6, len(modes) - 0.2)
    ax.set_xlabel("time since the request arrived (ms)")
    r0 = next(iter(results.values()))
    ax.set_title(
        title
        or f"One prefill, {r0['num_prompt_tokens']:,} tokens, {r0['kv_bytes'] / 1e6:.1f} MB of KV: "
        "sent after it, or layer by layer during it"
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, fontsize=10)
    ax.margins(x=0.12)
    return ax


def prefix_routing_chart(runs: Sequence[Any]) -> Any:
    """Per router run (`labkit.bench.prefix_routing.PrefixRoutingRun`): the prompt tokens the prefill
    workers' caches served against those they computed, and each worker's prefill decisions by reason.
    Returns the Figure."""
    import numpy as np

    fig, (a, b) = new_figure(1, 2, figsize=(15, 5.5))
    labels = [r.label for r in runs]
    x = np.arange(len(runs))
    cached = [r.cached_tokens for r in runs]
    computed = [r.prompt_tokens - c for r, c in zip(runs, cached)]
    a.bar(x, cached, color=PHASE_COLORS["transfer"], label="served from a prefill worker's prefix cache")
    a.bar(x, computed, bottom=cached, color=PHASE_COLORS["prefill"], label="computed by a prefill worker")
    for i, r in enumerate(runs):
        a.annotate(f"{r.cached_share:.0%} cached", (i, r.prompt_tokens), ha="center", va="bottom", fontsize=12)
    a.set_xticks(x, labels)
    a.set_ylabel("prompt tokens")
    a.set_title("Where the prompts' tokens came from")
    a.margins(y=0.15)
    a.legend(fontsize=10, loc="lower center")
    workers = sorted({w for r in runs for w in r.decisions})
    reasons = sorted({k for r in runs for d in r.decisions.values() for k in d})
    shades = {"prefix": PHASE_COLORS["transfer"], "load": PHASE_COLORS["decode"], "only": PHASE_COLORS["idle"]}
    w = 0.8 / max(1, len(workers))
    for j, worker in enumerate(workers):
        base = np.zeros(len(runs))
        for reason in reasons:
            vals = np.array([r.decisions.get(worker, {}).get(reason, 0.0) for r in runs])
            b.bar(
                x + (j - (len(workers) - 1) / 2) * w,
                vals,
                w * 0.95,
                bottom=base,
                color=shades.get(reason, "#555555"),
                edgecolor="black",
                lw=0.6,
                label=f"chosen by {reason}" if j == 0 else None,
            )
            base += vals
        for i in range(len(runs)):
            b.annotate(worker, (i + (j - (len(workers) - 1) / 2) * w, base[i]), ha="center", va="bottom", fontsize=10)
    b.set_xticks(x, labels)
    b.set_ylabel("requests routed")
    b.set_title("Prefill decisions per worker, by the router's reason")
    b.margins(y=0.3)
    b.legend(fontsize=10, loc="upper center", ncol=len(reasons))
    fig.tight_layout()
    return fig


# The TTFT's parts in the order they happen, with their colours (labkit.serve.waterfall.PARTS).
WATERFALL_PARTS = (
    ("router", "router", "#7f7f7f"),
    ("http", "control hops (http)", "#c7c7c7"),
    ("queue", "queue at the worker", "#ff7f0e"),
    ("prefill", "prefill", PHASE_COLORS["prefill"]),
    ("kv_transfer", "KV transfer", PHASE_COLORS["transfer"]),
    ("first_token_out", "first token out", "#9467bd"),
)


def plot_ttft_waterfall(runs: Mapping[str, Any], ax: Any = None, title: str | None = None) -> Any:
    """Where the TTFT went, per mode: a median and a p99 stack each (labkit.bench.waterfall.waterfall_stacks:
    the mean of each part over the requests around that TTFT percentile, so a stack adds up to its band's
    TTFT). `runs`: mode -> a BenchResult or its records. Decode admission, which follows the first token,
    is drawn hatched after the stack. Returns the Axes."""
    import numpy as np

    from labkit.bench.waterfall import waterfall_stacks

    if ax is None:
        _, ax = new_figure(figsize=(11, 1.2 + 1.1 * 2 * max(1, len(runs))))
    rows: list[tuple[str, dict[str, float]]] = []
    for mode, run in runs.items():
        stacks = waterfall_stacks(getattr(run, "records", run))
        rows += [(f"{mode} {band}", st) for band, st in stacks.items()]
    if not rows:
        raise ValueError(
            "no record carries a waterfall: run the load generator against the lab's router "
            "(LoadConfig(waterfall=True), the default)"
        )
    for y, (_, st) in enumerate(rows):
        left = 0.0
        for key, label, color in WATERFALL_PARTS:
            w = st[f"{key}_ms"]
            ax.barh(y, w, left=left, height=0.6, color=color, label=label if y == 0 else None)
            left += w
        if st["decode_admit_ms"] > 0:
            ax.barh(
                y,
                st["decode_admit_ms"],
                left=left,
                height=0.6,
                color="white",
                edgecolor=PHASE_COLORS["decode"],
                hatch="//",
                label="decode admission (after the first token)" if y == 0 else None,
            )
        gbps = st["kv_gb_per_s"]
        note = f"TTFT {st['ttft_ms']:,.0f} ms" + (f", KV {gbps:.2g} GB/s" if np.isfinite(gbps) else "")
        ax.annotate(
            note, (left + st["decode_admit_ms"], y), xytext=(6, 0), textcoords="offset points", va="center", fontsize=11
        )
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("time since the router took the request (ms)")
    ax.set_title(title or "Where the time to first token went (median and p99 requests)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.25 / max(1, len(rows))), ncol=3, fontsize=10)
    ax.margins(x=0.25)
    return ax


def plot_router_policies(rows: Sequence[Mapping[str, Any]], title: str | None = None) -> Any:
    """Router policies side by side on one trace (benchmarks/router_policies.py rows: `policy`,
    `prefix_hit_rate`, `ttft_p50_ms`, `ttft_p99_ms`, `requests_per_worker` {worker: n}): prefix-cache hit
    rate, TTFT p50/p99 and requests per prefill worker. Returns the Figure."""
    import numpy as np

    fig, (a, b, c) = new_figure(1, 3, figsize=(17, 5.4))
    names = [r["policy"] for r in rows]
    x = np.arange(len(rows))
    a.bar(x, [100 * r["prefix_hit_rate"] for r in rows], color=PHASE_COLORS["transfer"])
    for i, r in enumerate(rows):
        a.annotate(
            f"{100 * r['prefix_hit_rate']:.0f}%", (i, 100 * r["prefix_hit_rate"]), ha="center", va="bottom", fontsize=11
        )
    a.set_ylabel("prompt tokens from a cache (%)")
    a.margins(y=0.15)
    a.set_title("Prefix-cache hits")
    b.bar(x - 0.2, [r["ttft_p50_ms"] for r in rows], 0.4, color=PHASE_COLORS["prefill"], alpha=0.5, label="p50")
    b.bar(x + 0.2, [r["ttft_p99_ms"] for r in rows], 0.4, color=PHASE_COLORS["prefill"], label="p99")
    b.set_ylabel("TTFT (ms)")
    b.set_title("Time to first token")
    b.legend(fontsize=10)
    workers = sorted({w for r in rows for w in r["requests_per_worker"]})
    bottom = np.zeros(len(rows))
    for j, w in enumerate(workers):
        n = np.array([r["requests_per_worker"].get(w, 0) for r in rows], dtype=float)
        c.bar(x, n, bottom=bottom, color=["#1f77b4", "#aec7e8", "#ff7f0e", "#ffbb78"][j % 4], label=w)
        bottom += n
    c.set_ylabel("requests")
    c.set_title("Requests per prefill worker")
    c.set_ylim(0, 1.25 * max(bottom.max(), 1))
    c.legend(fontsize=10, ncol=len(workers), loc="upper center")
    for ax in (a, b, c):
        ax.set_xticks(x, names, rotation=25, ha="right")
    fig.suptitle(title or "Router policies on one prefix-heavy trace", fontsize=17, fontweight="bold")
    fig.tight_layout()
    return fig
