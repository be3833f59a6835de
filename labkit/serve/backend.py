"""What the router sends a request to: the `DisaggBackend` interface and the lab's implementation.

The router (router.py) speaks OpenAI to clients: it validates, counts, times, and formats
SSE. A backend turns one validated `CompletionRequest` into a stream of `Piece`s (text plus
how many tokens it carries). Any server fits behind the router by implementing it:

    class DisaggBackend(Protocol):
        pool: UpstreamPool                       # its upstreams: health, load, /health, /metrics
        uses_token_ids: bool                     # True: the router tokenizes and passes prompt_ids
        async def start(self) -> None: ...       # open clients, first health poll
        async def close(self) -> None: ...
        def generate(self, req, prompt_ids, request_id) -> AsyncIterator[Piece]: ...

`generate` raises `APIError` (503 when no upstream is up or one died) before its first piece,
or while streaming; the router turns it into an HTTP error or an SSE error event.

`LabBackend` fronts the lab's own workers: `mono` workers, or `prefill` + `decode` workers
(the KV moves worker to worker over the transport; the router carries only control JSON).
`labkit.serve.vllm_backend.VllmDisaggBackend` fronts vLLM's prefill and decode servers.
"""
from __future__ import annotations

import json
import logging
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Iterator, Protocol

import httpx

from labkit.serve.metrics import RouterMetrics
from labkit.serve.prefix_index import PrefixIndex, block_hashes
from labkit.serve.protocol import APIError, CompletionRequest, unavailable
from labkit.serve.textstream import TextStream
from labkit.serve.upstream import Upstream, UpstreamPool
from labkit.sse import aiter_sse_lines

log = logging.getLogger("labkit.serve.backend")


@dataclass(frozen=True, slots=True)
class Piece:
    """A bit of output: `text` to send now and the `num_tokens` it took (text may be "" while held)."""

    text: str
    num_tokens: int
    token_ids: tuple[int, ...] = ()
    finish_reason: str | None = None          # set on the last piece: "stop" | "length" | "abort"
    completion_tokens: int | None = None      # a backend that knows the exact total says so at the end
    prompt_tokens: int | None = None


class DisaggBackend(Protocol):
    pool: UpstreamPool
    uses_token_ids: bool

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def generate(self, req: CompletionRequest, prompt_ids: list[int] | None,
                 request_id: str) -> AsyncIterator[Piece]: ...


CONN_ERRORS = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def upstream_error(u: Upstream, e: Exception) -> APIError:
    """The client-facing error when an upstream fails mid-request."""
    if isinstance(e, httpx.TimeoutException):
        return APIError(504, f"{u.role} worker {u.name} did not answer in time ({e.__class__.__name__})",
                        type="timeout_error", code="upstream_timeout")
    return unavailable(f"{u.role} worker {u.name} failed: {e.__class__.__name__}; retry the request")


async def error_from_response(r: httpx.Response) -> APIError:
    """An upstream's non-200 answer as an APIError with the same status and message."""
    try:
        raw = await r.aread()
        err = json.loads(raw).get("error", {})
        return APIError(r.status_code, str(err.get("message", raw[:200])), type=err.get("type") or "server_error",
                        param=err.get("param"), code=err.get("code"))
    except (ValueError, AttributeError, httpx.HTTPError):
        return APIError(r.status_code if r.status_code >= 400 else 502, f"upstream answered HTTP {r.status_code}",
                        type="server_error")


