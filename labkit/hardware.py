"""The machine's roofs: peak FLOP/s per dtype and memory bandwidth, measured and from datasheets.

A roofline needs two numbers per device: how fast it multiplies (FLOP/s) and how fast it
reads memory (bytes/s). Datasheets give the vendor's peaks (`data/datasheets.json`); the
lab also measures them here, on this device, because MFU and MBU are only honest against
what the hardware can really do:

- matmul FLOP/s: a square matmul large enough to fill every core (2·n³ FLOPs);
- read bandwidth: a sum over a buffer many times larger than the last-level cache, so every
  byte really comes from DRAM (bytes counted = buffer size), read the way decode reads weights:
  on a CPU by the engine's own streaming loop (`labkit.engine.kernels`), with torch's thread
  count, threads pinned; torch.sum on a GPU or where those kernels cannot run;
- copy bandwidth: `dst.copy_(src)`, counting read + write bytes (2 × buffer size).

Measured peaks are cached in LABKIT_HOME, keyed by machine, so notebooks do not remeasure:

    >>> p = peaks()                      # measures once, then reads the cache
    >>> p.ridge_flop_per_byte("float32")  # FLOP per byte where compute and memory roofs meet

On a shared machine the read roof moves from minute to minute, so a benchmark does not take
it once: a `Roof` is sampled between the measurements of a run and every ratio of the run is
taken against its medians, with its spread reported (`Roof.noisy` above NOISY_SPREAD).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from labkit.config import data_dir, labkit_home

DTYPES = ("float32", "bfloat16", "float16")
# Peaks are remeasured when the measuring code changes what it counts.
PEAKS_VERSION = 1


# --- the device --------------------------------------------------------------------------


def default_device() -> str:
    """ "cuda" when torch sees a GPU, else "cpu"."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def device_name(device: str | None = None) -> str:
    """A human name for the device: the GPU's product name or the CPU model."""
    import torch

    device = device or default_device()
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return model


def sync(device: str) -> None:
    """Waits for queued device work (GPU kernels run asynchronously); no-op on CPU."""
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(torch.device(device))


