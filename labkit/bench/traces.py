"""Request traces: the Azure LLM inference CSV format and the Mooncake JSONL format.

- Azure 2023 (Splitwise): `TIMESTAMP,ContextTokens,GeneratedTokens`, one row per request;
  TIMESTAMP is a date-time ("2023-11-16 18:15:46.6805900") or a number of seconds.
- Mooncake (FAST'25): one JSON object per line, `timestamp` in milliseconds, `input_length`,
  `output_length`, `hash_ids`: ids of the prompt's 512-token blocks, chained so that equal ids
  mean an equal prefix. Equal ids become equal prompt blocks, so a prefix cache sees the reuse.

    >>> trace = load_azure_csv(shared_data_dir() / "azure-llm-2023" / "conv.csv")
    >>> sampled = trace.window(0, 60).to_requests(max_model_len=4096)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from labkit.bench.workloads import BenchRequest, LengthScaling, TokenSpace, build_requests, fit_to_context

MOONCAKE_BLOCK_TOKENS = 512


class TraceFormatError(ValueError):
    """A trace file does not have the expected columns or values; the message names the line."""


@dataclass(frozen=True, slots=True)
class Trace:
    """Arrivals (seconds from the first request) and token lengths; `hash_ids` for Mooncake."""

    name: str
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    hash_ids: list[list[int]] | None = field(default=None, repr=False)
    block_tokens: int = MOONCAKE_BLOCK_TOKENS

    def __post_init__(self) -> None:
        n = len(self.arrival_s)
        if len(self.prompt_tokens) != n or len(self.output_tokens) != n:
            raise TraceFormatError(f"{self.name}: column lengths differ")
        if self.hash_ids is not None and len(self.hash_ids) != n:
            raise TraceFormatError(f"{self.name}: {len(self.hash_ids)} hash_id lists for {n} requests")

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) > 1 else 0.0

    @property
    def mean_rate_rps(self) -> float:
        """Mean arrival rate in requests per second (0 for fewer than two requests)."""
        return (len(self) - 1) / self.duration_s if self.duration_s > 0 else 0.0

    def _take(self, idx: np.ndarray) -> Trace:
        arr = self.arrival_s[idx]
        arr = arr - arr[0] if len(arr) else arr
        hashes = [self.hash_ids[i] for i in idx] if self.hash_ids is not None else None
        return replace(
            self,
            arrival_s=arr,
            prompt_tokens=self.prompt_tokens[idx],
            output_tokens=self.output_tokens[idx],
            hash_ids=hashes,
        )

    def head(self, n: int) -> Trace:
        """The first `n` requests."""
        return self._take(np.arange(min(n, len(self))))

    def window(self, start_s: float, duration_s: float) -> Trace:
        """Requests arriving in [start_s, start_s + duration_s), re-timed from 0."""
        idx = np.flatnonzero((self.arrival_s >= start_s) & (self.arrival_s < start_s + duration_s))
        return self._take(idx)

    def time_scaled(self, speedup: float) -> Trace:
        """Arrivals `speedup` times faster (2 = twice the request rate, same requests)."""
        if speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {speedup}")
        return replace(self, arrival_s=self.arrival_s / speedup)

    def stats(self) -> dict[str, float]:
        """Counts, rate and length percentiles (tokens), the figures a trace README quotes."""
        p, o = self.prompt_tokens, self.output_tokens
        out: dict[str, float] = {
            "requests": float(len(self)),
            "duration_s": self.duration_s,
            "mean_rate_rps": self.mean_rate_rps,
        }
        for name, x in (("prompt", p), ("output", o)):
            if len(x):
                out[f"{name}_mean"] = float(np.mean(x))
                for q in (50, 90, 99):
                    out[f"{name}_p{q}"] = float(np.percentile(x, q, method="inverted_cdf"))
                out[f"{name}_max"] = float(np.max(x))
        if self.hash_ids is not None:
            out["prefix_block_reuse"] = prefix_block_reuse(self.hash_ids)
        return out

    def to_requests(
        self,
        *,
        max_model_len: int | None = None,
        scale: float | None = None,
        seed: int = 0,
        space: TokenSpace | None = None,
    ) -> tuple[list[BenchRequest], LengthScaling]:
        """Requests with the trace's arrival times and lengths fitted into `max_model_len`.

        Mooncake blocks scale with the lengths, so requests that shared blocks still share them.
        """
        p, o, info = fit_to_context(
            self.prompt_tokens,
            self.output_tokens,
            max_model_len or 1 << 40,
            scale=scale if (max_model_len or scale) else 1.0,
        )
        block = max(1, round(self.block_tokens * info.factor))
        space = space if space is not None else TokenSpace()
        reqs = build_requests(
            p, o, seed=seed, arrivals_s=self.arrival_s, space=space, block_hashes=self.hash_ids, block_tokens=block
        )
        return reqs, info


def prefix_block_reuse(hash_ids: list[list[int]]) -> float:
    """Fraction of prefix blocks (in arrival order) whose hash id was seen before; 0..1."""
    seen: set[int] = set()
    total = reused = 0
    for ids in hash_ids:
        for h in ids:
            total += 1
            reused += h in seen
            seen.add(h)
    return reused / total if total else 0.0


def load_azure_csv(path: str | Path, *, limit: int | None = None) -> Trace:
    """Reads an Azure LLM inference trace CSV; returns a Trace sorted by arrival."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file at {path}")
    df = pd.read_csv(path, nrows=limit)
    need = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise TraceFormatError(f"{path}: missing column(s) {missing}; expected header {','.join(need)}")
    if df.empty:
        raise TraceFormatError(f"{path}: no requests")
    ts = df["TIMESTAMP"]
    if pd.api.types.is_numeric_dtype(ts):
        arrival = ts.to_numpy(dtype=np.float64)
    else:
        try:
            t = pd.to_datetime(ts, format="ISO8601")
        except (ValueError, TypeError) as e:
            raise TraceFormatError(f"{path}: TIMESTAMP not a date-time or number ({e})") from None
        arrival = (t - t.min()).dt.total_seconds().to_numpy()
    for col in need[1:]:
        bad = ~pd.to_numeric(df[col], errors="coerce").between(0, 10**7)
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise TraceFormatError(f"{path}: line {row + 2}: {col}={df[col].iloc[row]!r} is not a token count")
    order = np.argsort(arrival, kind="stable")
    arrival = arrival[order] - arrival[order][0]
    prompt = df["ContextTokens"].to_numpy(dtype=np.int64)[order]
    output = df["GeneratedTokens"].to_numpy(dtype=np.int64)[order]
    # Zero-length requests cannot be replayed; the published traces have none (min 3 and 6).
    return Trace(path.stem, arrival, np.maximum(prompt, 1), np.maximum(output, 1))


