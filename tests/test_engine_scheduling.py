"""The engine's machinery on `tiny`: policies, prefix cache, preemption, sampling, KV export/import, errors."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from labkit.engine import Engine, EngineConfig, SamplingParams
from labkit.engine.kv_cache import BlockPool
from labkit.engine.sequence import Sequence
from labkit.kv import KVExport

EOS = 257


def prompt_of(n: int, salt: int = 0) -> list[int]:
    return [256] + [(37 * i + 11 * salt + 5) % 256 for i in range(n - 1)]


def engine(**kw) -> Engine:
    return Engine(EngineConfig(**{"model": "tiny", "block_size": 16, **kw}))


def assert_pool_full(eng: Engine) -> None:
    assert not eng.has_unfinished()
    assert eng.num_free_blocks == eng.num_total_blocks, "leaked KV blocks"


@pytest.fixture(scope="module")
def eng() -> Engine:
    return engine()


PROMPTS = [prompt_of(n, salt=n) for n in (1, 9, 16, 17, 40, 70)]


@pytest.fixture(scope="module")
def reference(eng: Engine) -> list[list[int]]:
    """Greedy tokens of PROMPTS, each run alone (itself checked against transformers in test_engine.py)."""
    out = [eng.generate([p], SamplingParams(max_tokens=20, ignore_eos=True))[0].output_token_ids for p in PROMPTS]
    assert_pool_full(eng)
    return out


@pytest.mark.parametrize("policy,budget", [("prefill_first", 2048), ("prefill_first", 24), ("chunked", 24), ("chunked", 7)])
def test_policies_and_budgets_give_the_same_tokens(reference, policy: str, budget: int) -> None:
    e = engine(policy=policy, max_num_batched_tokens=budget, max_num_seqs=4)
    outs = e.generate(PROMPTS, SamplingParams(max_tokens=20, ignore_eos=True))
    assert [o.output_token_ids for o in outs] == reference
    assert_pool_full(e)


def test_step_reports_phases(eng: Engine) -> None:
    e = engine(policy="chunked", max_num_batched_tokens=20)
    e.add_request(prompt_of(10), SamplingParams(max_tokens=5, ignore_eos=True))
    first = e.step()
    assert (first.phase, first.num_prefill_tokens, first.num_decode_seqs) == ("prefill", 10, 0)
    assert len(first.new_tokens) == 1 and first.elapsed_s > 0
    e.add_request(prompt_of(40), SamplingParams(max_tokens=5, ignore_eos=True))
    mixed = e.step()  # one decode + 19 tokens of the new prompt's chunk
    assert (mixed.phase, mixed.num_prefill_tokens, mixed.num_decode_seqs) == ("mixed", 19, 1)
    assert list(mixed.new_tokens) == ["req-0"]  # the chunked prompt has no token yet
    phases = []
    while e.has_unfinished():
        phases.append(e.step().phase)
    assert "decode" in phases and "prefill" not in phases[-2:]
    assert e.step().phase == "idle"
    assert_pool_full(e)

    pf = engine(policy="prefill_first")
    pf.add_request(prompt_of(10), SamplingParams(max_tokens=3))
    pf.add_request(prompt_of(12), SamplingParams(max_tokens=3))
    out = pf.step()
    assert (out.phase, out.num_prefill_tokens, out.num_decode_seqs) == ("prefill", 22, 0)
    assert pf.step().phase == "decode"
    while pf.has_unfinished():
        pf.step()
    assert_pool_full(pf)


def test_prefix_cache_hit_gives_the_output_of_a_miss(reference) -> None:
    e = engine()
    p = PROMPTS[-1]  # 70 tokens: 4 full blocks of 16 before the last token
    miss = e.generate([p], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    hit = e.generate([p], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert miss.num_cached_tokens == 0 and hit.num_cached_tokens == 64
    assert hit.output_token_ids == miss.output_token_ids == reference[-1]
    # A prompt sharing 2 full blocks then diverging reuses exactly those.
    other = p[:40] + [7] * 10
    o = e.generate([other], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert o.num_cached_tokens == 32
    assert o.output_token_ids == engine(enable_prefix_caching=False).generate([other], SamplingParams(max_tokens=8, ignore_eos=True))[0].output_token_ids
    # A prompt of exactly 4 blocks reuses 3: the last token is always recomputed for its logits.
    assert e.generate([p[:64]], SamplingParams(max_tokens=2))[0].num_cached_tokens == 48
    assert e.prefix_cache_hit_tokens == 64 + 32 + 48
    assert_pool_full(e)


def test_block_pool_refcounts_and_lru_eviction() -> None:
    pool = BlockPool(num_blocks=4, block_size=2, enable_prefix_caching=True)
    a = Sequence("a", [1, 2, 3, 4, 5], SamplingParams())
    assert pool.match_prefix(a) == 0 and pool.grow(a, 5)
    a.num_computed_tokens = 5
    pool.commit(a)  # blocks [1,2] and [3,4] get names; [5] stays anonymous
    b = Sequence("b", [1, 2, 3, 4, 9], SamplingParams())
    assert pool.match_prefix(b) == 4 and b.block_table == a.block_table[:2]
    assert [pool.ref_count[x] for x in a.block_table] == [2, 2, 1]
    pool.release(a)
    pool.release(b)
    assert pool.num_free_blocks == 4 and len(pool.evictable) == 2
    # Taking all four blocks evicts the named ones (oldest first), and their names go.
    c = Sequence("c", [7] * 8, SamplingParams())
    assert pool.grow(c, 8) and pool.num_free_blocks == 0 and not pool.by_hash
    assert not pool.grow(Sequence("d", [1], SamplingParams()), 1)
    pool.release(c)
    assert pool.num_free_blocks == 4


def test_preemption_by_recompute_when_blocks_run_out(reference) -> None:
    # 12 blocks of 16 tokens: far too few for six requests that each grow to 90 tokens.
    e = engine(num_blocks=12, max_num_seqs=6)
    outs = e.generate(PROMPTS, SamplingParams(max_tokens=20, ignore_eos=True))
    assert e.num_preemptions > 0 and sum(o.num_preemptions for o in outs) == e.num_preemptions
    assert [o.output_token_ids for o in outs] == reference
    assert_pool_full(e)


def test_chunked_prefill_survives_a_pool_smaller_than_all_prompts() -> None:
    e = engine(num_blocks=6, policy="chunked", max_num_batched_tokens=16, enable_prefix_caching=False)
    outs = e.generate([prompt_of(60, s) for s in range(4)], SamplingParams(max_tokens=12, ignore_eos=True))
    assert all(len(o.output_token_ids) == 12 for o in outs)
    assert_pool_full(e)


def test_sampling_seeded_top_k_top_p_stop(eng: Engine, reference) -> None:
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=1234, ignore_eos=True)
    alone = eng.generate([PROMPTS[2]], sp)[0].output_token_ids
    batched = eng.generate(PROMPTS[:4], [sp if i == 2 else SamplingParams(max_tokens=3) for i in range(4)])[2].output_token_ids
    assert alone == batched, "a seeded request must not depend on its batch"
    other = eng.generate([PROMPTS[2]], SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=99, ignore_eos=True))[0]
    assert other.output_token_ids != alone
    unseeded = eng.generate([PROMPTS[2]] * 2, SamplingParams(max_tokens=12, temperature=1.5, ignore_eos=True))
    assert unseeded[0].output_token_ids != unseeded[1].output_token_ids
    # top_k=1 is greedy whatever the temperature.
    assert eng.generate([PROMPTS[3]], SamplingParams(max_tokens=20, temperature=5.0, top_k=1, seed=3, ignore_eos=True))[0].output_token_ids == reference[3]
    # A stop id ends the request on that token.
    stop = reference[4][5]
    o = eng.generate([PROMPTS[4]], SamplingParams(max_tokens=20, stop_token_ids=(stop,)))[0]
    assert o.finish_reason == "stop" and o.output_token_ids[-1] == stop
    assert o.output_token_ids == reference[4][:reference[4].index(stop) + 1]
    assert_pool_full(eng)


def test_filters_and_eos(reference) -> None:
    from labkit.engine.sampling import filter_logits

    x = filter_logits(torch.tensor([0.0, 3.0, 1.0, 2.0]), SamplingParams(temperature=1.0, top_k=2))
    assert torch.isinf(x[[0, 2]]).all() and torch.isfinite(x[[1, 3]]).all()
    y = filter_logits(torch.tensor([0.0, 10.0, 1.0, 2.0]), SamplingParams(temperature=1.0, top_p=0.5))
    assert torch.isfinite(y).tolist() == [False, True, False, False]
    # Random weights rarely pick EOS (257), so name a token the model does pick as its EOS.
    e = engine()
    eos = reference[4][6]
    e.model_config = dataclasses.replace(e.model_config, eos_token_ids=(eos,))
    o = e.generate([PROMPTS[4]], SamplingParams(max_tokens=20))[0]
    assert o.finish_reason == "stop" and o.output_token_ids == reference[4][:reference[4].index(eos) + 1]
    again = e.generate([PROMPTS[4]], SamplingParams(max_tokens=20, ignore_eos=True))[0]
    assert again.output_token_ids == reference[4] and again.finish_reason == "length"
    assert_pool_full(e)


def test_streaming_callbacks_and_abort(eng: Engine) -> None:
    seen: list[tuple[str, int, bool]] = []
    rid = eng.add_request(PROMPTS[1], SamplingParams(max_tokens=6, ignore_eos=True), request_id="s",
                          on_token=lambda r, t, f: seen.append((r, t, f)))
    victim = eng.add_request(PROMPTS[4], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    free_before = eng.num_free_blocks
    assert eng.abort(victim) and not eng.abort("nope")
    assert eng.num_free_blocks > free_before  # freed at once
    finished = []
    while eng.has_unfinished():
        finished += eng.step().finished
    by_id = {o.request_id: o for o in finished}
    assert by_id[victim].finish_reason == "abort" and len(by_id[victim].output_token_ids) == 2
    assert [t for _, t, _ in seen] == by_id[rid].output_token_ids
    assert [f for _, _, f in seen] == [False] * 5 + [True]
    assert_pool_full(eng)


@pytest.mark.parametrize("sp", [SamplingParams(max_tokens=16, ignore_eos=True),
                                SamplingParams(max_tokens=16, temperature=0.8, top_k=50, seed=7, ignore_eos=True)])
def test_export_import_equals_one_engine(eng: Engine, sp: SamplingParams) -> None:
    prompt = PROMPTS[4]
    whole = eng.generate([prompt], sp)[0].output_token_ids
    pre, dec = engine(policy="prefill_only"), engine(policy="decode_only")
    layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    rid = pre.add_request(prompt, sp, request_id="x", on_layer_kv=lambda r, i, k, v: layers.__setitem__(i, (k, v)))
    out = pre.step()
    assert out.phase == "prefill" and out.finished[0].finish_reason == "prefilled"
    assert out.finished[0].output_token_ids == whole[:1]
    assert pre.num_free_blocks < pre.num_total_blocks  # held for export
    kv = pre.export_kv(rid)
    assert_pool_full(pre)
    assert kv.shape == (4, len(prompt), 2, 64) and kv.first_token_id == whole[0]
    assert sorted(layers) == [0, 1, 2, 3]
    assert all(torch.equal(layers[i][0], kv.k[i]) and torch.equal(layers[i][1], kv.v[i]) for i in layers)
    streamed: list[int] = []
    dec.import_kv(kv, sp, on_token=lambda r, t, f: streamed.append(t))
    res = []
    while dec.has_unfinished():
        res += dec.step().finished
    assert res[0].output_token_ids == whole
    assert streamed == whole[1:]  # the first token was the prefill side's to report
    assert_pool_full(dec)


def test_import_finishing_at_once_and_without_free_blocks(eng: Engine) -> None:
    pre = engine(policy="prefill_only")
    # A first token that ends the request ends it on the prefill side too: no KV is held for export.
    done = pre.add_request(PROMPTS[3], SamplingParams(max_tokens=1))
    out = pre.step()
    assert [(o.request_id, o.finish_reason) for o in out.finished] == [(done, "length")]
    assert_pool_full(pre)
    rid = pre.add_request(PROMPTS[3], SamplingParams(max_tokens=2), request_id="held")
    assert pre.step().finished[0].finish_reason == "prefilled"
    kv = pre.export_kv(rid)
    seen: list[tuple[str, int, bool]] = []
    dec = engine(policy="decode_only")
    dec.import_kv(kv, SamplingParams(max_tokens=1), on_token=lambda r, t, f: seen.append((r, t, f)))
    out = dec.step()
    assert out.finished[0].finish_reason == "length" and out.finished[0].output_token_ids == [kv.first_token_id]
    assert seen == [(rid, kv.first_token_id, True)]
    # A decode engine with no room recomputes instead of failing.
    tight = engine(policy="decode_only", num_blocks=3)
    blocker = tight.import_kv(kv, SamplingParams(max_tokens=2, ignore_eos=True), request_id="b")
    r2 = tight.import_kv(kv, SamplingParams(max_tokens=8, ignore_eos=True), request_id="c")
    res = {}
    while tight.has_unfinished():
        res.update({o.request_id: o for o in tight.step().finished})
    assert res[r2].output_token_ids == eng.generate([PROMPTS[3]], SamplingParams(max_tokens=8, ignore_eos=True))[0].output_token_ids
    assert blocker in res
    assert_pool_full(tight)


def test_bad_input_raises_clear_errors(eng: Engine) -> None:
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([])
    with pytest.raises(ValueError, match="vocabulary"):
        eng.add_request([256, 9999])
    with pytest.raises(ValueError, match="max_model_len"):
        eng.add_request([1] * eng.max_model_len)
    with pytest.raises(ValueError, match="KV blocks"):
        engine(num_blocks=2).add_request([1] * 10, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="policy"):
        EngineConfig(policy="fastest")  # type: ignore[arg-type]
    eng.add_request([256, 1], request_id="dup")
    with pytest.raises(ValueError, match="dup"):
        eng.add_request([256, 2], request_id="dup")
    with pytest.raises(ValueError, match="not prefilled"):
        eng.export_kv("dup")
    eng.abort("dup")
    eng.step()
    with pytest.raises(KeyError):
        eng.export_kv("dup")
    with pytest.raises(ValueError, match="import_kv"):
        engine(policy="decode_only").add_request([256])
    pre = engine(policy="prefill_only")
    rid = pre.add_request(PROMPTS[2])
    pre.step()
    kv = pre.export_kv(rid)
    dec = engine(policy="decode_only")
    for field, value in [("model_fingerprint", "0" * 16), ("head_dim", 32), ("dtype", "bfloat16")]:
        bad = KVExport(**{**kv.__dict__, field: value})
        with pytest.raises(ValueError, match=field):
            dec.import_kv(bad)
    bad = KVExport(**{**kv.__dict__, "k": kv.k[:, :-1]})
    with pytest.raises(ValueError, match="k.shape"):
        dec.import_kv(bad)
    assert_pool_full(dec)
    assert_pool_full(eng)
