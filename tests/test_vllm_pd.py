"""vLLM tier, end to end on this CPU: vLLM prefill + decode (NixlConnector) behind the lab's router.

One module-scoped stack shared by every test (start-up is the expensive part, about a minute
on 2 cores): a vLLM prefill server and a vLLM decode server, each pinned to its own core, a
vLLM monolithic server, and two lab routers (`--backend vllm`) in front of them. Every
process is stopped by PID at the end and checked gone.
"""
from __future__ import annotations

import asyncio
import json
import math
import random
from dataclasses import dataclass, replace
from typing import Any, Iterator

import httpx
import pytest

from labkit.proc import pid_alive
from labkit.vllm.launch import VllmPD, VllmServer, VllmServerConfig, pd_configs, start_server, usable_cpus
from labkit.vllm.metrics import read_nixl

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

MAX_MODEL_LEN = 1024
N_REQUESTS = 8
MAX_TOKENS = 12


@dataclass
class Stack:
    pd: VllmPD
    mono: VllmServer
    pd_router: Any      # labkit.serve.launcher.ServerProcess
    mono_router: Any


def prompts(n: int, seed: int) -> list[list[int]]:
    """`n` byte-token prompts (BOS first) of 40 to 400 tokens: one to four 128-token vLLM CPU blocks."""
    rng = random.Random(seed)
    return [[256] + [rng.randrange(256) for _ in range(rng.randrange(40, 400))] for _ in range(n)]


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Any) -> Iterator[Stack]:
    from labkit.serve.launcher import start_router

    base = VllmServerConfig(model="tiny", max_model_len=MAX_MODEL_LEN, kv_cache_gib=1, max_num_seqs=16,
                            startup_timeout_s=600)
    p_cfg, d_cfg = pd_configs(base)
    servers: list[VllmServer] = []
    routers: list[Any] = []
    try:
        # All three load at once: start-up is mostly imports and model load, done in parallel.
        for cfg in (p_cfg, d_cfg, replace(base, role="mono")):
            servers.append(start_server(cfg))
        for s in servers:
            s.wait_ready()
        p, d, mono = servers
        routers.append(start_router(model="tiny", prefill=[p.url], decode=[d.url], backend="vllm",
                                    startup_timeout_s=120))
        routers.append(start_router(model="tiny", mono=[mono.url], backend="vllm", startup_timeout_s=120))
        yield Stack(VllmPD(p, d), mono, routers[0], routers[1])
    finally:
        pids = [pid for s in servers for pid in s.pids()] + [r.pid for r in routers]
        for r in routers:
            r.stop()
        left = [pid for s in servers for pid in s.stop()]
        left += [pid for pid in pids if pid_alive(pid)]
        assert not left, f"processes still alive after stop: {sorted(set(left))}"


