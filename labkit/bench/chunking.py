"""Chunked prefill as a trade-off: the interference experiment per chunk size, with the engine's step log.

    spec = ServerSpec("tiny")
    mono = run_experiment(spec, scenario)                       # one long prefill among the decodes
    runs = sweep_chunk_sizes(spec, scenario, [128, 256], done=[mono])   # + one run per chunk size, + 1P1D
    rows = tradeoff_rows(runs)        # long-prompt TTFT against p99 ITL and the worst stall, Pareto front marked

Every mono run's worker writes its `--step-log` (one JSON line per engine step), so a run says
what the engine did (`long_prompt_steps`: the steps that computed the long prompt) beside what
the client saw (`labkit.bench.interference`). `plan_long_prompt` runs a step-budget function
(the engine's decision, or a learner's) step after step over the same prompt, to compare a
prediction with the log. Notebook 03 draws the results with `labkit.plots.serving`.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from labkit.bench.interference import InterferenceResult, InterferenceScenario, run_interference

# A step-budget function: (running decodes, tokens left of each waiting prompt in arrival order,
# token budget) -> tokens of each prompt that join the step, in arrival order.
StepBudget = Callable[[int, Sequence[int], int], Sequence[int]]


@dataclass(frozen=True)
class ServerSpec:
    """How the experiment's servers run: model, dtype, devices and extra engine settings.

    gpus None: on the CPU, each role pinned as `default_cpu_split` says; a list (e.g. `visible_gpus()`):
    the launcher places the workers on those GPUs. settings: WorkerConfig settings by flag name.
    """

    model: str = "tiny"
    dtype: str | None = None
    gpus: tuple[int, ...] | None = None
    kv_cache_bytes: int | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)

    def launch(self, mode: str = "mono", *, chunk_tokens: int | None = None, step_log: str | Path | None = None) -> Any:
        """Starts `mode` ("mono", "mono-chunked" with `chunk_tokens` per step, or "1p1d"); returns the Server."""
        from labkit.serve.launcher import default_cpu_split, launch

        if mode not in MODES:
            raise ValueError(f"mode {mode!r} not one of {MODES}")
        if (mode == "mono-chunked") != (chunk_tokens is not None):
            raise ValueError(
                f"chunk_tokens goes with mode 'mono-chunked' only (mode {mode!r}, chunk_tokens {chunk_tokens!r})"
            )
        if chunk_tokens is not None and chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
        cpus = default_cpu_split() if self.gpus is None else {"mono": None, "prefill": None, "decode": None}
        gpus = list(self.gpus) if self.gpus is not None else None
        common: dict[str, Any] = {
            "model": self.model,
            "dtype": self.dtype,
            "gpus": gpus,
            "kv_cache_bytes": self.kv_cache_bytes,
            "step_log": str(step_log) if step_log else None,
            **self.settings,
        }
        if mode == "1p1d":
            return launch("disagg", prefill_cpus=cpus["prefill"], decode_cpus=cpus["decode"], **common)
        return launch(
            "mono",
            mono_cpus=cpus["mono"],
            chunked_prefill=chunk_tokens is not None,
            max_num_batched_tokens=chunk_tokens,
            **common,
        )


MODES = ("mono", "mono-chunked", "1p1d")


@dataclass
class Run:
    """One interference run: what the client saw, and the engine's steps (mono modes; [] for 1P1D)."""

    mode: str
    chunk_tokens: int | None
    result: InterferenceResult
    steps: list[dict[str, Any]]

    @property
    def label(self) -> str:
        return self.result.label

    @property
    def long_steps(self) -> list[dict[str, Any]]:
        """The engine steps that computed the long prompt (see `long_prompt_steps`)."""
        return long_prompt_steps(self.steps)

    def point(self) -> dict[str, Any]:
        """The run as one point of the trade-off: long-prompt TTFT, p99 and mean decode ITL, worst stall (ms)."""
        st = self.result.stats()
        return {
            "label": self.label,
            "mode": self.mode,
            "chunk_tokens": self.chunk_tokens,
            "long_ttft_ms": st["long_ttft_ms"],
            "itl_p99_ms": itl_percentile_ms(self.result, 99),
            "decode_itl_mean_ms": st["decode_itl_mean_ms"],
            "stall_max_ms": st["decode_stall_max_ms"],
            "prefill_steps": len(self.long_steps) if self.steps else None,
        }


def label_for(mode: str, chunk_tokens: int | None) -> str:
    """ "mono", "mono-chunked 256", "1p1d": how runs are named in tables and charts."""
    return f"{mode} {chunk_tokens}" if chunk_tokens is not None else mode


