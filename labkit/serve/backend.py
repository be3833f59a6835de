"""What the router sends a request to: the `DisaggBackend` interface and the lab's implementation.

The router (router.py) speaks OpenAI to clients: it validates, counts, times, and formats
SSE. A backend turns one validated `CompletionRequest` into a stream of `Piece`s (text plus
how many tokens it carries). Any server fits behind the router by implementing `DisaggBackend`.

`LabBackend` fronts the lab's own workers: `mono` workers, or `prefill` + `decode` workers
(the KV moves worker to worker over the transport; the router carries only the control
messages of labkit.serve.messages). The prefill (or mono) worker is chosen by a policy
(labkit.serve.routing), the decode worker by load. With a `prefill_threshold` (selective
disaggregation), a prompt the decode worker would have to prefill less than that much of is
prefilled there instead (`LabBackend.prefills_on_decode`). It times each request on the way
(labkit.serve.waterfall: the first Piece carries a RequestTiming that the router reports).
The router finds a backend by name (`router.BACKENDS`: "lab" here, "vllm" in
labkit.vllm.pd_backend) or by `module:function`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from pydantic import ValidationError

from labkit.serve.config import RouterConfig, check_prefill_threshold
from labkit.serve.limits import CLIENT_KEEP_ALIVE_S
from labkit.serve.messages import (
    DecodeRequest,
    GenerateRequest,
    PrefillRequest,
    PrefillResult,
    StreamTiming,
    TokenEvent,
)
from labkit.serve.metrics import RouterMetrics
from labkit.serve.prefix_index import ActiveBlocks, PrefixIndex, block_hashes
from labkit.serve.protocol import APIError, CompletionRequest, unavailable
from labkit.serve.routing import PrefillCandidate, PrefillPolicy, choose, load_policy
from labkit.serve.textstream import TextStream
from labkit.serve.upstream import Upstream, UpstreamPool
from labkit.serve.waterfall import RequestTiming
from labkit.sse import aiter_sse_lines

log = logging.getLogger("labkit.serve.backend")


@dataclass(frozen=True, slots=True)
class Piece:
    """A bit of output: `text` to send now and the `num_tokens` it took (text may be "" while held)."""

    text: str
    num_tokens: int
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None  # set on the last piece: "stop" | "length" | "abort"
    completion_tokens: int | None = None  # a backend that knows the exact total says so at the end
    prompt_tokens: int | None = None
    timing: RequestTiming | None = None  # on the first piece: where the TTFT went (filled as it goes)


class DisaggBackend(Protocol):
    """What the router needs of a backend. `generate` raises `APIError` (503 when no upstream is up or one
    died) before its first piece, or while streaming; the router turns it into an HTTP error or an SSE
    error event."""

    pool: UpstreamPool  # its upstreams: health, load, /health, /metrics
    uses_token_ids: bool  # True: the router tokenizes and passes prompt_ids

    async def start(self) -> None: ...  # open clients, first health poll

    async def close(self) -> None: ...

    def context_len(self) -> int | None:
        """The context its upstreams serve (tokens), when they say; None: unknown."""

    def generate(
        self, req: CompletionRequest, prompt_ids: list[int] | None, request_id: str
    ) -> AsyncGenerator[Piece, None]: ...


CONNECT_TIMEOUT_S = 2.0  # an upstream on loopback or a LAN accepts a connection in far less
CONN_ERRORS = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def upstream_error(u: Upstream, e: Exception) -> APIError:
    """The client-facing error when an upstream fails mid-request."""
    if isinstance(e, httpx.TimeoutException):
        return APIError(
            504,
            f"{u.role} worker {u.name} did not answer in time ({e.__class__.__name__})",
            type="timeout_error",
            code="upstream_timeout",
        )
    return unavailable(f"{u.role} worker {u.name} failed: {e.__class__.__name__}; retry the request")


async def error_from_response(r: httpx.Response) -> APIError:
    """An upstream's non-200 answer as an APIError with the same status and message."""
    try:
        raw = await r.aread()
        err = json.loads(raw).get("error", {})
        return APIError(
            r.status_code,
            str(err.get("message", raw[:200])),
            type=err.get("type") or "server_error",
            param=err.get("param"),
            code=err.get("code"),
        )
    except (ValueError, AttributeError, httpx.HTTPError):
        return APIError(
            r.status_code if r.status_code >= 400 else 502,
            f"upstream answered HTTP {r.status_code}",
            type="server_error",
        )


