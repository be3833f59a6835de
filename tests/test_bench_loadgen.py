from __future__ import annotations

import asyncio
import json
import math
import sys
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest

from labkit.bench import SLO, Arrivals, BenchRequest, RequestRecord, build_requests, summarize
from labkit.bench.loadgen import LoadConfig, resolve_model, run_load
from labkit.bench.metrics import cost_per_million_tokens, load_records
from labkit.proc import free_port, pid_alive, start_process, wait_http_ok

FAKE = str(Path(__file__).with_name("fake_openai_server.py"))
TTFT_S, ITL_S = 0.05, 0.01


@pytest.fixture(scope="module")
def fake_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("fake") / "server.log"
    child = start_process("fake-openai", [sys.executable, FAKE, "--port", str(port), "--ttft-s", str(TTFT_S),
                                          "--itl-s", str(ITL_S)], log_path=log)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout_s=30, child=child)
        yield f"http://127.0.0.1:{port}"
    finally:
        child.stop()
        assert not pid_alive(child.pid)


def seen(url: str) -> list[dict]:
    return httpx.get(url + "/debug/requests", trust_env=False).json()


def test_metrics_follow_vllm_definitions(fake_url: str) -> None:
    before = len(seen(fake_url))
    reqs = build_requests([30, 60, 90, 120, 150, 180], [8, 8, 8, 8, 8, 1], seed=4)
    res = run_load(LoadConfig(fake_url, Arrivals("fixed", 20.0), progress=False), reqs)
    s = res.summary
    assert (s.sent, s.ok, s.errors) == (6, 6, 0)
    for r in res.records:
        assert r.ok and r.http_status == 200
        assert r.output_tokens == r.expected_output_tokens
        assert len(r.itl_s) == r.output_tokens - 1          # one gap per chunk after the first
        assert r.ttft_s >= TTFT_S * 0.9                     # the server sleeps before the first token
        assert math.isclose(r.ttft_s + sum(r.itl_s), r.e2e_s, rel_tol=1e-9)
        if r.output_tokens > 1:
            assert r.tpot_s == pytest.approx((r.e2e_s - r.ttft_s) / (r.output_tokens - 1))
    assert res.records[-1].tpot_s == 0.0  # one-token output: TPOT 0, as vLLM counts it
    # what the server received: exact prompt lengths, max_tokens, ignore_eos, streaming
    got = seen(fake_url)[before:]
    assert sorted(g["prompt_tokens"] for g in got) == [30, 60, 90, 120, 150, 180]
    assert all(g["ignore_eos"] is True and g["stream"] is True and g["model"] == "fake-model" for g in got)
    assert sorted(g["max_tokens"] for g in got) == [1, 8, 8, 8, 8, 8]
    # fixed arrivals: scheduled every 50 ms
    assert [r.scheduled_s for r in res.records] == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2, 0.25])
    assert s.mean_output_tokens == pytest.approx(41 / 6)
    assert s.latency_ms["itl"]["p50"] == pytest.approx(np.median([g for r in res.records for g in r.itl_s]) * 1000)


def test_every_request_is_accounted_for(fake_url: str, tmp_path: Path) -> None:
    normal = build_requests([20] * 4, [5] * 4, seed=1)
    bad = [BenchRequest(100 + i, (tok, 1, 2, 3), 5) for i, tok in enumerate((300, 301, 302, 303))]
    res = run_load(LoadConfig(fake_url, Arrivals("burst"), request_timeout_s=2.0, progress=False), normal + bad)
    s = res.summary
    assert s.sent == 8 == s.ok + s.errors and s.ok == 4 and s.errors == 4
    by_index = {r.index: r for r in res.records}
    assert by_index[100].http_status == 400 and "injected bad request" in by_index[100].error
    assert "timeout after 2 s" in by_index[101].error
    assert "stream error: injected worker failure" in by_index[102].error
    assert by_index[103].error and not by_index[103].ok
    assert all(r.ok for r in res.records if r.index < 100)
    assert s.slo_attainment == pytest.approx(0.5)
    paths = res.save(tmp_path, "mixed")
    meta = json.loads(paths[0].read_text())
    assert meta["summary"]["errors"] == 4 and meta["meta"]["requests"] == 8
    for p in paths[1:]:
        back = load_records(p)
        assert [r.ok for r in back] == [r.ok for r in res.records]
        assert back[0].itl_s == pytest.approx(res.records[0].itl_s, abs=1e-6)
        assert back[4].error == res.records[4].error


def test_max_concurrency_serializes(fake_url: str) -> None:
    reqs = build_requests([10] * 4, [3] * 4, seed=2)
    res = run_load(LoadConfig(fake_url, Arrivals("burst"), max_concurrency=1, progress=False), reqs)
    recs = sorted(res.records, key=lambda r: r.start_s)
    for prev, nxt in zip(recs, recs[1:]):
        assert nxt.start_s >= prev.start_s + prev.e2e_s  # the next one waits for the previous to end


def test_run_load_works_inside_a_running_event_loop(fake_url: str) -> None:
    reqs = build_requests([10, 10], [2, 2])

    async def notebook_cell() -> int:
        return run_load(LoadConfig(fake_url, Arrivals("burst"), progress=False), reqs).summary.ok

    assert asyncio.run(notebook_cell()) == 2


