"""One streaming client for OpenAI `/v1/completions`: SSE read, the arrival time of every token.

The load generator (loadgen.py) and the interference experiment (interference.py) both send
requests through `stream_completion`, so a token is timed the same way in every benchmark
(as `vllm bench serve` times it: when a chunk carrying a choice arrives).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx

from labkit.sse import aiter_sse_json

T = TypeVar("T")


@dataclass
class StreamedCompletion:
    """What one streamed request saw. `token_s`: `time.perf_counter()` of every chunk carrying a
    choice (one per token on the lab's server and vLLM's), in seconds."""

    status: int | None = None
    token_s: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: str = ""
    closed_early: bool = False  # the caller's `on_token` stopped reading


def error_text(status: int, body: bytes) -> str:
    """An HTTP error answer in one line: the OpenAI error message when there is one."""
    try:
        err = json.loads(body)["error"]
        return f"HTTP {status}: {err.get('message', err) if isinstance(err, dict) else err}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {body[:200].decode('utf-8', 'replace')}"


async def stream_completion(
    client: httpx.AsyncClient,
    url: str,
    payload: dict[str, Any],
    out: StreamedCompletion,
    on_token: Callable[[int], bool] | None = None,
) -> None:
    """POSTs `payload` (with `"stream": true`) to the completions `url` and fills `out` as chunks come.

    Never raises for an HTTP error, an SSE error event, a dropped connection or bad data: each
    becomes `out.error`. `on_token(n)` runs after the n-th token; when it returns False the client
    closes the stream (`out.closed_early`). `out` is filled in place, so a caller's timeout around
    this call still finds the tokens that arrived.
    """
    try:
        async with client.stream("POST", url, json=payload) as resp:
            out.status = resp.status_code
            if resp.status_code != 200:
                out.error = error_text(resp.status_code, await resp.aread())
                return
            async for obj in aiter_sse_json(resp):
                if "error" in obj:
                    err = obj["error"]
                    out.error = f"stream error: {err.get('message', err) if isinstance(err, dict) else err}"
                    return
                out.usage = obj.get("usage") or out.usage
                if obj.get("choices"):
                    out.token_s.append(time.perf_counter())
                    out.finish_reason = obj["choices"][0].get("finish_reason") or out.finish_reason
                    if on_token is not None and not on_token(len(out.token_s)):
                        out.closed_early = True
                        return  # leaving the block closes the stream
    except httpx.HTTPError as e:
        out.error = f"{e.__class__.__name__}: {e}"
    except (ValueError, KeyError, TypeError) as e:
        out.error = f"bad stream data: {e.__class__.__name__}: {e}"


def run_sync(coro: Coroutine[Any, Any, T]) -> T:
    """Runs `coro` to completion, also from inside Jupyter (whose event loop is already running)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(asyncio.run, coro).result()
