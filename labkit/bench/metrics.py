"""Per-request records and the summary every benchmark prints, with `vllm bench serve` definitions.

- TTFT: send time to the first streamed chunk that carries a choice.
- ITL: every gap between consecutive chunks that carry a choice (one token per chunk here).
- TPOT: (E2E - TTFT) / (output tokens - 1), per request; 0 for one-token outputs (as vLLM).
- E2E: send time to the last chunk with a choice.
- Goodput (DistServe, OSDI'24): completed requests per second that meet every given SLO.
- Waterfall (the lab's server only): where each request's TTFT went, as the router measured it
  (labkit.serve.waterfall), kept per record; `kv_flagged` counts transfers the server flagged as far
  below this host's measured KV speed, `kv_flag` quotes the first.

Throughput divides by the benchmark's duration: first send to last completion.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 95, 99)


@dataclass(slots=True)
class RequestRecord:
    """What happened to one request. Times in seconds; `start_s` is relative to the run's start."""

    index: int
    prompt_tokens: int
    expected_output_tokens: int
    scheduled_s: float = 0.0
    start_s: float = 0.0
    ok: bool = False
    ttft_s: float = math.nan
    e2e_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    http_status: int | None = None
    error: str = ""
    waterfall: dict[str, Any] = field(default_factory=dict)  # the server's `usage.waterfall`, when it sends one

    @property
    def tpot_s(self) -> float:
        """(E2E - TTFT) / (output tokens - 1); 0 when fewer than two tokens (vLLM's convention)."""
        if not self.ok or self.output_tokens <= 1:
            return 0.0 if self.ok else math.nan
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def max_itl_s(self) -> float:
        return max(self.itl_s) if self.itl_s else 0.0

    def row(self) -> dict[str, Any]:
        """A flat row for CSV/Parquet (ITLs as a JSON list)."""
        d = asdict(self)
        d["itl_s"] = json.dumps([round(x, 7) for x in self.itl_s])
        d["waterfall"] = json.dumps(self.waterfall) if self.waterfall else ""
        d["tpot_s"] = self.tpot_s
        d["max_itl_s"] = self.max_itl_s
        return d


@dataclass(frozen=True, slots=True)
class SLO:
    """Service-level objectives in seconds; None means not checked. `itl_s` bounds every gap."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    itl_s: float | None = None
    e2e_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"SLO {name} must be > 0 seconds, got {v}")

    def met(self, r: RequestRecord) -> bool:
        """True when `r` completed and meets every SLO that is set."""
        if not r.ok:
            return False
        return (
            (self.ttft_s is None or r.ttft_s <= self.ttft_s)
            and (self.tpot_s is None or r.tpot_s <= self.tpot_s)
            and (self.itl_s is None or r.max_itl_s <= self.itl_s)
            and (self.e2e_s is None or r.e2e_s <= self.e2e_s)
        )

    def describe(self) -> str:
        parts = [
            f"{n[:-2].upper()} <= {v * 1000:g} ms"
            for n, v in (("ttft_s", self.ttft_s), ("tpot_s", self.tpot_s), ("itl_s", self.itl_s), ("e2e_s", self.e2e_s))
            if v is not None
        ]
        return ", ".join(parts) or "no SLO"

    def as_dict(self) -> dict[str, float | None]:
        return {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s, "itl_s": self.itl_s, "e2e_s": self.e2e_s}


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else math.nan


@dataclass(frozen=True, slots=True)
class Summary:
    """The headline numbers of one run; latencies in ms, throughput per second."""

    sent: int
    ok: int
    errors: int
    duration_s: float
    request_throughput_rps: float
    output_throughput_tps: float
    total_token_throughput_tps: float
    goodput_rps: float
    slo_attainment: float
    slo: str
    mean_prompt_tokens: float
    mean_output_tokens: float
    latency_ms: dict[str, dict[str, float]]
    kv_flagged: int = 0  # requests whose KV transfer the server flagged as far below this host's figure
    kv_flag: str = ""  # the first such flag, in the server's words

    def flat(self) -> dict[str, Any]:
        """One flat dict: `ttft_p99_ms`, `itl_p50_ms`, ... plus the counters (a table row)."""
        d: dict[str, Any] = {k: getattr(self, k) for k in self.__slots__ if k != "latency_ms"}
        for metric, stats in self.latency_ms.items():
            for stat, v in stats.items():
                d[f"{metric}_{stat}_ms"] = v
        return d


def summarize(
    records: Sequence[RequestRecord],
    duration_s: float,
    slo: SLO | None = None,
    percentiles: Sequence[float] = PERCENTILES,
) -> Summary:
    """Percentiles, throughput and goodput over `records` (a run of `duration_s` seconds)."""
    slo = slo or SLO()
    done = [r for r in records if r.ok]
    dur = max(duration_s, 1e-9)
    series = {
        "ttft": [r.ttft_s for r in done],
        "tpot": [r.tpot_s for r in done if r.output_tokens > 1],
        "itl": [x for r in done for x in r.itl_s],
        "e2e": [r.e2e_s for r in done],
    }
    latency: dict[str, dict[str, float]] = {}
    for name, vals in series.items():
        stats = {"mean": float(np.mean(vals)) * 1000 if vals else math.nan}
        stats.update({f"p{q:g}": _pct(vals, q) * 1000 for q in percentiles})
        stats["max"] = float(np.max(vals)) * 1000 if vals else math.nan
        latency[name] = stats
    flagged = [r.waterfall["kv_flag"] for r in done if r.waterfall.get("kv_flag")]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    good = sum(slo.met(r) for r in done)
    return Summary(
        sent=len(records),
        ok=len(done),
        errors=len(records) - len(done),
        duration_s=duration_s,
        request_throughput_rps=len(done) / dur,
        output_throughput_tps=out_tokens / dur,
        total_token_throughput_tps=(out_tokens + in_tokens) / dur,
        goodput_rps=good / dur,
        slo_attainment=good / len(records) if records else math.nan,
        slo=slo.describe(),
        mean_prompt_tokens=in_tokens / len(done) if done else math.nan,
        mean_output_tokens=out_tokens / len(done) if done else math.nan,
        latency_ms=latency,
        kv_flagged=len(flagged),
        kv_flag=flagged[0] if flagged else "",
    )


def jsonable(x: Any) -> Any:
    """`x` with NaN and infinities replaced by None (strict JSON has neither), recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        return jsonable(x.item())
    return x


