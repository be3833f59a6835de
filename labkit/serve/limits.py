"""The HTTP edge the router and the workers share: size limits, safe decoding, OpenAI-style errors.

Every HTTP body is read with a cap (413 over it) and decoded so that any malformed input
(bad JSON, bad UTF-8, `[[[[...` nested past Python's recursion limit, a 5,000-digit number)
becomes a 400 OpenAI-style error instead of a 500. Header bytes are capped too (431): the
HTTP parser (httptools) has no limit of its own.
"""

from __future__ import annotations

import json
import logging
from typing import Any, TypeVar

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from labkit.serve.protocol import APIError, bad_request, error_body, invalid

log = logging.getLogger("labkit.serve")

M = TypeVar("M", bound=BaseModel)
MAX_BODY_BYTES = 8 << 20  # a 128k-token prompt as a JSON list of ids is ~1 MB; 8 MiB leaves room
MAX_HEADER_BYTES = 64 << 10  # all header names and values together; browsers and proxies send < 8 KiB
# Idle keep-alive connections, on both sides of every hop. A server that closes an idle connection just
# as its client reuses it fails that request (httpx.ReadError, which the router answers with a 503):
# uvicorn and httpx both default to 5 s, so with the defaults they race. The lab's servers keep an idle
# connection longer than any client's pool does (75 s, nginx's default), and the router, as a client,
# drops its idle ones sooner than any server it calls closes them (vLLM's API server: uvicorn's 5 s).
SERVER_KEEP_ALIVE_S = 75
CLIENT_KEEP_ALIVE_S = 2.0


def too_large(what: str, limit: int, status: int = 413) -> APIError:
    """The error for a request over a size limit (413 body, 431 headers)."""
    return APIError(
        status,
        f"the request {what} is larger than this server's limit of {limit} bytes",
        param=None,
        code="request_too_large",
    )


def check_headers(request: Request, max_bytes: int = MAX_HEADER_BYTES) -> None:
    """Raises APIError 431 when the request's headers total more than `max_bytes`."""
    total = sum(len(k) + len(v) for k, v in request.scope.get("headers", ()))
    if total > max_bytes:
        raise too_large("headers", max_bytes, 431)


async def read_body(request: Request, max_bytes: int = MAX_BODY_BYTES) -> bytes:
    """The request body (bytes); raises APIError 413 as soon as it passes `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request(f"bad Content-Length header {declared[:40]!r}", None, "invalid_header")
        if int(declared) > max_bytes:
            raise too_large("body", max_bytes)
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > max_bytes:  # chunked uploads declare no length: count as they come
            raise too_large("body", max_bytes)
    return bytes(buf)


def parse_json(raw: bytes) -> Any:
    """Decodes a JSON body; raises APIError 400 `invalid_json` for anything malformed."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, UnicodeDecodeError, int digits limit, deep nesting
        raise bad_request("the request body is not valid JSON", None, "invalid_json") from None


async def read_json(
    request: Request, max_body_bytes: int = MAX_BODY_BYTES, max_header_bytes: int = MAX_HEADER_BYTES
) -> Any:
    """Header check, capped body read, safe decode: the request's JSON value, or APIError 4xx."""
    check_headers(request, max_header_bytes)
    return parse_json(await read_body(request, max_body_bytes))


async def read_message(request: Request, cls: type[M]) -> M:
    """The request body as message `cls` (labkit.serve.messages), size-capped and strictly validated;
    APIError 4xx naming the first bad field (`param`) otherwise."""
    check_headers(request)
    raw = await read_body(request)
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        raise invalid(e, leaf=False) from None


def install_error_handlers(app: FastAPI, where: str, hint: str = "") -> None:
    """Every error `app` answers is an OpenAI-style JSON body: APIError with its status, an unknown
    route 404, a wrong method 405, anything unforeseen 500 (logged). `where` names the server."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return JSONResponse(bad_request(str(e), None).body(), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(
            error_body(
                f"internal error in the {where}: {e.__class__.__name__}: {e}",
                type="server_error",
                code="internal_error",
            ),
            status_code=500,
        )

    @app.exception_handler(404)
    async def _not_found(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(
                f"no route {request.method} {request.url.path} on this {where}{hint}",
                type="not_found_error",
                code="not_found",
            ),
            status_code=404,
        )

    @app.exception_handler(405)
    async def _bad_method(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(
            error_body(f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"),
            status_code=405,
        )


def run_server(app: FastAPI, host: str, port: int) -> None:
    """Serves `app` until SIGTERM/SIGINT, as the router and every worker do: quiet access log, 3 s to
    finish in-flight requests, idle connections kept SERVER_KEEP_ALIVE_S."""
    import uvicorn

    uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            timeout_graceful_shutdown=3,
            timeout_keep_alive=SERVER_KEEP_ALIVE_S,
        )
    ).run()
