"""Test scaffolding: a stand-in for a vLLM prefill or decode server speaking its P/D protocol.

A real HTTP server in its own process (no vLLM needed), for the router's vLLM backend tests:
- `--role prefill`: a request must carry `kv_transfer_params.do_remote_decode` and
  `max_tokens == 1`; it answers one token and `kv_transfer_params` naming a block id
  (`--broken` leaves them out, as a server without the connector would).
- `--role decode`: a request must carry `kv_transfer_params.do_remote_prefill` (else HTTP 400,
  as vLLM would fail it); it streams `max_tokens` tokens: the block id it was given, then
  `(sum(prompt) + i) % 256`. Non-stream answers carry `token_ids` too.
`GET /debug/requests` lists the bodies that arrived. `GET /metrics` says the KV cache's block size
(`vllm:cache_config_info`, BLOCK_TOKENS) and, on the decode server, NIXL counters as vLLM names them:
one transfer per handed-over request, its prompt in whole blocks of KV_BYTES_PER_TOKEN.

    python tests/vllm_fake.py --role prefill --port 8100
"""
from __future__ import annotations

import argparse
import json
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

BLOCK_TOKENS = 16
KV_BYTES_PER_TOKEN = 4096


def expected_nixl_bytes(prompt_len: int) -> int:
    """What the fake decode server counts as moved for one handed-over prompt."""
    return -(-prompt_len // BLOCK_TOKENS) * BLOCK_TOKENS * KV_BYTES_PER_TOKEN


def expected_tokens(prompt: list[int], max_tokens: int, block_id: int) -> list[int]:
    """What the fake decode server produces for a prompt handed over with `block_id`."""
    return [block_id] + [(sum(prompt) + i) % 256 for i in range(1, max_tokens)]


def make_app(role: str, broken: bool) -> FastAPI:
    app = FastAPI()
    seen: list[dict[str, Any]] = []
    nixl = {"transfers": 0, "bytes": 0}

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "BadRequestError", "param": None,
                                       "code": status}}, status_code=status)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse(None)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "tiny", "object": "model", "max_model_len": 1024}]}

    @app.get("/debug/requests")
    async def debug() -> list[dict[str, Any]]:
        return seen

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        n, b = nixl["transfers"], nixl["bytes"]
        lines = ["# TYPE vllm:cache_config_info gauge",
                 f'vllm:cache_config_info{{block_size="{BLOCK_TOKENS}",engine="0"}} 1.0']
        for name, total in (("vllm:nixl_xfer_time_seconds", 0.001 * n), ("vllm:nixl_bytes_transferred", b)):
            lines += [f"# TYPE {name} histogram", f'{name}_bucket{{engine="0",le="+Inf"}} {n}',
                      f'{name}_count{{engine="0"}} {n}', f'{name}_sum{{engine="0"}} {total}']
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        seen.append(body)
        prompt = body["prompt"]
        params = body.get("kv_transfer_params") or {}
        if role == "prefill":
            if not params.get("do_remote_decode") or body.get("max_tokens") != 1 or body.get("stream"):
                return error(400, f"prefill got {params}, max_tokens={body.get('max_tokens')}")
            block = len(prompt) % 200 + 1
            out: dict[str, Any] = {"id": "cmpl-p", "object": "text_completion", "model": "tiny",
                                   "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                                   "usage": {"prompt_tokens": len(prompt), "completion_tokens": 1}}
            if not broken:
                out["kv_transfer_params"] = {"do_remote_prefill": True, "do_remote_decode": False,
                                             "remote_block_ids": [[block]], "remote_engine_id": "fake-p",
                                             "remote_host": "127.0.0.1", "remote_port": 1}
            return out
        if not params.get("do_remote_prefill"):
            return error(400, "decode server got no kv_transfer_params from a prefill")
        ids = expected_tokens(prompt, int(body["max_tokens"]), int(params["remote_block_ids"][0][0]))
        nixl["transfers"] += 1
        nixl["bytes"] += expected_nixl_bytes(len(prompt))
        if not body.get("stream"):
            return {"id": "cmpl-d", "object": "text_completion", "model": "tiny",
                    "choices": [{"index": 0, "text": "".join(chr(t) for t in ids), "token_ids": ids,
                                 "finish_reason": "length"}],
                    "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(ids)}}

        async def sse() -> AsyncIterator[bytes]:
            for i, t in enumerate(ids):
                ch = {"index": 0, "text": chr(t), "token_ids": [t],
                      "finish_reason": "length" if i == len(ids) - 1 else None}
                yield f"data: {json.dumps({'choices': [ch]})}\n\n".encode()
            usage = {"prompt_tokens": len(prompt), "completion_tokens": len(ids)}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--role", choices=["prefill", "decode"], required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--broken", action="store_true", help="prefill: answer without kv_transfer_params")
    a = p.parse_args()
    uvicorn.run(make_app(a.role, a.broken), host="127.0.0.1", port=a.port, log_level="warning")


if __name__ == "__main__":
    main()
