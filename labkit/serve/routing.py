"""Which prefill worker gets a request: the choice as a named, pure function, and how to name one.

A policy is any callable with this signature (a plain function, or an object with `__call__`
when it keeps state, as round-robin does):

    def choose_prefill(block_hashes: Sequence[bytes],
                       candidates: Sequence[PrefillCandidate]) -> PrefillCandidate: ...

`block_hashes`: the prompt's chained block hashes (labkit.serve.prefix_index.block_hashes: the
i-th names the whole prefix up to the end of block i; a partial last block has none).
`candidates`: the prefill workers that are up (never empty), each with its `name`, the leading
blocks of the prompt it is believed to cache (`matched_blocks`), its load (`in_flight`: requests
open or running on it; `active_blocks`: the KV blocks of the requests the router has open on it),
its free and total KV blocks, how many blocks the router's index believes it caches
(`cached_blocks`), and the request's `prompt_tokens` and the workers' `block_size`. Return one of
the candidates, unchanged. The same policy picks among mono workers in a monolithic deployment.

The router takes a policy by spec (`--prefill-policy`, `start_router(prefill_policy=...)`):
a registered name (`POLICIES`), with parameters after a colon when it has any
(`dynamo-cost:overlap_weight=2,temperature=0.5`), or `package.module:function`, or
`path/to/file.py:function` (a learner's cell written to a file). `load_policy` checks the spec when
the router starts and names what is wrong (an unknown name or parameter, a value out of range).

    round-robin          each worker in turn
    least-load           fewest requests in flight (ties: most free KV blocks, then the first listed)
    prefix-then-load     the lab's rule, the default: longest cached prefix, then least load
    dynamo-cost          NVIDIA Dynamo's KV router cost (DynamoCost)
    sglang-cache-aware   SGLang router's cache-aware policy (SGLangCacheAware)

benchmarks/router_policies.py runs them side by side on one prefix-heavy trace.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import math
import random
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class PrefillCandidate:
    """One prefill worker as a policy sees it (the request's own figures ride along: `prompt_tokens`)."""

    name: str
    matched_blocks: int  # leading blocks of the prompt it caches (the router's prefix index)
    in_flight: int  # requests open or running on it
    free_kv_blocks: int
    total_kv_blocks: int
    active_blocks: int = 0  # KV blocks of the requests the router has open on it (shared prefix blocks once)
    cached_blocks: int = 0  # blocks the router's index believes it caches (its "tree size")
    prompt_tokens: int = 0  # this request's prompt length
    block_size: int = 0  # tokens per KV block (0: not known yet)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens it would not compute (its cached leading blocks)."""
        return min(self.prompt_tokens, self.matched_blocks * self.block_size)

    @property
    def prefill_blocks(self) -> float:
        """Blocks of the prompt it would compute: uncached tokens / block size (0 when unknown)."""
        return (self.prompt_tokens - self.cached_tokens) / self.block_size if self.block_size else 0.0

    @property
    def match_ratio(self) -> float:
        """Share of the prompt it caches, 0..1."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


PrefillPolicy = Callable[[Sequence[bytes], Sequence[PrefillCandidate]], PrefillCandidate]


def prefix_then_load(block_hashes: Sequence[bytes], candidates: Sequence[PrefillCandidate]) -> PrefillCandidate:
    """The longest cached prefix wins (its prefill is shortest); ties go to the least loaded, then to the
    one with the most free KV blocks, then to the first listed."""
    return min(candidates, key=lambda c: (-c.matched_blocks, c.in_flight, -c.free_kv_blocks))


def least_load(block_hashes: Sequence[bytes], candidates: Sequence[PrefillCandidate]) -> PrefillCandidate:
    """The fewest requests in flight, blind to the cache (shortest queue); ties go to the most free KV
    blocks, then to the first listed."""
    return min(candidates, key=lambda c: (c.in_flight, -c.free_kv_blocks))


@dataclass
class RoundRobin:
    """Each worker in turn, blind to cache and load: the i-th request goes to candidate i mod n
    (the `round_robin` policy of SGLang's router and Dynamo's frontend)."""

    _next: int = field(default=0, init=False, repr=False)

    def __call__(self, block_hashes: Sequence[bytes], candidates: Sequence[PrefillCandidate]) -> PrefillCandidate:
        chosen = candidates[self._next % len(candidates)]
        self._next += 1
        return chosen


def _finite_at_least_zero(name: str, v: float) -> None:
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {v}")


@dataclass
class DynamoCost:
    """NVIDIA Dynamo's KV router: cost = overlap_weight x blocks to prefill + active blocks; the lowest wins.

    Source: ai-dynamo/dynamo `lib/llm/src/kv_router/scheduler.rs`, DefaultWorkerSelector: a worker's
    logit is `overlap_weight * potential_prefill_blocks + decode_blocks`, where the prefill blocks are
    the prompt's tokens that worker does not cache over the block size, and the decode blocks are the
    blocks of the sequences active on it (docs/router/kv_cache_routing.md: "cost = overlap_score_weight
    * prefill_blocks + decode_blocks"). Selection, its `softmax_sample`: temperature 0 takes the lowest
    cost (ties: the worker with the smaller cache tree, then at random); above 0 the costs are scaled
    to [0, 1] by their range, negated and divided by the temperature, and a worker is sampled from
    their softmax (all costs equal: uniform). Defaults from `lib/llm/src/kv_router/config.rs`
    (KvRouterConfig::default: overlap_score_weight 1.0, router_temperature 0.0; flags
    `--kv-overlap-score-weight`, `--router-temperature`). A higher weight favours cache hits (TTFT),
    a lower one spreads the load (ITL); 0 ignores the cache.

    Here the active blocks are the router's count of the blocks of the requests it has open on that
    worker (a prefix block two of them share counts once, as in Dynamo's ActiveSequences). Dynamo also
    adds the new request's own blocks to every worker's decode load; that term differs between workers
    only by blocks shared with open requests and is left out. `seed` seeds the sampler (None: fresh).
    """

    overlap_weight: float = 1.0
    temperature: float = 0.0
    seed: int | None = None
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _finite_at_least_zero("overlap_weight", self.overlap_weight)
        _finite_at_least_zero("temperature", self.temperature)
        self._rng = random.Random(self.seed)

    def cost(self, c: PrefillCandidate) -> float:
        """overlap_weight x blocks to prefill + active blocks (lower is better)."""
        return self.overlap_weight * c.prefill_blocks + c.active_blocks

    def probabilities(self, candidates: Sequence[PrefillCandidate]) -> list[float]:
        """The chance of each candidate at this temperature (temperature 0: 1 for the lowest cost, split on ties)."""
        costs = [self.cost(c) for c in candidates]
        lo, hi = min(costs), max(costs)
        if self.temperature == 0:
            best = [float(x == lo) for x in costs]
            return [b / sum(best) for b in best]
        if hi == lo:
            return [1.0 / len(costs)] * len(costs)
        weights = [math.exp(-(x - lo) / ((hi - lo) * self.temperature)) for x in costs]
        return [w / sum(weights) for w in weights]

    def __call__(self, block_hashes: Sequence[bytes], candidates: Sequence[PrefillCandidate]) -> PrefillCandidate:
        if self.temperature > 0:
            return self._rng.choices(list(candidates), weights=self.probabilities(candidates))[0]
        costs = [self.cost(c) for c in candidates]
        tied = [c for c, x in zip(candidates, costs) if x == min(costs)]
        smallest = min(c.cached_blocks for c in tied)
        tied = [c for c in tied if c.cached_blocks == smallest]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)


@dataclass
class SGLangCacheAware:
    """SGLang router's cache-aware policy: cache affinity while the load is balanced, shortest queue when not.

    Source: sgl-project/sglang `sgl-router/src/policies/cache_aware.rs` (CacheAwarePolicy.select_worker).
    The load is imbalanced when BOTH `max - min > balance_abs_threshold` AND `max > min *
    balance_rel_threshold` (loads: requests in flight per worker); then the least loaded worker wins
    (ties: the first listed). Otherwise the worker with the longest cached prefix wins if its match
    ratio (matched / prompt length) is above `cache_threshold`, else the worker with the smallest
    cache tree (the most room). Defaults: the router's command line
    (`sgl-router/py_src/sglang_router/router_args.py`: cache_threshold 0.3, balance_abs_threshold 64,
    balance_rel_threshold 1.5); the Rust library's CacheAwareConfig::default
    (`sgl-router/src/policies/mod.rs`) has 0.5, 32 and 1.1.

    Here the match counts tokens of whole cached blocks (SGLang matches characters in a radix tree of
    request text), and the tree size is the blocks the router's index holds for the worker plus those of
    the requests open on it (`tree_blocks`). The index is bounded by the worker's KV pool (SGLang's tree
    by max_tree_size, 2^26 characters by default, so it keeps growing with what was routed), so once
    both are full the sizes can tie: ties between equal trees, and between equal matches, go to the
    less loaded, then the first listed.
    """

    cache_threshold: float = 0.3
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.cache_threshold <= 1.0:
            raise ValueError(f"cache_threshold must be in [0, 1], got {self.cache_threshold}")
        if self.balance_abs_threshold < 0:
            raise ValueError(f"balance_abs_threshold must be >= 0, got {self.balance_abs_threshold}")
        _finite_at_least_zero("balance_rel_threshold", self.balance_rel_threshold)

    def imbalanced(self, candidates: Sequence[PrefillCandidate]) -> bool:
        """SGLang's test: both the absolute and the relative spread of in-flight requests exceed their thresholds."""
        loads = [c.in_flight for c in candidates]
        return (
            max(loads) - min(loads) > self.balance_abs_threshold
            and max(loads) > min(loads) * self.balance_rel_threshold
        )

    def __call__(self, block_hashes: Sequence[bytes], candidates: Sequence[PrefillCandidate]) -> PrefillCandidate:
        if self.imbalanced(candidates):
            return min(candidates, key=lambda c: c.in_flight)
        best = min(candidates, key=lambda c: (-c.matched_blocks, c.in_flight))
        if best.match_ratio > self.cache_threshold:
            return best
        return min(candidates, key=lambda c: (self.tree_blocks(c), c.in_flight))

    @staticmethod
    def tree_blocks(c: PrefillCandidate) -> int:
        """SGLang's tree size, in blocks: SGLang adds a request to its tree when it routes it; the router's
        index takes a request's blocks once its prefill is done, so the requests still open count too."""
        return c.cached_blocks + c.active_blocks


# Registered policies by name: "module:attr" specs, imported when named. A class is a policy with
# parameters (its init fields, given after a colon: `dynamo-cost:overlap_weight=2`), built fresh
# for each router; a function takes none.
POLICIES: dict[str, str] = {
    "round-robin": "labkit.serve.routing:RoundRobin",
    "least-load": "labkit.serve.routing:least_load",
    "prefix-then-load": "labkit.serve.routing:prefix_then_load",
    "dynamo-cost": "labkit.serve.routing:DynamoCost",
    "sglang-cache-aware": "labkit.serve.routing:SGLangCacheAware",
}
DEFAULT_POLICY = "prefix-then-load"


def load_spec(spec: str, registry: dict[str, str], what: str) -> Any:
    """The object `spec` names: a key of `registry`, `package.module:attr` or `path/to/file.py:attr`.

    Raises ValueError saying what is wrong (unknown name, missing file or module, no such attribute).
    """
    target = registry.get(spec, spec)
    mod_name, sep, attr = target.rpartition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(
            f"{what} {spec!r}: not a registered name ({', '.join(registry)}), nor 'module:function' "
            "nor 'path/to/file.py:function'"
        )
    if mod_name.endswith(".py"):
        path = Path(mod_name).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"{what} {spec!r}: no file {path}")
        module_spec = importlib.util.spec_from_file_location(f"labkit_user_{path.stem}", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise ValueError(f"{what} {spec!r}: {path.name} failed to load: {e.__class__.__name__}: {e}") from e
    else:
        try:
            module = importlib.import_module(mod_name)
        except ImportError as e:
            raise ValueError(f"{what} {spec!r}: cannot import {mod_name} ({e})") from None
    if not hasattr(module, attr):
        raise ValueError(f"{what} {spec!r}: {mod_name} has no {attr!r}")
    return getattr(module, attr)


def policy_params(cls: type, text: str) -> dict[str, Any]:
    """`key=value,key=value` as the init fields of policy class `cls`, converted to their types;
    ValueError naming an unknown key, a malformed item or a value of the wrong type."""
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, eq, raw = (x.strip() for x in item.partition("="))
        if not eq or not key:
            raise ValueError(f"parameter {item!r} is not key=value")
        if key not in fields:
            raise ValueError(f"no parameter {key!r}; it takes {', '.join(sorted(fields)) or 'none'}")
        typ = hints[key]
        try:
            if raw.lower() == "none" and typ != float and typ != int:  # an optional int (a seed)
                out[key] = None
            elif typ is float:
                out[key] = float(raw)
            else:
                out[key] = int(raw)
        except ValueError:
            want = "a number" if typ is float else "an integer"
            raise ValueError(f"{key}={raw!r} is not {want}") from None
    return out


def load_policy(spec: str = DEFAULT_POLICY) -> PrefillPolicy:
    """The policy `spec` names (a registered name with optional `:key=value,...` parameters, a module's
    or a file's callable; a class is instantiated), checked to take two arguments; ValueError otherwise."""
    name, _, params = spec.partition(":")
    fn = load_spec(name if name in POLICIES else spec, POLICIES, "prefill policy")
    if inspect.isclass(fn):
        try:
            fn = fn(**policy_params(fn, params if name in POLICIES else ""))
        except (ValueError, TypeError) as e:
            raise ValueError(f"prefill policy {spec!r}: {e}") from None
    elif name in POLICIES and params.strip():
        raise ValueError(f"prefill policy {name!r} takes no parameters, got {params!r}")
    try:
        inspect.signature(fn).bind(None, None)
    except TypeError:
        raise ValueError(
            f"prefill policy {spec!r} must be a callable taking (block_hashes, candidates); got {fn!r}"
        ) from None
    except ValueError:  # no signature to inspect (a builtin): trust it, the first request will tell
        pass
    return fn


def choose(
    policy: PrefillPolicy, block_hashes: Sequence[bytes], candidates: Sequence[PrefillCandidate]
) -> PrefillCandidate:
    """`policy`'s choice, checked to be one of `candidates` (TypeError naming the policy otherwise)."""
    chosen = policy(block_hashes, candidates)
    if not any(chosen is c or chosen == c for c in candidates):
        name = getattr(policy, "__name__", type(policy).__name__)
        raise TypeError(f"prefill policy {name} returned {chosen!r}, not one of the candidates it was given")
    return chosen
