"""Measure the lab's engine and fit the planner's latency model to it.

`calibrate` times prefill steps at several prompt lengths and decode steps at several
(batch, context) points with `Engine.step()` (whose StepOutput says the phase and elapsed_s),
takes the median of a few repeats per point (other work shares the machine), fits
`LatencyModel` by least squares and returns it with the samples (`Calibration.save` writes JSON).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from labkit.kv import kv_bytes_per_token
from labkit.plan.latency_model import (
    Calibration,
    DecodeSample,
    PrefillSample,
    fit_latency_model,
)


@dataclass(frozen=True, slots=True)
class CalibrationPoints:
    """Where to measure: prompt lengths (tokens) for prefill; batch sizes x context per sequence for decode."""

    prompt_tokens: tuple[int, ...]
    decode_batches: tuple[int, ...]
    decode_context_tokens: tuple[int, ...]
    repeats: int = 3
    decode_steps: int = 4

    def __post_init__(self) -> None:
        if len(set(self.prompt_tokens)) < 3 or min(self.prompt_tokens) < 1:
            raise ValueError(f"need >= 3 distinct prompt lengths >= 1, got {self.prompt_tokens}")
        if not self.decode_batches or not self.decode_context_tokens or min(self.decode_batches) < 1:
            raise ValueError("need decode batch sizes >= 1 and context lengths")
        if len(self.decode_batches) * len(self.decode_context_tokens) < 3:
            raise ValueError("need >= 3 (batch, context) decode points")
        if self.repeats < 1 or self.decode_steps < 1:
            raise ValueError("repeats and decode_steps must be >= 1")

    @classmethod
    def for_profile(cls, profile: str) -> CalibrationPoints:
        """Small and quick in ci; spread wide enough for the quadratic term in full; on a GPU the
        1B shape's range (prompts to 4,096 tokens, batches to 128: a GPU step barely grows below that)."""
        if profile == "ci":
            return cls((16, 64, 128, 256), (1, 4, 8), (32, 128), repeats=3, decode_steps=3)
        if profile == "gpu":
            return cls((128, 256, 512, 1024, 2048, 4096), (1, 8, 32, 64, 128), (512, 2048), repeats=3, decode_steps=4)
        return cls((32, 128, 256, 512, 1024, 1536, 2048), (1, 4, 8, 16, 32), (64, 512, 1024), repeats=3, decode_steps=4)


def model_kv_bytes_per_token(model: str, dtype: str) -> int:
    """KV-cache bytes one token of `model` (a preset or a model dir) takes in `dtype`."""
    from labkit.models import load_config

    c = load_config(model)
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return kv_bytes_per_token(c["num_hidden_layers"], c.get("num_key_value_heads", c["num_attention_heads"]), hd, dtype)


