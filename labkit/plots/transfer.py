"""Charts of KV-cache transfer: bandwidth vs size, transfer time vs prompt length, break-even, overlap."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from labkit.plots.style import PHASE_COLORS, new_figure

BACKEND_COLORS = {
    "memcpy": "#000000",
    "memcpy (GPU)": "#555555",
    "shm": "#2ca02c",
    "tcp": "#1f77b4",
    "nixl": "#9467bd",
    "cuda-ipc": "#d62728",
}
COMPUTED_COLORS = ("#bcbd22", "#e377c2", "#8c564b")  # computed links: colours no backend uses
_HOW_STYLE = {"measured": "-", "emulated": "--", "computed": ":"}


def bandwidth_vs_size(rows: Sequence[Mapping[str, Any]], title: str = "KV transfer bandwidth vs payload size"):
    """rows: {backend, nbytes, gb_per_s} (backend "memcpy" for the machine's copy speed); returns (fig, ax)."""
    fig, ax = new_figure()
    for backend in dict.fromkeys(r["backend"] for r in rows):
        pts = sorted((r["nbytes"], r["gb_per_s"]) for r in rows if r["backend"] == backend)
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            label=backend,
            color=BACKEND_COLORS.get(backend),
            linestyle="--" if backend == "memcpy" else "-",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("payload (bytes, log scale)")
    ax.set_ylabel("GB/s (1e9 bytes per second)")
    ax.set_title(title)
    ax.legend()
    return fig, ax


def transfer_time_vs_prompt(prompt_lens: Sequence[int], curves: Sequence[Mapping[str, Any]], model: str):
    """curves: {label, how ("measured" | "emulated" | "computed"), seconds: [one per prompt length]}.

    Line style marks how each curve was obtained (solid measured, dashed emulated, dotted
    computed). Returns (fig, ax); time in milliseconds, log scale.
    """
    fig, ax = new_figure()
    for c in curves:
        ax.plot(
            prompt_lens,
            [s * 1e3 for s in c["seconds"]],
            marker="o" if c["how"] == "measured" else None,
            linestyle=_HOW_STYLE[c["how"]],
            label=f"{c['label']} ({c['how']})",
            color=c.get("color"),
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("KV transfer time (ms, log scale)")
    ax.set_title(f"Moving one request's KV cache: {model}")
    ax.legend(fontsize=10)
    return fig, ax


def break_even(
    prompt_lens: Sequence[int], recompute_s: Sequence[float], transfers: Sequence[Mapping[str, Any]], model: str
):
    """Recompute (prefill) time vs transfer time per link; transfer pays where its curve is lower.

    transfers: {label, how, seconds}. Returns (fig, ax).
    """
    fig, ax = new_figure()
    ax.plot(
        prompt_lens,
        [s * 1e3 for s in recompute_s],
        color=PHASE_COLORS["prefill"],
        marker="s",
        label="recompute: prefill (measured)",
    )
    for c in transfers:
        ax.plot(
            prompt_lens,
            [s * 1e3 for s in c["seconds"]],
            linestyle=_HOW_STYLE[c["how"]],
            label=f"transfer: {c['label']} ({c['how']})",
            color=c.get("color"),
        )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("time (ms, log scale)")
    ax.set_title(f"Transfer the KV or recompute it? {model}")
    ax.legend(fontsize=10)
    return fig, ax


def layerwise_overlap(rows: Sequence[Mapping[str, Any]]):
    """rows: {label, compute_s, transfer_s, at_end_s, layerwise_s}: grouped bars in ms; returns (fig, ax)."""
    import numpy as np

    fig, ax = new_figure()
    x = np.arange(len(rows))
    w = 0.2
    series = [
        ("prefill alone", "compute_s", PHASE_COLORS["prefill"]),
        ("transfer alone", "transfer_s", PHASE_COLORS["transfer"]),
        ("prefill, then send", "at_end_s", "#7f7f7f"),
        ("send layer by layer", "layerwise_s", "#17becf"),
    ]
    for j, (label, key, color) in enumerate(series):
        ax.bar(x + (j - 1.5) * w, [r[key] * 1e3 for r in rows], w, label=label, color=color)
    ax.set_xticks(x, [r["label"] for r in rows])
    ax.set_ylabel("time to KV at the decode worker (ms)")
    ax.set_title("Layer-wise streaming hides the transfer behind prefill")
    ax.legend(fontsize=10)
    return fig, ax


def bandwidth_with_references(
    rows: Sequence[Mapping[str, Any]],
    reference_rows: Sequence[Mapping[str, Any]] = (),
    computed: Sequence[Any] = (),
    reference_label: str = "reference",
    title: str = "KV transfer bandwidth vs payload size",
):
    """This machine's sweep (solid, filled markers) beside a reference machine's (`reference_rows`, same
    keys: dashed, hollow markers) and links computed from datasheets (`computed`: labkit.links.Link,
    dotted: size / link.seconds(size)). Both axes log. Returns (fig, ax)."""
    fig, ax = new_figure(figsize=(12, 7))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        pts = sorted((r["nbytes"], r["gb_per_s"]) for r in rows if r["backend"] == backend)
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            label=f"{backend} (this machine)",
            color=BACKEND_COLORS.get(backend),
            linestyle="--" if backend.startswith("memcpy") else "-",
        )
    for backend in dict.fromkeys(r["backend"] for r in reference_rows):
        pts = sorted((r["nbytes"], r["gb_per_s"]) for r in reference_rows if r["backend"] == backend)
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            markerfacecolor="none",
            linewidth=1.4,
            linestyle=(0, (5, 3)),
            alpha=0.75,
            color=BACKEND_COLORS.get(backend),
            label=f"{backend}, {reference_label}",
        )
    sizes = sorted({r["nbytes"] for r in [*rows, *reference_rows]})
    for link, color in zip(computed, COMPUTED_COLORS):
        ax.plot(
            sizes,
            [n / link.seconds(n) / 1e9 for n in sizes],
            linestyle=":",
            linewidth=2.8,
            color=color,
            label=f"{link.label} (computed from the datasheet)",
        )
    return _log_log(fig, ax, "payload (bytes, log scale)", "GB/s (1e9 bytes per second, log scale)", title)


