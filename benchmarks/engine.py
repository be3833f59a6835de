"""The lab's engine vs transformers vs vLLM: offline throughput, batch-1 decode side by side, MFU/MBU.

    python benchmarks/engine.py                       # 3 rounds of everything (see RUNTIME below)
    python benchmarks/engine.py --rounds 1 --requests 16 --skip vllm      # a quick look

What one run measures, each engine in its own child process (fresh threads and memory), in rounds
(A B C D A B C D ...), with the parent sampling one read/matmul roof before every child and at
the end (`labkit.hardware.Roof`; no engine is alive while it samples):
- offline throughput: `--requests` x (`--prompt-len` in, `--output-len` out), distinct prompts,
  EOS ignored; output tokens per second of wall time, model load excluded; beside it the workload's
  roofline bound (`labkit.roofline.offline_bound_s`: every step at its roof), the same for every
  engine, and each engine's share of it: how far any ratio between engines can go;
- batch-1 decode: one `--b1-prompt-len` prompt, ms per output token = (time for 1 + N tokens -
  time for 1 token) / N, the same way for every engine; MBU = weight + KV bytes per token
  (labkit.roofline) / ms per token / the roof's median read bandwidth. The lab engine runs it in
  fp32 and bf16;
- paired, in one process, once after the rounds: the lab engine with its native kernels and with
  its PyTorch paths, stepping in turn (A B A B): prefill MFU (8 x 256 tokens) and the batch-64
  decode step (context 128) of each.
Each figure is the median over rounds. Every ratio is against the one roof; when the roof's
samples spread more than 15% the output says the machine was noisy next to each ratio.
Writes docs/results/engine-<date>-<machine>.json.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGET_B1_VS_VLLM, TARGET_OFFLINE_VS_VLLM, TARGET_MBU, TARGET_MFU = 1.25, 1.5, 0.8, 0.8


def prompts(n: int, prompt_len: int, seed: int = 0) -> list[list[int]]:
    """n distinct prompts: BOS then prompt_len - 1 pseudo-random byte ids."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [[256, *rng.integers(0, 256, size=prompt_len - 1).tolist()] for _ in range(n)]


def batch1_ms_per_token(gen: Callable[[int], None], tokens: int, reps: int = 3) -> dict[str, Any]:
    """Batch-1 decode ms/token of `gen(max_tokens)` (one request to completion): the median over `reps` of
    (time of 1 + tokens - time of 1) / tokens, so prefill and per-request costs cancel out."""
    gen(4)  # warm-up
    per = []
    for _ in range(reps):
        t0 = time.perf_counter()
        gen(1)
        t1 = time.perf_counter()
        gen(1 + tokens)
        t2 = time.perf_counter()
        per.append(((t2 - t1) - (t1 - t0)) / tokens)
    return {"ms_per_token": 1e3 * statistics.median(per), "ms_per_token_reps": [1e3 * p for p in per]}


# --- the contenders (each runs in a child process) -------------------------------------------

def _lab_engine(a: argparse.Namespace, dtype: str, **kw: Any):
    from labkit.engine import Engine, EngineConfig

    return Engine(EngineConfig(model=a.model, dtype=dtype, device=a.device, kv_cache_bytes=768 << 20,
                               max_num_seqs=max(a.requests, 1), max_num_batched_tokens=a.batched_tokens,
                               enable_prefix_caching=False, **kw))


def _lab_batch1(eng: Any, a: argparse.Namespace) -> dict[str, Any]:
    from labkit.engine import SamplingParams

    p = prompts(1, a.b1_prompt_len, seed=7)
    return batch1_ms_per_token(lambda n: eng.generate(p, SamplingParams(max_tokens=n, ignore_eos=True)), a.b1_tokens)


