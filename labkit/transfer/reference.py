"""This host's measured KV-transfer speed per transport, and the check that flags a transfer far below it.

A prefill worker holds every KV transfer it makes against what labkit.transfer measured for the
same transport on this host: the expected time for that many bytes (`Link.seconds(nbytes)`, a fit
of a fixed cost plus bytes over bandwidth across a few sizes, so a small KV is not held to the
bandwidth of a big one). A transfer that took more than `factor` times that is flagged, in words a
person can act on: "KV moving at 0.01 GB/s over tcp (4.2 MB in 0.42 s); tcp measured 1.9 GB/s here
for this size, shm 6.1 GB/s" (the question production users ask: did it silently fall back to a
slow path?).

Where the figure comes from: `LABKIT_HOME/transfer/reference-<host>.json`, written by
`measure_reference` (shm and tcp at 256 KiB, 4 MiB and 32 MiB, each receiver in its own process,
as `labkit transfer` measures). When it is missing, the first worker that needs it measures it in
a child process spread over all of this host's cores (a few seconds, once; a lock file makes
concurrent workers wait for that one). `python -m labkit.transfer.reference` prints it;
`--refresh` measures it again (do that on a quiet machine: others' work lowers the figure).
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from labkit.config import labkit_home
from labkit.links import Link

log = logging.getLogger("labkit.transfer.reference")

REFERENCE_VERSION = 1
REFERENCE_BACKENDS = ("shm", "tcp")
REFERENCE_SIZES = (256 << 10, 4 << 20, 32 << 20)
REFERENCE_REPEATS = 3
# A transfer at most this much slower than its figure is never flagged, whatever the ratio: on a
# busy 2-core box a sub-millisecond send is easily delayed a few ms by the scheduler alone.
MIN_EXCESS_S = 0.005


def reference_path() -> Path:
    """Where this host's figure is cached: LABKIT_HOME/transfer/reference-<host>.json."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", platform.node() or "host")[:60]
    return labkit_home() / "transfer" / f"reference-{host}.json"


@dataclass(frozen=True, slots=True)
class HostReference:
    """Measured links per transport on this host (`Link.seconds(nbytes)`: the time a transfer should take)."""

    links: dict[str, Link]
    measured_at: str
    path: str = ""

    def expected_s(self, backend: str, nbytes: int) -> float | None:
        """Seconds a transfer of `nbytes` over `backend` took here when measured; None: not measured."""
        link = self.links.get(backend)
        return link.seconds(nbytes) if link is not None else None

    def gb_per_s(self, backend: str, nbytes: int) -> float | None:
        """What `backend` achieved here for a transfer of `nbytes` (1e9 B/s); None: not measured."""
        s = self.expected_s(backend, nbytes)
        return nbytes / s / 1e9 if s else None

    def as_dict(self) -> dict[str, object]:
        return {
            "version": REFERENCE_VERSION,
            "measured_at": self.measured_at,
            "links": {b: {"bytes_per_s": ln.bytes_per_s, "fixed_s": ln.fixed_s} for b, ln in self.links.items()},
        }


def load_reference(path: Path | None = None) -> HostReference | None:
    """The cached figure, or None when it is missing, from another version, or unreadable."""
    path = path or reference_path()
    try:
        d = json.loads(path.read_text())
        if d.get("version") != REFERENCE_VERSION:
            return None
        links = {
            b: Link(float(v["bytes_per_s"]), float(v["fixed_s"]), f"{b} (this host)", "measured")
            for b, v in d["links"].items()
        }
        return HostReference(links, str(d["measured_at"]), str(path)) if links else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def measure_reference(backends: Sequence[str] = REFERENCE_BACKENDS, path: Path | None = None) -> HostReference:
    """Measures each usable backend here (labkit.transfer.measure), writes the cache; returns it."""
    from labkit.transfer import available_backends
    from labkit.transfer.measure import bandwidth_sweep, measured_links

    usable = [b for b in backends if available_backends().get(b) == ""]
    rows = bandwidth_sweep(usable, REFERENCE_SIZES, repeats=REFERENCE_REPEATS)
    links = {ln.name.split(" ", 1)[0]: ln for ln in measured_links(rows)}
    ref = HostReference(links, dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), str(path or reference_path()))
    out = Path(ref.path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(ref.as_dict(), indent=1))
    os.replace(tmp, out)
    return ref


