"""SSE lines split only at LF: separators that str.splitlines() knows stay inside the JSON."""
from __future__ import annotations

import asyncio
import json

import httpx

from labkit.sse import aiter_sse_lines


def _lines(chunks: list[bytes]) -> list[str]:
    async def run() -> list[str]:
        async def stream():
            for c in chunks:
                yield c

        resp = httpx.Response(200, content=stream())
        return [line async for line in aiter_sse_lines(resp)]

    return asyncio.run(run())


def test_unicode_line_separators_inside_json_do_not_split() -> None:
    text = "a\x85b\u2028c\u2029d\x1ce\x1df\x1eg\x0bh\x0ci"
    event = ("data: " + json.dumps({"choices": [{"text": text}]}, ensure_ascii=False) + "\n\n").encode()
    lines = _lines([event, b"data: [DONE]\n\n"])
    data = [line for line in lines if line.startswith("data:")]
    assert len(data) == 2
    assert json.loads(data[0][5:])["choices"][0]["text"] == text
    assert data[1] == "data: [DONE]"


def test_lines_across_chunk_boundaries_and_crlf() -> None:
    body = b'data: {"x": "\xc3\xa9t\xc3\xa9"}\r\n\r\ndata: [DONE]\r\n\r\n'
    for cut in range(1, len(body)):
        lines = [line for line in _lines([body[:cut], body[cut:]]) if line]
        assert lines == ['data: {"x": "été"}', "data: [DONE]"], cut
