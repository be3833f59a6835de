"""Interference: how long a long prefill stalls running decodes, in mono, mono + chunked prefill, and 1P1D.

    python benchmarks/serve_interference.py               # model `small`, 2,048-token long prompt
    python benchmarks/serve_interference.py --quick       # model `tiny`, 1,536 tokens (CI-sized)

Each mode is started with labkit.serve.launcher (mono on every core; 1P1D: prefill on the
first half of the cores, decode on the rest), `--repeats` runs each (fresh prompts every run,
so no prefix-cache hits). Times are what the client saw. Prints a table (medians over repeats)
and writes docs/results/serve_interference-<date>-<machine>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    from labkit.bench.interference import INTERFERENCE_MODES, InterferenceScenario, run_modes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny model, CI-sized")
    p.add_argument("--model", default=None)
    p.add_argument("--long-prompt-tokens", type=int, default=None)
    p.add_argument("--num-decodes", type=int, default=4)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--machine", default=f"cpu-{len(os.sched_getaffinity(0))}core")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    model = a.model or ("tiny" if a.quick else "small")
    long_tokens = a.long_prompt_tokens or (1536 if a.quick else 2048)
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in INTERFERENCE_MODES}
    raw = []
    for rep in range(a.repeats):
        sc = InterferenceScenario(num_decodes=a.num_decodes, long_prompt_tokens=long_tokens, variant=100 * rep)
        for res in run_modes(model, sc, chunk_tokens=a.chunk_tokens, progress=True):
            runs[res.label].append(res.stats())
            raw.append(res.to_json())
    keys = ("decode_itl_mean_ms", "decode_stall_max_ms", "stall_ratio", "long_ttft_ms")
    med = {m: {k: statistics.median(r[k] for r in rs) for k in keys} for m, rs in runs.items()}
    print(f"\nmodel {model}, long prompt {long_tokens} tokens, {a.num_decodes} decodes, {a.repeats} repeats (medians)")
    print(f"{'mode':<14}" + "".join(f"{k:>22}" for k in keys))
    for m, row in med.items():
        print(f"{m:<14}" + "".join(f"{row[k]:>22.1f}" for k in keys))
    out = Path(a.out) if a.out else ROOT / "docs" / "results" / (
        f"serve_interference-{dt.date.today().isoformat()}-{a.machine}{'-quick' if a.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": model, "long_prompt_tokens": long_tokens, "num_decodes": a.num_decodes,
                               "chunk_tokens": a.chunk_tokens, "repeats": a.repeats, "machine": a.machine,
                               "load_note": "measured while other engineers' jobs shared the 2 cores",
                               "median": med, "runs": raw}, indent=1, allow_nan=False))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