def time_fn(fn: Callable[[], Any], device: str, *, warmup: int = 1, repeats: int = 5) -> list[float]:
    """Runs `fn` warmup + repeats times; returns the seconds of each timed run (synchronized)."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"warmup must be >= 0 and repeats >= 1, got warmup={warmup} repeats={repeats}")
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


PEAKS_METHOD = 3  # bumped when the way peaks are measured changes, so cached peaks are measured again


def machine_key(device: str) -> str:
    """A cache key that changes when the hardware, the thread count or torch changes."""
    import torch

    threads = torch.get_num_threads()
    raw = (
        f"{platform.node()}|{device_name(device)}|{device}|{threads}|{os.cpu_count()}|{torch.__version__}"
        f"|method{PEAKS_METHOD}"
    )
    short = device_name(device).replace(" ", "_").replace("/", "_")[:40]
    return f"{short}-{threads}t-{hashlib.sha1(raw.encode()).hexdigest()[:10]}"


# --- datasheets --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Datasheet:
    """A vendor's peaks for one part. flops: dtype -> dense FLOP/s; bandwidth in bytes/s."""

    name: str
    memory_bytes: float
    bandwidth_bytes_per_s: float
    flops: dict[str, float]
    source: str
    memory_type: str = ""
    aliases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.bandwidth_bytes_per_s <= 0 or self.memory_bytes <= 0:
            raise ValueError(f"{self.name}: bandwidth and memory must be positive")
        if not self.flops or any(v <= 0 for v in self.flops.values()):
            raise ValueError(f"{self.name}: flops must be a non-empty dict of positive FLOP/s")
        if not self.source:
            raise ValueError(f"{self.name}: a datasheet needs a source")

    def peak_flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for `dtype`; KeyError naming the dtypes known for this part."""
        try:
            return self.flops[dtype]
        except KeyError:
            raise KeyError(f"{self.name} has no {dtype!r} peak; known: {sorted(self.flops)}") from None

    def ridge_flop_per_byte(self, dtype: str = "bfloat16") -> float:
        """Arithmetic intensity (FLOP/byte) where the compute roof meets the bandwidth roof."""
        return self.peak_flops(dtype) / self.bandwidth_bytes_per_s


def datasheets(path: str | Path | None = None) -> dict[str, Datasheet]:
    """Every part in `data/datasheets.json`, by name."""
    raw = json.loads(Path(path or data_dir() / "datasheets.json").read_text())
    out: dict[str, Datasheet] = {}
    for name, d in raw["devices"].items():
        out[name] = Datasheet(
            name=name,
            memory_bytes=float(d["memory_bytes"]),
            bandwidth_bytes_per_s=float(d["bandwidth_bytes_per_s"]),
            flops={k: float(v) for k, v in d["flops"].items()},
            source=d["source"],
            memory_type=d.get("memory_type", ""),
            aliases=tuple(d.get("aliases", ())),
        )
    return out


def lookup_datasheet(name: str) -> Datasheet | None:
    """The datasheet whose name or alias matches a device name (as torch or NVML report it), or None."""
    norm = lambda s: "".join(ch for ch in s.lower() if ch.isalnum())
    target = norm(name)
    sheets = datasheets()
    for sheet in sheets.values():  # exact first, so "H100 PCIe" never matches "H100 SXM"
        if target in {norm(sheet.name), *map(norm, sheet.aliases)}:
            return sheet
    for sheet in sheets.values():
        for cand in (sheet.name, *sheet.aliases):
            c = norm(cand)
            if c and (c in target or target in c) and len(c) >= 3:
                return sheet
    if "h100" in target:  # an unlisted H100 name: PCIe parts say so, the rest are SXM
        return sheets["H100 PCIe" if "pcie" in target else "H100 SXM"]
    return None


# --- measured peaks ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peaks:
    """Measured roofs of one device. matmul_flops: dtype -> FLOP/s; bandwidths in bytes/s."""

    device: str
    device_name: str
    threads: int
    matmul_flops: dict[str, float]
    read_bytes_per_s: float
    copy_bytes_per_s: float
    matmul_size: int
    buffer_bytes: int
    measured_at: str = ""
    machine_key: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.read_bytes_per_s <= 0 or self.copy_bytes_per_s <= 0:
            raise ValueError("bandwidths must be positive")
        if any(v <= 0 for v in self.matmul_flops.values()):
            raise ValueError(f"matmul FLOP/s must be positive: {self.matmul_flops}")

    def peak_flops(self, dtype: str) -> float:
        """Measured matmul FLOP/s for `dtype`; KeyError naming the measured dtypes."""
        try:
            return self.matmul_flops[dtype]
        except KeyError:
            raise KeyError(f"no measured {dtype!r} matmul peak; measured: {sorted(self.matmul_flops)}") from None

    def ridge_flop_per_byte(self, dtype: str = "float32") -> float:
        """Measured ridge point: matmul FLOP/s over read bandwidth, in FLOP/byte."""
        return self.peak_flops(dtype) / self.read_bytes_per_s

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["notes"] = list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Peaks:
        d = dict(d)
        d.pop("version", None)
        d["notes"] = tuple(d.get("notes", ()))
        return cls(**d)

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per roof, for tables: what, value, unit."""
        rows = [{"what": f"matmul {dt}", "value": v / 1e9, "unit": "GFLOP/s"} for dt, v in self.matmul_flops.items()]
        rows += [
            {"what": "read bandwidth", "value": self.read_bytes_per_s / 1e9, "unit": "GB/s"},
            {"what": "copy bandwidth (read+write)", "value": self.copy_bytes_per_s / 1e9, "unit": "GB/s"},
        ]
        rows += [
            {"what": f"ridge {dt}", "value": self.ridge_flop_per_byte(dt), "unit": "FLOP/byte"}
            for dt in self.matmul_flops
        ]
        return rows


def _torch_dtype(dtype: str):
    import torch

    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {DTYPES}") from None


