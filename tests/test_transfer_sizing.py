"""KV sizing, link arithmetic, fits, break-even, link emulation and the `labkit transfer` command."""
from __future__ import annotations

import math

import pytest

from labkit.cli import main as labkit_main
from labkit.links import LINKS, Link
from labkit.transfer import new_token, open_receiver, open_sender
from labkit.transfer.shaping import TokenBucket, chunk_bytes
from labkit.transfer.sizing import (
    LLAMA_70B,
    KVShape,
    break_even_tokens,
    datasheet_links,
    fit_link,
    kv_shapes,
    request_table,
)
from labkit.transfer.synthetic import make_kv


def test_kv_bytes_of_real_shapes() -> None:
    assert LLAMA_70B.kv_bytes_per_token == 327_680
    assert LLAMA_70B.kv_bytes(4096) == 1_342_177_280                     # "a 4,096-token prompt is 1.34 GB"
    shapes = kv_shapes()
    assert shapes["llama-3.1-8b"].kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072
    assert shapes["qwen2.5-7b"].kv_bytes_per_token == 2 * 28 * 4 * 128 * 2
    assert shapes["tiny"].kv_bytes_per_token == 2 * 4 * 2 * 64 * 4       # fp32 on a CPU
    assert kv_shapes("bfloat16")["tiny"].kv_bytes_per_token == 2 * 4 * 2 * 64 * 2
    with pytest.raises(ValueError, match="num_kv_heads"):
        KVShape("bad", 1, 0, 64)


def test_one_link_type_in_bytes_per_second_and_seconds() -> None:
    link = Link(2e9, 0.1)                                          # 2 GB/s after 100 ms
    assert link.seconds(2e9) == pytest.approx(1.1) and link.gbps == pytest.approx(16.0)
    assert Link.from_gbps(8, 1e-3).seconds(1_000_000_000) == pytest.approx(1.0 + 0.001)
    assert not Link.unshaped().shaped and Link.unshaped().seconds(1 << 30) == 0.0 and math.isinf(Link.unshaped().gbps)
    assert LINKS["nvlink"].bytes_per_s == pytest.approx(450e9) and LINKS["100G"].label == "100 Gbps RDMA"
    for bad in (lambda: Link(0), lambda: Link(1e9, -1.0), lambda: Link.from_gbps(0),
                lambda: Link(1e9, how="guessed")):  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            bad()


def test_links_and_request_table() -> None:
    links = datasheet_links()
    assert [l.how for l in links] == ["computed"] * len(LINKS)
    rows = request_table([LLAMA_70B], [4096], links)
    ten = next(r for r in rows if r["link"] == "10 GbE")
    assert ten["kv_bytes"] == 1_342_177_280 and ten["seconds"] == pytest.approx(1_342_177_280 / 1.25e9 + 2e-5)


def test_fit_link_recovers_bandwidth_and_fixed_cost() -> None:
    sizes = [1 << 20, 16 << 20, 64 << 20, 256 << 20]
    link = fit_link(sizes, [0.002 + n / 5e9 for n in sizes], "shm", "measured")
    assert link.fixed_s == pytest.approx(0.002) and link.bytes_per_s == pytest.approx(5e9)
    assert (link.label, link.how) == ("shm", "measured")
    with pytest.raises(ValueError, match="two"):
        fit_link([1], [1.0])


def test_break_even_tokens() -> None:
    link = Link(bytes_per_s=1e9, fixed_s=0.010)                          # 10 ms fixed, 1 GB/s
    per_token = 100_000                                                  # bytes
    # recompute 0.2 ms/token; transfer 0.1 ms/token + 10 ms: equal at 100 tokens
    be = break_even_tokens(lambda n: 2e-4 * n, lambda n: link.seconds(per_token * n))
    assert be in (100, 101)
    assert break_even_tokens(lambda n: 1.0, lambda n: 0.5) == 1                   # transfer always wins
    assert break_even_tokens(lambda n: 1e-6 * n, lambda n: 1.0 + 1e-5 * n, max_tokens=1000) is None


def test_token_bucket_never_beats_its_rate() -> None:
    assert chunk_bytes(None) == 8 << 20 and chunk_bytes(Link.from_gbps(1)) == 250_000
    assert chunk_bytes(Link.unshaped()) == 8 << 20
    token = new_token()
    link = Link.from_gbps(0.5, fixed_s=2e-3)
    kv = make_kv("slow", 256, num_layers=4, num_kv_heads=4, head_dim=64)        # 1 MiB
    with open_receiver("tcp", token=token) as rx, open_sender(rx.endpoint, token=token, link=link) as tx:
        st = tx.send(kv, timeout_s=30)
        assert rx.recv("slow", timeout_s=30).nbytes == kv.nbytes
    assert st.seconds >= link.seconds(kv.nbytes)          # a lower bound only: shaping can only delay
    with pytest.raises(ValueError, match="use the tcp backend"):
        open_sender("shm://@x", token=token, link=link)
    with pytest.raises(ValueError):
        TokenBucket(0)
    with pytest.raises(ValueError):
        TokenBucket(math.inf)


