"""Read a vLLM server's Prometheus `/metrics`: NIXL transfers, request counts, latency sums.

The NIXL connector records one observation per KV transfer on the *decode* server (the one
that pulls): `vllm:nixl_xfer_time_seconds` (duration), `vllm:nixl_bytes_transferred`
(bytes per transfer), `vllm:nixl_post_time_seconds` (time to post the read) and
`vllm:nixl_num_descriptors`, plus failure counters. Histograms give `_count` and `_sum`,
so a snapshot before and after a run gives transfers, bytes and seconds of that run.
(Names checked in vllm 0.32: vllm/distributed/kv_transfer/kv_connector/v1/nixl/stats.py.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields

import httpx
from prometheus_client.parser import text_string_to_metric_families

NIXL_XFER_TIME = "vllm:nixl_xfer_time_seconds"
NIXL_POST_TIME = "vllm:nixl_post_time_seconds"
NIXL_BYTES = "vllm:nixl_bytes_transferred"
NIXL_DESCRIPTORS = "vllm:nixl_num_descriptors"
NIXL_FAILED = "vllm:nixl_num_failed_transfers"
NIXL_EXPIRED = "vllm:nixl_num_kv_expired_reqs"


def parse_samples(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name: value summed over label sets (engines, models)}."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "le" in s.labels or "quantile" in s.labels:
                continue  # buckets: the _count and _sum carry what the lab reads
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


def fetch_samples(url: str, *, timeout_s: float = 5.0) -> dict[str, float]:
    """GET `url`/metrics and parse it (see `parse_samples`)."""
    r = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout_s)
    r.raise_for_status()
    return parse_samples(r.text)


def histogram_buckets(text: str, name: str) -> list[tuple[float, float]]:
    """[(upper bound, cumulative count)] of histogram `name`, summed over label sets."""
    acc: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name + "_bucket":
                le = float(s.labels["le"])
                acc[le] = acc.get(le, 0.0) + float(s.value)
    return sorted(acc.items())


@dataclass(frozen=True, slots=True)
class NixlStats:
    """NIXL transfer totals of one server (counts and sums since it started, or a difference)."""

    transfers: float = 0.0  # completed KV transfers (reads by the decode server)
    xfer_time_s: float = 0.0  # summed transfer duration, seconds
    bytes_transferred: float = 0.0  # summed bytes
    post_time_s: float = 0.0  # summed time to post the transfers, seconds
    descriptors: float = 0.0  # summed memory descriptors (about one per layer per K/V per block run)
    failed_transfers: float = 0.0
    expired_requests: float = 0.0  # KV freed on the prefill side before decode read it

    @classmethod
    def from_samples(cls, s: dict[str, float]) -> NixlStats:
        return cls(
            transfers=s.get(NIXL_XFER_TIME + "_count", 0.0),
            xfer_time_s=s.get(NIXL_XFER_TIME + "_sum", 0.0),
            bytes_transferred=s.get(NIXL_BYTES + "_sum", 0.0),
            post_time_s=s.get(NIXL_POST_TIME + "_sum", 0.0),
            descriptors=s.get(NIXL_DESCRIPTORS + "_sum", 0.0),
            failed_transfers=s.get(NIXL_FAILED + "_total", 0.0),
            expired_requests=s.get(NIXL_EXPIRED + "_total", 0.0),
        )

    def __sub__(self, other: NixlStats) -> NixlStats:
        return NixlStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    @property
    def mean_bytes(self) -> float:
        """Bytes per transfer (0 with no transfer)."""
        return self.bytes_transferred / self.transfers if self.transfers else 0.0

    @property
    def mean_xfer_time_s(self) -> float:
        return self.xfer_time_s / self.transfers if self.transfers else 0.0

    @property
    def bandwidth_gbps(self) -> float:
        """Bytes moved per second of transfer time, in GB/s (1e9 bytes)."""
        return self.bytes_transferred / self.xfer_time_s / 1e9 if self.xfer_time_s else 0.0

    def as_dict(self) -> dict[str, float]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(
            mean_bytes=self.mean_bytes,
            mean_xfer_time_ms=self.mean_xfer_time_s * 1e3,
            bandwidth_gbps=self.bandwidth_gbps,
        )
        return d


def read_nixl(url: str, *, timeout_s: float = 5.0) -> NixlStats:
    """The NIXL totals of the server at `url` (all zero on a server without NixlConnector)."""
    return NixlStats.from_samples(fetch_samples(url, timeout_s=timeout_s))


@dataclass(frozen=True, slots=True)
class ServerStats:
    """Request-level totals a vLLM server exports (counts and sums since start)."""

    requests_finished: float = 0.0
    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    prefix_cache_queries: float = 0.0  # tokens looked up in the prefix cache
    prefix_cache_hits: float = 0.0  # of those, tokens found
    ttft_s_sum: float = 0.0
    ttft_count: float = 0.0

    @classmethod
    def from_samples(cls, s: dict[str, float]) -> ServerStats:
        return cls(
            requests_finished=s.get("vllm:request_success_total", 0.0),
            prompt_tokens=s.get("vllm:prompt_tokens_total", 0.0),
            generation_tokens=s.get("vllm:generation_tokens_total", 0.0),
            prefix_cache_queries=s.get("vllm:prefix_cache_queries_total", 0.0),
            prefix_cache_hits=s.get("vllm:prefix_cache_hits_total", 0.0),
            ttft_s_sum=s.get("vllm:time_to_first_token_seconds_sum", 0.0),
            ttft_count=s.get("vllm:time_to_first_token_seconds_count", 0.0),
        )

    def __sub__(self, other: ServerStats) -> ServerStats:
        return ServerStats(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


def read_server(url: str, *, timeout_s: float = 5.0) -> ServerStats:
    """Request totals of the vLLM server at `url`."""
    return ServerStats.from_samples(fetch_samples(url, timeout_s=timeout_s))


def nixl_lines(text: str) -> list[str]:
    """The NIXL sample lines of a /metrics page (for showing the raw text in a notebook)."""
    return [
        ln for ln in text.splitlines() if ln.startswith("vllm:nixl_") and "_bucket" not in ln and "_created" not in ln
    ]


def summed(stats: Iterable[NixlStats]) -> NixlStats:
    """Totals over several servers (xPyD: one NixlStats per decode server)."""
    out = NixlStats()
    for s in stats:
        out = NixlStats(**{f.name: getattr(out, f.name) + getattr(s, f.name) for f in fields(out)})
    return out
