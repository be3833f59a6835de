"""The router and the lab backend in one process, against fake workers (httpx ASGI transports).

Each fake speaks the workers' internal protocol (labkit.serve.messages) and records what it
was sent, so the routing rules, retries, error mapping and stop handling run in seconds,
without a model or a process. The process-level suites (test_serve_e2e, test_bad_input,
test_faults) keep covering the real path end to end.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from labkit.serve.config import RouterConfig
from labkit.serve.messages import (
    DecodeRequest,
    GenerateRequest,
    PrefillRequest,
    PrefillResult,
    TokenEvent,
    WorkerHealth,
)
from labkit.serve.routing import PrefillCandidate, load_policy, prefix_then_load

TOKENS = [72, 105, 33, 10, 65, 66, 67, 68]   # "Hi!\nABCD" in the lab's byte tokenizer


class FakeWorker:
    """A worker stand-in: its /health says what the test sets; its answers are scripted."""

    def __init__(self, role: str, name: str, **health: Any) -> None:
        self.role, self.name = role, name
        self.health = {"block_size": 16, "max_model_len": 2048, "running_requests": 0, "kv_blocks_free": 100,
                       "kv_blocks_total": 100, **health}
        self.seen: list[Any] = []
        self.first_finish: str | None = None        # prefill: the engine says the first token ends it
        self.error: tuple[int, dict[str, Any]] | None = None
        self.lines: list[bytes] | None = None       # decode/generate: raw lines instead of TOKENS

    @property
    def url(self) -> str:
        return f"http://{self.name}"

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            h = WorkerHealth(status="ok", role=self.role, name=self.name, model="tiny", pid=1, model_fingerprint="f",
                             policy="p", transfer="shm", kv_stream="whole",
                             kv_endpoint="shm://fake" if self.role == "decode" else None, kv_blocks_used=0,
                             prefill_tokens_total=0, decode_tokens_total=0, kv_transfer_bytes_total=0,
                             kv_transfer_seconds_total=0.0, engine_errors_total=0, **self.health)
            return Response(h.model_dump_json(), media_type="application/json")

        def tokens(n: int, first: int = 0) -> Response:
            if self.lines is not None:
                return Response(b"".join(self.lines), media_type="application/x-ndjson")
            ids = TOKENS[first:n]
            return Response(b"".join(TokenEvent(token_id=t, finish_reason="length" if i == len(ids) - 1 else None)
                                     .line() for i, t in enumerate(ids)), media_type="application/x-ndjson")

        @app.post("/internal/generate")
        async def generate(request: Request) -> Response:
            req = GenerateRequest.model_validate_json(await request.body())
            self.seen.append(req)
            return self._error() or tokens(req.sampling.max_tokens)

        @app.post("/internal/prefill")
        async def prefill(request: Request) -> Response:
            req = PrefillRequest.model_validate_json(await request.body())
            self.seen.append(req)
            end = self.first_finish or ("length" if req.sampling.max_tokens == 1 else None)
            res = PrefillResult(request_id=req.request_id, first_token_id=TOKENS[0], finish_reason=end,  # type: ignore[arg-type]
                                num_prompt_tokens=len(req.prompt_ids), prefill_s=0.01)
            return self._error() or Response(res.model_dump_json(), media_type="application/json")

        @app.post("/internal/decode")
        async def decode(request: Request) -> Response:
            req = DecodeRequest.model_validate_json(await request.body())
            self.seen.append(req)
            return self._error() or tokens(req.sampling.max_tokens, first=1)
        return app

    def _error(self) -> Response | None:
        return None if self.error is None else JSONResponse(self.error[1], status_code=self.error[0])


class Net(httpx.AsyncBaseTransport):
    """Sends each request to the fake its host names; `down[host]`: raise that httpx error instead."""

    def __init__(self, fakes: list[FakeWorker]) -> None:
        self.apps = {f.name: httpx.ASGITransport(app=f.app()) for f in fakes}
        self.down: dict[str, type[httpx.HTTPError]] = {}

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if host in self.down:
            raise self.down[host](f"{host} is down", request=request)  # type: ignore[call-arg]  # transport errors take a request
        return await self.apps[host].handle_async_request(request)


def serve(fakes: list[FakeWorker], body: Any, *, policy: str = "prefix-then-load",
          down: dict[str, type[httpx.HTTPError]] | None = None, after: Any = None, **settings: Any) -> Any:
    """Starts a router over `fakes` in this process, posts `body` (or each of a list) to /v1/completions;
    returns the responses (and `after(router)`'s value, when given). A list item that is an async
    function runs with the router, between two requests. `settings`: more RouterConfig fields."""
    from labkit.serve.router import create

    roles = {r: tuple(f.url for f in fakes if f.role == r) for r in ("mono", "prefill", "decode")}
    cfg = RouterConfig(model="tiny", names=tuple(f.name for r in roles for f in fakes if f.role == r),
                       prefill_policy=policy, health_interval_s=3600, **roles, **settings)
    net = Net(fakes)

    async def go() -> Any:
        router, app = create(cfg, transport=net)
        await router.backend.start()
        net.down.update(down or {})
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://router") as c:
                out = []
                for b in body if isinstance(body, list) else [body]:
                    if callable(b):
                        await b(router)
                    else:
                        out.append(await c.post("/v1/completions", json={"model": "tiny", **b}))
                return (out, after(router)) if after else out
        finally:
            await router.backend.close()
    return asyncio.run(go())


def sse_tokens(r: httpx.Response) -> tuple[list[list[int]], list[Any]]:
    """(token ids of each chunk with a choice, finish reasons) of an SSE answer; asserts [DONE] ends it."""
    data = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    with_choice = [c["choices"][0] for c in chunks if c.get("choices")]
    return [c.get("token_ids", []) for c in with_choice], [c["finish_reason"] for c in with_choice]


@pytest.fixture(autouse=True)
def _model(tiny_model_dir: Any) -> None:
    """The router loads the tiny model's tokenizer and config."""


def test_prefill_goes_where_the_prefix_is_cached_then_by_load() -> None:
    p0, p1, d = FakeWorker("prefill", "p0"), FakeWorker("prefill", "p1", running_requests=1), FakeWorker("decode", "d")
    shared = [256] + list(range(1, 48))             # three full blocks of 16

    async def p0_gets_busy(router: Any) -> None:
        p0.health["running_requests"] = 5
        for u in router.backend.pool.upstreams:
            await router.backend.pool.poll(u)
    bodies = [{"prompt": shared + [60], "max_tokens": 3},          # p0: less loaded
              p0_gets_busy,
              {"prompt": shared + [61, 62], "max_tokens": 3},      # p0 although busier: it caches the three blocks
              {"prompt": [256] + list(range(100, 140)), "max_tokens": 3}]   # no prefix: the less loaded, p1
    out, text = serve([p0, p1, d], bodies, after=lambda r: r.metrics.render().decode())
    assert [r.status_code for r in out] == [200, 200, 200]
    assert [len(m.prompt_ids) for m in p0.seen] == [49, 50] and [len(m.prompt_ids) for m in p1.seen] == [41]
    assert 'labkit_router_decisions_total{reason="prefix",role="prefill",upstream="p0"} 1.0' in text
    assert 'labkit_router_decisions_total{reason="load",role="prefill",upstream="p1"} 1.0' in text
    assert 'labkit_router_prefix_hit_tokens_total{upstream="p0"} 48.0' in text
    assert [r.json()["choices"][0]["text"] for r in out] == ["Hi!"] * 3
    assert all(isinstance(m, DecodeRequest) for m in d.seen) and len(d.seen) == 3


def test_block_size_and_context_length_come_from_the_workers() -> None:
    fakes = [FakeWorker("mono", "m0", block_size=8, max_model_len=64)]
    bodies = [{"prompt": [256] * 60, "max_tokens": 5}, {"prompt": [256] * 60, "max_tokens": 4}]
    out, backend = serve(fakes, bodies, after=lambda r: r.backend)
    err = out[0].json()["error"]
    assert out[0].status_code == 400 and (err["param"], err["code"]) == ("max_tokens", "context_length_exceeded")
    assert "64" in err["message"] and out[1].status_code == 200
    assert backend.block_size == 8 and backend.index.num_blocks("m0") == 60 // 8


def test_a_worker_with_another_block_size_is_taken_out() -> None:
    fakes = [FakeWorker("mono", "m0"), FakeWorker("mono", "m1", block_size=32)]
    out, pool = serve(fakes, [{"prompt": "hello", "max_tokens": 2}] * 3, after=lambda r: r.backend.pool)
    assert [r.status_code for r in out] == [200] * 3
    assert len(fakes[0].seen) == 3 and not fakes[1].seen
    m1 = next(u for u in pool.upstreams if u.name == "m1")
    assert not m1.up and "block_size 32" in m1.last_error


def test_a_dead_prefill_worker_is_retried_on_another_and_marked_down() -> None:
    p0, p1, d = FakeWorker("prefill", "p0"), FakeWorker("prefill", "p1"), FakeWorker("decode", "d")
    out, pool = serve([p0, p1, d], {"prompt": "hi", "max_tokens": 3}, down={"p0": httpx.ConnectError},
                      after=lambda r: r.backend.pool)
    assert out[0].status_code == 200 and out[0].json()["usage"]["completion_tokens"] == 3
    assert len(p1.seen) == 1 and not next(u for u in pool.upstreams if u.name == "p0").up


def test_a_dead_mono_worker_is_retried_on_another() -> None:
    m0, m1 = FakeWorker("mono", "m0"), FakeWorker("mono", "m1")
    out = serve([m0, m1], {"prompt": "hi", "max_tokens": 2, "stream": True, "return_token_ids": True},
                down={"m0": httpx.ConnectError})
    ids, reasons = sse_tokens(out[0])
    assert out[0].status_code == 200 and reasons == [None, "length"] and ids == [[72], [105]] and len(m1.seen) == 1


@pytest.mark.parametrize("role,status,error,code", [
    ("prefill", 400, {"message": "bad sampling", "type": "invalid_request_error", "param": "sampling",
                      "code": "invalid_value"}, "invalid_value"),
    ("prefill", 503, {"message": "KV transfer to x failed", "type": "service_unavailable_error", "param": None,
                      "code": "kv_transfer_failed"}, "kv_transfer_failed"),
    ("decode", 504, {"message": "no KV arrived", "type": "timeout_error", "param": None, "code": "kv_timeout"},
     "kv_timeout"),
])
def test_a_worker_error_reaches_the_client_with_its_status_and_code(role: str, status: int, error: dict[str, Any],
                                                                    code: str) -> None:
    fakes = [FakeWorker("prefill", "p"), FakeWorker("decode", "d")]
    fakes[0 if role == "prefill" else 1].error = (status, {"error": error})
    out = serve(fakes, {"prompt": "hi", "max_tokens": 3})
    assert out[0].status_code == status
    assert out[0].json()["error"]["code"] == code and out[0].json()["error"]["message"] == error["message"]


@pytest.mark.parametrize("down,status,code", [(httpx.ReadTimeout, 504, "upstream_timeout"),
                                              (httpx.ConnectError, 503, "no_upstream")])
def test_an_unreachable_decode_worker_is_a_clear_error(down: type[httpx.HTTPError], status: int, code: str) -> None:
    fakes = [FakeWorker("prefill", "p"), FakeWorker("decode", "d")]
    out = serve(fakes, [{"prompt": "hi", "max_tokens": 3}] * 2, down={"d": down})
    assert out[-1].status_code == status and out[-1].json()["error"]["code"] == code   # the 2nd: d is marked down
    assert "decode" in out[0].json()["error"]["message"]


def test_an_engine_error_mid_stream_is_an_sse_error_event() -> None:
    m = FakeWorker("mono", "m")
    m.lines = [TokenEvent(token_id=72).line(), b'{"error":{"message":"engine step failed","code":"engine_error"}}\n']
    out = serve([m], [{"prompt": "hi", "max_tokens": 5, "stream": True}, {"prompt": "hi", "max_tokens": 5}])
    data = [json.loads(x[6:]) for x in out[0].text.splitlines() if x.startswith("data: {")]
    assert data[0]["choices"][0]["text"] == "H" and "engine step failed" in data[-1]["error"]["message"]
    assert out[1].status_code == 500 and out[1].json()["error"]["code"] == "engine_error"


def test_a_garbled_worker_line_is_a_502() -> None:
    m = FakeWorker("mono", "m")
    m.lines = [b'{"token_id": "seven"}\n']
    out = serve([m], {"prompt": "hi", "max_tokens": 5})
    assert out[0].status_code == 502 and out[0].json()["error"]["code"] == "bad_upstream_reply"


def test_a_backend_that_ends_before_finishing_is_a_502_in_both_modes() -> None:
    """The router's own guard, whatever the backend: pieces that stop before one finishes are a 502 (JSON,
    or an SSE error event after what was streamed), counted by outcome."""
    from labkit.serve.backend import Piece
    from labkit.serve.router import Router, build_app
    from labkit.serve.upstream import UpstreamPool

    class Truncated:
        uses_token_ids = True
        pool = UpstreamPool([], health_interval_s=3600)

        def context_len(self) -> None:
            return None

        async def generate(self, req: Any, prompt_ids: Any, request_id: str) -> Any:
            yield Piece("H", 1, (72,))

    router = Router(RouterConfig(model="tiny", mono=("http://unused",)), backend=Truncated())  # type: ignore[arg-type]

    async def go() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=build_app(router))
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as c:
            return [await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 4, "stream": s})
                    for s in (False, True)]

    whole, streamed = asyncio.run(go())
    assert whole.status_code == 502 and whole.json()["error"]["message"] == "the backend ended before finishing"
    data = [x[6:] for x in streamed.text.splitlines() if x.startswith("data: ")]
    assert json.loads(data[0])["choices"][0]["text"] == "H" and data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["message"] == "the backend ended before finishing"
    count = router.metrics.registry.get_sample_value  # None: that outcome was never counted
    outcomes = {o: count("labkit_router_requests_total", {"outcome": o}) or 0 for o in ("http_502", "stream_error_502", "ok")}
    assert outcomes == {"http_502": 1, "stream_error_502": 1, "ok": 0}


