"""Notebook 06's exercises: fit the decode step model (build-it, then the simulator runs on your
fit), which layout decodes most smoothly (predict, then simulate), the link speed at which the KV
transfer costs as much as the prefill (compute, checked by the simulator), and the planner's
verdict for short prompts on a small cluster (multiple choice)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from labkit.check import CheckResult, check_choice, fmt, is_missing, missing, verdict
from labkit.exercises.core import Example, exercise
from labkit.exercises.suite import Case, run_suite
from labkit.plan.latency_model import DecodeSample, LatencyModel

# --- Exercise 1 · fit the decode step model (build-it) ---------------------------------------

# Two known models the suite samples exactly (noise-free), so a right fit recovers them to 1e-6:
# the 8B shape on an H100 at the MFU/MBU of the committed run (memory-bound: a and b dominate),
# and a CPU-like one where per-sequence work dominates (c large against a).
KNOWN_DECODE_MODELS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("llama-3.1-8b on an H100 (estimate)", (10.7e-3, 87.3e-9, 35.6e-6)),
    ("a CPU-like model (per-sequence work dominates)", (2.0e-3, 5.0e-9, 1.5e-3)),
)
# Held-out H100 steps (lab engine, CUDA graphs, 8B, context 512 per sequence): predicted from a fit
# on batches 1, 64 and 256. A straight line through those misses the measured 16 and 128 by under
# 7% (the step bends a little between them): 15% leaves room without letting a wrong fit through.
H100_FIT_BATCHES = (1, 64, 256)
H100_HELD_RTOL = 0.15
# This machine's held-out steps: on the shared 2-core box (load average 11-14 from other jobs,
# 2026-12-01) the lab's own fit missed held-out tiny-model steps by a median 20-62% (five
# calibrations), so a fixed bound would fail right answers. The learner's fit passes when its
# median miss is within 1.5x the lab's fit's on the same split, plus 5 points, or under 25%.
HELD_OUT_FLOOR = 0.25


def coefficients(got: Any) -> tuple[float, float, float] | None:
    """The learner's return value as (a, b, c) floats, or None when it is not three real numbers."""
    if isinstance(got, (str, bytes)):
        return None
    try:
        vals = [float(v) for v in np.asarray(got, dtype=float).ravel()]
    except (TypeError, ValueError):
        return None
    if len(vals) != 3 or not all(math.isfinite(v) for v in vals):
        return None
    return vals[0], vals[1], vals[2]


def _arrays(samples: Sequence[DecodeSample]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.array([s.batch_size for s in samples], dtype=float),
        np.array([s.context_tokens for s in samples], dtype=float),
        np.array([s.elapsed_s for s in samples], dtype=float),
    )


def _predict(coef: tuple[float, float, float], samples: Sequence[DecodeSample]) -> np.ndarray:
    b, ctx, _ = _arrays(samples)
    return coef[0] + coef[1] * ctx + coef[2] * b


def _median_miss(coef: tuple[float, float, float], samples: Sequence[DecodeSample]) -> float:
    y = _arrays(samples)[2]
    return float(np.median(np.abs(_predict(coef, samples) - y) / y))


def _exact_judge(got: Any, case: Case) -> tuple[bool, str]:
    coef = coefficients(got)
    if coef is None:
        return False, f"returned {got!r}, expected (a_s, b_s_per_ctx_token, c_s_per_seq): three numbers"
    text = f"a {fmt(coef[0] * 1e3)} ms, b {fmt(coef[1] * 1e9)} ns/token, c {fmt(coef[2] * 1e6)} µs/seq"
    want = case.expected
    if all(math.isclose(g, w, rel_tol=1e-6) for g, w in zip(coef, want)):
        return True, text
    return False, (
        text + f"; expected a {fmt(want[0] * 1e3)} ms, b {fmt(want[1] * 1e9)} ns/token, "
        f"c {fmt(want[2] * 1e6)} µs/seq (seconds, in that order)"
    )


def _held_out_judge(held: Sequence[DecodeSample], rtol: float) -> Callable[[Any, Case], tuple[bool, str]]:
    def judge(got: Any, case: Case) -> tuple[bool, str]:
        coef = coefficients(got)
        if coef is None:
            return False, f"returned {got!r}, expected three numbers"
        pred, meas = _predict(coef, held), _arrays(held)[2]
        worst = float(np.max(np.abs(pred - meas) / meas))
        pairs = ", ".join(f"{fmt(p, 's')} vs {fmt(m, 's')}" for p, m in zip(pred, meas))
        return worst <= rtol, f"predicted vs measured: {pairs} (worst miss {worst:.0%}, allowed {rtol:.0%})"

    return judge


