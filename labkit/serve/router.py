"""The public front: an OpenAI-compatible server in front of any `DisaggBackend`.

Clients (the `openai` package, `vllm bench serve`, curl) only ever see this URL, in every
mode, so every benchmark hits one URL. The router validates the request (4xx OpenAI errors),
tokenizes it when the backend routes on token ids, hands it to the backend (backend.py: the
lab's mono or prefill+decode workers; vllm_backend.py: vLLM's prefill and decode servers),
and turns the backend's pieces into a JSON response or SSE chunks, timing TTFT and ITL as a
client would. `/health` says which upstream is up; `/metrics` is Prometheus text.

Plugging another server in: implement `labkit.serve.backend.DisaggBackend` (a pool of
upstreams, `start`, `close`, and `generate(req, prompt_ids, request_id)` yielding `Piece`s),
and pass it to `build_app`.

Run: `python -m labkit.serve.router --port 8000 --model tiny --prefill URL --decode URL`.
"""
from __future__ import annotations

import argparse
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from labkit.proc import LOOPBACK
from labkit.serve.backend import DisaggBackend, LabBackend, Piece
from labkit.serve.limits import read_json
from labkit.serve.metrics import CONTENT_TYPE, RouterMetrics
from labkit.serve.protocol import (SSE_DONE, APIError, bad_request, completion_response, error_body,
                                   models_response, new_completion_id, parse_completion_request, sse,
                                   stream_chunk, usage, usage_chunk)
from labkit.serve.upstream import Upstream, UpstreamPool

log = logging.getLogger("labkit.serve.router")
BACKENDS = ("lab", "vllm")


@dataclass(frozen=True, slots=True)
class RouterConfig:
    """The router's settings. Upstream URLs by role: `mono`, or `prefill` and `decode`."""

    model: str = "tiny"
    served_model_name: str | None = None
    host: str = LOOPBACK
    port: int = 8000
    mono: tuple[str, ...] = ()
    prefill: tuple[str, ...] = ()
    decode: tuple[str, ...] = ()
    backend: str = "lab"
    block_size: int = 16
    max_model_len: int | None = None
    health_interval_s: float = 0.5
    read_timeout_s: float = 120.0
    transfer_timeout_s: float = 30.0
    names: tuple[str, ...] = field(default=())  # upstream names, in mono+prefill+decode order

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} not one of {BACKENDS}")
        if bool(self.mono) == bool(self.prefill or self.decode):
            raise ValueError("give mono upstreams, or prefill and decode upstreams (not both, not neither)")
        if not self.mono and not (self.prefill and self.decode):
            raise ValueError("disaggregated mode needs at least one prefill and one decode upstream")
        if self.names and len(self.names) != len(self.mono) + len(self.prefill) + len(self.decode):
            raise ValueError("names must give one name per upstream")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def upstreams(self) -> list[Upstream]:
        out = []
        for role, urls in (("mono", self.mono), ("prefill", self.prefill), ("decode", self.decode)):
            for i, url in enumerate(urls):
                out.append(Upstream(name=f"{role}{i}", url=url.rstrip("/"), role=role))
        for u, n in zip(out, self.names):
            u.name = n
        return out


