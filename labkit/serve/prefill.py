"""The prefill side of a disaggregated request: submit the prompt, export its KV, send it on.

    whole  (default): the prefill runs, the engine exports the KV, one transfer sends it all.
    layers (`--kv-stream layers`): the engine hands each layer's KV to a `LayerFeed` as soon as
           it computed that layer (`on_layer_kv`); the feed opens the transfer at the first layer
           and the sender's writer moves each layer while the next ones compute, so when the
           prefill ends only the last layer's transfer is left.

Either way the engine decides whether the first token already ends the request (max_tokens 1,
a stop token): then nothing goes to the decode worker (a started layer stream is cut). The
router gets a PrefillResult, or an APIError: 400 for a bad request, 500 for an engine error,
503 `kv_transfer_failed` when the transfer fails (the decode side's problem).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, cast

from labkit.serve.engine_loop import EngineEvent
from labkit.serve.messages import FinishReason, PrefillRequest, PrefillResult
from labkit.serve.protocol import APIError, bad_request

if TYPE_CHECKING:
    from labkit.serve.worker import Worker


async def prefill(w: Worker, req: PrefillRequest, t0: float | None = None) -> PrefillResult:
    """Runs `req`'s prompt and sends its KV to `req.kv_endpoint`; returns the first token and timings
    (seconds from `t0`, when the worker took the request; default: now)."""
    t0 = time.perf_counter() if t0 is None else t0
    sender = open_sender(w, req.kv_endpoint) if req.kv_endpoint else None
    kv_stream = req.kv_stream or w.cfg.transfer.kv_stream
    feed = LayerFeed(w, sender, req) if sender is not None and kv_stream == "layers" else None
    try:
        ev = await submit(w, req, feed, after_prefill="export" if sender is not None and feed is None else "release")
    except BaseException:
        if feed is not None:
            await asyncio.to_thread(feed.abort)
        raise
    assert ev.token_id is not None  # submit() raised otherwise
    stats = None
    acked = window = 0.0
    flag = None
    if ev.finish_reason is not None or sender is None:  # the first token ended it, or nowhere to send
        if feed is not None:
            await asyncio.to_thread(feed.abort)
    else:
        stats = await send(w, sender, req, feed, ev)
        t_ack = time.perf_counter()
        acked = t_ack - t0
        # Bytes and seconds over one window. Whole: first token to ack (the export, the hop to the
        # sender's thread, the send). Layers: first layer handed over to ack, which overlaps the
        # prefill's compute, so it is no measure of the link and is not flagged.
        window = t_ack - (ev.t_s if feed is None else feed.began_s or ev.t_s)
        flag = w.check_transfer(stats.nbytes, window) if feed is None else None
    w.metrics.requests.labels("prefilled").inc()
    start = ev.prefill_start_s if ev.prefill_start_s is not None else ev.t_s
    return PrefillResult(
        request_id=req.request_id,
        first_token_id=ev.token_id,
        num_prompt_tokens=len(req.prompt_ids),
        finish_reason=cast("FinishReason | None", ev.finish_reason),
        cached_tokens=ev.cached_tokens,
        prefill_start_s=start - t0,
        prefill_s=ev.t_s - t0,
        kv_stream=kv_stream,
        kv_bytes=stats.nbytes if stats else 0,
        kv_transport=w.cfg.transfer.backend if stats else "",
        transfer_s=stats.seconds if stats else 0.0,
        kv_acked_s=acked,
        kv_window_s=window,
        kv_flag=flag,
        layer_sent_s=feed.sent_s(t0) if feed is not None and stats else [],
        reply_s=time.perf_counter() - t0,
    )


async def send(w: Worker, sender: Any, req: PrefillRequest, feed: LayerFeed | None, ev: EngineEvent) -> Any:
    """The KV to the decode worker (the exported KV whole, or the end of the layer stream); its
    TransferStats. 503 `kv_transfer_failed` on any transport failure."""
    assert req.kv_endpoint is not None and ev.token_id is not None
    try:
        if feed is not None:
            stats = await asyncio.to_thread(feed.finish, ev.token_id)
        else:
            stats = await asyncio.to_thread(sender.send, ev.kv, w.cfg.transfer.timeout_s)
    except Exception as e:  # noqa: BLE001 - any transport failure is the decode side's problem
        w.drop_sender(req.kv_endpoint)
        w.metrics.requests.labels("transfer_error").inc()
        raise APIError(
            503,
            f"KV transfer to {req.kv_endpoint} failed: {e.__class__.__name__}: {e}",
            type="service_unavailable_error",
            code="kv_transfer_failed",
        ) from None
    w.metrics.transfer_bytes.labels("send").inc(stats.nbytes)
    w.metrics.transfer_s.labels("send").observe(stats.seconds)  # the transport's clock: send start to ack
    return stats


def open_sender(w: Worker, endpoint: str) -> Any:
    """The Sender for `endpoint`; 400 when it names no known transport."""
    try:
        return w.sender(endpoint)
    except ValueError as e:  # the caller's mistake, not a transfer failure
        raise bad_request(f"bad 'kv_endpoint': {e}", "kv_endpoint") from None


async def submit(w: Worker, req: PrefillRequest, feed: LayerFeed | None, after_prefill: Any) -> EngineEvent:
    """The engine's one event for a prefill-only request: first token, finish reason, KV when exported."""
    q = await w.submit(req, after_prefill=after_prefill, on_layer_kv=feed)
    finished = False
    try:
        ev = await w.next_event(q, req.request_id)
        finished = True
    finally:
        if not finished:  # the router hung up: stop the prefill, free its blocks
            w.loop.abort(req.request_id)
    if ev.error is not None or ev.token_id is None:
        w.metrics.requests.labels("error").inc()
        raise APIError(
            500,
            ev.error or f"prefill ended with {ev.finish_reason!r} and no token",
            type="server_error",
            code="engine_error",
        )
    return ev


