"""Background samplers of device utilization, with phase marks, for the "utilization lies" lesson.

    >>> s = Sampler()                    # NVML on a GPU (20 ms), psutil per-core on a CPU (100 ms)
    >>> with s:                          # starts and stops the background thread
    ...     with s.phase("prefill"): run_prefill()
    ...     with s.phase("decode"):  run_decode()
    >>> s.frame()                        # one row per sample: t_s, phase, metric columns

On a GPU, NVML gives the numbers `nvidia-smi` shows: `gpu_util_pct` (the share of time *any*
kernel ran: near 100% in prefill and decode alike), `mem_util_pct` (memory-controller busy
time), SM clock, power, memory used. On Hopper and newer, GPM metrics tell the real story when
the driver lets us read them: `sm_active_pct`, `tensor_active_pct` and `dram_bw_util_pct`.
On a CPU, psutil gives per-core utilization (`cpu{i}_pct`, and the mean `cpu_util_pct`).
Whatever is not available is said once, in `Sampler.notes`, and printed as one line.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Self


@dataclass(frozen=True, slots=True)
class PhaseMark:
    """A named interval on the sampler's clock (seconds since the sampler was created)."""

    name: str
    start_s: float
    end_s: float

    def __post_init__(self) -> None:
        if self.end_s < self.start_s:
            raise ValueError(f"phase {self.name!r} ends ({self.end_s}) before it starts ({self.start_s})")

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


class _NvmlSource:
    """NVML counters of one GPU, plus GPM (Hopper+) when supported and readable."""

    def __init__(self, index: int, notes: list[str]) -> None:
        import pynvml

        self.nv = pynvml
        pynvml.nvmlInit()
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        self.name = pynvml.nvmlDeviceGetName(self.handle)
        self.gpm_prev: Any = None
        self.gpm = False
        try:
            if pynvml.nvmlGpmQueryDeviceSupport(self.handle).isSupportedDevice:
                self.gpm_prev = pynvml.nvmlGpmSampleGet(self.handle, pynvml.nvmlGpmSampleAlloc())
                self.gpm = True
            else:
                notes.append(f"GPM metrics not available: {self.name} is not GPM-capable (Hopper or newer needed)")
        except Exception as e:  # noqa: BLE001 - old drivers lack the symbol; some hosts forbid profiling
            notes.append(f"GPM metrics not available: {e.__class__.__name__}: {e}")

    def read(self) -> dict[str, float]:
        nv, h = self.nv, self.handle
        u = nv.nvmlDeviceGetUtilizationRates(h)
        row: dict[str, float] = {"gpu_util_pct": float(u.gpu), "mem_util_pct": float(u.memory)}
        with contextlib.suppress(Exception):
            row["sm_clock_mhz"] = float(nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM))
        with contextlib.suppress(Exception):
            row["power_w"] = nv.nvmlDeviceGetPowerUsage(h) / 1000.0
        with contextlib.suppress(Exception):
            row["mem_used_gib"] = nv.nvmlDeviceGetMemoryInfo(h).used / 2**30
        if self.gpm:
            row.update(self._gpm())
        return row

    def _gpm(self) -> dict[str, float]:
        """GPM metrics are rates over the interval between two samples: the previous and this one."""
        nv = self.nv
        cur = nv.nvmlGpmSampleGet(self.handle, nv.nvmlGpmSampleAlloc())
        ids = {
            "sm_active_pct": nv.NVML_GPM_METRIC_SM_UTIL,
            "tensor_active_pct": nv.NVML_GPM_METRIC_ANY_TENSOR_UTIL,
            "dram_bw_util_pct": nv.NVML_GPM_METRIC_DRAM_BW_UTIL,
        }
        req = nv.c_nvmlGpmMetricsGet_t()
        req.version = nv.NVML_GPM_METRICS_GET_VERSION
        req.numMetrics = len(ids)
        req.sample1, req.sample2 = self.gpm_prev, cur
        for i, mid in enumerate(ids.values()):
            req.metrics[i].metricId = mid
        out: dict[str, float] = {}
        try:
            nv.nvmlGpmMetricsGet(req)
            for i, key in enumerate(ids):
                if req.metrics[i].nvmlReturn == nv.NVML_SUCCESS:
                    out[key] = float(req.metrics[i].value)
        finally:
            with contextlib.suppress(Exception):
                nv.nvmlGpmSampleFree(self.gpm_prev)
            self.gpm_prev = cur
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self.gpm_prev is not None:
                self.nv.nvmlGpmSampleFree(self.gpm_prev)
        with contextlib.suppress(Exception):
            self.nv.nvmlShutdown()


