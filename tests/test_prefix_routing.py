"""labkit.bench.prefix_routing's pure parts (notebook 04 runs the live router with them under nbmake),
and notebook 04's live routing check."""
from __future__ import annotations

import pytest

from labkit.bench.prefix_routing import PrefixRoutingRun, RoundRobin, cacheable_tokens, shared_document_requests
from labkit.config import set_strict
from labkit.exercises import ExerciseIncomplete
from labkit.exercises.nb04 import check_choose_prefill, reference_choose_prefill
from labkit.serve.routing import PrefillCandidate


def test_shared_documents_share_their_prefix_and_nothing_else() -> None:
    reqs = shared_document_requests(2, 3, 64, 8, seed=5)
    assert [r.prefix_group for r in reqs] == [0, 0, 0, 1, 1, 1] and all(r.prompt_tokens == 72 for r in reqs)
    a, b, c, d = reqs[0], reqs[1], reqs[2], reqs[3]
    assert a.prompt_token_ids[:64] == b.prompt_token_ids[:64] == c.prompt_token_ids[:64] != d.prompt_token_ids[:64]
    assert len({a.prompt_token_ids[64:], b.prompt_token_ids[64:], c.prompt_token_ids[64:]}) == 3
    assert shared_document_requests(2, 3, 64, 8, seed=5) == reqs
    assert shared_document_requests(2, 3, 64, 8, seed=6)[0].prompt_token_ids != a.prompt_token_ids
    assert all(0 <= t < 256 for r in reqs for t in r.prompt_token_ids)
    with pytest.raises(ValueError, match=">= 1"):
        shared_document_requests(0, 3, 64, 8)


def test_cacheable_tokens_counts_whole_blocks_of_every_follow_up() -> None:
    assert cacheable_tokens(shared_document_requests(2, 4, 512, 32), 16) == 2 * 3 * 512
    assert cacheable_tokens(shared_document_requests(1, 3, 40, 8), 16) == 2 * 32, "a partial block is not cached"
    assert cacheable_tokens(shared_document_requests(3, 1, 64, 8), 16) == 0, "no follow-ups"


def test_round_robin_takes_turns_whatever_is_cached() -> None:
    rr = RoundRobin()
    cands = [PrefillCandidate("prefill1", 9, 0, 10, 10), PrefillCandidate("prefill0", 0, 5, 10, 10)]
    assert [rr([], cands).name for _ in range(4)] == ["prefill0", "prefill1", "prefill0", "prefill1"]


def test_the_live_check_compares_what_the_caches_served_with_what_they_could() -> None:
    run = lambda computed: PrefixRoutingRun("yours", 4352, computed, {}, {}, 8, 0)
    good = run({"prefill0": 640.0, "prefill1": 640.0})
    assert good.cached_tokens == 3072 and good.cached_share == pytest.approx(3072 / 4352)
    assert check_choose_prefill(reference_choose_prefill, live=good, cacheable_tokens=3072)
    set_strict(True)
    try:
        with pytest.raises(ExerciseIncomplete, match="04 · Exercise 2"):
            check_choose_prefill(reference_choose_prefill, live=run({"prefill0": 1664.0, "prefill1": 1152.0}),
                                 cacheable_tokens=3072)
    finally:
        set_strict(None)
    with pytest.raises(ValueError, match="cacheable_tokens"):
        check_choose_prefill.evaluate(reference_choose_prefill, live=good)