def test_unreachable_server_gives_errors_not_hangs() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RuntimeError, match="is the server up"):
        resolve_model(LoadConfig(url))
    reqs = build_requests([10, 10, 10], [2, 2, 2])
    res = run_load(LoadConfig(url, Arrivals("burst"), model="m", request_timeout_s=5, progress=False), reqs)
    assert (res.summary.sent, res.summary.ok, res.summary.errors) == (3, 0, 3)
    assert all("Connect" in r.error for r in res.records)


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="ftp://x"):
        LoadConfig("ftp://x")
    with pytest.raises(ValueError, match="max_concurrency"):
        LoadConfig("http://x", max_concurrency=0)
    with pytest.raises(ValueError, match="rate_rps"):
        Arrivals("poisson", 0.0)
    with pytest.raises(ValueError, match="burstiness"):
        Arrivals("gamma", 1.0, burstiness=0)
    with pytest.raises(ValueError, match="trace"):
        Arrivals("trace").times_s(2, trace_s=[None, None])
    assert LoadConfig("http://h:1").completions_url == "http://h:1/v1/completions"
    assert LoadConfig("http://h:1/v1/").completions_url == "http://h:1/v1/completions"
    assert LoadConfig("http://h:1/v1/completions").models_url == "http://h:1/v1/models"


def test_arrival_processes() -> None:
    n = 20_000
    poisson = np.diff(Arrivals("poisson", 4.0).times_s(n, seed=1))
    assert poisson.mean() == pytest.approx(0.25, rel=0.03)
    assert poisson.std() / poisson.mean() == pytest.approx(1.0, rel=0.05)     # exponential: CV 1
    bursty = np.diff(Arrivals("gamma", 4.0, burstiness=0.25).times_s(n, seed=1))
    assert bursty.mean() == pytest.approx(0.25, rel=0.05)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)       # CV = 1/sqrt(burstiness)
    even = np.diff(Arrivals("gamma", 4.0, burstiness=16).times_s(n, seed=1))
    assert even.std() / even.mean() == pytest.approx(0.25, rel=0.1)
    assert np.diff(Arrivals("fixed", 5.0).times_s(5)).tolist() == pytest.approx([0.2] * 4)
    assert (Arrivals("burst").times_s(3) == 0).all()
    assert Arrivals("trace", trace_speedup=2).times_s(3, trace_s=[1.0, 2.0, 5.0]).tolist() == [0.0, 0.5, 2.0]
    a, b = Arrivals("poisson", 1.0).times_s(10, seed=3), Arrivals("poisson", 1.0).times_s(10, seed=3)
    assert (a == b).all() and (a != Arrivals("poisson", 1.0).times_s(10, seed=4)).any()


def rec(i: int, ttft: float, itls: list[float], ok: bool = True) -> RequestRecord:
    r = RequestRecord(i, 100, len(itls) + 1, ok=ok)
    if ok:
        r.ttft_s, r.itl_s, r.output_tokens = ttft, itls, len(itls) + 1
        r.e2e_s = ttft + sum(itls)
    else:
        r.error = "HTTP 503"
    return r


def test_summary_percentiles_throughput_and_goodput() -> None:
    records = [rec(0, 0.1, [0.02] * 9), rec(1, 0.5, [0.02] * 9), rec(2, 0.1, [0.02] * 4 + [0.5] + [0.02] * 4),
               rec(3, 0.2, [0.05] * 9), rec(4, 0, [], ok=False)]
    s = summarize(records, duration_s=2.0, slo=SLO(ttft_s=0.3, tpot_s=0.04))
    assert (s.sent, s.ok, s.errors) == (5, 4, 1)
    assert s.request_throughput_rps == 2.0
    assert s.output_throughput_tps == 20.0 and s.total_token_throughput_tps == 220.0
    # request 1 misses TTFT, request 2's TPOT is (0.08*4... ) = 0.66/9 > 0.04, request 3 TPOT 0.05 misses
    assert s.goodput_rps == 0.5 and s.slo_attainment == pytest.approx(1 / 5)
    assert s.latency_ms["ttft"]["p50"] == pytest.approx(150.0)
    assert s.latency_ms["itl"]["max"] == pytest.approx(500.0)
    itls = [x for r in records[:4] for x in r.itl_s]
    assert s.latency_ms["itl"]["p99"] == pytest.approx(np.percentile(itls, 99) * 1000)
    # an ITL bound catches the single stall that TPOT averages away
    loose = summarize(records, 2.0, SLO(tpot_s=0.08))
    strict = summarize(records, 2.0, SLO(tpot_s=0.08, itl_s=0.1))
    assert loose.goodput_rps == 2.0 and strict.goodput_rps == 1.5
    flat = s.flat()
    assert flat["ttft_p99_ms"] == s.latency_ms["ttft"]["p99"] and flat["sent"] == 5
    assert "TTFT <= 300 ms" in s.slo
    with pytest.raises(ValueError, match="ttft_s"):
        SLO(ttft_s=-1)


def test_cost_per_million_tokens() -> None:
    # 2 devices at $3/h producing 1000 tok/s: $6/h / 3.6M tok/h = $1.667 per million
    assert cost_per_million_tokens(3.0, 2, 1000.0) == pytest.approx(6 / 3.6)
    assert cost_per_million_tokens(3.0, 1, 0.0) == math.inf
    with pytest.raises(ValueError, match="devices"):
        cost_per_million_tokens(3.0, 0, 10.0)
