from __future__ import annotations

import json

import pytest

from labkit import hardware
from labkit.hardware import Peaks, datasheets, lookup_datasheet

PARTS = ["H100 SXM", "H100 PCIe", "H200", "A100 40GB", "A100 80GB", "L40S", "L4", "A10G", "RTX 4090"]


def test_datasheets_cover_the_parts_with_sources():
    sheets = datasheets()
    assert set(PARTS) <= set(sheets)
    for s in sheets.values():
        assert s.source and "bfloat16" in s.flops and "float32" in s.flops
        assert s.flops["bfloat16"] >= s.flops["float32"]
    h = sheets["H100 SXM"]
    assert h.peak_flops("bfloat16") == pytest.approx(989e12, rel=0.01)
    assert h.bandwidth_bytes_per_s == pytest.approx(3.35e12)
    assert h.ridge_flop_per_byte("bfloat16") == pytest.approx(295, rel=0.01)
    assert sheets["H200"].bandwidth_bytes_per_s == pytest.approx(4.8e12)


@pytest.mark.parametrize("name,want", [("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
                                       ("NVIDIA H200", "H200"), ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
                                       ("NVIDIA GeForce RTX 4090", "RTX 4090"), ("NVIDIA L4", "L4"),
                                       ("NVIDIA L40S", "L40S"), ("NVIDIA A10G", "A10G")])
def test_lookup_by_torch_device_name(name, want):
    assert lookup_datasheet(name).name == want


def test_lookup_unknown_is_none():
    assert lookup_datasheet("AMD EPYC 9R14") is None


def test_measured_peaks_are_plausible_and_consistent():
    p = hardware.measure_peaks("cpu", quick=True)
    assert set(p.matmul_flops) >= {"float32"}
    # a CPU core does at least ~1 GFLOP/s and no CPU reaches 100 TFLOP/s
    assert 1e9 < p.peak_flops("float32") < 1e14
    assert 0.5e9 < p.read_bytes_per_s < 2e12
    assert 0.5e9 < p.copy_bytes_per_s < 2e12
    assert p.ridge_flop_per_byte("float32") == pytest.approx(p.peak_flops("float32") / p.read_bytes_per_s)
    assert p.buffer_bytes >= 64 << 20  # bigger than the caches: DRAM really measured
    rows = {r["what"]: r for r in p.summary_rows()}
    assert rows["read bandwidth"]["unit"] == "GB/s"


def test_best_and_median_stats():
    med = hardware.measure_matmul_flops("float32", "cpu", n=256, repeats=5)
    best = hardware.measure_matmul_flops("float32", "cpu", n=256, repeats=5, stat="best")
    assert best > 0 and med > 0
    assert hardware._pick([3.0, 1.0, 2.0], "best") == 1.0 and hardware._pick([3.0, 1.0, 2.0], "median") == 2.0


def test_peaks_cache_and_refresh(tmp_path, monkeypatch):
    monkeypatch.setenv("LABKIT_HOME", str(tmp_path))
    calls = []
    fake = Peaks("cpu", "Test CPU", 2, {"float32": 3e11}, 2e10, 1.8e10, 2048, 256 << 20)

    def measure(device=None, quick=False, **kw):
        calls.append(device)
        return fake
    monkeypatch.setattr(hardware, "measure_peaks", measure)
    a = hardware.peaks("cpu", verbose=False)
    b = hardware.peaks("cpu", verbose=False)
    assert a == b == fake and len(calls) == 1  # second call read the cache
    path = hardware.peaks_cache_path("cpu")
    assert path.is_file() and str(tmp_path) in str(path)
    assert json.loads(path.read_text())["matmul_flops"]["float32"] == 3e11
    hardware.peaks("cpu", refresh=True, verbose=False)
    assert len(calls) == 2
    path.write_text("{broken")
    hardware.peaks("cpu", verbose=False)
    assert len(calls) == 3  # a broken cache is remeasured


def test_bad_input():
    with pytest.raises(ValueError, match="too small"):
        hardware.measure_read_bandwidth("cpu", nbytes=1000)
    with pytest.raises(ValueError, match="float12"):
        hardware.measure_matmul_flops("float12", "cpu", n=64)
    with pytest.raises(KeyError, match="float16"):
        Peaks("cpu", "x", 1, {"float32": 1e9}, 1e9, 1e9, 64, 1 << 20).peak_flops("float16")
    with pytest.raises(ValueError, match="stat"):
        hardware.measure_read_bandwidth("cpu", nbytes=2 << 20, stat="mean")
    with pytest.raises(ValueError, match="repeats"):
        hardware.time_fn(lambda: None, "cpu", repeats=0)
