"""Discrete-event simulator of LLM serving: monolithic (prefill-first or chunked), data-parallel
replicas, xPyD, and selective xPyD.

Each instance runs the loop a real engine runs (continuous batching, one step at a time), with
step times from a fitted `LatencyModel`. To stay fast enough for a notebook slider, decode steps
between two events (an arrival that can join, a request that finishes) are jumped over in one
go: with a fixed batch the step time grows linearly with context, so k steps have a closed form.

- mono, prefill_first: a waiting prompt runs as soon as the current step ends, stalling every
  running decode for the whole prefill (the ITL spike of notebook 04).
- mono, chunked: each step carries all running decodes plus up to `max_num_batched_tokens`
  prompt tokens (vLLM's chunked prefill): smaller stalls, slower prefills.
- mono-dp (`Layout.mono(n)`): n replicas of one device each behind one router (data parallel: the
  baseline of llm-d and DistServe). The router sends each request to the replica with the fewest
  requests in flight when it arrives (ties: the first), as the lab's router does (its load, with no
  prefix to follow); `dispatch="round-robin"` deals them out in turn instead.
- disagg (xPyD): P prefill instances (round-robin), the KV of each prompt crosses a link
  (fixed cost + bytes / bandwidth; one transfer at a time leaves each prefill instance and one
  at a time enters each decode instance, so seven prefills feeding one decode device share its
  link), then one of D decode instances (round-robin) adopts it at its next step boundary with
  a free slot. The first
  token reaches the client when the decode instance adopts the KV (as in the lab's server and in
  vLLM, where the decode side streams every token), so a full decode pool shows up in TTFT.
- selective xPyD (`Layout.disagg(P, D, prefill_threshold=N)`, llm-d's decider): a prompt whose
  uncached suffix is shorter than N tokens is prefilled on its decode instance itself (stalling
  that instance's running decodes, as in mono); the rest goes to the prefill pool. N = 0 is plain
  xPyD; N above every prompt leaves the prefill pool idle (mono on the decode devices).
A prefix-cache hit rate h means the first h of every prompt's tokens are already cached: prefill
computes only the rest (attending to the cached part); the transfer still carries the whole KV.
Prefill and decode instances may run on different parts (`decode_latency`, `decode_limits`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from typing import Literal

import numpy as np

from labkit.links import LINKS, Link
from labkit.plan.latency_model import LatencyModel
from labkit.plan.layout import Layout, Limits, Policy
from labkit.plan.results import SLO, SimResult
from labkit.plan.workload import Requests

__all__ = ["DEFAULT_LINK", "SLO", "Layout", "Limits", "Policy", "SimResult", "prefilled_on_decode", "simulate"]

DEFAULT_LINK = LINKS["100G"]  # between a prefill and a decode instance when none is given


class _Trace:
    """Mutable per-run arrays the instance loops fill in."""

    def __init__(self, req: Requests, hit_rate: float, serve_request_s: float = 0.0) -> None:
        n = len(req)
        # A server spends `serve_request_s` on each request (parsing, routing, the first SSE
        # event) besides its prefill: as if the request reached the engine that much later.
        self.ready = req.arrival_s.astype(float) + serve_request_s
        self.prompt = req.prompt_tokens.astype(np.int64)
        self.out = req.output_tokens.astype(np.int64)
        self.cached = np.minimum(np.floor(self.prompt * hit_rate), self.prompt - 1).astype(np.int64)
        self.first = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        self.itl_v: list[float] = []
        self.itl_w: list[float] = []


def _steps_until(base: float, inc: float, dt: float) -> int:
    """Smallest k >= 1 with sum_{j<k} (base + inc·j) >= dt: decode steps until time dt has passed."""
    if dt <= base:
        return 1
    if inc <= 0:
        return max(1, math.ceil(dt / base))
    # inc/2·k² + (base - inc/2)·k - dt = 0
    b = base - inc / 2
    k = math.ceil((-b + math.sqrt(b * b + 2 * inc * dt)) / inc)
    while k > 1 and (k - 1) * base + inc * (k - 1) * (k - 2) / 2 >= dt:  # float guard
        k -= 1
    return max(k, 1)


def _run_colocated(
    idx: list[int],
    tr: _Trace,
    lat: LatencyModel,
    lim: Limits,
    policy: Policy,
    local: np.ndarray,
    first_at_adoption: bool = True,
) -> None:
    """One instance's loop over requests `idx` (sorted by `tr.ready`), all known in advance."""
    for _ in _colocated(idx, tr, lat, lim, policy, local, first_at_adoption, [math.inf]):
        raise RuntimeError("simulator: an instance waited for a dispatch with none to come")  # pragma: no cover


