"""What a repeated sweep says, in numbers and sentences computed from it: which mode wins under
each SLO, why the winner changes between two SLOs, and how the gains compare with a claim.

Every sentence here is built from the run it describes (counts of requests that broke each
bound, pooled percentiles, bootstrap intervals), so a notebook's prose cannot drift from its data.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from labkit.bench.metrics import SLO
from labkit.bench.repeats import GoodputFn, RepeatedSweep, best_separated, misses

# A bound a request broke: its name, what breaking it means, and the latency that shows it (for the sentence).
_BOUND_TEXT = {
    "ttft": ("the TTFT bound", "its first token came too late", "ttft_p50_ms", "TTFT p50"),
    "itl": ("the inter-token bound", "one gap between two tokens was too long", "itl_p99_ms", "p99 ITL"),
    "tpot": ("the TPOT bound", "its tokens came too slowly on average", "tpot_p50_ms", "TPOT p50"),
    "e2e": ("the end-to-end bound", "it finished too late", "e2e_p50_ms", "E2E p50"),
    "error": ("", "it failed", "", ""),
}


def goodput_winners(
    rs: RepeatedSweep, slos: Mapping[str, SLO], *, goodput_fn: GoodputFn | None = None, n_boot: int = 1000
) -> list[dict[str, Any]]:
    """Per SLO name and rate: each mode's goodput interval and the winner (None: intervals overlap)."""
    out = []
    for name, slo in slos.items():
        for rate in rs.rates:
            ivs = {
                m: rs.interval(m, rate, "goodput_rps", slo=slo, goodput_fn=goodput_fn, n_boot=n_boot) for m in rs.modes
            }
            out.append(
                {"slo": name, "rate_rps": rate, "winner": best_separated(ivs, higher_is_better=True), "goodput": ivs}
            )
    return out


def _fmt_ms(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:,.0f} ms"


def _why(rs: RepeatedSweep, rate: float, slo: SLO, winner: str, loser: str) -> str:
    """The bound the loser broke most often, more than the winner did, with the counts and the percentile."""
    mw, ml = misses(rs.records(winner, rate), slo), misses(rs.records(loser, rate), slo)
    bound = max(("error", "ttft", "itl", "tpot", "e2e"), key=lambda b: ml[b] - mw[b])
    name, what, stat, label = _BOUND_TEXT[bound]
    verb = f"broke {name}" if name else "failed"
    text = (
        f"{loser}'s requests {verb} {ml[bound]} times out of {ml['requests']} ({what}), "
        f"{winner}'s {mw[bound]} times out of {mw['requests']}"
    )
    if stat:
        pw, pl = (rs.interval(m, rate, stat, slo=slo, n_boot=200).value for m in (winner, loser))
        text += f"; {label}: {loser} {_fmt_ms(pl)} against {winner} {_fmt_ms(pw)}"
    return text


def slo_flip_text(
    rs: RepeatedSweep, slos: Mapping[str, SLO], *, goodput_fn: GoodputFn | None = None, n_boot: int = 1000
) -> str:
    """Sentences on which mode wins goodput under each of two SLOs and why, from the run's own data.

    A mode wins at a rate when its goodput interval lies above every other mode's. The text names
    the rates where the winner differs between the SLOs and, at the lowest of them, the bound the
    losing mode broke most often under each SLO; or says that this run shows no flip.
    """
    if len(slos) != 2:
        raise ValueError(f"give two SLOs to compare, got {list(slos)}")
    (na, sa), (nb, sb) = slos.items()
    table = goodput_winners(rs, slos, goodput_fn=goodput_fn, n_boot=n_boot)
    win = {(row["slo"], row["rate_rps"]): row["winner"] for row in table}
    flips = [r for r in rs.rates if win[(na, r)] and win[(nb, r)] and win[(na, r)] != win[(nb, r)]]
    per_rate = "; ".join(
        f"{r:g} req/s: {win[(na, r)] or 'tie'} under {na}, {win[(nb, r)] or 'tie'} under {nb}" for r in rs.rates
    )
    if not flips:
        return (
            f"On this run the winner does not flip between the SLOs at any rate: where one SLO names a winner, "
            f"the other names the same mode or a tie (overlapping goodput intervals). Winners per rate: {per_rate}."
        )
    rate = flips[0]
    parts = [f"The winner flips at {', '.join(f'{r:g}' for r in flips)} req/s. Winners per rate: {per_rate}."]
    for name, slo in ((na, sa), (nb, sb)):
        w = win[(name, rate)]
        assert w is not None
        g = {
            row_m: iv
            for row in table
            if row["slo"] == name and row["rate_rps"] == rate
            for row_m, iv in row["goodput"].items()
        }
        loser = min((m for m in rs.modes if m != w), key=lambda m: g[m].value)
        parts.append(
            f"Under {name} ({slo.describe()}) at {rate:g} req/s, {w} serves {g[w].value:.3g} req/s within "
            f"the SLO [{g[w].lo:.3g}, {g[w].hi:.3g}] against {loser}'s {g[loser].value:.3g} "
            f"[{g[loser].lo:.3g}, {g[loser].hi:.3g}]: {_why(rs, rate, slo, w, loser)}."
        )
    return " ".join(parts)