def make_backend(cfg: RouterConfig, metrics: RouterMetrics) -> DisaggBackend:
    """The backend `cfg.backend` names, over `cfg`'s upstreams."""
    pool = UpstreamPool(cfg.upstreams(), health_interval_s=cfg.health_interval_s)
    if cfg.backend == "vllm":
        from labkit.serve.vllm_backend import VllmDisaggBackend

        return VllmDisaggBackend(pool, read_timeout_s=cfg.read_timeout_s)
    from labkit.models import load_tokenizer

    return LabBackend(pool, load_tokenizer(cfg.model), metrics, block_size=cfg.block_size,
                      read_timeout_s=cfg.read_timeout_s, transfer_timeout_s=cfg.transfer_timeout_s)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class Router:
    """Request handling, independent of FastAPI wiring (so tests can reach it)."""

    def __init__(self, cfg: RouterConfig, backend: DisaggBackend | None = None,
                 metrics: RouterMetrics | None = None) -> None:
        from labkit.models import load_config, load_tokenizer

        self.cfg = cfg
        self.metrics = metrics or RouterMetrics()
        self.backend = backend or make_backend(cfg, self.metrics)
        mcfg = load_config(cfg.model)
        self.vocab_size = int(mcfg["vocab_size"])
        self.max_model_len = int(cfg.max_model_len or mcfg.get("max_position_embeddings") or 2048)
        self.tokenizer = load_tokenizer(cfg.model) if self.backend.uses_token_ids else None
        self.served = (cfg.model_name,) if cfg.model_name == cfg.model else (cfg.model_name, cfg.model)

    def worker_stats(self) -> list[dict[str, Any]]:
        return [u.stats() for u in self.backend.pool.upstreams]

    async def completions(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            body = await read_json(request)  # 413/431 over the size limits, 400 for any malformed JSON
            req = parse_completion_request(body, vocab_size=self.vocab_size, served_model_names=self.served)
            prompt_ids = list(req.prompt_ids) if req.prompt_ids is not None else (
                self.tokenizer.encode(req.prompt_text) if self.tokenizer is not None else None)
            if prompt_ids is not None and len(prompt_ids) + req.max_tokens > self.max_model_len:
                raise bad_request(
                    f"prompt ({len(prompt_ids)} tokens) + max_tokens ({req.max_tokens}) exceeds the model's "
                    f"context length {self.max_model_len}; shorten the prompt or lower max_tokens",
                    "max_tokens", "context_length_exceeded")
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
        return StreamingResponse(self._sse(req, first, gen, timer, cid, created, name, n_prompt),
                                 media_type="text/event-stream", headers=headers)

    def _done(self, timer: _Timer, outcome: str) -> None:
        self.metrics.queue_depth.dec()
        self.metrics.requests.labels(outcome).inc()
        self.metrics.e2e_s.observe(time.perf_counter() - timer.t0)

    async def _collect(self, req: Any, first: Piece, gen: AsyncIterator[Piece], timer: _Timer, cid: str,
                       name: str, n_prompt: int, prompt_ids: list[int] | None) -> Response:
        pieces = [first]
        timer.saw(first)
        outcome = "ok"
        try:
            while pieces[-1].finish_reason is None:
                p = await anext(gen)
                timer.saw(p)
                pieces.append(p)
        except APIError as e:
            outcome = f"http_{e.status}"
            return _error(e)
        except StopAsyncIteration:
            outcome = "http_502"
            return _error(APIError(502, "the backend ended before finishing", type="server_error"))
        finally:
            await gen.aclose()
            self._done(timer, outcome)
        n_out = pieces[-1].completion_tokens or sum(p.num_tokens for p in pieces)
        self.metrics.generation_tokens.inc(n_out)
        token_ids = [t for p in pieces for t in p.token_ids] if req.return_token_ids else None
        return JSONResponse(completion_response(cid, name, "".join(p.text for p in pieces), pieces[-1].finish_reason,
                                                n_prompt, n_out, token_ids=token_ids, prompt_token_ids=prompt_ids))

    async def _sse(self, req: Any, first: Piece, gen: AsyncIterator[Piece], timer: _Timer, cid: str,
                   created: int, name: str, n_prompt: int) -> AsyncIterator[bytes]:
        n_out = 0
        outcome = "aborted"  # until it ends well or badly on its own
        p = first
        try:
            while True:
                timer.saw(p)
                n_out += p.num_tokens
                if p.completion_tokens is not None:
                    n_out = p.completion_tokens
                if p.num_tokens or p.finish_reason is not None or p.text:
                    use = usage(n_prompt, n_out) if req.continuous_usage_stats else None
                    yield sse(stream_chunk(cid, name, created, p.text, p.finish_reason,
                                           token_ids=list(p.token_ids) if req.return_token_ids else None, usage_=use))
                if p.finish_reason is not None:
                    break
                p = await anext(gen)
            if req.include_usage:
                yield sse(usage_chunk(cid, name, created, usage(n_prompt, n_out)))
            yield SSE_DONE
            outcome = "ok"
        except APIError as e:
            outcome = f"stream_error_{e.status}"
            yield sse(e.body())
            yield SSE_DONE
        except StopAsyncIteration:
            outcome = "stream_error_502"
            yield sse(error_body("the backend ended before finishing", type="server_error"))
            yield SSE_DONE
        finally:
            self.metrics.generation_tokens.inc(n_out)
            await gen.aclose()
            self._done(timer, outcome)


class _Timer:
    """TTFT and ITL of one request, as the router sees tokens go out."""

    __slots__ = ("metrics", "t0", "last")

    def __init__(self, metrics: RouterMetrics, t0: float) -> None:
        self.metrics = metrics
        self.t0 = t0
        self.last: float | None = None

    def saw(self, p: Piece) -> None:
        if not p.num_tokens:
            return
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft_s.observe(now - self.t0)
        else:
            self.metrics.itl_s.observe(now - self.last)
        self.last = now


def build_app(router: Router) -> FastAPI:
    """The router's FastAPI app; starts the backend (and its health monitor) with the server."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.backend.start()
        yield
        await router.backend.close()

    app = FastAPI(title="labkit router", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error(bad_request(str(e), None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        # Anything unforeseen still answers in the OpenAI error shape (and is logged), never a bare 500.
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error in the router: {e.__class__.__name__}: {e}",
                                       type="server_error", code="internal_error"), status_code=500)

    @app.exception_handler(404)
    async def _not_found(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"no route {request.method} {request.url.path}; try POST /v1/completions",
                                       type="not_found_error", code="not_found"), status_code=404)

    @app.exception_handler(405)
    async def _bad_method(request: Request, e: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"{request.method} is not allowed on {request.url.path}",
                                       type="invalid_request_error", code="method_not_allowed"), status_code=405)

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
        return JSONResponse({"status": "ok" if ok else "degraded", "mode": _mode(roles),
                             "backend": router.cfg.backend, "model": router.cfg.model_name,
                             "upstreams": pool.health()}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        for u in router.backend.pool.upstreams:
            router.metrics.upstream_up.labels(u.name, u.role).set(1.0 if u.up else 0.0)
        return Response(router.metrics.render(), media_type=CONTENT_TYPE)

    return app


def _mode(roles: list[str]) -> str:
    return "mono" if roles == ["mono"] else "disagg"


def create(cfg: RouterConfig) -> tuple[Router, FastAPI]:
    """A router and its app, with worker stats re-exported in /metrics."""
    holder: list[Router] = []
    metrics = RouterMetrics(worker_stats=lambda: holder[0].worker_stats() if holder else [])
    router = Router(cfg, metrics=metrics)
    holder.append(router)
    return router, build_app(router)


def parse_args(argv: list[str] | None = None) -> RouterConfig:
    p = argparse.ArgumentParser(prog="python -m labkit.serve.router", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="preset or model dir (tokenizer and context length)")
    p.add_argument("--served-model-name", default=None)
    p.add_argument("--host", default=LOOPBACK)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mono", nargs="*", default=[], help="mono worker URLs")
    p.add_argument("--prefill", nargs="*", default=[], help="prefill worker URLs")
    p.add_argument("--decode", nargs="*", default=[], help="decode worker URLs")
    p.add_argument("--names", nargs="*", default=[], help="upstream names (mono, prefill, decode order)")
    p.add_argument("--backend", choices=BACKENDS, default="lab")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--health-interval-s", type=float, default=0.5)
    p.add_argument("--read-timeout-s", type=float, default=120.0)
    a = p.parse_args(argv)
    return RouterConfig(model=a.model, served_model_name=a.served_model_name, host=a.host, port=a.port,
                        mono=tuple(a.mono), prefill=tuple(a.prefill), decode=tuple(a.decode), backend=a.backend,
                        block_size=a.block_size, max_model_len=a.max_model_len,
                        health_interval_s=a.health_interval_s, read_timeout_s=a.read_timeout_s,
                        names=tuple(a.names))


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per health poll
    cfg = parse_args(argv)
    _, app = create(cfg)
    log.info("router on %s:%d (%s backend)", cfg.host, cfg.port, cfg.backend)
    uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level="warning",
                                  timeout_graceful_shutdown=3)).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
