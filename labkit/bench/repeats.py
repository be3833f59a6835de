"""Honest statistics for a sweep: repeats, pooled points and bootstrap intervals.

One (mode, rate) point of one sweep rests on a few dozen requests, one arrival schedule and a
machine other jobs share: its p99 and its goodput move from run to run. `run_repeats` runs the
same sweep `repeats` times, each with its own seed (new prompts, new arrival times) and fresh
servers; `RepeatedSweep` pools them. For each point and statistic it gives an `Interval`:

- `value`: over every request of every repeat (goodput: good requests / summed duration);
- `lo`, `hi`: a bootstrap interval. Requests are resampled with replacement within each repeat
  (a request's inter-token gaps stay together: one stall shows in all of its gaps), the
  statistic is recomputed, and the central `confidence` share of the results is kept;
- `per_repeat`: the statistic of each repeat alone, to draw as dots.

Two modes whose intervals overlap are not told apart by the run: `winner` says so (None).

    >>> reps = run_repeats([SweepConfig(conv, rates_rps=(0.4, 0.8), n_requests=17)], factory, repeats=3)
    >>> reps[0].interval("1p1d", 0.4, "itl_p99_ms")          # Interval(value=..., lo=..., hi=...)
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from labkit.bench.loadgen import BenchResult
from labkit.bench.metrics import SLO, RequestRecord
from labkit.bench.sweep import ServerFactory, SweepConfig, SweepResult, run_sweeps

GoodputFn = Callable[[Sequence[RequestRecord], SLO, float], float]
"""`goodput(records, slo, duration_s) -> requests per second that met every bound of `slo``."""

_LATENCY = re.compile(r"(ttft|itl|tpot|e2e)_p(\d+(?:\.\d+)?)_ms")
HIGHER_IS_BETTER = ("goodput_rps", "output_tps", "slo_attainment")


def goodput_rps(records: Sequence[RequestRecord], slo: SLO, duration_s: float) -> float:
    """Requests per second that completed and met every bound of `slo` (DistServe's goodput), over `duration_s`."""
    return sum(slo.met(r) for r in records) / max(duration_s, 1e-9)


def misses(records: Sequence[RequestRecord], slo: SLO) -> dict[str, int]:
    """How many of `records` failed (`error`), broke each bound of `slo` (`ttft`, `tpot`, `itl`, `e2e`;
    a request may break several) or met them all (`good`); plus `requests`."""
    out = {"requests": len(records), "error": 0, "ttft": 0, "tpot": 0, "itl": 0, "e2e": 0, "good": 0}
    for r in records:
        if not r.ok:
            out["error"] += 1
            continue
        out["ttft"] += slo.ttft_s is not None and r.ttft_s > slo.ttft_s
        out["tpot"] += slo.tpot_s is not None and r.tpot_s > slo.tpot_s
        out["itl"] += slo.itl_s is not None and r.max_itl_s > slo.itl_s
        out["e2e"] += slo.e2e_s is not None and r.e2e_s > slo.e2e_s
        out["good"] += slo.met(r)
    return out


def _percentile(values: np.ndarray, q: float) -> float:
    """np.percentile's default (linear) interpolation, without its per-call overhead (the bootstrap calls it
    thousands of times on small arrays)."""
    v = np.sort(values)
    pos = q / 100 * (len(v) - 1)
    lo = int(pos)
    return float(v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo))


def _latencies_ms(records: Sequence[RequestRecord], metric: str) -> list[float]:
    ok = [r for r in records if r.ok]
    if metric == "itl":
        return [1e3 * g for r in ok for g in r.itl_s]
    if metric == "tpot":
        return [1e3 * r.tpot_s for r in ok if r.output_tokens > 1]
    return [1e3 * getattr(r, f"{metric}_s") for r in ok]


def statistic(
    stat: str,
    runs: Sequence[tuple[Sequence[RequestRecord], float]],
    *,
    slo: SLO | None = None,
    goodput_fn: GoodputFn | None = None,
) -> float:
    """`stat` over several runs pooled, each given as (records, duration_s).

    `stat`: "goodput_rps" (needs `slo`; counted by `goodput_fn`, default `goodput_rps`), "slo_attainment"
    (share of requests sent that met `slo`), "output_tps" (output tokens/s), or a latency percentile
    "<ttft|itl|tpot|e2e>_p<q>_ms" over every request (every gap for itl) of every run. NaN when empty.
    """
    duration = sum(d for _, d in runs)
    if stat in ("goodput_rps", "slo_attainment"):
        if slo is None:
            raise ValueError(f"{stat} needs an SLO")
        if stat == "slo_attainment":
            sent = sum(len(recs) for recs, _ in runs)
            return sum(slo.met(r) for recs, _ in runs for r in recs) / sent if sent else math.nan
        fn = goodput_fn or goodput_rps
        return sum(float(fn(recs, slo, d)) * d for recs, d in runs) / duration if duration > 0 else math.nan
    if stat == "output_tps":
        return sum(r.output_tokens for recs, _ in runs for r in recs if r.ok) / duration if duration > 0 else math.nan
    m = _LATENCY.fullmatch(stat)
    if m is None:
        raise ValueError(f"unknown statistic {stat!r}: use goodput_rps, slo_attainment, output_tps or e.g. itl_p99_ms")
    vals = [v for recs, _ in runs for v in _latencies_ms(recs, m.group(1))]
    return _percentile(np.asarray(vals, dtype=float), float(m.group(2))) if vals else math.nan


