from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from labkit.bench import SLO, synthetic
from labkit.bench.sweep import ModeSpec, SweepConfig, parse_mode, run_sweeps, table
from labkit.proc import free_port, pid_alive, start_process, wait_http_ok

FAKE = str(Path(__file__).with_name("fake_openai_server.py"))
# Two stand-in "modes" with known timings: the second streams 5x slower.
TIMINGS = {"mono": ("0.02", "0.004"), "1p1d": ("0.02", "0.02")}


def test_parse_mode() -> None:
    assert parse_mode("mono") == ModeSpec("mono", "mono", devices=2)
    assert parse_mode("mono-chunked").chunked_prefill
    assert parse_mode("2P1D") == ModeSpec("2p1d", "disagg", 2, 1, devices=3)
    assert parse_mode("mono", devices=8).devices == 8
    # the fair baselines: two one-device replicas behind the router, chunked prefill with its chunk in the name
    assert parse_mode("mono-dp") == ModeSpec("mono-dp", "mono", devices=2, replicas=2)
    assert parse_mode("mono-dp", devices=4).replicas == 4
    assert parse_mode("mono-chunked-512") == ModeSpec("mono-chunked-512", "mono", chunked_prefill=True, devices=2,
                                                      chunk_tokens=512)
    assert parse_mode("mono-chunked").chunk_tokens is None
    assert parse_mode("1p1d-selective-256") == ModeSpec("1p1d-selective-256", "disagg", 1, 1, devices=2,
                                                        prefill_threshold=256)
    assert all(parse_mode(m) for m in SweepConfig("short-prompt").modes)
    assert {"mono", "mono-dp", "1p1d"} <= set(SweepConfig("short-prompt").modes)
    assert any(parse_mode(m).chunked_prefill for m in SweepConfig("short-prompt").modes)
    for bad, message in (("1p1d-selective-0", "threshold >= 1"), ("mono-chunked-x", "mono-chunked-x"),
                         ("1p1d-selective", "1p1d-selective")):
        with pytest.raises(ValueError, match=message):
            parse_mode(bad)
    with pytest.raises(ValueError, match="replicas"):
        ModeSpec("x", "disagg", 1, 1, replicas=2)
    with pytest.raises(ValueError, match="'pd'"):
        parse_mode("pd")
    with pytest.raises(ValueError, match="rates_rps"):
        SweepConfig("short-prompt", rates_rps=(0.0,))
    with pytest.raises(ValueError, match="3p"):
        SweepConfig("short-prompt", modes=("3p",))
    with pytest.raises(ValueError, match="same modes"):
        run_sweeps([SweepConfig("short-prompt"), SweepConfig("short-prompt", modes=("mono",))], None)  # type: ignore[arg-type]