def _pick(times: list[float], stat: str) -> float:
    """The median run (default), or the fastest ("best": the one least disturbed by other processes)."""
    if stat == "median":
        return statistics.median(times)
    if stat == "best":
        return min(times)
    raise ValueError(f"stat must be 'median' or 'best', got {stat!r}")


def measure_matmul_flops(
    dtype: str = "float32", device: str | None = None, n: int | None = None, repeats: int = 5, stat: str = "median"
) -> float:
    """FLOP/s of an n×n @ n×n matmul (2·n³ FLOPs each), median run (or best). n defaults to fill the device."""
    import torch

    device = device or default_device()
    n = n or (8192 if device.startswith("cuda") else 2048)
    if n < 16:
        raise ValueError(f"matmul size n={n} too small to measure a peak")
    td = _torch_dtype(dtype)
    a = torch.randn(n, n, device=device).to(td)
    b = torch.randn(n, n, device=device).to(td)
    out = torch.empty(n, n, device=device, dtype=td)
    # GPU matmuls take ~1 ms: time several per sample so launch overhead does not count.
    inner = 10 if device.startswith("cuda") else 1

    def run() -> None:
        for _ in range(inner):
            torch.mm(a, b, out=out)

    best = float("inf")
    from labkit.engine.kernels import cpu_has_bf16_matmul

    if not (device == "cpu" and td == torch.bfloat16 and not cpu_has_bf16_matmul()):
        best = _pick(time_fn(run, device, warmup=2, repeats=repeats), stat)
    # PyTorch's CPU matmul goes to MKL, which is not the fastest kernel on every CPU (on AMD,
    # oneDNN with a packed fp32 operand is faster; in bf16 without AMX the engine's own kernel
    # is), and the lab's engine uses the faster one: the roof is the fastest, or MFU could pass 1.
    if device == "cpu" and td == torch.float32 and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), n)
        lp = torch.ops.mkldnn._linear_pointwise
        best = min(
            best, _pick(time_fn(lambda: lp(a, packed, None, "none", [], ""), device, warmup=2, repeats=repeats), stat)
        )
    if device == "cpu" and td == torch.bfloat16:
        from labkit.engine import kernels

        if kernels.available():
            pb = kernels.pack_bf16(b.t().contiguous())
            best = min(best, _pick(time_fn(lambda: kernels.gemm(a, pb), device, warmup=2, repeats=repeats), stat))
        elif best == float("inf"):  # torch's emulated bf16 matmul, on a size it finishes in seconds
            m = min(n, 256)
            best = _pick(time_fn(lambda: torch.mm(a[:m, :m], b[:m, :m]), device, warmup=1, repeats=repeats), stat)
            return 2.0 * m**3 / best
    return 2.0 * n**3 * inner / best