@dataclass(frozen=True, slots=True)
class Interval:
    """A pooled statistic with its bootstrap interval [lo, hi] and the value of each repeat."""

    value: float
    lo: float
    hi: float
    per_repeat: tuple[float, ...]

    def overlaps(self, other: Interval) -> bool:
        """True when the two intervals share a value (the run cannot tell them apart)."""
        return not (self.hi < other.lo or other.hi < self.lo)


def bootstrap(
    stat: str,
    runs: Sequence[tuple[Sequence[RequestRecord], float]],
    *,
    slo: SLO | None = None,
    goodput_fn: GoodputFn | None = None,
    confidence: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> Interval:
    """`stat` over the pooled runs, with a percentile bootstrap interval (requests resampled within each run)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 10:
        raise ValueError(f"n_boot must be >= 10, got {n_boot}")
    kw: dict[str, Any] = {"slo": slo, "goodput_fn": goodput_fn}
    value = statistic(stat, runs, **kw)
    per = tuple(statistic(stat, [run], **kw) for run in runs)
    rng = np.random.default_rng(seed)
    m = _LATENCY.fullmatch(stat)
    if m:  # latencies: each request's values as one array, so a draw is a concatenation, not a Python loop
        q = float(m.group(2))
        per_rec = [[np.asarray(_latencies_ms([r], m.group(1)), dtype=float) for r in recs] for recs, _ in runs]
        draws = []
        for _ in range(n_boot):
            parts = [arrs[i] for arrs in per_rec if arrs for i in rng.integers(0, len(arrs), len(arrs))]
            vals = np.concatenate(parts) if parts else np.empty(0)
            draws.append(_percentile(vals, q) if len(vals) else math.nan)
    else:
        draws = []
        for _ in range(n_boot):
            sample = [([recs[i] for i in rng.integers(0, len(recs), len(recs))] if recs else [], d) for recs, d in runs]
            draws.append(statistic(stat, sample, **kw))
    finite = np.asarray([x for x in draws if not math.isnan(x)], dtype=float)
    if not len(finite):
        return Interval(value, math.nan, math.nan, per)
    tail = (1 - confidence) / 2 * 100
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return Interval(value, float(lo), float(hi), per)


@dataclass
class RepeatedSweep:
    """The same sweep run several times (`results`, one SweepResult per repeat), pooled per point."""

    results: list[SweepResult]
    _cache: dict[tuple[Any, ...], Interval] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.results:
            raise ValueError("a repeated sweep needs at least one result")
        first = self.results[0].config
        for r in self.results[1:]:
            if (r.config.modes, r.config.rates_rps) != (first.modes, first.rates_rps):
                raise ValueError("every repeat must sweep the same modes and rates")

    @property
    def config(self) -> SweepConfig:
        return self.results[0].config

    @property
    def modes(self) -> tuple[str, ...]:
        return self.config.modes

    @property
    def rates(self) -> tuple[float, ...]:
        return self.config.rates_rps

    @property
    def workload(self) -> str:
        return self.config.workload_obj.name

    def runs(self, mode: str, rate: float) -> list[BenchResult]:
        """The BenchResult of every repeat at (mode, rate)."""
        return [r.runs[(mode, rate)] for r in self.results]

    def records(self, mode: str, rate: float) -> list[RequestRecord]:
        """Every request of every repeat at (mode, rate)."""
        return [rec for res in self.runs(mode, rate) for rec in res.records]

    def pooled_runs(self, slo: SLO | None = None) -> dict[tuple[str, float], BenchResult]:
        """Per (mode, rate), one BenchResult holding every repeat's requests (durations summed), for the
        charts that take runs (latency CDFs)."""
        from labkit.bench.metrics import summarize

        out = {}
        for mode in self.modes:
            for rate in self.rates:
                runs = self.runs(mode, rate)
                dur = sum(r.summary.duration_s for r in runs)
                recs = [rec for r in runs for rec in r.records]
                out[(mode, rate)] = BenchResult(
                    recs, summarize(recs, dur, slo or self.config.slo), {"mode": mode, "repeats": len(runs)}
                )
        return out

    def interval(
        self,
        mode: str,
        rate: float,
        stat: str,
        *,
        slo: SLO | None = None,
        goodput_fn: GoodputFn | None = None,
        confidence: float = 0.95,
        n_boot: int = 1000,
        seed: int = 0,
    ) -> Interval:
        """`stat` at (mode, rate) over all repeats, with its bootstrap interval (SLO default: the sweep's)."""
        slo = slo or self.config.slo
        key = (mode, rate, stat, slo, id(goodput_fn), confidence, n_boot, seed)
        if key not in self._cache:  # charts, winners and sentences ask for the same intervals
            runs = [(res.records, res.summary.duration_s) for res in self.runs(mode, rate)]
            self._cache[key] = bootstrap(
                stat, runs, slo=slo, goodput_fn=goodput_fn, confidence=confidence, n_boot=n_boot, seed=seed
            )
        return self._cache[key]

    def points(
        self,
        stats: Sequence[str] = ("goodput_rps", "ttft_p99_ms", "itl_p99_ms"),
        *,
        slo: SLO | None = None,
        goodput_fn: GoodputFn | None = None,
        unit_rps: float | None = None,
        confidence: float = 0.95,
        n_boot: int = 1000,
    ) -> list[dict[str, Any]]:
        """One row per (mode, rate): `mode`, `rate_rps`, `requests`, `repeats`, and per statistic `<stat>`,
        `<stat>_lo`, `<stat>_hi`, `<stat>_repeats`. `unit_rps`: also `load_x` = rate / unit_rps (e.g. the
        rate mono serves one request at a time)."""
        rows = []
        for mode in self.modes:
            for rate in self.rates:
                row: dict[str, Any] = {
                    "workload": self.workload,
                    "mode": mode,
                    "rate_rps": rate,
                    "requests": len(self.records(mode, rate)),
                    "repeats": len(self.results),
                }
                if unit_rps:
                    row["load_x"] = rate / unit_rps
                for stat in stats:
                    iv = self.interval(
                        mode, rate, stat, slo=slo, goodput_fn=goodput_fn, confidence=confidence, n_boot=n_boot
                    )
                    row.update(
                        {stat: iv.value, f"{stat}_lo": iv.lo, f"{stat}_hi": iv.hi, f"{stat}_repeats": iv.per_repeat}
                    )
                rows.append(row)
        return rows

    def winner(
        self,
        rate: float,
        stat: str = "goodput_rps",
        *,
        slo: SLO | None = None,
        goodput_fn: GoodputFn | None = None,
        modes: Sequence[str] | None = None,
        n_boot: int = 1000,
    ) -> str | None:
        """The mode whose interval of `stat` at `rate` lies wholly on the better side of every other's
        (higher for goodput and throughput, lower for latencies); None when intervals overlap (a tie)."""
        ivs = {
            m: self.interval(m, rate, stat, slo=slo, goodput_fn=goodput_fn, n_boot=n_boot)
            for m in (modes or self.modes)
        }
        return best_separated(ivs, higher_is_better=stat in HIGHER_IS_BETTER)


def best_separated(intervals: dict[str, Interval], *, higher_is_better: bool) -> str | None:
    """The key whose interval is better than, and does not overlap, every other's; None otherwise."""
    if not intervals:
        return None
    sign = 1.0 if higher_is_better else -1.0
    best = max(intervals, key=lambda k: sign * intervals[k].value if not math.isnan(intervals[k].value) else -math.inf)
    b = intervals[best]
    for k, iv in intervals.items():
        if k != best and (b.overlaps(iv) or math.isnan(b.lo)):
            return None
    return best


def run_repeats(
    cfgs: Sequence[SweepConfig],
    start_server: ServerFactory,
    repeats: int = 3,
    *,
    model: str | None = None,
    seed_step: int = 1,
) -> list[RepeatedSweep]:
    """Runs the sweeps `repeats` times (repeat k with each config's seed + k x `seed_step`: new prompts and
    arrival times; fresh servers each time); returns one RepeatedSweep per config, in order."""
    from tqdm.auto import tqdm

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if seed_step < 1:
        raise ValueError(f"seed_step must be >= 1, got {seed_step}")
    done: list[list[SweepResult]] = []
    for k in tqdm(range(repeats), desc="repeats", disable=not any(c.progress for c in cfgs)):
        done.append(run_sweeps([replace(c, seed=c.seed + k * seed_step) for c in cfgs], start_server, model=model))
    return [RepeatedSweep([rep[i] for rep in done]) for i in range(len(cfgs))]
