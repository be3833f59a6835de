"""Notebook 02's exercises: how many long requests one GPU's memory holds (compute), a KV transfer over
an emulated link (predict, then measure), the link speed at which shipping a 70B model's KV beats
recomputing it on two H100s (compute), and the time the whole KV takes to arrive when each layer
leaves as soon as it is computed (build-it, against an event-by-event model and measured sends)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from labkit.check import CheckResult, check_close, check_ratio, fmt
from labkit.exercises.core import Example, exercise
from labkit.exercises.suite import Case, band_judge, run_suite

# vLLM's default gpu_memory_utilization (its engine arguments' docs): the share of a GPU's memory a
# server takes for weights, activations and KV cache; the rest is left to the CUDA context and others.
MEMORY_UTILIZATION = 0.9


# --- Exercise 1 · requests one GPU holds (compute) ------------------------------------------


def kv_limited_requests(
    model: str = "llama-3.1-8b",
    device: str = "H100 SXM",
    context_tokens: int = 8192,
    memory_utilization: float = MEMORY_UTILIZATION,
) -> int:
    """Requests of `context_tokens` whose bf16 KV fits beside the model's bf16 weights in a share of the
    device's memory, as the planner counts them (`labkit.plan.hetero.kv_limited_seqs`, datasheet memory)."""
    from labkit.plan.hetero import kv_limited_seqs
    from labkit.plan.scaling import ModelShape, datasheet_spec

    shape, spec = ModelShape.from_preset(model, "bfloat16"), datasheet_spec(device)
    return kv_limited_seqs(
        spec.memory_bytes, shape.param_bytes, shape.kv_bytes_per_token, context_tokens, memory_utilization
    )