def complete(url: str, prompt: list[int], **kw: Any) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.0,
            "ignore_eos": True, "return_token_ids": True, **kw}
    r = httpx.post(url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


async def complete_all(url: str, ps: list[list[int]]) -> list[dict[str, Any]]:
    """Sends every prompt at once (the router and vLLM batch them)."""
    async with httpx.AsyncClient(timeout=180) as client:
        async def one(p: list[int]) -> dict[str, Any]:
            r = await client.post(url + "/v1/completions", json={
                "model": "tiny", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
                "return_token_ids": True})
            assert r.status_code == 200, r.text
            return r.json()
        return list(await asyncio.gather(*(one(p) for p in ps)))


def test_each_server_computes_on_its_own_core(stack: Stack) -> None:
    if len(usable_cpus()) < 2:
        pytest.skip("one usable core: prefill and decode share it")
    p_cores = set().union(*stack.pd.prefill.affinity().values())
    d_cores = set().union(*stack.pd.decode.affinity().values())
    assert p_cores == set(stack.pd.prefill.cfg.cpus or ())
    assert d_cores == set(stack.pd.decode.cfg.cpus or ())
    assert not p_cores & d_cores


def test_eight_requests_through_router_move_kv_and_match_mono(stack: Stack) -> None:
    ps = prompts(N_REQUESTS, seed=7)
    d_before = read_nixl(stack.pd.decode.url)
    p_before = read_nixl(stack.pd.prefill.url)
    pd_out = asyncio.run(complete_all(stack.pd_router.url, ps))
    d_after = read_nixl(stack.pd.decode.url)
    mono_out = asyncio.run(complete_all(stack.mono_router.url, ps))

    delta = d_after - d_before
    assert delta.transfers >= N_REQUESTS, f"decode server saw {delta.transfers} NIXL transfers for {N_REQUESTS} requests"
    assert delta.failed_transfers == 0
    # Whole blocks move: at least every prompt token's K and V (4 layers x 2 kv heads x 64 x 2 x 4 B = 4096 B).
    kv_bytes_per_token = 4 * 2 * 64 * 2 * 4
    assert delta.bytes_transferred >= sum(len(p) for p in ps) * kv_bytes_per_token
    assert delta.xfer_time_s > 0
    # The prefill server only serves reads: its transfer histogram stays empty.
    assert (read_nixl(stack.pd.prefill.url) - p_before).transfers == 0

    for p, a, b in zip(ps, pd_out, mono_out):
        ta, tb = a["choices"][0]["token_ids"], b["choices"][0]["token_ids"]
        assert len(ta) == MAX_TOKENS and a["usage"]["completion_tokens"] == MAX_TOKENS
        assert a["usage"]["prompt_tokens"] == len(p)
        assert ta == tb, f"P/D and mono differ for a {len(p)}-token prompt: {ta} vs {tb}"


def test_streaming_through_router_pd(stack: Stack) -> None:
    p = prompts(1, seed=11)[0]
    ref = complete(stack.mono.url, p)["choices"][0]["token_ids"]
    body = {"model": "tiny", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0.0, "ignore_eos": True,
            "stream": True, "return_token_ids": True, "stream_options": {"include_usage": True}}
    ids: list[int] = []
    finish, usage = None, None
    with httpx.stream("POST", stack.pd_router.url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            msg = json.loads(line[6:])
            assert "error" not in msg, msg
            for ch in msg.get("choices") or []:
                ids += ch.get("token_ids") or []
                finish = ch.get("finish_reason") or finish
            usage = msg.get("usage") or usage
    assert ids == ref
    assert finish == "length"
    assert usage is not None and usage["completion_tokens"] == MAX_TOKENS


def test_bad_requests_get_openai_errors(stack: Stack) -> None:
    # Caught by the router itself.
    r = httpx.post(stack.pd_router.url + "/v1/completions",
                   json={"model": "tiny", "prompt": [256, 65], "max_tokens": 4, "temperature": -1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    # Fits the router's view of the model (2048) but not vLLM's --max-model-len (1024): vLLM's
    # prefill server refuses it, and the router passes its 400 on.
    r = httpx.post(stack.pd_router.url + "/v1/completions",
                   json={"model": "tiny", "prompt": [256] + [65] * 1100, "max_tokens": 4}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    # The pair still serves afterwards.
    assert len(complete(stack.pd_router.url, [256, 72, 105])["choices"][0]["token_ids"]) == MAX_TOKENS


def test_greedy_equality_lab_engine_vs_vllm(stack: Stack) -> None:
    from labkit.vllm.greedy import check_greedy

    ps = prompts(4, seed=3)
    results = check_greedy(stack.mono.url, ps, max_tokens=16, model="tiny")
    for r in results:
        print(r.as_row())
    assert all(r.equal for r in results), [r.as_row() for r in results]
    # Random weights give flat logits, but not so flat that every position is a tie.
    assert sum(len(r.near_ties) for r in results) < sum(len(r.lab_tokens) for r in results) // 2


def test_the_simulator_predicts_vllm_pd_from_a_probe(stack: Stack) -> None:
    """The report card's vLLM P/D slot: a probe fits vLLM's model from outside (TTFT and TPOT of
    requests, the link NIXL achieved), then measured runs are replayed against it."""
    from labkit.bench.sweep import fixed_url_factory
    from labkit.plan.card import METRICS
    from labkit.plan.validate import measure_and_compare_vllm

    fitted: dict[str, Any] = {}
    links: dict[str, Any] = {}
    serving: dict[str, Any] = {}
    rows = measure_and_compare_vllm(
        "tiny", rates_rps=(4.0,), n_requests=6, scale=0.05, progress=False, probe_requests=4,
        fitted=fitted, links=links, serving=serving,
        factory=fixed_url_factory({"1p1d": stack.pd_router.url}),
        servers={"vllm-pd": [stack.pd.prefill, stack.pd.decode]},
    )
    assert {r.metric for r in rows} == set(METRICS) and {r.mode for r in rows} == {"vllm-pd"}
    for r in rows:   # every figure predicted and measured
        assert r.measured > 0 and r.predicted > 0 and math.isfinite(r.error), r
    m = fitted["vllm-pd"]
    assert m.prefill_s(64) > 0 and m.decode_step_s(1, 64) > 0 and m.decode_c_s_per_seq == 0.0
    assert links["vllm-pd"].bytes_per_s > 0 and links["vllm-pd"].how == "measured"
    assert len(serving["vllm-pd"]) == 3 and min(serving["vllm-pd"]) >= 0
    # A mode the card does not hold for vLLM is refused before anything is sent.
    with pytest.raises(ValueError, match="not a vLLM mode"):
        measure_and_compare_vllm("tiny", rates_rps=(1.0,), n_requests=2, modes=("1p1d",))
