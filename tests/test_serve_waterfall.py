"""The per-request TTFT waterfall through real servers on `tiny`, and the slow-KV flag.

- mono and 1P1D (shm): streamed requests asking for `return_waterfall`; per request, the parts add up
  to the TTFT this client measured within 5%, and the KV figures are the model's own bytes;
- 1P1D over tcp paced to 0.01 Gbit/s: every transfer is flagged against this host's measured tcp
  figure, in the usage block, the load generator's records and summary, /health, /metrics and the logs.
The flag's arithmetic and the cached reference are checked first, without a server.
"""
from __future__ import annotations

import concurrent.futures
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from labkit.links import Link
from labkit.proc import gc_frozen
from labkit.serve.launcher import ServerProcess, launch, new_kv_token, start_router, start_worker, stop_all
from labkit.serve.waterfall import PARTS
from labkit.transfer.reference import HostReference, load_reference, slow_transfer_flag

# --- the flag's arithmetic --------------------------------------------------------------------------

def test_a_transfer_is_flagged_only_when_far_and_clearly_below_the_hosts_figure() -> None:
    ref = HostReference({"tcp": Link(1e9, 0.001), "shm": Link(8e9, 0.0005)}, "2026-11-30")
    # 4 MB over tcp should take 1 ms + 4 ms = 5 ms here
    assert ref.expected_s("tcp", 4_000_000) == pytest.approx(0.005) and ref.expected_s("nixl", 1) is None
    assert slow_transfer_flag(ref, "tcp", 4_000_000, 0.045, factor=10) is None          # 9x: not far enough
    flag = slow_transfer_flag(ref, "tcp", 4_000_000, 0.4, factor=10)                      # 80x
    assert flag == ("KV moving at 0.01 GB/s over tcp (4 MB in 0.4 s); tcp measured 0.8 GB/s here for this size, "
                    "shm 4 GB/s")   # shm: 0.5 ms + 0.5 ms for 4 MB
    # a 1 kB transfer 4x over its 1 ms is under the 5 ms of scheduler noise a busy box adds: not flagged
    assert slow_transfer_flag(ref, "tcp", 1000, 0.004, factor=2) is None
    assert slow_transfer_flag(ref, "tcp", 1000, 0.0075, factor=2) is not None
    assert slow_transfer_flag(None, "tcp", 4_000_000, 9.0, factor=10) is None               # no figure: no flag
    assert slow_transfer_flag(ref, "tcp", 4_000_000, 9.0, factor=0) is None                 # 0: off
    assert slow_transfer_flag(ref, "nixl", 4_000_000, 9.0, factor=10) is None               # not measured here


def test_the_cached_reference_is_read_back_and_a_stale_one_ignored(tmp_path: Path) -> None:
    ref = HostReference({"shm": Link(2e9, 0.002, "shm", "measured")}, "2026-11-30T00:00:00+00:00")
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(ref.as_dict()))
    back = load_reference(path)
    assert back is not None and back.gb_per_s("shm", 2_000_000) == pytest.approx(2e6 / 0.003 / 1e9)
    path.write_text(json.dumps({**ref.as_dict(), "version": 0}))
    assert load_reference(path) is None and load_reference(tmp_path / "none.json") is None


# --- through real servers ------------------------------------------------------------------------------

KV_BYTES_PER_TOKEN = 2 * 4 * 2 * 64 * 4   # K and V x tiny's 4 layers x 2 KV heads x head_dim 64 x fp32


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [256] + [rng.randrange(1, 256) for _ in range(n - 1)]