def _capacity_examples() -> list[Example]:
    from labkit.roofline import ModelShape

    s = ModelShape.from_config("llama-3.1-8b")
    w, kv = s.parameter_bytes("bfloat16"), s.kv_bytes_per_token("bfloat16") * 8192
    return [
        Example(
            right=int((0.9 * 80e9 - w) // kv),
            wrong=[
                int((80e9 - w) // kv),
                int(0.9 * 80e9 // kv),
                int((0.9 * 80e9 - w) // (2 * kv)),
                int((0.9 * 80e9 - w) // (s.kv_bytes_per_token("bfloat16") * 1024)),
            ],
            context={"model": "llama-3.1-8b", "device": "H100 SXM", "context_tokens": 8192},
        )
    ]


@exercise(
    "02",
    1,
    "long requests one GPU holds",
    kind="compute",
    hint="memory x 0.9, less the weights, is what the KV cache gets; divide by one request's KV bytes "
    "(bytes per token x tokens) and round down",
    examples=_capacity_examples,
)
def check_kv_capacity(answer: Any, *, model: str, device: str, context_tokens: int) -> CheckResult:
    """The learner's count of `context_tokens`-token requests whose KV fits on one `device` beside the
    model's weights, against the planner's own count (`labkit.plan.hetero.kv_limited_seqs`, used to cap
    a part's batch), within one request."""
    expected = kv_limited_requests(model, device, context_tokens)
    return check_close(
        f"{context_tokens:,}-token requests of {model} on one {device}",
        answer,
        expected,
        rtol=1.01 / max(expected, 1),
        hint=check_kv_capacity.hint,
    )


# --- Exercise 2 · a transfer over an emulated link (predict, then measure) ------------------

# Measured / line-rate time over the emulated tcp link at 1 Gbit/s: 1.04 for 64 MiB on the committed
# 2-core run; on this shared box (load 7.4-7.7 on 2 cores, 2026-11-30) 1.09-1.11 for 64 MiB, 1.15-1.29
# for 32 MiB, 1.6-2.7 for 16 MiB: a busy machine adds tens of ms per send (wake-ups, framing, the
# receiver's checksum), so the notebook sends 64 MiB. A prediction from the line rate must land in
# [1/1.6, 1.05] of the measurement; bits for bytes or ms for s miss by 8x or 1,000x.
EMULATED_BAND = (1 / 1.6, 1.05)


def _emulated_examples() -> list[Example]:
    from labkit import reference

    ref = reference.transfer()
    row = next((r for r in (ref.emulated if ref else ()) if str(r.get("link", "")).endswith("Gbps")), None)
    if row is None:  # the committed run's row, for a checkout without docs/results
        row = {"nbytes": 67108864, "seconds_median": 0.5569590509994669, "link": "1 Gbps"}
    gbps = float(str(row["link"]).split()[0])
    right = row["nbytes"] * 8 / (gbps * 1e9) * 1e3
    return [
        Example(
            right=right,
            wrong=[right / 8, right * 8, right / 1e3],
            context={"measured_s": row["seconds_median"], "nbytes": row["nbytes"], "gbps": gbps},
            label=f"the committed 2-core CPU, {row['link']}",
        )
    ]


@exercise(
    "02",
    2,
    "a KV transfer over an emulated link",
    kind="predict-then-measure",
    hint="a line rate is in bits per second: bytes x 8 / (Gbit/s x 1e9) seconds, then x 1,000 for ms",
    examples=_emulated_examples,
)
def check_emulated_transfer(answer_ms: Any, *, measured_s: float, nbytes: int, gbps: float) -> CheckResult:
    """The learner's prediction (ms, from the line rate) of sending `nbytes` over the emulated `gbps`
    link, against the median of the sends just measured through the token bucket (EMULATED_BAND:
    emulation only slows a link, and a busy machine adds to each send)."""
    lo, hi = EMULATED_BAND
    return check_ratio(
        f"{nbytes / 1e6:,.1f} MB over an emulated {gbps:g} Gbit/s link",
        answer_ms,
        measured_s * 1e3,
        lo=lo,
        hi=hi,
        what="predicted / measured",
        unit="ms",
        hint=check_emulated_transfer.hint,
    )


# --- Exercise 3 · 70B: ship the KV or recompute it (compute) --------------------------------


def llama_70b_latency_model(*, mfu: float, gpus: int = 2, device: str = "H100 SXM") -> Any:
    """The planner's roofline model (`labkit.plan.scaling.roofline_latency_model`) of a Llama-3.1-70B-shaped
    model in bf16 on `gpus` devices taken as one (summed peaks), prefill at `mfu` of the datasheet peak:
    2 FLOPs per parameter per token plus causal attention. Returns a LatencyModel (`.prefill_s(tokens)`)."""
    from labkit.exercises.nb01 import LLAMA_70B_CONFIG
    from labkit.plan.scaling import Efficiency, HardwareSpec, ModelShape, datasheet_spec, roofline_latency_model
    from labkit.roofline import ModelShape as Shape

    s = Shape.from_config(LLAMA_70B_CONFIG)
    shape = ModelShape(
        "llama-3.1-70b",
        s.parameter_count,
        s.num_layers,
        s.num_heads * s.head_dim,
        s.kv_bytes_per_token("bfloat16"),
        "bfloat16",
    )
    one = datasheet_spec(device, "bfloat16")
    group = HardwareSpec(
        f"{gpus}x {one.name}",
        gpus * one.flops_per_s,
        gpus * one.bandwidth_bytes_per_s,
        gpus * one.memory_bytes,
        one.source,
    )
    return roofline_latency_model(shape, group, Efficiency(mfu_prefill=mfu))


def break_even_gbps(*, mfu: float, gpus: int = 2, prompt_tokens: int = 4096, device: str = "H100 SXM") -> float:
    """Link speed (Gbit/s) at which a `prompt_tokens` prompt's bf16 KV of a Llama-3.1-70B-shaped model
    takes as long to move as to recompute on `gpus` devices at `mfu` of their datasheet bf16 peak, the
    prefill timed by `llama_70b_latency_model` (attention counted, not the 2·N·tokens shortcut)."""
    lat = llama_70b_latency_model(mfu=mfu, gpus=gpus, device=device)
    return prompt_tokens * lat.kv_bytes_per_token * 8 / float(lat.prefill_s(prompt_tokens)) / 1e9


def _break_even_examples() -> list[Example]:
    from labkit.exercises.nb01 import LLAMA_70B_CONFIG
    from labkit.roofline import ModelShape

    s = ModelShape.from_config(LLAMA_70B_CONFIG)
    mfu = 0.47
    tok_s = lambda gpus, m=mfu: m * gpus * 989.4e12 / (2 * s.parameter_count)
    gbps = lambda t: t * s.kv_bytes_per_token("bfloat16") * 8 / 1e9
    return [
        Example(
            right=gbps(tok_s(2)),
            wrong=[gbps(tok_s(1)), gbps(tok_s(2)) / 8, gbps(tok_s(2, 1.0)), gbps(tok_s(8))],
            context={"mfu": mfu, "gpus": 2, "prompt_tokens": 4096},
        )
    ]


@exercise(
    "02",
    3,
    "70B on two H100s: ship the KV or recompute it",
    kind="compute",
    hint="tokens/s = MFU x GPUs x peak FLOP/s / (2 x parameters); Gbit/s = tokens/s x KV bytes per token x 8 / 1e9",
    examples=_break_even_examples,
)
def check_break_even_gbps(answer: Any, *, mfu: float, gpus: int = 2, prompt_tokens: int = 4096) -> CheckResult:
    """The learner's break-even link speed against the planner's roofline prefill time (which also
    counts attention: 4% more work at this length), within 8%."""
    return check_close(
        f"break-even link for a {prompt_tokens:,}-token 70B prompt on {gpus} H100s at MFU {mfu:.0%}",
        answer,
        break_even_gbps(mfu=mfu, gpus=gpus, prompt_tokens=prompt_tokens),
        rtol=0.08,
        unit="Gbit/s",
        hint=check_break_even_gbps.hint,
    )


# --- Exercise 4 · when the last layer arrives (build-it) ------------------------------------

# Measured / predicted arrival of the whole KV, layer by layer: 1.00 over the emulated 1 Gbps link and
# 1.18 over shm on the committed 2-core run (shm's copies compete with the sleeping "prefill" for two
# busy cores); 1.02-1.04 for 32 MiB in 8 layers over the emulated link on this shared box (load 7.4-7.7,
# 2026-11-30), where the KV sent whole after the prefill measured 1.40-1.45x the layer-wise
# prediction. A measurement cannot beat the model by more than timer noise; load can slow it.
LAYERWISE_BAND = (0.93, 1.45)


def _arrival_judge(expected_s: float, band: tuple[float, float]) -> Callable[[Any, Case], tuple[bool, str]]:
    return band_judge(
        lambda got: expected_s / got,
        band,
        lambda got, r: f"predicted {fmt(got, 's')}, measured {fmt(expected_s, 's')} (measured / predicted {r:.2f})",
        below=", the whole KV cannot arrive sooner than your model allows",
        above=", the measurement took much longer: does the model overlap too much?",
    )


def _model_cases() -> Iterator[Case]:
    from labkit.transfer.sizing import layerwise_arrivals

    # (prefill s, transfer s, layers): compute-bound, link-bound, balanced, one layer, the notebook's 70B
    for c, t, n in ((0.8, 0.6, 80), (0.2, 0.6, 8), (0.4, 0.4, 4), (0.3, 0.1, 1), (1.0, 2.5, 32)):
        arrived = layerwise_arrivals([c / n] * n, [t / n] * n)[-1][1]
        yield Case(
            f"prefill {c * 1e3:,.0f} ms, transfer {t * 1e3:,.0f} ms, {n} layer{'s' if n > 1 else ''} (event by event)",
            (c, t, n),
            arrived,
            rtol=1e-6,
            unit="s",
        )


def _measured_cases(rows: Sequence[Mapping[str, Any]], where: str, band: tuple[float, float]) -> Iterator[Case]:
    for r in rows:
        what = r.get("label") or f"{r['nbytes'] / 1e6:,.1f} MB, {r['layers']} layers over {r['link']}"
        yield Case(
            f"{where}: {what}, prefill {r['compute_s'] * 1e3:,.0f} ms, transfer {r['transfer_s'] * 1e3:,.0f} ms",
            (r["compute_s"], r["transfer_s"], r["layers"]),
            r["layerwise_s"],
            judge=_arrival_judge(r["layerwise_s"], band),
        )


def _reference_cases() -> Iterator[Case]:
    from labkit import reference

    ref = reference.transfer()
    if ref is not None:
        yield from _measured_cases(ref.layerwise, "2-core CPU (committed)", LAYERWISE_BAND)


def reference_layerwise_arrival_s(compute_s: float, transfer_s: float, num_layers: int) -> float:
    """The function the learner writes (the tests' right answer, never an expected value)."""
    return max(compute_s, transfer_s) + min(compute_s, transfer_s) / num_layers


def _arrival_examples() -> list[Example]:
    at_end = lambda c, t, n: c + t
    overlap_all = lambda c, t, n: max(c, t)
    last_layer = lambda c, t, n: c + t / n
    per_layer = lambda c, t, n: (c + t) / n
    ms = lambda c, t, n: 1e3 * reference_layerwise_arrival_s(c, t, n)
    measured = [
        {
            "nbytes": 4 << 20,
            "layers": 8,
            "link": "1 Gbps",
            "compute_s": 0.017,
            "transfer_s": 0.034,
            "layerwise_s": 0.037,
        },
        {
            "nbytes": 4 << 20,
            "layers": 8,
            "link": "1 Gbps",
            "compute_s": 0.068,
            "transfer_s": 0.034,
            "layerwise_s": 0.073,
        },
    ]
    return [
        Example(
            right=reference_layerwise_arrival_s,
            wrong=[at_end, overlap_all, last_layer, per_layer, ms],
            label="the event model and the committed runs",
        ),
        Example(
            right=reference_layerwise_arrival_s,
            wrong=[at_end, ms],
            context={"measured": measured},
            label="sends measured on this box",
        ),
    ]


@exercise(
    "02",
    4,
    "when the last layer arrives",
    kind="build-it",
    hint="layer i leaves once it is computed and the link is free; one of the two paths (prefill or link) is "
    "the bottleneck and sets the pace; the other shows only for one layer: max + min / layers",
    examples=_arrival_examples,
)
def check_layerwise_arrival(
    fn: Callable[[float, float, int], float], *, measured: Sequence[Mapping[str, Any]] = ()
) -> CheckResult:
    """Runs the learner's `layerwise_arrival_s(compute_s, transfer_s, num_layers)`.

    Without `measured`: against an event-by-event model of the stream (`labkit.transfer.sizing.
    layerwise_arrivals`, exact) and the committed 2-core run's layer-wise sends (measured /
    predicted within LAYERWISE_BAND). With `measured` (rows of `labkit.transfer.measure.
    layerwise_vs_at_end` on this machine): against those sends.
    """
    if measured:
        cases: Iterator[Case] = _measured_cases(measured, "this machine", LAYERWISE_BAND)
    else:
        cases = (c for gen in (_model_cases(), _reference_cases()) for c in gen)
    return run_suite("layerwise_arrival_s", fn, cases, hint=check_layerwise_arrival.hint)