def layerwise_measured_vs_predicted(rows: Sequence[Mapping[str, Any]], predicted_s: Sequence[float]):
    """Per measured layer-wise run (rows of `labkit.transfer.measure.layerwise_vs_at_end`, each with a
    `label`): the prefill and the transfer alone, the KV sent after the prefill, sent layer by layer,
    and a prediction of the layer-by-layer time (hatched). Milliseconds; returns (fig, ax)."""
    import numpy as np

    fig, ax = new_figure(figsize=(12, 6))
    x = np.arange(len(rows))
    w = 0.16
    series = [
        ("prefill alone", [r["compute_s"] for r in rows], PHASE_COLORS["prefill"], None),
        ("transfer alone", [r["transfer_s"] for r in rows], PHASE_COLORS["transfer"], None),
        ("prefill, then send (measured)", [r["at_end_s"] for r in rows], "#7f7f7f", None),
        ("layer by layer (measured)", [r["layerwise_s"] for r in rows], "#17becf", None),
        ("layer by layer (your prediction)", list(predicted_s), "white", "//"),
    ]
    for j, (label, vals, color, hatch) in enumerate(series):
        ax.bar(
            x + (j - 2) * w,
            [v * 1e3 for v in vals],
            w,
            label=label,
            color=color,
            hatch=hatch,
            edgecolor="#17becf" if hatch else None,
        )
    ax.set_xticks(x, [r["label"] for r in rows])
    ax.set_ylabel("time until the decode side holds the KV (ms)")
    ax.set_title("Layer-wise streaming: measured, and as your function predicts it")
    ax.legend(fontsize=10)
    return fig, ax


def exposed_transfer_vs_prompt(prompt_lens: Sequence[int], curves: Sequence[Mapping[str, Any]], title: str):
    """curves: {label, at_end_s, layerwise_s}: per link, the time a request still waits for its KV after
    the prefill ends, sent whole after it (dashed) or layer by layer during it (solid), one value per
    prompt length. Milliseconds, log scales; returns (fig, ax)."""
    fig, ax = new_figure(figsize=(12, 6.5))
    for c in curves:
        (line,) = ax.plot(
            prompt_lens,
            [max(s, 1e-7) * 1e3 for s in c["layerwise_s"]],
            marker="o",
            label=f"{c['label']}: layer by layer",
        )
        ax.plot(
            prompt_lens,
            [max(s, 1e-7) * 1e3 for s in c["at_end_s"]],
            linestyle="--",
            color=line.get_color(),
            label=f"{c['label']}: after the prefill",
        )
    return _log_log(fig, ax, "prompt length (tokens)", "wait for the KV after the prefill (ms, log)", title)


def _log_log(fig: Any, ax: Any, xlabel: str, ylabel: str, title: str) -> tuple[Any, Any]:
    """Both axes log (x in powers of two), labels, title, the legend right of the plot; returns (fig, ax)."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=10, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig, ax


def break_even_links(gbps_by_gpus: Mapping[int, float], links: Sequence[Any], title: str):
    """Per tensor-parallel size, the link speed (Gbit/s) at which shipping the KV matches recomputing it
    (bars), with datacenter links (labkit.links.Link, dotted) across them. Log x; returns (fig, ax)."""
    fig, ax = new_figure(figsize=(11, 5))
    ax.barh(
        [f"recompute on {g} GPUs (TP {g})" for g in gbps_by_gpus],
        list(gbps_by_gpus.values()),
        left=1.0,
        color=PHASE_COLORS["prefill"],
        alpha=0.8,
    )
    for link in links:
        ax.axvline(link.gbps, color="#555555", ls=":", lw=1.5)
        ax.annotate(link.label, (link.gbps, -0.45), rotation=90, va="bottom", ha="right", fontsize=10)
    ax.set_xscale("log")
    ax.set_xlim(1.0, max(max(gbps_by_gpus.values()), *(link.gbps for link in links)) * 1.5)
    ax.set_xlabel("Gbit/s (log): a link right of a bar ships the KV sooner than those GPUs recompute it")
    ax.set_title(title)
    return fig, ax
