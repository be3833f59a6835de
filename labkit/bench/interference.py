"""The interference experiment: a long prompt arrives while several decodes stream.

`run_interference(url, scenario)` starts `num_decodes` streaming requests with short prompts,
waits until each has produced `long_after_tokens` tokens, then sends one long prompt, and
records when every token of every request arrived at the client. The decodes keep streaming
until the long prompt is done plus `tail_tokens` more tokens each (then the client closes
them), so they cover the whole prefill however fast or slow this machine is. In a monolithic server the
long prefill runs in the same engine step loop as the decodes, so every decode stream stalls
for the length of that prefill; with chunked prefill the stall is cut into smaller ones; in a
disaggregated server the prefill runs elsewhere and the decode gaps stay flat.
`InterferenceResult.stats()` puts numbers on it, `labkit.plots.serving` draws it. Requests go
through the benchmarks' one streaming client (labkit.bench.client).
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from labkit.bench.client import StreamedCompletion, run_sync, stream_completion
from labkit.proc import gc_frozen


@dataclass(frozen=True, slots=True)
class InterferenceScenario:
    """Sizes of the experiment, in tokens. `variant` changes the prompts' content (not their
    lengths), so a rerun on the same server does not hit the prefix cache."""

    num_decodes: int = 4
    decode_prompt_tokens: int = 16
    decode_max_tokens: int = 1024  # a cap: decodes normally stop tail_tokens after the long prompt
    long_prompt_tokens: int = 1536
    long_max_tokens: int = 4
    long_after_tokens: int = 12
    tail_tokens: int = 24
    variant: int = 0
    timeout_s: float = 180.0

    def __post_init__(self) -> None:
        for name in (
            "num_decodes",
            "decode_prompt_tokens",
            "decode_max_tokens",
            "long_prompt_tokens",
            "long_max_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.long_after_tokens < self.decode_max_tokens:
            raise ValueError(
                f"long_after_tokens ({self.long_after_tokens}) must be in [0, decode_max_tokens "
                f"= {self.decode_max_tokens}): the long prompt must land while the decodes run"
            )
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if self.tail_tokens < 1:
            raise ValueError(f"tail_tokens must be >= 1, got {self.tail_tokens}")

    def prompt_ids(self, kind: str, index: int = 0) -> list[int]:
        """Token ids (BOS + bytes 1..255, a pattern that differs per request and variant)."""
        n = self.long_prompt_tokens if kind == "long" else self.decode_prompt_tokens
        base = 7 * self.variant + 31 * index + (101 if kind == "long" else 0)
        return [256] + [1 + (base + 13 * i + (i * i) % 17) % 255 for i in range(n - 1)]


@dataclass
class RequestTrace:
    """One request as the client saw it; times in seconds from the experiment's start."""

    name: str
    kind: Literal["decode", "long"]
    sent_s: float
    token_s: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str = ""

    @property
    def ttft_s(self) -> float:
        return self.token_s[0] - self.sent_s if self.token_s else float("nan")

    @property
    def itl_s(self) -> list[float]:
        """Gaps between consecutive tokens, seconds."""
        return [b - a for a, b in itertools.pairwise(self.token_s)]


@dataclass
class InterferenceResult:
    """All traces of one run, and where the long prefill sat in time."""

    label: str
    scenario: InterferenceScenario
    traces: list[RequestTrace]

    @property
    def long(self) -> RequestTrace:
        return next(t for t in self.traces if t.kind == "long")

    @property
    def decodes(self) -> list[RequestTrace]:
        return [t for t in self.traces if t.kind == "decode"]

    @property
    def prefill_window_s(self) -> tuple[float, float]:
        """(long prompt sent, its first token back): the time its prefill could interfere."""
        lt = self.long
        return lt.sent_s, (lt.token_s[0] if lt.token_s else lt.sent_s)

    @property
    def decodes_covered_prefill(self) -> bool:
        """True when every decode was still streaming after the long prompt's first token."""
        w1 = self.prefill_window_s[1]
        return all(t.token_s and t.token_s[-1] > w1 for t in self.decodes)

    def decode_gaps(self) -> list[tuple[float, float, bool]]:
        """(gap end s, gap s, overlaps the prefill window) for every decode inter-token gap."""
        w0, w1 = self.prefill_window_s
        out = []
        for t in self.decodes:
            for a, b in itertools.pairwise(t.token_s):
                out.append((b, b - a, a < w1 and b > w0))
        return out

    def stats(self) -> dict[str, float]:
        """Decode ITL outside the prefill window (mean, p50), the worst gap inside it, their ratio,
        and the long prompt's TTFT; times in ms.

        The ratio uses the mean: tokens that reach the client in one burst (a busy machine) give
        zero gaps that pull a median down, while the mean stays the time per token.
        """
        gaps = self.decode_gaps()
        outside = [g for _, g, inside in gaps if not inside]
        inside = [g for _, g, ins in gaps if ins]
        mean = statistics.fmean(outside) if outside else float("nan")
        worst_in = max(inside) if inside else 0.0
        return {
            "decode_itl_mean_ms": 1e3 * mean,
            "decode_itl_p50_ms": 1e3 * (statistics.median(outside) if outside else float("nan")),
            "decode_stall_max_ms": 1e3 * worst_in,
            "stall_ratio": worst_in / mean if mean > 0 else float("nan"),
            "long_ttft_ms": 1e3 * self.long.ttft_s,
            "prefill_window_ms": 1e3 * (self.prefill_window_s[1] - self.prefill_window_s[0]),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "stats": self.stats(),
            "traces": [
                {
                    "name": t.name,
                    "kind": t.kind,
                    "sent_s": t.sent_s,
                    "token_s": t.token_s,
                    "finish_reason": t.finish_reason,
                    "error": t.error,
                }
                for t in self.traces
            ],
        }


