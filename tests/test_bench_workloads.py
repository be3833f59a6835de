from __future__ import annotations

import numpy as np
import pytest

from labkit.bench import (LengthDist, TokenSpace, build_requests, fit_to_context, get_workload, sample_requests,
                          synthetic)
from labkit.bench.workloads import WORKLOADS


@pytest.mark.parametrize("name,p50_prompt,p50_output", [("azure-conv-2023", 1020, 129), ("azure-code-2023", 1469, 13)])
def test_azure_presets_match_published_medians(name: str, p50_prompt: int, p50_output: int) -> None:
    p, o = get_workload(name).sample_lengths(40_000, seed=1)
    assert np.median(p) == pytest.approx(p50_prompt, rel=0.03)
    assert np.median(o) == pytest.approx(p50_output, rel=0.08)


def test_mooncake_preset_mean_and_prefix_reuse() -> None:
    w = get_workload("mooncake-conv")
    p, o = w.sample_lengths(40_000, seed=2)
    assert p.mean() == pytest.approx(12035, rel=0.03)
    assert o.mean() == pytest.approx(343, rel=0.03)
    assert w.prefix_hit_rate == pytest.approx(0.366)


def test_short_prompt_preset_and_unknown_name() -> None:
    p, o = get_workload("short-prompt").sample_lengths(1000)
    assert p.min() >= 16 and p.max() <= 64 and o.min() >= 128 and o.max() <= 256
    assert set(WORKLOADS) >= {"azure-conv-2023", "azure-code-2023", "mooncake-conv", "short-prompt"}
    with pytest.raises(ValueError, match="no-such-trace"):
        get_workload("no-such-trace")


def test_length_dists_and_validation() -> None:
    rng = np.random.default_rng(0)
    assert (LengthDist.fixed(7).sample(5, rng) == 7).all()
    u = LengthDist.uniform(3, 5).sample(2000, rng)
    assert set(u.tolist()) == {3, 4, 5}
    ln = LengthDist.lognormal(100, 0.5, 10, 300).sample(20_000, rng)
    assert ln.min() >= 10 and ln.max() <= 300 and np.median(ln) == pytest.approx(100, rel=0.03)
    with pytest.raises(ValueError, match="low=5 high=3"):
        LengthDist.uniform(5, 3)
    with pytest.raises(ValueError, match="'normal'"):
        LengthDist("normal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="1.5"):
        synthetic("x", 10, 10, prefix_hit_rate=1.5)


def test_fit_to_context_scales_and_reports() -> None:
    p = np.array([1000, 2000, 4000, 8000])
    o = np.array([100, 200, 400, 800])
    ps, os_, info = fit_to_context(p, o, 2048, quantile=1.0)
    assert info.factor == pytest.approx(2048 / 8800)
    assert (ps + os_ <= 2048).all()
    assert ps[0] / os_[0] == pytest.approx(10, rel=0.05)  # the prompt:output ratio is kept
    assert info.clipped_requests == 0
    assert "2048 positions" in info.describe()
    # an explicit scale, with clipping for what still does not fit
    ps, os_, info = fit_to_context(p, o, 2048, scale=0.5)
    assert info.factor == 0.5 and info.clipped_requests == 2
    assert (ps + os_ <= 2048).all() and ps[0] == 500 and os_[0] == 50
    # nothing to do when everything fits
    ps, os_, info = fit_to_context(p, o, 100_000)
    assert info.factor == 1.0 and (ps == p).all()


def test_build_requests_exact_lengths_and_seeded_prompts() -> None:
    a = build_requests([10, 20, 30], [5, 6, 7], seed=1)
    b = build_requests([10, 20, 30], [5, 6, 7], seed=1)
    c = build_requests([10, 20, 30], [5, 6, 7], seed=2)
    assert [r.prompt_tokens for r in a] == [10, 20, 30]
    assert [r.output_tokens for r in a] == [5, 6, 7]
    assert a == b
    assert all(x.prompt_token_ids != y.prompt_token_ids for x, y in zip(a, c))
    assert all(0 <= t < 256 for r in a for t in r.prompt_token_ids)
    ascii_reqs = build_requests([50], [1], space=TokenSpace(32, 127))
    assert all(32 <= t < 127 for t in ascii_reqs[0].prompt_token_ids)
    with pytest.raises(ValueError, match="request 0"):
        build_requests([0], [4])


def test_prefix_hit_rate_shares_prefixes_within_groups() -> None:
    w = synthetic("shared", 400, 4, prefix_hit_rate=0.5, prefix_groups=2)
    s = sample_requests(w, 40, seed=3)
    assert all(r.shared_prefix_tokens == 200 for r in s.requests)
    groups: dict[int, list] = {}
    for r in s.requests:
        groups.setdefault(r.prefix_group, []).append(r.prompt_token_ids)
    assert set(groups) == {0, 1}
    for prompts in groups.values():
        assert all(p[:200] == prompts[0][:200] for p in prompts)  # same system prompt
        assert len({p[200:] for p in prompts}) == len(prompts)    # fresh rest
    assert groups[0][0][:200] != groups[1][0][:200]


def test_sample_requests_fits_model_context() -> None:
    s = sample_requests("mooncake-conv", 100, seed=0, max_model_len=2048)
    assert s.scaling.factor < 0.25
    assert all(r.prompt_tokens + r.output_tokens <= 2048 for r in s.requests)
    assert s.mean_prompt_tokens == pytest.approx(s.scaling.mean_prompt_after)
