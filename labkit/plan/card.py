"""The simulator's report card: predicted against measured, per serving mode, against targets.

Each validation run (a mode at a rate) gives p50 and p99 of TTFT, TPOT and ITL, and output
throughput, measured by the benchmark client and predicted by replaying the same trace in the
simulator. Targets: every p50 within 10% and every p99 within 20% (issue 18), throughput within
10% (as a p50). For scale: Vidur (MLSys'24) reports under 9% latency error; independent
comparisons of such simulators find 20-35% typical. Modes slot in as their runs exist; a file
written before a figure was recorded (the 2026-11-27 validation has no p99s and no ITL) says
which figures are missing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

METRICS = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "itl_p50_ms", "itl_p99_ms", "output_tok_s")
NAMES = {
    "ttft_p50_ms": "TTFT p50",
    "ttft_p99_ms": "TTFT p99",
    "tpot_p50_ms": "TPOT p50",
    "tpot_p99_ms": "TPOT p99",
    "itl_p50_ms": "ITL p50",
    "itl_p99_ms": "ITL p99",
    "output_tok_s": "output tok/s",
}
TARGETS = {"p50": 0.10, "p99": 0.20, "throughput": 0.10}
# The serving modes the card knows, in its order, with the names their benchmark runs carry.
MODES = {
    "mono": "mono (one engine, all cores)",
    "mono-dp": "mono-dp (one engine per core, one router)",
    "1p1d": "1P1D",
    "1p1d-selective": "selective 1P1D (short prompts prefilled on decode)",
    "vllm-pd": "vLLM P/D (NixlConnector)",
}


def slot(mode: str) -> str:
    """The card's name for a run's mode: a selective run carries its threshold ("1p1d-selective-256"),
    its slot is "1p1d-selective"; every other name is its own slot."""
    return re.sub(r"^(\d+p\d+d-selective)-\d+$", r"\1", mode)


def target_for(metric: str) -> float:
    """The largest |relative error| the card accepts for a metric (0.10 for p50s and throughput, 0.20 for p99s)."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; the card has {METRICS}")
    return TARGETS["p99"] if "_p99" in metric else TARGETS["p50"] if "_p50" in metric else TARGETS["throughput"]


@dataclass(frozen=True, slots=True)
class ValidationRow:
    """One figure of one run: predicted against measured."""

    mode: str
    rate_rps: float
    metric: str
    predicted: float
    measured: float

    @property
    def error(self) -> float:
        """(predicted - measured) / measured; nan when nothing was measured."""
        return (self.predicted - self.measured) / self.measured if self.measured else math.nan

    @property
    def target(self) -> float:
        return target_for(self.metric)

    @property
    def met(self) -> bool:
        """|error| within the metric's target."""
        return not math.isnan(self.error) and abs(self.error) <= self.target

    def as_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "rate_rps": self.rate_rps,
            "metric": self.metric,
            "predicted": self.predicted,
            "measured": self.measured,
            "error": self.error,
        }


@dataclass(frozen=True)
class ReportCard:
    """Every run's figures, what is met, what is missing (figures and modes)."""

    rows: tuple[ValidationRow, ...]
    source: str = ""

    @property
    def runs(self) -> list[tuple[str, float]]:
        """(mode, rate) of every run, in the card's mode order, then by rate."""
        order = {m: i for i, m in enumerate(MODES)}
        keys = {(r.mode, r.rate_rps) for r in self.rows}
        return sorted(keys, key=lambda k: (order.get(slot(k[0]), len(order)), k[0], k[1]))

    def cell(self, mode: str, rate_rps: float, metric: str) -> ValidationRow | None:
        return next((r for r in self.rows if (r.mode, r.rate_rps, r.metric) == (mode, rate_rps, metric)), None)

    @property
    def missing_metrics(self) -> list[str]:
        """Figures no run of this card has (a file written before they were recorded)."""
        have = {r.metric for r in self.rows}
        return [m for m in METRICS if m not in have]

    @property
    def missing_modes(self) -> list[str]:
        """Modes the card knows that have no run here yet."""
        have = {slot(r.mode) for r in self.rows}
        return [m for m in MODES if m not in have]

    def scored(self, kind: str | None = None) -> list[ValidationRow]:
        """Rows with a measurement; kind "p50", "p99" or "throughput" keeps those only."""
        out = [r for r in self.rows if not math.isnan(r.error)]
        if kind == "throughput":
            return [r for r in out if r.metric == "output_tok_s"]
        return [r for r in out if kind is None or f"_{kind}_" in r.metric]

    def summary(self) -> list[str]:
        """One line per target (how many met, the worst miss), then what is missing."""
        lines = []
        for kind, what in (("p50", "p50s"), ("p99", "p99s"), ("throughput", "throughputs")):
            rows = self.scored(kind)
            if not rows:
                lines.append(f"{what}: none in this file")
                continue
            worst = max(rows, key=lambda r: abs(r.error))
            met = sum(r.met for r in rows)
            lines.append(
                f"{what} within {TARGETS[kind]:.0%}: {met} of {len(rows)}"
                f"{'  (target met)' if met == len(rows) else '  (target not met)'}; worst: {worst.mode} "
                f"{NAMES[worst.metric]} at {worst.rate_rps:g} req/s, {worst.error:+.1%}"
            )
        if self.missing_metrics:
            lines.append(
                "missing from this file: "
                + ", ".join(NAMES[m] for m in self.missing_metrics)
                + " (written before the card recorded them)"
            )
        if self.missing_modes:
            lines.append("no runs yet: " + ", ".join(self.missing_modes))
        return lines

    def table(self) -> str:
        """A fixed-width table: one line per run, one column per figure (error, and x where it misses
        its target; - where the file has no such figure), then the summary."""
        cols = [m for m in METRICS if m not in self.missing_metrics] + self.missing_metrics
        head = f"{'mode':>18} {'rate':>6} " + " ".join(f"{NAMES[m]:>13}" for m in cols)
        lines = [head, "-" * len(head)]
        for mode, rate in self.runs:
            cells = []
            for m in cols:
                r = self.cell(mode, rate, m)
                cells.append(
                    f"{'-':>13}" if r is None or math.isnan(r.error) else f"{r.error:+11.1%}{'  ' if r.met else ' x'}"
                )
            lines.append(f"{mode:>18} {rate:6.3g} " + " ".join(cells))
        lines.append(
            f"targets: p50 within {TARGETS['p50']:.0%}, p99 within {TARGETS['p99']:.0%}, "
            f"throughput within {TARGETS['throughput']:.0%}; x: missed"
        )
        return "\n".join(lines + self.summary())

    def to_dict(self) -> dict[str, Any]:
        """What the benchmark writes into its JSON."""
        return {
            "targets": dict(TARGETS),
            "source": self.source,
            "runs": [
                {
                    "mode": m,
                    "rate_rps": r,
                    "errors": {c.metric: c.error for c in self.rows if (c.mode, c.rate_rps) == (m, r)},
                }
                for m, r in self.runs
            ],
            "met": {k: [sum(r.met for r in self.scored(k)), len(self.scored(k))] for k in TARGETS},
            "missing_metrics": self.missing_metrics,
            "missing_modes": self.missing_modes,
            "summary": self.summary(),
        }


def report_card(rows: Sequence[ValidationRow], source: str = "") -> ReportCard:
    """The card of these rows (`validate.load_rows` reads them from a validation JSON)."""
    for r in rows:
        target_for(r.metric)
    return ReportCard(tuple(rows), source)
