"""Emulated network links: a pacer (token bucket without a burst) for bandwidth plus a fixed one-way latency.

Used by the tcp sender for what-if runs ("this transfer over 10 or 25 Gbps"). Emulation can
only slow a real link down: a shape faster than what loopback measured here is computed with
`LinkShape.seconds(nbytes)` instead, and charts say so.
"""
from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LinkShape:
    """A link: line rate in Gbit/s (None: unshaped) and one-way latency in ms."""

    gbps: float | None = None
    latency_ms: float = 0.0
    name: str = ""

    def __post_init__(self) -> None:
        if self.gbps is not None and not self.gbps > 0:
            raise ValueError(f"gbps must be > 0 (or None for unshaped), got {self.gbps}")
        if not self.latency_ms >= 0:
            raise ValueError(f"latency_ms must be >= 0, got {self.latency_ms}")

    @property
    def bytes_per_s(self) -> float:
        return float("inf") if self.gbps is None else self.gbps * 1e9 / 8

    def seconds(self, nbytes: int) -> float:
        """Ideal time to deliver `nbytes` and get an ack back: 2 x latency + serialization (s)."""
        return 2 * self.latency_ms / 1e3 + nbytes / self.bytes_per_s

    @property
    def label(self) -> str:
        return self.name or (f"{self.gbps:g} Gbps" if self.gbps else "unshaped")


# Typical links a KV cache crosses. Latencies are one-way, in a datacenter.
LINKS: dict[str, LinkShape] = {
    "10GbE": LinkShape(10, 0.010, "10 GbE"),
    "25GbE": LinkShape(25, 0.010, "25 GbE"),
    "100G": LinkShape(100, 0.005, "100 Gbps RDMA"),
    "400G": LinkShape(400, 0.005, "400 Gbps RDMA"),
    # H100 NVLink 4: 900 GB/s total, 450 GB/s each way = 3,600 Gbit/s; computed, never emulated here
    "nvlink": LinkShape(3600, 0.002, "NVLink 4 (H100)"),
}


class TokenBucket:
    """Paces writes to `rate_bytes_per_s`: a chunk leaves when the link would have finished
    serializing it, so a burst of n bytes never takes less than n / rate.

    Call `resume()` when the caller starts a burst after being idle (a layer after its
    compute): idle time is not banked. Within a burst, a sender that overslept (a busy
    machine) catches up on its schedule instead of falling further behind.
    """

    def __init__(self, rate_bytes_per_s: float) -> None:
        if rate_bytes_per_s <= 0:
            raise ValueError(f"rate_bytes_per_s must be > 0, got {rate_bytes_per_s}")
        self.rate = rate_bytes_per_s
        self._free_at = 0.0

    def resume(self) -> None:
        """Starts a new burst: the schedule restarts from now unless earlier bytes still occupy the link."""
        self._free_at = max(self._free_at, time.perf_counter())

    def wait(self, nbytes: int) -> None:
        """Blocks until `nbytes` more have crossed the emulated wire."""
        self._free_at = max(self._free_at, 0.0) + nbytes / self.rate
        delay = self._free_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def chunk_bytes(link: LinkShape | None) -> int:
    """Write size for a paced sender: about 2 ms of line time (so sleeps are coarse), 64 KiB .. 8 MiB."""
    if link is None or link.gbps is None:
        return 8 << 20
    return int(min(8 << 20, max(64 << 10, link.bytes_per_s * 2e-3)))
