"""Read Prometheus text (a server's `/metrics`): one series summed over the label sets you ask for.

    text = scrape(router.url)
    sample_total(text, "labkit_router_decisions_total", role="prefill")          # every prefill decision
    totals_by(text, "labkit_worker_prefill_tokens_total", "upstream", role="prefill")   # per worker

Names are sample names as exposed (a counter `x` shows as `x_total`, a histogram as `x_bucket`,
`x_count`, `x_sum`). Parsing is prometheus_client's own parser, so escaping and exponents are
read as Prometheus writes them.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(url: str, *, timeout_s: float = 10.0) -> str:
    """The text of `url`/metrics (`url`: a server's base URL); raises httpx.HTTPError when it does not answer."""
    r = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout_s, trust_env=False)
    r.raise_for_status()
    return r.text


def samples(text: str, name: str, **labels: str) -> Iterator[tuple[dict[str, str], float]]:
    """(labels, value) of every sample called `name` whose labels include all of `labels`."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                yield dict(s.labels), float(s.value)


def sample_total(text: str, name: str, **labels: str) -> float:
    """The sum of series `name` over the label sets that match `labels` (0.0 when none does)."""
    return sum(v for _, v in samples(text, name, **labels))


def totals_by(text: str, name: str, by: str, **labels: str) -> dict[str, float]:
    """Series `name` (label sets matching `labels`) summed per value of label `by`, in first-seen order."""
    out: dict[str, float] = {}
    for lab, v in samples(text, name, **labels):
        key = lab.get(by, "")
        out[key] = out.get(key, 0.0) + v
    return out
