"""Selective disaggregation (llm-d's decider): a prompt whose uncached suffix is shorter than the
router's `prefill_threshold` is prefilled on the decode worker itself.

First in one process against fake workers (the decision, the prefix index, the metrics, the
errors), then through real processes on `tiny`: short prompts never reach the prefill worker,
long ones do, and the tokens equal the engine's own (greedy) either way.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import httpx
import pytest
from test_serve_routing import TOKENS, FakeWorker, serve

from labkit.serve.config import RouterConfig, WorkerConfig
from labkit.serve.messages import DecodeRequest, GenerateRequest, PrefillRequest


def fakes() -> tuple[FakeWorker, FakeWorker]:
    return FakeWorker("prefill", "p0"), FakeWorker("decode", "d0")


def prefills_by_where(metrics_text: str) -> dict[tuple[str, str], float]:
    """labkit_router_prefills_total by (where, upstream), from Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.labels["where"], s.labels["upstream"]): s.value for fam in text_string_to_metric_families(metrics_text)
            for s in fam.samples if s.name == "labkit_router_prefills_total"}


def prefills(router: Any) -> dict[tuple[str, str], float]:
    return prefills_by_where(router.metrics.render().decode())


def test_short_prompts_prefill_on_decode_long_ones_on_the_prefill_worker() -> None:
    p, d = fakes()
    short = {"prompt": [1] * 10, "max_tokens": 4, "return_token_ids": True}
    long = {"prompt": [2] * 40, "max_tokens": 4, "return_token_ids": True}
    out, counts = serve([p, d], [short, long], prefill_threshold=20, after=prefills)
    assert [r.status_code for r in out] == [200, 200]
    # same tokens either way: the fake decode worker's whole run and the prefill + decode split agree
    assert [r.json()["choices"][0]["token_ids"] for r in out] == [TOKENS[:4]] * 2
    assert len(d.seen) == 2 and type(d.seen[0]) is GenerateRequest and d.seen[0].prompt_ids == [1] * 10
    assert type(d.seen[1]) is DecodeRequest
    assert [type(m) for m in p.seen] == [PrefillRequest] and p.seen[0].prompt_ids == [2] * 40
    assert counts == {("decode", "d0"): 1.0, ("prefill", "p0"): 1.0}


def test_threshold_zero_sends_everything_to_the_prefill_worker() -> None:
    p, d = fakes()
    out = serve([p, d], [{"prompt": [1], "max_tokens": 3}, {"prompt": [1] * 5, "max_tokens": 3}])
    assert [r.status_code for r in out] == [200, 200]
    assert len(p.seen) == 2 and [type(m) for m in d.seen] == [DecodeRequest, DecodeRequest]


def test_the_uncached_suffix_counts_not_the_prompt() -> None:
    """40 tokens, blocks of 16, threshold 20: the first time all 40 are uncached (prefill worker); the
    decode worker then holds two blocks of it, so the same prompt leaves 8 to prefill: it stays there."""
    p, d = fakes()
    body = {"prompt": [3] * 40, "max_tokens": 3}
    out, counts = serve([p, d], [body, body], prefill_threshold=20, after=prefills)
    assert [r.status_code for r in out] == [200, 200]
    assert len(p.seen) == 1
    assert isinstance(d.seen[-1], GenerateRequest) and d.seen[-1].prompt_ids == [3] * 40
    assert counts == {("prefill", "p0"): 1.0, ("decode", "d0"): 1.0}


def test_a_decode_worker_that_cannot_prefill_is_taken_out_with_the_reason() -> None:
    p, d = fakes()

    async def decode_only(router: Any) -> None:
        u = next(u for u in router.backend.pool.upstreams if u.role == "decode")
        u.health = u.health.model_copy(update={"policy": "decode_only"})
        router.backend._sized(u)

    out, up = serve([p, d], [decode_only, {"prompt": [1] * 4, "max_tokens": 2}], prefill_threshold=8,
                    after=lambda r: {u.name: (u.up, u.last_error) for u in r.backend.pool.upstreams})
    assert out[0].status_code == 503 and out[0].json()["error"]["code"] == "no_upstream"
    assert up["d0"][0] is False and "local_prefill" in up["d0"][1]


