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
from dataclasses import dataclass, field
from typing import Any, Callable

log = logging.getLogger("labkit.serve.engine_loop")


@dataclass(frozen=True, slots=True)
class TokenEvent:
    """What a request's queue receives: a token, or the end (finish_reason), or an error."""

    token_id: int | None = None
    finish_reason: str | None = None   # "stop" | "length" | "abort" | "prefilled"
    error: str | None = None
    kv: Any = None                     # KVExport, on the last event of a prefill-only request


@dataclass(slots=True)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent]
    export_kv: bool = False
    t_added_s: float = field(default_factory=time.perf_counter)


@dataclass(slots=True)
class LoopStats:
    """Counters the engine thread keeps (read by /health and /metrics; plain ints, no lock needed)."""

    steps: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0, "mixed": 0})
    step_seconds: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0, "mixed": 0.0})
    prefill_tokens: int = 0
    decode_tokens: int = 0
    finished: int = 0
    errors: int = 0


class EngineLoop:
    """Owns `engine`; call `start()`, then `submit`/`submit_kv`/`abort` from the event loop."""

    def __init__(self, engine: Any, *, on_step: Callable[[Any], None] | None = None) -> None:
        self.engine = engine
        self.stats = LoopStats()
        self._on_step = on_step
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

    def call(self, fn: Callable[[Any], Any], timeout_s: float = 60.0) -> concurrent.futures.Future[Any]:
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

    async def submit(self, prompt_ids: list[int], sampling: Any, request_id: str, *,
                     export_kv: bool = False) -> asyncio.Queue[TokenEvent]:
        """Adds a request; returns its event queue. Raises what `add_request` raises (ValueError)."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), export_kv=export_kv)

        def add(eng: Any) -> None:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already running")
            self._streams[request_id] = stream
            try:
                eng.add_request(list(prompt_ids), sampling, request_id=request_id, on_token=self._on_token)
            except BaseException:
                self._streams.pop(request_id, None)
                raise
        await self._wait(self.call(add))
        return stream.queue

    async def submit_kv(self, kv: Any, sampling: Any, request_id: str) -> asyncio.Queue[TokenEvent]:
        """Adopts a received KVExport and decodes from it; returns its event queue."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())

        def imp(eng: Any) -> None:
            if request_id in self._streams:
                raise ValueError(f"request_id {request_id!r} is already running")
            self._streams[request_id] = stream
            try:
                eng.import_kv(kv, sampling, request_id=request_id, on_token=self._on_token)
            except BaseException:
                self._streams.pop(request_id, None)
                raise
        await self._wait(self.call(imp))
        return stream.queue

    async def _wait(self, fut: concurrent.futures.Future[Any], timeout_s: float = 60.0) -> Any:
        """A command's result; TimeoutError if the engine thread does not get to it (stuck or dead)."""
        if not self.alive:
            raise RuntimeError("the engine thread is not running")
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout=timeout_s)
        except asyncio.TimeoutError:
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
                self._push(st, TokenEvent(finish_reason="abort"))
        self.call(ab)

    # --- engine-thread side -------------------------------------------------------------
    def _push(self, st: _Stream, ev: TokenEvent) -> None:
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
            try:
                out = eng.step()
            except Exception as e:  # noqa: BLE001 - fail the requests, keep the worker up
                log.exception("engine step failed")
                self.stats.errors += 1
                self._fail_all(f"engine step failed: {e.__class__.__name__}: {e}")
                continue
            self._account(out)
            finished = {ro.request_id: ro for ro in out.finished}
            tokens, self._step_tokens = self._step_tokens, []
            last_index = {rid: i for i, (rid, _) in enumerate(tokens)}
            for i, (rid, tok) in enumerate(tokens):
                st = self._streams.get(rid)
                if st is None or st.export_kv:
                    continue
                ro = finished.get(rid) if last_index[rid] == i else None
                if ro is not None:
                    del finished[rid]
                    self._streams.pop(rid, None)
                    self.stats.finished += 1
                self._push(st, TokenEvent(token_id=tok, finish_reason=ro.finish_reason if ro is not None else None))
            for ro in finished.values():
                self._finish(ro)
            if self._on_step is not None:
                self._on_step(out)
        self._fail_all("worker shutting down")

    def _has_work(self) -> bool:
        try:
            return bool(self.engine.has_unfinished())
        except Exception:  # noqa: BLE001
            return False

    def _account(self, out: Any) -> None:
        phase = getattr(out, "phase", "idle")
        if phase in self.stats.steps:
            self.stats.steps[phase] += 1
            self.stats.step_seconds[phase] += float(getattr(out, "elapsed_s", 0.0) or 0.0)
        self.stats.prefill_tokens += int(getattr(out, "num_prefill_tokens", 0) or 0)
        self.stats.decode_tokens += int(getattr(out, "num_decode_seqs", 0) or 0)

    def _finish(self, ro: Any) -> None:
        st = self._streams.pop(ro.request_id, None)
        if st is None:
            return
        self.stats.finished += 1
        if st.export_kv:
            try:
                kv = self.engine.export_kv(ro.request_id)  # frees the prefill blocks at once
            except Exception as e:  # noqa: BLE001
                self._push(st, TokenEvent(error=f"export_kv failed: {e.__class__.__name__}: {e}"))
                return
            first = ro.output_token_ids[0] if ro.output_token_ids else kv.first_token_id
            self._push(st, TokenEvent(token_id=int(first), finish_reason=ro.finish_reason, kv=kv))
        else:
            self._push(st, TokenEvent(finish_reason=ro.finish_reason))

    def _fail_all(self, message: str) -> None:
        for rid, st in list(self._streams.items()):
            self._streams.pop(rid, None)
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001
                pass
            self._push(st, TokenEvent(error=message))
