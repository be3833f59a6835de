"""The engine inside a worker process: one thread owns it and runs `step()` in a loop.

The HTTP side (asyncio) never touches the engine. It sends commands through a queue; the
engine thread runs them between steps, and pushes every new token into the request's own
`asyncio.Queue` with `loop.call_soon_threadsafe`. So a long prefill blocks no health check,
and many streams share one batch (continuous batching).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger("labkit.serve.engine_loop")

# What happens to a prefill-only request's KV once its prefill is done: exported (a KVExport for the
# whole-KV transfer) or released (its layers already left through on_layer_kv, or nothing is sent).
KVAfterPrefill = Literal["export", "release"]


@dataclass(frozen=True, slots=True)
class EngineEvent:
    """What a request's queue receives: a token, or the end (finish_reason), or an error.

    A prefill-only request gets one event: its first token and either the engine's finish reason
    (the first token ends it) or None with the KV held (`kv`: the KVExport when exported). `t_s`:
    `time.perf_counter()` on the engine thread when the step that produced it ended (an exported
    KV is gathered after that). A request's first token also says when its prefill began
    (`prefill_start_s`: perf_counter at the start of the step that ran its first prompt chunk)
    and how many prompt tokens the prefix cache served (`cached_tokens`).
    """

    token_id: int | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    error: str | None = None
    kv: Any = None
    t_s: float = field(default_factory=time.perf_counter)
    prefill_start_s: float | None = None
    cached_tokens: int = 0


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[EngineEvent]
    after_prefill: KVAfterPrefill | None = None  # None: a streaming request
    prefill_start_s: float | None = None  # handed out with the first token, then cleared
    cached_tokens: int = 0
    sent_first: bool = False

    def first_marks(self) -> dict[str, Any]:
        """The first token's prefill marks (once per stream; {} after)."""
        if self.sent_first:
            return {}
        self.sent_first = True
        return {"prefill_start_s": self.prefill_start_s, "cached_tokens": self.cached_tokens}


