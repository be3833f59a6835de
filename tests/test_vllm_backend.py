"""The router's vLLM backend against stand-in vLLM servers (tests/vllm_fake.py): the two-step
kv_transfer_params protocol, streaming, and the errors when a server misbehaves or dies.
Real processes on loopback; no vLLM needed, so this runs everywhere."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from labkit.proc import free_port, pid_alive, start_process, wait_http_ok

sys.path.insert(0, str(Path(__file__).parent))
from vllm_fake import expected_tokens  # noqa: E402

FAKE = str(Path(__file__).parent / "vllm_fake.py")


class Fake:
    def __init__(self, role: str, tmp: Path, broken: bool = False) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, FAKE, "--role", role, "--port", str(self.port), *(["--broken"] if broken else [])]
        self.child = start_process(f"fake-{role}", argv, log_path=tmp / f"fake-{role}-{self.port}.log")
        wait_http_ok(self.url + "/health", timeout_s=60, child=self.child)

    def seen(self) -> list[dict[str, Any]]:
        return httpx.get(self.url + "/debug/requests", timeout=10).json()


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Any) -> Iterator[dict[str, Any]]:
    from labkit.serve.launcher import start_router

    tmp = tmp_path_factory.mktemp("vllm-fake")
    procs: list[Any] = []
    try:
        p, d, bad_p, d2 = (Fake("prefill", tmp), Fake("decode", tmp), Fake("prefill", tmp, broken=True),
                           Fake("decode", tmp))
        procs += [p.child, d.child, bad_p.child, d2.child]
        good = start_router(model="tiny", prefill=[p.url], decode=[d.url], backend="vllm", health_interval_s=0.2)
        broken = start_router(model="tiny", prefill=[bad_p.url], decode=[d.url], backend="vllm")
        dying = start_router(model="tiny", prefill=[p.url], decode=[d2.url], backend="vllm", health_interval_s=0.2)
        procs += [good.child, broken.child, dying.child]
        yield {"p": p, "d": d, "d2": d2, "good": good.url, "broken": broken.url, "dying": dying.url}
    finally:
        for c in procs:
            c.stop()
        assert not [c.pid for c in procs if pid_alive(c.pid)]


def test_two_step_protocol_through_router(topo: dict[str, Any]) -> None:
    prompt = [256] + list(b"disaggregate me, please")
    r = httpx.post(topo["good"] + "/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 6,
                                                          "temperature": 0, "return_token_ids": True}, timeout=30)
    assert r.status_code == 200, r.text
    out = r.json()
    block = len(prompt) % 200 + 1
    # The first token is the block id the decode server was handed: the router carried the params.
    assert out["choices"][0]["token_ids"] == expected_tokens(prompt, 6, block)
    assert out["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 6, "total_tokens": len(prompt) + 6}
    pre = topo["p"].seen()[-1]
    assert pre["max_tokens"] == 1 and pre["stream"] is False and pre["prompt"] == prompt
    assert pre["kv_transfer_params"]["do_remote_decode"] is True
    dec = topo["d"].seen()[-1]
    assert dec["kv_transfer_params"]["remote_engine_id"] == "fake-p" and dec["max_tokens"] == 6
    assert dec["stream"] is True and dec["prompt"] == prompt


def test_streaming_through_router(topo: dict[str, Any]) -> None:
    body = {"model": "tiny", "prompt": "hello vLLM", "max_tokens": 5, "temperature": 0, "stream": True,
            "return_token_ids": True, "stream_options": {"include_usage": True}}
    ids: list[int] = []
    finish, usage = None, None
    with httpx.stream("POST", topo["good"] + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                msg = json.loads(line[6:])
                for ch in msg.get("choices") or []:
                    ids += ch.get("token_ids") or []
                    finish = ch.get("finish_reason") or finish
                usage = msg.get("usage") or usage
    prompt = topo["d"].seen()[-1]["prompt"]
    assert prompt[0] == 256 and bytes(prompt[1:]) == b"hello vLLM"     # the router tokenized the text
    assert ids == expected_tokens(prompt, 5, len(prompt) % 200 + 1)
    assert finish == "length" and usage["completion_tokens"] == 5


def test_prefill_without_connector_is_a_clear_502(topo: dict[str, Any]) -> None:
    r = httpx.post(topo["broken"] + "/v1/completions", json={"model": "tiny", "prompt": [256, 1, 2], "max_tokens": 3},
                   timeout=30)
    assert r.status_code == 502
    err = r.json()["error"]
    assert err["code"] == "no_kv_transfer_params" and "kv-transfer-config" in err["message"]


def test_upstream_error_is_passed_on(topo: dict[str, Any]) -> None:
    # The fake decode server refuses a request without kv_transfer_params (as vLLM would fail it):
    # sent straight to it, it is a 400; through the router the protocol always adds them.
    r = httpx.post(topo["d"].url + "/v1/completions", json={"model": "tiny", "prompt": [256], "max_tokens": 2}, timeout=30)
    assert r.status_code == 400


def test_dead_decode_server_gives_503_and_no_hang(topo: dict[str, Any]) -> None:
    topo["d2"].child.stop()
    r = httpx.post(topo["dying"] + "/v1/completions", json={"model": "tiny", "prompt": [256, 5], "max_tokens": 3},
                   timeout=30)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["type"] == "service_unavailable_error"
    assert "decode" in r.json()["error"]["message"]     # it names the role that failed
