"""A run's TTFT waterfalls, summarized: what the median request and the tail spent their time on.

Each record of a run against the lab's server keeps the router's waterfall (labkit.serve.waterfall:
router, http, queue, prefill, kv_transfer, first_token_out, which add up to the TTFT). A stack per
percentile must add up too, so it is not a column of per-part percentiles: it is the mean of each
part over the requests whose TTFT sits in a band around that percentile (p50: the middle 10% of the
requests by TTFT; p99: the slowest 1%; at least one request each). Its parts then add up to the mean
TTFT of its band, which `ttft_ms` gives beside them.

    stacks = waterfall_stacks(result.records)        # {"p50": {...}, "p99": {...}}
    plot_ttft_waterfall({"1p1d": result})            # labkit.plots.serving
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from labkit.serve.waterfall import PARTS

# (label, lowest and highest TTFT rank of the band, as fractions of the run)
BANDS: dict[str, tuple[float, float]] = {"p50": (0.45, 0.55), "p99": (0.99, 1.0)}


def with_waterfall(records: Sequence[Any]) -> list[Any]:
    """The completed records that carry a waterfall, sorted by TTFT."""
    return sorted((r for r in records if r.ok and r.waterfall), key=lambda r: r.ttft_s)


def waterfall_stacks(
    records: Sequence[Any], bands: dict[str, tuple[float, float]] | None = None
) -> dict[str, dict[str, float]]:
    """Per band ("p50", "p99"): the mean of each part over the band's requests, in ms (`<part>_ms`), with
    `ttft_ms` (the router's TTFT, what the parts add up to), `client_ttft_ms` (as the load generator saw
    it), `decode_admit_ms` (after the first token; 0 in mono), `kv_gb_per_s` and `requests` in the band.
    Empty when no record carries a waterfall."""
    recs = with_waterfall(records)
    out: dict[str, dict[str, float]] = {}
    if not recs:
        return out
    n = len(recs)
    for name, (lo, hi) in (bands or BANDS).items():
        a = min(n - 1, int(lo * n + 1e-9))  # 1e-9: 0.45 * 100 is 45.00000000000001
        b = max(a + 1, min(n, int(np.ceil(hi * n - 1e-9))))
        band = recs[a:b]
        row = {f"{p.removesuffix('_s')}_ms": 1e3 * float(np.mean([r.waterfall[p] for r in band])) for p in PARTS}
        row["ttft_ms"] = 1e3 * float(np.mean([r.waterfall["ttft_s"] for r in band]))
        row["client_ttft_ms"] = 1e3 * float(np.mean([r.ttft_s for r in band]))
        row["decode_admit_ms"] = 1e3 * float(np.mean([r.waterfall.get("decode_admit_s") or 0.0 for r in band]))
        gbps = [r.waterfall["kv_gb_per_s"] for r in band if r.waterfall.get("kv_gb_per_s")]
        row["kv_gb_per_s"] = float(np.mean(gbps)) if gbps else float("nan")
        row["requests"] = float(len(band))
        out[name] = row
    return out


def prefix_hit_rate(records: Sequence[Any]) -> float:
    """Prompt tokens the workers' prefix caches served, over all prompt tokens (0..1), from the waterfalls."""
    recs = with_waterfall(records)
    total = sum(r.waterfall.get("prompt_tokens", 0) for r in recs)
    return sum(r.waterfall.get("cached_tokens", 0) for r in recs) / total if total else float("nan")


def requests_per_upstream(records: Sequence[Any]) -> dict[str, int]:
    """How many completed requests each prefill (or mono) worker took, from the waterfalls."""
    out: dict[str, int] = {}
    for r in with_waterfall(records):
        name = str(r.waterfall.get("upstream", "?"))
        out[name] = out.get(name, 0) + 1
    return dict(sorted(out.items()))
