"""One request through vLLM's prefill/decode protocol by hand, with everything it left behind.

`send_pd_request(prefill_url, decode_url, body, make_prefill, make_decode)` does what the lab's
router does for every request (`labkit.vllm.pd_backend`), with the two request builders passed
in (the learner's, in notebook 07), and returns a `PDTrace`: both requests and answers, the two
hops' times, and the NIXL counters of both servers over the request. The counters tell what moved
the KV: the decode server counts its reads; a decode request without `kv_transfer_params` is
computed from scratch there, with no transfer at all (vLLM answers it normally).

`cache_config(url)` reads the KV cache's layout from a server's `/metrics` (block size, blocks,
tokens), the numbers a transfer's byte count follows.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from labkit.vllm.metrics import NixlStats, read_nixl
from labkit.vllm.pd_backend import decode_body, prefill_body

RequestBuilder = Callable[[dict[str, Any]], dict[str, Any]]
DecodeBuilder = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]


def router_decode_request(body: dict[str, Any], prefill_answer: dict[str, Any]) -> dict[str, Any]:
    """The decode request the router builds from the prefill server's answer (`pd_backend.decode_body`),
    streaming as `body` says."""
    return decode_body(body, prefill_answer.get("kv_transfer_params") or {}, stream=bool(body.get("stream")))


@dataclass(frozen=True)
class PDTrace:
    """One request through the pair: what was sent, what came back, how long each hop took, and
    the NIXL counters of each server over it (a difference of two /metrics reads)."""

    body: dict[str, Any]
    prefill_request: dict[str, Any]
    prefill_answer: dict[str, Any]
    decode_request: dict[str, Any]
    decode_answer: dict[str, Any]
    prefill_s: float
    decode_s: float
    nixl_prefill: NixlStats
    nixl_decode: NixlStats

    @property
    def kv_transfer_params(self) -> dict[str, Any]:
        return dict(self.prefill_answer.get("kv_transfer_params") or {})

    @property
    def tokens(self) -> list[int]:
        """The decode server's output token ids."""
        return [int(t) for t in self.decode_answer["choices"][0].get("token_ids") or []]

    @property
    def prefill_answer_bytes(self) -> int:
        """Size of the prefill server's whole HTTP answer body as JSON (bytes): all the router carries."""
        return len(json.dumps(self.prefill_answer).encode())

    @property
    def prompt_tokens(self) -> int:
        return int(self.prefill_answer.get("usage", {}).get("prompt_tokens", 0))


def _post(client: httpx.Client, url: str, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post(url.rstrip("/") + "/v1/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"{url} answered HTTP {r.status_code}: {r.text[:300]}")
    return dict(r.json())


def send_pd_request(
    prefill_url: str,
    decode_url: str,
    body: dict[str, Any],
    *,
    make_prefill: RequestBuilder = prefill_body,
    make_decode: DecodeBuilder = router_decode_request,
    timeout_s: float = 120.0,
) -> PDTrace:
    """Sends `body` through the pair as two requests built by `make_prefill(body)` and
    `make_decode(body, prefill_answer)` (default: the router's own, `labkit.vllm.pd_backend`);
    returns the trace. Each builder gets its own copy of `body`. Raises RuntimeError on a non-200
    answer, TypeError when a builder returns no dict, ValueError for a streaming decode request."""
    nixl_p0, nixl_d0 = read_nixl(prefill_url), read_nixl(decode_url)
    with httpx.Client(timeout=timeout_s) as client:
        pre_req = make_prefill(json.loads(json.dumps(body)))
        if not isinstance(pre_req, dict):
            raise TypeError(f"the prefill request builder returned {type(pre_req).__name__}, not a dict")
        t0 = time.perf_counter()
        pre = _post(client, prefill_url, pre_req)
        t1 = time.perf_counter()
        dec_req = make_decode(json.loads(json.dumps(body)), json.loads(json.dumps(pre)))
        if not isinstance(dec_req, dict):
            raise TypeError(f"the decode request builder returned {type(dec_req).__name__}, not a dict")
        if dec_req.get("stream"):
            raise ValueError("send_pd_request reads one JSON answer: send a body with stream false")
        dec = _post(client, decode_url, dec_req)
        t2 = time.perf_counter()
    return PDTrace(
        dict(body),
        pre_req,
        pre,
        dec_req,
        dec,
        t1 - t0,
        t2 - t1,
        read_nixl(prefill_url) - nixl_p0,
        read_nixl(decode_url) - nixl_d0,
    )


def completion_body(model: str, prompt: Sequence[int], max_tokens: int = 16) -> dict[str, Any]:
    """A greedy, non-streaming completions request for token ids, EOS ignored, returning token ids."""
    return {
        "model": model,
        "prompt": list(prompt),
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "return_token_ids": True,
        "stream": False,
    }


def random_prompt(tokens: int, seed: int, *, bos: int = 256, vocab: int = 256) -> list[int]:
    """`tokens` token ids: BOS then random byte tokens (a prompt no cache has seen for a new seed)."""
    if tokens < 1:
        raise ValueError(f"tokens must be >= 1, got {tokens}")
    rng = random.Random(seed)
    return [bos] + [rng.randrange(vocab) for _ in range(tokens - 1)]


def cache_config(url: str, *, timeout_s: float = 5.0) -> dict[str, str]:
    """The labels of `vllm:cache_config_info` on the server at `url` (block_size, num_gpu_blocks,
    kv_cache_size_tokens, ...), as strings; {} when the server does not export it."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout_s)
    r.raise_for_status()
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            if s.name.startswith("vllm:cache_config_info"):
                return dict(s.labels)
    return {}


def block_tokens(url: str) -> int:
    """Tokens per KV block of the server at `url` (its cache config). Raises RuntimeError if unknown."""
    cfg = cache_config(url)
    if "block_size" not in cfg:
        raise RuntimeError(f"{url} does not export vllm:cache_config_info with a block_size")
    return int(cfg["block_size"])


def greedy_through_pair(
    prefill_url: str, decode_url: str, prompts: Sequence[Sequence[int]], max_tokens: int, *, model: str
) -> list[list[int]]:
    """Greedy tokens of each prompt, prefilled on one server and decoded on the other (KV over NIXL)."""
    return [send_pd_request(prefill_url, decode_url, completion_body(model, p, max_tokens)).tokens for p in prompts]
