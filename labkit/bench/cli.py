"""`labkit bench`: load-test any OpenAI-compatible URL, or sweep the lab's serving modes.

labkit bench workloads
labkit bench trace /path/to/conv.csv
labkit bench run --url http://127.0.0.1:8000 --workload azure-conv-2023 --n 50 --rate 2 --max-model-len 2048
labkit bench sweep --model tiny --workload azure-conv-2023 --rates 1 2 4 --modes mono 1p1d --slo-itl-ms 100
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labkit.bench.metrics import SLO, Summary
from labkit.bench.sweep import DEFAULT_MODES, MODE_FORMS


def _slo_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SLOs (goodput counts requests meeting every one given)")
    g.add_argument("--slo-ttft-ms", type=float, default=None, help="time to first token bound, ms")
    g.add_argument("--slo-tpot-ms", type=float, default=None, help="time per output token bound, ms")
    g.add_argument("--slo-itl-ms", type=float, default=None, help="bound on every inter-token gap, ms")
    g.add_argument("--slo-e2e-ms", type=float, default=None, help="end-to-end latency bound, ms")


def _slo(a: argparse.Namespace) -> SLO:
    ms = lambda v: None if v is None else v / 1000.0
    return SLO(ms(a.slo_ttft_ms), ms(a.slo_tpot_ms), ms(a.slo_itl_ms), ms(a.slo_e2e_ms))


def _workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="azure-conv-2023", help="preset name (see `labkit bench workloads`)")
    p.add_argument("--n", type=int, default=40, help="requests per run (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=None, help="fit lengths into this context (tokens)")
    p.add_argument("--scale", type=float, default=None, help="multiply every length by this factor")


def format_summary(s: Summary) -> str:
    """A few lines a person reads after a run: counts, throughput, goodput, latency percentiles."""
    lines = [
        f"requests: {s.sent} sent, {s.ok} ok, {s.errors} errors in {s.duration_s:.1f} s",
        (
            f"throughput: {s.request_throughput_rps:.3g} req/s, {s.output_throughput_tps:,.1f} output tok/s, "
            f"{s.total_token_throughput_tps:,.1f} total tok/s"
        ),
        f"goodput: {s.goodput_rps:.3g} req/s ({s.slo_attainment:.0%} of requests within {s.slo})",
        f"{'ms':<5}" + "".join(f"{k:>10}" for k in ("mean", "p50", "p90", "p99", "max")),
    ]
    for metric, st in s.latency_ms.items():
        lines.append(
            f"{metric:<5}" + "".join(f"{st.get(k, float('nan')):>10,.1f}" for k in ("mean", "p50", "p90", "p99", "max"))
        )
    if s.kv_flagged:
        lines.append(f"KV flagged on {s.kv_flagged} request(s): {s.kv_flag}")
    return "\n".join(lines)


def cmd_workloads(a: argparse.Namespace) -> int:
    from labkit.bench.workloads import WORKLOADS

    for w in WORKLOADS.values():
        p, o = w.sample_lengths(20_000, seed=0)
        print(
            f"{w.name:<17} prompt mean {p.mean():>7,.0f} / output mean {o.mean():>5,.0f} tokens"
            f"{'' if not w.prefix_hit_rate else f', {w.prefix_hit_rate:.1%} shared prefix'}"
        )
        print(f"{'':<17} {w.describe().split(': ', 1)[1]}\n{'':<17} source: {w.source}")
    return 0


def cmd_trace(a: argparse.Namespace) -> int:
    from labkit.bench.traces import load_trace

    t = load_trace(a.path, limit=a.limit)
    for k, v in t.stats().items():
        print(f"{k:<20} {v:>14,.2f}")
    return 0


def cmd_run(a: argparse.Namespace) -> int:
    from labkit.bench.arrivals import ArrivalKind, Arrivals
    from labkit.bench.loadgen import LoadConfig, run_load
    from labkit.bench.workloads import sample_requests

    if a.trace:
        from labkit.bench.traces import load_trace

        trace = load_trace(a.trace).head(a.n)
        requests, scaling = trace.to_requests(max_model_len=a.max_model_len, scale=a.scale, seed=a.seed)
        arrivals = Arrivals("trace", trace_speedup=a.trace_speedup)
        workload = f"trace {a.trace}"
    else:
        sampled = sample_requests(a.workload, a.n, seed=a.seed, max_model_len=a.max_model_len, scale=a.scale)
        requests, scaling, workload = sampled.requests, sampled.scaling, a.workload
        kind: ArrivalKind = a.arrivals or ("burst" if a.rate is None else "poisson")  # argparse checked the choice
        arrivals = Arrivals(kind, a.rate or 1.0, a.burstiness)
    cfg = LoadConfig(
        a.url,
        arrivals=arrivals,
        max_concurrency=a.max_concurrency,
        model=a.model,
        request_timeout_s=a.timeout_s,
        seed=a.seed,
        slo=_slo(a),
    )
    print(f"{workload}: {len(requests)} requests, {arrivals.describe()}; {scaling.describe()}", flush=True)
    res = run_load(cfg, requests, scaling=scaling, workload=workload)
    print(format_summary(res.summary))
    if res.summary.errors:
        print("errors, e.g.:", *res.meta["first_errors"], sep="\n  ")
    if a.out:
        print("wrote", *res.save(a.out, a.name), sep="\n  ")
    return 0 if res.summary.ok else 1


def cmd_sweep(a: argparse.Namespace) -> int:
    from labkit.bench.sweep import SweepConfig, fixed_url_factory, lab_server_factory, run_sweep, table

    cfg = SweepConfig(
        a.workload,
        rates_rps=tuple(a.rates),
        modes=tuple(a.modes),
        n_requests=a.n,
        seed=a.seed,
        slo=_slo(a),
        burstiness=a.burstiness,
        max_concurrency=a.max_concurrency,
        request_timeout_s=a.timeout_s,
        max_model_len=a.max_model_len,
        scale=a.scale,
        price_per_device_hour=a.price_per_device_hour,
    )
    if a.url:
        urls = dict(u.split("=", 1) for u in a.url)
        factory = fixed_url_factory(urls)
    else:
        factory = lab_server_factory(a.model, chunk_tokens=a.chunk_tokens)
    res = run_sweep(cfg, factory)
    print(res.scaling_text)
    print(table(res.rows))
    print(
        "highest rate within SLO for 90% of requests:",
        ", ".join(f"{m}: {'none' if r is None else f'{r:g} req/s'}" for m, r in res.capacity_rps().items()),
    )
    if a.out:
        print("wrote", *res.save(a.out, a.name), sep="\n  ")
        if a.charts:
            _charts(res, Path(a.out), a.name)
    return 0


def _charts(res: Any, out: Path, name: str) -> None:
    import matplotlib.pyplot as plt

    from labkit.plots import bench as pb
    from labkit.plots.style import save

    slo = res.config.slo
    figs = {
        "ttft_cdf": pb.plot_latency_cdf(res.runs, "ttft", slo_ms=slo.ttft_s and slo.ttft_s * 1000),
        "itl_cdf": pb.plot_latency_cdf(res.runs, "itl", slo_ms=slo.itl_s and slo.itl_s * 1000),
        "itl_vs_rate": pb.plot_percentiles_vs_rate(res.rows, "itl"),
        "ttft_vs_rate": pb.plot_percentiles_vs_rate(res.rows, "ttft"),
        "goodput": pb.plot_goodput_vs_rate(res.rows, slo_text=slo.describe()),
        "ttft_itl_plane": pb.plot_ttft_itl_plane(
            res.rows, slo_ttft_ms=slo.ttft_s and slo.ttft_s * 1000, slo_itl_ms=slo.itl_s and slo.itl_s * 1000
        ),
        "throughput_per_device": pb.plot_per_device(res.rows),
        "cost": pb.plot_cost(res.rows, price_per_device_hour=res.config.price_per_device_hour),
    }
    from labkit.bench.waterfall import with_waterfall
    from labkit.plots.serving import plot_ttft_waterfall

    top = max(r["rate_rps"] for r in res.rows)
    at_top = {m: res.runs[(m, top)] for m in res.config.modes if (m, top) in res.runs}
    if any(with_waterfall(run.records) for run in at_top.values()):  # the lab's router times each request
        figs["ttft_waterfall"] = plot_ttft_waterfall(at_top, title=f"Where the TTFT went at {top:g} req/s").figure
    for key, fig in figs.items():
        print("  ", save(fig, out / f"{name}_{key}.png"))
        plt.close(fig)


def _friendly(cmd: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Bad input (an unknown workload, a missing file, a server that is down) is one clear line, exit 2."""

    def run(a: argparse.Namespace) -> int:
        try:
            return cmd(a)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"labkit bench {a.bench_command}: {e}", file=sys.stderr)
            return 2

    return run


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True)
    p = sub.add_parser("workloads", help="list the workload presets and where their figures come from")
    p.set_defaults(func=_friendly(cmd_workloads))

    p = sub.add_parser("trace", help="summarize an Azure CSV or Mooncake JSONL trace")
    p.add_argument("path")
    p.add_argument("--limit", type=int, default=None)
    p.set_defaults(func=_friendly(cmd_trace))

    p = sub.add_parser("run", help="one load test against an OpenAI-compatible URL")
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name to send (default: ask /v1/models)")
    _workload_args(p)
    p.add_argument(
        "--trace", default=None, help="replay this trace's first --n requests (Azure .csv / Mooncake .jsonl)"
    )
    p.add_argument("--trace-speedup", type=float, default=1.0, help="replay the trace this many times faster")
    p.add_argument("--arrivals", choices=["poisson", "gamma", "fixed", "burst"], default=None)
    p.add_argument("--rate", type=float, default=None, help="requests per second (default: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: <1 burstier, >1 more even")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--timeout-s", type=float, default=120.0, help="per-request timeout (counted as an error)")
    p.add_argument("--out", default=None, help="write <name>.json, .csv and .parquet here")
    p.add_argument("--name", default="bench")
    _slo_args(p)
    p.set_defaults(func=_friendly(cmd_run))

    p = sub.add_parser("sweep", help="request rates through serving modes (starts the lab's servers)")
    p.add_argument("--model", default="tiny", help="model the lab's servers load (default tiny)")
    _workload_args(p)
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0], help="requests per second")
    p.add_argument("--modes", nargs="+", default=list(DEFAULT_MODES), help=f"{MODE_FORMS} (default: %(default)s)")
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument("--chunk-tokens", type=int, default=256, help="mono-chunked: prompt tokens per step")
    p.add_argument("--price-per-device-hour", type=float, default=1.0)
    p.add_argument(
        "--url",
        nargs="*",
        default=None,
        metavar="MODE=URL",
        help="use running servers instead of starting them, e.g. mono=http://127.0.0.1:8000",
    )
    p.add_argument("--out", default=None, help="write the table, requests and charts here")
    p.add_argument("--name", default="sweep")
    p.add_argument("--no-charts", dest="charts", action="store_false")
    _slo_args(p)
    p.set_defaults(func=_friendly(cmd_sweep))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="labkit bench")
    register(parser)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