class _CpuSource:
    """Per-core utilization from psutil: the share of each core's time not idle since the last read."""

    def __init__(self) -> None:
        import psutil

        self.psutil = psutil
        psutil.cpu_percent(percpu=True)  # the first call only sets the reference point
        self.name = "cpu"

    def read(self) -> dict[str, float]:
        per = self.psutil.cpu_percent(percpu=True)
        row = {f"cpu{i}_pct": float(v) for i, v in enumerate(per)}
        row["cpu_util_pct"] = float(sum(per) / max(1, len(per)))
        return row

    def close(self) -> None:
        pass


def _open_source(device: str, notes: list[str]) -> tuple[str, Any]:
    """("nvml", source) on a readable GPU, else ("cpu", psutil source) with a note saying why."""
    if device.startswith("cuda") or device == "auto":
        index = int(device.split(":")[1]) if ":" in device else 0
        try:
            return "nvml", _NvmlSource(index, notes)
        except ModuleNotFoundError:
            notes.append("NVML not available: pynvml is not installed (pip install nvidia-ml-py); sampling CPU cores")
        except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded, ...
            notes.append(
                f"NVML not available ({e.__class__.__name__}: {e}): no NVIDIA driver/GPU here; "
                "sampling CPU cores with psutil instead"
            )
    return "cpu", _CpuSource()


class Sampler:
    """Samples utilization every `interval_s` in a background thread; marks phases.

    device: "auto" (NVML when a GPU answers, else CPU), "cuda[:i]" or "cpu".
    interval_s: default 0.02 on a GPU, 0.1 on a CPU (psutil needs ~0.1 s to be meaningful).
    """

    def __init__(self, device: str = "auto", interval_s: float | None = None, verbose: bool = True) -> None:
        self.notes: list[str] = []
        self.kind, self._src = _open_source(device, self.notes)
        self.interval_s = interval_s if interval_s is not None else (0.02 if self.kind == "nvml" else 0.1)
        if not 0.001 <= self.interval_s <= 60:
            raise ValueError(f"interval_s must be between 0.001 and 60 s, got {self.interval_s}")
        self.source_name: str = self._src.name
        self.samples: list[dict[str, Any]] = []
        self.phases: list[PhaseMark] = []
        self._t0 = time.perf_counter()
        self._current: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        if verbose:
            for n in self.notes:
                print(f"telemetry: {n}")

    def now_s(self) -> float:
        """Seconds since the sampler was created (the clock of samples and phase marks)."""
        return time.perf_counter() - self._t0

    def sample_once(self) -> dict[str, Any]:
        """Reads every metric now, appends the row and returns it."""
        with self._lock:  # the thread and a phase's closing sample may read at once
            row: dict[str, Any] = {"t_s": self.now_s(), "phase": self._current or "idle"}
            row.update(self._src.read())
            self.samples.append(row)
        return row

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample_once()
            except Exception as e:  # noqa: BLE001 - a failing read must not kill the thread silently
                self.notes.append(f"sampling stopped: {e.__class__.__name__}: {e}")
                return

    def start(self) -> Self:
        if self._thread is not None:
            raise RuntimeError("sampler already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="labkit-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stops the thread (waits at most timeout_s) and releases NVML."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._src.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Marks the enclosed block as phase `name`; samples taken inside carry it."""
        if not name:
            raise ValueError("a phase needs a name")
        if self._current is not None:
            raise RuntimeError(f"phase {name!r} started inside phase {self._current!r}; phases do not nest")
        self._current, start = name, self.now_s()
        try:
            yield
        finally:
            # One sample at the end, still inside the phase: a phase shorter than interval_s
            # would otherwise have none (CPU utilization is the average since the last read).
            if self._thread is not None:
                try:
                    self.sample_once()
                except Exception as e:  # noqa: BLE001 - telemetry must not break the measured code
                    self.notes.append(f"closing sample of phase {name!r} failed: {e.__class__.__name__}: {e}")
            self._current = None
            self.phases.append(PhaseMark(name, start, self.now_s()))

    def frame(self):
        """The samples as a pandas DataFrame (one row per sample)."""
        import pandas as pd

        with self._lock:
            return pd.DataFrame.from_records(list(self.samples))

    def phase_means(self, metrics: list[str] | None = None) -> dict[str, dict[str, float]]:
        """Mean of each metric per phase: {phase: {metric: mean}} (phases with no samples left out)."""
        df = self.frame()
        if df.empty:
            return {}
        cols = metrics or [c for c in df.columns if c not in ("t_s", "phase")]
        cols = [c for c in cols if c in df.columns]
        return {ph: {c: float(g[c].mean()) for c in cols} for ph, g in df.groupby("phase") if ph != "idle"}