def run_labkit(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from labkit.engine import SamplingParams

    eng = _lab_engine(a, a.dtype)
    res: dict[str, Any] = {"threads": torch.get_num_threads(), "kernels": eng.model.native_note or "native"}
    if "offline" in a.parts:
        eng.generate(prompts(2, 32, seed=99), SamplingParams(max_tokens=4, ignore_eos=True))
        sp = SamplingParams(max_tokens=a.output_len, ignore_eos=True)
        for p in prompts(a.requests, a.prompt_len):
            eng.add_request(p, sp)
        steps: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        while eng.has_unfinished():
            out = eng.step()
            steps.append({"phase": out.phase, "prefill_tokens": out.num_prefill_tokens,
                          "decode_seqs": out.num_decode_seqs, "elapsed_s": out.elapsed_s})
        res.update(wall_s=time.perf_counter() - t0, steps=steps)
    if "b1" in a.parts:
        res["b1"] = _lab_batch1(eng, a)
    return res


def run_labkit_bf16(a: argparse.Namespace) -> dict[str, Any]:
    eng = _lab_engine(a, "bfloat16")
    return {"kernels": eng.model.native_note or "native", "b1": _lab_batch1(eng, a)}


def run_transformers(a: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from labkit.models import PAD_ID, ensure_model

    model = AutoModelForCausalLM.from_pretrained(str(ensure_model(a.model, quiet=True)),
                                                 dtype=getattr(torch, a.dtype)).eval()
    res: dict[str, Any] = {"threads": torch.get_num_threads()}

    def generate(ps: list[list[int]], n: int) -> int:
        width = max(map(len, ps))
        # Left padding: every row's last prompt token sits at the same column, as generate() needs.
        ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in ps])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ps])
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=PAD_ID)
        return out.shape[1] - width

    if "offline" in a.parts:
        generate(prompts(2, 32, seed=99), 4)
        t0 = time.perf_counter()
        made = generate(prompts(a.requests, a.prompt_len), a.output_len)
        res["wall_s"] = time.perf_counter() - t0
        assert made == a.output_len
    if "b1" in a.parts:
        p = prompts(1, a.b1_prompt_len, seed=7)
        res["b1"] = batch1_ms_per_token(lambda n: generate(p, n), a.b1_tokens)
    return res


def run_vllm(a: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB of KV cache
    if a.device == "cpu":  # every usable core, as the lab engine gets: vLLM's "auto" binding keeps one core
        from labkit.vllm.procinfo import cpu_list_str, usable_cpus  # for its scheduler (1 thread on 2 cores)

        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_list_str(usable_cpus()))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from labkit.models import ensure_model

    longest = max(a.prompt_len + a.output_len, a.b1_prompt_len + a.b1_tokens + 1) + 16
    llm = LLM(model=str(ensure_model(a.model, quiet=True)), dtype=a.dtype, max_model_len=longest,
              max_num_seqs=max(a.requests, 1), seed=0, enforce_eager=False)
    res: dict[str, Any] = {"vllm_version": __import__("vllm").__version__,
                           "omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")}

    def generate(ps: list[list[int]], n: int) -> None:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ps],
                            SamplingParams(max_tokens=n, ignore_eos=True, temperature=0.0), use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == n for o in outs)

    if "offline" in a.parts:
        generate(prompts(2, 32, seed=99), 4)
        t0 = time.perf_counter()
        generate(prompts(a.requests, a.prompt_len), a.output_len)
        res["wall_s"] = time.perf_counter() - t0
    if "b1" in a.parts:
        p = prompts(1, a.b1_prompt_len, seed=7)
        res["b1"] = batch1_ms_per_token(lambda n: generate(p, n), a.b1_tokens)
    return res