@contextmanager
def _locked(path: Path, timeout_s: float) -> Iterator[None]:
    """An exclusive lock on `path` (flock), waited for at most `timeout_s` (TimeoutError after)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} stayed locked for {timeout_s:.0f} s") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _host_cpus() -> list[int]:
    """Every core this machine's cgroup allows (a pinned worker's child is spread over them again)."""
    try:
        text = Path("/sys/fs/cgroup/cpuset.cpus.effective").read_text().strip()
        cpus: list[int] = []
        for part in filter(None, text.split(",")):
            a, _, b = part.partition("-")
            cpus.extend(range(int(a), int(b or a) + 1))
        if cpus:
            return cpus
    except (OSError, ValueError):
        pass
    return list(range(os.cpu_count() or 1))


def host_reference(*, measure: bool = True, timeout_s: float = 180.0) -> HostReference | None:
    """This host's figure: the cached one, else (`measure`) measured now in a child process, once.

    Returns None when it cannot be had (measuring failed or timed out: logged, never raised), so
    a worker starts anyway and only its transfers go unchecked.
    """
    ref = load_reference()
    if ref is not None or not measure:
        return ref
    log.info("measuring this host's KV transfer speed (once; cached in %s)", reference_path())
    try:
        out = subprocess.run(
            [sys.executable, "-m", "labkit.transfer.reference", "--ensure"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        log.warning("measuring the KV transfer reference took over %.0f s; transfers go unchecked", timeout_s)
        return None
    if out.returncode != 0:
        log.warning("measuring the KV transfer reference failed; transfers go unchecked: %s", out.stderr[-800:])
    return load_reference()


def slow_transfer_flag(
    ref: HostReference | None, backend: str, nbytes: int, seconds: float, factor: float
) -> str | None:
    """A sentence when moving `nbytes` over `backend` in `seconds` was over `factor` times slower than
    this host's figure for that transport and size (and over MIN_EXCESS_S slower); else None."""
    if ref is None or factor <= 0 or nbytes <= 0 or seconds <= 0:
        return None
    expected = ref.expected_s(backend, nbytes)
    if expected is None or seconds <= factor * expected or seconds - expected <= MIN_EXCESS_S:
        return None
    others = [f"{b} {ref.gb_per_s(b, nbytes):.2g} GB/s" for b in ref.links if b != backend]
    return (
        f"KV moving at {nbytes / seconds / 1e9:.2g} GB/s over {backend} ({nbytes / 1e6:.3g} MB in "
        f"{seconds:.3g} s); {backend} measured {ref.gb_per_s(backend, nbytes):.2g} GB/s here for this size"
        + (f", {', '.join(others)}" if others else "")
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.transfer.reference", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--refresh", action="store_true", help="measure again even when a figure is cached")
    p.add_argument("--ensure", action="store_true", help="measure only when none is cached (what workers run)")
    a = p.parse_args(argv)
    path = reference_path()
    if a.refresh or a.ensure:
        try:
            os.sched_setaffinity(0, _host_cpus())  # a pinned worker started us: measure the host, not its core
        except OSError:
            pass
        with _locked(path.with_suffix(".lock"), timeout_s=300):
            if a.refresh or load_reference(path) is None:
                measure_reference(path=path)
    ref = load_reference(path)
    if ref is None:
        print(f"no KV transfer reference at {path}; `python -m labkit.transfer.reference --refresh` measures it")
        return 1
    print(f"{path} (measured {ref.measured_at})")
    for b, ln in ref.links.items():
        print(
            f"  {b:5s} {ln.bytes_per_s / 1e9:7.2f} GB/s + {ln.fixed_s * 1e3:.3f} ms per transfer; "
            + ", ".join(f"{n >> 10} KiB: {ref.gb_per_s(b, n):.2f} GB/s" for n in REFERENCE_SIZES)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
