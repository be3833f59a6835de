"""Workloads: prompt and output length distributions, named presets, exact-length prompts.

A workload says how long prompts and outputs are and how much of each prompt is a prefix
shared with other requests. `sample_requests` turns it into concrete requests whose prompts are
token-id lists, so the server sees exactly the intended lengths (and `ignore_eos` with
`max_tokens` fixes the output length).

Presets come from published figures (no trace is needed to use them):

- `azure-conv-2023`, `azure-code-2023`: Azure LLM inference traces, 2023 (Splitwise, ISCA'24):
  prompt median 1,020 / 1,469 tokens, output median 129 / 13; lognormals fitted to the
  published p50, p90 and p99, clipped at the published max.
- `mooncake-conv`: Mooncake's conversation trace (FAST'25): mean 12,035 prompt and 343 output
  tokens, 36.6% of prefix blocks seen before (a lognormal with an assumed spread, sigma 0.6).
- `short-prompt`: chat turns of 16-64 prompt tokens and 128-256 output tokens, where
  disaggregation has nothing to offload and loses.

    >>> w = get_workload("azure-conv-2023")
    >>> prompt_lens, output_lens = w.sample_lengths(1000, seed=0)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

LengthKind = Literal["fixed", "uniform", "lognormal"]
_Z90, _Z99 = 1.2815515655446004, 2.3263478740408408


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A token-length distribution. `fixed`: `value`; `uniform`: [low, high]; `lognormal`:
    median `value`, log-space spread `sigma`, clipped to [low, high]."""

    kind: LengthKind
    value: int = 0
    low: int = 1
    high: int = 1
    sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("fixed", "uniform", "lognormal"):
            raise ValueError(f"length kind {self.kind!r} is not one of fixed, uniform, lognormal")
        if self.kind == "fixed" and self.value < 1:
            raise ValueError(f"fixed length must be >= 1 token, got {self.value}")
        if self.kind in ("uniform", "lognormal") and not 1 <= self.low <= self.high:
            raise ValueError(f"length bounds must satisfy 1 <= low <= high, got low={self.low} high={self.high}")
        if self.kind == "lognormal" and (self.value < 1 or self.sigma < 0):
            raise ValueError(f"lognormal needs median >= 1 and sigma >= 0, got {self.value}, {self.sigma}")

    @staticmethod
    def fixed(tokens: int) -> LengthDist:
        return LengthDist("fixed", value=int(tokens), low=int(tokens), high=int(tokens))

    @staticmethod
    def uniform(low: int, high: int) -> LengthDist:
        return LengthDist("uniform", low=int(low), high=int(high))

    @staticmethod
    def lognormal(median: int, sigma: float, low: int = 1, high: int = 1_000_000) -> LengthDist:
        return LengthDist("lognormal", value=int(median), sigma=float(sigma), low=int(low), high=int(high))

    @staticmethod
    def from_quantiles(p50: float, p90: float, p99: float, low: int = 1, high: int = 1_000_000) -> LengthDist:
        """A lognormal with median `p50` whose sigma fits p90 and p99 by least squares in log space."""
        y90, y99 = math.log(p90 / p50), math.log(p99 / p50)
        sigma = (_Z90 * y90 + _Z99 * y99) / (_Z90**2 + _Z99**2)
        return LengthDist.lognormal(int(p50), sigma, low, high)

    @staticmethod
    def from_mean(mean: float, sigma: float, low: int = 1, high: int = 1_000_000) -> LengthDist:
        """A lognormal with the given mean (before clipping): median = mean / exp(sigma^2 / 2)."""
        return LengthDist.lognormal(max(1, round(mean / math.exp(sigma**2 / 2))), sigma, low, high)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` lengths in tokens (int64)."""
        if self.kind == "fixed":
            return np.full(n, self.value, dtype=np.int64)
        if self.kind == "uniform":
            return rng.integers(self.low, self.high + 1, size=n, dtype=np.int64)
        x = rng.lognormal(math.log(self.value), self.sigma, size=n)
        return np.clip(np.rint(x), self.low, self.high).astype(np.int64)

    def scaled(self, factor: float) -> LengthDist:
        """The same shape with every length multiplied by `factor` (at least 1 token)."""
        s = lambda v: max(1, round(v * factor))
        if self.kind == "fixed":
            return LengthDist.fixed(s(self.value))
        if self.kind == "uniform":
            return LengthDist.uniform(s(self.low), max(s(self.low), s(self.high)))
        return LengthDist.lognormal(s(self.value), self.sigma, s(self.low), max(s(self.low), s(self.high)))

    @property
    def median(self) -> float:
        """The median in tokens (before clipping for lognormal)."""
        return float(self.value) if self.kind != "uniform" else (self.low + self.high) / 2

    @property
    def mean(self) -> float:
        """The mean in tokens (before clipping for lognormal)."""
        if self.kind == "lognormal":
            return self.value * math.exp(self.sigma**2 / 2)
        return self.median

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"{self.value}"
        if self.kind == "uniform":
            return f"U[{self.low}, {self.high}]"
        return f"lognormal(median {self.value}, sigma {self.sigma:.2f}, {self.low}..{self.high})"


@dataclass(frozen=True, slots=True)
class Workload:
    """Prompt and output lengths plus prefix sharing.

    `prefix_hit_rate` is the fraction of each prompt that is a prefix shared with other requests
    of its group (a system prompt, earlier turns); `prefix_groups` is how many distinct shared
    prefixes exist. 0 means every prompt is fresh random tokens.
    """

    name: str
    prompt_len: LengthDist
    output_len: LengthDist
    prefix_hit_rate: float = 0.0
    prefix_groups: int = 1
    source: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.prefix_hit_rate < 1.0:
            raise ValueError(f"prefix_hit_rate must be in [0, 1), got {self.prefix_hit_rate}")
        if self.prefix_groups < 1:
            raise ValueError(f"prefix_groups must be >= 1, got {self.prefix_groups}")

    def sample_lengths(self, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """(prompt tokens, output tokens), `n` each, deterministic in `seed`."""
        rng = np.random.default_rng([seed, 1])
        return self.prompt_len.sample(n, rng), self.output_len.sample(n, rng)

    def scaled(self, prompt_factor: float, output_factor: float | None = None) -> Workload:
        """The same workload with lengths multiplied (outputs by `output_factor`, default the same)."""
        of = prompt_factor if output_factor is None else output_factor
        return replace(self, prompt_len=self.prompt_len.scaled(prompt_factor), output_len=self.output_len.scaled(of))

    def describe(self) -> str:
        s = f"{self.name}: prompt {self.prompt_len.describe()}, output {self.output_len.describe()}"
        if self.prefix_hit_rate:
            s += f", {self.prefix_hit_rate:.1%} shared prefix over {self.prefix_groups} group(s)"
        return s


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in [
        Workload(
            "azure-conv-2023",
            LengthDist.from_quantiles(1020, 2735, 4142, 1, 14050),
            LengthDist.from_quantiles(129, 424, 601, 1, 1000),
            source="Azure LLM inference trace 2023, conversation (Splitwise, ISCA'24): p50/p90/p99",
        ),
        Workload(
            "azure-code-2023",
            LengthDist.from_quantiles(1469, 5188, 7436, 1, 7437),
            LengthDist.from_quantiles(13, 55, 252, 1, 1899),
            source="Azure LLM inference trace 2023, code (Splitwise, ISCA'24): p50/p90/p99",
        ),
        Workload(
            "mooncake-conv",
            LengthDist.from_mean(12035, 0.6, 1, 128_000),
            LengthDist.from_mean(343, 0.6, 1, 4096),
            prefix_hit_rate=0.366,
            prefix_groups=8,
            source="Mooncake conversation trace (FAST'25): means 12,035 / 343, 36.6% prefix blocks reused; "
            "sigma 0.6 assumed",
        ),
        Workload(
            "short-prompt",
            LengthDist.uniform(16, 64),
            LengthDist.uniform(128, 256),
            source="short chat turns: little prefill to offload (where disaggregation loses)",
        ),
    ]
}


def get_workload(name: str) -> Workload:
    """The preset called `name` (see WORKLOADS)."""
    try:
        return WORKLOADS[name]
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}") from None


def synthetic(
    name: str,
    prompt_tokens: int | tuple[int, int] | LengthDist,
    output_tokens: int | tuple[int, int] | LengthDist,
    *,
    prefix_hit_rate: float = 0.0,
    prefix_groups: int = 1,
) -> Workload:
    """A workload from fixed lengths (int), uniform ranges ((low, high)) or any LengthDist."""

    def as_dist(x: int | tuple[int, int] | LengthDist) -> LengthDist:
        if isinstance(x, LengthDist):
            return x
        if isinstance(x, tuple):
            return LengthDist.uniform(*x)
        return LengthDist.fixed(int(x))

    return Workload(
        name, as_dist(prompt_tokens), as_dist(output_tokens), prefix_hit_rate, prefix_groups, source="synthetic"
    )


@dataclass(frozen=True, slots=True)
class LengthScaling:
    """How lengths were fitted into a model's context: what a benchmark reports beside results."""

    max_model_len: int
    factor: float
    clipped_requests: int
    mean_prompt_before: float
    mean_prompt_after: float
    mean_output_before: float
    mean_output_after: float

    def describe(self) -> str:
        limit = f"to fit {self.max_model_len} positions" if self.max_model_len < 1 << 40 else "(no context limit)"
        return (
            f"lengths x{self.factor:.3g} {limit} "
            f"({self.clipped_requests} request(s) clipped): mean prompt {self.mean_prompt_before:,.0f} -> "
            f"{self.mean_prompt_after:,.0f}, mean output {self.mean_output_before:,.0f} -> "
            f"{self.mean_output_after:,.0f} tokens"
        )


def fit_to_context(
    prompt_lens: Sequence[int] | np.ndarray,
    output_lens: Sequence[int] | np.ndarray,
    max_model_len: int,
    *,
    scale: float | None = None,
    quantile: float = 0.99,
) -> tuple[np.ndarray, np.ndarray, LengthScaling]:
    """Scales lengths into a `max_model_len` context; returns (prompts, outputs, LengthScaling).

    Without `scale`, one factor (<= 1) is chosen so that the `quantile` of prompt+output fits;
    the shape of the distribution (prompt:output ratio, spread) is kept. Requests that still do
    not fit are clipped: the output first keeps at most half the context, the prompt the rest.
    """
    p = np.asarray(prompt_lens, dtype=np.float64)
    o = np.asarray(output_lens, dtype=np.float64)
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be >= 2, got {max_model_len}")
    if p.shape != o.shape:
        raise ValueError(f"{len(p)} prompt lengths but {len(o)} output lengths")
    if scale is None:
        q = float(np.quantile(p + o, quantile)) if len(p) else 0.0
        scale = min(1.0, max_model_len / q) if q > 0 else 1.0
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    ps = np.maximum(1, np.rint(p * scale)).astype(np.int64)
    os_ = np.maximum(1, np.rint(o * scale)).astype(np.int64)
    too_long = ps + os_ > max_model_len
    os_ = np.where(too_long, np.minimum(os_, max_model_len // 2), os_)
    ps = np.where(too_long, np.minimum(ps, max_model_len - os_), ps)
    info = LengthScaling(
        max_model_len,
        float(scale),
        int(too_long.sum()),
        float(p.mean()) if len(p) else 0.0,
        float(ps.mean()) if len(p) else 0.0,
        float(o.mean()) if len(o) else 0.0,
        float(os_.mean()) if len(o) else 0.0,
    )
    return ps, os_, info


@dataclass(frozen=True, slots=True)
class BenchRequest:
    """One request to send: exact prompt tokens, output length, optional trace arrival time."""

    index: int
    prompt_token_ids: tuple[int, ...]
    output_tokens: int
    arrival_s: float | None = None
    shared_prefix_tokens: int = 0
    prefix_group: int = -1

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


@dataclass(frozen=True, slots=True)
class TokenSpace:
    """Which token ids random prompts draw from: [low, high). The lab's byte tokenizer has ids
    0..255 for bytes (256+ are special), so the default stays inside plain bytes."""

    low: int = 0
    high: int = 256

    def __post_init__(self) -> None:
        if not 0 <= self.low < self.high:
            raise ValueError(f"token space must satisfy 0 <= low < high, got [{self.low}, {self.high})")


def _block_tokens(key: Sequence[int], n: int, space: TokenSpace) -> np.ndarray:
    """Deterministic tokens for a shared block or prefix named by `key` (same key, same tokens)."""
    return np.random.default_rng([0x5EED, *key]).integers(space.low, space.high, size=n, dtype=np.int64)


def build_requests(
    prompt_lens: Sequence[int] | np.ndarray,
    output_lens: Sequence[int] | np.ndarray,
    *,
    seed: int = 0,
    prefix_hit_rate: float = 0.0,
    prefix_groups: int = 1,
    arrivals_s: Sequence[float] | np.ndarray | None = None,
    space: TokenSpace = TokenSpace(),
    block_hashes: Sequence[Sequence[int]] | None = None,
    block_tokens: int = 512,
) -> list[BenchRequest]:
    """Concrete requests with exact prompt lengths.

    Each prompt is a shared prefix then fresh tokens drawn from `seed` (a different seed gives
    different prompts, so a prefix cache is not warmed by accident). The shared prefix is either
    `prefix_hit_rate` of the prompt taken from one of `prefix_groups` group sequences (also drawn
    from `seed`: only requests of one run share them), or, with
    `block_hashes` (Mooncake traces), one deterministic block of `block_tokens` per hash id.
    """
    n = len(prompt_lens)
    if len(output_lens) != n or (arrivals_s is not None and len(arrivals_s) != n):
        raise ValueError("prompt_lens, output_lens and arrivals_s must have the same length")
    if block_hashes is not None and len(block_hashes) != n:
        raise ValueError(f"{len(block_hashes)} hash_id lists for {n} requests")
    rng = np.random.default_rng([seed, 2])
    group_of = rng.integers(0, prefix_groups, size=n) if prefix_groups > 1 else np.zeros(n, dtype=np.int64)
    max_prompt = int(max(prompt_lens, default=0))
    group_seqs = (
        {g: _block_tokens((1, seed, g), max_prompt, space) for g in set(group_of.tolist())} if prefix_hit_rate else {}
    )
    out: list[BenchRequest] = []
    for i in range(n):
        plen, olen = int(prompt_lens[i]), int(output_lens[i])
        if plen < 1 or olen < 1:
            raise ValueError(f"request {i}: prompt and output need >= 1 token, got {plen} and {olen}")
        group = -1
        if block_hashes is not None:
            blocks = [_block_tokens((2, int(h)), block_tokens, space) for h in block_hashes[i]]
            shared = np.concatenate(blocks)[:plen] if blocks else np.zeros(0, dtype=np.int64)
        elif prefix_hit_rate:
            group = int(group_of[i])
            shared = group_seqs[group][: int(plen * prefix_hit_rate)]
        else:
            shared = np.zeros(0, dtype=np.int64)
        fresh = rng.integers(space.low, space.high, size=plen - len(shared), dtype=np.int64)
        ids = tuple(int(t) for t in np.concatenate([shared, fresh]))
        out.append(BenchRequest(i, ids, olen, None if arrivals_s is None else float(arrivals_s[i]), len(shared), group))
    return out


@dataclass(frozen=True, slots=True)
class SampledWorkload:
    """Requests drawn from a workload, with the scaling that made them fit the model."""

    workload: Workload
    requests: list[BenchRequest] = field(repr=False)
    scaling: LengthScaling
    seed: int

    @property
    def mean_prompt_tokens(self) -> float:
        return float(np.mean([r.prompt_tokens for r in self.requests])) if self.requests else 0.0

    @property
    def mean_output_tokens(self) -> float:
        return float(np.mean([r.output_tokens for r in self.requests])) if self.requests else 0.0


def sample_requests(
    workload: Workload | str,
    n: int,
    *,
    seed: int = 0,
    max_model_len: int | None = None,
    scale: float | None = None,
    space: TokenSpace = TokenSpace(),
) -> SampledWorkload:
    """`n` requests from a workload (or preset name), fitted into `max_model_len` when given."""
    w = get_workload(workload) if isinstance(workload, str) else workload
    if n < 1:
        raise ValueError(f"n must be >= 1 request, got {n}")
    p, o = w.sample_lengths(n, seed)
    p, o, info = fit_to_context(p, o, max_model_len or 1 << 40, scale=scale if max_model_len or scale else 1.0)
    reqs = build_requests(
        p, o, seed=seed, prefix_hit_rate=w.prefix_hit_rate, prefix_groups=w.prefix_groups, space=space
    )
    return SampledWorkload(w, reqs, info, seed)
