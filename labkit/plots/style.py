"""One look for every chart: readable on a projector, phases in fixed colours."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

PHASE_COLORS = {
    "prefill": "#d62728",  # red: compute-bound
    "decode": "#1f77b4",  # blue: memory-bound
    "mixed": "#9467bd",
    "transfer": "#2ca02c",
    "idle": "#7f7f7f",
}
MODE_COLORS = {
    "mono": "#ff7f0e",
    "mono-chunked": "#8c564b",
    "mono-dp": "#1f77b4",
    "1p1d": "#2ca02c",
    "disagg": "#2ca02c",
    "vllm-mono": "#e377c2",
    "vllm-pd": "#17becf",
}

_RC: dict[str, Any] = {
    "figure.figsize": (10, 6),
    "figure.dpi": 100,
    "savefig.dpi": 110,
    "savefig.bbox": "tight",
    "font.size": 14,
    "axes.titlesize": 17,
    "axes.titleweight": "bold",
    "axes.labelsize": 15,
    "legend.fontsize": 12,
    "xtick.labelsize": 13,
    "ytick.labelsize": 13,
    "lines.linewidth": 2.4,
    "lines.markersize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def apply() -> None:
    """Sets the lab's matplotlib style (idempotent)."""
    import matplotlib

    cast(Any, matplotlib.rcParams).update(_RC)  # the stubs type its keys as literals; these are valid names


def new_figure(nrows: int = 1, ncols: int = 1, **kw: Any):
    """`plt.subplots` in the lab's style; returns (fig, ax or axes)."""
    import matplotlib.pyplot as plt

    apply()
    if "figsize" not in kw and (nrows, ncols) != (1, 1):
        kw["figsize"] = (6.5 * ncols, 4.8 * nrows)
    return plt.subplots(nrows, ncols, **kw)


def save(fig: Any, path: str | Path) -> Path:
    """Writes `fig` as PNG (parent created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
