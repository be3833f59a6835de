"""Bad input against a real 1P1D server (tiny model): every malformed request gets a 4xx OpenAI
error (or a clean close when the client walks away), the workers stay up with the same PIDs,
their KV pools go back to full, and the next valid request succeeds. One server for the module.
"""
from __future__ import annotations

import json
import re
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from labkit.proc import pid_alive
from labkit.serve.limits import MAX_BODY_BYTES, MAX_HEADER_BYTES
from reliability_helpers import (CLIENT_TIMEOUT_S, Topology, assert_openai_error, complete, join_all,
                                 pools_full, worker_health)

LONG = "x" * 3000           # 3,001 tokens with BOS: over the tiny model's 2,048-token context


@pytest.fixture(scope="module")
def topo(tiny_model_dir: Any) -> Any:
    t = Topology().start()
    pids = [p.pid for p in t.procs]
    yield t
    t.stop()
    assert not [p for p in pids if pid_alive(p)]


@pytest.fixture
def healthy_after(topo: Topology) -> Any:
    """After the test: same PIDs alive, pools full, and a valid request completes."""
    pids = {w.name: w.pid for w in topo.procs}
    yield
    for w in topo.procs:
        assert w.alive() and w.pid == pids[w.name], f"{w.name} died or was replaced"
    for w in topo.workers:
        assert worker_health(w)["pid"] == w.pid
    pools_full(topo)
    complete(topo.url, max_tokens=4)


def j(**kw: Any) -> bytes:
    return json.dumps(kw).encode()


