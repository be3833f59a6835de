"""The lab router's backend for vLLM servers: monolithic, or prefill + decode with NixlConnector.

vLLM's disaggregation protocol lives in one request field, `kv_transfer_params`:

1. the prefill server gets the request with `max_tokens=1`, `stream=false` and
   `kv_transfer_params={"do_remote_decode": true, ...}`. It runs the prompt, keeps the KV
   blocks, and answers with `kv_transfer_params` saying where they are (its engine id,
   block ids, NIXL side-channel host and port).
2. the decode server gets the original request plus those params (`do_remote_prefill: true`).
   Its NixlConnector reads the blocks from the prefill server (a one-sided NIXL READ), tells
   the prefill server it may free them, and decodes, streaming every token, including the
   first (which it samples again from the transferred state; prefill's token is not sent).

The router (labkit/serve/router.py) validates, tokenizes and times; this backend turns one
request into `Piece`s streamed from vLLM. With only `mono` upstreams it forwards to one vLLM.
The router finds it by the name "vllm" (`labkit.serve.config.BACKENDS` names `VllmDisaggBackend`),
so serve imports this module only when a router runs `--backend vllm`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

import httpx

from labkit.serve.backend import HttpBackend, Piece, error_from_response
from labkit.serve.config import RouterConfig
from labkit.serve.protocol import APIError, CompletionRequest, unavailable
from labkit.serve.upstream import Upstream, UpstreamPool
from labkit.sse import aiter_sse_json

log = logging.getLogger("labkit.vllm.pd_backend")

# What the prefill server must see: "run the prompt, keep the KV for a remote decoder".
PREFILL_KV_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


def vllm_body(req: CompletionRequest, prompt_ids: list[int] | None, model: str) -> dict[str, Any]:
    """The OpenAI completions body vLLM gets for `req` (token ids when the router has them)."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(prompt_ids) if prompt_ids is not None else req.prompt_text,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k if req.top_k > 0 else -1,  # vLLM: -1 means off
        "ignore_eos": req.ignore_eos,
        "return_token_ids": True,
    }
    if req.seed is not None:
        body["seed"] = req.seed
    if req.stop:
        body["stop"] = list(req.stop)
    if req.stop_token_ids:
        body["stop_token_ids"] = list(req.stop_token_ids)
    return body


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """Step 1 of the protocol: the same request, one token, no stream, KV kept for a remote decoder."""
    out = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "min_tokens")}
    out.update(max_tokens=1, stream=False, kv_transfer_params=dict(PREFILL_KV_PARAMS))
    return out


def decode_body(body: dict[str, Any], kv_transfer_params: dict[str, Any], *, stream: bool = True) -> dict[str, Any]:
    """Step 2: the original request plus what the prefill server answered in `kv_transfer_params`."""
    if not kv_transfer_params or not kv_transfer_params.get("do_remote_prefill"):
        raise ValueError(
            f"the prefill answer carries no usable kv_transfer_params: {kv_transfer_params!r}; "
            "is the prefill server started with --kv-transfer-config (NixlConnector)?"
        )
    out = dict(body, kv_transfer_params=kv_transfer_params, stream=stream)
    if stream:
        out["stream_options"] = {"include_usage": True}
    return out


