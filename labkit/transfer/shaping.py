"""Emulated network links: a pacer (token bucket without a burst) for bandwidth, plus the link's fixed cost.

Used by the tcp sender for what-if runs ("this transfer over 10 or 25 Gbps"). The link itself is
`labkit.links.Link` (bytes/s and seconds), shared with the sizing arithmetic and the planner.
Emulation can only slow a real link down: a link faster than what loopback measured here is
computed with `Link.seconds(nbytes)` instead, and charts say so.
"""

from __future__ import annotations

import time

from labkit.links import LINKS, Link

__all__ = ["LINKS", "Link", "TokenBucket", "chunk_bytes"]


class TokenBucket:
    """Paces writes to `rate_bytes_per_s`: a chunk leaves when the link would have finished
    serializing it, so a burst of n bytes never takes less than n / rate.

    Call `resume()` when the caller starts a burst after being idle (a layer after its
    compute): idle time is not banked. Within a burst, a sender that overslept (a busy
    machine) catches up on its schedule instead of falling further behind.
    """

    def __init__(self, rate_bytes_per_s: float) -> None:
        if not 0 < rate_bytes_per_s < float("inf"):
            raise ValueError(f"rate_bytes_per_s must be > 0 and finite, got {rate_bytes_per_s}")
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


def chunk_bytes(link: Link | None) -> int:
    """Write size for a paced sender: about 2 ms of line time (so sleeps are coarse), 64 KiB .. 8 MiB."""
    if link is None or not link.shaped:
        return 8 << 20
    return int(min(8 << 20, max(64 << 10, link.bytes_per_s * 2e-3)))