# (id, raw body, expected status, expected param ("any": not checked), expected code ("any": not checked))
ROUTER_CASES: list[tuple[str, bytes, int, Any, Any]] = [
    ("broken-json", b'{"prompt": "hi",', 400, None, "invalid_json"),
    ("empty-body", b"", 400, None, "invalid_json"),
    ("invalid-utf8", b'{"prompt": "\xff\xfe"}', 400, None, "invalid_json"),
    ("deeply-nested", b"[" * 100_000, 400, None, "invalid_json"),
    ("nested-prompt", b'{"prompt":' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None, "invalid_json"),
    ("5000-digit-int", b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400, None, "invalid_json"),
    ("body-is-array", b"[1, 2, 3]", 400, None, "invalid_type"),
    ("body-is-string", b'"hello"', 400, None, "invalid_type"),
    ("missing-prompt", j(model="tiny", max_tokens=4), 400, "prompt", "missing_required_parameter"),
    ("null-prompt", j(prompt=None), 400, "prompt", "missing_required_parameter"),
    ("empty-prompt", j(prompt=""), 400, "prompt", "any"),
    ("empty-token-list", j(prompt=[]), 400, "prompt", "any"),
    ("prompt-number", j(prompt=42), 400, "prompt", "invalid_type"),
    ("prompt-object", j(prompt={"text": "hi"}), 400, "prompt", "invalid_type"),
    ("batch-of-prompts", j(prompt=["a", "b"]), 400, "prompt", "unsupported_value"),
    ("token-id-over-vocab", j(prompt=[1, 2, 999_999]), 400, "prompt", "any"),
    ("token-id-negative", j(prompt=[-1]), 400, "prompt", "any"),
    ("token-id-float", j(prompt=[1.5, 2]), 400, "prompt", "invalid_type"),
    ("token-id-bool", j(prompt=[True]), 400, "prompt", "invalid_type"),
    ("max-tokens-negative", j(prompt="hi", max_tokens=-1), 400, "max_tokens", "any"),
    ("max-tokens-zero", j(prompt="hi", max_tokens=0), 400, "max_tokens", "any"),
    ("max-tokens-enormous", j(prompt="hi", max_tokens=10**12), 400, "max_tokens", "any"),
    ("max-tokens-over-context", j(prompt="hi", max_tokens=5000), 400, "max_tokens", "context_length_exceeded"),
    ("max-tokens-string", j(prompt="hi", max_tokens="16"), 400, "max_tokens", "invalid_type"),
    ("max-tokens-float", j(prompt="hi", max_tokens=1.5), 400, "max_tokens", "invalid_type"),
    ("prompt-over-context", j(prompt=LONG, max_tokens=4), 400, "max_tokens", "context_length_exceeded"),
    ("ids-over-context", j(prompt=[65] * 2100, max_tokens=4), 400, "max_tokens", "context_length_exceeded"),
    ("temperature-negative", j(prompt="hi", temperature=-0.5), 400, "temperature", "any"),
    ("temperature-string", j(prompt="hi", temperature="hot"), 400, "temperature", "invalid_type"),
    ("temperature-nan", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature", "invalid_type"),
    ("temperature-infinity", b'{"prompt": "hi", "temperature": Infinity}', 400, "temperature", "any"),
    ("temperature-bool", j(prompt="hi", temperature=True), 400, "temperature", "invalid_type"),
    ("top-p-zero", j(prompt="hi", top_p=0), 400, "top_p", "any"),
    ("top-p-over-one", j(prompt="hi", top_p=1.5), 400, "top_p", "any"),
    ("top-k-string", j(prompt="hi", top_k="5"), 400, "top_k", "invalid_type"),
    ("seed-string", j(prompt="hi", seed="abc"), 400, "seed", "invalid_type"),
    ("seed-over-64-bits", j(prompt="hi", seed=2**70), 400, "seed", "any"),
    ("stop-number", j(prompt="hi", stop=5), 400, "stop", "invalid_type"),
    ("stop-list-of-ints", j(prompt="hi", stop=[1, 2]), 400, "stop", "invalid_type"),
    ("stop-too-many", j(prompt="hi", stop=["a", "b", "c", "d", "e"]), 400, "stop", "any"),
    ("stop-empty-string", j(prompt="hi", stop=[""]), 400, "stop", "any"),
    ("stop-token-id-over-vocab", j(prompt="hi", stop_token_ids=[999_999]), 400, "stop_token_ids", "any"),
    ("stop-token-ids-string", j(prompt="hi", stop_token_ids="7"), 400, "stop_token_ids", "invalid_type"),
    ("stream-string", j(prompt="hi", stream="yes"), 400, "stream", "invalid_type"),
    ("stream-options-without-stream", j(prompt="hi", stream_options={"include_usage": True}), 400,
     "stream_options", "any"),
    ("stream-options-not-object", j(prompt="hi", stream=True, stream_options="usage"), 400, "stream_options",
     "invalid_type"),
    ("stream-options-bad-flag", j(prompt="hi", stream=True, stream_options={"include_usage": "yes"}), 400,
     "include_usage", "invalid_type"),
    ("ignore-eos-string", j(prompt="hi", ignore_eos="no"), 400, "ignore_eos", "invalid_type"),
    ("model-number", j(prompt="hi", model=123), 400, "model", "invalid_type"),
    ("n-two", j(prompt="hi", n=2), 400, "n", "unsupported_value"),
    ("best-of", j(prompt="hi", best_of=3), 400, "best_of", "unsupported_value"),
    ("echo", j(prompt="hi", echo=True), 400, "echo", "unsupported_value"),
    ("logprobs", j(prompt="hi", logprobs=5), 400, "logprobs", "unsupported_value"),
    ("logit-bias", j(prompt="hi", logit_bias={"65": 5}), 400, "logit_bias", "unsupported_value"),
    ("presence-penalty", j(prompt="hi", presence_penalty=1.0), 400, "presence_penalty", "unsupported_value"),
]


@pytest.mark.parametrize("raw,status,param,code", [c[1:] for c in ROUTER_CASES], ids=[c[0] for c in ROUTER_CASES])
def test_router_rejects(topo: Topology, healthy_after: None, raw: bytes, status: int, param: Any, code: Any) -> None:
    r = httpx.post(topo.url + "/v1/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=CLIENT_TIMEOUT_S)
    assert_openai_error(r, status, param, code)


def test_unknown_model_is_404(topo: Topology, healthy_after: None) -> None:
    r = httpx.post(topo.url + "/v1/completions", json={"model": "gpt-4", "prompt": "hi"}, timeout=CLIENT_TIMEOUT_S)
    err = assert_openai_error(r, 404, "model", "model_not_found")
    assert "tiny" in err["message"]  # says which model is served


def test_unknown_fields_are_ignored_as_vllm_does(topo: Topology, healthy_after: None) -> None:
    # vLLM-style extras at their neutral values and unknown keys do not break a client.
    out = complete(topo.url, max_tokens=3, repetition_penalty=1.0, min_p=0.0, user="someone", foo={"bar": [1]})
    assert out["usage"]["completion_tokens"] == 3


def test_unknown_route_and_method(topo: Topology, healthy_after: None) -> None:
    assert_openai_error(httpx.post(topo.url + "/v1/chat/nothing", json={}, timeout=CLIENT_TIMEOUT_S), 404)
    assert_openai_error(httpx.get(topo.url + "/v1/completions", timeout=CLIENT_TIMEOUT_S), 405)


def test_body_over_the_size_limit_is_413(topo: Topology, healthy_after: None) -> None:
    big = json.dumps({"prompt": "x" * (MAX_BODY_BYTES + 10)}).encode()
    r = httpx.post(topo.url + "/v1/completions", content=big, timeout=CLIENT_TIMEOUT_S)
    assert_openai_error(r, 413, None, "request_too_large")

    def chunks() -> Any:  # no Content-Length: the limit is counted while reading
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 2):
            yield b" " * (1 << 20)
    r = httpx.post(topo.url + "/v1/completions", content=chunks(), timeout=CLIENT_TIMEOUT_S)
    assert_openai_error(r, 413, None, "request_too_large")


def test_headers_over_the_size_limit_are_431(topo: Topology, healthy_after: None) -> None:
    headers = {f"x-junk-{i}": "a" * 1000 for i in range(MAX_HEADER_BYTES // 1000 + 2)}
    r = httpx.post(topo.url + "/v1/completions", json={"prompt": "hi"}, headers=headers, timeout=CLIENT_TIMEOUT_S)
    assert_openai_error(r, 431, None, "request_too_large")


def test_clients_reusing_one_request_id_do_not_collide(topo: Topology, healthy_after: None) -> None:
    """x-request-id is the client's: four concurrent requests carrying the same one each get their own
    answer (not a 400 "already running", nor another request's KV)."""
    prompts = [[65 + i] * (40 + 8 * i) for i in range(4)]
    alone = [complete(topo.url, max_tokens=24, prompt=pr)["choices"][0]["text"] for pr in prompts]
    results: list[Any] = [None] * 4

    def send(i: int) -> None:
        body = {"prompt": prompts[i], "max_tokens": 24, "ignore_eos": True, "temperature": 0.0}
        results[i] = httpx.post(topo.url + "/v1/completions", json=body, headers={"x-request-id": "same-id"},
                                timeout=CLIENT_TIMEOUT_S)
    threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    join_all(threads, CLIENT_TIMEOUT_S + 5)
    for i, r in enumerate(results):
        assert r is not None and r.status_code == 200, (i, r.text if r is not None else None)
        assert r.json()["choices"][0]["text"] == alone[i]


def test_long_request_id_header_is_fine(topo: Topology, healthy_after: None) -> None:
    r = httpx.post(topo.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                   headers={"x-request-id": "r" * 300}, timeout=CLIENT_TIMEOUT_S)
    assert r.status_code == 200, r.text


# Direct to the workers' internal ports: the router is not the only one who can reach them.
PREFILL_CASES: list[tuple[str, bytes, int, Any]] = [
    ("broken-json", b"{", 400, None),
    ("deeply-nested", b"[" * 100_000, 400, None),
    ("not-an-object", b"[1]", 400, None),
    ("no-prompt-ids", j(sampling={}), 400, "prompt_ids"),
    ("ids-over-vocab", j(prompt_ids=[1, 10**6]), 400, "prompt_ids"),
    ("sampling-not-object", j(prompt_ids=[1], sampling=[1]), 400, "sampling"),
    ("sampling-unknown-key", j(prompt_ids=[1], sampling={"bogus": 1}), 400, "sampling"),
    ("sampling-negative-max-tokens", j(prompt_ids=[1], sampling={"max_tokens": -1}), 400, "sampling"),
    ("over-context", j(prompt_ids=[1] * 2040, sampling={"max_tokens": 100}), 400, "max_tokens"),
    ("kv-endpoint-not-string", j(prompt_ids=[1, 2], sampling={"max_tokens": 4}, kv_endpoint=5), 400, "kv_endpoint"),
    ("kv-endpoint-no-scheme", j(prompt_ids=[1, 2], sampling={"max_tokens": 4}, kv_endpoint="bogus"), 400,
     "kv_endpoint"),
    ("request-id-empty", j(prompt_ids=[1], request_id=""), 400, "request_id"),
]


@pytest.mark.parametrize("raw,status,param", [c[1:] for c in PREFILL_CASES], ids=[c[0] for c in PREFILL_CASES])
def test_prefill_worker_rejects(topo: Topology, healthy_after: None, raw: bytes, status: int, param: Any) -> None:
    assert topo.prefill is not None
    r = httpx.post(topo.prefill.url + "/internal/prefill", content=raw, timeout=CLIENT_TIMEOUT_S)
    assert_openai_error(r, status, param)


DECODE_CASES: list[tuple[str, bytes, int, Any]] = [
    ("broken-json", b'{"request_id": ', 400, None),
    ("timeout-negative", j(request_id="r1", timeout_s=-1), 400, "timeout_s"),
    ("timeout-huge", j(request_id="r1", timeout_s=10**9), 400, "timeout_s"),
    ("timeout-string", j(request_id="r1", timeout_s="soon"), 400, "timeout_s"),
    ("timeout-bool", j(request_id="r1", timeout_s=True), 400, "timeout_s"),
    ("timeout-nan", b'{"request_id": "r1", "timeout_s": NaN}', 400, "timeout_s"),
    ("bad-sampling", j(request_id="r1", sampling={"top_p": 7}), 400, "sampling"),
]


@pytest.mark.parametrize("raw,status,param", [c[1:] for c in DECODE_CASES], ids=[c[0] for c in DECODE_CASES])
def test_decode_worker_rejects(topo: Topology, healthy_after: None, raw: bytes, status: int, param: Any) -> None:
    assert topo.decode is not None
    r = httpx.post(topo.decode.url + "/internal/decode", content=raw, timeout=CLIENT_TIMEOUT_S)
    assert_openai_error(r, status, param)


def test_worker_wrong_route_and_method(topo: Topology, healthy_after: None) -> None:
    assert topo.prefill is not None and topo.decode is not None
    # a prefill worker has no /internal/generate (mono) nor /internal/decode: OpenAI-style 404s
    assert_openai_error(httpx.post(topo.prefill.url + "/internal/generate", json={}, timeout=CLIENT_TIMEOUT_S),
                        404, None, "not_found")
    assert_openai_error(httpx.post(topo.prefill.url + "/internal/decode", json={}, timeout=CLIENT_TIMEOUT_S),
                        404, None, "not_found")
    assert_openai_error(httpx.get(topo.decode.url + "/internal/decode", timeout=CLIENT_TIMEOUT_S),
                        405, None, "method_not_allowed")


def test_decode_for_a_request_that_never_arrives_times_out(topo: Topology, healthy_after: None) -> None:
    assert topo.decode is not None
    r = httpx.post(topo.decode.url + "/internal/decode", json={"request_id": "never-sent", "timeout_s": 0.5},
                   timeout=CLIENT_TIMEOUT_S)
    assert_openai_error(r, 504, None, "kv_timeout")


def _decode_running(topo: Topology) -> int:
    assert topo.decode is not None
    return int(worker_health(topo.decode)["running_requests"])


def test_client_disconnects_mid_stream(topo: Topology, healthy_after: None) -> None:
    body = {"prompt": "tell me a long story", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    assert topo.decode is not None
    with httpx.stream("POST", topo.url + "/v1/completions", json=body, timeout=CLIENT_TIMEOUT_S) as r:
        assert r.status_code == 200
        got = 0
        for line in r.iter_lines():  # leaving this loop closes the connection (httpx)
            got += line.startswith("data:")
            if got == 5:
                h = worker_health(topo.decode)
                assert h["running_requests"] == 1 and h["kv_blocks_used"] > 0, h  # decoding when the client leaves
                break
    # healthy_after: the decode worker aborted it (pool back to full) and serves the next request


def test_client_disconnects_before_the_first_token(topo: Topology, healthy_after: None) -> None:
    host, port = topo.url.removeprefix("http://").split(":")
    payload = json.dumps({"prompt": [65] * 1500, "max_tokens": 400, "ignore_eos": True, "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        time.sleep(0.05)  # in prefill now; hang up without reading a byte


def test_client_sends_half_a_body_and_hangs_up(topo: Topology, healthy_after: None) -> None:
    host, port = topo.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \"hi")


def _get_on(s: socket.socket, path: str) -> bytes:
    """One GET on an open connection (keep-alive, HTTP/1.1's default); returns the status line."""
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return b"closed"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        chunk = s.recv(65536)
        if not chunk:
            return b"closed"
        body += chunk
    return head.split(b"\r\n", 1)[0]


def test_an_idle_keep_alive_connection_outlives_a_clients_pool_expiry(topo: Topology, healthy_after: None) -> None:
    """A server must not close an idle connection while its client may still reuse it: uvicorn's default
    (5 s) equals httpx's pool expiry, and a request sent as the server closes fails (labkit.serve.limits)."""
    socks = []
    try:
        for p in topo.procs:  # the router and both workers
            host, port = p.url.removeprefix("http://").split(":")
            socks.append(socket.create_connection((host, int(port)), timeout=5))
        assert [_get_on(s, "/health") for s in socks] == [b"HTTP/1.1 200 OK"] * len(socks)
        time.sleep(6.0)  # idle past 5 s, the pool expiry of httpx's (and so the load generator's) clients
        assert [_get_on(s, "/health") for s in socks] == [b"HTTP/1.1 200 OK"] * len(socks)
    finally:
        for s in socks:
            s.close()


def test_garbage_instead_of_http(topo: Topology, healthy_after: None) -> None:
    host, port = topo.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) * 4)  # a TLS hello, say
        s.settimeout(5)
        try:
            reply = s.recv(4096)
        except (socket.timeout, ConnectionResetError):
            reply = b""
    assert reply == b"" or reply.startswith(b"HTTP/1.1 400"), reply[:100]