def _buffer(nbytes: int, device: str):
    import torch

    if nbytes < 1 << 20:
        raise ValueError(f"buffer of {nbytes} bytes too small to measure DRAM bandwidth (caches would serve it)")
    return torch.ones(nbytes // 4, dtype=torch.float32, device=device)


def llc_bytes() -> int:
    """The CPU's last-level cache in bytes (from sysfs; 32 MiB where it cannot be read)."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (d / "size").read_text().strip()
            best = max(best, int(size.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(size[-1], 0))
        except (OSError, ValueError):
            continue
    return best or (32 << 20)


def default_buffer_bytes(device: str) -> int:
    """Buffer size for bandwidth: 8x the CPU's last-level cache (at least 256 MiB), or 2 GiB on a GPU (L2 is 50 MB)."""
    return (2 << 30) if device.startswith("cuda") else max(256 << 20, 8 * llc_bytes())


def _reader(x: Any, device: str) -> tuple[Callable[[], Any], str]:
    """A call that reads all of `x` the way decode reads weights, and what it is (for the output)."""
    import torch

    threads = torch.get_num_threads()
    if device == "cpu":
        from labkit.engine import kernels

        if kernels.available():
            pinned = kernels.pin_threads()
            return (lambda: kernels.stream_read(x)), (
                f"the engine's AVX2 streaming loop, {threads} threads{f', {pinned} pinned' if pinned else ''}"
            )
        return (lambda: torch.sum(x)), f"torch.sum, {threads} threads ({kernels.unavailable_reason()})"
    return (lambda: torch.sum(x)), "torch.sum"


def measure_read_bandwidth(
    device: str | None = None, nbytes: int | None = None, repeats: int = 5, stat: str = "median"
) -> float:
    """Bytes/s of streaming a buffer larger than the caches (bytes counted = buffer size), median run (or best).

    Read as decode reads: on a CPU the engine's streaming loop with torch's threads, pinned (see `_reader`).
    """
    device = device or default_device()
    x = _buffer(nbytes or default_buffer_bytes(device), device)
    times = time_fn(_reader(x, device)[0], device, warmup=2, repeats=repeats)
    return x.numel() * x.element_size() / _pick(times, stat)


def measure_copy_bandwidth(device: str | None = None, nbytes: int | None = None, repeats: int = 5) -> float:
    """Median bytes/s of copying a buffer: read + write bytes (2 × buffer size) counted."""
    device = device or default_device()
    src = _buffer(nbytes or default_buffer_bytes(device), device)
    dst = src.clone()
    times = time_fn(lambda: dst.copy_(src), device, warmup=2, repeats=repeats)
    return 2 * src.numel() * src.element_size() / statistics.median(times)


def measure_peaks(
    device: str | None = None,
    dtypes: tuple[str, ...] | None = None,
    *,
    quick: bool = False,
    matmul_size: int | None = None,
    buffer_bytes: int | None = None,
    repeats: int = 5,
    progress: bool = False,
) -> Peaks:
    """Measures matmul FLOP/s per dtype and read/copy bandwidth on `device`; returns Peaks.

    quick: smaller sizes and fewer repeats (seconds on a CPU; less accurate, for CI).
    progress: a bar over the measurements (a CPU without bf16 units takes minutes for its bf16 peak).
    """
    import torch

    device = device or default_device()
    is_gpu = device.startswith("cuda")
    dtypes = dtypes or (("bfloat16", "float16", "float32") if is_gpu else ("float32", "bfloat16"))
    if quick:
        matmul_size = matmul_size or (4096 if is_gpu else 768)
        buffer_bytes = buffer_bytes or ((512 << 20) if is_gpu else (128 << 20))
        repeats = min(repeats, 3)
    n = matmul_size or (8192 if is_gpu else 2048)
    nbytes = buffer_bytes or default_buffer_bytes(device)
    notes: list[str] = []
    flops: dict[str, float] = {}
    if is_gpu:
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 stays fp32: TF32 is a different roof
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(dtypes) + 2, desc=f"peaks of {device}", leave=False)
    for dt in dtypes:
        try:
            flops[dt] = measure_matmul_flops(dt, device, n, repeats)
        except RuntimeError as e:  # e.g. a dtype this CPU's BLAS does not support
            notes.append(f"{dt} matmul not measured: {e.__class__.__name__}: {str(e)[:120]}")
        if bar is not None:
            bar.update()
    if not flops:
        raise RuntimeError(f"no matmul dtype could be measured on {device}: {notes}")
    read = measure_read_bandwidth(device, nbytes, repeats)
    copy = measure_copy_bandwidth(device, nbytes, repeats)
    if bar is not None:
        bar.update(2)
        bar.close()
    return Peaks(
        device=device,
        device_name=device_name(device),
        threads=torch.get_num_threads(),
        matmul_flops=flops,
        read_bytes_per_s=read,
        copy_bytes_per_s=copy,
        matmul_size=n,
        buffer_bytes=nbytes,
        measured_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        machine_key=machine_key(device),
        notes=tuple(notes),
    )


def peaks_cache_path(device: str | None = None, quick: bool = False) -> Path:
    device = device or default_device()
    return labkit_home() / "hardware" / f"peaks-{machine_key(device)}{'-quick' if quick else ''}.json"