def cost_per_million_tokens(price_per_device_hour: float, devices: int, tokens_per_s: float) -> float:
    """Dollars (or the price's unit) per 1e6 tokens: devices * price/h / (tokens/s * 3600) * 1e6."""
    if price_per_device_hour < 0 or devices < 1:
        raise ValueError(f"need price >= 0 and devices >= 1, got {price_per_device_hour}, {devices}")
    if tokens_per_s <= 0:
        return math.inf
    return devices * price_per_device_hour / (tokens_per_s * 3600.0) * 1e6


def records_frame(records: Sequence[RequestRecord]):
    """A pandas DataFrame, one row per request."""
    import pandas as pd

    return pd.DataFrame([r.row() for r in records])


def save_records(records: Sequence[RequestRecord], path_stem: str | Path) -> list[Path]:
    """Writes `<stem>.csv` and `<stem>.parquet`; returns the paths."""
    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    df = records_frame(records)
    csv, pq = stem.with_suffix(".csv"), stem.with_suffix(".parquet")
    df.to_csv(csv, index=False)
    df.to_parquet(pq, index=False)
    return [csv, pq]


def load_records(path: str | Path) -> list[RequestRecord]:
    """Reads records back from the CSV or Parquet written by `save_records`."""
    import pandas as pd

    path = Path(path)
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)
    out = []
    for row in df.to_dict("records"):
        status = row.get("http_status")
        out.append(
            RequestRecord(
                index=int(row["index"]),
                prompt_tokens=int(row["prompt_tokens"]),
                expected_output_tokens=int(row["expected_output_tokens"]),
                scheduled_s=float(row["scheduled_s"]),
                start_s=float(row["start_s"]),
                ok=bool(row["ok"]) if not isinstance(row["ok"], str) else row["ok"] == "True",
                ttft_s=float(row["ttft_s"]) if row["ttft_s"] != "" else math.nan,
                e2e_s=float(row["e2e_s"]) if row["e2e_s"] != "" else math.nan,
                itl_s=list(json.loads(row["itl_s"])),
                output_tokens=int(row["output_tokens"]),
                http_status=None
                if status in (None, "") or (isinstance(status, float) and math.isnan(status))
                else int(status),
                error=str(row.get("error") or ""),
                waterfall=json.loads(row["waterfall"])
                if isinstance(row.get("waterfall"), str) and row["waterfall"]
                else {},
            )
        )
    return out
