"""The lab's server end to end on `tiny`: real worker and router processes on 127.0.0.1.

One set of workers (a mono worker, two prefill workers, a decode worker) sits behind three
routers: mono, 1P1D and 2P1D. Every topology must give the same tokens as the engine alone.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import time

import httpx
import pytest

from labkit.proc import pid_alive
from labkit.serve.launcher import ServerProcess, new_kv_token, start_router, start_worker, stop_all

PROMPTS = ["Hello, world", "The KV cache of one request moves from prefill to decode. " * 2, "a"]


@pytest.fixture(scope="module")
def topo(tiny_model_dir):
    token = new_kv_token()
    procs: list[ServerProcess] = []
    try:
        specs = [("mono", "mono0"), ("prefill", "prefill0"), ("prefill", "prefill1"), ("decode", "decode0")]
        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            futs = {name: ex.submit(start_worker, role, name=name, kv_token=token if role != "mono" else None,
                                    kv_cache_bytes=32 << 20) for role, name in specs}
            concurrent.futures.wait(list(futs.values()))
        workers = {}
        for name, f in futs.items():
            if f.exception() is None:
                workers[name] = f.result()
                procs.append(f.result())
        for f in futs.values():
            f.result()  # raises the first startup error once every started worker is recorded
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            fr = [ex.submit(start_router, mono=[workers["mono0"]]),
                  ex.submit(start_router, prefill=[workers["prefill0"]], decode=[workers["decode0"]]),
                  ex.submit(start_router, prefill=[workers["prefill0"], workers["prefill1"]],
                            decode=[workers["decode0"]], health_interval_s=0.2)]
            routers = [f.result() for f in fr]
        procs += routers
        yield {"mono": routers[0].url, "1p1d": routers[1].url, "2p1d": routers[2].url, "procs": procs,
               "workers": workers}
    finally:
        stop_all(procs)
        assert not [p.pid for p in procs if pid_alive(p.pid)]


def complete(url: str, **body) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": "tiny", **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def stream(url: str, **body) -> tuple[list[dict], list[str]]:
    """(JSON chunks, raw data lines) of one streamed completion."""
    chunks, raw = [], []
    with httpx.stream("POST", url + "/v1/completions", json={"model": "tiny", "stream": True, **body},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                raw.append(line[6:])
                if line[6:] != "[DONE]":
                    chunks.append(json.loads(line[6:]))
    return chunks, raw


def test_greedy_output_identical_in_mono_1p1d_2p1d_and_engine(topo) -> None:
    from labkit.engine import Engine, EngineConfig, SamplingParams
    from labkit.models import ByteTokenizer

    tok = ByteTokenizer()
    ref = Engine(EngineConfig(model="tiny")).generate([tok.encode(p) for p in PROMPTS],
                                                      SamplingParams(max_tokens=20, ignore_eos=True))
    for prompt, r in zip(PROMPTS, ref):
        outs = {m: complete(topo[m], prompt=prompt, max_tokens=20, temperature=0, ignore_eos=True,
                            return_token_ids=True) for m in ("mono", "1p1d", "2p1d")}
        for m, o in outs.items():
            c = o["choices"][0]
            assert c["token_ids"] == r.output_token_ids, m
            assert c["text"] == tok.decode(r.output_token_ids), m
            assert c["finish_reason"] == "length"
            assert o["usage"] == {"prompt_tokens": len(prompt.encode()) + 1, "completion_tokens": 20,
                                  "total_tokens": len(prompt.encode()) + 21}


def test_seeded_sampling_identical_across_topologies(topo) -> None:
    body = {"prompt": [256, 10, 20, 30, 40], "max_tokens": 16, "temperature": 0.9, "top_p": 0.95, "seed": 1234,
            "ignore_eos": True, "return_token_ids": True}
    ids = {m: complete(topo[m], **body)["choices"][0]["token_ids"] for m in ("mono", "1p1d", "2p1d")}
    assert ids["mono"] == ids["1p1d"] == ids["2p1d"]
    other = complete(topo["mono"], **{**body, "seed": 99})["choices"][0]["token_ids"]
    assert other != ids["mono"]


@pytest.mark.parametrize("mode", ["mono", "1p1d"])
def test_streaming_agrees_with_non_streaming(topo, mode: str) -> None:
    body = {"prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    full = complete(topo[mode], **body)
    chunks, raw = stream(topo[mode], stream_options={"include_usage": True}, **body)
    assert raw[-1] == "[DONE]"
    token_chunks = [c for c in chunks if c["choices"]]
    assert len(token_chunks) == 12  # one chunk per token, the last one carries the finish reason
    assert "".join(c["choices"][0]["text"] for c in token_chunks) == full["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in token_chunks] == [None] * 11 + ["length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    assert len({c["id"] for c in chunks}) == 1


def test_concurrent_requests_keep_their_own_outputs(topo) -> None:
    prompts = [f"request number {i}: " + "x" * (i * 7) for i in range(12)]
    ref = [complete(topo["mono"], prompt=p, max_tokens=10, temperature=0, ignore_eos=True, return_token_ids=True)
           ["choices"][0]["token_ids"] for p in prompts]

    async def run(url: str) -> list[list[int]]:
        async with httpx.AsyncClient(timeout=60) as c:
            rs = await asyncio.gather(*(c.post(url + "/v1/completions", json={
                "prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "return_token_ids": True})
                for p in prompts))
        return [r.json()["choices"][0]["token_ids"] for r in rs]
    assert asyncio.run(run(topo["2p1d"])) == ref
    assert asyncio.run(run(topo["mono"])) == ref


def test_stop_string_and_eos_finish_reasons(topo) -> None:
    base = complete(topo["1p1d"], prompt="stop here", max_tokens=30, temperature=0, ignore_eos=True)
    text = base["choices"][0]["text"]
    printable = [i for i in range(3, len(text) - 2) if text[i:i + 2].isprintable() and "\ufffd" not in text[i:i + 2]]
    if not printable:
        pytest.skip("random weights gave no printable pair to stop on")
    i = printable[0]
    stop = text[i:i + 2]
    for m in ("mono", "1p1d"):
        got = complete(topo[m], prompt="stop here", max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
        c = got["choices"][0]
        assert c["finish_reason"] == "stop" and c["text"] == text[:text.find(stop)], m
        chunks, _ = stream(topo[m], prompt="stop here", max_tokens=30, temperature=0, ignore_eos=True, stop=stop)
        assert "".join(ch["choices"][0]["text"] for ch in chunks if ch["choices"]) == c["text"]


def test_bad_requests_get_openai_errors_and_workers_stay_up(topo) -> None:
    url = topo["2p1d"]
    cases = [
        (b"{not json", 400, "invalid_json"),
        (json.dumps({"model": "tiny"}).encode(), 400, "missing_required_parameter"),
        (json.dumps({"prompt": "x", "max_tokens": -3}).encode(), 400, "invalid_value"),
        (json.dumps({"prompt": [256] * 2040, "max_tokens": 100}).encode(), 400, "context_length_exceeded"),
        (json.dumps({"prompt": "x", "model": "gpt-9"}).encode(), 404, "model_not_found"),
        (json.dumps({"prompt": [1, 2, 99999]}).encode(), 400, "invalid_value"),
    ]
    for body, status, code in cases:
        r = httpx.post(url + "/v1/completions", content=body, headers={"content-type": "application/json"}, timeout=10)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["code"] == code and err["message"] and "type" in err and "param" in err
    r = httpx.get(url + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["message"]
    # the workers' own API validates too
    w = topo["workers"]
    r = httpx.post(w["prefill0"].url + "/internal/prefill", json={"prompt_ids": ["a"]}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_ids"
    r = httpx.post(w["decode0"].url + "/internal/decode", json={"request_id": "nobody", "timeout_s": 0.2}, timeout=10)
    assert r.status_code == 504 and r.json()["error"]["code"] == "kv_timeout"
    r = httpx.post(w["mono0"].url + "/internal/generate", json={"prompt_ids": [256, 1], "sampling": {"top_p": 7}},
                   timeout=10)
    assert r.status_code == 400 and "top_p" in r.json()["error"]["message"]
    assert all(pid_alive(p.pid) for p in topo["procs"])
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"
    assert complete(url, prompt="still fine", max_tokens=3)["usage"]["completion_tokens"] == 3


def test_openai_client_in_both_modes(topo) -> None:
    openai = pytest.importorskip("openai")
    for m in ("mono", "1p1d"):
        client = openai.OpenAI(base_url=topo[m] + "/v1", api_key="unused", timeout=60, max_retries=0)
        assert [x.id for x in client.models.list().data] == ["tiny"]
        r = client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
        parts = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=8, temperature=0, stream=True,
                                               extra_body={"ignore_eos": True}))
        assert "".join(p.choices[0].text for p in parts if p.choices) == r.choices[0].text
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="tiny", prompt="Hello", max_tokens=0)


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        m = re.match(r"^(\w+)(\{[^}]*\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        lab = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(lab.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


def test_router_is_kv_aware_and_metrics_show_it(topo) -> None:
    url = topo["2p1d"]
    before = httpx.get(url + "/metrics", timeout=10).text
    prompt = [256] + list(range(1, 200))  # 12 full blocks of 16
    for _ in range(3):
        complete(url, prompt=prompt, max_tokens=4, temperature=0)
    asyncio.run(asyncio.sleep(0.6))  # one health poll, so worker counters are fresh
    after = httpx.get(url + "/metrics", timeout=10).text
    # the 2nd and 3rd requests went to the prefill worker that caches the prompt, and said why
    hits = _metric(after, "labkit_router_prefix_hit_tokens_total") - _metric(before, "labkit_router_prefix_hit_tokens_total")
    assert hits == 2 * 12 * 16
    prefix_decisions = (_metric(after, "labkit_router_decisions_total", role="prefill", reason="prefix")
                        - _metric(before, "labkit_router_decisions_total", role="prefill", reason="prefix"))
    assert prefix_decisions == 2
    assert _metric(after, "labkit_router_decisions_total", role="decode") >= 3
    kv_bytes = _metric(after, "labkit_worker_kv_transfer_bytes_total", role="prefill")
    assert kv_bytes >= 3 * 200 * 2 * 4 * 2 * 64 * 4  # 3 requests x 200 tokens x K,V x 4 layers x 2 heads x 64 x fp32
    assert _metric(after, "labkit_worker_kv_transfer_bytes_total", role="decode") == kv_bytes
    assert _metric(after, "labkit_router_ttft_seconds_count") > _metric(before, "labkit_router_ttft_seconds_count")
    assert _metric(after, "labkit_router_itl_seconds_count") > 0
    assert _metric(after, "labkit_router_upstream_up") == 3
    assert _metric(after, "labkit_worker_kv_blocks_total", upstream="decode0") > 0
    assert "labkit_router_queue_depth 0.0" in after
    h = httpx.get(url + "/health", timeout=10).json()
    assert h["mode"] == "disagg" and {u["role"] for u in h["upstreams"].values()} == {"prefill", "decode"}


def test_interference_run_records_every_token(topo) -> None:
    from labkit.bench.interference import InterferenceScenario, run_interference

    sc = InterferenceScenario(num_decodes=3, decode_prompt_tokens=8, decode_max_tokens=600, long_prompt_tokens=300,
                              long_max_tokens=3, long_after_tokens=5, tail_tokens=6, variant=3)
    res = run_interference(topo["1p1d"], sc, label="1p1d", model="tiny")
    assert len(res.long.token_s) == 3 and res.long.finish_reason == "length"
    # the long prompt was sent only after every decode had streamed 5 tokens, and every decode
    # streamed until 6 tokens after the long prompt finished, then the client closed it
    assert all(t.token_s[4] <= res.long.sent_s for t in res.decodes)
    assert res.decodes_covered_prefill
    for t in res.decodes:
        assert t.finish_reason == "client_stopped"
        assert sum(ts > res.long.token_s[-1] for ts in t.token_s) in range(5, 7)
    st = res.stats()
    assert st["long_ttft_ms"] > 0 and st["decode_itl_mean_ms"] > 0
    # the router aborted the closed streams: nothing left running on the workers
    time.sleep(1.0)
    h = httpx.get(topo["workers"]["decode0"].url + "/health", timeout=10).json()
    assert h["running_requests"] == 0 and h["kv_blocks_used"] == 0


@pytest.mark.vllm
def test_vllm_bench_serve_completes_in_both_modes(topo, tiny_model_dir) -> None:
    from labkit.vllm.bench_serve import run_vllm_bench

    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        futs = {m: ex.submit(run_vllm_bench, topo[m], model="tiny", tokenizer=str(tiny_model_dir), num_prompts=8,
                             input_len=48, output_len=12, timeout_s=400) for m in ("mono", "1p1d")}
        results = {m: f.result() for m, f in futs.items()}
    for m, res in results.items():
        assert (res["completed"], res["failed"]) == (8, 0), m
        assert res["total_output_tokens"] == 8 * 12, m  # usage.completion_tokens, as vLLM's server reports it
        assert res["mean_ttft_ms"] > 0 and res["mean_itl_ms"] > 0, m


_GREEDY: dict[str, list[int]] = {}


def _greedy(prompt: list[int]) -> list[int]:
    """The engine's own greedy tokens for `prompt` (12, EOS ignored), computed once per prompt."""
    key = ",".join(map(str, prompt))
    if key not in _GREEDY:
        from labkit.engine import Engine, EngineConfig, SamplingParams

        _GREEDY[key] = Engine(EngineConfig(model="tiny")).generate(
            [prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].output_token_ids
    return _GREEDY[key]


def _answer(url: str, body: dict, stream: bool) -> tuple[list[int], str, int]:
    """(token ids, finish reason, completion tokens) of one request; a stream's chunks concatenated."""
    if not stream:
        out = complete(url, return_token_ids=True, **body)
        c = out["choices"][0]
        return c["token_ids"], c["finish_reason"], out["usage"]["completion_tokens"]
    chunks, _ = stream_(url, body)
    ids = [t for ch in chunks if ch["choices"] for t in ch["choices"][0]["token_ids"]]
    reasons = [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]]
    assert all(r is None for r in reasons[:-1])
    return ids, reasons[-1], chunks[-1]["usage"]["completion_tokens"]