def stream_one(client: httpx.Client, url: str, ids: list[int]) -> tuple[float, dict[str, Any]]:
    """(TTFT as this client saw it: first chunk carrying a choice, the usage block) of one streamed request."""
    body = {"model": "tiny", "prompt": ids, "max_tokens": 4, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, "return_waterfall": True}
    t0 = time.perf_counter()
    ttft, usage = None, None
    with client.stream("POST", url + "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            obj = json.loads(line[6:])
            if obj.get("choices") and ttft is None:
                ttft = time.perf_counter() - t0
            usage = obj.get("usage") or usage
    assert ttft is not None and usage is not None
    return ttft, usage


@pytest.fixture(scope="module")
def servers(tiny_model_dir) -> Any:
    token = new_kv_token()
    procs: list[ServerProcess] = []
    try:
        specs = [("mono", "mono0", [0, 1]), ("prefill", "prefill0", [0]), ("decode", "decode0", [1])]
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            futs = {name: ex.submit(start_worker, role, name=name, cpus=cpus, kv_token=token if role != "mono" else None,
                                    kv_cache_bytes=32 << 20) for role, name, cpus in specs}
            concurrent.futures.wait(list(futs.values()))
        w = {}
        for name, f in futs.items():
            if f.exception() is None:
                w[name] = f.result()
                procs.append(w[name])
        for f in futs.values():
            f.result()
        mono = start_router(mono=[w["mono0"]])
        procs.append(mono)
        disagg = start_router(prefill=[w["prefill0"]], decode=[w["decode0"]])
        procs.append(disagg)
        yield {"mono": mono.url, "1p1d": disagg.url}
    finally:
        stop_all(procs)


@pytest.mark.parametrize("mode", ["1p1d", "mono"])
def test_the_parts_add_up_to_the_ttft_the_client_measured(servers: Any, mode: str) -> None:
    url = servers[mode]
    # No GC pause in this client while it times (a test session's heap is large: unfrozen, one pass cost
    # 10-20 ms in 3 of 40 requests here), and long prompts (TTFT 0.15-0.5 s here): the client's own
    # overhead, which no server can see, stays under 5% of the TTFT.
    with gc_frozen(), httpx.Client(timeout=120) as client:
        stream_one(client, url, prompt(64, seed=0))                  # warm: connections, first allocations
        for i, n in enumerate((1300, 1900, 1500, 1700)):
            ttft, usage = stream_one(client, url, prompt(n, seed=100 + i + (0 if mode == "mono" else 50)))
            wf = usage["waterfall"]
            assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens", "waterfall"}
            parts = [wf[p] for p in PARTS]
            assert all(x >= 0 for x in parts), wf
            assert sum(parts) == pytest.approx(wf["ttft_s"], rel=1e-9)       # the router's own TTFT, exactly
            assert abs(sum(parts) - ttft) <= 0.05 * ttft, (sum(parts), ttft, wf)
            assert wf["prefill_s"] > wf["router_s"] and wf["prompt_tokens"] == n and wf["cached_tokens"] == 0
            if mode == "mono":
                assert wf["mode"] == "mono" and wf["kv_transfer_s"] == 0 and "kv_bytes" not in wf
                continue
            assert wf["mode"] == "disagg" and wf["kv_transport"] == "shm" and wf["kv_stream"] == "whole"
            assert wf["kv_bytes"] == n * KV_BYTES_PER_TOKEN
            assert wf["kv_window_s"] == pytest.approx(wf["kv_transfer_s"], abs=1e-9)   # whole KV: one window
            assert wf["kv_gb_per_s"] == pytest.approx(wf["kv_bytes"] / wf["kv_window_s"] / 1e9)
            assert wf["decode_admit_s"] > 0 and wf["decode_upstream"] == "decode0" and wf["upstream"] == "prefill0"


def test_a_cached_prefix_shows_and_the_openai_client_keeps_the_waterfall(servers: Any) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=servers["1p1d"] + "/v1", api_key="unused", timeout=60, max_retries=0)
    ids = prompt(300, seed=7)
    for _ in range(2):
        r = client.completions.create(model="tiny", prompt=ids, max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True, "return_waterfall": True})
    assert r.usage is not None and r.usage.completion_tokens == 3
    wf = (r.usage.model_extra or {})["waterfall"]
    assert 0 < wf["cached_tokens"] < 300 and wf["cached_tokens"] % 16 == 0      # whole blocks of the first request
    plain = client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert plain.usage is not None and not plain.usage.model_extra              # not asked: plain OpenAI usage
    text = httpx.get(servers["1p1d"] + "/metrics", timeout=10).text
    count = float(re.search(r'labkit_router_ttft_part_seconds_count\{part="kv_transfer"\} (\S+)', text).group(1))
    assert count >= 3 and 'labkit_router_kv_transfer_gb_per_s_count{transport="shm"}' in text


@pytest.mark.slow
def test_kv_over_a_slow_link_is_flagged_everywhere(tiny_model_dir) -> None:
    from labkit.bench.arrivals import Arrivals
    from labkit.bench.cli import format_summary
    from labkit.bench.loadgen import LoadConfig, run_load
    from labkit.bench.workloads import build_requests

    gbps = 0.01   # 1.25 MB/s: a 300-token KV (1.2 MB) takes about 1 s; loopback tcp here, some ms
    with launch("disagg", model="tiny", transfer="tcp", link_gbps=gbps, prefill_cpus=[0],
                decode_cpus=[1], kv_cache_bytes=32 << 20) as srv:
        reqs = build_requests([300, 300], [3, 3], seed=3)
        res = run_load(LoadConfig(srv.url, arrivals=Arrivals("burst"), max_concurrency=1, progress=False), reqs)
        assert res.summary.ok == 2 and res.summary.kv_flagged == 2
        flag = res.summary.kv_flag
        assert re.fullmatch(r"KV moving at \S+ GB/s over tcp \(1\.23 MB in \S+ s\); tcp measured \S+ GB/s here for "
                            r"this size.*", flag), flag
        assert "KV flagged on 2 request(s): KV moving at" in format_summary(res.summary)
        for rec in res.records:
            wf = rec.waterfall
            assert wf["kv_flag"].startswith("KV moving at") and wf["kv_bytes"] == 300 * KV_BYTES_PER_TOKEN
            assert wf["kv_window_s"] >= 0.9 * wf["kv_bytes"] / Link.from_gbps(gbps).bytes_per_s   # the link held it
        time.sleep(1.2)   # the router's next health poll carries the worker's flag
        health = httpx.get(srv.url + "/health", timeout=10).json()
        assert health["status"] == "ok" and health["kv_flags"]["prefill0"].startswith("KV moving at")
        worker = httpx.get(srv.worker("prefill").url + "/health", timeout=10).json()
        assert worker["kv_slow_transfers_total"] == 2 and worker["kv_flag"].startswith("KV moving at")
        text = httpx.get(srv.url + "/metrics", timeout=10).text
        assert 'labkit_router_kv_slow_transfers_total{upstream="prefill0"} 2.0' in text
        for proc in (srv.router, srv.worker("prefill")):
            assert "KV moving at" in proc.child.log_tail(), proc.name