def peaks(
    device: str | None = None,
    *,
    refresh: bool = False,
    quick: bool = False,
    verbose: bool = True,
    progress: bool = False,
) -> Peaks:
    """This device's measured Peaks, from the cache in LABKIT_HOME or measured now (refresh=True remeasures).

    Other work on the machine lowers what is measured; remeasure (refresh=True) on a quiet machine.
    """
    device = device or default_device()
    path = peaks_cache_path(device, quick)
    if not refresh and path.is_file():
        try:
            d = json.loads(path.read_text())
            if d.get("version") == PEAKS_VERSION:
                return Peaks.from_dict(d)
        except (ValueError, TypeError, KeyError):
            pass  # a broken cache is remeasured below
    if verbose:
        print(f"labkit: measuring peak FLOP/s and bandwidth on {device_name(device)} ({device}); cached in {path}")
    p = measure_peaks(device, quick=quick, progress=progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": PEAKS_VERSION, **p.as_dict()}, indent=1))
    os.replace(tmp, path)
    return p


# --- one roof for a whole run ----------------------------------------------------------------

NOISY_SPREAD = 0.15  # a run's roof samples further apart than this (max - min over the median): a noisy machine


class Roof:
    """The roofs of one run, sampled between the measurements they are compared to.

    On a shared machine the read roof moves from minute to minute (by up to 2x on shared VMs), so
    a roof taken once makes every MBU after it unreliable. A Roof is sampled again and again
    (`sample()`; `labkit.measure` samples it before each measurement it is given), its figures are
    the medians of its samples, `rescore` takes every ratio of the run against the final medians,
    and its spread says how much to trust them: above NOISY_SPREAD the run is `noisy`.

        >>> roof = Roof("cpu", ("float32",))
        >>> recs = [measure_decode(r, 1, 512, peaks=roof) for r in runners]   # one roof, every runner
        >>> roof.sample(); roof.rescore(recs); print(roof.describe())
    """

    def __init__(
        self,
        device: str | None = None,
        dtypes: tuple[str, ...] | None = None,
        *,
        buffer_bytes: int | None = None,
        matmul_size: int | None = None,
        repeats: int = 3,
    ) -> None:
        import torch

        self.device = device or default_device()
        gpu = self.device.startswith("cuda")
        self.dtypes = tuple(dtypes or (("bfloat16",) if gpu else ("float32",)))
        for dt in self.dtypes:
            _torch_dtype(dt)
        self.buffer_bytes = buffer_bytes or default_buffer_bytes(self.device)
        self.matmul_size = matmul_size or (8192 if gpu else 2048)
        self.repeats = repeats
        self.threads = torch.get_num_threads()
        self.read_samples: list[float] = []
        self.flops_samples: dict[str, list[float]] = {dt: [] for dt in self.dtypes}
        self.method = ""
        self.id = f"roof-{_dt.datetime.now().strftime('%H%M%S')}-{os.getpid()}"
        self._buf: Any = None

    def sample(self, matmul: bool = True, dtype: str | None = None) -> float:
        """Measures the read roof once (median of `repeats` passes) and, if `matmul`, the matmul roof of
        `dtype` (every dtype of the roof when None or not one of them); returns this read sample in bytes/s."""
        if self._buf is None:
            self._buf = _buffer(self.buffer_bytes, self.device)
        read, self.method = _reader(self._buf, self.device)
        bps = self.buffer_bytes / statistics.median(time_fn(read, self.device, warmup=1, repeats=self.repeats))
        self.read_samples.append(bps)
        if matmul:
            for dt in (dtype,) if dtype in self.dtypes else self.dtypes:
                self.flops_samples[dt].append(measure_matmul_flops(dt, self.device, self.matmul_size, self.repeats))
        return bps

    def close(self) -> None:
        """Frees the read buffer (the samples stay)."""
        self._buf = None

    @property
    def read_bytes_per_s(self) -> float:
        """Median of the read samples, bytes/s."""
        if not self.read_samples:
            raise ValueError("the roof has no sample yet: call sample() first")
        return statistics.median(self.read_samples)

    def peak_flops(self, dtype: str) -> float:
        """Median of `dtype`'s matmul samples, FLOP/s."""
        got = self.flops_samples.get(dtype) or []
        if not got:
            raise KeyError(
                f"no {dtype!r} matmul sample in this roof; sampled: {[d for d, v in self.flops_samples.items() if v]}"
            )
        return statistics.median(got)

    @staticmethod
    def _spread(xs: list[float]) -> float:
        return (max(xs) - min(xs)) / statistics.median(xs) if len(xs) > 1 else 0.0

    @property
    def read_spread(self) -> float:
        """(max - min) / median of the read samples: 0.2 means they span 20% of the median."""
        return self._spread(self.read_samples)

    def flops_spread(self, dtype: str) -> float:
        return self._spread(self.flops_samples.get(dtype) or [])

    @property
    def noisy(self) -> bool:
        """True when a roof moved more than NOISY_SPREAD within this run: its ratios are not to be trusted."""
        return self.read_spread > NOISY_SPREAD or any(
            self._spread(v) > NOISY_SPREAD for v in self.flops_samples.values()
        )

    def noise_note(self) -> str:
        """ "" on a steady machine; else one line to print next to every ratio taken against this roof."""
        if not self.noisy:
            return ""
        worst = max(
            [("read", self.read_spread)] + [(f"{d} matmul", self._spread(v)) for d, v in self.flops_samples.items()],
            key=lambda t: t[1],
        )
        return f"noisy machine: the {worst[0]} roof spread {worst[1]:.0%} (> {NOISY_SPREAD:.0%}) within this run"

    def describe(self) -> str:
        """One line: the medians, how many samples, their spread, how the read roof was measured."""
        flops = ", ".join(
            f"{d} matmul {self.peak_flops(d) / 1e9:,.0f} GFLOP/s (spread {self.flops_spread(d):.0%})"
            for d, v in self.flops_samples.items()
            if v
        )
        return (
            f"one roof for every runner ({self.id}): read {self.read_bytes_per_s / 1e9:.1f} GB/s, median of "
            f"{len(self.read_samples)} samples, spread {self.read_spread:.0%} ({self.method}, "
            f"{self.buffer_bytes >> 20} MiB){'; ' + flops if flops else ''}"
            + (f" [{self.noise_note()}]" if self.noisy else "")
        )

    def peaks(self) -> Peaks:
        """The medians as Peaks (for charts and code that takes Peaks); copy bandwidth is not sampled: read's."""
        flops = {d: self.peak_flops(d) for d, v in self.flops_samples.items() if v}
        return Peaks(
            device=self.device,
            device_name=device_name(self.device),
            threads=self.threads,
            matmul_flops=flops or {self.dtypes[0]: float("inf")},
            read_bytes_per_s=self.read_bytes_per_s,
            copy_bytes_per_s=self.read_bytes_per_s,
            matmul_size=self.matmul_size,
            buffer_bytes=self.buffer_bytes,
            measured_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            machine_key=machine_key(self.device),
            notes=(self.describe(),),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "device": self.device,
            "device_name": device_name(self.device),
            "threads": self.threads,
            "method": self.method,
            "buffer_bytes": self.buffer_bytes,
            "read_samples": self.read_samples,
            "read_bytes_per_s": self.read_bytes_per_s,
            "read_spread": self.read_spread,
            "flops_samples": self.flops_samples,
            "peak_flops": {d: self.peak_flops(d) for d, v in self.flops_samples.items() if v},
            "noisy": self.noisy,
            "noisy_spread": NOISY_SPREAD,
        }

    def rescore(self, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Every record's MFU and MBU against this roof's final medians (in place); returns the records."""
        for r in records:
            dt = r.get("dtype")
            peak = self.peak_flops(dt) if isinstance(dt, str) and self.flops_samples.get(dt) else None
            seconds = r["ms"] / 1e3
            r.update(
                peak_flops=peak,
                peak_bytes_per_s=self.read_bytes_per_s,
                mfu=r["flops"] / seconds / peak if peak else None,
                mbu=r["bytes"] / seconds / self.read_bytes_per_s,
                roof=self.id,
                roof_read_spread=self.read_spread,
                noisy=self.noisy,
                roof_note=self.noise_note(),
            )
        return records
