"""Measure the lab's engine and fit the planner's latency model to it.

`calibrate` times prefill steps at several prompt lengths and decode steps at several
(batch, context) points with `Engine.step()` (whose StepOutput says the phase and elapsed_s),
takes the median of a few repeats per point (other work shares the machine), fits
`LatencyModel` by least squares and returns it with the samples (`Calibration.save` writes JSON).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labkit.kv import kv_bytes_per_token
from labkit.plan.latency_model import Calibration, DecodeSample, PrefillSample, fit_latency_model


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
        """Small and quick in ci; spread wide enough for the quadratic term in full."""
        if profile == "ci":
            return cls((16, 64, 128, 256), (1, 4, 8), (32, 128), repeats=3, decode_steps=3)
        return cls((32, 128, 256, 512, 1024, 1536, 2048), (1, 4, 8, 16, 32), (64, 512, 1024), repeats=3, decode_steps=4)


def _kv_bytes_per_token(model: str, dtype: str) -> int:
    from labkit.models import load_config

    c = load_config(model)
    hd = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return kv_bytes_per_token(c["num_hidden_layers"], c.get("num_key_value_heads", c["num_attention_heads"]), hd, dtype)


def calibrate(model: Any = "tiny", profile: str | None = None, *, points: CalibrationPoints | None = None,
              seed: int = 0, progress: bool = False) -> Calibration:
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
    need_kv = (biggest_batch + 1) * (longest + 32) * _kv_bytes_per_token(cfg.model, cfg.dtype)
    cfg = replace(cfg, policy="prefill_first", enable_prefix_caching=False,
                  max_num_seqs=max(cfg.max_num_seqs, biggest_batch),
                  max_num_batched_tokens=max(cfg.max_num_batched_tokens, longest),
                  kv_cache_bytes=max(cfg.kv_cache_bytes, int(need_kv * 1.25)), num_blocks=None)
    eng = Engine(cfg)
    rng = np.random.default_rng(seed)
    prompt = lambda n: [int(x) for x in rng.integers(0, 256, n)]  # noqa: E731 - random bytes: no prefix hits
    greedy = lambda k: SamplingParams(max_tokens=k, ignore_eos=True)  # noqa: E731

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

    prefill: list[PrefillSample] = []
    for n in pts.prompt_tokens:
        times = []
        for _ in range(pts.repeats):
            eng.add_request(prompt(n), greedy(1))
            out = eng.step()
            if out.phase != "prefill" or out.num_prefill_tokens != n:
                raise RuntimeError(f"calibrate: expected one prefill of {n} tokens, got {out.phase} "
                                   f"of {out.num_prefill_tokens}")
            times.append(out.elapsed_s)
            run_until_idle()
        prefill.append(PrefillSample(n, min(times)))
        log(f"prefill {n:5d} tokens: {prefill[-1].elapsed_s * 1e3:8.2f} ms")

    decode: list[DecodeSample] = []
    for ctx in pts.decode_context_tokens:
        for b in pts.decode_batches:
            times_by_step: dict[int, list[float]] = {}
            for _ in range(pts.repeats):
                rids = [eng.add_request(prompt(ctx), greedy(pts.decode_steps + 1)) for _ in range(b)]
                step = 0
                while eng.has_unfinished():
                    out = eng.step()
                    if out.phase == "decode" and out.num_decode_seqs == b:
                        times_by_step.setdefault(step, []).append(out.elapsed_s)
                        step += 1
                for r in rids:
                    eng.abort(r)
            for step, ts in sorted(times_by_step.items()):
                # each sequence holds its prompt, the first token and `step` decoded tokens
                decode.append(DecodeSample(b, b * (ctx + 1 + step), min(ts)))
            log(f"decode batch {b:3d} x {ctx:5d} context: {min(times_by_step[0]) * 1e3:8.2f} ms/step")

    from labkit.hardware import device_name

    fitted = fit_latency_model(prefill, decode, kv_bytes_per_token=_kv_bytes_per_token(cfg.model, cfg.dtype),
                               model=str(cfg.model), device=device_name(cfg.device), note="measured")
    meta = {"engine_config": {k: getattr(cfg, k) for k in cfg.__slots__},  # type: ignore[attr-defined]
            "profile": prof, "repeats": pts.repeats, "seconds": time.perf_counter() - t0,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    return Calibration(fitted, tuple(prefill), tuple(decode), meta)


def serving_overhead(engine_model: Any, records: Any, *, link: Any = None) -> tuple[float, float]:
    """What a server adds to its engine's steps, from requests sent to it one at a time.

    `engine_model` is the LatencyModel of the engine alone (its own serve_* terms are ignored);
    `records` are unloaded RequestRecords (`labkit.bench.sweep.sequential_records`). Per request,
    the TTFT beyond the predicted prefill (and, with `link`, the KV transfer a disaggregated
    server waits for) and the TPOT beyond a predicted batch-1 decode step at the request's mean
    context. Returns (per-request seconds, per-step seconds): medians, never below 0.
    """
    from dataclasses import replace

    base = replace(engine_model, serve_request_s=0.0, serve_token_s=0.0)
    ok = [r for r in records if getattr(r, "ok", True)]
    if not ok:
        raise ValueError("serving_overhead needs at least one successful request")
    req, tok = [], []
    for r in ok:
        p = int(r.prompt_tokens)
        wait = float(base.prefill_s(p))
        if link is not None:
            wait += link.transfer_s(p * base.kv_bytes_per_token)
        req.append(r.ttft_s - wait)
        if r.output_tokens > 1:
            tok.append(r.tpot_s - float(base.decode_step_s(1, p + r.output_tokens / 2)))
    return max(0.0, float(np.median(req))), max(0.0, float(np.median(tok))) if tok else 0.0


def calibration_path(model: str, profile: str) -> Path:
    """Where `load_or_calibrate` keeps a model's calibration (under LABKIT_HOME)."""
    from labkit.config import labkit_home

    safe = str(model).replace("/", "_")
    return labkit_home() / "plan" / f"calibration-{safe}-{profile}.json"


def load_or_calibrate(model: str = "tiny", profile: str | None = None, *, refresh: bool = False,
                      points: CalibrationPoints | None = None, progress: bool = False) -> Calibration:
    """The saved calibration of `model` on this machine, measuring (and saving) it when missing."""
    from labkit.config import profile as current_profile

    prof = profile or current_profile()
    path = calibration_path(model, prof)
    if path.is_file() and not refresh:
        try:
            return Calibration.load(path)
        except (ValueError, KeyError, TypeError):
            pass  # an old or broken file: measure again
    cal = calibrate(model, prof, points=points, progress=progress)
    cal.save(path)
    return cal


def main(argv: list[str] | None = None) -> int:
    """`python -m labkit.plan.calibrate --model small --out cal.json`: measure, fit, save, print."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m labkit.plan.calibrate", description=main.__doc__)
    p.add_argument("--model", default="tiny")
    p.add_argument("--profile", choices=["ci", "full"], default=None)
    p.add_argument("--out", default=None, help="JSON path (default: under LABKIT_HOME/plan/)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    a = p.parse_args(argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    from labkit.config import profile as current_profile

    prof = a.profile or current_profile()
    cal = calibrate(a.model, prof, progress=True)
    path = cal.save(a.out or calibration_path(a.model, prof))
    print(cal.model.describe())
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