@pytest.mark.parametrize("cfg, message", [
    ({"mono": ("http://m",), "prefill_threshold": 16}, "needs mode 'disagg'"),
    ({"prefill": ("http://p",), "decode": ("http://d",), "prefill_threshold": -1}, ">= 0"),
    ({"prefill": ("http://p",), "decode": ("http://d",), "prefill_threshold": True}, ">= 0"),
    ({"prefill": ("http://p",), "decode": ("http://d",), "prefill_threshold": 16, "backend": "vllm"}, "lab backend"),
])
def test_bad_thresholds_say_what_is_wrong(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        RouterConfig(**cfg)


def test_local_prefill_is_for_decode_workers_and_sets_their_policy() -> None:
    assert WorkerConfig(role="decode").engine.policy == "decode_only"
    assert WorkerConfig(role="decode", local_prefill=True).engine.policy == "prefill_first"
    with pytest.raises(ValueError, match="local_prefill is for decode workers"):
        WorkerConfig(role="prefill", local_prefill=True)


def test_launch_and_the_cli_refuse_a_bad_threshold_before_starting_anything(tiny_model_dir: Any) -> None:
    from labkit.serve.launcher import launch

    with pytest.raises(ValueError, match="needs mode 'disagg'"):
        launch("mono", prefill_threshold=64)
    with pytest.raises(ValueError, match=">= 0"):
        launch("disagg", prefill_threshold=-5)
    for args, message in ((["--mode", "mono", "--prefill-threshold", "64"], "needs mode 'disagg'"),
                          (["--mode", "disagg", "--prefill-threshold", "-1"], ">= 0")):
        r = subprocess.run([sys.executable, "-m", "labkit.cli", "serve", "--port", "0", *args],
                           capture_output=True, text=True, timeout=120, check=False)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


# --- real processes ------------------------------------------------------------------------------------
THRESHOLD = 48   # tokens: the byte tokenizer makes a prompt of N characters N tokens (+ BOS)
SHORT = ["Hello, world", "a", "short prompts stay on decode"]
LONG = ["The KV cache of one request moves from prefill to decode, unless the prompt is short. " * 2]


@pytest.fixture(scope="module")
def selective(tiny_model_dir: Any) -> Any:
    from labkit.serve.launcher import launch

    with launch("disagg", model="tiny", prefill_threshold=THRESHOLD, kv_cache_bytes=32 << 20, prefill_cpus=[0],
                decode_cpus=[1]) as srv:
        yield srv


def health(url: str) -> dict[str, Any]:
    r = httpx.get(url + "/health", timeout=10)
    assert r.status_code == 200
    return dict(r.json())


def complete(url: str, prompt: str, stream: bool = False) -> list[int]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    if not stream:
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return list(r.json()["choices"][0]["token_ids"])
    ids: list[int] = []
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ids += json.loads(line[6:])["choices"][0].get("token_ids") or []
    return ids


def test_short_prompts_never_touch_the_prefill_worker_and_long_ones_do(selective: Any) -> None:
    from labkit.engine import Engine, EngineConfig, SamplingParams
    from labkit.models import ByteTokenizer

    tok = ByteTokenizer()
    assert all(len(tok.encode(s)) < THRESHOLD for s in SHORT) and all(len(tok.encode(s)) >= THRESHOLD for s in LONG)
    ref = [o.output_token_ids for o in Engine(EngineConfig(model="tiny")).generate(
        [tok.encode(s) for s in SHORT + LONG], SamplingParams(max_tokens=12, ignore_eos=True))]
    pre, dec = selective.worker("prefill").url, selective.worker("decode").url
    assert health(dec)["policy"] == "prefill_first"
    got = [complete(selective.url, s) for s in SHORT]
    assert got == ref[:len(SHORT)]
    assert complete(selective.url, SHORT[0], stream=True) == ref[0]
    h_pre, h_dec = health(pre), health(dec)
    assert h_pre["prefill_tokens_total"] == 0 and h_pre["kv_transfer_bytes_total"] == 0
    assert h_dec["prefill_tokens_total"] >= sum(len(tok.encode(s)) for s in SHORT)
    assert complete(selective.url, LONG[0]) == ref[-1]
    h_pre2, h_dec2 = health(pre), health(dec)
    assert h_pre2["prefill_tokens_total"] >= len(tok.encode(LONG[0])) and h_pre2["kv_transfer_bytes_total"] > 0
    assert h_dec2["prefill_tokens_total"] == h_dec["prefill_tokens_total"]   # the long prompt came as KV
    by = prefills_by_where(httpx.get(selective.url + "/metrics", timeout=10).text)
    assert sorted((w, v) for (w, _), v in by.items()) == [("decode", len(SHORT) + 1.0), ("prefill", 1.0)]