def run_paired(a: argparse.Namespace) -> dict[str, Any]:
    """The native kernels against the engine's PyTorch paths, in one process, stepping in turn (A B A B):
    a prefill of 8 x 256 tokens and a batch-64 decode step (context 128) of each."""
    from labkit import hardware
    from labkit.runners import EngineRunner

    runners = {name: EngineRunner(a.model, a.dtype, a.device, kv_cache_bytes=768 << 20,
                                  max_num_batched_tokens=a.batched_tokens, native_kernels=native)
               for name, native in (("native", True), ("pytorch", False))}
    pre = {n: r.prefill_fn(8, 256) for n, r in runners.items()}
    for fn in pre.values():
        fn()  # warm-up
    times: dict[str, dict[str, list[float]]] = {n: {"prefill_s": [], "decode64_s": []} for n in runners}
    for _ in range(a.paired_reps):
        for n in runners:
            times[n]["prefill_s"] += hardware.time_fn(pre[n], a.device, warmup=0, repeats=1)
    dec = {n: r.decode_fn(64, 128) for n, r in runners.items()}
    for fn in dec.values():
        fn()  # warm-up
    for _ in range(a.paired_reps):
        for n in runners:
            times[n]["decode64_s"] += hardware.time_fn(dec[n], a.device, warmup=0, repeats=3)
    for r in runners.values():
        r.close()
    return {"times": times}


RUNNERS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "labkit": run_labkit, "labkit-bf16": run_labkit_bf16, "transformers": run_transformers, "vllm": run_vllm,
    "paired": run_paired}


# --- the parent: the roof, the children, the tables, the JSON ---------------------------------