@pytest.mark.parametrize("stream", [False, True])
def test_when_the_first_token_ends_the_request_decode_is_never_called(stream: bool) -> None:
    p, d = FakeWorker("prefill", "p"), FakeWorker("decode", "d")
    p.first_finish = "stop"
    out = serve([p, d], {"prompt": "hi", "max_tokens": 8, "stream": stream, "return_token_ids": True})
    if stream:
        assert sse_tokens(out[0]) == ([[TOKENS[0]]], ["stop"])
    else:
        c = out[0].json()["choices"][0]
        assert (c["token_ids"], c["finish_reason"], out[0].json()["usage"]["completion_tokens"]) == ([72], "stop", 1)
    assert not d.seen


def test_a_stop_string_ends_the_request_at_the_router_in_both_modes() -> None:
    for fakes in ([FakeWorker("mono", "m")], [FakeWorker("prefill", "p"), FakeWorker("decode", "d")]):
        out = serve(fakes, {"prompt": "hi", "max_tokens": 8, "stop": ["!"], "return_token_ids": True})
        c = out[0].json()["choices"][0]
        assert (c["text"], c["finish_reason"], c["token_ids"]) == ("Hi", "stop", TOKENS[:3])


def test_the_policy_chooses_and_a_bad_choice_is_a_500(tmp_path: Path) -> None:
    (tmp_path / "pol.py").write_text("def last(hashes, cands):\n    return cands[-1]\n"
                                     "def stranger(hashes, cands):\n    return 'p0'\n")
    fakes = [FakeWorker("prefill", "p0"), FakeWorker("prefill", "p1"), FakeWorker("decode", "d")]
    out = serve(fakes, [{"prompt": "hi", "max_tokens": 2}] * 2, policy=f"{tmp_path / 'pol.py'}:last")
    assert [r.status_code for r in out] == [200, 200] and len(fakes[1].seen) == 2 and not fakes[0].seen
    out = serve(fakes, {"prompt": "hi", "max_tokens": 2}, policy=f"{tmp_path / 'pol.py'}:stranger")
    err = out[0].json()["error"]
    assert out[0].status_code == 500 and err["code"] == "routing_policy_error" and "not one of the candidates" in err["message"]


