"""Layer-wise KV streaming (`--kv-stream layers`) on real processes (tiny model, tcp transport).

One decode worker behind two routers: one with a prefill worker that sends the KV whole after
the prefill, one with a prefill worker that sends each layer as soon as the engine computed it.
Both must give the engine's own tokens, and in the layer-wise one the first layer must have
left before the prefill ended (the overlap the mode exists for).
"""
from __future__ import annotations

import concurrent.futures
from typing import Any

import httpx
import pytest

from labkit.proc import pid_alive
from labkit.serve.launcher import ServerProcess, new_kv_token, start_router, start_worker, stop_all
from labkit.serve.messages import TokenEvent

LONG = [256] + [1 + (7 * i + i * i % 13) % 250 for i in range(1499)]   # 1,500 tokens: a prefill of many ms


@pytest.fixture(scope="module")
def topo(tiny_model_dir: Any) -> Any:
    token = new_kv_token()
    procs: list[ServerProcess] = []
    try:
        specs = {"decode": {}, "prefill-whole": {"kv_stream": "whole"}, "prefill-layers": {"kv_stream": "layers"}}
        with concurrent.futures.ThreadPoolExecutor(3) as ex:
            futs = {name: ex.submit(start_worker, name.split("-")[0], name=name, kv_token=token, transfer="tcp",
                                    kv_cache_bytes=64 << 20, enable_prefix_caching=False, **kw)
                    for name, kw in specs.items()}
            concurrent.futures.wait(list(futs.values()))
        procs += [f.result() for f in futs.values() if f.exception() is None]
        w = {name: f.result() for name, f in futs.items()}
        routers = {m: start_router(prefill=[w[f"prefill-{m}"]], decode=[w["decode"]]) for m in ("whole", "layers")}
        procs += list(routers.values())
        yield {"workers": w, "routers": routers}
    finally:
        stop_all(procs)
        assert not [p.pid for p in procs if pid_alive(p.pid)]


def _engine(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    from labkit.engine import Engine, EngineConfig, SamplingParams

    return [o.output_token_ids for o in Engine(EngineConfig(model="tiny")).generate(
        prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))]


def test_whole_and_layerwise_give_the_engines_tokens(topo: Any) -> None:
    prompts = [LONG, [256] + list(b"layer by layer"), [256, 65]]
    ref = _engine(prompts, 10)
    for mode, router in topo["routers"].items():
        for p, r in zip(prompts, ref):
            out = httpx.post(router.url + "/v1/completions", timeout=120, json={
                "prompt": p, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "return_token_ids": True})
            assert out.status_code == 200, out.text
            assert out.json()["choices"][0]["token_ids"] == r, mode
    h = httpx.get(topo["workers"]["prefill-layers"].url + "/health", timeout=10).json()
    assert h["kv_stream"] == "layers" and h["kv_transfer_bytes_total"] > 0


def test_the_first_layer_leaves_before_the_prefill_ends(topo: Any) -> None:
    w = topo["workers"]
    endpoint = httpx.get(w["decode"].url + "/health", timeout=10).json()["kv_endpoint"]
    prompt = [256, 3] + LONG[2:]                 # not the prompt above: a prefill of every token
    sampling = {"max_tokens": 6, "ignore_eos": True}
    res = {}
    for mode in ("whole", "layers"):
        rid = f"by-hand-{mode}"
        r = httpx.post(w[f"prefill-{mode}"].url + "/internal/prefill", timeout=120, json={
            "request_id": rid, "prompt_ids": prompt, "sampling": sampling, "kv_endpoint": endpoint})
        assert r.status_code == 200, r.text
        res[mode] = r.json()
        lines = httpx.post(w["decode"].url + "/internal/decode", timeout=120,
                           json={"request_id": rid, "sampling": sampling}).text.splitlines()
        res[mode]["tokens"] = [res[mode]["first_token_id"]] + [TokenEvent.model_validate_json(x).token_id
                                                               for x in lines]
    layers = res["layers"]
    sent = layers["layer_sent_s"]
    assert len(sent) == 4 and sent == sorted(sent)          # tiny has 4 layers, sent in order
    assert sent[0] < layers["prefill_s"], layers             # the overlap: layer 0 left mid-prefill
    assert layers["kv_bytes"] == res["whole"]["kv_bytes"] == len(prompt) * 2 * 4 * 2 * 64 * 4
    assert res["whole"]["layer_sent_s"] == [] and res["whole"]["kv_stream"] == "whole"
    assert res["whole"]["tokens"] == layers["tokens"] == _engine([prompt], 6)[0]


def test_a_first_token_that_ends_the_request_cuts_the_layer_stream(topo: Any) -> None:
    first = _engine([[256, 9, 9, 9]], 1)[0][0]
    router = topo["routers"]["layers"]
    out = httpx.post(router.url + "/v1/completions", timeout=120, json={
        "prompt": [256, 9, 9, 9], "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stop_token_ids": [first],
        "return_token_ids": True}).json()
    assert out["choices"][0]["token_ids"] == [first] and out["choices"][0]["finish_reason"] == "stop"
    h = httpx.get(topo["workers"]["decode"].url + "/health", timeout=10).json()
    assert h["kv_blocks_used"] == 0 and h["running_requests"] == 0   # nothing was adopted