def run_experiment(
    spec: ServerSpec,
    scenario: InterferenceScenario,
    *,
    mode: str = "mono",
    chunk_tokens: int | None = None,
    log_dir: str | Path | None = None,
    on_server: Callable[[Any], None] | None = None,
) -> Run:
    """Starts the server, runs the interference experiment once, stops the server; returns the Run.

    Mono workers log their steps to `<log_dir>/<label>.jsonl` (a temporary directory by default).
    `on_server(server)`: called once the server is up (e.g. to print where it runs). The server is
    stopped by PID even when the run fails.
    """
    label = label_for(mode, chunk_tokens)
    log = Path(log_dir or tempfile.mkdtemp(prefix="labkit-steps-")) / f"{label.replace(' ', '-')}.jsonl"
    log.unlink(missing_ok=True)
    srv = spec.launch(mode, chunk_tokens=chunk_tokens, step_log=log if mode != "1p1d" else None)
    try:
        if on_server is not None:
            on_server(srv)
        result = run_interference(srv.url, scenario, label=label, model=spec.model)
    finally:
        srv.stop()
    return Run(mode, chunk_tokens, result, read_steps(log) if mode != "1p1d" else [])


def sweep_chunk_sizes(
    spec: ServerSpec,
    scenario: InterferenceScenario,
    chunk_sizes: Sequence[int],
    *,
    done: Sequence[Run] = (),
    include_1p1d: bool = True,
    log_dir: str | Path | None = None,
    progress: bool = True,
) -> list[Run]:
    """The experiment once per chunk size (mode "mono-chunked"), and once on 1P1D; returns every run,
    `done` first (runs already made with the same scenario's sizes are not repeated).

    Each new run gets its own prompt variant, so no run hits another's prefix cache. One server at a
    time; a progress bar counts the runs.
    """
    have = {(r.mode, r.chunk_tokens) for r in done}
    todo: list[tuple[str, int | None]] = [
        ("mono-chunked", c) for c in sorted(set(chunk_sizes)) if ("mono-chunked", c) not in have
    ]
    if include_1p1d and ("1p1d", None) not in have:
        todo.append(("1p1d", None))
    runs = list(done)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="chunk-size sweep")
    base = max([r.result.scenario.variant for r in done] + [scenario.variant])
    try:
        for i, (mode, chunk) in enumerate(todo, start=1):
            if bar is not None:
                bar.set_postfix_str(label_for(mode, chunk))
            runs.append(
                run_experiment(
                    spec, replace(scenario, variant=base + i), mode=mode, chunk_tokens=chunk, log_dir=log_dir
                )
            )
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return runs


def read_steps(path: str | Path) -> list[dict[str, Any]]:
    """The JSON lines of a worker's `--step-log` file ([] when it was never written)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def long_prompt_steps(steps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The steps that computed the last prompt to arrive: the last unbroken run of steps with prompt
    tokens in a step log (the interference experiment sends its long prompt last, after the decodes'
    short prompts are done). [] when no step computed prompt tokens."""
    end = max((i for i, s in enumerate(steps) if s["prefill_tokens"] > 0), default=None)
    if end is None:
        return []
    start = end
    while start > 0 and steps[start - 1]["prefill_tokens"] > 0:
        start -= 1
    return [dict(s) for s in steps[start : end + 1]]


def plan_long_prompt(
    step_budget: StepBudget, num_decodes: int, prompt_tokens: int, budget: int, max_steps: int = 100_000
) -> list[int]:
    """Tokens of a `prompt_tokens` prompt that each step computes while `num_decodes` requests decode,
    as `step_budget` decides step after step; returns one chunk size per step.

    Raises ValueError when a step gives the prompt nothing, or more than it has left, or when the
    prompt is not done after `max_steps` steps (a budget function that never finishes it).
    """
    if prompt_tokens < 1 or budget < 1 or num_decodes < 0:
        raise ValueError(
            f"need prompt_tokens >= 1, budget >= 1, num_decodes >= 0; got {prompt_tokens}, {budget}, {num_decodes}"
        )
    left = prompt_tokens
    chunks: list[int] = []
    while left > 0:
        if len(chunks) >= max_steps:
            raise ValueError(f"the prompt is not done after {max_steps} steps")
        got = list(step_budget(num_decodes, [left], budget))
        n = int(got[0]) if got else 0
        if not 0 < n <= left:
            raise ValueError(
                f"step {len(chunks) + 1} gave the prompt {n} tokens with {left} left "
                f"({num_decodes} decodes, budget {budget}): it would never finish"
            )
        chunks.append(n)
        left -= n
    return chunks


def itl_percentile_ms(result: InterferenceResult, q: float) -> float:
    """The q-th percentile (0-100, linear interpolation) of every decode inter-token gap of a run, ms."""
    import numpy as np

    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    gaps = [g for _, g, _ in result.decode_gaps()]
    return float(1e3 * np.percentile(gaps, q)) if gaps else math.nan


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For each (x, y) point, whether no other point is at least as low on both and lower on one."""
    out = []
    for i, (x, y) in enumerate(points):
        dominated = any(j != i and x2 <= x and y2 <= y and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points))
        out.append(not dominated)
    return out


def tradeoff_rows(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per run (`Run.point()`), mono-chunked by chunk size, with `pareto` (on the lower-left front
    of long-prompt TTFT and p99 ITL, among every run including 1P1D)."""
    order = {"mono": 0, "mono-chunked": 1, "1p1d": 2}
    rows = sorted((r.point() for r in runs), key=lambda p: (order[p["mode"]], p["chunk_tokens"] or 0))
    for row, on in zip(rows, pareto_front([(p["long_ttft_ms"], p["itl_p99_ms"]) for p in rows])):
        row["pareto"] = on
    return rows