def test_prefix_then_load_rule() -> None:
    c = [PrefillCandidate("a", 0, 0, 10, 10), PrefillCandidate("b", 2, 5, 1, 10), PrefillCandidate("c", 2, 1, 3, 10),
         PrefillCandidate("d", 2, 1, 9, 10)]
    assert prefix_then_load([b"x"] * 3, c).name == "d"        # longest prefix, then load, then free blocks
    assert prefix_then_load([], c[:1]).name == "a"


@pytest.mark.parametrize("spec,message", [
    ("fastest", "not a registered name"), ("no/such/file.py:f", "no file"), ("labkit.nothing:f", "cannot import"),
    ("labkit.serve.routing:nothing", "has no 'nothing'"), ("labkit.serve.routing:POLICIES", "must be a callable"),
    ("labkit.serve.routing:load_spec", "must be a callable"),
])
def test_a_bad_policy_spec_says_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_policy(spec)


def test_backends_resolve_by_name_and_serve_imports_no_vllm() -> None:
    code = ("import sys, labkit.serve.router as r, labkit.serve.launcher\n"
            "assert not [m for m in sys.modules if m.startswith('labkit.vllm')], 'serve imported labkit.vllm'\n"
            "from labkit.serve.routing import load_spec\n"
            "print(load_spec('vllm', r.BACKENDS, 'backend').__module__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "labkit.vllm.pd_backend", out.stderr[-2000:]
    from labkit.serve.metrics import RouterMetrics
    from labkit.serve.router import RouterConfig, make_backend

    with pytest.raises(ValueError, match="backend 'sglang'"):
        make_backend(RouterConfig(mono=("http://m",), backend="sglang"), RouterMetrics(), None)


# --- the named policies, with numbers -------------------------------------------------------------

def cand(name: str, matched: int = 0, in_flight: int = 0, *, free: int = 100, active: int = 0, cached: int = 0,
         prompt: int = 160, bs: int = 16) -> PrefillCandidate:
    return PrefillCandidate(name, matched, in_flight, free, 100, active_blocks=active, cached_blocks=cached,
                            prompt_tokens=prompt, block_size=bs)


def test_round_robin_takes_each_worker_in_turn_and_starts_fresh_per_router() -> None:
    c = [cand("a", matched=9), cand("b"), cand("c")]
    rr = load_policy("round-robin")
    assert [rr([], c).name for _ in range(7)] == ["a", "b", "c", "a", "b", "c", "a"]
    assert load_policy("round-robin")([], c).name == "a"      # a new router, a new cycle


def test_least_load_ignores_the_cache() -> None:
    c = [cand("a", matched=10, in_flight=3), cand("b", in_flight=1, free=2), cand("c", in_flight=1, free=9)]
    assert load_policy("least-load")([], c).name == "c"       # fewest in flight, then most free blocks


def test_dynamo_cost_is_overlap_weight_times_prefill_blocks_plus_active_blocks() -> None:
    from labkit.serve.routing import DynamoCost

    # Dynamo's documented example (docs/router/kv_cache_routing.md): prefill blocks 8, 5, 2 and decode
    # blocks 10, 5, 9 give costs 18, 10, 11. A 160-token prompt is 10 blocks of 16: matched 2, 5, 8.
    c = [cand("w1", matched=2, active=10), cand("w2", matched=5, active=5), cand("w3", matched=8, active=9)]
    pol = load_policy("dynamo-cost")
    assert isinstance(pol, DynamoCost) and (pol.overlap_weight, pol.temperature) == (1.0, 0.0)
    assert [pol.cost(x) for x in c] == [18.0, 10.0, 11.0] and pol([], c).name == "w2"
    heavy = load_policy("dynamo-cost:overlap_weight=2")           # the cache counts double: 26, 15, 13
    assert [heavy.cost(x) for x in c] == [26.0, 15.0, 13.0] and heavy([], c).name == "w3"  # type: ignore[attr-defined]
    blind = load_policy("dynamo-cost:overlap_weight=0")           # load only: 10, 5, 9
    assert blind([], c).name == "w2"
    # a partial block counts by its share: 170 tokens, 5 cached blocks -> 90 / 16 = 5.625 blocks to prefill
    assert pol.cost(cand("p", matched=5, prompt=170)) == 5.625    # type: ignore[attr-defined]
    # equal costs: the smaller cache tree wins (Dynamo's tie-break)
    assert pol([], [cand("x", active=3, cached=40), cand("y", active=3, cached=7)]).name == "y"


def test_dynamo_temperature_samples_the_softmax_of_range_scaled_negated_costs() -> None:
    import math

    c = [cand("w1", matched=2, active=10), cand("w2", matched=5, active=5), cand("w3", matched=8, active=9)]
    pol = load_policy("dynamo-cost:temperature=1,seed=7")
    # costs 18, 10, 11 over their range 8: weights e^-1, e^0, e^-1/8
    w = [math.exp(-1.0), 1.0, math.exp(-0.125)]
    want = [x / sum(w) for x in w]
    got = pol.probabilities(c)   # type: ignore[attr-defined]
    assert all(abs(a - b) < 1e-12 for a, b in zip(got, want)) and abs(want[1] - 0.4444) < 1e-3
    picks = [pol([], c).name for _ in range(6000)]
    for name, p in zip(("w1", "w2", "w3"), want):
        assert abs(picks.count(name) / len(picks) - p) < 0.03
    cold = load_policy("dynamo-cost:temperature=100,seed=1")   # very hot: nearly uniform
    assert max(cold.probabilities(c)) - min(cold.probabilities(c)) < 0.01   # type: ignore[attr-defined]
    same = [cand("a", active=4), cand("b", active=4)]
    assert pol.probabilities(same) == [0.5, 0.5]   # type: ignore[attr-defined]


def test_sglang_cache_aware_thresholds() -> None:
    from labkit.serve.routing import SGLangCacheAware

    pol = load_policy("sglang-cache-aware")
    assert isinstance(pol, SGLangCacheAware)
    assert (pol.cache_threshold, pol.balance_abs_threshold, pol.balance_rel_threshold) == (0.3, 64, 1.5)
    # balanced, a match of 5 blocks of 16 in a 160-token prompt: ratio 0.5 > 0.3, the match wins
    c = [cand("a", matched=5, in_flight=50, cached=900), cand("b", in_flight=10, cached=10)]
    assert not pol.imbalanced(c) and pol([], c).name == "a"
    # a match of 4 blocks: ratio 0.4; at threshold 0.5 it is too short: the smallest tree wins
    c = [cand("a", matched=4, cached=900), cand("b", cached=300), cand("c", cached=10)]
    assert load_policy("sglang-cache-aware:cache_threshold=0.5")([], c).name == "c"
    assert pol([], c).name == "a"
    # no match, both trees full (the index is bounded by the KV pool): the less loaded of equal trees
    assert pol([], [cand("a", cached=122, in_flight=3), cand("b", cached=122, in_flight=1)]).name == "b"
    # a request still prefilling is in SGLang's tree already (added when routed): 100 + 30 > 120 + 0
    assert pol([], [cand("a", cached=100, active=30), cand("b", cached=120)]).name == "b"
    # imbalanced only when both spreads exceed: 70 vs 3 (67 > 64 and 70 > 4.5): shortest queue
    c = [cand("a", matched=10, in_flight=70), cand("b", in_flight=3)]
    assert pol.imbalanced(c) and pol([], c).name == "b"
    # 200 vs 135: 65 > 64 but 200 < 202.5: balanced, so the cache still wins
    c = [cand("a", matched=10, in_flight=200), cand("b", in_flight=135)]
    assert not pol.imbalanced(c) and pol([], c).name == "a"
    tight = load_policy("sglang-cache-aware:balance_abs_threshold=2,balance_rel_threshold=1.1")
    c = [cand("a", matched=10, in_flight=4), cand("b", in_flight=1)]
    assert tight([], c).name == "b" and pol([], c).name == "a"


@pytest.mark.parametrize("spec,message", [
    ("dynamo-cost:overlap_weight=-1", "overlap_weight must be a finite number >= 0"),
    ("dynamo-cost:temperature=nan", "temperature must be a finite number >= 0"),
    ("dynamo-cost:weight=1", "no parameter 'weight'; it takes overlap_weight, seed, temperature"),
    ("dynamo-cost:overlap_weight=abc", "overlap_weight='abc' is not a number"),
    ("dynamo-cost:overlap_weight", "parameter 'overlap_weight' is not key=value"),
    ("sglang-cache-aware:cache_threshold=2", r"cache_threshold must be in \[0, 1\], got 2.0"),
    ("sglang-cache-aware:balance_abs_threshold=1.5", "balance_abs_threshold='1.5' is not an integer"),
    ("least-load:x=1", "'least-load' takes no parameters"),
])
def test_a_bad_policy_parameter_says_which_and_why(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_policy(spec)


def test_every_registered_policy_serves_through_the_router() -> None:
    from labkit.serve.routing import POLICIES

    for name in POLICIES:
        fakes = [FakeWorker("prefill", "p0"), FakeWorker("prefill", "p1"), FakeWorker("decode", "d")]
        out = serve(fakes, [{"prompt": "hi there", "max_tokens": 2}] * 4, policy=name)
        assert [r.status_code for r in out] == [200] * 4, name
        assert len(fakes[0].seen) + len(fakes[1].seen) == 4
    rr = [FakeWorker("prefill", "p0"), FakeWorker("prefill", "p1"), FakeWorker("decode", "d")]
    serve(rr, [{"prompt": "hi there", "max_tokens": 2}] * 4, policy="round-robin")
    assert (len(rr[0].seen), len(rr[1].seen)) == (2, 2)


def test_the_policy_sees_the_request_and_the_routers_bookkeeping(tmp_path: Path) -> None:
    log = tmp_path / "cands.jsonl"
    (tmp_path / "pol.py").write_text(
        "import dataclasses, json\n"
        f"def first(hashes, cands):\n    open({str(log)!r}, 'a').write(json.dumps("
        "[dataclasses.asdict(c) for c in cands]) + '\\n')\n    return cands[0]\n")
    fakes = [FakeWorker("prefill", "p0"), FakeWorker("prefill", "p1"), FakeWorker("decode", "d")]
    prompt = [256] + list(range(1, 40))                    # 40 tokens: 2 full blocks of 16 and a partial one
    serve(fakes, [{"prompt": prompt, "max_tokens": 2}] * 2, policy=f"{tmp_path / 'pol.py'}:first")
    first, second = (json.loads(x) for x in log.read_text().splitlines())
    assert [c["prompt_tokens"] for c in first] == [40, 40] and {c["block_size"] for c in first} == {16}
    assert [(c["matched_blocks"], c["cached_blocks"], c["active_blocks"]) for c in first] == [(0, 0, 0), (0, 0, 0)]
    # after the first request p0 caches its 2 full blocks; nothing is open any more
    assert [(c["matched_blocks"], c["cached_blocks"], c["active_blocks"]) for c in second] == [(2, 2, 0), (0, 0, 0)]


def test_active_blocks_count_a_shared_prefix_once() -> None:
    from labkit.serve.prefix_index import ActiveBlocks, block_hashes

    a = ActiveBlocks()
    shared = list(range(32))
    h1, h2 = block_hashes(shared + [1] * 20, 16), block_hashes(shared + [2] * 20, 16)   # 3 full blocks each, 2 shared
    a.add("w", h1, partial=True)
    a.add("w", h2, partial=True)
    assert a.count("w") == 2 + 1 + 1 + 2 and a.count("other") == 0    # shared 2, own 1 each, a partial block each
    a.remove("w", h1, partial=True)
    assert a.count("w") == 3 + 1
    a.remove("w", h2, partial=True)
    assert a.count("w") == 0