class HttpBackend:
    """What every backend over HTTP upstreams shares: the mode its pool implies and one client.

    A pool of only `mono` upstreams serves monolithically; `prefill` + `decode` upstreams
    serve disaggregated. Subclasses implement `generate`.
    """

    uses_token_ids = True

    def __init__(self, cfg: RouterConfig, pool: UpstreamPool) -> None:
        """The HTTP client waits `cfg.read_timeout_s` for an upstream's next bytes and uses the pool's
        `transport` (tests: in-process ASGI apps)."""
        roles = pool.roles()
        if roles == {"mono"}:
            self.mode = "mono"
        elif roles == {"prefill", "decode"}:
            self.mode = "disagg"
        else:
            raise ValueError(
                f"a {type(self).__name__} needs only mono upstreams, or prefill and decode upstreams; "
                f"got roles {sorted(roles)}"
            )
        self.pool = pool
        self._timeout = httpx.Timeout(connect=CONNECT_TIMEOUT_S, read=cfg.read_timeout_s, write=10.0, pool=10.0)
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            timeout=self._timeout,
            limits=httpx.Limits(max_connections=1000, keepalive_expiry=CLIENT_KEEP_ALIVE_S),
            transport=self.pool.transport,
        )
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()
        if self._client is not None:
            await self._client.aclose()

    def context_len(self) -> int | None:
        return None

    @contextmanager
    def calling(self, u: Upstream, path: str) -> Iterator[None]:
        """Counts a request in flight on `u`; a broken connection marks `u` down and becomes a 503,
        a timeout a 504 (both as APIError)."""
        u.in_flight += 1
        try:
            yield
        except CONN_ERRORS as e:
            self.pool.mark_down(u, f"{path}: {e.__class__.__name__}")
            raise upstream_error(u, e) from e  # the cause tells a caller whether a retry is safe
        except httpx.TimeoutException as e:
            raise upstream_error(u, e) from None
        finally:
            u.in_flight -= 1


