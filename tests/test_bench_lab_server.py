"""The load generator and sweep against the lab's real servers (tiny model, mono and 1P1D)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from labkit.bench import SLO, synthetic
from labkit.bench.sweep import ModeSpec, SweepConfig, lab_server_factory, run_sweep
from labkit.proc import pid_alive


@pytest.mark.slow
def test_sweep_mono_and_1p1d_on_the_lab_server() -> None:
    pids: list[int] = []
    inner = lab_server_factory("tiny")

    @contextlib.contextmanager
    def factory(spec: ModeSpec) -> Iterator[str]:
        from labkit.serve import launcher

        real_launch = launcher.launch

        def spy(*a, **k):
            srv = real_launch(*a, **k)
            pids.extend(srv.pids)
            return srv

        launcher.launch = spy
        try:
            with inner(spec) as url:
                yield url
        finally:
            launcher.launch = real_launch

    w = synthetic("lab", (40, 120), (4, 12))
    cfg = SweepConfig(w, rates_rps=(4.0,), modes=("mono", "1p1d"), n_requests=6, warmup_requests=1,
                      slo=SLO(ttft_s=60.0), request_timeout_s=60.0, progress=False)
    res = run_sweep(cfg, factory)
    assert len(pids) == 2 + 3 and all(not pid_alive(p) for p in pids)  # router + workers, all gone
    for run in res.runs.values():
        assert run.summary.sent == 6 == run.summary.ok, run.meta["first_errors"]
        for r in run.records:
            assert r.output_tokens == r.expected_output_tokens       # ignore_eos + max_tokens honoured
            assert len(r.itl_s) == r.output_tokens - 1
            assert r.prompt_tokens >= 40
    mono, pd = res.runs[("mono", 4.0)], res.runs[("1p1d", 4.0)]
    assert [r.prompt_tokens for r in mono.records] == [r.prompt_tokens for r in pd.records]


def _worker_config(pid: int) -> dict:
    """The WorkerConfig a worker process was started with (the launcher passes it as --config JSON)."""
    import json
    from pathlib import Path

    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return json.loads(argv[argv.index(b"--config") + 1])


@pytest.mark.slow
def test_the_fair_baselines_and_selective_start_as_their_names_say() -> None:
    """mono-dp: two mono replicas, one core each, both used under concurrent load; mono-chunked-64: a chunked
    engine with a 64-token step budget; 1p1d-selective-40: decode worker with local_prefill, router threshold."""
    import concurrent.futures
    import os

    import httpx

    from labkit.bench.sweep import parse_mode
    from labkit.serve import launcher

    cores = sorted(os.sched_getaffinity(0))
    started: list[launcher.Server] = []
    real_launch = launcher.launch

    def spy(*a, **k):
        srv = real_launch(*a, **k)
        started.append(srv)
        return srv

    factory = lab_server_factory("tiny", kv_cache_bytes=32 << 20)
    launcher.launch = spy
    try:
        with factory(parse_mode("mono-dp")) as url:
            srv = started[-1]
            monos = [w for w in srv.workers if w.role == "mono"]
            assert len(monos) == 2 == len(srv.workers)
            if len(cores) >= 2:
                assert [sorted(os.sched_getaffinity(w.pid)) for w in monos] == [[c] for c in cores[:2]]

            def ask(i: int) -> int:
                r = httpx.post(url + "/v1/completions", timeout=60, json={
                    "model": "tiny", "prompt": [1 + i] * 200, "max_tokens": 24, "ignore_eos": True})
                return r.status_code

            with concurrent.futures.ThreadPoolExecutor(4) as ex:
                assert list(ex.map(ask, range(4))) == [200] * 4
            served = [httpx.get(w.url + "/health", timeout=10).json()["prefill_tokens_total"] for w in monos]
            assert all(n >= 200 for n in served), served   # the router spread them: both replicas prefilled
        with factory(parse_mode("mono-chunked-64")) as url:
            cfg = _worker_config(started[-1].workers[0].pid)
            assert cfg["engine"]["max_num_batched_tokens"] == 64 and cfg["chunked_prefill"] is True
        with factory(parse_mode("1p1d-selective-40")) as url:
            srv = started[-1]
            assert _worker_config(srv.worker("decode").pid)["local_prefill"] is True
            assert _worker_config(srv.worker("prefill").pid)["local_prefill"] is False
            r = httpx.post(url + "/v1/completions", timeout=60, json={"model": "tiny", "prompt": [5] * 10,
                                                                      "max_tokens": 4})
            assert r.status_code == 200
            assert httpx.get(srv.worker("prefill").url + "/health", timeout=10).json()["prefill_tokens_total"] == 0
    finally:
        launcher.launch = real_launch
    assert started and all(not pid_alive(p) for s in started for p in s.pids)
