"""KV-cache transfer: bandwidth vs payload per backend next to memcpy, time per request, layer-wise overlap.

    python benchmarks/transfer.py            # 64 KiB .. 1 GiB; shm, tcp, nixl (where installed)
    python benchmarks/transfer.py --quick    # 64 KiB .. 64 MiB, fewer repeats (CI-sized)

Each receiver runs in its own process (a sink that validates, acks and drops); a send is timed
from its first byte to the receiver's ack. memcpy of the same size is timed right before each
shm send, so "shm / memcpy" compares the two under the same load (others share these cores).
Per-request times for the presets and real shapes come from a line fitted to the measured
sizes (measured links), from tcp runs paced by a token bucket (emulated) and from line rates
(computed: links faster than this machine's loopback). Writes
docs/results/transfer-<date>-<machine>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PROMPT_LENS = (512, 2048, 8192)
EMULATED_FIXED_S = 20e-6    # an emulated link's fixed cost per transfer: a 10 µs trip each way


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="sizes up to 64 MiB, 2 repeats")
    p.add_argument("--backends", default="shm,tcp,nixl")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--machine", default="cpu-2core")
    p.add_argument("--out", default=None, help="JSON path (default docs/results/transfer-<date>-<machine>.json)")
    a = p.parse_args()

    import torch

    from labkit.links import Link
    from labkit.transfer import available_backends
    from labkit.transfer.measure import (
        ReceiverProcess,
        layerwise_vs_at_end,
        memcpy_gb_per_s,
        time_sends,
    )
    from labkit.transfer.sizing import (
        datasheet_links,
        fit_link,
        kv_shapes,
        request_table,
    )

    sizes = [64 << 10, 1 << 20, 16 << 20, 64 << 20] if a.quick else [64 << 10, 1 << 20, 16 << 20, 256 << 20, 1 << 30]
    repeats = a.repeats or (2 if a.quick else 3)
    avail = available_backends()
    backends = [b for b in a.backends.split(",") if b]
    for b in backends:
        if avail.get(b, "unknown backend"):
            print(f"skip {b}: {avail.get(b, 'unknown backend')}")
    backends = [b for b in backends if not avail.get(b, "unknown backend")]
    load_before = os.getloadavg()
    logs = Path(tempfile.mkdtemp(prefix="kv-bench-"))

    # 1. bandwidth vs size, per backend, next to memcpy
    rows: list[dict[str, Any]] = []
    for n in sizes:
        rows.append({"backend": "memcpy", "nbytes": n, "gb_per_s": memcpy_gb_per_s(n, repeats=max(3, repeats))})
    emulated: list[dict[str, Any]] = []
    layerwise: list[dict[str, Any]] = []
    for b in backends:
        rx = ReceiverProcess.start(b, logs)
        try:
            for n in sizes:
                r = time_sends(rx.endpoint, rx.token, n, repeats=repeats, paired_memcpy=(b == "shm"))
                r.update(backend=b, gb_per_s=r["gb_per_s_best"])
                rows.append(r)
                print(f"{b:5s} {_fmt_bytes(r['nbytes']):>10s}  {r['gb_per_s_best']:6.2f} GB/s best, "
                      f"{r['gb_per_s_median']:6.2f} median" +
                      (f"  ({r['vs_memcpy_median']:.0%} of memcpy timed beside it)" if "vs_memcpy_median" in r else ""),
                      flush=True)
            if b == "tcp":
                # 2. emulated links: a token bucket on the tcp sender; does the time match the line rate?
                n_em = 16 << 20 if a.quick else 64 << 20
                tcp_gbps = max(r["gb_per_s_median"] for r in rows if r["backend"] == "tcp") * 8
                for gbps in (1, 10, 25):
                    if gbps > 0.5 * tcp_gbps:     # emulation can only slow a link down, with headroom
                        print(f"tcp emulated {gbps} Gbps: skipped, loopback tcp does only {tcp_gbps:.1f} Gbps "
                              "here now (computed instead)")
                        continue
                    link = Link.from_gbps(gbps, EMULATED_FIXED_S, f"{gbps} Gbps", "emulated")
                    r = time_sends(rx.endpoint, rx.token, n_em, repeats=1, link=link)
                    r.update(backend="tcp", link=link.label, computed_s=link.seconds(r["nbytes"]))
                    emulated.append(r)
                    print(f"tcp emulated {link.label:>8s}: {r['seconds_median'] * 1e3:7.1f} ms "
                          f"(line rate says {r['computed_s'] * 1e3:7.1f} ms)", flush=True)
                # 3. layer-wise vs at the end, over an emulated 10 Gbps link, prefill as long as the transfer
                n_lw = 16 << 20 if a.quick else 64 << 20
                lw_gbps = 10 if tcp_gbps > 20 else 1
                link = Link.from_gbps(lw_gbps, EMULATED_FIXED_S, f"{lw_gbps} Gbps", "emulated")
                compute_s = link.seconds(n_lw)
                r = layerwise_vs_at_end(rx.endpoint, rx.token, n_lw, compute_s=compute_s, link=link)
                r["label"] = f"{_fmt_bytes(r['nbytes'])} over {link.label} (emulated)"
                layerwise.append(r)
            if b == "shm":
                n_lw = 64 << 20 if a.quick else 256 << 20
                probe = time_sends(rx.endpoint, rx.token, n_lw, repeats=1)
                r = layerwise_vs_at_end(rx.endpoint, rx.token, n_lw, compute_s=probe["seconds_median"])
                r["label"] = f"{_fmt_bytes(r['nbytes'])} over shm"
                layerwise.append(r)
        finally:
            rx.stop()
    for r in layerwise:
        print(f"layer-wise {r['label']}: prefill {r['compute_s'] * 1e3:.0f} ms, transfer {r['transfer_s'] * 1e3:.0f} ms;"
              f" prefill then send {r['at_end_s'] * 1e3:.0f} ms, layer by layer {r['layerwise_s'] * 1e3:.0f} ms "
              f"(ideal {r['ideal_layerwise_s'] * 1e3:.0f} ms)")

    # 4. time per request: presets and real shapes x 512 / 2k / 8k tokens x links
    links: list[Link] = []
    for b in backends:
        pts = [(r["nbytes"], r["seconds_median"]) for r in rows if r["backend"] == b]
        try:
            links.append(fit_link([x for x, _ in pts], [y for _, y in pts], f"{b} (this machine)", "measured"))
        except ValueError as e:
            print(f"no fit for {b}: {e}")
    # what each emulated link achieved: its bytes over the time beyond the fixed cost it was given
    links += [Link(r["nbytes"] / (r["seconds_median"] - EMULATED_FIXED_S), EMULATED_FIXED_S, r["link"], "emulated")
              for r in emulated if r["link"] != "1 Gbps" and r["seconds_median"] > 2 * EMULATED_FIXED_S]
    links += datasheet_links()
    shapes = [s for name, s in kv_shapes().items() if name in ("tiny", "small", "llama-3.2-1b", "llama-3.1-8b",
                                                                 "qwen2.5-7b", "llama-3.1-70b")]
    table = request_table(shapes, PROMPT_LENS, links)
    print("\nKV transfer time per request (ms)")
    labels = [l.label for l in links]
    print(f"{'model':14s} {'tokens':>6s} {'KV':>10s} " + " ".join(f"{l[:14]:>14s}" for l in labels))
    for s in shapes:
        for n in PROMPT_LENS:
            cells = {r["link"]: r["seconds"] for r in table if r["model"] == s.name and r["prompt_tokens"] == n}
            print(f"{s.name:14s} {n:6d} {_fmt_bytes(s.kv_bytes(n)):>10s} " +
                  " ".join(f"{cells[l] * 1e3:14.2f}" for l in labels))
    print("how: " + ", ".join(f"{l.label} = {l.how}" for l in links))

    shm_rows = [r for r in rows if r["backend"] == "shm" and "vs_memcpy_median" in r]
    if shm_rows:
        big = max(shm_rows, key=lambda r: r["nbytes"])
        print(f"\nshm at {_fmt_bytes(big['nbytes'])}: {big['vs_memcpy_median']:.0%} of memcpy (median of paired runs), "
              f"{big['vs_memcpy_best']:.0%} best vs best; load average {load_before[0]:.1f} before, "
              f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} cores")

    today = dt.date.today().isoformat()
    path = Path(a.out) if a.out else ROOT / "docs" / "results" / f"transfer-{today}-{a.machine}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "transfer", "date": today, "machine": a.machine, "quick": a.quick, "torch": torch.__version__,
           "cpu_count": os.cpu_count(), "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
           "bandwidth": rows, "emulated": emulated, "layerwise": layerwise,
           "links": [{"label": l.label, "gb_per_s": l.gb_per_s, "fixed_s": l.fixed_s, "how": l.how} for l in links],
           "per_request": table}
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
