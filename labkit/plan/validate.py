"""Check the simulator against measured runs: the same requests, the same arrival times.

A benchmark run (`labkit.bench`) records, per request, when it was sent and its prompt and output
lengths. `requests_from_records` turns that into a trace, the simulator replays it on a layout
with the fitted latency model, and `compare` lines up p50 TTFT, p50 TPOT and output throughput,
predicted against measured, with the relative error.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from labkit.plan.simulator import SimResult
from labkit.plan.workload import Requests

METRICS = ("ttft_p50_ms", "tpot_p50_ms", "output_tok_s")


def requests_from_records(records: Sequence[Any]) -> Requests:
    """The trace a benchmark run sent (ok requests only): send times, prompt and output tokens."""
    ok = sorted((r for r in records if getattr(r, "ok", True)), key=lambda r: r.start_s)
    if not ok:
        raise ValueError("no successful requests in the run: nothing to replay")
    t0 = ok[0].start_s
    out = [max(1, int(r.output_tokens or r.expected_output_tokens)) for r in ok]
    return Requests(np.array([r.start_s - t0 for r in ok], dtype=float),
                    np.array([int(r.prompt_tokens) for r in ok], dtype=np.int64), np.array(out, dtype=np.int64))


def measured_metrics(records: Sequence[Any]) -> dict[str, float]:
    """p50 TTFT (ms), p50 TPOT (ms) and output tokens/s of a run, computed like the simulator's."""
    ok = [r for r in records if getattr(r, "ok", True)]
    if not ok:
        raise ValueError("no successful requests in the run")
    start = min(r.start_s for r in ok)
    end = max(r.start_s + r.e2e_s for r in ok)
    tpot = [(r.e2e_s - r.ttft_s) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0 for r in ok]
    return {"ttft_p50_ms": 1e3 * float(np.median([r.ttft_s for r in ok])),
            "tpot_p50_ms": 1e3 * float(np.median(tpot)),
            "output_tok_s": float(sum(r.output_tokens for r in ok)) / max(end - start, 1e-12)}


def predicted_metrics(res: SimResult) -> dict[str, float]:
    """The same three numbers from a simulation."""
    return {"ttft_p50_ms": 1e3 * float(np.median(res.ttft_s)), "tpot_p50_ms": 1e3 * float(np.median(res.tpot_s)),
            "output_tok_s": float(res.output_tokens.sum()) / max(res.duration_s, 1e-12)}


@dataclass(frozen=True, slots=True)
class ValidationRow:
    mode: str
    rate_rps: float
    metric: str
    predicted: float
    measured: float

    @property
    def error(self) -> float:
        """(predicted - measured) / measured; nan when nothing was measured."""
        return (self.predicted - self.measured) / self.measured if self.measured else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "rate_rps": self.rate_rps, "metric": self.metric, "predicted": self.predicted,
                "measured": self.measured, "error": self.error}


def compare(mode: str, rate_rps: float, predicted: dict[str, float], measured: dict[str, float]) -> list[ValidationRow]:
    """One row per metric."""
    return [ValidationRow(mode, rate_rps, m, predicted[m], measured[m]) for m in METRICS]


def within(rows: Sequence[ValidationRow], tolerance: float = 0.15) -> float:
    """Share of rows whose |error| <= tolerance."""
    errs = [abs(r.error) for r in rows if not math.isnan(r.error)]
    return sum(e <= tolerance for e in errs) / len(errs) if errs else 0.0


def table(rows: Sequence[ValidationRow]) -> str:
    """Predicted against measured, one line per mode, rate and metric."""
    head = f"{'mode':>8} {'rate':>7} {'metric':>12} {'predicted':>11} {'measured':>11} {'error':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.mode:>8} {r.rate_rps:7.3g} {r.metric:>12} {r.predicted:11.4g} {r.measured:11.4g} "
                     f"{r.error:+8.1%}")
    return "\n".join(lines)