def calibrate(
    model: Any = "tiny",
    profile: str | None = None,
    *,
    points: CalibrationPoints | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Calibration:
    """Times the engine and fits the model; returns the Calibration (model, samples, meta).

    `model` is a preset name / model dir, or a `labkit.engine.EngineConfig` (its policy and
    prefix caching are overridden: prefill_first, no prefix cache, so every token is computed).
    """
    from dataclasses import replace

    from labkit.config import profile as current_profile
    from labkit.engine import Engine, EngineConfig, SamplingParams

    prof = profile or current_profile()
    pts = points or CalibrationPoints.for_profile(prof)
    longest = max(max(pts.prompt_tokens), max(pts.decode_context_tokens) + pts.decode_steps + 2)
    biggest_batch = max(pts.decode_batches)
    if isinstance(model, EngineConfig):
        cfg = model
    else:
        cfg = EngineConfig(model=str(model))
    need_kv = (biggest_batch + 1) * (longest + 32) * model_kv_bytes_per_token(cfg.model, cfg.dtype)
    cfg = replace(
        cfg,
        policy="prefill_first",
        enable_prefix_caching=False,
        max_num_seqs=max(cfg.max_num_seqs, biggest_batch),
        max_num_batched_tokens=max(cfg.max_num_batched_tokens, longest),
        kv_cache_bytes=max(cfg.kv_cache_bytes, int(need_kv * 1.25)),
        num_blocks=None,
    )
    eng = Engine(cfg)
    rng = np.random.default_rng(seed)
    prompt = lambda n: np.asarray(rng.integers(0, 256, size=int(n))).tolist()
    greedy = lambda k: SamplingParams(max_tokens=k, ignore_eos=True)

    def run_until_idle(limit: int = 100_000) -> None:
        for _ in range(limit):
            if not eng.has_unfinished():
                return
            eng.step()
        raise RuntimeError("calibrate: the engine did not finish its requests")

    def log(msg: str) -> None:
        if progress:
            print(msg, flush=True)

    t0 = time.perf_counter()
    eng.add_request(prompt(min(pts.prompt_tokens)), greedy(2))  # warm-up: first calls allocate
    run_until_idle()

    # Repeats go round the whole set of points (A B C A B C), not point by point (A A A B B B):
    # a burst of other work on a shared machine then hits one repeat of several points, and the
    # minimum over repeats drops it, instead of inflating every repeat of one point.
    prefill_times: dict[int, list[float]] = {n: [] for n in pts.prompt_tokens}
    decode_times: dict[tuple[int, int], dict[int, list[float]]] = {
        (ctx, b): {} for ctx in pts.decode_context_tokens for b in pts.decode_batches
    }
    for rep in range(pts.repeats):
        for n in pts.prompt_tokens:
            eng.add_request(prompt(n), greedy(1))
            out = eng.step()
            if out.phase != "prefill" or out.num_prefill_tokens != n:
                raise RuntimeError(
                    f"calibrate: expected one prefill of {n} tokens, got {out.phase} of {out.num_prefill_tokens}"
                )
            prefill_times[n].append(out.elapsed_s)
            run_until_idle()
        for (ctx, b), by_step in decode_times.items():
            rids = [eng.add_request(prompt(ctx), greedy(pts.decode_steps + 1)) for _ in range(b)]
            step = 0
            while eng.has_unfinished():
                out = eng.step()
                if out.phase == "decode" and out.num_decode_seqs == b:
                    by_step.setdefault(step, []).append(out.elapsed_s)
                    step += 1
            for r in rids:
                eng.abort(r)
        log(f"calibration round {rep + 1}/{pts.repeats} done ({time.perf_counter() - t0:.0f} s)")

    prefill = [PrefillSample(n, min(ts)) for n, ts in prefill_times.items()]
    for s in prefill:
        log(f"prefill {s.num_tokens:5d} tokens: {s.elapsed_s * 1e3:8.2f} ms")
    decode: list[DecodeSample] = []
    for (ctx, b), by_step in decode_times.items():
        for step, ts in sorted(by_step.items()):
            # each sequence holds its prompt, the first token and `step` decoded tokens
            decode.append(DecodeSample(b, b * (ctx + 1 + step), min(ts)))
        log(f"decode batch {b:3d} x {ctx:5d} context: {min(by_step[0]) * 1e3:8.2f} ms/step")

    from labkit.hardware import device_name

    fitted = fit_latency_model(
        prefill,
        decode,
        kv_bytes_per_token=model_kv_bytes_per_token(cfg.model, cfg.dtype),
        model=str(cfg.model),
        device=device_name(cfg.device),
        note="measured",
    )
    meta = {
        "engine_config": {k: getattr(cfg, k) for k in cfg.__slots__},
        "profile": prof,
        "points": _points_meta(pts),
        "repeats": pts.repeats,
        "seconds": time.perf_counter() - t0,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    return Calibration(fitted, tuple(prefill), tuple(decode), meta)


def _points_meta(pts: CalibrationPoints) -> dict[str, Any]:
    """The points as JSON stores them (tuples become lists), to compare with a saved calibration's."""
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(pts)))


def serving_overhead(
    engine_model: Any,
    sequential: Any,
    concurrent: Any = (),
    *,
    layout: Any = None,
    link: Any = None,
    limits: Any = None,
    first_token_at: Literal["adopted", "landed"] = "adopted",
    delta_s: float = 1e-3,
) -> tuple[float, float, float]:
    """What a server adds to its engine's steps: (per request, per decode step, per running
    sequence per decode step), in seconds, never below 0.

    `engine_model` is the LatencyModel of the engine alone (its serve_* terms are ignored).
    `sequential` are unloaded RequestRecords (requests sent one at a time:
    `labkit.bench.sweep.sequential_records`), `concurrent` records of a few requests sent
    together. The per-request cost is the median TTFT beyond the predicted prefill (and, with
    `link`, the KV transfer). The two per-step costs are fitted so that the simulator, replaying
    each probe's exact trace on `layout` (default mono), predicts its measured median TPOT: the
    sequential probe pins the cost at batch 1, the concurrent one how it grows with the batch.
    Without a concurrent probe the whole cost is per step.
    """
    from labkit.plan.latency_model import _nonneg_lstsq
    from labkit.plan.simulator import Layout, simulate
    from labkit.plan.workload import requests_from_records

    base = engine_model.engine_only
    seq_ok = [r for r in sequential if getattr(r, "ok", True)]
    if not seq_ok:
        raise ValueError("serving_overhead needs at least one successful sequential request")
    waits = []
    for r in seq_ok:
        p = int(r.prompt_tokens)
        wait = float(base.prefill_s(p)) + (link.seconds(p * base.kv_bytes_per_token) if link is not None else 0.0)
        waits.append(r.ttft_s - wait)
    request_s = max(0.0, float(np.median(waits)))

    layout = layout or Layout.mono()

    rows, target = [], []
    for recs in (seq_ok, [r for r in concurrent if getattr(r, "ok", True)]):
        if not any(r.output_tokens > 1 for r in recs):
            continue
        trace = requests_from_records(recs)
        many = trace.output_tokens > 1

        def sim_tpot(step_s: float, seq_s: float, trace: Any = trace, many: Any = many) -> float:
            """Median simulated TPOT of this probe with the given per-step costs."""
            sim = simulate(
                trace,
                base.with_serving(request_s, step_s, seq_s),
                layout,
                link=link,
                limits=limits,
                first_token_at=first_token_at,
            )
            return float(np.median(sim.tpot_s[many]))

        p0 = sim_tpot(0.0, 0.0)
        rows.append([(sim_tpot(delta_s, 0.0) - p0) / delta_s, (sim_tpot(0.0, delta_s) - p0) / delta_s])
        target.append(float(np.median([r.tpot_s for r in recs if r.output_tokens > 1])) - p0)
    if not rows:
        return request_s, 0.0, 0.0
    x, y = np.array(rows), np.array(target)
    if len(rows) == 1:  # batch 1 only: cannot tell the two apart, so it is all per step
        return request_s, max(0.0, float(y[0] / x[0, 0])), 0.0
    # non-negative least squares; a probe the engine alone already explains gives 0
    coef = _nonneg_lstsq(x, y) if (y > 0).any() else np.zeros(2)
    return request_s, float(coef[0]), float(coef[1])