class HttpBackend:
    """What every backend over HTTP upstreams shares: the mode its pool implies and one client.

    A pool of only `mono` upstreams serves monolithically; `prefill` + `decode` upstreams
    serve disaggregated. Subclasses implement `generate`.
    """

    uses_token_ids = True

    def __init__(self, pool: UpstreamPool, *, connect_timeout_s: float, read_timeout_s: float) -> None:
        roles = pool.roles()
        if roles == {"mono"}:
            self.mode = "mono"
        elif roles == {"prefill", "decode"}:
            self.mode = "disagg"
        else:
            raise ValueError(f"a {type(self).__name__} needs only mono upstreams, or prefill and decode upstreams; "
                             f"got roles {sorted(roles)}")
        self.pool = pool
        self._timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=10.0, pool=10.0)
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self._timeout, limits=httpx.Limits(max_connections=1000))
        await self.pool.start()

    async def close(self) -> None:
        await self.pool.close()
        if self._client is not None:
            await self._client.aclose()

    @contextmanager
    def calling(self, u: Upstream, path: str) -> Iterator[None]:
        """Counts a request in flight on `u`; a broken connection marks `u` down and becomes a 503,
        a timeout a 504 (both as APIError)."""
        u.in_flight += 1
        try:
            yield
        except CONN_ERRORS as e:
            self.pool.mark_down(u, f"{path}: {e.__class__.__name__}")
            raise upstream_error(u, e) from None
        except httpx.TimeoutException as e:
            raise upstream_error(u, e) from None
        finally:
            u.in_flight -= 1


