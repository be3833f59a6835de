"""Test scaffolding: a small real OpenAI-style SSE server, run as its own process.

`POST /v1/completions` streams `max_tokens` chunks: the first after `--ttft-s` plus
`--prefill-s-per-token` per prompt token, then one every `--itl-s`. The first prompt token id
picks a failure to inject, so one run can mix outcomes (ids above 255, which random byte
prompts never contain): 300 -> HTTP 400 (OpenAI-style error), 301 -> hang (client timeout),
302 -> SSE error event after 2 tokens, 303 -> connection dropped after 2 tokens.
`GET /debug/requests` lists what arrived (prompt length, max_tokens, ignore_eos, stream).

    python tests/fake_openai_server.py --port 8123 --ttft-s 0.05 --itl-s 0.01
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

MODEL = "fake-model"


def make_app(ttft_s: float, itl_s: float, prefill_s_per_token: float, waterfall: bool = False) -> FastAPI:
    app = FastAPI()
    seen: list[dict[str, Any]] = []

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                       "code": None}}, status_code=status)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "tests"}]}

    @app.get("/debug/requests")
    async def debug() -> list[dict[str, Any]]:
        return seen

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = body.get("prompt")
        max_tokens = body.get("max_tokens")
        if isinstance(prompt, str):
            ids = list(prompt.encode())
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = prompt
        else:
            return error(400, "prompt must be a string or a list of token ids", "prompt")
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return error(400, f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
        seen.append({"prompt_tokens": len(ids), "max_tokens": max_tokens, "ignore_eos": body.get("ignore_eos"),
                     "stream": body.get("stream"), "model": body.get("model"), "first": ids[:1],
                     "t": time.monotonic()})
        mode = ids[0] if ids else 0
        if mode == 300:
            return error(400, "injected bad request", "prompt")
        created = int(time.time())

        def chunk(text: str, finish: str | None = None) -> str:
            return "data: " + json.dumps({"id": "cmpl-fake", "object": "text_completion", "created": created,
                                          "model": MODEL, "choices": [{"index": 0, "text": text,
                                                                       "finish_reason": finish}]}) + "\n\n"

        async def stream():
            if mode == 301:
                await asyncio.sleep(3600)
            await asyncio.sleep(ttft_s + prefill_s_per_token * len(ids))
            for i in range(max_tokens):
                if i:
                    await asyncio.sleep(itl_s)
                if mode in (302, 303) and i == 2:
                    if mode == 302:
                        yield 'data: {"error": {"message": "injected worker failure", "type": "server_error"}}\n\n'
                        return
                    raise RuntimeError("injected connection drop")
                yield ": ping\n\n" if i == 1 else ""
                yield chunk("x", "length" if i == max_tokens - 1 else None)
            usage = {"prompt_tokens": len(ids), "completion_tokens": max_tokens,
                     "total_tokens": len(ids) + max_tokens}
            if waterfall and body.get("return_waterfall"):   # as the lab's router: the wait was all prefill
                wait = ttft_s + prefill_s_per_token * len(ids)
                usage["waterfall"] = {"router_s": 0.0, "http_s": 0.0, "queue_s": 0.0, "prefill_s": wait,
                                      "kv_transfer_s": 0.0, "first_token_out_s": 0.0, "ttft_s": wait}
            yield "data: " + json.dumps({"id": "cmpl-fake", "object": "text_completion", "created": created,
                                         "model": MODEL, "choices": [], "usage": usage}) + "\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--ttft-s", type=float, default=0.02)
    p.add_argument("--itl-s", type=float, default=0.005)
    p.add_argument("--prefill-s-per-token", type=float, default=0.0)
    p.add_argument("--waterfall", action="store_true", help="answer return_waterfall as the lab's router does")
    a = p.parse_args()
    uvicorn.run(make_app(a.ttft_s, a.itl_s, a.prefill_s_per_token, a.waterfall), host="127.0.0.1", port=a.port,
                log_level="warning")


if __name__ == "__main__":
    main()