def load_mooncake_jsonl(
    path: str | Path, *, limit: int | None = None, block_tokens: int = MOONCAKE_BLOCK_TOKENS
) -> Trace:
    """Reads a Mooncake trace (JSON lines, `timestamp` in ms); returns a Trace sorted by arrival."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trace file at {path}")
    ts: list[float] = []
    p: list[int] = []
    o: list[int] = []
    hashes: list[list[int]] = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if limit is not None and len(ts) >= limit:
                break
            try:
                rec = json.loads(line)
                ts.append(float(rec["timestamp"]) / 1000.0)
                p.append(int(rec["input_length"]))
                o.append(int(rec["output_length"]))
                h = rec.get("hash_ids", [])
                if not isinstance(h, list):
                    raise TypeError(f"hash_ids is {type(h).__name__}, not a list")
                hashes.append([int(x) for x in h])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise TraceFormatError(
                    f"{path}: line {lineno}: {e.__class__.__name__}: {e}; expected "
                    '{{"timestamp": ms, "input_length": n, "output_length": n, '
                    '"hash_ids": [...]}}'
                ) from None
            if p[-1] < 1 or o[-1] < 1:
                raise TraceFormatError(f"{path}: line {lineno}: lengths must be >= 1, got {p[-1]}, {o[-1]}")
    if not ts:
        raise TraceFormatError(f"{path}: no requests")
    arrival = np.asarray(ts)
    order = np.argsort(arrival, kind="stable")
    return Trace(
        path.stem,
        arrival[order] - arrival[order][0],
        np.asarray(p, dtype=np.int64)[order],
        np.asarray(o, dtype=np.int64)[order],
        [hashes[i] for i in order],
        block_tokens,
    )


def load_trace(path: str | Path, *, limit: int | None = None) -> Trace:
    """Azure CSV (`.csv`) or Mooncake JSONL (`.jsonl`/`.json`), by extension."""
    suffix = Path(path).suffix.lower()
    if suffix == ".csv":
        return load_azure_csv(path, limit=limit)
    if suffix in (".jsonl", ".json"):
        return load_mooncake_jsonl(path, limit=limit)
    raise ValueError(f"{path}: unknown trace format {suffix!r}; use an Azure .csv or a Mooncake .jsonl")


def shared_azure_trace(kind: str = "conv") -> Path | None:
    """Path of the shared Azure 2023 trace (`conv` or `code`) beside the checkout, or None."""
    from labkit.config import shared_data_dir

    if kind not in ("conv", "code"):
        raise ValueError(f"Azure trace kind must be 'conv' or 'code', got {kind!r}")
    d = shared_data_dir()
    path = d / "azure-llm-2023" / f"{kind}.csv" if d else None
    return path if path is not None and path.is_file() else None
