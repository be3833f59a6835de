"""`labkit transfer`: measure KV-cache transfer bandwidth per backend here; size a request's KV.

labkit transfer                              # shm, tcp (and nixl) at 1, 16, 64 MiB, next to memcpy
labkit transfer --backends tcp --sizes-mib 256 --repeats 5
labkit transfer --kv llama-3.1-70b --tokens 4096   # bytes, and time over each link (computed)
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backends", default="shm,tcp,nixl", help="comma-separated (skips what is missing)")
    parser.add_argument("--sizes-mib", default="1,16,64", help="payload sizes in MiB, comma-separated")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--kv", default=None, help="a model preset or llama-3.1-70b: print its KV size instead")
    parser.add_argument("--tokens", type=int, default=4096, help="prompt length for --kv")
    parser.add_argument("--json", action="store_true", help="print rows as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from labkit.transfer import available_backends
    from labkit.transfer.sizing import datasheet_links, kv_shapes

    if args.kv:
        shapes = kv_shapes()
        if args.kv not in shapes:
            print(f"labkit transfer: unknown model {args.kv!r}; choose from {', '.join(shapes)}")
            return 2
        s = shapes[args.kv]
        nbytes = s.kv_bytes(args.tokens)
        print(
            f"{s.name}: {s.num_layers} layers x {s.num_kv_heads} kv heads x head_dim {s.head_dim} x {s.dtype} "
            f"= {s.kv_bytes_per_token:,} B/token; {args.tokens:,} tokens = {nbytes / 1e9:.3f} GB"
        )
        for link in datasheet_links():
            print(f"  {link.label:18s} {link.seconds(nbytes) * 1e3:10.2f} ms  (computed from line rate)")
        return 0
    try:
        sizes = [int(float(x) * (1 << 20)) for x in args.sizes_mib.split(",") if x]
    except ValueError:
        print(f"labkit transfer: --sizes-mib must be numbers, got {args.sizes_mib!r}")
        return 2
    if not sizes or min(sizes) < 1 or args.repeats < 1:
        print("labkit transfer: sizes and --repeats must be positive")
        return 2
    avail = available_backends()
    backends = []
    for b in (x for x in args.backends.split(",") if x):
        if b not in avail:
            print(f"labkit transfer: unknown backend {b!r}; choose from {', '.join(avail)}")
            return 2
        if avail[b]:
            print(f"skipping {b}: {avail[b]}")
        else:
            backends.append(b)
    from labkit.transfer.measure import bandwidth_sweep

    rows = bandwidth_sweep(backends, sizes, repeats=args.repeats, progress=not args.json)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(format_rows(rows))
    return 0


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table: backend, size, best and median GB/s, and shm's share of memcpy."""
    lines = [f"{'backend':8s} {'size':>10s} {'best GB/s':>10s} {'median GB/s':>12s} {'vs memcpy':>10s}"]
    for r in rows:
        med = r.get("gb_per_s_median")
        vs = r.get("vs_memcpy_median")
        lines.append(
            f"{r['backend']:8s} {r['nbytes'] / (1 << 20):8.2f}MiB {r['gb_per_s']:10.2f} "
            f"{(f'{med:.2f}' if med else '-'):>12s} {(f'{vs:.0%}' if vs else '-'):>10s}"
        )
    return "\n".join(lines)


def tour_section(report: Any, profile: str) -> None:
    """Measures shm and tcp next to memcpy; adds a chart, the per-request table and summary rows."""
    from labkit.plots import transfer as pt
    from labkit.transfer.measure import bandwidth_sweep, measured_links
    from labkit.transfer.sizing import datasheet_links, kv_shapes, request_table

    s = report.sections[-1]
    sizes = [1 << 20, 16 << 20] if profile == "ci" else [1 << 20, 16 << 20, 256 << 20]
    rows = bandwidth_sweep(["shm", "tcp"], sizes, repeats=2 if profile == "ci" else 3)
    s.paragraphs.append(
        "A request's KV cache moved from a prefill process to a decode process on this machine: shm (a "
        "sealed shared-memory segment, one copy) and tcp (loopback sockets), each next to a memcpy of the "
        "same size. Each receiver is its own process and checks every byte (xxh3) before it acks."
    )
    s.tables.append(
        (
            "Transfer bandwidth (GB/s)",
            [
                {k: r.get(k) for k in ("backend", "nbytes", "gb_per_s", "gb_per_s_median", "vs_memcpy_median")}
                for r in rows
            ],
        )
    )
    report.add_figure(s, pt.bandwidth_vs_size(rows)[0], "transfer_bandwidth", "KV transfer bandwidth vs payload")
    links = measured_links(rows) + datasheet_links()
    shapes = [kv_shapes()[n] for n in ("llama-3.1-8b", "llama-3.1-70b")]
    table = request_table(shapes, [2048, 8192], links)
    s.tables.append(
        (
            "Time to move one request's KV (ms)",
            [
                {
                    "model": r["model"],
                    "tokens": r["prompt_tokens"],
                    "KV MB": r["kv_bytes"] / 1e6,
                    "link": r["link"],
                    "how": r["how"],
                    "ms": r["seconds"] * 1e3,
                }
                for r in table
            ],
        )
    )
    big = max((r for r in rows if r["backend"] == "shm"), key=lambda r: r["nbytes"])
    report.add_summary(
        "KV transfer shm",
        f"{big['gb_per_s']:.2f} GB/s",
        f"{big['nbytes'] >> 20} MiB, {big.get('vs_memcpy_median', 0):.0%} of memcpy beside it",
    )
    tcp = max((r for r in rows if r["backend"] == "tcp"), key=lambda r: r["nbytes"])
    report.add_summary("KV transfer tcp (loopback)", f"{tcp['gb_per_s']:.2f} GB/s", f"{tcp['nbytes'] >> 20} MiB")
    report.data["transfer"] = {"bandwidth": rows}
