"""One network link, in bytes/s and seconds: what a KV transfer costs, emulated, measured or planned.

A link moves a transfer of n bytes in `fixed_s + n / bytes_per_s` seconds. `fixed_s` is what
every transfer pays whatever its size: the trip there and the ack's trip back, a handshake, a
fitted per-request cost. The same type serves the three places that need one:

- `labkit.transfer`: the tcp sender paces its bytes to `bytes_per_s` and spends `fixed_s`, half
  before the first byte and half after the ack (what-if runs: "this transfer over 10 Gbps");
- `labkit.transfer.sizing` and notebook 02: time to move a request's KV over each link, measured
  here (`how="measured"`), emulated, or computed from a line rate;
- `labkit.plan`: the KV transfer between a prefill and a decode instance in the simulator.

Line rates are quoted in Gbit/s; `Link.from_gbps` converts (1 Gbit/s = 1.25e8 bytes/s).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

How = Literal["computed", "measured", "emulated"]
MIN_BYTES_PER_S = 1e3


@dataclass(frozen=True, slots=True)
class Link:
    """A path for KV bytes: bandwidth (bytes/s; inf: unshaped) and a fixed cost per transfer (s)."""

    bytes_per_s: float
    fixed_s: float = 0.0
    name: str = ""
    how: How = "computed"  # "measured" (fitted on this machine) | "emulated" | "computed" (line rate)

    def __post_init__(self) -> None:
        if not self.bytes_per_s > 0:  # also refuses nan
            raise ValueError(f"Link.bytes_per_s must be > 0 (inf: unshaped), got {self.bytes_per_s!r}")
        if self.bytes_per_s < MIN_BYTES_PER_S:
            # no KV link is this slow: the figure is surely in Gbit/s or GB/s (the unit mix-up this type ends)
            raise ValueError(
                f"Link.bytes_per_s = {self.bytes_per_s!r} is below 1 kB/s; for a line rate in Gbit/s "
                f"use Link.from_gbps({self.bytes_per_s!r})"
            )
        if not (math.isfinite(self.fixed_s) and self.fixed_s >= 0):
            raise ValueError(f"Link.fixed_s must be finite and >= 0, got {self.fixed_s!r}")
        if self.how not in ("computed", "measured", "emulated"):
            raise ValueError(f"Link.how must be 'computed', 'measured' or 'emulated', got {self.how!r}")

    @classmethod
    def from_gbps(cls, gbps: float, fixed_s: float = 0.0, name: str = "", how: How = "computed") -> Link:
        """A link from its line rate in Gbit/s (1e9 bit/s)."""
        if not gbps * 1e9 / 8 >= MIN_BYTES_PER_S:
            raise ValueError(f"gbps must be >= {MIN_BYTES_PER_S * 8 / 1e9:g} (1 kB/s), got {gbps!r}")
        return cls(gbps * 1e9 / 8, fixed_s, name, how)

    @classmethod
    def unshaped(cls) -> Link:
        """No emulated limit: the sender goes as fast as the transport does."""
        return cls(math.inf, 0.0, "unshaped")

    @property
    def shaped(self) -> bool:
        """True when the bandwidth is finite (a sender must pace to it)."""
        return math.isfinite(self.bytes_per_s)

    @property
    def gbps(self) -> float:
        """Line rate in Gbit/s (inf when unshaped)."""
        return self.bytes_per_s * 8 / 1e9

    def seconds(self, nbytes: float) -> float:
        """Seconds to move `nbytes` bytes: fixed_s + nbytes / bytes_per_s."""
        return self.fixed_s + nbytes / self.bytes_per_s

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return f"{self.gbps:g} Gbps" if self.shaped else "unshaped"


# Typical links a KV cache crosses, from their line rates; fixed_s is a datacenter round trip.
LINKS: dict[str, Link] = {
    "10GbE": Link.from_gbps(10, 20e-6, "10 GbE"),
    "25GbE": Link.from_gbps(25, 20e-6, "25 GbE"),
    "100G": Link.from_gbps(100, 10e-6, "100 Gbps RDMA"),
    "400G": Link.from_gbps(400, 10e-6, "400 Gbps RDMA"),
    # H100 NVLink 4: 900 GB/s total, 450 GB/s each way = 3,600 Gbit/s; computed, never emulated here
    "nvlink": Link.from_gbps(3600, 4e-6, "NVLink 4 (H100)"),
}
