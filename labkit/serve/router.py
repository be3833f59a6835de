"""The public front: an OpenAI-compatible server in front of any `DisaggBackend`.

Clients (the `openai` package, `vllm bench serve`, curl) only ever see this URL, in every
mode, so every benchmark hits one URL. The router validates the request (4xx OpenAI errors),
tokenizes it when the backend routes on token ids, hands it to the backend (backend.py: the
lab's mono or prefill+decode workers; labkit.vllm.pd_backend: vLLM's prefill and decode servers),
and turns the backend's pieces into a JSON response or SSE chunks, timing TTFT and ITL as a
client would, and the TTFT's parts (labkit.serve.waterfall: in the usage block when the request
says `"return_waterfall": true`, and in /metrics). `/health` says which upstream is up and which
prefill worker flagged a slow KV transfer; `/metrics` is Prometheus text.

Plugging another server in: implement `labkit.serve.backend.DisaggBackend` (a pool of
upstreams, `start`, `close`, `context_len`, and `generate(req, prompt_ids, request_id)`
yielding `Piece`s) and a factory `(cfg, pool, metrics, tokenizer) -> backend` (a class taking
those, as LabBackend does), and start the
router with `--backend module:factory` (or add its name to `BACKENDS`). Which prefill worker a
request goes to is a policy (labkit.serve.routing, `--prefill-policy`).

Run: `python -m labkit.serve.router --port 8000 --model tiny --prefill URL --decode URL`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from labkit.engine.config import RequestError, check_context
from labkit.proc import gc_frozen
from labkit.serve.backend import DisaggBackend, Piece
from labkit.serve.config import BACKENDS, RouterConfig, parse_config
from labkit.serve.limits import install_error_handlers, read_json, run_server
from labkit.serve.metrics import CONTENT_TYPE, RouterMetrics
from labkit.serve.protocol import (
    SSE_DONE,
    APIError,
    bad_request,
    completion_response,
    models_response,
    new_completion_id,
    parse_completion_request,
    sse,
    stream_chunk,
    usage,
    usage_chunk,
)
from labkit.serve.routing import load_spec
from labkit.serve.upstream import UpstreamPool
from labkit.serve.waterfall import RequestTiming

log = logging.getLogger("labkit.serve.router")
__all__ = ["BACKENDS", "Router", "RouterConfig", "build_app", "create", "make_backend", "parse_args"]


def make_backend(
    cfg: RouterConfig, metrics: RouterMetrics, tokenizer: Any, transport: httpx.AsyncBaseTransport | None = None
) -> DisaggBackend:
    """The backend `cfg.backend` names, over `cfg`'s upstreams; ValueError naming what is wrong."""
    factory = load_spec(cfg.backend, BACKENDS, "backend")
    pool = UpstreamPool(cfg.upstreams(), health_interval_s=cfg.health_interval_s, transport=transport)
    return factory(cfg, pool, metrics, tokenizer)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class Router:
    """Request handling, independent of FastAPI wiring (so tests can reach it)."""

    def __init__(
        self,
        cfg: RouterConfig,
        backend: DisaggBackend | None = None,
        metrics: RouterMetrics | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        from labkit.models import load_config, load_tokenizer

        self.cfg = cfg
        self.metrics = metrics or RouterMetrics(workers=self.workers)  # workers' stats re-exported in /metrics
        self.tokenizer = load_tokenizer(cfg.model)
        self.backend = backend or make_backend(cfg, self.metrics, self.tokenizer, transport)
        mcfg = load_config(cfg.model)
        self.vocab_size = int(mcfg["vocab_size"])
        self.model_max_len = int(mcfg.get("max_position_embeddings") or 2048)
        self.served = (cfg.model_name,) if cfg.model_name == cfg.model else (cfg.model_name, cfg.model)

    @property
    def max_model_len(self) -> int:
        """The context enforced at the edge: the config's, else the workers' (/health), else the model's."""
        return self.cfg.max_model_len or self.backend.context_len() or self.model_max_len

    def workers(self) -> list[tuple[str, str, Any]]:
        """(name, role, last /health) of every upstream that is a lab worker (for /metrics)."""
        return [(u.name, u.role, u.health) for u in self.backend.pool.upstreams if u.health is not None]

    async def completions(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            body = await read_json(request)  # 413/431 over the size limits, 400 for any malformed JSON
            req = parse_completion_request(body, vocab_size=self.vocab_size, served_model_names=self.served)
            prompt_ids = (
                list(req.prompt_ids)
                if req.prompt_ids is not None
                else (self.tokenizer.encode(req.prompt_text) if self.backend.uses_token_ids else None)
            )
            if prompt_ids is not None:
                try:
                    check_context(len(prompt_ids), req.max_tokens, self.max_model_len)  # the engine's own rule
                except RequestError as e:
                    raise bad_request(str(e), e.param, e.code) from None
        except APIError as e:
            self.metrics.requests.labels(f"http_{e.status}").inc()
            return _error(e)
        # A fresh id inside, always: the client's x-request-id (echoed back) is not unique, and two
        # requests sharing one would collide in the workers and in the decode worker's KV inbox.
        rid = uuid.uuid4().hex
        client_rid = request.headers.get("x-request-id") or rid
        if prompt_ids is not None:
            self.metrics.prompt_tokens.inc(len(prompt_ids))
        self.metrics.queue_depth.inc()
        timer = _Timer(self.metrics, t0)
        gen = self.backend.generate(req, prompt_ids, rid)
        try:
            first = await anext(gen)
        except APIError as e:
            await gen.aclose()
            self._done(timer, f"http_{e.status}")
            return _error(e)
        except StopAsyncIteration:
            self._done(timer, "http_502")
            return _error(APIError(502, "the backend ended without output", type="server_error"))
        except BaseException:
            await gen.aclose()
            self._done(timer, "aborted")
            raise
        n_prompt = len(prompt_ids) if prompt_ids is not None else (first.prompt_tokens or 0)
        cid, created, name = new_completion_id(), int(time.time()), self.cfg.model_name
        if not req.stream:
            return await self._collect(req, first, gen, timer, cid, name, n_prompt, prompt_ids)
        headers = {"x-request-id": client_rid, "cache-control": "no-cache"}
        return StreamingResponse(
            self._sse(req, first, gen, timer, cid, created, name, n_prompt),
            media_type="text/event-stream",
            headers=headers,
        )

    def _done(self, timer: _Timer, outcome: str) -> None:
        self.metrics.queue_depth.dec()
        self.metrics.requests.labels(outcome).inc()
        self.metrics.e2e_s.observe(time.perf_counter() - timer.t0)
        report = timer.waterfall()
        if report is not None:
            self.metrics.observe_waterfall(report)

    async def _collect(
        self,
        req: Any,
        first: Piece,
        gen: AsyncGenerator[Piece, None],
        timer: _Timer,
        cid: str,
        name: str,
        n_prompt: int,
        prompt_ids: list[int] | None,
    ) -> Response:
        outcome = "ok"
        try:
            pieces = [p async for p in _pieces(first, gen, timer)]
        except APIError as e:
            outcome = f"http_{e.status}"
            return _error(e)
        finally:
            await gen.aclose()
            self._done(timer, outcome)
        n_out = pieces[-1].completion_tokens or sum(p.num_tokens for p in pieces)
        self.metrics.generation_tokens.inc(n_out)
        token_ids = [t for p in pieces for t in p.token_ids] if req.return_token_ids else None
        return JSONResponse(
            completion_response(
                cid,
                name,
                "".join(p.text for p in pieces),
                pieces[-1].finish_reason,
                n_prompt,
                n_out,
                token_ids=token_ids,
                prompt_token_ids=prompt_ids,
                waterfall=timer.waterfall() if req.return_waterfall else None,
            )
        )

    async def _sse(
        self,
        req: Any,
        first: Piece,
        gen: AsyncGenerator[Piece, None],
        timer: _Timer,
        cid: str,
        created: int,
        name: str,
        n_prompt: int,
    ) -> AsyncIterator[bytes]:
        n_out = 0
        outcome = "aborted"  # until it ends well or badly on its own
        try:
            async for p in _pieces(first, gen, timer):
                n_out = p.completion_tokens if p.completion_tokens is not None else n_out + p.num_tokens
                if p.num_tokens or p.finish_reason is not None or p.text:
                    use = usage(n_prompt, n_out) if req.continuous_usage_stats else None
                    yield sse(
                        stream_chunk(
                            cid,
                            name,
                            created,
                            p.text,
                            p.finish_reason,
                            token_ids=list(p.token_ids) if req.return_token_ids else None,
                            usage_=use,
                        )
                    )
            if req.include_usage:
                yield sse(
                    usage_chunk(
                        cid, name, created, usage(n_prompt, n_out, timer.waterfall() if req.return_waterfall else None)
                    )
                )
            yield SSE_DONE
            outcome = "ok"
        except APIError as e:
            outcome = f"stream_error_{e.status}"
            yield sse(e.body())
            yield SSE_DONE
        finally:
            self.metrics.generation_tokens.inc(n_out)
            await gen.aclose()
            self._done(timer, outcome)


async def _pieces(first: Piece, gen: AsyncGenerator[Piece, None], timer: _Timer) -> AsyncIterator[Piece]:
    """`first`, then the backend's next pieces up to the one that finishes, each timed; APIError 502 when
    the backend ends before that."""
    p = first
    while True:
        timer.saw(p)
        yield p
        if p.finish_reason is not None:
            return
        try:
            p = await anext(gen)
        except StopAsyncIteration:
            raise APIError(502, "the backend ended before finishing", type="server_error") from None


class _Timer:
    """TTFT and ITL of one request, as the router sees tokens go out, and the backend's RequestTiming."""

    __slots__ = ("first", "last", "metrics", "t0", "timing")

    def __init__(self, metrics: RouterMetrics, t0: float) -> None:
        self.metrics = metrics
        self.t0 = t0
        self.first: float | None = None
        self.last: float | None = None
        self.timing: RequestTiming | None = None

    def saw(self, p: Piece) -> None:
        if p.timing is not None and self.timing is None:
            self.timing = p.timing
        if not p.num_tokens:
            return
        now = time.perf_counter()
        if self.last is None:
            self.first = now
            self.metrics.ttft_s.observe(now - self.t0)
        else:
            self.metrics.itl_s.observe(now - self.last)
        self.last = now

    def waterfall(self) -> dict[str, Any] | None:
        """Where this request's TTFT went (labkit.serve.waterfall), once its first token is out; None
        before, or when the backend reports no timing."""
        if self.timing is None or self.first is None or not self.timing.complete:
            return None
        return self.timing.report(self.t0, self.first)


def build_app(router: Router) -> FastAPI:
    """The router's FastAPI app; starts the backend (and its health monitor) with the server."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.backend.start()
        with gc_frozen():  # no long GC pause between a first token and its client (labkit.proc.gc_frozen)
            yield
        await router.backend.close()

    app = FastAPI(title="labkit router", lifespan=lifespan)
    install_error_handlers(app, "router", "; try POST /v1/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await router.completions(request)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(models_response(router.served[:1], router.max_model_len, root=router.cfg.model))

    @app.get("/health")
    async def health() -> JSONResponse:
        pool = router.backend.pool
        roles = sorted(pool.roles())
        ok = all(pool.by_role(r) for r in roles)
        # A slow KV path is a warning, not an outage: the status stays "ok" and says it beside.
        kv_flags = {u.name: u.health.kv_flag for u in pool.upstreams if u.health is not None and u.health.kv_flag}
        return JSONResponse(
            {
                "status": "ok" if ok else "degraded",
                "mode": _mode(roles),
                "backend": router.cfg.backend,
                "model": router.cfg.model_name,
                "upstreams": pool.health(),
                "kv_flags": kv_flags,
            },
            status_code=200 if ok else 503,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        for u in router.backend.pool.upstreams:
            router.metrics.upstream_up.labels(u.name, u.role).set(1.0 if u.up else 0.0)
        return Response(router.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _mode(roles: list[str]) -> str:
    return "mono" if roles == ["mono"] else "disagg"


def create(cfg: RouterConfig, transport: httpx.AsyncBaseTransport | None = None) -> tuple[Router, FastAPI]:
    """A router and its app. `transport`: how it reaches the upstreams (None: real sockets; tests
    pass in-process ASGI apps)."""
    router = Router(cfg, transport=transport)
    return router, build_app(router)


def parse_args(argv: list[str] | None = None) -> RouterConfig:
    """The router's command line: `--config JSON` and/or one flag per RouterConfig field (flags win)."""
    return parse_config(RouterConfig, argv, "python -m labkit.serve.router", (__doc__ or "").splitlines()[0])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per health poll
    cfg = parse_args(argv)
    try:
        _, app = create(cfg)
    except ValueError as e:  # a backend or policy spec that does not load: say it, exit 2
        log.error("%s", e)
        return 2
    log.info("router on %s:%d (%s backend)", cfg.host, cfg.port, cfg.backend)
    run_server(app, cfg.host, cfg.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
