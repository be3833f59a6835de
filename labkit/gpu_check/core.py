"""The runner of the GPU checks: a context every check writes to, a global time budget, the summary.

A check is `def check_x(ctx: Ctx) -> None` that puts its results in `ctx.results[...]` and its
charts through `ctx.save` (at most `MAX_CHARTS` PNGs in all: the lab's device runner brings back
eight files, and results.json and the log are two of them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MAX_CHARTS = 6  # + results.json + gpu_check.log = the device runner's 8 files


@dataclass
class Ctx:
    """Everything a check needs: where to write, the device, the clock, and the shared results."""

    out: Path
    device: str
    dtype: str
    smoke: bool
    deadline: float
    log_file: Any
    results: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    peaks: Any = None
    engine_variants: list[str] = field(default_factory=list)  # "model:form"; empty: the default four
    engine_sweep: bool = True
    pytest_k: str | None = None
    notebooks: list[str] = field(default_factory=list)  # notebook numbers for the notebooks check

    @property
    def gpu(self) -> bool:
        return self.device.startswith("cuda")

    def log(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.log_file.write(line + "\n")
        self.log_file.flush()

    def left_s(self) -> float:
        return self.deadline - time.monotonic()

    def save(self, fig: Any, name: str) -> None:
        """Writes `fig` as `<name>.png`, unless the chart budget is spent (then the log says so)."""
        import matplotlib.pyplot as plt

        if len(self.files) >= MAX_CHARTS:
            self.log(
                f"chart {name}.png not written: {MAX_CHARTS} charts already (the device runner brings "
                "back 8 files); its data is in results.json"
            )
        else:
            path = self.out / f"{name}.png"
            fig.savefig(path)
            self.files.append(path.name)
        plt.close(fig)


@dataclass(frozen=True)
class Check:
    name: str
    fn: Callable[[Ctx], None]
    est_s: float  # on an H100; a check is skipped when less time than this is left