def _colocated(
    idx: list[int],
    tr: _Trace,
    lat: LatencyModel,
    lim: Limits,
    policy: Policy,
    local: np.ndarray,
    first_at_adoption: bool,
    horizon: list[float],
) -> Iterator[None]:
    """One instance's loop over requests `idx` (sorted by `tr.ready`). `local[r]`: request r is
    prefilled here (mono, or a short prompt under selective disaggregation); otherwise its KV
    arrived from a prefill instance at `tr.ready[r]` and adopting it costs nothing.

    `idx` may grow while the loop runs: `horizon[0]` is when the next request not yet given to any
    instance arrives (inf: none is left). The loop never runs past it without knowing whether that
    request comes here: it yields, the dispatcher appends it to some instance's `idx`, and it goes on.

    The running decodes live packed at the front of numpy arrays, so a run of k decode steps is
    a handful of vector operations whatever the batch size.
    """
    ready, prompt, out, cached, first, finish = tr.ready, tr.prompt, tr.out, tr.cached, tr.first, tr.finish
    itl_v, itl_w = tr.itl_v, tr.itl_w
    a_d, b_d = lat.decode_a_s + lat.serve_token_s, lat.decode_b_s_per_ctx_token
    c_d = lat.decode_c_s_per_seq + lat.serve_seq_s
    chunked = policy == "chunked"
    cap = lim.max_num_seqs
    ids = np.zeros(cap, dtype=np.int64)
    rem = np.zeros(cap, dtype=np.int64)  # decode steps still to run
    ctx = np.zeros(cap, dtype=np.int64)  # KV tokens each holds
    last = np.zeros(cap)  # time of its latest token
    nrun = 0
    i_next, t = 0, 0.0
    waiting: deque[int] = deque()  # prompts to prefill here
    landed: deque[int] = deque()  # KV from a prefill instance, waiting for a slot
    done: dict[int, int] = {}  # chunked: prompt tokens prefilled so far

    def admit(r: int, at: float) -> None:
        nonlocal nrun
        if out[r] > 1:
            ids[nrun], rem[nrun], ctx[nrun], last[nrun] = r, out[r] - 1, prompt[r] + 1, at
            nrun += 1
        else:
            finish[r] = at

    def advance(k: int, first_step_s: float, now: float) -> None:
        """k steps of every running decode, begun at run_start[0], ended at `now`: ITLs, retire."""
        nonlocal nrun
        m = nrun
        lst = last[:m]
        # first step: time since each request's previous token (a prefill stall shows up here)
        v = first_step_s + (run_start[0] - lst)
        stalled = v > first_step_s * (1 + 1e-9) + 1e-12
        ns = int(stalled.sum())
        if ns:
            itl_v.extend(v[stalled].tolist())
            itl_w.extend([1.0] * ns)
        if m - ns:
            itl_v.append(first_step_s)
            itl_w.append(float(m - ns))
        rem[:m] -= k
        ctx[:m] += k
        lst[:] = now
        fin = rem[:m] == 0
        if fin.any():
            finish[ids[:m][fin]] = now
            keep = ~fin
            kk = int(keep.sum())
            ids[:kk], rem[:kk], ctx[:kk], last[:kk] = ids[:m][keep], rem[:m][keep], ctx[:m][keep], last[:m][keep]
            nrun = kk

    run_start = [0.0]  # when the current run of steps began (advance reads it)
    while True:
        if t >= horizon[0]:  # a request not yet dispatched has arrived: it may come here
            yield
            continue
        n = len(idx)
        while i_next < n and ready[idx[i_next]] <= t:
            (waiting if local[idx[i_next]] else landed).append(idx[i_next])
            i_next += 1
        if landed and nrun < cap:
            while landed and nrun < cap:
                r = landed.popleft()
                if first_at_adoption:  # the decode instance streams the first token once it adopts the KV
                    first[r] = t
                admit(r, t)
            continue
        free = cap - nrun
        if waiting and free > 0:
            budget = lim.max_num_batched_tokens - (nrun if chunked else 0)
            if budget > 0:
                batch: list[tuple[int, int, int]] = []  # (request, offset, tokens)
                for r in waiting:
                    if len(batch) >= free:
                        break
                    off = done.get(r, int(cached[r]))
                    todo = int(prompt[r]) - off
                    if chunked:
                        take = min(todo, budget)
                    elif batch and todo > budget:  # prefill-first: whole prompts only
                        break
                    else:
                        take = todo
                    batch.append((r, off, take))
                    budget -= take
                    if budget <= 0:
                        break
                work = sum(lat.chunk_work_s(off, k) for _, off, k in batch)
                B = nrun if chunked else 0
                if B:
                    dur = lat.step_overhead_s + work + b_d * float(ctx[:B].sum()) + c_d * B
                else:
                    dur = lat.prefill_a_s + work
                run_start[0] = t
                t += dur
                if B:  # the decodes that rode along
                    advance(1, dur, t)
                for r, off, k in batch:
                    if off + k >= prompt[r]:
                        waiting.remove(r)
                        done.pop(r, None)
                        first[r] = t
                        admit(r, t)
                    else:
                        done[r] = off + k
                continue
        if not nrun:
            if i_next < n or horizon[0] < math.inf:  # idle until the next arrival, here or to be dispatched
                t = max(t, min(ready[idx[i_next]] if i_next < n else math.inf, horizon[0]))
                continue
            if waiting or landed:  # cannot happen with max_num_seqs >= 1; guard against an endless loop
                raise RuntimeError("simulator: requests waiting with nothing running")
            return
        # a run of decode steps with a fixed batch, up to the next event
        B = nrun
        base = a_d + c_d * B + b_d * float(ctx[:B].sum())
        inc = b_d * B
        k = int(rem[:B].min())
        next_s = min(ready[idx[i_next]] if i_next < n else math.inf, horizon[0])
        if next_s < math.inf and B < cap:
            k = min(k, _steps_until(base, inc, next_s - t))
        seg = k * base + inc * k * (k - 1) / 2
        if k > 1:
            itl_v.append(base + inc * k / 2)
            itl_w.append(float((k - 1) * B))
        run_start[0] = t
        t += seg
        advance(k, base, t)


