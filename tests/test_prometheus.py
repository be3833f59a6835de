"""labkit.prometheus: reading a /metrics text the way the router writes it."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from labkit.prometheus import sample_total, samples, totals_by


def _text() -> str:
    r = CollectorRegistry()
    c = Counter("labkit_router_decisions", "Routing decisions", ["role", "upstream", "reason"], registry=r)
    c.labels("prefill", "prefill0", "load").inc(2)
    c.labels("prefill", "prefill0", "prefix").inc(5)
    c.labels("prefill", "prefill1", "load").inc(1)
    c.labels("decode", "decode0", "only").inc(8)
    h = Histogram("labkit_router_ttft_seconds", "TTFT", buckets=(0.1, 1.0), registry=r)
    for v in (0.05, 0.5, 2.0):
        h.observe(v)
    return generate_latest(r).decode()


def test_sample_total_sums_the_matching_label_sets() -> None:
    text = _text()
    assert sample_total(text, "labkit_router_decisions_total") == 16
    assert sample_total(text, "labkit_router_decisions_total", role="prefill") == 8
    assert sample_total(text, "labkit_router_decisions_total", role="prefill", reason="prefix") == 5
    assert sample_total(text, "labkit_router_decisions_total", role="nobody") == 0.0
    assert sample_total(text, "no_such_series") == 0.0
    assert sample_total(text, "labkit_router_ttft_seconds_count") == 3
    assert sample_total(text, "labkit_router_ttft_seconds_sum") == 2.55
    assert sample_total(text, "labkit_router_ttft_seconds_bucket", le="1.0") == 2


def test_totals_by_groups_per_label_value() -> None:
    text = _text()
    assert totals_by(text, "labkit_router_decisions_total", "upstream", role="prefill") == {"prefill0": 7.0,
                                                                                             "prefill1": 1.0}
    assert totals_by(text, "labkit_router_decisions_total", "reason") == {"load": 3.0, "prefix": 5.0, "only": 8.0}
    labels = [lab for lab, _ in samples(text, "labkit_router_decisions_total", upstream="prefill1")]
    assert labels == [{"role": "prefill", "upstream": "prefill1", "reason": "load"}]