def test_sweep_same_requests_every_mode(tmp_path: Path) -> None:
    pids: list[int] = []
    urls: dict[str, str] = {}

    @contextlib.contextmanager
    def fake_factory(spec: ModeSpec) -> Iterator[str]:
        ttft, itl = TIMINGS[spec.name]
        port = free_port()
        child = start_process(f"fake-{spec.name}", [sys.executable, FAKE, "--port", str(port), "--ttft-s", ttft,
                                                    "--itl-s", itl], log_path=tmp_path / f"{spec.name}.log")
        pids.append(child.pid)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http_ok(url + "/health", timeout_s=30, child=child)
            yield url
            # read what the server received before it goes
            urls[spec.name] = json.dumps(httpx.get(url + "/debug/requests", trust_env=False).json())
        finally:
            child.stop()

    w = synthetic("t", (20, 60), 6)
    cfg = SweepConfig(w, rates_rps=(40.0, 20.0), modes=("mono", "1p1d"), n_requests=8, warmup_requests=1,
                      slo=SLO(itl_s=0.012), price_per_device_hour=2.0, progress=False)
    assert cfg.rates_rps == (20.0, 40.0)
    cfg2 = SweepConfig(synthetic("t2", 10, 3), rates_rps=(30.0,), modes=("mono", "1p1d"), n_requests=4,
                       warmup_requests=0, progress=False)
    res, res2 = run_sweeps([cfg, cfg2], fake_factory)
    assert len(pids) == 2 and all(not pid_alive(p) for p in pids)  # one server per mode, for both sweeps
    assert [r["workload"] for r in res2.rows] == ["t2", "t2"] and all(r["ok"] == 4 for r in res2.rows)
    assert [(r["mode"], r["rate_rps"]) for r in res.rows] == [("mono", 20.0), ("mono", 40.0), ("1p1d", 20.0),
                                                              ("1p1d", 40.0)]
    assert all(r["sent"] == 8 == r["ok"] for r in res.rows)
    # both modes saw the very same prompts (warm-up + 2 rates), rates saw different ones
    seen = {m: json.loads(v) for m, v in urls.items()}
    key = lambda g: (g["prompt_tokens"], tuple(g["first"]), g["max_tokens"])
    assert sorted(map(key, seen["mono"])) == sorted(map(key, seen["1p1d"]))
    assert len(seen["mono"]) == 1 + 8 + 8 + 4
    r20, r40 = res.runs[("mono", 20.0)], res.runs[("mono", 40.0)]
    assert [r.prompt_tokens for r in r20.records] != [r.prompt_tokens for r in r40.records]
    # the slow stand-in (20 ms gaps) misses a 12 ms ITL bound on every request: goodput 0
    assert all(r["goodput_rps"] == 0 for r in res.rows if r["mode"] == "1p1d")
    assert res.capacity_rps() ["1p1d"] is None
    row = res.rows[0]
    assert row["output_tps_per_device"] == pytest.approx(row["output_throughput_tps"] / 2)
    assert row["cost_per_m_output_tokens"] == pytest.approx(2 * 2.0 / (row["output_throughput_tps"] * 3600) * 1e6)
    loose = res.rescored(SLO(itl_s=10.0))  # the same records, a looser SLO: every request is good
    assert [r["slo_attainment"] for r in loose.rows] == [1.0] * 4 and loose.capacity_rps()["1p1d"] == 40.0
    assert [r["ok"] for r in loose.rows] == [r["ok"] for r in res.rows] and loose.config.slo.itl_s == 10.0
    mono_low = res.rows[0]
    slo = res.slo_from("mono", ttft_x=3, tpot_x=2, itl_x=4)
    assert slo.ttft_s == pytest.approx(3 * mono_low["ttft_p50_ms"] / 1000, rel=1e-2)
    assert slo.tpot_s == pytest.approx(2 * mono_low["tpot_p50_ms"] / 1000, rel=1e-2)
    assert slo.itl_s == pytest.approx(4 * mono_low["tpot_p50_ms"] / 1000, rel=1e-2) and slo.e2e_s is None
    paths = res.save(tmp_path / "out")
    saved = json.loads(paths[0].read_text())
    assert len(saved["rows"]) == 4 and "1p1d" in saved["capacity_rps_at_90pct_slo"]
    assert len(res.records_frame()) == 32
    txt = table(res.rows)
    assert txt.count("\n") == 5 and "itl_p99_ms" in txt