def _run_prefill_instance(idx: list[int], tr: _Trace, lat: LatencyModel, lim: Limits) -> None:
    """A prefill-only instance; sets `ready` to when each prompt's KV is ready to leave."""
    t, i, n = 0.0, 0, len(idx)
    while i < n:
        t = max(t, tr.ready[idx[i]])
        batch: list[int] = []
        budget = lim.max_num_batched_tokens
        while i < n and tr.ready[idx[i]] <= t:
            r = idx[i]
            todo = int(tr.prompt[r] - tr.cached[r])
            if batch and todo > budget:
                break
            batch.append(r)
            budget -= todo
            i += 1
        t += lat.prefill_a_s + sum(lat.chunk_work_s(int(tr.cached[r]), int(tr.prompt[r] - tr.cached[r])) for r in batch)
        for r in batch:
            tr.ready[r] = t


def _run_links(
    remote: list[int], sender: dict[int, int], receiver: dict[int, int], tr: _Trace, link: Link, kv_bytes_per_token: int
) -> None:
    """Every KV transfer, first ready first served: each one holds its prefill instance's link and its
    decode instance's link (one transfer at a time on each); sets `ready` (landed) = first token time."""
    free_tx: dict[int, float] = {}
    free_rx: dict[int, float] = {}
    for r in sorted(remote, key=lambda r: tr.ready[r]):
        p, d = sender[r], receiver[r]
        start = max(tr.ready[r], free_tx.get(p, 0.0), free_rx.get(d, 0.0))
        end = start + link.seconds(float(tr.prompt[r]) * kv_bytes_per_token)
        free_tx[p] = free_rx[d] = end
        tr.first[r] = tr.ready[r] = end
        if tr.out[r] == 1:
            tr.finish[r] = end