class LabBackend(HttpBackend):
    """The lab's workers behind a KV-aware choice: mono, or prefill + decode (the router's "lab" backend,
    built from its RouterConfig; the prefill policy is loaded now, so a bad spec stops the router at start)."""

    def __init__(self, cfg: RouterConfig, pool: UpstreamPool, metrics: RouterMetrics, tokenizer: Any) -> None:
        super().__init__(cfg, pool)
        self.prefill_threshold = check_prefill_threshold(cfg.prefill_threshold, self.mode)
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.policy: PrefillPolicy = load_policy(cfg.prefill_policy)
        self.index = PrefixIndex()
        self.active = ActiveBlocks()  # blocks of the requests open on each worker (a policy's load)
        self.block_size: int | None = None  # the workers' own, from their first /health
        self._flag_logged_s: dict[str, float] = {}
        self.transfer_timeout_s = cfg.transfer_timeout_s
        pool.on_down = self._forget
        pool.on_up = self._sized

    def _forget(self, u: Upstream) -> None:
        self.index.remove_instance(u.name)

    def _sized(self, u: Upstream) -> None:
        """A worker came up: its block size keys the prefix index, its pool bounds what is remembered."""
        if u.health is None:
            return
        if self.prefill_threshold and u.role == "decode" and u.health.policy == "decode_only":
            self.pool.mark_down(
                u,
                f"prefill_threshold is {self.prefill_threshold} tokens but this decode worker "
                "cannot prefill (start it with local_prefill, as launch(prefill_threshold=...) does)",
            )
            return
        if self.block_size is None:
            self.block_size = u.health.block_size
        elif u.health.block_size != self.block_size:
            self.pool.mark_down(
                u,
                f"block_size {u.health.block_size} differs from the other workers' "
                f"{self.block_size}: its prefix chains would never match",
            )
            return
        self.index.set_capacity(u.name, u.health.kv_blocks_total)

    def context_len(self) -> int | None:
        lens = [u.health.max_model_len for u in self.pool.upstreams if u.up and u.health is not None]
        return min(lens) if lens else None

    # --- routing -----------------------------------------------------------------------
    def _up(self, role: str, exclude: set[str] | None = None) -> list[Upstream]:
        cands = [u for u in self.pool.by_role(role) if u.name not in (exclude or ())]
        if not cands:
            raise unavailable(f"no {role} worker is up; check `GET /health` on the router", code="no_upstream")
        return cands

    def pick_by_prefix(self, role: str, hashes: list[bytes], exclude: set[str], prompt_tokens: int) -> Upstream:
        """The up instance (not in `exclude`) the prefill policy chooses."""
        cands = self._up(role, exclude)
        matched = self.index.match(hashes, [u.name for u in cands])
        views = [
            PrefillCandidate(
                u.name,
                matched[u.name],
                u.load,
                u.health.kv_blocks_free if u.health else 0,
                u.health.kv_blocks_total if u.health else 0,
                active_blocks=self.active.count(u.name),
                cached_blocks=self.index.num_blocks(u.name),
                prompt_tokens=prompt_tokens,
                block_size=self.block_size or 0,
            )
            for u in cands
        ]
        try:
            chosen = choose(self.policy, hashes, views)
        except Exception as e:  # noqa: BLE001 - a learner's policy may fail any way: say so, per request
            raise APIError(
                500,
                f"the prefill policy failed: {e.__class__.__name__}: {e}",
                type="server_error",
                code="routing_policy_error",
            ) from None
        best = next(u for u in cands if u.name == chosen.name)
        n = matched[best.name]
        reason = "only" if len(cands) == 1 else ("prefix" if n > 0 and n > min(matched.values()) else "load")
        self.metrics.decisions.labels(role, best.name, reason).inc()
        if n and self.block_size:
            self.metrics.prefix_hit_tokens.labels(best.name).inc(n * self.block_size)
        return best

    @contextmanager
    def opened(self, u: Upstream, hashes: list[bytes], prompt_tokens: int) -> Iterator[None]:
        """Counts the request's blocks as active on `u` while it is open there (Dynamo's decode-blocks load)."""
        partial = bool(self.block_size) and prompt_tokens % (self.block_size or 1) != 0
        self.active.add(u.name, hashes, partial)
        try:
            yield
        finally:
            self.active.remove(u.name, hashes, partial)

    def _flagged(self, u: Upstream, flag: str) -> None:
        """A prefill worker flagged its KV transfer as far below this host's figure: counted, logged every 30 s."""
        self.metrics.kv_slow.labels(u.name).inc()
        if time.monotonic() - self._flag_logged_s.get(u.name, -1e9) > 30.0:
            self._flag_logged_s[u.name] = time.monotonic()
            log.warning("%s: %s", u.name, flag)

    def pick_by_load(self, role: str) -> Upstream:
        """The up instance with the fewest requests open or running (then the most free KV blocks)."""
        cands = self._up(role)
        best = min(cands, key=lambda u: u.load_key())
        self.metrics.decisions.labels(role, best.name, "only" if len(cands) == 1 else "load").inc()
        return best

    # --- generation ----------------------------------------------------------------------
    async def generate(
        self, req: CompletionRequest, prompt_ids: list[int] | None, request_id: str
    ) -> AsyncGenerator[Piece, None]:
        assert prompt_ids is not None and self._client is not None
        text = TextStream(self.tokenizer, req.stop)
        hashes = block_hashes(prompt_ids, self.block_size) if self.block_size else []
        msg = GenerateRequest(request_id=request_id, prompt_ids=prompt_ids, sampling=req.sampling())
        timing = RequestTiming(self.mode, prompt_tokens=len(prompt_ids))
        lines = (
            self._mono_lines(msg, hashes, timing) if self.mode == "mono" else self._disagg_lines(msg, hashes, timing)
        )
        tm: RequestTiming | None = timing
        async with aclosing(lines):  # an early return (stop string) closes the upstream stream now
            async for token_id, finish in lines:
                if token_id is not None:
                    delta = text.push(token_id)
                    if text.stopped:
                        yield Piece(delta, 1, (token_id,), finish_reason="stop", timing=tm)
                        return
                    if finish is not None:
                        yield Piece(delta + text.flush(), 1, (token_id,), finish_reason=finish, timing=tm)
                        return
                    yield Piece(delta, 1, (token_id,), timing=tm)
                    tm = None
                elif finish is not None:
                    yield Piece(text.flush(), 0, (), finish_reason=finish, timing=tm)
                    return
        raise unavailable("the worker closed the stream before the request finished")

    async def _stream_lines(
        self,
        u: Upstream,
        path: str,
        msg: GenerateRequest | DecodeRequest,
        on_timing: Callable[[StreamTiming, float, float], None] | None = None,
        caches: list[bytes] | None = None,
    ) -> AsyncGenerator[tuple[int | None, str | None], None]:
        """(token_id, finish_reason) from a worker's TokenEvent lines; APIError on any failure.
        `on_timing(timing, sent_at, got_at)`: the first line's StreamTiming, with when the request
        left and that line arrived (perf_counter). `caches`: the prompt's block hashes, which the
        prefix index records as cached on `u` once its first line arrived (its engine holds the
        prompt's KV from then on: prefilled, or adopted)."""
        assert self._client is not None
        with self.calling(u, path):
            sent_at = time.perf_counter()
            async with self._client.stream("POST", u.url + path, json=msg.model_dump(mode="json")) as r:
                if r.status_code != 200:
                    raise await error_from_response(r)
                async for line in aiter_sse_lines(r):
                    if not line:
                        continue
                    try:
                        ev = TokenEvent.model_validate_json(line)
                    except ValidationError:
                        raise APIError(
                            502,
                            f"{u.role} worker {u.name} sent a bad line: {line[:200]!r}",
                            type="server_error",
                            code="bad_upstream_reply",
                        ) from None
                    if ev.error is not None:
                        raise APIError(
                            500,
                            f"{u.role} worker {u.name}: {ev.error.message}",
                            type="server_error",
                            code=ev.error.code,
                        )
                    if ev.timing is not None and on_timing is not None:
                        on_timing(ev.timing, sent_at, time.perf_counter())
                    if caches:
                        self.index.insert(u.name, caches)
                        caches = None
                    yield ev.token_id, ev.finish_reason
                    if ev.finish_reason is not None:
                        return

    async def _mono_lines(
        self,
        msg: GenerateRequest,
        hashes: list[bytes],
        timing: RequestTiming,
    ) -> AsyncGenerator[tuple[int | None, str | None], None]:
        tried: set[str] = set()
        n = len(msg.prompt_ids)
        while True:
            u = self.pick_by_prefix("mono", hashes, tried, n)
            tried.add(u.name)
            started = False

            def first_line(t: StreamTiming, sent_at: float, got_at: float, name: str = u.name) -> None:
                timing.mono_first_line(t, name, sent_at, got_at)

            try:
                with self.opened(u, hashes, n):
                    lines = self._stream_lines(u, "/internal/generate", msg, first_line, hashes)
                    async with aclosing(lines) as items:
                        async for item in items:
                            if not started:
                                started = True
                                self.metrics.prefills.labels("mono", u.name).inc()
                            yield item
                return
            except APIError as e:
                # Nothing reached the client yet and the worker is down: try another one.
                if started or e.status != 503 or not self.pool.by_role("mono"):
                    raise

    async def _disagg_lines(
        self,
        msg: GenerateRequest,
        hashes: list[bytes],
        timing: RequestTiming,
    ) -> AsyncGenerator[tuple[int | None, str | None], None]:
        assert self._client is not None
        d = self.pick_by_load("decode")
        if self.prefills_on_decode(d, len(msg.prompt_ids), hashes):

            def local_first_line(t: StreamTiming, sent_at: float, got_at: float) -> None:
                timing.mono_first_line(t, d.name, sent_at, got_at)  # prefilled where it decodes: no KV transfer

            async with aclosing(self._stream_lines(d, "/internal/generate", msg, local_first_line, hashes)) as items:
                async for item in items:
                    yield item
            return
        tried: set[str] = set()
        n = len(msg.prompt_ids)
        while True:  # the prefill step is retried on another prefill worker if one is down
            p = self.pick_by_prefix("prefill", hashes, tried, n)
            if d.health is None or d.health.kv_endpoint is None:
                raise unavailable(f"decode worker {d.name} announced no KV endpoint (is it a lab decode worker?)")
            tried.add(p.name)
            pre = PrefillRequest(**dict(msg), kv_endpoint=d.health.kv_endpoint)
            sent_at = time.perf_counter()
            try:
                with self.calling(p, "/internal/prefill"), self.opened(p, hashes, n):
                    r = await self._client.post(p.url + "/internal/prefill", json=pre.model_dump(mode="json"))
            except APIError as e:
                # Refused or cut before the worker read it: another prefill worker may take the request.
                # Not after a ReadError: that worker may have it, and its KV may be on the way.
                unsent = isinstance(e.__cause__, CONN_ERRORS) and not isinstance(e.__cause__, httpx.ReadError)
                if unsent and self.pool.by_role("prefill"):
                    continue
                raise
            reply_at = time.perf_counter()
            if r.status_code != 200:
                raise await error_from_response(r)
            try:
                res = PrefillResult.model_validate_json(r.content)
            except ValidationError:
                raise APIError(
                    502,
                    f"prefill worker {p.name} sent a bad reply: {r.text[:200]!r}",
                    type="server_error",
                    code="bad_upstream_reply",
                ) from None
            timing.prefill_reply(res, p.name, sent_at, reply_at)
            if res.kv_flag:
                self._flagged(p, res.kv_flag)
            self.index.insert(p.name, hashes)
            self.metrics.prefills.labels("prefill", p.name).inc()
            # With a finish reason (the engine's word: the first token ends it) generate() stops here.
            yield res.first_token_id, res.finish_reason
            break
        dec = DecodeRequest(request_id=msg.request_id, sampling=msg.sampling, timeout_s=self.transfer_timeout_s)

        def admitted(t: StreamTiming, sent_at: float, got_at: float) -> None:
            timing.decode_upstream, timing.decode_admit_s = d.name, t.ready_s

        async with aclosing(self._stream_lines(d, "/internal/decode", dec, admitted, hashes)) as items:
            async for item in items:
                yield item

    def prefills_on_decode(self, d: Upstream, num_prompt: int, hashes: list[bytes]) -> bool:
        """Selective disaggregation, llm-d's decider and the one place it is decided: True when the part of
        the prompt decode worker `d` does not cache (the prefix index's matched blocks) is shorter than
        `prefill_threshold` tokens, so `d` prefills it itself (no prefill worker, no KV transfer).
        Counts the prompt under `labkit_router_prefills{where="decode"}` when it does."""
        if self.prefill_threshold <= 0:
            return False
        cached = self.index.match(hashes, [d.name])[d.name] * (self.block_size or 0)
        uncached = num_prompt - min(cached, num_prompt - 1)  # the engine recomputes the last token anyway
        if uncached >= self.prefill_threshold:
            return False
        self.metrics.prefills.labels("decode", d.name).inc()
        return True
