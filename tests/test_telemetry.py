from __future__ import annotations

import sys
import threading
import time
import types

import pytest

from labkit.telemetry import PhaseMark, Sampler


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        x += 1


def test_cpu_sampler_marks_phases_and_sees_busy_core():
    s = Sampler("cpu", interval_s=0.05, verbose=False)
    assert s.kind == "cpu" and s.notes == []
    with s:
        with s.phase("prefill"):
            _busy(0.5)
        time.sleep(0.2)
        with s.phase("decode"):
            _busy(0.5)
    assert [p.name for p in s.phases] == ["prefill", "decode"]
    pre, dec = s.phases
    assert pre.duration_s >= 0.5 and dec.start_s >= pre.end_s + 0.15
    df = s.frame()
    assert {"t_s", "phase", "cpu_util_pct", "cpu0_pct"} <= set(df.columns)
    assert len(df) >= 10  # ~1.2 s at 50 ms
    assert df["t_s"].is_monotonic_increasing
    assert set(df["phase"]) >= {"prefill", "decode", "idle"}
    # samples carry the phase that was open when they were taken
    for _, row in df.iterrows():
        inside = [p.name for p in s.phases if p.start_s <= row.t_s <= p.end_s]
        if row.phase != "idle":
            assert row.phase in inside
    means = s.phase_means(["cpu_util_pct"])
    assert set(means) == {"prefill", "decode"}
    # one core spins during both phases: at least ~half of one core busy on average (other load only adds)
    n = len([c for c in df.columns if c.startswith("cpu") and c[3:-4].isdigit()])
    assert means["prefill"]["cpu_util_pct"] >= 100 / n * 0.5
    assert all(0 <= v <= 100 for v in df["cpu_util_pct"])
    assert not any(t.name == "labkit-telemetry" for t in threading.enumerate())  # thread stopped


def test_no_gpu_degrades_with_one_line(capsys):
    s = Sampler("cuda", verbose=True)
    assert s.kind == "cpu"
    assert len(s.notes) == 1 and "NVML not available" in s.notes[0]
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("telemetry: NVML not available")
    assert s.interval_s == pytest.approx(0.1)
    assert "cpu_util_pct" in s.sample_once()
    s.stop()


def test_missing_pynvml_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    s = Sampler("cuda", verbose=False)
    assert s.kind == "cpu" and "nvidia-ml-py" in s.notes[0]


def _fake_pynvml(gpm_supported: bool) -> types.ModuleType:
    """Enough of pynvml's surface to exercise the NVML + GPM path without a GPU."""
    nv = types.ModuleType("pynvml")
    nv.NVML_CLOCK_SM, nv.NVML_SUCCESS = 1, 0
    nv.NVML_GPM_METRIC_SM_UTIL, nv.NVML_GPM_METRIC_ANY_TENSOR_UTIL, nv.NVML_GPM_METRIC_DRAM_BW_UTIL = 2, 5, 10
    nv.NVML_GPM_METRICS_GET_VERSION = 1
    nv.freed = []
    nv.nvmlInit = lambda: None
    nv.nvmlShutdown = lambda: None
    nv.nvmlDeviceGetHandleByIndex = lambda i: f"gpu{i}"
    nv.nvmlDeviceGetName = lambda h: "NVIDIA H100 80GB HBM3"
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=99, memory=41)
    nv.nvmlDeviceGetClockInfo = lambda h, c: 1980
    nv.nvmlDeviceGetPowerUsage = lambda h: 512_000
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=10 * 2**30)
    nv.nvmlGpmQueryDeviceSupport = lambda h: types.SimpleNamespace(isSupportedDevice=int(gpm_supported))
    nv.nvmlGpmSampleAlloc = lambda: object()
    nv.nvmlGpmSampleGet = lambda h, s: s
    nv.nvmlGpmSampleFree = lambda s: nv.freed.append(s)

    class Req:
        def __init__(self):
            self.metrics = [types.SimpleNamespace(metricId=0, nvmlReturn=0, value=0.0) for _ in range(98)]
    nv.c_nvmlGpmMetricsGet_t = Req

    def get(req):
        vals = {2: 97.0, 5: 63.5, 10: 22.0}
        for m in req.metrics[:req.numMetrics]:
            m.value = vals[m.metricId]
        return req
    nv.nvmlGpmMetricsGet = get
    return nv


def test_nvml_and_gpm_path_with_fake_driver(monkeypatch):
    nv = _fake_pynvml(gpm_supported=True)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    s = Sampler("cuda:0", verbose=False)
    assert s.kind == "nvml" and s.interval_s == pytest.approx(0.02) and s.notes == []
    with s.phase("prefill"):
        row = s.sample_once()
    assert row["phase"] == "prefill"
    assert row["gpu_util_pct"] == 99 and row["mem_util_pct"] == 41
    assert row["tensor_active_pct"] == 63.5 and row["sm_active_pct"] == 97 and row["dram_bw_util_pct"] == 22
    assert row["power_w"] == 512 and row["sm_clock_mhz"] == 1980 and row["mem_used_gib"] == 10
    assert len(nv.freed) == 1  # GPM samples are freed as the window slides
    s.stop()


def test_gpm_unsupported_degrades(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(gpm_supported=False))
    s = Sampler("cuda", verbose=False)
    assert s.kind == "nvml" and len(s.notes) == 1 and "GPM metrics not available" in s.notes[0]
    row = s.sample_once()
    assert "gpu_util_pct" in row and "tensor_active_pct" not in row
    s.stop()


def test_bad_use_is_refused():
    with pytest.raises(ValueError, match="interval_s"):
        Sampler("cpu", interval_s=0.0, verbose=False)
    s = Sampler("cpu", verbose=False)
    with pytest.raises(RuntimeError, match="nest"):
        with s.phase("prefill"):
            with s.phase("decode"):
                pass
    with pytest.raises(ValueError, match="ends"):
        PhaseMark("x", 2.0, 1.0)
    s.start()
    with pytest.raises(RuntimeError, match="already"):
        s.start()
    s.stop()
