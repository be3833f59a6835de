"""The gain-vs-devices curve: for 1, 2, ... N devices, the best disaggregated deployment against N
monolithic replicas, simulated for one workload, SLO and network.

Where the curve crosses 1.10 is the device count from which disaggregation pays for *this*
workload: the rule of thumb ("16 or more devices") replaced by a result. The curve has teeth:
a budget one device past a multiple of the best unit pays for a remainder unit that serves less
per device (or an idle device), so the gain dips and recovers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from labkit.plan.latency_model import LatencyModel
from labkit.plan.search import Deployment, Network, SearchSettings, UnitTable
from labkit.plan.simulator import SLO, Limits
from labkit.plan.workload import Requests

PAYS = 1.10  # the planner's "disaggregate" threshold (labkit.plan.checklist.verdict_for_gain)


@dataclass(frozen=True)
class GainCurve:
    """Per device count: the best deployment, N mono replicas, the best disaggregated deployment."""

    devices: tuple[int, ...]
    best: tuple[Deployment, ...]
    mono: tuple[Deployment, ...]
    disagg: tuple[Deployment | None, ...]

    @property
    def gain(self) -> np.ndarray:
        """Goodput of the best disaggregated deployment over N mono replicas (nan where none fits)."""
        out = []
        for m, d in zip(self.mono, self.disagg):
            if d is None:
                out.append(math.nan)
            elif m.goodput_rps == 0:
                out.append(math.inf if d.goodput_rps > 0 else math.nan)
            else:
                out.append(d.goodput_rps / m.goodput_rps)
        return np.array(out)

    def per_device(self, which: str = "best") -> np.ndarray:
        """Goodput per device (req/s, idle devices counted) of "best", "mono" or "disagg"."""
        rows = {"best": self.best, "mono": self.mono, "disagg": self.disagg}[which]
        return np.array([d.goodput_rps_per_device if d is not None else math.nan for d in rows])

    def at(self, devices: int) -> tuple[Deployment, Deployment, Deployment | None, float]:
        """(best, mono, disagg, gain) at one device count of the curve."""
        i = self.devices.index(devices)
        return self.best[i], self.mono[i], self.disagg[i], float(self.gain[i])

    def pays_from(self, threshold: float = PAYS) -> int | None:
        """The smallest device count from which the gain stays >= threshold to the end of the curve
        (None: it does not)."""
        g = self.gain
        ok = np.where(np.isnan(g), False, g >= threshold)
        if not ok[-1]:
            return None
        k = len(ok) - 1
        while k > 0 and ok[k - 1]:
            k -= 1
        return self.devices[k]

    def describe(self, threshold: float = PAYS) -> str:
        """One sentence: from which device count the gain stays at `threshold` or more, and its peak."""
        lo, hi = self.devices[0], self.devices[-1]
        n = self.pays_from(threshold)
        g = self.gain
        if not np.isfinite(g).any():
            return f"no disaggregated deployment fits {lo}-{hi} devices"
        top = int(np.nanargmax(np.where(np.isfinite(g), g, np.nan)))
        d = self.disagg[top]
        peak = f"peak {g[top]:.2f}x at {self.devices[top]} devices ({d.label if d is not None else '-'})"
        upper = [x for n, x in zip(self.devices, g) if n >= hi / 2 and np.isfinite(x)]
        if upper and hi >= 2 * lo:  # how it behaves on the larger half: the teeth or a plateau
            peak = f"{hi // 2}-{hi} devices: {min(upper):.2f}-{max(upper):.2f}x; {peak}"
        if n is None:
            return (
                f"the gain does not stay at {threshold:.2f}x or more up to {hi} devices ({g[-1]:.2f}x at {hi}; {peak})"
            )
        if n == lo:
            return f"disaggregation pays ({threshold:.2f}x or more) at every count from {lo} to {hi} devices ({peak})"
        return f"disaggregation pays ({threshold:.2f}x or more) from {n} devices on, up to {hi} ({peak})"

    def rows(self) -> list[dict[str, object]]:
        """One row per device count, for a table or JSON."""
        return [
            {
                "devices": n,
                "best": b.label,
                "best goodput/device (req/s)": round(b.goodput_rps_per_device, 3),
                "mono-dp goodput/device (req/s)": round(m.goodput_rps_per_device, 3),
                "best disaggregated": d.label if d is not None else "",
                "gain (x)": round(float(g), 3) if math.isfinite(g) else None,
            }
            for n, b, m, d, g in zip(self.devices, self.best, self.mono, self.disagg, self.gain)
        ]


def gain_curve(
    requests: Requests,
    latency: LatencyModel,
    slo: SLO,
    devices: Sequence[int] = range(1, 65),
    *,
    network: Network | None = None,
    limits: Limits | None = None,
    prefix_hit_rate: float = 0.0,
    price_per_device_hour: float = 2.0,
    settings: SearchSettings | None = None,
    table: UnitTable | None = None,
    progress: bool = False,
) -> GainCurve:
    """The curve over `devices` (default 1-64); `table` reuses units already simulated."""
    t = table or UnitTable(
        requests,
        latency,
        slo,
        network=network,
        limits=limits,
        prefix_hit_rate=prefix_hit_rate,
        price_per_device_hour=price_per_device_hour,
        settings=settings,
    )
    res = t.deployments(devices, progress=progress)
    ns = tuple(sorted(res))
    return GainCurve(ns, tuple(res[n][0] for n in ns), tuple(res[n][1] for n in ns), tuple(res[n][2] for n in ns))


def gain_map(
    shape: Any,
    latency: LatencyModel,
    slo: SLO,
    prompt_tokens: Sequence[float],
    devices: Sequence[int],
    *,
    num_requests: int = 400,
    seed: int = 0,
    progress: bool = False,
    **search: Any,
) -> np.ndarray:
    """The simulated gain (best disaggregated deployment over mono-dp) for each device count (rows)
    and median prompt length (columns) of `shape` (a WorkloadShape); `search` goes to UnitTable
    (network, limits, settings, ...). One table per prompt length serves every device count."""
    from labkit.plan.workload import sample_requests

    out = np.full((len(devices), len(prompt_tokens)), math.nan)
    cols = list(enumerate(prompt_tokens))
    if progress:
        from tqdm.auto import tqdm

        cols = tqdm(cols, desc="prompt lengths")
    for j, p in cols:
        w = shape.with_(prompt_median_tokens=float(p))
        req = sample_requests(w, num_requests, 1.0, seed=seed)
        table = UnitTable(req, latency, slo, prefix_hit_rate=w.prefix_hit_rate, **search)
        out[:, j] = gain_curve(req, latency, slo, devices, table=table).gain
    return out