def _machine_judge(held: Sequence[DecodeSample], lab_miss: float) -> Callable[[Any, Case], tuple[bool, str]]:
    allowed = max(HELD_OUT_FLOOR, 1.5 * lab_miss + 0.05)

    def judge(got: Any, case: Case) -> tuple[bool, str]:
        coef = coefficients(got)
        if coef is None:
            return False, f"returned {got!r}, expected three numbers"
        miss = _median_miss(coef, held)
        text = (
            f"median miss on {len(held)} held-out steps {miss:.0%} (the lab's fit: {lab_miss:.0%}; "
            f"allowed {allowed:.0%})"
        )
        return miss <= allowed, text

    return judge


def _synthetic_samples(coef: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps of a known model on a grid of batches and contexts per sequence (exact, no noise)."""
    grid = [(b, b * ctx) for b in (1, 4, 16, 64) for ctx in (128, 1024, 4096)]
    batch = np.array([g[0] for g in grid], dtype=float)
    ctx = np.array([g[1] for g in grid], dtype=float)
    return batch, ctx, coef[0] + coef[1] * ctx + coef[2] * batch


def h100_decode_samples() -> list[DecodeSample]:
    """The committed H100 run's decode sweep of the lab engine with CUDA graphs (8B), as samples."""
    from labkit import reference

    run = reference.gpu_check()
    sweep = run.decode_sweeps.get("llama-3.1-8b engine graphs", ()) if run is not None else ()
    return [DecodeSample(p.batch, p.batch * p.seq_len, p.ms / 1e3) for p in sweep]


def _fit_cases(measured: Sequence[DecodeSample]) -> Iterator[Case]:
    from labkit.plan.calibrate import split_decode_samples
    from labkit.plan.latency_model import fit_decode_steps

    for label, coef in KNOWN_DECODE_MODELS:  # cheap and exact first
        yield Case(f"exact steps of {label}", _synthetic_samples(coef), coef, judge=_exact_judge)
    h100 = h100_decode_samples()
    if h100:
        fit = [s for s in h100 if s.batch_size in H100_FIT_BATCHES]
        held = [s for s in h100 if s.batch_size not in H100_FIT_BATCHES]
        yield Case(
            f"H100 (committed), 8B: fit on batches {', '.join(map(str, H100_FIT_BATCHES))}, "
            f"predict {', '.join(str(s.batch_size) for s in held)}",
            _arrays(fit),
            None,
            judge=_held_out_judge(held, H100_HELD_RTOL),
        )
    if measured:
        fit, held = split_decode_samples(measured)
        lab, _ = fit_decode_steps(fit)
        yield Case(
            f"this machine: fit on batches {sorted({s.batch_size for s in fit})}, "
            f"predict batches {sorted({s.batch_size for s in held})}",
            _arrays(fit),
            None,
            judge=_machine_judge(held, _median_miss(lab, held)),
        )


def reference_fit_decode_step(batch_sizes: Any, context_tokens: Any, step_s: Any) -> tuple[float, float, float]:
    """The fit the learner writes (the tests' right answer): least squares on relative residuals."""
    b, ctx, y = (np.asarray(v, dtype=float) for v in (batch_sizes, context_tokens, step_s))
    x = np.stack([np.ones_like(y), ctx, b], axis=1) / y[:, None]
    coef, *_ = np.linalg.lstsq(x, np.ones_like(y), rcond=None)
    return float(coef[0]), float(coef[1]), float(coef[2])


def _noisy_samples() -> list[DecodeSample]:
    """Steps of a known model with +-10% deterministic noise, standing in for a measured calibration."""
    a, b, c = KNOWN_DECODE_MODELS[1][1]
    rng = np.random.default_rng(0)
    out = []
    for batch in (1, 2, 4, 8):
        for ctx in (64, 512):
            for step in range(2):
                s = batch * (ctx + 1 + step)
                out.append(DecodeSample(batch, s, (a + b * s + c * batch) * float(rng.uniform(0.9, 1.1))))
    return out


def _fit_examples() -> list[Example]:
    ms = lambda b, s, y: tuple(1e3 * v for v in reference_fit_decode_step(b, s, y))
    no_c = lambda b, s, y: (*np.linalg.lstsq(np.stack([np.ones_like(y), s], 1), y, rcond=None)[0], 0.0)
    swapped = lambda b, s, y: tuple(reference_fit_decode_step(b, s, y)[i] for i in (0, 2, 1))
    mean_only = lambda b, s, y: (float(np.mean(y)), 0.0, 0.0)
    return [
        Example(
            right=reference_fit_decode_step,
            wrong=[ms, no_c, swapped, mean_only],
            label="known models and the committed H100 sweep",
        ),
        Example(
            right=reference_fit_decode_step,
            wrong=[ms, swapped],
            context={"measured": _noisy_samples()},
            label="with a noisy calibration as this machine's",
        ),
    ]


@exercise(
    "06",
    1,
    "fit the decode step model",
    kind="build-it",
    hint="stack the columns [1, S, B] into a matrix X and solve X·(a, b, c) ≈ step_s with "
    "numpy.linalg.lstsq; dividing each row and its target by step_s fits relative errors",
    examples=_fit_examples,
)
def check_decode_fit(fn: Callable[..., Any], *, measured: Sequence[DecodeSample] = ()) -> CheckResult:
    """Runs the learner's `fit_decode_step(batch_sizes, context_tokens, step_s)` -> (a, b, c).

    Expected: the coefficients of two known models it is fed exact steps of (to 1e-6); then
    measured steps it never saw: the committed H100 sweep (fit on three batch sizes, the other two
    within H100_HELD_RTOL), and with `measured` (this machine's calibration) every other batch size
    held out (`labkit.plan.calibrate.split_decode_samples`), judged against the lab's own fit's miss.
    """
    return run_suite("fit_decode_step", fn, _fit_cases(measured), hint=check_decode_fit.hint)


def model_with_decode(model: LatencyModel, coef: Any, who: str = "your fit") -> tuple[LatencyModel, list[str]]:
    """`model` with its decode formula replaced by `coef` (a, b, c in seconds); a negative
    coefficient (least squares allows them; a step cannot take negative time) is clipped to 0.
    Returns the new model and the names clipped."""
    vals = coefficients(coef)
    if vals is None:
        raise ValueError(f"expected three numbers (a_s, b_s_per_ctx_token, c_s_per_seq), got {coef!r}")
    names = ("decode_a_s", "decode_b_s_per_ctx_token", "decode_c_s_per_seq")
    clipped = [n for n, v in zip(names, vals) if v < 0]
    changes: dict[str, Any] = {n: max(0.0, v) for n, v in zip(names, vals)}
    changes["note"] = f"{model.note}; decode from {who}" if model.note else f"decode from {who}"
    out = replace(model, **changes)
    return out, clipped


# --- Exercise 2 · which layout decodes most smoothly (predict, then simulate) -----------------


def lowest_itl_layout(results: Mapping[str, Any], q: float = 99.0) -> str:
    """The key of `results` (SimResults) with the lowest q-th percentile inter-token latency."""
    return min(results, key=lambda k: results[k].itl_percentile_s(q))


def _itl_examples() -> list[Example]:
    from labkit.plan.simulator import Layout, Limits, simulate
    from labkit.plan.workload import WorkloadShape, sample_requests

    lat = LatencyModel(1e-3, 2e-4, 0.0, 5e-3, 0.0, 1e-4, kv_bytes_per_token=1024)
    req = sample_requests(WorkloadShape("toy", 512, 32), 60, 20.0, seed=0)
    res = {
        "mono": simulate(req, lat, Layout.mono()),
        "mono-chunked": simulate(req, lat, Layout.mono(policy="chunked"), limits=Limits(64, 128)),
        "1P1D": simulate(req, lat, Layout.disagg(1, 1)),
    }
    return [Example(right="1P1D", wrong=["mono", "mono-chunked"], context={"results": res}, label="a toy model")]


@exercise(
    "06",
    2,
    "the layout with the smoothest decode",
    kind="predict-then-measure",
    hint="which layout never runs a prompt between two decode steps of the same device?",
    examples=_itl_examples,
)
def check_lowest_itl(answer: Any, *, results: Mapping[str, Any]) -> CheckResult:
    """The learner's guess (a key of `results`, made before the simulation ran) against the layout
    whose simulated p99 inter-token latency is lowest."""
    if not is_missing(answer) and answer not in results:
        return verdict(
            False, f"❌ {answer!r} is not one of the layouts {sorted(results)}. Hint: {check_lowest_itl.hint}"
        )
    best = lowest_itl_layout(results)
    shown = ", ".join(f"{k} {results[k].itl_percentile_s(99) * 1e3:,.1f} ms" for k in results)
    result = check_choice("layout with the lowest p99 ITL", answer, best, hint=check_lowest_itl.hint)
    if result:
        print(f"   simulated p99 ITL: {shown}")
    return result


# --- Exercise 3 · where the transfer costs as much as the prefill (compute) --------------------


def simulated_transfer_and_prefill_s(
    latency: LatencyModel, link_gbps: float, prompt_tokens: int
) -> tuple[float, float]:
    """(KV transfer, prefill) seconds of one lone request of `prompt_tokens` tokens, from the
    simulator: prefill = its TTFT on one monolithic device; transfer = how much later the first
    token comes on 1P1D over a `link_gbps` link (no fixed cost)."""
    from labkit.links import Link
    from labkit.plan.simulator import Layout, simulate
    from labkit.plan.workload import Requests

    one = Requests(np.array([0.0]), np.array([prompt_tokens]), np.array([2]))
    mono = float(simulate(one, latency.engine_only, Layout.mono()).ttft_s[0])
    split = float(simulate(one, latency.engine_only, Layout.disagg(1, 1), link=Link.from_gbps(link_gbps)).ttft_s[0])
    return split - mono, mono


def _break_even_examples() -> list[Example]:
    from labkit.plan.scaling import Efficiency, ModelShape, datasheet_spec, roofline_latency_model

    lat = roofline_latency_model(
        ModelShape.from_preset("llama-3.1-8b"), datasheet_spec("H100 SXM"), Efficiency(0.46, 0.45)
    )
    right = 8 * lat.kv_bytes_per_token * 4096 / float(lat.prefill_s(4096)) / 1e9
    return [
        Example(
            right=right,
            wrong=[right / 8, right * 1e9, right * 4096, right / 4096],
            context={"latency": lat, "prompt_tokens": 4096},
            label="8B on an H100 (estimate)",
        )
    ]


@exercise(
    "06",
    3,
    "the link that costs a prefill",
    kind="compute",
    hint="KV bytes of the prompt (bytes per token x tokens) x 8 bits / prefill seconds, in Gbit/s (1e9 bit/s)",
    examples=_break_even_examples,
)
def check_break_even_gbps(answer: Any, *, latency: LatencyModel, prompt_tokens: int = 4096) -> CheckResult:
    """The learner's link speed (Gbit/s) at which moving a `prompt_tokens` prompt's KV takes as long
    as prefilling it, checked by the simulator: at that speed one lone request's first token on
    1P1D comes one prefill later than on one monolithic device (within 3%)."""
    name = f"the link where a {prompt_tokens:,}-token prompt's KV moves in one prefill"
    if is_missing(answer):
        return missing(name, check_break_even_gbps.hint)
    try:
        gbps = float(answer)
        transfer, prefill = simulated_transfer_and_prefill_s(latency, gbps, prompt_tokens)
    except (TypeError, ValueError) as e:
        return verdict(
            False, f"❌ {name}: {answer!r} is not a link speed in Gbit/s ({e}). Hint: {check_break_even_gbps.hint}"
        )
    ratio = transfer / prefill
    head = (
        f"{name}: at {gbps:,.4g} Gbit/s the simulator moves the KV in {fmt(transfer, 's')} "
        f"against a {fmt(prefill, 's')} prefill (ratio {ratio:.3g})"
    )
    if 0.97 <= ratio <= 1.03:
        return verdict(True, f"✅ {head}.")
    return verdict(
        False, f"❌ {head}: {'too slow' if ratio > 1 else 'too fast'} a link. Hint: {check_break_even_gbps.hint}"
    )


# --- Exercise 4 · short prompts on a small cluster (multiple choice) ---------------------------

VERDICTS = ("disaggregate", "stay monolithic", "marginal")


def planner_verdict(gain: float) -> str:
    """The planner's verdict for a simulated gain, in the exercise's words (its checklist's rule)."""
    from labkit.plan.checklist import verdict_for_gain

    v = verdict_for_gain(gain)
    return "disaggregate" if v.startswith("DISAGG") else "stay monolithic" if v.startswith("STAY") else "marginal"


def _verdict_examples() -> list[Example]:
    return [
        Example(right="stay monolithic", wrong=["disaggregate", "marginal"], context={"gain": 0.82}),
        Example(right="disaggregate", wrong=["stay monolithic"], context={"gain": 1.4}),
    ]


@exercise(
    "06",
    4,
    "short prompts on a small cluster",
    kind="multiple-choice",
    hint="is there any prefill worth taking off the decode devices, and what does a split cost on 4 devices?",
    examples=_verdict_examples,
)
def check_short_prompt_verdict(answer: Any, *, gain: float) -> CheckResult:
    """The learner's choice among VERDICTS (made before the planner ran) against the verdict the
    planner's simulated `gain` (best disaggregated deployment over mono-dp) gives."""
    if isinstance(answer, str) and answer.strip().lower() not in VERDICTS:
        return verdict(False, f"❌ {answer!r} is not one of {VERDICTS}. Hint: {check_short_prompt_verdict.hint}")
    return check_choice(
        f"the planner's verdict (simulated gain {gain:.2f}x)",
        answer,
        planner_verdict(gain),
        hint=check_short_prompt_verdict.hint,
    )