def versus(
    rs: RepeatedSweep,
    slos: Mapping[str, SLO],
    *,
    baseline: str = "mono",
    contender: str = "1p1d",
    goodput_fn: GoodputFn | None = None,
    n_boot: int = 1000,
) -> list[dict[str, Any]]:
    """Per rate: the contender over the baseline on the same hardware: output throughput ratio, goodput
    ratio under each SLO (inf when the baseline serves none within it), and the cost per output token
    of the contender relative to the baseline (devices / throughput, so 0.8 means 20% cheaper)."""
    from labkit.bench.sweep import parse_mode

    dev = {m: parse_mode(m).devices for m in (baseline, contender)}
    rows = []
    for rate in rs.rates:
        tb, tc = (rs.interval(m, rate, "output_tps", n_boot=n_boot).value for m in (baseline, contender))
        row: dict[str, Any] = {
            "rate_rps": rate,
            "throughput_ratio": tc / tb if tb else math.inf,
            "cost_ratio": (dev[contender] / tc) / (dev[baseline] / tb) if tc and tb else math.nan,
        }
        for name, slo in slos.items():
            gb, gc = (
                rs.interval(m, rate, "goodput_rps", slo=slo, goodput_fn=goodput_fn, n_boot=n_boot).value
                for m in (baseline, contender)
            )
            row[f"goodput_ratio {name}"] = gc / gb if gb else (math.inf if gc else math.nan)
        rows.append(row)
    return rows


def _span(values: Sequence[float]) -> str:
    fin = [v for v in values if not math.isnan(v)]
    if not fin:
        return "n/a"
    lo, hi = min(fin), max(fin)
    f = lambda v: "unbounded (the baseline served none within the SLO)" if math.isinf(v) else f"{v:.2g}x"
    return f(lo) if lo == hi else f"{f(lo)} to {f(hi)}"


def claims_text(
    rows: Sequence[Mapping[str, Any]],
    *,
    throughput_gain: tuple[float, float],
    cost_saving_pct: tuple[float, float],
    contender: str = "1p1d",
    baseline: str = "mono",
) -> str:
    """Sentences that hold `versus` rows against a claimed throughput gain and cost saving (ranges)."""
    tput = [r["throughput_ratio"] for r in rows]
    cost = [r["cost_ratio"] for r in rows]
    saving = [100 * (1 - c) for c in cost if not math.isnan(c)]
    gkeys = [k for k in rows[0] if k.startswith("goodput_ratio")] if rows else []
    lo, hi = throughput_gain
    inside = [t for t in tput if lo <= t <= hi]
    parts = [
        (
            f"Raw output throughput of {contender} over {baseline}: {_span(tput)} across the swept rates "
            f"({len(inside)} of {len(tput)} inside the claimed {lo:g}-{hi:g}x)."
        )
    ]
    for k in gkeys:
        g = [r[k] for r in rows]
        n_ge = sum(1 for v in g if v >= lo)
        parts.append(
            f"Goodput ratio under {k.split(' ', 1)[1]}: {_span(g)} ({n_ge} of {len(g)} rates at or above {lo:g}x)."
        )
    if saving:
        s_lo, s_hi = cost_saving_pct
        n_in = sum(1 for s in saving if s_lo <= s <= s_hi)
        change = sorted(100 * (c - 1) for c in cost if not math.isnan(c))
        parts.append(
            f"Cost per output token of {contender} against {baseline} on the same devices: "
            f"{change[0]:+.0f}% to {change[-1]:+.0f}% (negative: cheaper; {n_in} of {len(saving)} rates "
            f"inside the claimed {s_lo:g}-{s_hi:g}% saving)."
        )
    return " ".join(parts)