def test_bench_charts_have_one_line_per_mode(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from labkit.bench.loadgen import BenchResult
    from labkit.bench.metrics import RequestRecord, summarize
    from labkit.plots import bench as pb

    def run(itl: float) -> BenchResult:
        recs = []
        for i in range(10):
            r = RequestRecord(i, 10, 5, ok=True, ttft_s=0.1, itl_s=[itl] * 4, output_tokens=5)
            r.e2e_s = 0.1 + 4 * itl
            recs.append(r)
        return BenchResult(recs, summarize(recs, 1.0, SLO(itl_s=0.05)), {})

    runs = {("mono", 1.0): run(0.1), ("1p1d", 1.0): run(0.02), ("mono", 2.0): run(0.2), ("1p1d", 2.0): run(0.03)}
    from labkit.bench.sweep import summary_row

    rows = [summary_row(parse_mode(m), r, res, 1.0) for (m, r), res in runs.items()]
    fig = pb.plot_latency_cdf(runs, "itl", slo_ms=50)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "inter-token latency (ms)" and "2 req/s" in ax.get_title()
    assert len(ax.get_legend().get_texts()) == 3  # two modes + the SLO line
    assert pb.latency_values_ms(runs[("mono", 2.0)], "itl").tolist() == pytest.approx([200.0] * 40)
    fig = pb.plot_percentiles_vs_rate(rows, "itl", slo_ms=50)
    assert len(fig.axes[0].lines) == 5  # 2 modes x 2 percentiles + SLO
    fig = pb.plot_goodput_vs_rate(rows, slo_text="ITL <= 50 ms")
    lines = {ln.get_label(): ln for ln in fig.axes[0].lines}
    assert list(lines["1p1d"].get_ydata()) == [10.0, 10.0] and list(lines["mono"].get_ydata()) == [0.0, 0.0]
    pb.plot_cost(rows, price_per_device_hour=2.0).savefig(tmp_path / "c.png")
    fig = pb.plot_ratio_bars({"1 req/s": 5.0, "2 req/s": 0.5}, ylabel="x", title="t")
    assert next(p.get_facecolor()[:3] for p in fig.axes[0].patches) != [p.get_facecolor()[:3]
                                                                       for p in fig.axes[0].patches][1]
    with pytest.raises(ValueError, match="'foo'"):
        pb.latency_values_ms(runs[("mono", 1.0)], "foo")


def test_the_ttft_itl_plane_joins_the_chunked_points_into_a_curve() -> None:
    import matplotlib

    matplotlib.use("Agg")
    from labkit.plots import bench as pb

    def row(mode: str, ttft: float, itl: float, rate: float = 2.0) -> dict[str, object]:
        return {"mode": mode, "rate_rps": rate, "ttft_p50_ms": ttft, "itl_p99_ms": itl}

    rows = [row("mono", 100, 900), row("mono-chunked-512", 150, 400), row("mono-chunked-256", 250, 200),
            row("mono-dp", 300, 800), row("1p1d", 180, 60), row("1p1d", 90, 50, rate=1.0)]
    fig = pb.plot_ttft_itl_plane(rows, slo_ttft_ms=1000, slo_itl_ms=200)
    ax = fig.axes[0]
    curve, = [ln for ln in ax.lines if ln.get_label().startswith("mono-chunked")]
    # smallest chunk first, then the larger one, then plain mono (no chunking) at the end of the curve
    assert list(curve.get_xdata()) == [200, 400, 900] and list(curve.get_ydata()) == [250, 150, 100]
    points = {c.get_label(): c.get_offsets().tolist() for c in ax.collections}
    assert points == {"mono": [[900.0, 100.0]], "mono-dp": [[800.0, 300.0]], "1p1d": [[60.0, 180.0]]}
    assert sorted(t.get_text() for t in ax.texts) == ["256", "512"] and "2 req/s" in ax.get_title()
    assert ax.get_xlabel() == "ITL p99 (ms)" and ax.get_ylabel() == "TTFT p50 (ms)"
    with pytest.raises(ValueError, match="no row at 3 req/s"):
        pb.plot_ttft_itl_plane(rows, rate_rps=3.0)


def test_calibrate_measures_unloaded_latency(tmp_path: Path) -> None:
    from labkit.bench.sweep import calibrate

    pids: list[int] = []

    @contextlib.contextmanager
    def fake_factory(spec: ModeSpec) -> Iterator[str]:
        port = free_port()
        child = start_process("fake", [sys.executable, FAKE, "--port", str(port), "--ttft-s", "0.05",
                                       "--itl-s", "0.01"], log_path=tmp_path / "fake.log")
        pids.append(child.pid)
        try:
            wait_http_ok(f"http://127.0.0.1:{port}/health", timeout_s=30, child=child)
            yield f"http://127.0.0.1:{port}"
        finally:
            child.stop()

    cal_a, cal_b = calibrate(fake_factory, [synthetic("a", 20, 6), synthetic("b", 40, 11)], n=3)
    assert len(pids) == 1 and not pid_alive(pids[0])  # one server for both workloads
    assert (cal_a.workload, cal_a.mode, cal_b.workload) == ("a", "mono", "b")
    assert cal_a.ttft_s >= 0.045                       # the server waits 50 ms before the first token
    assert cal_b.e2e_s > cal_a.e2e_s                   # 10 gaps of 10 ms against 5
    assert cal_a.sequential_rps == pytest.approx(1 / cal_a.e2e_s)
    assert cal_a.rates((0.5, 1.0)) == pytest.approx((0.5 / cal_a.e2e_s, 1 / cal_a.e2e_s), rel=1e-2)
    slo = cal_a.slo(5, 3)
    assert slo.ttft_s == pytest.approx(5 * cal_a.ttft_s, rel=1e-2) and slo.tpot_s == pytest.approx(3 * cal_a.tpot_s, rel=1e-2)
