"""Check the simulator against measured runs: the same requests, the same arrival times.

A benchmark run (`labkit.bench`) records, per request, when it was sent, its prompt and output
lengths, TTFT, end-to-end time and every inter-token gap. `requests_from_records` turns that into
a trace, the simulator replays it on the mode's layout with the fitted latency model, and
`compare` lines up p50 and p99 of TTFT, TPOT and ITL and output throughput, predicted against
measured, with the relative error. `report_card` scores them against the targets
(`labkit.plan.card`: p50 within 10%, p99 within 20%).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from labkit.plan.card import METRICS, MODES, ReportCard, ValidationRow
from labkit.plan.card import report_card as _card
from labkit.plan.simulator import SimResult
from labkit.plan.workload import requests_from_records

__all__ = [
    "METRICS",
    "MODES",
    "ReportCard",
    "ValidationRow",
    "check_same_run",
    "compare",
    "latest_result",
    "load_rows",
    "measure_and_compare",
    "measure_and_compare_vllm",
    "measured_metrics",
    "merge_results",
    "mode_layout",
    "mode_limits",
    "predicted_metrics",
    "replay_runs",
    "report_card",
    "requests_from_records",
    "rows_of",
    "served_model",
    "server_mode",
    "table",
    "vllm_config",
    "within",
]


def measured_metrics(records: Sequence[Any]) -> dict[str, float]:
    """p50/p99 TTFT, TPOT and ITL (ms) and output tokens/s of a run, computed like the simulator's.
    Runs whose records carry no inter-token gaps have no ITL figures."""
    ok = [r for r in records if getattr(r, "ok", True)]
    if not ok:
        raise ValueError("no successful requests in the run")
    start = min(r.start_s for r in ok)
    end = max(r.start_s + r.e2e_s for r in ok)
    ttft = np.array([r.ttft_s for r in ok])
    tpot = np.array([(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0 for r in ok])
    out = {
        "ttft_p50_ms": 1e3 * float(np.percentile(ttft, 50)),
        "ttft_p99_ms": 1e3 * float(np.percentile(ttft, 99)),
        "tpot_p50_ms": 1e3 * float(np.percentile(tpot, 50)),
        "tpot_p99_ms": 1e3 * float(np.percentile(tpot, 99)),
        "output_tok_s": float(sum(r.output_tokens for r in ok)) / max(end - start, 1e-12),
    }
    gaps = [g for r in ok for g in (getattr(r, "itl_s", None) or [])]
    if gaps:
        out["itl_p50_ms"] = 1e3 * float(np.percentile(gaps, 50))
        out["itl_p99_ms"] = 1e3 * float(np.percentile(gaps, 99))
    return out


def predicted_metrics(res: SimResult) -> dict[str, float]:
    """The same figures from a simulation."""
    return {
        "ttft_p50_ms": 1e3 * float(np.percentile(res.ttft_s, 50)),
        "ttft_p99_ms": 1e3 * float(np.percentile(res.ttft_s, 99)),
        "tpot_p50_ms": 1e3 * float(np.percentile(res.tpot_s, 50)),
        "tpot_p99_ms": 1e3 * float(np.percentile(res.tpot_s, 99)),
        "itl_p50_ms": 1e3 * res.itl_percentile_s(50),
        "itl_p99_ms": 1e3 * res.itl_percentile_s(99),
        "output_tok_s": float(res.output_tokens.sum()) / max(res.duration_s, 1e-12),
    }


def compare(mode: str, rate_rps: float, predicted: dict[str, float], measured: dict[str, float]) -> list[ValidationRow]:
    """One row per metric both sides have, in METRICS order."""
    return [
        ValidationRow(mode, rate_rps, m, predicted[m], measured[m]) for m in METRICS if m in predicted and m in measured
    ]


def within(rows: Sequence[ValidationRow], tolerance: float = 0.15) -> float:
    """Share of rows whose |error| <= tolerance."""
    errs = [abs(r.error) for r in rows if not math.isnan(r.error)]
    return sum(e <= tolerance for e in errs) / len(errs) if errs else 0.0


def table(rows: Sequence[ValidationRow]) -> str:
    """Predicted against measured, one line per mode, rate and metric."""
    head = f"{'mode':>14} {'rate':>7} {'metric':>12} {'predicted':>11} {'measured':>11} {'error':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.mode:>14} {r.rate_rps:7.3g} {r.metric:>12} {r.predicted:11.4g} {r.measured:11.4g} {r.error:+8.1%}"
        )
    return "\n".join(lines)


def load_rows(path: str | Path) -> list[ValidationRow]:
    """The rows of a validation JSON written by benchmarks/plan_validation.py."""
    return rows_of(json.loads(Path(path).read_text()))


def rows_of(doc: dict[str, Any]) -> list[ValidationRow]:
    """The rows of a validation document (the JSON benchmarks/plan_validation.py writes, parsed)."""
    return [
        ValidationRow(r["mode"], float(r["rate_rps"]), r["metric"], float(r["predicted"]), float(r["measured"]))
        for r in doc["rows"]
    ]


# What must agree for two validation runs to share one card: the same requests on the same model.
SAME_RUN_KEYS = ("model", "machine", "workload", "length_scale", "rates_rps", "requests_per_rate")
# The fields kept per mode ({mode: ...}), merged mode by mode.
PER_MODE_KEYS = (
    "latency_model",
    "calibration",
    "latency_model_in_server",
    "serving_overhead_s",
    "kv_link_measured",
)


def check_same_run(old: dict[str, Any], new: dict[str, Any]) -> None:
    """ValueError naming what differs when two validation documents (or `new`'s keys alone, before
    its run) did not send the same requests to the same model (`SAME_RUN_KEYS`)."""
    differ = [k for k in SAME_RUN_KEYS if old.get(k) != new.get(k)]
    if differ:
        raise ValueError(
            "these runs cannot share a card, they differ in "
            + ", ".join(f"{k} ({old.get(k)!r} vs {new.get(k)!r})" for k in differ)
        )


def merge_results(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """`old`'s validation document with `new`'s modes added (a mode in both: `new`'s run replaces
    `old`'s), the card recomputed from every row, and `new`'s date and seconds listed under "added".
    ValueError when the two did not send the same requests to the same model (`SAME_RUN_KEYS`)."""
    check_same_run(old, new)
    added = list(new["modes"])
    out = dict(old)
    out["modes"] = [m for m in old["modes"] if m not in added] + added
    for k in PER_MODE_KEYS:
        out[k] = {**{m: v for m, v in old.get(k, {}).items() if m not in added}, **new.get(k, {})}
    out["rows"] = [r for r in old["rows"] if r["mode"] not in added] + list(new["rows"])
    out["report_card"] = _card(rows_of(out)).to_dict()
    out["added"] = [*old.get("added", []), {"modes": added, "date": new.get("date"), "seconds": new.get("seconds")}]
    return out


def report_card(source: str | Path | Sequence[ValidationRow] | None = None) -> ReportCard:
    """The report card of a validation JSON (default: the newest under docs/results/) or of rows.
    Old files (p50s only) give a card that names the figures they lack."""
    if source is None:
        source = latest_result()
        if source is None:
            raise FileNotFoundError("no plan_validation-*.json under docs/results/: run benchmarks/plan_validation.py")
    if isinstance(source, (str, Path)):
        return _card(load_rows(source), Path(source).name)
    return _card(list(source))


def latest_result(pattern: str = "plan_validation-*.json") -> Path | None:
    """The newest validation JSON under docs/results/, if any (quick smoke runs, `-quick`, left out)."""
    from labkit.config import repo_root

    found = sorted(p for p in (repo_root() / "docs" / "results").glob(pattern) if not p.stem.endswith("-quick"))
    return found[-1] if found else None


def served_model(mode: str = "1p1d", model: str = "small", path: str | Path | None = None) -> tuple[Any, Path]:
    """The latency model a validation run fitted to the lab's servers on this machine: the engine model
    moved to the steps mode `mode`'s server ran, plus that server's costs per request and per step
    (benchmarks/plan_validation.py writes both). `path`: that JSON (default: the newest under
    docs/results/ for `model` that has `mode`). Returns (LatencyModel, the file it came from);
    FileNotFoundError when no such run was committed."""
    from labkit.config import repo_root
    from labkit.plan.latency_model import LatencyModel

    files = (
        [Path(path)]
        if path
        else sorted(
            (
                p
                for p in (repo_root() / "docs" / "results").glob("plan_validation-*.json")
                if not p.stem.endswith("-quick")
            ),
            reverse=True,
        )
    )
    for f in files:
        doc = json.loads(f.read_text())
        fitted, costs = doc.get("latency_model_in_server", {}), doc.get("serving_overhead_s", {})
        if doc.get("model") == model and mode in fitted and mode in costs:
            c = costs[mode]
            lat = LatencyModel.from_dict(fitted[mode]).with_serving(
                c["per_request"], c["per_decode_step"], c.get("per_sequence_per_step", 0.0)
            )
            return lat, f
    raise FileNotFoundError(
        f"no plan_validation JSON for {model} with a fitted {mode} server under docs/results/: "
        f"run benchmarks/plan_validation.py"
    )


def mode_layout(
    mode: str, *, link: Any = None, replicas: int = 2, prefill_threshold: int = 0
) -> tuple[Any, Any, Literal["adopted", "landed"]]:
    """How the simulator models a lab serving mode (`labkit.bench.sweep.parse_mode`'s names): (Layout,
    the KV link or None, when the client sees the first token). "mono" and "mono-chunked[-N]" (one
    engine), "mono-dp" (`replicas` engines behind one router, each request to the least loaded, as the
    lab's router sends it), "XpYd" (e.g. "1p1d": the lab's router forwards the prefill worker's first
    token, so TTFT ends when the KV has left), "XpYd-selective-N" (threshold N tokens) or
    "1p1d-selective" with `prefill_threshold`. vLLM's servers behind the lab's router: "vllm-mono"
    (its V1 engine always chunks prefills) and "vllm-pd" (1P1D over NIXL; its proxy streams every
    token from the decode server, so TTFT ends when the decode server adopts the KV)."""
    from labkit.bench.sweep import parse_mode
    from labkit.plan.simulator import Layout

    m = server_mode(mode, prefill_threshold)  # "1p1d-selective": the threshold given apart
    if m == "vllm-mono":
        return Layout.mono(1, "chunked"), None, "adopted"
    if m == "vllm-pd":
        return Layout.disagg(1, 1), link, "adopted"
    try:
        spec = parse_mode(m, devices=replicas if m == "mono-dp" else None)
    except ValueError as e:
        raise ValueError(f"no simulator layout for mode {mode!r}: {e}") from None
    if spec.mode == "mono":
        return Layout.mono(spec.replicas, "chunked" if spec.chunked_prefill else "prefill_first"), None, "adopted"
    return Layout.disagg(spec.prefill, spec.decode, spec.prefill_threshold), link, "landed"


def server_mode(mode: str, prefill_threshold: int = 0) -> str:
    """The name the lab's servers run `mode` under: "1p1d-selective" takes its threshold into its name
    ("1p1d-selective-256"); every other name stays. ValueError for a selective mode without one."""
    m = mode.strip().lower()
    if m != "1p1d-selective":
        return m
    if prefill_threshold < 1:
        raise ValueError("mode 1p1d-selective needs prefill_threshold >= 1 token")
    return f"{m}-{prefill_threshold}"


# vLLM's modes on the card, and the names the sweep runs them under (`labkit.vllm.bench.VLLM_LABELS`)
VLLM_SWEEP_NAMES = {"vllm-mono": "mono", "vllm-pd": "1p1d"}


def mode_limits(mode: str) -> Any:
    """The scheduler limits the lab's workers run a mode with (`lab_server_factory`'s): 64 sequences, and
    2,048 tokens a step, or the chunk of a chunked mode. vLLM's servers are started with the same
    two (`vllm_config`)."""
    from labkit.bench.sweep import DEFAULT_CHUNK_TOKENS, parse_mode
    from labkit.engine.config import EngineConfig
    from labkit.plan.simulator import Limits

    spec = parse_mode(VLLM_SWEEP_NAMES.get(mode, mode))
    chunk = (spec.chunk_tokens or DEFAULT_CHUNK_TOKENS) if spec.chunked_prefill else None
    engine = EngineConfig()  # the workers' defaults
    return Limits(max_num_seqs=engine.max_num_seqs, max_num_batched_tokens=chunk or engine.max_num_batched_tokens)


def measure_and_compare(
    model: str,
    mono_latency: Any,
    role_latency: Any,
    *,
    rates_rps: Sequence[float],
    n_requests: int,
    workload: str = "azure-conv-2023",
    scale: float = 0.25,
    link: Any = None,
    slo: Any = None,
    seed: int = 0,
    progress: bool = True,
    modes: Sequence[str] = ("mono", "1p1d"),
    probe_requests: int = 4,
    serving: dict[str, tuple[float, float, float]] | None = None,
    fitted: dict[str, Any] | None = None,
    prefill_threshold: int = 0,
) -> list[ValidationRow]:
    """Runs the lab's servers (each of `modes`, see `mode_layout`) at each rate with the benchmark
    client, replays every run's trace in the simulator, and returns predicted-vs-measured rows.

    `mono_latency` models the one engine of mono (all cores); `role_latency` every engine that has a
    core of its own (each 1P1D worker, each mono-dp replica).
    Before the measured runs, `probe_requests` requests go through each server one at a time while
    its workers log every step (`--step-log`); the engine model is moved to the steps they ran
    (`fit_server_steps`: the engine inside a server is slower than alone), then what remains (per
    request, per step) is fitted so the simulator reproduces the probe (`serving_overhead`).
    `serving` receives those costs per mode (per request, per step, per sequence: 0), `fitted` the
    moved LatencyModel per mode.
    probe_requests=0 simulates the engine alone. Nothing from the measured runs enters the model.
    """
    import tempfile

    from labkit.bench import SLO as BenchSLO
    from labkit.bench.sweep import (
        SweepConfig,
        lab_server_factory,
        run_sweeps,
        sequential_records,
    )
    from labkit.links import Link
    from labkit.plan.calibrate import fit_server_steps, read_step_log, serving_overhead

    modes = tuple(server_mode(m, prefill_threshold) for m in modes)  # the rows carry these names
    cfg = SweepConfig(
        workload,
        rates_rps=tuple(rates_rps),
        modes=modes,
        n_requests=n_requests,
        seed=seed,
        slo=slo or BenchSLO(),
        scale=scale,
        progress=progress,
    )
    lk = link or Link.from_gbps(20.0, 1e-3)
    layouts = {m: mode_layout(m, link=lk, prefill_threshold=prefill_threshold) for m in modes}
    engine_model = {
        m: mono_latency if lay.kind == "mono" and lay.num_replicas == 1 else role_latency
        for m, (lay, _, _) in layouts.items()
    }
    served: dict[str, Any] = dict(engine_model)
    overheads = serving if serving is not None else {}
    refits = fitted if fitted is not None else {}
    tmp = tempfile.TemporaryDirectory(prefix="plan-steps-")
    step_logs = Path(tmp.name)

    limits = {m: mode_limits(m) for m in modes}  # the lab workers' (a chunked mode's step budget: its chunk)

    def probe(spec: Any, url: str) -> None:
        if probe_requests < 1:
            return
        one = sequential_records(
            url,
            cfg.workload_obj,
            probe_requests,
            mode=spec.name,
            seed=seed + 77,
            scale=scale,
            model=model,
            concurrency=1,
        )
        layout, link_, first = layouts[spec.name]
        refits[spec.name] = fit_server_steps(engine_model[spec.name], read_step_log(step_logs / f"{spec.name}.jsonl"))
        overheads[spec.name] = serving_overhead(
            refits[spec.name], one, layout=layout, link=link_, limits=limits[spec.name], first_token_at=first
        )
        served[spec.name] = refits[spec.name].with_serving(*overheads[spec.name])

    with tmp:  # the step logs are read by the probes, then dropped
        [res] = run_sweeps([cfg], lab_server_factory(model, step_log_dir=step_logs), model=model, on_server=probe)
    return replay_runs(res.runs, modes, served, layouts, limits)


def replay_runs(
    runs: dict[tuple[str, float], Any],
    modes: Sequence[str],
    served: dict[str, Any],
    layouts: dict[str, tuple[Any, Any, Literal["adopted", "landed"]]],
    limits: dict[str, Any],
) -> list[ValidationRow]:
    """Every measured run (keyed by (mode, rate)) replayed in the simulator with its mode's model,
    layout and limits: predicted-vs-measured rows, in the order of `modes`, then by rate."""
    from labkit.plan.simulator import simulate

    order = {m: i for i, m in enumerate(modes)}
    rows: list[ValidationRow] = []
    for (mode, rate), run in sorted(runs.items(), key=lambda kv: (order.get(kv[0][0], 0), kv[0][1])):
        layout, link_, first = layouts[mode]
        sim = simulate(
            requests_from_records(run.records),
            served[mode],
            layout,
            link=link_,
            limits=limits[mode],
            first_token_at=first,
        )
        rows += compare(mode, rate, predicted_metrics(sim), measured_metrics(run.records))
    return rows


def vllm_config(model: str, mode: str = "vllm-pd") -> Any:
    """The vLLM server a validation starts for `model`: the lab workers' scheduler limits
    (`mode_limits`), the preset's whole context, float32 on the CPU like the lab's engine."""
    from labkit.models import get_preset
    from labkit.vllm.launch import VllmServerConfig

    lim = mode_limits(mode)
    return VllmServerConfig(
        model=model,
        max_model_len=get_preset(model).max_position_embeddings,
        max_num_seqs=lim.max_num_seqs,
        max_num_batched_tokens=lim.max_num_batched_tokens,
    )


def measure_and_compare_vllm(
    model: str,
    *,
    rates_rps: Sequence[float],
    n_requests: int,
    workload: str = "azure-conv-2023",
    scale: float = 0.25,
    slo: Any = None,
    seed: int = 0,
    progress: bool = True,
    modes: Sequence[str] = ("vllm-pd",),
    probe_requests: int = 8,
    fitted: dict[str, Any] | None = None,
    serving: dict[str, tuple[float, float, float]] | None = None,
    links: dict[str, Any] | None = None,
    factory: Any = None,
    servers: dict[str, list[Any]] | None = None,
) -> list[ValidationRow]:
    """vLLM's servers ("vllm-mono", "vllm-pd": NixlConnector) behind the lab's router, run at each
    rate with the benchmark client and replayed in the simulator, like `measure_and_compare`.

    vLLM writes no step log, so its model comes from outside. Before the measured runs,
    `probe_requests` requests go through the server one at a time and as many again all together.
    For P/D, the KV link is the one NIXL achieved in the first probe (bytes over transfer seconds
    on the decode server). The prefill and batch-1 decode formulas are fitted to the one-at-a-time
    requests (`fit_from_requests`), how a decode step grows with the batch to the requests sent
    together (`serving_overhead`). Nothing from the measured runs enters the model.
    `fitted` receives each mode's fitted model, `serving` its costs per request, per step and per
    sequence (as `measure_and_compare`'s), `links` each P/D mode's link. `factory`: a ServerFactory for
    servers already running ("mono", "1p1d"), with `servers` naming them by mode (the NIXL totals come
    from the last, the decode server); default: start them here (`vllm_config`) and stop them after.
    """
    from labkit.bench import SLO as BenchSLO
    from labkit.bench.sweep import SweepConfig, run_sweeps, sequential_records
    from labkit.links import Link
    from labkit.plan.calibrate import fit_from_requests, model_kv_bytes_per_token, serving_overhead
    from labkit.vllm.bench import vllm_server_factory
    from labkit.vllm.metrics import read_nixl

    modes = tuple(m.strip().lower() for m in modes)
    bad = [m for m in modes if m not in VLLM_SWEEP_NAMES]
    if bad:
        raise ValueError(f"not a vLLM mode: {bad}; the card's vLLM modes are {sorted(VLLM_SWEEP_NAMES)}")
    if probe_requests < 3:
        raise ValueError(f"probe_requests must be >= 3 (3 prompt lengths fit the prefill), got {probe_requests}")
    cfg = SweepConfig(
        workload,
        rates_rps=tuple(rates_rps),
        modes=tuple(VLLM_SWEEP_NAMES[m] for m in modes),
        n_requests=n_requests,
        seed=seed,
        slo=slo or BenchSLO(),
        scale=scale,
        progress=progress,
    )
    base = vllm_config(model, modes[0])
    running = servers if servers is not None else {}
    start = factory or vllm_server_factory(base, progress=progress, started=running)
    layouts: dict[str, tuple[Any, Any, Literal["adopted", "landed"]]] = {}
    limits = {m: mode_limits(m) for m in modes}
    served: dict[str, Any] = {}
    refits = fitted if fitted is not None else {}
    overheads = serving if serving is not None else {}
    achieved = links if links is not None else {}
    kv_per_token = model_kv_bytes_per_token(model, base.dtype)
    label = {VLLM_SWEEP_NAMES[m]: m for m in modes}

    def probe(spec: Any, url: str) -> None:
        mode = label[spec.name]
        decode_url = running[mode][-1].url if mode == "vllm-pd" else None
        before = read_nixl(decode_url) if decode_url else None
        kw = {"mode": mode, "seed": seed + 77, "scale": scale, "model": base.name()}
        one = sequential_records(url, cfg.workload_obj, probe_requests, concurrency=1, **kw)
        link = None
        if decode_url and before is not None:  # P/D: the link NIXL achieved in this probe
            moved = read_nixl(decode_url) - before
            if not (moved.transfers > 0 and moved.xfer_time_s > 0 and moved.bytes_transferred > 0):
                raise RuntimeError(f"{mode}: the probe's requests moved no KV over NIXL ({moved})")
            link = Link(moved.bytes_transferred / moved.xfer_time_s, 0.0, "NIXL (measured)", "measured")
            achieved[mode] = link
        lay = mode_layout(mode, link=link or Link.unshaped())
        layouts[mode] = lay
        together = sequential_records(
            url, cfg.workload_obj, probe_requests, concurrency=probe_requests, **{**kw, "seed": seed + 78}
        )
        refits[mode] = fit_from_requests(
            one,
            kv_bytes_per_token=kv_per_token,
            link=link,
            model=model,
            device="cpu",
            note=f"{mode}: fitted from {len(one)} requests sent one at a time",
        )
        overheads[mode] = serving_overhead(
            refits[mode], one, together, layout=lay[0], link=lay[1], limits=limits[mode], first_token_at=lay[2]
        )
        served[mode] = refits[mode].with_serving(*overheads[mode])

    [res] = run_sweeps([cfg], start, model=base.name(), on_server=probe)
    runs = {(label[m], rate): run for (m, rate), run in res.runs.items()}
    return replay_runs(runs, modes, served, layouts, limits)