def per_load_text(
    stats: Mapping[float, Mapping[str, Mapping[str, float]]],
    *,
    baseline: str = "mono",
    contender: str = "1p1d",
    unit: str = "x",
) -> str:
    """Sentences, load by load, from `stats[load][mode]` = {"goodput_rps", "tpot_p50_ms", "itl_p99_ms"}: which
    mode served more within the SLO, and both modes' p50 TPOT and p99 ITL; then the loads each one won."""
    parts: list[str] = []
    won: dict[str, list[float]] = {baseline: [], contender: []}
    for load in sorted(stats):
        b, c = stats[load][baseline], stats[load][contender]
        better = (
            contender
            if c["goodput_rps"] > b["goodput_rps"]
            else baseline
            if b["goodput_rps"] > c["goodput_rps"]
            else None
        )
        if better:
            won[better].append(load)
        who = f"{better} served more within the SLO" if better else "both served the same within the SLO"
        parts.append(
            f"At {load:.2g}{unit}: {who} ({baseline} {b['goodput_rps']:.3g}, {contender} {c['goodput_rps']:.3g} "
            f"req/s); p50 TPOT {baseline} {_fmt_ms(b['tpot_p50_ms'])}, {contender} {_fmt_ms(c['tpot_p50_ms'])}; "
            f"p99 ITL {baseline} {_fmt_ms(b['itl_p99_ms'])}, {contender} {_fmt_ms(c['itl_p99_ms'])}."
        )
    loads = lambda xs: ", ".join(f"{x:.2g}{unit}" for x in xs) or "no load"
    parts.append(f"{baseline} won at {loads(won[baseline])}; {contender} at {loads(won[contender])}.")
    return " ".join(parts)


def plane_text(rs: RepeatedSweep, rate: float, *, contender: str = "1p1d", n_boot: int = 1000) -> str:
    """One sentence per axis of the TTFT vs p99-ITL plane at `rate` (every repeat pooled): where `contender`
    stands against the best of the other modes (the baselines), and which baselines beat it on both axes."""
    others = [m for m in rs.modes if m != contender]
    if contender not in rs.modes or not others:
        raise ValueError(f"need {contender!r} and at least one other mode, got {list(rs.modes)}")
    ttft = {m: rs.interval(m, rate, "ttft_p50_ms", n_boot=n_boot) for m in rs.modes}
    itl = {m: rs.interval(m, rate, "itl_p99_ms", n_boot=n_boot) for m in rs.modes}
    best_itl = min(others, key=lambda m: itl[m].value)
    best_ttft = min(others, key=lambda m: ttft[m].value)
    dominated_by = [m for m in others if itl[m].hi < itl[contender].lo and ttft[m].hi < ttft[contender].lo]
    c_itl, c_ttft = itl[contender].value, ttft[contender].value
    text = (
        f"At {rate:g} req/s (every repeat pooled), {contender}'s p99 inter-token latency is {_fmt_ms(c_itl)} "
        f"against the best baseline's {_fmt_ms(itl[best_itl].value)} ({best_itl}); its median TTFT is "
        f"{_fmt_ms(c_ttft)} against the lowest baseline's {_fmt_ms(ttft[best_ttft].value)} ({best_ttft}). "
    )
    if dominated_by:
        return text + (
            f"{', '.join(dominated_by)} beat{'s' if len(dominated_by) == 1 else ''} {contender} on both axes "
            f"(intervals apart): at this load disaggregation buys nothing over {dominated_by[0]}."
        )
    return text + f"No baseline beats {contender} on both axes with intervals apart: the choice is a trade-off."


def waterfall_text(runs: Mapping[str, Sequence[Any]], *, contender: str = "1p1d") -> str:
    """Sentences on where the median request's TTFT went, per mode (its largest part), and for `contender`
    what its KV transfer cost: ms, share of the TTFT and the achieved GB/s. `runs`: mode -> records."""
    from labkit.bench.waterfall import waterfall_stacks
    from labkit.serve.waterfall import PARTS

    parts = [p.removesuffix("_s") for p in PARTS]
    out = []
    for mode, records in runs.items():
        st = waterfall_stacks(records).get("p50")
        if st is None:
            out.append(f"{mode}: no request carries a waterfall.")
            continue
        big = max(parts, key=lambda p: st[f"{p}_ms"])
        out.append(
            f"{mode}'s median request waited {st['ttft_ms']:,.0f} ms for its first token, most of it in "
            f"{big.replace('_', ' ')} ({st[f'{big}_ms']:,.0f} ms)."
        )
        if mode == contender and st["ttft_ms"] > 0:
            gbps = st["kv_gb_per_s"]
            speed = "" if math.isnan(gbps) else f" at {gbps:,.2f} GB/s"
            out.append(
                f"Its KV transfer took {st['kv_transfer_ms']:,.1f} ms{speed}, "
                f"{st['kv_transfer_ms'] / st['ttft_ms']:.0%} of that TTFT."
            )
    return " ".join(out)