class VllmDisaggBackend(HttpBackend):
    """`DisaggBackend` over vLLM servers: `mono` upstreams, or `prefill` + `decode` upstreams.

    The prefill and decode servers are picked by fewest requests in flight. `handoffs`
    counts requests that went through both, `prefill_s_total` the time spent in step 1.
    """

    def __init__(self, cfg: RouterConfig, pool: UpstreamPool, metrics: Any = None, tokenizer: Any = None) -> None:
        """The router's "vllm" backend for its RouterConfig `cfg` (metrics and tokenizer: the router's own,
        unused: vLLM's servers tokenize and measure themselves)."""
        super().__init__(cfg, pool)
        self._models: dict[str, str] = {}  # upstream name -> the model name it serves
        self.handoffs = 0
        self.prefill_s_total = 0.0

    async def _model_of(self, u: Upstream) -> str:
        """The name `u` serves (its /v1/models), asked once."""
        if u.name not in self._models:
            assert self._client is not None
            try:
                r = await self._client.get(u.url + "/v1/models")
                r.raise_for_status()
                self._models[u.name] = str(r.json()["data"][0]["id"])
            except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
                raise unavailable(
                    f"vLLM server {u.name} ({u.url}) did not list its model: {e.__class__.__name__}"
                ) from None
        return self._models[u.name]

    def _pick(self, role: str) -> Upstream:
        cands = self.pool.by_role(role)
        if not cands:
            raise unavailable(f"no vLLM {role} server is up; check `GET /health` on the router", code="no_upstream")
        return min(cands, key=lambda u: u.in_flight)

    async def generate(
        self, req: CompletionRequest, prompt_ids: list[int] | None, request_id: str
    ) -> AsyncGenerator[Piece, None]:
        assert self._client is not None
        if self.mode == "mono":
            u = self._pick("mono")
            body = dict(
                vllm_body(req, prompt_ids, await self._model_of(u)), stream=True, stream_options={"include_usage": True}
            )
        else:
            p = self._pick("prefill")
            u = self._pick("decode")
            base = vllm_body(req, prompt_ids, await self._model_of(p))
            kv_params = await self._prefill(p, base, request_id)
            base["model"] = await self._model_of(u)
            body = decode_body(base, kv_params)
            self.handoffs += 1
        async for piece in self._stream(u, body, request_id):
            yield piece

    async def _prefill(self, p: Upstream, base: dict[str, Any], request_id: str) -> dict[str, Any]:
        """Step 1 on prefill server `p`; returns its `kv_transfer_params`."""
        assert self._client is not None
        t0 = time.perf_counter()
        with self.calling(p, "/v1/completions"):
            r = await self._client.post(
                p.url + "/v1/completions", json=prefill_body(base), headers={"X-Request-Id": request_id}
            )
        if r.status_code != 200:
            raise await error_from_response(r)
        self.prefill_s_total += time.perf_counter() - t0
        params = r.json().get("kv_transfer_params")
        if not params or not params.get("do_remote_prefill"):
            raise APIError(
                502,
                f"vLLM prefill server {p.name} answered without kv_transfer_params; start it with "
                '--kv-transfer-config \'{"kv_connector":"NixlConnector",...}\'',
                type="server_error",
                code="no_kv_transfer_params",
            )
        return dict(params)

    async def _stream(self, u: Upstream, body: dict[str, Any], request_id: str) -> AsyncGenerator[Piece, None]:
        """Pieces from vLLM's SSE stream; the last one carries finish_reason and the usage totals."""
        assert self._client is not None
        held: Piece | None = None  # the finishing chunk, held until the usage chunk after it
        with self.calling(u, "/v1/completions"):
            async with self._client.stream(
                "POST", u.url + "/v1/completions", json=body, headers={"X-Request-Id": request_id}
            ) as r:
                if r.status_code != 200:
                    raise await error_from_response(r)
                async for msg in aiter_sse_json(r):
                    if "error" in msg:
                        err = msg["error"]
                        raise APIError(
                            int(err.get("code") or 500) if str(err.get("code", "")).isdigit() else 500,
                            f"vLLM {u.role} server {u.name}: {err.get('message')}",
                            type="server_error",
                        )
                    for ch in msg.get("choices") or []:
                        ids = tuple(int(t) for t in (ch.get("token_ids") or ()))
                        piece = Piece(ch.get("text") or "", len(ids), ids, finish_reason=ch.get("finish_reason"))
                        if piece.finish_reason is None:
                            yield piece
                        else:
                            held = piece
                    use = msg.get("usage")
                    if use and held is not None:
                        held = Piece(
                            held.text,
                            held.num_tokens,
                            held.token_ids,
                            held.finish_reason,
                            completion_tokens=int(use.get("completion_tokens", 0)),
                            prompt_tokens=int(use.get("prompt_tokens", 0)),
                        )
        if held is None:
            raise unavailable(f"vLLM {u.role} server {u.name} closed the stream before the request finished")
        yield held
