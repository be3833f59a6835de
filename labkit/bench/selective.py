"""Selective disaggregation measured: one 1P1D deployment, one router per prefill threshold.

    with shared_1p1d("small") as (factory, placed):
        [conv] = run_sweeps([SweepConfig(w, modes=threshold_modes((0, 128, 512)), ...)], factory)
    placed["1p1d-selective-128"]   # {"decode": prompts the decode worker prefilled, "prefill": ...}

The workers start once (a `small` worker takes tens of seconds to load) and stay up; each
threshold gets its own router in front of them (`labkit.serve.launcher.start_router` with
`prefill_threshold`), so a sweep over N costs a router start per point. The decode worker runs
with local_prefill. Prefix caching is off in both workers, so no threshold's run warms the
prompts of the next (the Azure mixes share no prefixes anyway), and each router's prefix index
starts empty: a prompt's uncached suffix is its whole length.

`predict` asks the planner (`labkit.plan.selective.best_prefill_threshold`) the same question on
the same workload, lengths and rate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from labkit.bench.arrivals import Arrivals
from labkit.bench.sweep import ModeSpec, ServerFactory, parse_mode
from labkit.bench.workloads import Workload, sample_requests


def threshold_modes(thresholds: Sequence[int]) -> tuple[str, ...]:
    """Sweep mode names for prefill thresholds (tokens): 0 is plain `1p1d`, N is `1p1d-selective-N`."""
    if any(int(t) < 0 for t in thresholds):
        raise ValueError(f"thresholds must be >= 0 tokens, got {list(thresholds)}")
    return tuple("1p1d" if int(t) == 0 else f"1p1d-selective-{int(t)}" for t in thresholds)


def threshold_of(mode: str) -> int:
    """The prefill threshold of a 1P1D sweep mode (0 for plain `1p1d`)."""
    return parse_mode(mode).prefill_threshold


def router_prefills(metrics_text: str) -> dict[str, float]:
    """Prompts the router counted by where they were prefilled ({"prefill": n, "decode": m}), from /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(metrics_text):
        for s in fam.samples:
            if s.name == "labkit_router_prefills_total":
                out[s.labels["where"]] = out.get(s.labels["where"], 0.0) + s.value
    return out


@contextlib.contextmanager
def shared_1p1d(
    model: str,
    *,
    cpus: dict[str, list[int] | None] | None = None,
    transfer: str | None = None,
    kv_cache_bytes: int | None = None,
    startup_timeout_s: float = 180.0,
) -> Iterator[tuple[ServerFactory, dict[str, dict[str, float]]]]:
    """A prefill worker and a decode worker (local_prefill, prefix caching off), started once; yields
    (a ServerFactory that puts a router with the mode's threshold in front of them, and a dict that
    receives, per mode, where its router saw prompts prefilled, warm-up included). Stops every
    process on exit. `cpus`: cores per role (default `default_cpu_split()`: prefill core 0, decode core 1)."""
    import httpx

    from labkit.serve.launcher import default_cpu_split, new_kv_token, start_router, start_worker, stop_all

    split = cpus or default_cpu_split()
    token = new_kv_token()
    common: dict[str, Any] = {
        "model": model,
        "kv_token": token,
        "transfer": transfer,
        "kv_cache_bytes": kv_cache_bytes,
        "startup_timeout_s": startup_timeout_s,
        "enable_prefix_caching": False,
    }
    workers = []
    placed: dict[str, dict[str, float]] = {}
    try:
        workers.append(start_worker("prefill", name="prefill0", cpus=split.get("prefill"), **common))
        workers.append(start_worker("decode", name="decode0", cpus=split.get("decode"), local_prefill=True, **common))

        @contextlib.contextmanager
        def factory(spec: ModeSpec) -> Iterator[str]:
            if spec.mode != "disagg" or (spec.prefill, spec.decode) != (1, 1):
                raise ValueError(f"shared_1p1d serves 1p1d and 1p1d-selective-N only, not {spec.name!r}")
            router = start_router(
                model=model, prefill=workers[:1], decode=workers[1:], prefill_threshold=spec.prefill_threshold
            )
            try:
                yield router.url
                placed[spec.name] = router_prefills(httpx.get(router.url + "/metrics", timeout=10).text)
            finally:
                stop_all([router])

        yield factory, placed
    finally:
        stop_all(workers)


def predict(
    workload: Workload,
    thresholds: Sequence[int],
    rate_rps: float,
    latency: Any,
    slo: Any,
    *,
    max_model_len: int | None = None,
    scale: float | None = None,
    n: int = 400,
    seed: int = 0,
    link: Any = None,
) -> Any:
    """The planner's goodput at each threshold for `workload` (its lengths fitted as the sweep fits
    them) arriving as Poisson at `rate_rps` on one 1P1D unit with `latency` (a LatencyModel) and
    `slo` (labkit.plan's: TTFT and TPOT); the lab's router forwards the prefill worker's first token
    (first_token_at "landed"). Returns the ThresholdSweep (`.best_threshold`, `.goodput_rps`)."""
    from labkit.plan.selective import best_prefill_threshold
    from labkit.plan.workload import Requests

    s = sample_requests(workload, n, seed=seed, max_model_len=max_model_len, scale=scale)
    arrival = Arrivals("poisson", rate_rps).times_s(n, seed)
    req = Requests(
        np.asarray(arrival, dtype=float),
        np.array([r.prompt_tokens for r in s.requests]),
        np.array([r.output_tokens for r in s.requests]),
    )
    return best_prefill_threshold(
        req, latency, slo, thresholds=thresholds, rate_rps=rate_rps, link=link, first_token_at="landed"
    )


def candidates(
    workload: Workload,
    *,
    max_model_len: int | None = None,
    scale: float | None = None,
    count: int = 4,
    n: int = 400,
    seed: int = 0,
) -> list[int]:
    """Thresholds worth measuring (the planner's rule, `threshold_candidates`): 0, one past the prompt
    length at `count` - 1 evenly spaced quantiles, and one past the longest (everything on decode)."""
    from labkit.plan.selective import threshold_candidates
    from labkit.plan.workload import Requests

    s = sample_requests(workload, n, seed=seed, max_model_len=max_model_len, scale=scale)
    p = np.array([r.prompt_tokens for r in s.requests])
    return threshold_candidates(Requests(np.arange(n, dtype=float), p, np.ones(n, dtype=np.int64)), count=count)