def child(name: str, a: argparse.Namespace) -> dict[str, Any] | None:
    """Runs one contender in a fresh process; returns its RESULT dict, or None (and says why)."""
    args = [sys.executable, __file__, "--child", name, "--model", a.model, "--dtype", a.dtype, "--device", a.device,
            "--requests", str(a.requests), "--prompt-len", str(a.prompt_len), "--output-len", str(a.output_len),
            "--batched-tokens", str(a.batched_tokens), "--b1-prompt-len", str(a.b1_prompt_len),
            "--b1-tokens", str(a.b1_tokens), "--paired-reps", str(a.paired_reps), "--parts", *a.parts]
    print(f"== {name} ...", flush=True)
    from labkit.proc import popen_owned  # its own group, tied to this script: a kill -9 here ends it too

    proc = popen_owned(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        stdout, stderr = proc.communicate(timeout=a.timeout_s)
    except BaseException:  # timeout or Ctrl-C: never leave the child (and vLLM's workers) running
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print(f"   {name}: stopped (timeout {a.timeout_s} s or interrupted)")
        return None
    lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        print(f"   {name} failed (exit {proc.returncode}):\n" + (stderr or stdout)[-2000:])
        return None
    res = json.loads(lines[-1][len("RESULT "):])
    said = [f"{a.requests * a.output_len / res['wall_s']:.1f} output tok/s"] if "wall_s" in res else []
    said += [f"batch-1 decode {res['b1']['ms_per_token']:.1f} ms/token"] if "b1" in res else []
    print(f"   {name}: {', '.join(said) or 'done'}", flush=True)
    return res


def _med(xs: list[float]) -> float:
    return statistics.median(xs)


def lab_efficiency(a: argparse.Namespace, runs: list[dict[str, Any]], peak_flops: float, read_bps: float) -> dict:
    """Prefill MFU and the batch-64 decode step of the lab's offline runs (median over rounds)."""
    from labkit.roofline import ModelShape, decode_cost, prefill_cost

    shape = ModelShape.from_config(a.model)
    mfu, step_ms, mbu = [], [], []
    for r in runs:
        pre = [s for s in r["steps"] if s["phase"] == "prefill"]
        dec = [s for s in r["steps"] if s["phase"] == "decode"]
        flops = sum(prefill_cost(shape, a.prompt_len, s["prefill_tokens"] // a.prompt_len, a.dtype).flops for s in pre)
        mfu.append(flops / sum(s["elapsed_s"] for s in pre) / peak_flops)
        # prefill_first: every prompt is in before the first decode, so decode step k has context prompt_len + k.
        full = [(k, s) for k, s in enumerate(dec) if s["decode_seqs"] == a.requests]
        step_ms.append(1e3 * _med([s["elapsed_s"] for _, s in full]))
        mbu.append(sum(decode_cost(shape, a.requests, a.prompt_len + k, a.dtype).bytes for k, _ in full)
                   / sum(s["elapsed_s"] for _, s in full) / read_bps)
    return {"prefill_mfu": _med(mfu), "prefill_mfu_rounds": mfu, "decode_batch": a.requests,
            "decode_step_ms_batch": _med(step_ms), "decode_step_ms_batch_rounds": step_ms, "decode_mbu_batch": _med(mbu)}


def b1_bytes_per_token(a: argparse.Namespace, dtype: str) -> float:
    """Mean bytes one batch-1 decode step reads over the measured tokens: weights + the growing KV."""
    from labkit.roofline import ModelShape, decode_cost

    shape = ModelShape.from_config(a.model)
    ctx = range(a.b1_prompt_len + 1, a.b1_prompt_len + 1 + a.b1_tokens)
    return statistics.fmean(decode_cost(shape, 1, c, dtype).bytes for c in ctx)


def paired_summary(a: argparse.Namespace, res: dict[str, Any], peak_flops: float) -> dict[str, Any]:
    from labkit.roofline import ModelShape, prefill_cost

    flops = prefill_cost(ModelShape.from_config(a.model), 256, 8, a.dtype).flops
    out = {}
    for n, t in res["times"].items():
        out[n] = {"prefill_mfu": flops / _med(t["prefill_s"]) / peak_flops, "decode64_step_ms": 1e3 * _med(t["decode64_s"]),
                  **t}
    out["decode64_native_over_pytorch"] = out["native"]["decode64_step_ms"] / out["pytorch"]["decode64_step_ms"]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--batched-tokens", type=int, default=2048, help="the lab engine's max_num_batched_tokens")
    p.add_argument("--b1-prompt-len", type=int, default=64, help="batch-1 decode: prompt tokens")
    p.add_argument("--b1-tokens", type=int, default=128, help="batch-1 decode: output tokens timed")
    p.add_argument("--paired-reps", type=int, default=3)
    p.add_argument("--parts", nargs="+", default=["offline", "b1", "paired"], choices=["offline", "b1", "paired"])
    p.add_argument("--skip", action="append", default=[], choices=sorted(RUNNERS))
    p.add_argument("--rounds", type=int, default=3,
                   help="run the engines in turn this many times (A B C A B C ...); figures are medians over rounds")
    p.add_argument("--timeout-s", type=float, default=1800)
    p.add_argument("--machine", default="cpu-2core")
    p.add_argument("--out", default=None, help="JSON path (default docs/results/engine-<date>-<machine>.json)")
    p.add_argument("--child", choices=sorted(RUNNERS), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        sys.path.insert(0, str(ROOT))
        print("RESULT " + json.dumps(RUNNERS[a.child](a)), flush=True)
        return 0

    sys.path.insert(0, str(ROOT))
    from labkit.hardware import Roof
    from labkit.models import ensure_model

    ensure_model(a.model, quiet=True)
    names = [n for n in RUNNERS if n not in a.skip and n != "paired" and (n != "labkit-bf16" or "b1" in a.parts)]
    roof = Roof(a.device, (a.dtype,))
    print(f"roof: sampled before every child and at the end ({roof.method or 'reading'} ...)", flush=True)
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    runs["paired"] = []
    partial = (Path(a.out) if a.out else ROOT / "docs" / "results" / f"engine-{dt.date.today()}-{a.machine}.json"
               ).with_suffix(".partial.json")
    for i in range(max(1, a.rounds)):
        for n in names:
            roof.sample()
            r = child(n, a)
            if r is not None:
                runs[n].append(r)
        # What a run that is stopped later still leaves behind (removed when the run completes).
        partial.write_text(json.dumps({"rounds_done": i + 1, "roof_read_samples": roof.read_samples,
                                       "runs": {k: [{kk: vv for kk, vv in r.items() if kk != "steps"} for r in v]
                                                for k, v in runs.items()}}, indent=1))
    if "paired" in a.parts and "paired" not in a.skip:  # once: it fills two batch-64 caches
        roof.sample()
        r = child("paired", a)
        runs["paired"] += [r] if r is not None else []
    roof.sample()
    roof.close()
    peak, read = roof.peak_flops(a.dtype), roof.read_bytes_per_s
    note = roof.noise_note()
    flag = f"   <- {note}" if note else ""
    print(f"\n{roof.describe()}")

    doc: dict[str, Any] = {"benchmark": "engine", "date": dt.date.today().isoformat(), "machine": a.machine,
                           "model": a.model, "dtype": a.dtype, "device": a.device, "rounds": a.rounds,
                           "requests": a.requests, "prompt_len": a.prompt_len, "output_len": a.output_len,
                           "b1_prompt_len": a.b1_prompt_len, "b1_tokens": a.b1_tokens, "roof": roof.as_dict(),
                           "loadavg_1min_before": load_before, "cpu_count": os.cpu_count()}
    if "offline" in a.parts:
        rows = []
        for n, rs in runs.items():
            walls = [r["wall_s"] for r in rs if "wall_s" in r]
            if walls:
                rows.append({"engine": n, "wall_s": _med(walls), "wall_s_rounds": walls,
                             "output_tok_per_s": a.requests * a.output_len / _med(walls)})
        lab = next((r["output_tok_per_s"] for r in rows if r["engine"] == "labkit"), None)
        print(f"\noffline: {a.requests} requests x ({a.prompt_len} prompt, {a.output_len} output) tokens, {a.model} "
              f"{a.dtype}, median of {a.rounds} rounds")
        print(f"{'engine':<14}{'wall s':>9}{'out tok/s':>11}{'labkit / this':>15}   rounds (s)")
        for r in rows:
            r["labkit_over_this"] = lab / r["output_tok_per_s"] if lab else None
            ratio = f"{r['labkit_over_this']:.2f}x" if lab else "-"
            target = f" (target >= {TARGET_OFFLINE_VS_VLLM}x)" if r["engine"] == "vllm" else ""
            print(f"{r['engine']:<14}{r['wall_s']:>9.1f}{r['output_tok_per_s']:>11.1f}{ratio:>15}   "
                  f"{', '.join(f'{w:.1f}' for w in r['wall_s_rounds'])}{target}")
        doc["offline"] = rows
        # The roofline bound of this workload, the same for every engine: what the ratios can reach at all.
        from labkit.roofline import ModelShape, offline_bound_s

        bound = offline_bound_s(ModelShape.from_config(a.model), a.requests, a.prompt_len, a.output_len, a.dtype,
                                peak, read)
        doc["offline_bound"] = bound
        for r in rows:
            r["of_bound"] = bound["total_s"] / r["wall_s"]
        print(f"roofline bound of this workload: {bound['total_s']:.1f} s (prefill {bound['prefill_s']:.1f} s, "
              f"decode {bound['decode_s']:.1f} s); each engine's share of it: "
              + ", ".join(f"{r['engine']} {r['of_bound']:.2f}" for r in rows) + flag)
        vllm_wall = next((r["wall_s"] for r in rows if r["engine"] == "vllm"), None)
        if vllm_wall:
            print(f"so no engine can be more than {vllm_wall / bound['total_s']:.2f}x as fast as vLLM-cpu here "
                  f"(target >= {TARGET_OFFLINE_VS_VLLM}x)")
        if runs.get("labkit") and all("steps" in r for r in runs["labkit"]):
            eff = lab_efficiency(a, runs["labkit"], peak, read)
            doc["labkit_efficiency"] = eff
            print(f"lab engine: prefill MFU {eff['prefill_mfu']:.2f} (target >= {TARGET_MFU}); batch-{a.requests} decode "
                  f"step {eff['decode_step_ms_batch']:.0f} ms, MBU {eff['decode_mbu_batch']:.2f}{flag}")
    if "b1" in a.parts:
        from labkit.engine.kernels import cpu_has_bf16_matmul

        bf16_native = a.device == "cpu" and cpu_has_bf16_matmul()
        doc["cpu_bf16_matmul"] = bf16_native
        rows = []
        for n, rs in runs.items():
            ms = [r["b1"]["ms_per_token"] for r in rs if "b1" in r]
            if ms:
                dtype = "bfloat16" if n == "labkit-bf16" else a.dtype
                bpt = b1_bytes_per_token(a, dtype)
                rows.append({"engine": n, "dtype": dtype, "ms_per_token": _med(ms), "ms_per_token_rounds": ms,
                             "bytes_per_token": bpt, "gb_per_s": bpt / _med(ms) / 1e6, "mbu": bpt / (_med(ms) / 1e3) / read,
                             "kernels": rs[0].get("kernels", "")})
        vllm_ms = next((r["ms_per_token"] for r in rows if r["engine"] == "vllm"), None)
        print(f"\nbatch-1 decode: {a.b1_prompt_len}-token prompt, {a.b1_tokens} tokens, median of {a.rounds} rounds; "
              f"MBU against the roof's {read / 1e9:.1f} GB/s")
        print(f"{'engine':<14}{'dtype':<10}{'ms/token':>9}{'GB/s':>7}{'MBU':>6}{'speed / vLLM':>14}   rounds (ms)")
        for r in rows:
            r["speed_over_vllm"] = vllm_ms / r["ms_per_token"] if vllm_ms else None
            sp = f"{r['speed_over_vllm']:.2f}x" if vllm_ms else "-"
            print(f"{r['engine']:<14}{r['dtype']:<10}{r['ms_per_token']:>9.2f}{r['gb_per_s']:>7.1f}{r['mbu']:>6.2f}"
                  f"{sp:>14}   {', '.join(f'{m:.1f}' for m in r['ms_per_token_rounds'])}{flag}")
        lab_b1 = next((r for r in rows if r["engine"] == "labkit"), None)
        if lab_b1 and vllm_ms:
            print(f"lab engine batch-1 decode is {lab_b1['speed_over_vllm']:.2f}x as fast as vLLM-cpu "
                  f"(target >= {TARGET_B1_VS_VLLM}x); MBU fp32 {lab_b1['mbu']:.2f}"
                  + "".join(f", bf16 {r['mbu']:.2f}" for r in rows if r["engine"] == "labkit-bf16")
                  + f" (target >= {TARGET_MBU}; bf16 where the CPU multiplies bf16 natively, avx512_bf16 or AMX: "
                  + ("this one does" if bf16_native else "not this one") + f"){flag}")
        doc["batch1"] = rows
    if runs.get("paired"):
        summ = [paired_summary(a, r, peak) for r in runs["paired"]]
        pair = {k: {"prefill_mfu": _med([s[k]["prefill_mfu"] for s in summ]),
                    "decode64_step_ms": _med([s[k]["decode64_step_ms"] for s in summ])} for k in ("native", "pytorch")}
        pair["decode64_native_over_pytorch"] = _med([s["decode64_native_over_pytorch"] for s in summ])
        pair["rounds"] = summ
        doc["paired"] = pair
        print(f"\npaired in one process, stepping in turn (native kernels | PyTorch paths): prefill 8x256 MFU "
              f"{pair['native']['prefill_mfu']:.2f} | {pair['pytorch']['prefill_mfu']:.2f}; batch-64 decode step "
              f"{pair['native']['decode64_step_ms']:.0f} | {pair['pytorch']['decode64_step_ms']:.0f} ms "
              f"(native / PyTorch {pair['decode64_native_over_pytorch']:.2f}){flag}")
    doc["wall_s"] = time.perf_counter() - t_start
    doc["loadavg_1min_after"] = os.getloadavg()[0]
    path = Path(a.out) if a.out else ROOT / "docs" / "results" / f"engine-{doc['date']}-{a.machine}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))
    partial.unlink(missing_ok=True)
    print(f"run took {doc['wall_s'] / 60:.1f} min; load average {load_before:.1f} before, "
          f"{doc['loadavg_1min_after']:.1f} after; wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