def _run_least_loaded(
    num_replicas: int, tr: _Trace, lat: LatencyModel, lim: Limits, policy: Policy, local: np.ndarray
) -> None:
    """Replicas behind a router that sends each request, when it arrives, to the replica with the fewest
    requests in flight (dispatched, not finished; ties: the lowest index). The replicas run in step:
    each goes up to the next arrival, the router looks at their loads then, and the request joins one."""
    order = np.argsort(tr.ready, kind="stable").tolist()
    horizon = [tr.ready[order[0]] if order else math.inf]
    idx: list[list[int]] = [[] for _ in range(num_replicas)]
    loops = [_colocated(idx[k], tr, lat, lim, policy, local, True, horizon) for k in range(num_replicas)]
    for r in order:
        horizon[0] = tr.ready[r]
        for loop in loops:
            next(loop, None)  # each replica runs up to the arrival (or past it, inside one step)
        in_flight = [int(np.count_nonzero(~(tr.finish[mine] <= horizon[0]))) if mine else 0 for mine in idx]
        idx[int(np.argmin(in_flight))].append(r)
    horizon[0] = math.inf
    for loop in loops:
        for _ in loop:  # nothing is left to dispatch: each replica runs to its end
            raise RuntimeError("simulator: a replica waited for a dispatch with none to come")  # pragma: no cover


def prefilled_on_decode(prompt_tokens: np.ndarray, cached_tokens: np.ndarray, threshold: int) -> np.ndarray:
    """Selective disaggregation's rule: True where the uncached suffix is shorter than `threshold` tokens."""
    return (np.asarray(prompt_tokens) - np.asarray(cached_tokens)) < threshold


def simulate(
    requests: Requests,
    latency: LatencyModel,
    layout: Layout,
    *,
    link: Link | None = None,
    limits: Limits | None = None,
    prefix_hit_rate: float = 0.0,
    first_token_at: Literal["adopted", "landed"] = "adopted",
    decode_latency: LatencyModel | None = None,
    decode_limits: Limits | None = None,
) -> SimResult:
    """Runs the trace through the layout; returns per-request times (requests round-robin over instances).

    Disaggregated, the client sees the first token when the decode instance adopts the KV
    ("adopted": vLLM's proxy streams every token from the decode server), or as soon as the KV
    has landed ("landed": the lab's router forwards the prefill worker's first token).
    `decode_latency` / `decode_limits`: the decode instances run on another part (default: the
    same as the prefill instances); prompts prefilled on the decode side use its model too.
    The KV crossing `link` (default 100 Gbps RDMA) has the prefill model's bytes per token.
    """
    if first_token_at not in ("adopted", "landed"):
        raise ValueError(f"first_token_at {first_token_at!r} is not 'adopted' or 'landed'")
    if not 0.0 <= prefix_hit_rate < 1.0:
        raise ValueError(f"prefix_hit_rate must be in [0, 1), got {prefix_hit_rate}")
    link = link or DEFAULT_LINK
    lim = limits or Limits()
    dec_lat = decode_latency or latency
    dec_lim = decode_limits or lim
    tr = _Trace(requests, prefix_hit_rate, latency.serve_request_s)
    n = len(requests)
    if layout.kind == "mono":
        everything = np.ones(n, dtype=bool)
        if layout.dispatch == "round-robin" or layout.num_replicas == 1:
            for rep in range(layout.num_replicas):
                _run_colocated(list(range(rep, n, layout.num_replicas)), tr, latency, lim, layout.policy, everything)
        else:
            _run_least_loaded(layout.num_replicas, tr, latency, lim, layout.policy, everything)
    else:
        local = prefilled_on_decode(tr.prompt, tr.cached, layout.prefill_threshold)
        remote = np.flatnonzero(~local).tolist()
        sender = {r: k % layout.num_prefill for k, r in enumerate(remote)}
        for p in range(layout.num_prefill):
            _run_prefill_instance(remote[p :: layout.num_prefill], tr, latency, lim)
        _run_links(remote, sender, {r: r % layout.num_decode for r in remote}, tr, link, latency.kv_bytes_per_token)
        for d in range(layout.num_decode):
            mine = [r for r in range(d, n, layout.num_decode) if tr.out[r] > 1 or local[r]]
            mine.sort(key=lambda r: tr.ready[r])
            _run_colocated(mine, tr, dec_lat, dec_lim, layout.policy, local, first_token_at == "adopted")
    if np.isnan(tr.finish).any():
        raise RuntimeError("simulator: some requests never finished (a bug)")
    return SimResult(
        layout,
        requests.arrival_s.astype(float),
        tr.first,
        tr.finish,
        tr.prompt,
        tr.out,
        np.asarray(tr.itl_v),
        np.asarray(tr.itl_w),
    )