class EngineLoop:
    """Owns `engine`; call `start()`, then `submit`/`submit_kv`/`abort` from the event loop.

    `on_step(step_output)` runs on the engine thread after every step; `on_error()` after a step
    that raised (its requests fail, the worker stays up).
    """

    def __init__(
        self, engine: Any, *, on_step: Callable[[Any], None] | None = None, on_error: Callable[[], None] | None = None
    ) -> None:
        self.engine = engine
        self._on_step = on_step
        self._on_error = on_error
        self._cmds: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._step_tokens: list[tuple[str, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)

    # --- event-loop side -----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._cmds.put(lambda: None)
        self._thread.join(timeout=timeout_s)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_running(self) -> int:
        """Requests submitted and not finished (running or waiting in the engine)."""
        return len(self._streams)

    def call(self, fn: Callable[[Any], Any]) -> concurrent.futures.Future[Any]:
        """Runs `fn(engine)` on the engine thread between steps; returns a future of its result."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn(self.engine))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

        self._cmds.put(run)
        return fut

    async def submit(
        self,
        prompt_ids: list[int],
        sampling: Any,
        request_id: str,
        *,
        after_prefill: KVAfterPrefill | None = None,
        on_layer_kv: Callable[..., None] | None = None,
    ) -> asyncio.Queue[EngineEvent]:
        """Adds a request; returns its event queue. Raises what `add_request` raises (ValueError).

        `after_prefill`: the request is prefill-only (the engine's policy), and its KV is then
        exported or released. `on_layer_kv`: the engine's per-layer hook (on the engine thread).
        """
        return await self._add(
            request_id,
            after_prefill,
            lambda eng, cb: eng.add_request(
                list(prompt_ids), sampling, request_id=request_id, on_token=cb, on_layer_kv=on_layer_kv
            ),
        )

    async def submit_kv(self, kv: Any, sampling: Any, request_id: str) -> asyncio.Queue[EngineEvent]:
        """Adopts a received KVExport and decodes from it; returns its event queue."""
        return await self._add(
            request_id, None, lambda eng, cb: eng.import_kv(kv, sampling, request_id=request_id, on_token=cb)
        )

    async def _add(
        self, request_id: str, after_prefill: KVAfterPrefill | None, add: Callable[[Any, Any], Any]
    ) -> asyncio.Queue[EngineEvent]:
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), after_prefill)

        def run(eng: Any) -> None:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already running")
            self._streams[request_id] = stream
            try:
                add(eng, self._on_token)
            except BaseException:
                self._streams.pop(request_id, None)
                raise

        await self._wait(self.call(run))
        return stream.queue

    async def _wait(self, fut: concurrent.futures.Future[Any], timeout_s: float = 60.0) -> Any:
        """A command's result; TimeoutError if the engine thread does not get to it (stuck or dead)."""
        if not self.alive:
            raise RuntimeError("the engine thread is not running")
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout=timeout_s)
        except TimeoutError:
            fut.cancel()
            raise TimeoutError(f"the engine thread did not take the request within {timeout_s:.0f} s") from None

    def abort(self, request_id: str) -> None:
        """Stops a request (client gone); frees its KV blocks. Does not wait."""

        def ab(eng: Any) -> None:
            st = self._streams.pop(request_id, None)
            try:
                eng.abort(request_id)
            except Exception as e:  # noqa: BLE001 - an unknown id is fine here
                log.debug("abort %s: %s", request_id, e)
            if st is not None:
                self._push(st, EngineEvent(finish_reason="abort"))

        self.call(ab)

    # --- engine-thread side -------------------------------------------------------------
    def _push(self, st: _Stream, ev: EngineEvent) -> None:
        try:
            st.loop.call_soon_threadsafe(st.queue.put_nowait, ev)
        except RuntimeError:  # the event loop is closed: shutting down
            pass

    def _on_token(self, request_id: str, token_id: int, finished: bool) -> None:
        # Held until the step ends, so a request's last token travels with its finish reason.
        self._step_tokens.append((request_id, int(token_id)))

    def _run(self) -> None:
        eng = self.engine
        while not self._stop.is_set():
            busy = self._has_work()
            try:  # commands first, so adds and aborts land between steps
                cmd = self._cmds.get_nowait() if busy else self._cmds.get(timeout=0.05)
                cmd()
                while True:
                    self._cmds.get_nowait()()
            except queue.Empty:
                pass
            if self._stop.is_set() or not self._has_work():
                continue
            t_step = time.perf_counter()
            try:
                out = eng.step()
            except Exception as e:
                log.exception("engine step failed")
                if self._on_error is not None:
                    self._on_error()
                self._fail_all(f"engine step failed: {e.__class__.__name__}: {e}")
                continue
            t_end = time.perf_counter()
            for rid, cached in out.prefill_started.items():
                if (st0 := self._streams.get(rid)) is not None:
                    st0.prefill_start_s, st0.cached_tokens = t_step, cached
            finished = {ro.request_id: ro for ro in out.finished}
            tokens, self._step_tokens = self._step_tokens, []
            last_index = {rid: i for i, (rid, _) in enumerate(tokens)}
            for i, (rid, tok) in enumerate(tokens):
                st = self._streams.get(rid)
                if st is None or st.after_prefill is not None:
                    continue
                ro = finished.get(rid) if last_index[rid] == i else None
                if ro is not None:
                    del finished[rid]
                    self._streams.pop(rid, None)
                self._push(
                    st,
                    EngineEvent(
                        token_id=tok,
                        finish_reason=ro.finish_reason if ro is not None else None,
                        t_s=t_end,
                        **st.first_marks(),
                    ),
                )
            for ro in finished.values():
                self._finish(ro, t_end)
            if self._on_step is not None:
                self._on_step(out)
        self._fail_all("worker shutting down")

    def _has_work(self) -> bool:
        try:
            return bool(self.engine.has_unfinished())
        except Exception:  # noqa: BLE001 - a broken engine has no work we can do
            return False

    def _finish(self, ro: Any, t_end: float) -> None:
        st = self._streams.pop(ro.request_id, None)
        if st is None:
            return
        if st.after_prefill is None:
            self._push(st, EngineEvent(finish_reason=ro.finish_reason))
            return
        first = ro.output_token_ids[0] if ro.output_token_ids else None
        if ro.finish_reason != "prefilled":  # the first token ended it (or an abort): no KV is held
            self._push(st, EngineEvent(token_id=first, finish_reason=ro.finish_reason, t_s=t_end, **st.first_marks()))
            return
        try:
            kv = self.engine.export_kv(ro.request_id) if st.after_prefill == "export" else None  # frees the blocks
            if kv is None:
                self.engine.release(ro.request_id)
        except Exception as e:  # noqa: BLE001 - the request fails, the worker stays up
            self._push(st, EngineEvent(error=f"export_kv failed: {e.__class__.__name__}: {e}"))
            return
        self._push(st, EngineEvent(token_id=first, kv=kv, t_s=t_end, **st.first_marks()))

    def _fail_all(self, message: str) -> None:
        for rid, st in list(self._streams.items()):
            self._streams.pop(rid, None)
            try:
                self.engine.abort(rid)
            except Exception as e:  # noqa: BLE001 - failing everything anyway
                log.debug("abort %s: %s", rid, e)
            self._push(st, EngineEvent(error=message))