def test_cli_kv_size_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert labkit_main(["transfer", "--kv", "llama-3.1-70b", "--tokens", "4096"]) == 0
    out = capsys.readouterr().out
    assert "327,680 B/token" in out and "1.342 GB" in out and "NVLink" in out
    assert labkit_main(["transfer", "--kv", "gpt-5"]) == 2
    assert "unknown model 'gpt-5'" in capsys.readouterr().out
    assert labkit_main(["transfer", "--backends", "udp"]) == 2
    assert "unknown backend 'udp'" in capsys.readouterr().out
    assert labkit_main(["transfer", "--sizes-mib", "big"]) == 2


def test_cli_measures_with_real_processes(capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert labkit_main(["transfer", "--backends", "shm,tcp", "--sizes-mib", "0.25,1", "--repeats", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["backend"], r["nbytes"]) for r in rows} >= {("memcpy", 1 << 20), ("shm", 1 << 20), ("tcp", 1 << 20)}
    assert all(r["gb_per_s"] > 0 for r in rows)
    assert all(0 < r["vs_memcpy_median"] for r in rows if r["backend"] == "shm")


def test_layerwise_arrivals_event_by_event() -> None:
    from labkit.transfer.sizing import layerwise_arrivals

    # link-bound: layers wait for the link; compute-bound: each layer leaves as it is computed
    flat = lambda pairs: [t for pair in pairs for t in pair]
    assert flat(layerwise_arrivals([0.1] * 4, [0.2] * 4)) == pytest.approx([0.1, 0.3, 0.2, 0.5, 0.3, 0.7, 0.4, 0.9])
    assert flat(layerwise_arrivals([0.2] * 3, [0.05] * 3)) == pytest.approx([0.2, 0.25, 0.4, 0.45, 0.6, 0.65])
    assert layerwise_arrivals([0.3], [0.1])[-1][1] == pytest.approx(0.4)             # one layer: at the end
    assert layerwise_arrivals([0.0, 0.5], [0.4, 0.0])[-1][1] == pytest.approx(0.5)   # uneven layers
    for bad in (([], []), ([0.1], [0.1, 0.1]), ([-0.1], [0.1])):
        with pytest.raises(ValueError):
            layerwise_arrivals(*bad)


def test_fit_prefill_seconds_recovers_a_quadratic_and_never_goes_negative() -> None:
    from labkit.transfer.sizing import fit_prefill_seconds

    lens = [128, 256, 512, 1024, 2048]
    f = fit_prefill_seconds(lens, [0.01 + 1e-4 * n + 2e-8 * n * n for n in lens])
    assert f(4096) == pytest.approx(0.01 + 1e-4 * 4096 + 2e-8 * 4096 ** 2, rel=1e-6)
    # a concave set of points would fit a negative n² term: it is dropped, the rest refitted, all >= 0
    g = fit_prefill_seconds(lens, [0.05, 0.08, 0.12, 0.16, 0.19])
    assert all(g(n) >= 0 for n in (0, 1, 10_000, 100_000)) and g(100_000) > g(2048)
    assert fit_prefill_seconds([32, 64], [0.01, 0.02])(128) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="two different"):
        fit_prefill_seconds([64, 64], [0.01, 0.02])


def test_benchmark_kv_lives_where_its_transport_reads_it() -> None:
    from labkit.transfer.measure import kv_device_for

    assert kv_device_for("cuda-ipc://@labkit-kv-1-abc") == "cuda"
    assert [kv_device_for(e) for e in ("shm://@x", "tcp://127.0.0.1:5", "nixl://127.0.0.1:6")] == ["cpu"] * 3


def test_transfer_charts_draw_references_computed_links_and_predictions() -> None:
    from labkit.links import LINKS
    from labkit.plots import transfer as pt

    rows = [{"backend": b, "nbytes": n, "gb_per_s": g} for b, g in (("memcpy", 8.0), ("shm", 2.0)) for n in (1 << 20, 1 << 25)]
    ref = [{"backend": "shm", "nbytes": n, "gb_per_s": 1.5} for n in (1 << 20, 1 << 25)]
    _, ax = pt.bandwidth_with_references(rows, ref, [LINKS["nvlink"]], reference_label="2-core CPU (reference)")
    labels = [ln.get_label() for ln in ax.get_lines()]
    assert "shm, 2-core CPU (reference)" in labels and "NVLink 4 (H100) (computed from the datasheet)" in labels
    assert ax.get_yscale() == "log" and max(ax.get_lines()[-1].get_ydata()) < 450.0   # fixed cost: below line rate
    lw = [{"label": "a", "compute_s": 0.1, "transfer_s": 0.2, "at_end_s": 0.3, "layerwise_s": 0.21}]
    _, ax = pt.layerwise_measured_vs_predicted(lw, [0.2125])
    assert len(ax.patches) == 5 and "ms" in ax.get_ylabel()
    _, ax = pt.exposed_transfer_vs_prompt([512, 1024], [{"label": "25 GbE", "at_end_s": [0.05, 0.1],
                                                           "layerwise_s": [0.0, 0.001]}], "t")
    assert len(ax.get_lines()) == 2 and ax.get_yscale() == "log"
