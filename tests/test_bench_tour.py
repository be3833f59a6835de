"""The tour section's composition, with stand-in servers (the real ones are covered elsewhere)."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from labkit.bench import tour
from labkit.bench.sweep import ModeSpec
from labkit.proc import free_port, pid_alive, start_process, wait_http_ok
from labkit.report import Report

FAKE = str(Path(__file__).with_name("fake_openai_server.py"))


def test_tour_section_adds_table_charts_and_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pids: list[int] = []

    def factory(model: str):
        assert model == "tiny"  # the ci profile uses the CI model

        @contextlib.contextmanager
        def start(spec: ModeSpec) -> Iterator[str]:
            port = free_port()
            itl = "0.01" if spec.name == "mono" else "0.002"
            child = start_process(spec.name, [sys.executable, FAKE, "--port", str(port), "--itl-s", itl, "--waterfall"],
                                  log_path=tmp_path / f"{spec.name}.log")
            pids.append(child.pid)
            try:
                wait_http_ok(f"http://127.0.0.1:{port}/health", timeout_s=30, child=child)
                yield f"http://127.0.0.1:{port}"
            finally:
                child.stop()
        return start

    monkeypatch.setattr(tour, "server_factory", factory)
    report = Report(tmp_path / "report")
    report.section("Mono vs 1P1D")
    tour.tour_section(report, "ci")
    assert len(pids) == 3 and not any(pid_alive(p) for p in pids)  # mono (calibrated on), mono-dp, 1p1d
    sec = report.sections[-1]
    (_caption, rows), = sec.tables
    assert [r["mode"] for r in rows] == ["mono", "mono-dp", "1p1d"]
    assert all(r["ok"] == tour.PLANS["ci"].n_requests for r in rows)
    assert len(sec.figures) == 4 and all(p.is_file() for _, p in sec.figures)   # ITL and TTFT CDFs, plane, waterfall
    assert sec.figures[-1][1].name.startswith("bench_ttft_waterfall")
    summary = {r.what: r for r in report.summary}
    itl = summary["p99 ITL mono vs 1P1D"]
    by = {r["mode"]: r for r in rows}
    assert itl.note.startswith(f"{by['mono']['itl_p99_ms'] / by['1p1d']['itl_p99_ms']:.1f}x")
    assert "goodput mono vs 1P1D" in summary
    assert summary["goodput per mode"].value.startswith(f"mono {rows[0]['goodput_rps']:.2f}, mono-dp ")
    assert report.data["mono_vs_1p1d"]["plan"]["model"] == "tiny"
    assert report.write().is_file()
