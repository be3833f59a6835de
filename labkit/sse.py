"""Reading server-sent events (the OpenAI streaming format) without splitting inside JSON.

httpx's `aiter_lines()` splits text the way `str.splitlines()` does: also at U+0085, U+2028,
U+2029 and the \\x1c-\\x1e separators. Those may stand unescaped inside a JSON string (JSON
escapes only characters below U+0020), and a byte-level model emits them, so a stream of its
tokens broke into half-lines. Here lines end only at LF (a CR before it is dropped), which JSON
always escapes, so splitting the bytes there is exact. (Lone-CR line endings, allowed by the SSE
spec, are not used by vLLM, SGLang or uvicorn-based servers, and are not handled.)
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx


async def aiter_sse_lines(resp: httpx.Response) -> AsyncIterator[str]:
    """The lines of an SSE response body, decoded as UTF-8, split only at LF / CRLF."""
    buf = b""
    async for chunk in resp.aiter_bytes():
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode("utf-8", errors="replace")
    if buf:
        yield buf.removesuffix(b"\r").decode("utf-8", errors="replace")


async def aiter_sse_json(resp: httpx.Response) -> AsyncIterator[Any]:
    """The JSON payload of each `data:` event of an OpenAI stream, until `data: [DONE]` (comments and
    blank separators skipped). A payload that is not JSON raises ValueError."""
    async for line in aiter_sse_lines(resp):
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)
