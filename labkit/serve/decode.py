"""The decode side of a disaggregated request: receive its KV, adopt it, stream the tokens.

    kv = await receive(worker, req)        # from the transport's inbox (504 / 502 when it fails)
    q = await adopt(worker, req, kv)       # Engine.import_kv, on the engine thread
    token_lines(worker, q, request_id, t0, ready_s)   # TokenEvent lines until the request ends

A mono worker's request streams through `token_lines` too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

from labkit.engine.config import RequestError
from labkit.serve.engine_loop import EngineEvent
from labkit.serve.messages import DecodeRequest, ErrorInfo, FinishReason, StreamTiming, TokenEvent
from labkit.serve.protocol import APIError, bad_request

if TYPE_CHECKING:
    from labkit.serve.worker import Worker


async def receive(w: Worker, req: DecodeRequest) -> Any:
    """The request's KVExport, once it arrived whole; APIError 504 (`kv_timeout`) or 502 (broken)."""
    timeout_s = req.timeout_s or w.cfg.transfer.timeout_s
    t0 = time.perf_counter()
    try:
        kv = await asyncio.to_thread(w.receiver.recv, req.request_id, timeout_s)
    except TimeoutError:
        raise APIError(
            504,
            f"no KV arrived for request {req.request_id!r} within {timeout_s:g} s",
            type="timeout_error",
            code="kv_timeout",
        ) from None
    except Exception as e:  # noqa: BLE001 - TransferError and kin: the KV is unusable
        raise APIError(
            502,
            f"the KV of request {req.request_id!r} arrived broken: {e.__class__.__name__}: {e}",
            type="server_error",
            code="kv_transfer_failed",
        ) from None
    # Bytes only: the transfer time is the sender's to measure; this was the wait for it.
    w.metrics.transfer_bytes.labels("recv").inc(kv.nbytes)
    w.metrics.kv_wait_s.observe(time.perf_counter() - t0)
    return kv


async def adopt(w: Worker, req: DecodeRequest, kv: Any) -> asyncio.Queue[EngineEvent]:
    """Hands the KV to the engine (`import_kv`); returns the request's event queue. 400 if it does not fit."""
    try:
        return await w.loop.submit_kv(kv, req.sampling, req.request_id)
    except RequestError as e:
        raise bad_request(str(e), e.param, e.code) from None
    except ValueError as e:
        raise bad_request(f"the KV does not fit this decode worker: {e}", None, "kv_mismatch") from None


async def token_lines(
    w: Worker, q: asyncio.Queue[EngineEvent], request_id: str, t0: float, ready_s: float | None = None
) -> AsyncIterator[bytes]:
    """TokenEvent lines (NDJSON) until the request ends; aborts it in the engine if the client goes away.

    The first line carries StreamTiming, seconds from `t0` (when the worker took the request):
    `ready_s` given (decode: its KV adopted), or the engine's prefill marks (mono).
    """
    done = False
    first = True
    try:
        while not done:
            ev = await w.next_event(q, request_id)
            done = ev.error is not None or ev.finish_reason is not None
            outcome = "error" if ev.error is not None else ev.finish_reason
            if outcome is not None:
                w.metrics.requests.labels(outcome).inc()
            error = None if ev.error is None else ErrorInfo(message=ev.error, code="engine_error")
            reason = cast("FinishReason | None", ev.finish_reason)  # a streaming request never ends "prefilled"
            timing = None
            if first and ev.token_id is not None:
                first = False
                if ready_s is not None:
                    timing = StreamTiming(ready_s=ready_s, sent_s=time.perf_counter() - t0)
                else:
                    start = ev.prefill_start_s if ev.prefill_start_s is not None else ev.t_s
                    timing = StreamTiming(
                        ready_s=start - t0,
                        first_token_s=ev.t_s - t0,
                        cached_tokens=ev.cached_tokens,
                        sent_s=time.perf_counter() - t0,
                    )
            yield TokenEvent(token_id=ev.token_id, finish_reason=reason, error=error, timing=timing).line()
    finally:
        if not done:
            w.loop.abort(request_id)
            w.metrics.requests.labels("client_gone").inc()
