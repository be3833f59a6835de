"""The load generator: streams `/v1/completions` requests at an OpenAI-compatible URL.

Works against the lab's servers and vLLM's alike. Each request sends exact prompt token ids,
`max_tokens` = its output length and `ignore_eos: true`, so every mode sees the same work. Every
request sent is accounted for: it ends ok, or with an error (HTTP status, SSE error event,
connection error, or timeout), so sent = ok + errors always.

    >>> sampled = sample_requests("azure-conv-2023", 50, max_model_len=4096)
    >>> result = run_load(LoadConfig("http://127.0.0.1:8000", arrivals=Arrivals("poisson", 2.0)),
    ...                   sampled.requests)
    >>> result.summary.flat()["ttft_p99_ms"]
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx

from labkit.bench.arrivals import Arrivals
from labkit.bench.client import StreamedCompletion, run_sync, stream_completion
from labkit.bench.metrics import SLO, RequestRecord, Summary, jsonable, save_records, summarize
from labkit.bench.workloads import BenchRequest, LengthScaling
from labkit.proc import gc_frozen


@dataclass(frozen=True, slots=True)
class LoadConfig:
    """Where and how to send. `url`: server base (`http://host:port`), `/v1`, or the full
    `/v1/completions` URL. `model`: None asks `/v1/models` for the first one."""

    url: str
    arrivals: Arrivals = field(default_factory=Arrivals)
    max_concurrency: int | None = None
    model: str | None = None
    request_timeout_s: float = 120.0
    seed: int = 0
    prompt_as: Literal["token_ids", "text"] = "token_ids"
    slo: SLO = field(default_factory=SLO)
    progress: bool = True
    label: str = ""
    waterfall: bool = True  # ask for the lab server's per-request TTFT waterfall (others ignore the field)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1 or None, got {self.max_concurrency}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.prompt_as not in ("token_ids", "text"):
            raise ValueError(f"prompt_as must be 'token_ids' or 'text', got {self.prompt_as!r}")

    @property
    def completions_url(self) -> str:
        u = self.url.rstrip("/")
        if u.endswith("/v1/completions"):
            return u
        return (u if u.endswith("/v1") else u + "/v1") + "/completions"

    @property
    def models_url(self) -> str:
        return self.completions_url.rsplit("/", 1)[0] + "/models"


@dataclass
class BenchResult:
    """One run: the records, the summary and what produced them (`meta`)."""

    records: list[RequestRecord]
    summary: Summary
    meta: dict[str, Any]

    def save(self, out_dir: str | Path, name: str = "bench") -> list[Path]:
        """Writes `<name>.json` (meta + summary) and `<name>.csv` / `.parquet` (one row per request)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        js = out / f"{name}.json"
        js.write_text(
            json.dumps(
                jsonable({"meta": self.meta, "summary": self.summary.flat(), "latency_ms": self.summary.latency_ms}),
                indent=1,
                default=str,
            )
        )
        return [js, *save_records(self.records, out / name)]


def resolve_model(config: LoadConfig, timeout_s: float = 10.0) -> str:
    """The model name to send: `config.model`, else the first id `/v1/models` lists."""
    if config.model:
        return config.model
    try:
        r = httpx.get(config.models_url, timeout=timeout_s, trust_env=False)
        r.raise_for_status()
        return str(r.json()["data"][0]["id"])
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise RuntimeError(
            f"could not read the model name from {config.models_url} ({e.__class__.__name__}: {e}); "
            "is the server up? Pass model=... to skip this"
        ) from None


def _payload(req: BenchRequest, model: str, prompt_as: str, waterfall: bool = False) -> dict[str, Any]:
    if prompt_as == "text":
        if any(not 32 <= t < 127 for t in req.prompt_token_ids):
            raise ValueError(
                "prompt_as='text' needs printable-ASCII token ids (TokenSpace(32, 127)) "
                "so that text and byte-level tokens match one to one"
            )
        prompt: Any = bytes(req.prompt_token_ids).decode("ascii")
    else:
        prompt = list(req.prompt_token_ids)
    out = {
        "model": model,
        "prompt": prompt,
        "max_tokens": req.output_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": 0.0,
    }
    if waterfall:  # an extra body field, as vLLM's return_token_ids: vLLM ignores it (labkit.serve.waterfall)
        out["return_waterfall"] = True
    return out