async def _stream(
    client: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    trace: RequestTrace,
    t0: float,
    progress: asyncio.Event | None = None,
    need: int = 0,
    done: asyncio.Event | None = None,
    tail: int = 0,
    finished: asyncio.Event | None = None,
) -> None:
    """Streams one request into `trace`: sets `progress` at its `need`-th token and `finished` at its
    last; once `done` is set it reads `tail` more tokens, then closes the stream ("client_stopped")."""
    after_done = 0
    out = StreamedCompletion()

    def on_token(n: int) -> bool:
        nonlocal after_done
        if progress is not None and n == need:
            progress.set()
        if finished is not None and out.finish_reason is not None:
            finished.set()  # the moment the last token arrived, not when the stream is closed
        if done is not None and done.is_set():
            after_done += 1
            return after_done < tail
        return True

    try:
        await stream_completion(client, url + "/v1/completions", body, out, on_token)
    finally:
        if progress is not None:
            progress.set()  # never leave the experiment waiting on a failed stream
    trace.token_s = [t - t0 for t in out.token_s]
    trace.finish_reason = out.finish_reason or ("client_stopped" if out.closed_early else None)
    trace.error = out.error


async def run_interference_async(
    url: str, scenario: InterferenceScenario, label: str = "", model: str | None = None
) -> InterferenceResult:
    """The experiment against an OpenAI-compatible `url` (a running router); see the module doc."""
    sc = scenario
    t0 = time.perf_counter()
    common: dict[str, Any] = {"temperature": 0, "ignore_eos": True, "stream": True}
    if model:
        common["model"] = model
    traces: list[RequestTrace] = []
    limits = httpx.Limits(max_connections=sc.num_decodes + 4)
    with gc_frozen():  # this process's GC pauses stay out of the timings (labkit.proc.gc_frozen)
        async with httpx.AsyncClient(timeout=httpx.Timeout(sc.timeout_s, connect=10.0), limits=limits) as client:
            events = [asyncio.Event() for _ in range(sc.num_decodes)]
            long_done = asyncio.Event()
            tasks = []
            for i in range(sc.num_decodes):
                tr = RequestTrace(f"decode {i}", "decode", time.perf_counter() - t0)
                traces.append(tr)
                body = {**common, "prompt": sc.prompt_ids("decode", i), "max_tokens": sc.decode_max_tokens}
                tasks.append(
                    asyncio.create_task(
                        _stream(client, url, body, tr, t0, events[i], sc.long_after_tokens, long_done, sc.tail_tokens)
                    )
                )
            if sc.long_after_tokens:
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), timeout=sc.timeout_s)
            long_tr = RequestTrace("long prompt", "long", time.perf_counter() - t0)
            traces.append(long_tr)
            body = {**common, "prompt": sc.prompt_ids("long"), "max_tokens": sc.long_max_tokens}
            long_task = asyncio.create_task(_stream(client, url, body, long_tr, t0, finished=long_done))
            long_task.add_done_callback(lambda _: long_done.set())  # also when it failed
            await asyncio.wait_for(asyncio.gather(*tasks, long_task), timeout=sc.timeout_s)
    bad = [f"{t.name}: {t.error}" for t in traces if t.error]
    if bad:
        raise RuntimeError("the interference run had failed requests: " + "; ".join(bad))
    return InterferenceResult(label, sc, traces)


def run_interference(
    url: str, scenario: InterferenceScenario | None = None, label: str = "", model: str | None = None
) -> InterferenceResult:
    """Blocking version of `run_interference_async`; returns the traces of one run."""
    return run_sync(run_interference_async(url, scenario or InterferenceScenario(), label, model))


INTERFERENCE_MODES = ("mono", "mono-chunked", "1p1d")


def run_modes(
    model: str,
    scenario: InterferenceScenario,
    modes: tuple[str, ...] = INTERFERENCE_MODES,
    *,
    chunk_tokens: int = 256,
    transfer: str | None = None,
    progress: bool = False,
) -> list[InterferenceResult]:
    """The experiment on each mode, one server at a time, pinned as the lessons pin them
    (`labkit.serve.launcher.default_cpu_split`: mono on all cores; prefill and decode on one half each).

    modes: "mono", "mono-chunked" (chunked prefill, `chunk_tokens` per step), "1p1d". Each run
    gets its own prompt variant, so nothing is a prefix-cache hit. Returns one result per mode.
    """
    from dataclasses import replace

    from labkit.serve.launcher import default_cpu_split, launch

    unknown = set(modes) - set(INTERFERENCE_MODES)
    if unknown:
        raise ValueError(f"unknown modes {sorted(unknown)}; choose from {INTERFERENCE_MODES}")
    cpus = default_cpu_split()
    out = []
    for i, mode in enumerate(modes):
        if progress:
            print(f"interference: {mode} ...", flush=True)
        if mode == "1p1d":
            srv = launch(
                "disagg", model=model, prefill_cpus=cpus["prefill"], decode_cpus=cpus["decode"], transfer=transfer
            )
        else:
            chunked = mode == "mono-chunked"
            srv = launch(
                "mono",
                model=model,
                mono_cpus=cpus["mono"],
                chunked_prefill=chunked,
                max_num_batched_tokens=chunk_tokens if chunked else None,
            )
        try:
            out.append(
                run_interference(srv.url, replace(scenario, variant=scenario.variant + i), label=mode, model=model)
            )
        finally:
            srv.stop()
    return out


def stats_table(results: list[InterferenceResult]) -> list[dict[str, Any]]:
    """One row per run: mode and its stats, rounded for printing."""
    return [{"mode": r.label, **{k: round(v, 2) for k, v in r.stats().items()}} for r in results]