def stream_(url: str, body: dict) -> tuple[list[dict], list[str]]:
    return stream(url, return_token_ids=True, stream_options={"include_usage": True}, **body)


@pytest.mark.parametrize("case", ["stop-id-first", "stop-id-third", "stop-string", "stop-string-first",
                                  "one-token", "stop-id-and-string"])
def test_stop_semantics_identical_in_mono_and_1p1d(topo, case: str) -> None:
    """ignore_eos + stop_token_ids + stop strings: same tokens and finish reason in mono and 1P1D,
    streaming and not, and no token twice (the issue's case: the first token is a stop id)."""
    from labkit.models import ByteTokenizer

    prompt = [5, 6, 7, 8] if case == "stop-id-first" else [256] + list(b"stop semantics, everywhere")
    ref = _greedy(prompt)
    text = ByteTokenizer().decode(ref)
    body: dict = {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    expect: tuple[list[int], str] | None = None
    if case == "stop-id-first":        # mono answered 1 token, 1P1D 2 (the same one twice) before the fix
        body.update(max_tokens=4, stop_token_ids=[ref[0]])
        expect = ([ref[0]], "stop")
    elif case == "stop-id-third":
        body.update(stop_token_ids=[ref[2]])
        expect = (ref[:ref.index(ref[2]) + 1], "stop")
    elif case == "one-token":
        body.update(max_tokens=1)
        expect = (ref[:1], "length")
    else:
        pick = [i for i in range(0 if case == "stop-string-first" else 2, len(text) - 1)
                if text[i].isprintable() and text[i] != "\ufffd"]
        if not pick:
            pytest.skip("random weights gave no printable character to stop on")
        body["stop"] = [text[pick[0]]]
        if case == "stop-id-and-string":
            body["stop_token_ids"] = [ref[1]]
    answers = {(m, s): _answer(topo[m], body, s) for m in ("mono", "1p1d") for s in (False, True)}
    assert len(set(map(str, answers.values()))) == 1, answers
    ids, reason, n = answers[("mono", False)]
    assert n == len(ids) and reason in ("stop", "length")
    assert ids == ref[:len(ids)]                 # a prefix of the engine's own tokens: none repeated, none lost
    if expect is not None:
        assert (ids, reason) == expect


def test_prefill_policy_from_a_file_routes_a_real_router(topo, tmp_path) -> None:
    from labkit.proc import StartupError

    w = topo["workers"]
    policy = tmp_path / "my_policy.py"
    policy.write_text("def choose_prefill(block_hashes, candidates):\n"
                      "    return max(candidates, key=lambda c: c.name)   # always the last by name\n")
    router = start_router(prefill=[w["prefill0"], w["prefill1"]], decode=[w["decode0"]],
                          prefill_policy=f"{policy}:choose_prefill")
    try:
        for i in range(3):
            assert complete(router.url, prompt=f"policy {i}", max_tokens=3)["usage"]["completion_tokens"] == 3
        text = httpx.get(router.url + "/metrics", timeout=10).text
        assert _metric(text, "labkit_router_decisions_total", role="prefill", upstream="prefill1") == 3
        assert _metric(text, "labkit_router_decisions_total", role="prefill", upstream="prefill0") == 0
    finally:
        stop_all([router])
    with pytest.raises(StartupError, match="no file"):
        start_router(prefill=[w["prefill0"]], decode=[w["decode0"]], prefill_policy=f"{tmp_path}/nope.py:f")
