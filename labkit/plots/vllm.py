"""Charts of notebook 07 (vLLM side by side with the lab): greedy near-ties, the four modes' bars
beside the committed run, the KV transfer paths, and a KV's time over datacenter links."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from labkit.plots.bench import mode_color
from labkit.plots.style import new_figure


def greedy_gaps(greedy: Sequence[Any], rel_tol: float = 1e-4, title: str = "How far from a tie each greedy choice was"):
    """Per prompt, the lab's relative top-2 logit gap at every output position (log scale), with the
    near-tie line: a token may only differ between engines below it."""
    fig, ax = new_figure(figsize=(10, 4.5))
    for i, g in enumerate(greedy):
        ax.plot(range(len(g.rel_gaps)), g.rel_gaps, marker="o", label=f"prompt {i} ({g.prompt_len} tokens)")
    ax.axhline(rel_tol, color="black", ls="--", lw=1.5, label=f"{rel_tol:g}: a near tie")
    ax.set_yscale("log")
    ax.set(xlabel="output position", ylabel="(top1 - top2) / |top1|  (lab logits)", title=title)
    ax.legend(fontsize=10)
    fig.tight_layout()
    return fig


def mode_bars(
    rows: Sequence[Mapping[str, Any]],
    reference: Sequence[Any] = (),
    *,
    reference_label: str = "",
    keys: Sequence[tuple[str, str]] = (
        ("tpot_p50_ms", "TPOT p50 (ms)"),
        ("output_tps_per_device", "output tokens/s per device"),
    ),
):
    """One panel per key: a bar per mode at the highest rate of `rows` (this machine), and hatched
    bars of the committed run's rows (`reference`: labkit.reference ServingRows) at the same rate
    (at its own highest when it never ran that one), when given."""
    import numpy as np

    fig, axes = new_figure(1, len(keys), squeeze=False)
    top = max(r["rate_rps"] for r in rows)
    mine = {r["mode"]: r for r in rows if r["rate_rps"] == top}
    rates = {r.rate_rps for r in reference}
    ref_top = top if top in rates else max(rates, default=None)  # the same rate as this machine's when it ran
    ref = {r.mode: r.raw for r in reference if r.rate_rps == ref_top}
    modes = list(dict.fromkeys([*mine, *ref]))
    x = np.arange(len(modes))
    w = 0.4 if ref else 0.8
    for ax, (key, label) in zip(axes[0], keys):
        ax.bar(
            x - (w / 2 if ref else 0),
            [mine.get(m, {}).get(key, np.nan) for m in modes],
            w,
            color=[mode_color(m, i) for i, m in enumerate(modes)],
            label=f"this machine, {top:g} req/s",
        )
        if ref:
            ax.bar(
                x + w / 2,
                [ref.get(m, {}).get(key, np.nan) for m in modes],
                w,
                fill=False,
                hatch="//",
                edgecolor=[mode_color(m, i) for i, m in enumerate(modes)],
                label=f"{reference_label or 'reference'}, {ref_top:g} req/s",
            )
        ax.set_xticks(x, modes, rotation=20)
        ax.set(ylabel=label, xlabel="mode", title=label)
        ax.legend(fontsize=9)
    fig.tight_layout()
    return fig


def transfer_paths(rows: Sequence[Mapping[str, Any]], nbytes: int):
    """Horizontal bars of GB/s per path (log scale) for one request's KV of `nbytes` bytes."""
    fig, ax = new_figure(figsize=(10, 4))
    colors = ["#7f7f7f", "#2ca02c", "#17becf", "#9467bd"]
    ax.barh([r["path"] for r in rows], [r["GB/s"] for r in rows], color=colors[: len(rows)])
    ax.set_xscale("log")
    ax.set(
        xlabel="GB/s (1e9 B/s), log scale", title=f"Moving one request's KV ({nbytes / 2**20:.2f} MiB) on this machine"
    )
    fig.tight_layout()
    return fig


def link_times(kv_bytes: float, links: Mapping[str, Any], what: str):
    """Horizontal bars: ms to move `kv_bytes` over each named `labkit.links.Link` (computed from line rates)."""
    fig, ax = new_figure(figsize=(9, 3.5))
    names = list(links)
    ax.barh(
        names,
        [links[n].seconds(kv_bytes) * 1e3 for n in names],
        color=["#2ca02c", "#17becf", "#d62728", "#7f7f7f"][: len(names)],
    )
    ax.set(xlabel=f"ms to move {what}", title="Transfer time per link (computed from line rates)")
    fig.tight_layout()
    return fig


def nixl_requests(rows: Sequence[Mapping[str, Any]], block_bytes: float | None = None):
    """Two panels, one bar per request (`labkit.exercises.nb07.nixl_table` rows): the KV bytes the
    decode server read over NIXL (with whole blocks marked when `block_bytes` is given) and the
    two hops' times."""
    import numpy as np

    fig, (ax1, ax2) = new_figure(1, 2, figsize=(14, 4.5))
    names = [r["request"] for r in rows]
    x = np.arange(len(rows))
    ax1.bar(x, [r["bytes"] / 2**20 for r in rows], color="#17becf", width=0.5)
    if block_bytes:
        top = max(r["bytes"] for r in rows) / block_bytes
        for k in range(1, int(top) + 1):
            ax1.axhline(k * block_bytes / 2**20, color="gray", lw=0.8, ls=":")
        ax1.plot([], [], ":", color="gray", label="whole KV blocks")
        ax1.legend(fontsize=10)
    ax1.set_xticks(x, names)
    ax1.set(ylabel="MiB read by the decode server", title="KV bytes over NIXL, per request")
    w = 0.35
    ax2.bar(x - w / 2, [r["prefill hop (ms)"] for r in rows], w, color="#ff7f0e", label="prefill hop")
    ax2.bar(x + w / 2, [r["decode hop (ms)"] for r in rows], w, color="#2ca02c", label="decode hop (KV read + tokens)")
    ax2.set_xticks(x, names)
    ax2.set(ylabel="ms", title="The two hops")
    ax2.legend(fontsize=10)
    fig.tight_layout()
    return fig
