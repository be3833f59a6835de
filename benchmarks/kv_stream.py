"""Layer-wise KV streaming: TTFT of long prompts, whole-KV vs layer by layer, over emulated links.

    python benchmarks/kv_stream.py            # small: 2k, 4k, 8k-token prompts at 1, 10, 25 Gbps
    python benchmarks/kv_stream.py --quick    # tiny: 512 and 1,536 tokens at 1 and 10 Gbps (a minute)

One decode worker (the decode cores) and, per link speed, one prefill worker (the prefill cores)
whose tcp sender is paced to that speed (labkit.transfer.shaping). Each request goes to the
prefill worker as the router sends it (a PrefillRequest: its answer carries the first token, which
the router streams at once), alternately whole and layer-wise (`kv_stream` per request, the order
swapped every repeat), each with a fresh prompt (no prefix-cache hit); the decode worker then
claims the KV. Per request: TTFT as this client saw it, the prefill time, and the transfer time
the request waited for after its prefill (`kv_acked_s - prefill_s`, both on the worker's clock,
so the box's noise on the prefill does not enter it). Emulation can only slow a link down: where this
box's own tcp path (checksums included) is slower than the emulated speed, `whole_gbps` (what the
whole-KV transfers achieved) says so, and that row measures the box, not the link.

`small` has 4,096 positions: the workers run with max_model_len 8,200, so 8k prompts fit (random
weights: the RoPE table is extended; the compute and the KV bytes are those of an 8k-context model
of that shape). The prefill worker's step budget is the longest prompt, so every prompt prefills
in one step (the engine hands each layer over during the step that completes the prompt).
Prints a table (medians over repeats) and writes docs/results/kv_stream-<date>-<machine>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [256] + [rng.randrange(1, 256) for _ in range(n - 1)]


def main() -> int:
    import httpx
    from tqdm.auto import tqdm

    from labkit.kv import kv_bytes_per_token
    from labkit.models import load_config
    from labkit.serve.launcher import default_cpu_split, new_kv_token, start_worker, stop_all

    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, CI-sized")
    p.add_argument("--model", default=None)
    p.add_argument("--tokens", type=int, nargs="+", default=None, help="prompt lengths")
    p.add_argument("--gbps", type=float, nargs="+", default=None, help="emulated link speeds")
    p.add_argument("--repeats", type=int, default=2, help="requests per mode, length and link (8k: at most 1)")
    p.add_argument("--machine", default=f"cpu-{len(os.sched_getaffinity(0))}core")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    model = a.model or ("tiny" if a.quick else "small")
    tokens = a.tokens or ([512, 1536] if a.quick else [2048, 4096, 8192])
    links = a.gbps or ([1.0, 10.0] if a.quick else [1.0, 10.0, 25.0])
    mc = load_config(model)
    per_token = kv_bytes_per_token(mc["num_hidden_layers"], mc["num_key_value_heads"],
                                   mc.get("head_dim") or mc["hidden_size"] // mc["num_attention_heads"], "float32")
    max_len = max(tokens) + 8
    common: dict[str, Any] = {"max_model_len": max_len, "kv_cache_bytes": int(1.25 * max_len * per_token),
                              "enable_prefix_caching": False, "max_num_batched_tokens": max_len,
                              "transfer_timeout_s": 120.0, "token_timeout_s": 900.0}
    cpus = default_cpu_split()
    token = new_kv_token()
    runs: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    decode = start_worker("decode", model=model, cpus=cpus["decode"], kv_token=token, transfer="tcp", **common,
                          startup_timeout_s=600)
    procs = [decode]
    try:
        endpoint = httpx.get(decode.url + "/health", timeout=10).json()["kv_endpoint"]
        with httpx.Client(timeout=1800) as client:
            for gbps in links:
                prefill = start_worker("prefill", model=model, cpus=cpus["prefill"], kv_token=token, transfer="tcp",
                                       link_gbps=gbps, startup_timeout_s=600, **common)
                procs.append(prefill)

                for mode in ("whole", "layers"):   # warm-up: connections, first-call allocations
                    one(client, prefill.url, decode.url, endpoint, 64, mode, 0)
                plan = [(n, rep) for n in tokens for rep in range(1 if n > 4096 else a.repeats)]
                for n, rep in tqdm(plan, desc=f"{gbps:g} Gbps", leave=False):
                    for mode in (("whole", "layers") if rep % 2 == 0 else ("layers", "whole")):
                        runs.append({"gbps": gbps, **one(client, prefill.url, decode.url, endpoint, n, mode,
                                                         seed=len(runs) + 1)})
                stop_all([prefill])
                procs.remove(prefill)
    finally:
        stop_all(procs)
    rows = table(runs)
    cols = ("tokens", "gbps", "whole_gbps", "kv_mb", "prefill_s", "ttft_whole_s", "ttft_layers_s", "wait_whole_ms",
            "wait_layers_ms", "saved_ms", "saved_pct")
    print(f"\nmodel {model}; medians over {a.repeats} repeat(s) (8k: 1); measured on a shared, busy {a.machine} box")
    print("  ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>14.3f}" if isinstance(r[c], float) else f"{r[c]:>14}" for c in cols))
    out = Path(a.out) if a.out else ROOT / "docs" / "results" / (
        f"kv_stream-{dt.date.today().isoformat()}-{a.machine}{'-quick' if a.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "kv_stream", "model": model, "machine": a.machine, "tokens": tokens,
                               "gbps": links, "repeats": a.repeats, "max_model_len": max_len,
                               "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
                               "load_note": "measured while other engineers' jobs shared the 2 cores",
                               "rows": rows, "runs": runs}, indent=1, allow_nan=False))
    print(f"wrote {out}")
    return 0


def one(client: Any, prefill_url: str, decode_url: str, endpoint: str, n: int, mode: str, seed: int) -> dict[str, Any]:
    """One request as the router sends it, then its KV claimed by the decode worker; its timings."""
    from labkit.engine.config import SamplingParams
    from labkit.serve.messages import DecodeRequest, PrefillRequest, PrefillResult

    sampling = SamplingParams(max_tokens=2, ignore_eos=True)   # 2: the KV must go to the decode worker
    req = PrefillRequest(prompt_ids=prompt(n, seed), sampling=sampling, kv_endpoint=endpoint,
                         kv_stream=mode)  # type: ignore[arg-type]  # "whole" or "layers"
    t0 = time.perf_counter()
    r = client.post(prefill_url + "/internal/prefill", json=req.model_dump(mode="json"))
    ttft = time.perf_counter() - t0
    r.raise_for_status()
    res = PrefillResult.model_validate_json(r.content)
    client.post(decode_url + "/internal/decode", json=DecodeRequest(
        request_id=req.request_id, sampling=sampling).model_dump(mode="json")).raise_for_status()
    return {"tokens": n, "mode": mode, "ttft_s": ttft, "prefill_s": res.prefill_s,
            "kv_wait_s": res.kv_acked_s - res.prefill_s, "kv_bytes": res.kv_bytes, "transfer_s": res.transfer_s,
            "layer_sent_s": res.layer_sent_s}


def table(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (prompt length, link): medians of each mode, and what layer-wise saved of the TTFT."""
    rows = []
    for n, gbps in sorted({(r["tokens"], r["gbps"]) for r in runs}):
        mine = [r for r in runs if (r["tokens"], r["gbps"]) == (n, gbps)]
        med = {(m, k): statistics.median(r[k] for r in mine if r["mode"] == m)
               for m in ("whole", "layers") for k in ("ttft_s", "kv_wait_s", "transfer_s")}
        saved = med["whole", "kv_wait_s"] - med["layers", "kv_wait_s"]
        rows.append({"tokens": n, "gbps": gbps, "kv_mb": mine[0]["kv_bytes"] / 1e6,
                     "whole_gbps": 8 * mine[0]["kv_bytes"] / med["whole", "transfer_s"] / 1e9,   # what the link gave
                     "prefill_s": statistics.median(r["prefill_s"] for r in mine),
                     "ttft_whole_s": med["whole", "ttft_s"], "ttft_layers_s": med["layers", "ttft_s"],
                     "wait_whole_ms": 1e3 * med["whole", "kv_wait_s"], "wait_layers_ms": 1e3 * med["layers", "kv_wait_s"],
                     "saved_ms": 1e3 * saved, "saved_pct": 100 * saved / med["whole", "ttft_s"]})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