def fit_from_requests(
    sequential: Sequence[Any],
    *,
    kv_bytes_per_token: int,
    link: Any = None,
    model: str = "",
    device: str = "",
    note: str = "fitted from requests sent one at a time",
) -> Any:
    """The latency model of a server seen only from outside (vLLM writes no step log): its
    `sequential` RequestRecords (sent one at a time: `labkit.bench.sweep.sequential_records`).

    Each request gives a prefill sample (its prompt length, its TTFT less the KV transfer over
    `link`: the server's per-request cost lands in the intercept) and a batch-1 decode sample (its
    TPOT, at the context halfway through its output). Every sample is at batch 1, so the per-sequence
    term cannot be told from the per-step one: it is folded into the intercept (0 per sequence);
    `serving_overhead` on a probe of requests sent together fits how a step grows with the batch.
    ValueError when the requests have fewer than 3 distinct prompt lengths.
    """
    from dataclasses import replace

    ok = [r for r in sequential if getattr(r, "ok", True)]
    prefill = []
    for r in ok:
        p = int(r.prompt_tokens)
        kv_s = link.seconds(p * kv_bytes_per_token) if link is not None else 0.0
        prefill.append(PrefillSample(p, max(float(r.ttft_s) - kv_s, 1e-6)))
    decode = [
        DecodeSample(1, int(r.prompt_tokens) + int(r.output_tokens) // 2, float(r.tpot_s))
        for r in ok
        if r.output_tokens > 1
    ]
    m = fit_latency_model(prefill, decode, kv_bytes_per_token=kv_bytes_per_token, model=model, device=device, note=note)
    return replace(m, decode_a_s=m.decode_a_s + m.decode_c_s_per_seq, decode_c_s_per_seq=0.0)


def read_step_log(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a worker's `--step-log` file (several workers may share one: each line names its role)."""
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def fit_server_steps(
    engine_model: Any, steps: Sequence[dict[str, Any]], *, max_gap_s: float = 0.02, min_decode_steps: int = 20
) -> Any:
    """The engine model, moved to the steps a server really ran (its `--step-log` lines).

    In a server, an engine step shares the machine with the HTTP loop in its own process (and its
    lock on the Python interpreter), the router and the clients: on a small CPU its decode steps
    run slower than the engine alone. Each decode step counts from the end of the previous one
    when the engine ran them back to back (a gap under `max_gap_s`: the loop's own work between
    steps, streaming the tokens). The decode intercept moves by the median of (that time - the
    engine's formula); the slopes in batch and context stay the engine's. On the 2-core CPU the
    server added 4-11 ms to each step in the measured runs at 0.2-0.7 req/s (batch 1 to 5), not
    growing with the batch, while probes that sent 8 requests at once added up to 20 ms: a refit
    of the slopes on such bursts predicted TPOT 30% too high. So probe one request at a time.

    Prefill keeps its fitted shape, scaled by the median ratio of the server's prefill steps to
    the engine alone. With fewer than `min_decode_steps` decode steps the decode formula is kept.
    Returns a LatencyModel with no serve_* costs (the caller adds the per-request cost).
    """
    from dataclasses import replace

    base = engine_model.engine_only
    # One engine's steps in order: by worker (mono-dp's replicas share a log), else by role (older logs).
    steps = sorted(steps, key=lambda s: (str(s.get("worker", s.get("role", ""))), float(s["t_end"])))
    pre_ratio: list[float] = []
    extra: list[float] = []
    prev: dict[str, float] = {}
    for s in steps:
        role, end, secs = str(s.get("worker", s.get("role", ""))), float(s["t_end"]), float(s["seconds"])
        gap = end - secs - prev.get(role, -1e9)
        prev[role] = end
        cycle = secs + gap if 0 <= gap < max_gap_s else secs
        if s["phase"] == "prefill" and s.get("prefill_tokens"):
            pre_ratio.append(secs / float(base.prefill_s(int(s["prefill_tokens"]))))
        elif s["phase"] == "decode" and s.get("decode_seqs"):
            extra.append(cycle - float(base.decode_step_s(int(s["decode_seqs"]), int(s.get("context_tokens", 0)))))
    out = base
    if pre_ratio:
        k = float(np.median(pre_ratio))
        out = replace(
            out,
            prefill_a_s=out.prefill_a_s * k,
            prefill_b_s_per_token=out.prefill_b_s_per_token * k,
            prefill_c_s_per_token2=out.prefill_c_s_per_token2 * k,
        )
    if len(extra) >= min_decode_steps:
        out = replace(out, decode_a_s=max(0.0, out.decode_a_s + float(np.median(extra))))
    return replace(out, note=(out.note + "; " if out.note else "") + "moved to the server's steps")


def engine_for_profile(model: str, profile: str) -> Any:
    """The EngineConfig a profile calibrates on: on a GPU the preset's shape in bf16 with random
    weights built on the device and CUDA graphs (the lab engine's fastest decode); else the CPU
    engine in float32 (EngineConfig's defaults)."""
    from labkit.engine import EngineConfig

    if profile == "gpu":
        return EngineConfig(model=model, dtype="bfloat16", device="cuda", cuda_graphs=True, random_weights=True)
    return EngineConfig(model=model)


def split_decode_samples(samples: Sequence[DecodeSample]) -> tuple[list[DecodeSample], list[DecodeSample]]:
    """(fit, held out): the samples of every other batch size, counted from the smallest, are held
    out (batches 1, 4, 8, 16, 32 -> fit on 1, 8, 32; hold out 4 and 16), so a fit is judged on steps
    between the ones it saw. Raises ValueError with fewer than 3 batch sizes."""
    batches = sorted({s.batch_size for s in samples})
    if len(batches) < 3:
        raise ValueError(f"holding out a batch size needs >= 3 of them, got {batches}")
    held = set(batches[1::2])
    return [s for s in samples if s.batch_size not in held], [s for s in samples if s.batch_size in held]


def calibration_path(model: str, profile: str) -> Path:
    """Where `load_or_calibrate` keeps a model's calibration (under LABKIT_HOME)."""
    from labkit.config import labkit_home

    safe = str(model).replace("/", "_")
    return labkit_home() / "plan" / f"calibration-{safe}-{profile}.json"


def load_or_calibrate(
    model: Any = "tiny",
    profile: str | None = None,
    *,
    refresh: bool = False,
    points: CalibrationPoints | None = None,
    progress: bool = False,
) -> Calibration:
    """The saved calibration of `model` (a preset name, or an EngineConfig: see `engine_for_profile`)
    on this machine, measuring (and saving) it when missing, or when `points` are given and the
    saved one was measured at others."""
    from labkit.config import profile as current_profile

    prof = profile or current_profile()
    path = calibration_path(getattr(model, "model", model), prof)
    if path.is_file() and not refresh:
        try:
            saved = Calibration.load(path)
        except (ValueError, KeyError, TypeError):
            saved = None  # an old or broken file: measure again
        if saved is not None and (points is None or saved.meta.get("points") == _points_meta(points)):
            return saved
    cal = calibrate(model, prof, points=points, progress=progress)
    cal.save(path)
    return cal


def main(argv: list[str] | None = None) -> int:
    """`python -m labkit.plan.calibrate --model small --out cal.json`: measure, fit, save, print."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m labkit.plan.calibrate", description=main.__doc__)
    p.add_argument("--model", default="tiny")
    p.add_argument("--profile", choices=["ci", "full", "gpu"], default=None)
    p.add_argument("--out", default=None, help="JSON path (default: under LABKIT_HOME/plan/)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    from labkit.config import profile as current_profile

    prof = a.profile or current_profile()
    cal = calibrate(engine_for_profile(a.model, prof), prof, progress=True)
    path = cal.save(a.out or calibration_path(a.model, prof))
    print(cal.model.describe())
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