class LayerFeed:
    """The engine's `on_layer_kv` hook for one request, feeding a layer-wise transfer.

    Called on the engine thread, it only queues the layer (a copy the engine made) and never
    raises into the engine (that would fail the whole step). A thread opens the transfer at the
    first layer, so a request waiting in the prefill queue holds no connection open, and passes
    each layer to the stream, whose writer sends it while the engine computes the next one.
    """

    def __init__(self, w: Worker, sender: Any, req: PrefillRequest) -> None:
        from labkit.transfer.wire import KVMeta

        mc, ec = w.engine.model_config, w.cfg.engine
        self.meta = KVMeta(
            request_id=req.request_id,
            model_fingerprint=w.engine.model_fingerprint,
            prompt_ids=tuple(req.prompt_ids),
            num_layers=mc.num_layers,
            num_kv_heads=mc.num_kv_heads,
            head_dim=mc.head_dim,
            dtype=ec.dtype,
            block_size=ec.block_size,
        )
        self.sender = sender
        # The stream opens at layer 0 and ends after the last layer: its deadline covers the rest of the
        # prefill (bounded by the token timeout) plus the transfer's own bound.
        self.timeout_s = w.cfg.token_timeout_s + w.cfg.transfer.timeout_s
        self.stream: Any = None
        self.began_s: float | None = None  # perf_counter when the engine handed over the first layer
        self.error: BaseException | None = None
        self._layers: queue.Queue[tuple[int, Any, Any] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def __call__(self, request_id: str, layer: int, k: Any, v: Any) -> None:
        self._layers.put((layer, k, v))
        if self._thread is None:
            self.began_s = time.perf_counter()
            self._thread = threading.Thread(target=self._run, name="kv-layer-feed", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self.stream = self.sender.begin(self.meta, timeout_s=self.timeout_s)
            while (item := self._layers.get()) is not None:
                layer, k, v = item
                self.stream.send_layer(layer, k.cpu(), v.cpu())  # GPU layers leave through host memory
        except BaseException as e:  # noqa: BLE001 - raised by finish() in the caller's thread
            self.error = e

    def _join(self) -> None:
        self._layers.put(None)
        if self._thread is not None:
            self._thread.join(timeout=self.timeout_s)

    def finish(self, first_token_id: int) -> Any:
        """Waits for every layer to be handed over, ends the transfer; returns its TransferStats."""
        self._join()
        if self.error is None and (self.stream is None or (self._thread is not None and self._thread.is_alive())):
            self.error = TimeoutError(f"the layers of {self.meta.request_id!r} were not handed over in time")
        if self.error is not None:
            self.abort()
            raise self.error
        return self.stream.finish(first_token_id=first_token_id)

    def abort(self) -> None:
        """Cuts the transfer, if one started (the receiver fails that request)."""
        self._join()
        if self.stream is not None:
            self.stream.abort()

    def sent_s(self, t0: float) -> list[float]:
        """When each layer left the sender, seconds after `t0` (perf_counter), in layer order."""
        times = self.stream.layer_sent_s if self.stream is not None else {}
        return [times[i] - t0 for i in sorted(times)]