class LabBackend(HttpBackend):
    """The lab's workers behind a KV-aware choice: mono, or prefill + decode."""

    def __init__(self, pool: UpstreamPool, tokenizer: Any, metrics: RouterMetrics, *, block_size: int = 16,
                 connect_timeout_s: float = 2.0, read_timeout_s: float = 120.0,
                 transfer_timeout_s: float = 30.0) -> None:
        super().__init__(pool, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s)
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.index = PrefixIndex(block_size)
        self.transfer_timeout_s = transfer_timeout_s
        pool.on_down = self._forget
        pool.on_up = self._sized

    def _forget(self, u: Upstream) -> None:
        self.index.remove_instance(u.name)

    def _sized(self, u: Upstream) -> None:
        if u.info.get("kv_blocks_total"):
            self.index.set_capacity(u.name, int(u.info["kv_blocks_total"]))

    # --- routing -----------------------------------------------------------------------
    def pick_by_prefix(self, role: str, hashes: list[bytes], exclude: set[str]) -> tuple[Upstream, int]:
        """The up instance with the longest cached prefix, ties broken by load; (it, matched blocks)."""
        cands = [u for u in self.pool.by_role(role) if u.name not in exclude]
        if not cands:
            raise unavailable(f"no {role} worker is up; check `GET /health` on the router", code="no_upstream")
        matched = self.index.match(hashes, [u.name for u in cands])
        best = min(cands, key=lambda u: (-matched[u.name], *u.load_key()))
        n = matched[best.name]
        reason = "only" if len(cands) == 1 else ("prefix" if n > 0 and n > min(matched.values()) else "load")
        self.metrics.decisions.labels(role, best.name, reason).inc()
        if n:
            self.metrics.prefix_hit_tokens.labels(best.name).inc(n * self.index.block_size)
        return best, n

    def pick_by_load(self, role: str, exclude: set[str]) -> Upstream:
        cands = [u for u in self.pool.by_role(role) if u.name not in exclude]
        if not cands:
            raise unavailable(f"no {role} worker is up; check `GET /health` on the router", code="no_upstream")
        best = min(cands, key=lambda u: u.load_key())
        self.metrics.decisions.labels(role, best.name, "only" if len(cands) == 1 else "load").inc()
        return best

    # --- generation ----------------------------------------------------------------------
    async def generate(self, req: CompletionRequest, prompt_ids: list[int] | None,
                       request_id: str) -> AsyncIterator[Piece]:
        assert prompt_ids is not None and self._client is not None
        text = TextStream(self.tokenizer, req.stop)
        hashes = block_hashes(prompt_ids, self.index.block_size)
        sampling = req.sampling_dict()
        if self.mode == "mono":
            lines = self._mono_lines(prompt_ids, sampling, hashes, request_id)
        else:
            lines = self._disagg_lines(prompt_ids, sampling, hashes, request_id)
        async with aclosing(lines):  # an early return (stop string) closes the upstream stream now
            async for token_id, finish in lines:
                if token_id is not None:
                    delta = text.push(token_id)
                    if text.stopped:
                        yield Piece(delta, 1, (token_id,), finish_reason="stop")
                        return
                    if finish is not None:
                        yield Piece(delta + text.flush(), 1, (token_id,), finish_reason=finish)
                        return
                    yield Piece(delta, 1, (token_id,))
                elif finish is not None:
                    yield Piece(text.flush(), 0, (), finish_reason=finish)
                    return
        raise unavailable("the worker closed the stream before the request finished")

    async def _stream_lines(self, u: Upstream, path: str, payload: dict[str, Any],
                            ) -> AsyncIterator[tuple[int | None, str | None]]:
        """(token_id, finish_reason) from a worker's NDJSON stream; APIError on any failure."""
        assert self._client is not None
        with self.calling(u, path):
            async with self._client.stream("POST", u.url + path, json=payload) as r:
                if r.status_code != 200:
                    raise await error_from_response(r)
                async for line in aiter_sse_lines(r):
                    if not line:
                        continue
                    msg = json.loads(line)
                    if "error" in msg:
                        err = msg["error"]
                        raise APIError(500, f"{u.role} worker {u.name}: {err.get('message')}",
                                       type="server_error", code=err.get("code"))
                    token_id = msg.get("token_id")
                    finish = msg.get("finish_reason")
                    yield (int(token_id) if token_id is not None else None), finish
                    if finish is not None:
                        return

    async def _mono_lines(self, prompt_ids: list[int], sampling: dict[str, Any], hashes: list[bytes],
                          request_id: str) -> AsyncIterator[tuple[int | None, str | None]]:
        payload = {"request_id": request_id, "prompt_ids": prompt_ids, "sampling": sampling}
        tried: set[str] = set()
        while True:
            u, _ = self.pick_by_prefix("mono", hashes, tried)
            tried.add(u.name)
            started = False
            try:
                async with aclosing(self._stream_lines(u, "/internal/generate", payload)) as items:
                    async for item in items:
                        if not started:
                            started = True
                            self.index.insert(u.name, hashes)
                        yield item
                return
            except APIError as e:
                # Nothing reached the client yet and the worker is down: try another one.
                if started or e.status != 503 or not self.pool.by_role("mono"):
                    raise

    async def _disagg_lines(self, prompt_ids: list[int], sampling: dict[str, Any], hashes: list[bytes],
                            request_id: str) -> AsyncIterator[tuple[int | None, str | None]]:
        assert self._client is not None
        tried: set[str] = set()
        while True:  # the prefill step is retried on another prefill worker if one is down
            p, _ = self.pick_by_prefix("prefill", hashes, tried)
            d = self.pick_by_load("decode", set())
            tried.add(p.name)
            payload = {"request_id": request_id, "prompt_ids": prompt_ids, "sampling": sampling,
                       "kv_endpoint": d.info.get("kv_endpoint")}
            p.in_flight += 1
            try:
                r = await self._client.post(p.url + "/internal/prefill", json=payload)
            except CONN_ERRORS as e:
                self.pool.mark_down(p, f"/internal/prefill: {e.__class__.__name__}")
                if self.pool.by_role("prefill") and not isinstance(e, httpx.ReadError):
                    continue
                raise upstream_error(p, e) from None
            except httpx.TimeoutException as e:
                raise upstream_error(p, e) from None
            finally:
                p.in_flight -= 1
            if r.status_code != 200:
                raise await error_from_response(r)
            self.index.insert(p.name, hashes)
            res = r.json()
            yield int(res["first_token_id"]), res.get("finish_reason")
            if res.get("finish_reason"):
                return
            break
        dec = {"request_id": request_id, "sampling": sampling, "timeout_s": self.transfer_timeout_s}
        async with aclosing(self._stream_lines(d, "/internal/decode", dec)) as items:
            async for item in items:
                yield item
