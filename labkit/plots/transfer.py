"""Charts of KV-cache transfer: bandwidth vs size, transfer time vs prompt length, break-even, overlap."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from labkit.plots.style import PHASE_COLORS, new_figure

BACKEND_COLORS = {"memcpy": "#000000", "shm": "#2ca02c", "tcp": "#1f77b4", "nixl": "#9467bd", "cuda-ipc": "#d62728"}
_HOW_STYLE = {"measured": "-", "emulated": "--", "computed": ":"}


def bandwidth_vs_size(rows: Sequence[Mapping[str, Any]], title: str = "KV transfer bandwidth vs payload size"):
    """rows: {backend, nbytes, gb_per_s} (backend "memcpy" for the machine's copy speed); returns (fig, ax)."""
    fig, ax = new_figure()
    for backend in dict.fromkeys(r["backend"] for r in rows):
        pts = sorted((r["nbytes"], r["gb_per_s"]) for r in rows if r["backend"] == backend)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend,
                color=BACKEND_COLORS.get(backend), linestyle="--" if backend == "memcpy" else "-")
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
        ax.plot(prompt_lens, [s * 1e3 for s in c["seconds"]], marker="o" if c["how"] == "measured" else None,
                linestyle=_HOW_STYLE[c["how"]], label=f"{c['label']} ({c['how']})", color=c.get("color"))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("KV transfer time (ms, log scale)")
    ax.set_title(f"Moving one request's KV cache: {model}")
    ax.legend(fontsize=10)
    return fig, ax


def break_even(prompt_lens: Sequence[int], recompute_s: Sequence[float], transfers: Sequence[Mapping[str, Any]],
               model: str):
    """Recompute (prefill) time vs transfer time per link; transfer pays where its curve is lower.

    transfers: {label, how, seconds}. Returns (fig, ax).
    """
    fig, ax = new_figure()
    ax.plot(prompt_lens, [s * 1e3 for s in recompute_s], color=PHASE_COLORS["prefill"], marker="s",
            label="recompute: prefill (measured)")
    for c in transfers:
        ax.plot(prompt_lens, [s * 1e3 for s in c["seconds"]], linestyle=_HOW_STYLE[c["how"]],
                label=f"transfer: {c['label']} ({c['how']})", color=c.get("color"))
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
    series = [("prefill alone", "compute_s", PHASE_COLORS["prefill"]), ("transfer alone", "transfer_s",
              PHASE_COLORS["transfer"]), ("prefill, then send", "at_end_s", "#7f7f7f"),
              ("send layer by layer", "layerwise_s", "#17becf")]
    for j, (label, key, color) in enumerate(series):
        ax.bar(x + (j - 1.5) * w, [r[key] * 1e3 for r in rows], w, label=label, color=color)
    ax.set_xticks(x, [r["label"] for r in rows])
    ax.set_ylabel("time to KV at the decode worker (ms)")
    ax.set_title("Layer-wise streaming hides the transfer behind prefill")
    ax.legend(fontsize=10)
    return fig, ax