def load_rows(path: str | Path) -> list[ValidationRow]:
    """The rows of a validation JSON written by benchmarks/plan_validation.py."""
    doc = json.loads(Path(path).read_text())
    return [ValidationRow(r["mode"], float(r["rate_rps"]), r["metric"], float(r["predicted"]), float(r["measured"]))
            for r in doc["rows"]]


def latest_result(pattern: str = "plan_validation-*.json") -> Path | None:
    """The newest validation JSON under docs/results/, if any."""
    from labkit.config import repo_root

    found = sorted((repo_root() / "docs" / "results").glob(pattern))
    return found[-1] if found else None


def measure_and_compare(model: str, mono_latency: Any, role_latency: Any, *, rates_rps: Sequence[float],
                        n_requests: int, workload: str = "azure-conv-2023", scale: float = 0.25,
                        link: Any = None, slo: Any = None, seed: int = 0, progress: bool = True,
                        modes: Sequence[str] = ("mono", "1p1d"), probe_requests: int = 4,
                        serving: dict[str, tuple[float, float, float]] | None = None,
                        fitted: dict[str, Any] | None = None) -> list[ValidationRow]:
    """Runs the lab's servers (each of `modes`: "mono", "1p1d") at each rate with the benchmark
    client, replays every run's trace in the simulator, and returns predicted-vs-measured rows.

    `mono_latency` models the mono worker (all cores); `role_latency` each 1P1D worker (one core).
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
    from labkit.bench.sweep import SweepConfig, lab_server_factory, run_sweeps, sequential_records
    from labkit.plan.calibrate import fit_server_steps, read_step_log, serving_overhead
    from labkit.plan.simulator import Layout, Limits, Link, simulate

    cfg = SweepConfig(workload, rates_rps=tuple(rates_rps), modes=tuple(modes), n_requests=n_requests,
                      seed=seed, slo=slo or BenchSLO(), scale=scale, progress=progress)
    lk = link or Link(20.0, 1e-3)
    engine_model = {"mono": mono_latency, "1p1d": role_latency}
    served: dict[str, Any] = dict(engine_model)
    overheads = serving if serving is not None else {}
    refits = fitted if fitted is not None else {}
    tmp = tempfile.TemporaryDirectory(prefix="plan-steps-")
    step_logs = Path(tmp.name)

    limits = Limits(max_num_seqs=64, max_num_batched_tokens=2048)   # the lab workers' defaults
    layouts = {"mono": (Layout.mono(), None, "adopted"),
               # the lab's router forwards the prefill worker's first token: TTFT ends when the KV has left
               "1p1d": (Layout.disagg(1, 1), lk, "landed")}

    def probe(spec: Any, url: str) -> None:
        if probe_requests < 1:
            return
        one = sequential_records(url, cfg.workload_obj, probe_requests, mode=spec.name, seed=seed + 77, scale=scale,
                                 model=model, concurrency=1)
        layout, link_, first = layouts[spec.name]
        refits[spec.name] = fit_server_steps(engine_model[spec.name], read_step_log(step_logs / f"{spec.name}.jsonl"))
        overheads[spec.name] = serving_overhead(refits[spec.name], one, layout=layout, link=link_, limits=limits,
                                                first_token_at=first)
        served[spec.name] = refits[spec.name].with_serving(*overheads[spec.name])

    with tmp:  # the step logs are read by the probes, then dropped
        [res] = run_sweeps([cfg], lab_server_factory(model, step_log_dir=step_logs), model=model, on_server=probe)
    rows: list[ValidationRow] = []
    for (mode, rate), run in sorted(res.runs.items(), key=lambda kv: (kv[0][0] != "mono", kv[0][1])):
        layout, link_, first = layouts[mode]
        sim = simulate(requests_from_records(run.records), served[mode], layout, link=link_, limits=limits,
                       first_token_at=first)
        rows += compare(mode, rate, predicted_metrics(sim), measured_metrics(run.records))
    return rows
