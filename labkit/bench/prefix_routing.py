"""Prefix-aware routing, measured: requests that share documents, sent through a router, and where
their prompts were really computed.

`shared_document_requests` makes `docs` documents of `doc_tokens` tokens, each asked `questions`
times (the document, then a question of its own). `run_prefix_routing` sends them through a router
in front of several prefill workers, in two waves: one request per document, all at once (nothing
is cached yet: the router spreads them by load), then every follow-up question, all at once (a
prefix-aware router sends each to the worker whose cache holds its document). From the router's
/metrics before and after, it reads the prefill decisions per worker and reason, the prompt
tokens the router expected each worker to have cached, and the prompt tokens each prefill
worker's engine really computed (what its prefix cache did not serve).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from labkit.bench.arrivals import Arrivals
from labkit.bench.loadgen import LoadConfig, run_load
from labkit.bench.workloads import BenchRequest
from labkit.prometheus import samples, scrape, totals_by
from labkit.serve.routing import PrefillCandidate

# Counters the router exports (labkit.serve.metrics), read as deltas around a run.
DECISIONS = "labkit_router_decisions_total"
HIT_TOKENS = "labkit_router_prefix_hit_tokens_total"
COMPUTED = "labkit_worker_prefill_tokens_total"


def shared_document_requests(
    docs: int,
    questions: int,
    doc_tokens: int,
    question_tokens: int,
    *,
    output_tokens: int = 4,
    seed: int = 0,
    vocab: int = 256,
) -> list[BenchRequest]:
    """`docs` x `questions` requests: document d's `doc_tokens` tokens, then `question_tokens` tokens of
    question q; `prefix_group` = d. Requests are listed document by document; the same seed, the same tokens."""
    if min(docs, questions, doc_tokens, question_tokens, output_tokens) < 1:
        raise ValueError("docs, questions, doc_tokens, question_tokens and output_tokens must all be >= 1")
    out: list[BenchRequest] = []
    for d in range(docs):
        doc = np.random.default_rng([seed, 1, d]).integers(0, vocab, doc_tokens)
        for q in range(questions):
            ask = np.random.default_rng([seed, 2, d, q]).integers(0, vocab, question_tokens)
            ids = tuple(int(t) for t in np.concatenate([doc, ask]))
            out.append(BenchRequest(len(out), ids, output_tokens, shared_prefix_tokens=doc_tokens, prefix_group=d))
    return out


def cacheable_tokens(requests: Sequence[BenchRequest], block_size: int) -> int:
    """The most prompt tokens prefix caches can serve for `requests` sent group by group: each request after
    the first of its `prefix_group` reuses its shared prefix in whole blocks (one token is always computed)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    seen: set[int] = set()
    total = 0
    for r in requests:
        if r.prefix_group in seen:
            total += min(r.shared_prefix_tokens, r.prompt_tokens - 1) // block_size * block_size
        seen.add(r.prefix_group)
    return total


@dataclass(frozen=True)
class PrefixRoutingRun:
    """What one router did with a set of shared-document requests (counts are deltas over the run)."""

    label: str
    prompt_tokens: int  # sent
    computed_tokens: Mapping[str, float]  # per prefill worker: prompt tokens its engine computed
    predicted_hit_tokens: Mapping[str, float]  # per worker: tokens the router expected it to cache
    decisions: Mapping[str, Mapping[str, float]]  # per worker: reason ("prefix", "load", "only") -> count
    ok: int
    errors: int

    @property
    def cached_tokens(self) -> float:
        """Prompt tokens the prefill workers did not compute: their prefix caches served them."""
        return self.prompt_tokens - sum(self.computed_tokens.values())

    @property
    def cached_share(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def describe(self) -> str:
        per = ", ".join(
            f"{w}: {sum(r.values()):.0f} requests ({self.computed_tokens.get(w, 0):,.0f} tokens computed)"
            for w, r in self.decisions.items()
        )
        return (
            f"{self.label}: {self.prompt_tokens:,} prompt tokens sent, {self.cached_tokens:,.0f} "
            f"({self.cached_share:.0%}) served from the prefill workers' caches; {per}"
        )


def _decisions(text: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for lab, v in samples(text, DECISIONS, role="prefill"):
        out.setdefault(lab["upstream"], {})[lab["reason"]] = v
    return out


def _minus(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) - b.get(k, 0.0) for k in {**b, **a}}


def run_prefix_routing(
    url: str,
    requests: Sequence[BenchRequest],
    *,
    label: str,
    model: str | None = None,
    settle_s: float = 1.5,
    request_timeout_s: float = 600.0,
) -> PrefixRoutingRun:
    """Sends `requests` through the router at `url` in two waves (the first request of each
    `prefix_group`, then the rest; each wave all at once) and reads what happened from its /metrics.

    `settle_s`: the router re-exports each worker's counters from its /health, polled every 0.5 s by
    default; waiting this long before each scrape lets the counters catch up.
    """
    first: dict[int, BenchRequest] = {}
    for r in requests:
        first.setdefault(r.prefix_group, r)
    waves = [list(first.values()), [r for r in requests if first[r.prefix_group] is not r]]
    time.sleep(settle_s)
    before = scrape(url)
    ok = errors = 0
    for i, wave in enumerate(w for w in waves if w):
        cfg = LoadConfig(
            url,
            Arrivals("burst"),
            model=model,
            progress=False,
            request_timeout_s=request_timeout_s,
            label=f"{label}: wave {i + 1}",
        )
        res = run_load(cfg, wave)
        ok, errors = ok + res.summary.ok, errors + res.summary.errors
    time.sleep(settle_s)
    after = scrape(url)
    dec_b, dec_a = _decisions(before), _decisions(after)
    return PrefixRoutingRun(
        label,
        sum(r.prompt_tokens for r in requests),
        _minus(
            totals_by(after, COMPUTED, "upstream", role="prefill"),
            totals_by(before, COMPUTED, "upstream", role="prefill"),
        ),
        _minus(totals_by(after, HIT_TOKENS, "upstream"), totals_by(before, HIT_TOKENS, "upstream")),
        {w: _minus(dec_a.get(w, {}), dec_b.get(w, {})) for w in {**dec_b, **dec_a}},
        ok,
        errors,
    )


class RoundRobin:
    """A prefill policy that ignores the cache: candidates in turn (a contrast for the lesson)."""

    def __init__(self) -> None:
        self.turn = 0

    def __call__(self, block_hashes: Sequence[bytes], candidates: Sequence[PrefillCandidate]) -> PrefillCandidate:
        chosen = sorted(candidates, key=lambda c: c.name)[self.turn % len(candidates)]
        self.turn += 1
        return chosen


# `start_router(prefill_policy="labkit.bench.prefix_routing:round_robin")`: one instance per router process.
round_robin = RoundRobin()