async def _send_one(
    client: httpx.AsyncClient, url: str, payload: dict[str, Any], rec: RequestRecord, t0: float, timeout_s: float
) -> None:
    """Streams one request, filling `rec` (timestamps as `vllm bench serve` takes them)."""
    st = time.perf_counter()
    rec.start_s = st - t0
    out = StreamedCompletion()
    try:
        async with asyncio.timeout(timeout_s):
            await stream_completion(client, url, payload, out)
    except TimeoutError:
        out.error = f"timeout after {timeout_s:g} s ({len(out.token_s)} token(s) received)"
    rec.http_status = out.status
    ts = out.token_s
    if ts:
        rec.ttft_s = ts[0] - st
        rec.itl_s = [b - a for a, b in itertools.pairwise(ts)]
    rec.error = out.error or ("" if ts else "the stream ended before any token")
    if rec.error:
        return
    usage = out.usage or {}
    rec.e2e_s = ts[-1] - st
    rec.output_tokens = int(usage.get("completion_tokens") or len(ts))
    if usage.get("prompt_tokens") is not None:
        rec.prompt_tokens = int(usage["prompt_tokens"])
    if isinstance(usage.get("waterfall"), dict):
        rec.waterfall = usage["waterfall"]
    rec.ok = True


async def arun_load(
    config: LoadConfig, requests: Sequence[BenchRequest], *, scaling: LengthScaling | None = None, workload: str = ""
) -> BenchResult:
    """Sends `requests` on the configured arrival schedule; returns the BenchResult."""
    from tqdm.auto import tqdm

    if not requests:
        raise ValueError("no requests to send")
    model = await asyncio.to_thread(resolve_model, config)
    payloads = [
        _payload(r, model, config.prompt_as, config.waterfall) for r in requests
    ]  # bad input fails before sending
    times = config.arrivals.times_s(len(requests), config.seed, [r.arrival_s for r in requests])
    records = [
        RequestRecord(r.index, r.prompt_tokens, r.output_tokens, scheduled_s=float(t)) for r, t in zip(requests, times)
    ]
    limit = config.max_concurrency or len(requests)
    sem = asyncio.Semaphore(limit)
    bar = tqdm(total=len(requests), desc=config.label or "requests", disable=not config.progress, leave=False)
    timeout = httpx.Timeout(config.request_timeout_s, connect=min(10.0, config.request_timeout_s))
    with gc_frozen():  # this process's GC pauses stay out of the timings (labkit.proc.gc_frozen)
        async with httpx.AsyncClient(
            timeout=timeout,
            trust_env=False,
            limits=httpx.Limits(max_connections=limit, max_keepalive_connections=limit),
        ) as client:
            t0 = time.perf_counter()

            async def task(i: int) -> None:
                delay = t0 + float(times[i]) - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                async with sem:
                    await _send_one(
                        client, config.completions_url, payloads[i], records[i], t0, config.request_timeout_s
                    )
                bar.update(1)

            await asyncio.gather(*(task(i) for i in range(len(requests))))
            duration_s = time.perf_counter() - t0
    bar.close()
    summary = summarize(records, duration_s, config.slo)
    assert summary.sent == summary.ok + summary.errors == len(requests)
    meta = {
        "url": config.completions_url,
        "model": model,
        "arrivals": asdict(config.arrivals),
        "arrivals_text": config.arrivals.describe(),
        "max_concurrency": config.max_concurrency,
        "seed": config.seed,
        "slo": config.slo.as_dict(),
        "label": config.label,
        "workload": workload,
        "requests": len(requests),
        "scaling": asdict(scaling) if scaling else None,
        "scaling_text": scaling.describe() if scaling else "",
        "first_errors": sorted({r.error for r in records if not r.ok})[:5],
    }
    return BenchResult(records, summary, meta)


def run_load(
    config: LoadConfig, requests: Sequence[BenchRequest], *, scaling: LengthScaling | None = None, workload: str = ""
) -> BenchResult:
    """Blocking `arun_load`; safe inside Jupyter (where an event loop already runs): `client.run_sync`."""
    return run_sync(arun_load(config, requests, scaling=scaling, workload=workload))
