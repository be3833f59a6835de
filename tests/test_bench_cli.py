from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Iterator

import pytest

from labkit.bench.cli import main
from labkit.proc import free_port, pid_alive, start_process, wait_http_ok

FAKE = str(Path(__file__).with_name("fake_openai_server.py"))


@pytest.fixture(scope="module")
def fake_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    child = start_process("fake-openai", [sys.executable, FAKE, "--port", str(port), "--itl-s", "0.002",
                                         "--waterfall"], log_path=tmp_path_factory.mktemp("fake") / "server.log")
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout_s=30, child=child)
        yield f"http://127.0.0.1:{port}"
    finally:
        child.stop()
        assert not pid_alive(child.pid)


def test_bench_run_writes_results(fake_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["run", "--url", fake_url, "--workload", "short-prompt", "--n", "5", "--rate", "50",
               "--scale", "0.05", "--slo-ttft-ms", "5000", "--out", str(tmp_path), "--name", "r"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "5 sent, 5 ok, 0 errors" in out and "x0.05" in out and "TTFT <= 5000 ms" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["summary"]["ok"] == 5 and saved["meta"]["model"] == "fake-model"
    assert (tmp_path / "r.csv").is_file() and (tmp_path / "r.parquet").is_file()


def test_bench_run_replays_a_trace(fake_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = tmp_path / "t.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n0.0,40,3\n0.1,80,4\n0.2,120,2\n")
    assert main(["run", "--url", fake_url, "--trace", str(trace), "--n", "2", "--trace-speedup", "4"]) == 0
    out = capsys.readouterr().out
    assert "2 requests, trace timestamps x4" in out and "2 sent, 2 ok" in out


def test_bench_cli_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["run", "--url", "http://127.0.0.1:9", "--workload", "nope"]) == 2
    assert "unknown workload 'nope'" in capsys.readouterr().err
    assert main(["trace", str(tmp_path / "missing.csv")]) == 2
    assert "no trace file" in capsys.readouterr().err
    assert main(["run", "--url", f"http://127.0.0.1:{free_port()}", "--n", "2", "--scale", "0.01"]) == 2
    assert "is the server up" in capsys.readouterr().err


def test_bench_workloads_lists_presets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["workloads"]) == 0
    out = capsys.readouterr().out
    for name in ("azure-conv-2023", "azure-code-2023", "mooncake-conv", "short-prompt"):
        assert name in out


def test_bench_sweep_against_running_servers_writes_charts(fake_url: str, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["sweep", "--url", f"mono={fake_url}", f"1p1d={fake_url}", "--modes", "mono", "1p1d",
               "--rates", "40", "20", "--n", "3", "--workload", "short-prompt", "--scale", "0.05",
               "--slo-ttft-ms", "5000", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0 and "mono: 40 req/s, 1p1d: 40 req/s" in out  # every request within a 5 s TTFT
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["mode"], r["rate_rps"]) for r in saved["rows"]] == [("mono", 20.0), ("mono", 40.0), ("1p1d", 20.0),
                                                                  ("1p1d", 40.0)]
    for chart in ("ttft_cdf", "itl_cdf", "itl_vs_rate", "ttft_vs_rate", "goodput", "throughput_per_device", "cost",
                  "ttft_waterfall"):
        assert (tmp_path / f"sweep_{chart}.png").stat().st_size > 10_000
