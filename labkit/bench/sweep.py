"""The sweep: the same workload, seed and metrics through every serving mode at several rates.

For each mode a server is started (by a `ServerFactory`: the lab's launcher by default, a vLLM
launcher, or a test server), warmed up, measured at each request rate in increasing order, and
stopped. Each rate uses its own prompts (seed, rate index), identical across modes, so no
prefix cache is warmed by an earlier rate and every mode sees exactly the same requests.

Modes (`parse_mode`): `mono`, the fair baselines `mono-dp` and `mono-chunked-N` (DEFAULT_MODES
sweeps them beside `1p1d`), any `xPyD`, and selective `xPyD-selective-N`.

    >>> cfg = SweepConfig("azure-conv-2023", rates_rps=(0.5, 1, 2), modes=("mono", "1p1d"),
    ...                   n_requests=40, slo=SLO(ttft_s=2, tpot_s=0.1), max_model_len=2048)
    >>> result = run_sweep(cfg, lab_server_factory("tiny"))
    >>> result.frame()[["mode", "rate_rps", "itl_p99_ms", "goodput_rps"]]
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from labkit.bench.arrivals import Arrivals
from labkit.bench.loadgen import BenchResult, LoadConfig, run_load
from labkit.bench.metrics import SLO, RequestRecord, cost_per_million_tokens, jsonable, records_frame, summarize
from labkit.bench.workloads import SampledWorkload, TokenSpace, Workload, get_workload, sample_requests


@dataclass(frozen=True, slots=True)
class ModeSpec:
    """A serving topology. `devices`: how many devices (cores on a CPU, GPUs) it occupies,
    for throughput per device and cost. `replicas`: mono engines behind the one router (mono-dp:
    one per device, the router spreading requests by load). `chunk_tokens`: a chunked mono's step
    budget (None: the server factory's default). `prefill_threshold`: selective xPyD (tokens)."""

    name: str
    mode: Literal["mono", "disagg"]
    prefill: int = 0
    decode: int = 0
    chunked_prefill: bool = False
    devices: int = 1
    replicas: int = 1
    chunk_tokens: int | None = None
    prefill_threshold: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("mono", "disagg"):
            raise ValueError(f"mode must be 'mono' or 'disagg', got {self.mode!r}")
        if self.mode == "disagg" and (self.prefill < 1 or self.decode < 1):
            raise ValueError(f"{self.name}: disagg needs >= 1 prefill and >= 1 decode worker")
        if self.devices < 1:
            raise ValueError(f"{self.name}: devices must be >= 1, got {self.devices}")
        if self.replicas < 1 or (self.replicas > 1 and self.mode != "mono"):
            raise ValueError(f"{self.name}: replicas must be >= 1 (more than one only for mono), got {self.replicas}")
        if self.chunk_tokens is not None and (self.chunk_tokens < 1 or not self.chunked_prefill):
            raise ValueError(f"{self.name}: chunk_tokens needs chunked_prefill and >= 1 token, got {self.chunk_tokens}")
        if self.prefill_threshold < 0 or (self.prefill_threshold and self.mode != "disagg"):
            raise ValueError(f"{self.name}: prefill_threshold is for disagg modes, >= 0 tokens")


# The fair baselines beside 1P1D on the lab's 2 devices (issue 18): one engine on both, two
# one-device replicas behind the router (data parallel), and chunked prefill at two budgets.
DEFAULT_MODES: tuple[str, ...] = ("mono", "mono-dp", "mono-chunked-256", "mono-chunked-512", "1p1d")
DEFAULT_CHUNK_TOKENS = 256  # a `mono-chunked` mode's step budget when its name gives none
MODE_FORMS = "mono, mono-dp, mono-chunked[-TOKENS], xPyD such as 1p1d, or xPyD-selective-TOKENS"


def parse_mode(name: str, devices: int | None = None) -> ModeSpec:
    """A mode by name: `mono` (one engine on `devices`, default 2: both cores of the lab machine, as
    many as 1P1D), `mono-dp` (`devices` one-device replicas behind the router), `mono-chunked` or
    `mono-chunked-N` (chunked prefill, N tokens per step), `xPyD` (e.g. `1p1d`, `2p1d`: x + y devices)
    or `xPyD-selective-N` (prompts whose uncached suffix is under N tokens prefilled on the decode side)."""
    n = name.strip().lower()
    if n == "mono":
        return ModeSpec(n, "mono", devices=devices or 2)
    if n == "mono-dp":
        return ModeSpec(n, "mono", devices=devices or 2, replicas=devices or 2)
    m = re.fullmatch(r"mono-chunked(?:-(\d+))?", n)
    if m:
        return ModeSpec(n, "mono", chunked_prefill=True, devices=devices or 2, chunk_tokens=int(m[1]) if m[1] else None)
    m = re.fullmatch(r"(\d+)p(\d+)d(?:-selective-(\d+))?", n)
    if not m:
        raise ValueError(f"unknown serving mode {name!r}; use {MODE_FORMS}")
    p, d = int(m.group(1)), int(m.group(2))
    threshold = int(m[3]) if m[3] else 0
    if m[3] is not None and threshold < 1:
        raise ValueError(f"{name!r}: a selective mode needs a threshold >= 1 token (xPyD is threshold 0)")
    return ModeSpec(n, "disagg", p, d, devices=devices or p + d, prefill_threshold=threshold)


ServerFactory = Callable[[ModeSpec], AbstractContextManager[str]]
"""Starts a server for a mode; the context yields its base URL and stops it on exit."""


@dataclass(frozen=True, slots=True)
class SweepConfig:
    """What to sweep. `workload`: a preset name or Workload; lengths fitted to `max_model_len`
    (or multiplied by `scale`). `rates_rps` are swept in increasing order."""

    workload: str | Workload
    rates_rps: tuple[float, ...] = (0.5, 1.0, 2.0)
    modes: tuple[str, ...] = DEFAULT_MODES
    n_requests: int = 40
    seed: int = 0
    slo: SLO = field(default_factory=SLO)
    burstiness: float = 1.0
    max_concurrency: int | None = None
    request_timeout_s: float = 120.0
    warmup_requests: int = 2
    max_model_len: int | None = None
    scale: float | None = None
    price_per_device_hour: float = 1.0
    space: TokenSpace = field(default_factory=TokenSpace)
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.rates_rps or any(not (r > 0 and math.isfinite(r)) for r in self.rates_rps):
            raise ValueError(f"rates_rps must be finite rates > 0, got {self.rates_rps}")
        if not self.modes:
            raise ValueError("modes must name at least one serving mode")
        for m in self.modes:
            parse_mode(m)
        if self.n_requests < 1 or self.warmup_requests < 0:
            raise ValueError(
                f"need n_requests >= 1 and warmup_requests >= 0, got {self.n_requests}, {self.warmup_requests}"
            )
        object.__setattr__(self, "rates_rps", tuple(sorted(float(r) for r in self.rates_rps)))

    @property
    def workload_obj(self) -> Workload:
        return get_workload(self.workload) if isinstance(self.workload, str) else self.workload


@dataclass
class SweepResult:
    """Every run of a sweep: `rows` (one per mode and rate) and the full BenchResults."""

    config: SweepConfig
    rows: list[dict[str, Any]]
    runs: dict[tuple[str, float], BenchResult]
    scaling_text: str = ""

    def frame(self):
        """The result table as a pandas DataFrame (one row per mode and rate)."""
        import pandas as pd

        return pd.DataFrame(self.rows)

    def records_frame(self):
        """Every request of every run, with `mode` and `rate_rps` columns."""
        import pandas as pd

        parts = []
        for (mode, rate), res in self.runs.items():
            df = records_frame(res.records)
            df.insert(0, "rate_rps", rate)
            df.insert(0, "mode", mode)
            parts.append(df)
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    def capacity_rps(self, min_attainment: float = 0.9) -> dict[str, float | None]:
        """Per mode, the highest swept rate whose SLO attainment is >= `min_attainment` (DistServe's
        per-mode goodput); None when even the lowest rate misses."""
        out: dict[str, float | None] = {}
        for mode in self.config.modes:
            ok = [r["rate_rps"] for r in self.rows if r["mode"] == mode and r["slo_attainment"] >= min_attainment]
            out[mode] = max(ok) if ok else None
        return out

    def rescored(self, slo: SLO) -> SweepResult:
        """The same runs scored against another SLO (goodput and attainment recomputed from the
        per-request records; nothing is re-sent)."""
        from dataclasses import replace

        cfg = replace(self.config, slo=slo)
        devices = {r["mode"]: r["devices"] for r in self.rows}
        rows, runs = [], {}
        for (mode, rate), res in self.runs.items():
            new = BenchResult(
                res.records, summarize(res.records, res.summary.duration_s, slo), {**res.meta, "slo": slo.as_dict()}
            )
            runs[(mode, rate)] = new
            spec = replace(parse_mode(mode), devices=devices[mode])
            rows.append({"workload": cfg.workload_obj.name, **summary_row(spec, rate, new, cfg.price_per_device_hour)})
        return SweepResult(cfg, rows, runs, self.scaling_text)

    def slo_from(
        self, mode: str = "mono", *, ttft_x: float = 3.0, tpot_x: float = 2.0, itl_x: float | None = None
    ) -> SLO:
        """An SLO set from what `mode` delivers at the lowest swept rate: `ttft_x` times its p50 TTFT,
        `tpot_x` times its p50 TPOT and, when given, every gap within `itl_x` times that p50 TPOT."""
        low = min(self.config.rates_rps)
        row = next((r for r in self.rows if r["mode"] == mode and r["rate_rps"] == low), None)
        if row is None or not row["ok"]:
            raise ValueError(f"no completed {mode} run at {low:g} req/s to set an SLO from")
        sig = lambda x: float(f"{x:.3g}")
        tpot_s = row["tpot_p50_ms"] / 1000
        return SLO(
            ttft_s=sig(row["ttft_p50_ms"] / 1000 * ttft_x),
            tpot_s=sig(tpot_s * tpot_x),
            itl_s=sig(tpot_s * itl_x) if itl_x else None,
        )

    def save(self, out_dir: str | Path, name: str = "sweep") -> list[Path]:
        """Writes `<name>.json` (config, scaling, rows) and `<name>_requests.csv` / `.parquet`."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = asdict(self.config)
        cfg["workload"] = self.config.workload_obj.describe()
        js = out / f"{name}.json"
        js.write_text(
            json.dumps(
                jsonable(
                    {
                        "config": cfg,
                        "scaling": self.scaling_text,
                        "rows": self.rows,
                        "capacity_rps_at_90pct_slo": self.capacity_rps(),
                    }
                ),
                indent=1,
                default=str,
            )
        )
        df = self.records_frame()
        csv, pq = out / f"{name}_requests.csv", out / f"{name}_requests.parquet"
        df.to_csv(csv, index=False)
        df.to_parquet(pq, index=False)
        return [js, csv, pq]


def summary_row(mode: ModeSpec, rate_rps: float, res: BenchResult, price_per_device_hour: float) -> dict[str, Any]:
    """One table row: mode, rate, the flat summary, throughput per device and cost per 1M tokens."""
    s = res.summary
    row: dict[str, Any] = {"mode": mode.name, "rate_rps": rate_rps, "devices": mode.devices, **s.flat()}
    row["output_tps_per_device"] = s.output_throughput_tps / mode.devices
    row["goodput_rps_per_device"] = s.goodput_rps / mode.devices
    row["cost_per_m_output_tokens"] = cost_per_million_tokens(
        price_per_device_hour, mode.devices, s.output_throughput_tps
    )
    row["cost_per_m_total_tokens"] = cost_per_million_tokens(
        price_per_device_hour, mode.devices, s.total_token_throughput_tps
    )
    return row


def run_sweep(
    cfg: SweepConfig,
    start_server: ServerFactory,
    *,
    model: str | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> SweepResult:
    """Runs every mode at every rate; returns the SweepResult. `on_run` sees each row as it lands."""
    return run_sweeps([cfg], start_server, model=model, on_run=on_run)[0]


def _samples(cfg: SweepConfig) -> tuple[list[SampledWorkload], SampledWorkload]:
    """Requests per rate and for the warm-up; every rate uses the first rate's length scaling."""
    w = cfg.workload_obj
    first = sample_requests(
        w, cfg.n_requests, seed=cfg.seed * 1000, max_model_len=cfg.max_model_len, scale=cfg.scale, space=cfg.space
    )
    scale = first.scaling.factor
    rest = [
        sample_requests(
            w, cfg.n_requests, seed=cfg.seed * 1000 + k, max_model_len=cfg.max_model_len, scale=scale, space=cfg.space
        )
        for k in range(1, len(cfg.rates_rps))
    ]
    warm = sample_requests(
        w,
        max(1, cfg.warmup_requests),
        seed=cfg.seed * 1000 + 999,
        max_model_len=cfg.max_model_len,
        scale=scale,
        space=cfg.space,
    )
    return [first, *rest], warm


def run_sweeps(
    cfgs: Sequence[SweepConfig],
    start_server: ServerFactory,
    *,
    model: str | None = None,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    on_server: Callable[[ModeSpec, str], None] | None = None,
) -> list[SweepResult]:
    """Several sweeps (e.g. two workloads) through the same modes, starting each mode's server once.

    All configs must list the same modes. Returns one SweepResult per config, in order.
    `on_server(mode, url)` runs once per server, after its warm-up and before the measured runs.
    """
    from tqdm.auto import tqdm

    if not cfgs:
        raise ValueError("no sweep configs")
    modes = cfgs[0].modes
    if any(c.modes != modes for c in cfgs):
        raise ValueError(f"every config must sweep the same modes; got {[c.modes for c in cfgs]}")
    plans = [_samples(c) for c in cfgs]
    results = [SweepResult(c, [], {}, p[0][0].scaling.describe()) for c, p in zip(cfgs, plans)]
    bar = tqdm(
        total=len(modes) * sum(len(c.rates_rps) for c in cfgs), desc="sweep", disable=not any(c.progress for c in cfgs)
    )
    for mode_name in modes:
        spec = parse_mode(mode_name)
        with start_server(spec) as url:
            bases = [
                LoadConfig(
                    url,
                    model=model,
                    request_timeout_s=cfg.request_timeout_s,
                    slo=cfg.slo,
                    max_concurrency=cfg.max_concurrency,
                    progress=False,
                )
                for cfg in cfgs
            ]
            for cfg, (_, warm), base in zip(cfgs, plans, bases):
                if cfg.warmup_requests:
                    # First requests pay for allocation and lazy init; they are not measured.
                    run_load(_with(base, arrivals=Arrivals("burst"), label="warm-up"), warm.requests)
            if on_server is not None:
                on_server(spec, url)
            for cfg, (samples, _), result, base in zip(cfgs, plans, results, bases):
                wname = cfg.workload_obj.name
                for k, rate in enumerate(cfg.rates_rps):
                    bar.set_postfix_str(f"{wname}: {spec.name} @ {rate:g} req/s")
                    arrivals = Arrivals("poisson" if cfg.burstiness == 1.0 else "gamma", rate, cfg.burstiness)
                    lc = _with(base, arrivals=arrivals, seed=cfg.seed * 1000 + k, label=f"{spec.name}@{rate:g}")
                    res = run_load(lc, samples[k].requests, scaling=samples[k].scaling, workload=wname)
                    res.meta["mode"] = spec.name
                    result.runs[(spec.name, rate)] = res
                    row = {"workload": wname, **summary_row(spec, rate, res, cfg.price_per_device_hour)}
                    result.rows.append(row)
                    if on_run:
                        on_run(row)
                    bar.update(1)
    bar.close()
    return results


def _with(base: LoadConfig, **changes: Any) -> LoadConfig:
    from dataclasses import replace

    return replace(base, **changes)


@contextlib.contextmanager
def url_server(url: str) -> Iterator[str]:
    """A 'factory' for a server someone else started: yields `url`, stops nothing."""
    yield url


def fixed_url_factory(urls: dict[str, str]) -> ServerFactory:
    """A factory that maps mode names to already-running servers (e.g. started by `labkit serve`)."""

    def factory(spec: ModeSpec) -> AbstractContextManager[str]:
        if spec.name not in urls:
            raise ValueError(f"no URL given for mode {spec.name!r}; have {sorted(urls)}")
        return url_server(urls[spec.name])

    return factory


# The columns a person reads first of a sweep's rows (the table printed here, the tour's table).
TABLE_COLUMNS: tuple[str, ...] = (
    "mode",
    "rate_rps",
    "ok",
    "errors",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "itl_p50_ms",
    "itl_p99_ms",
    "tpot_p50_ms",
    "goodput_rps",
    "slo_attainment",
    "output_tps_per_device",
)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = TABLE_COLUMNS) -> str:
    """A fixed-width text table of the chosen columns (what the CLI and benchmarks print)."""

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    cells = [list(columns)] + [[fmt(r.get(c, "")) for c in columns] for r in rows]
    w = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w[i]) for i, c in enumerate(row)) for row in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)


def lab_server_factory(
    model: str = "tiny",
    *,
    cpus: dict[str, list[int] | None] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    max_num_batched_tokens: int | None = None,
    transfer: str | None = None,
    kv_cache_bytes: int | None = None,
    startup_timeout_s: float = 180.0,
    settings: Mapping[str, Any] | None = None,
    step_log_dir: str | Path | None = None,
    gpus: Sequence[int] | None = None,
) -> ServerFactory:
    """Starts the lab's own server (`labkit.serve.launcher.launch`) for each mode.

    `cpus` maps roles to cores (default `default_cpu_split()`: on 2 cores prefill on core 0, decode
    on core 1, mono on both; mono-dp's replicas split the mono cores, one each). Mono with chunked
    prefill uses the mode's chunk (`mono-chunked-N`) or `chunk_tokens` as the step's token budget,
    so no step holds more than that many prompt tokens. Selective modes (`1p1d-selective-N`) start
    the router with that prefill threshold. `max_num_batched_tokens` (other modes), `transfer`,
    `kv_cache_bytes`: None keeps the workers' default (WorkerConfig's). `settings`: more worker settings by name (WorkerConfig's, e.g. `dtype`).
    `step_log_dir`: every worker of a mode logs its steps to `<dir>/<mode name>.jsonl`. `gpus`: serve on
    these GPUs instead of cores (the launcher places the workers; `cpus` is then unused).
    """

    @contextlib.contextmanager
    def factory(spec: ModeSpec) -> Iterator[str]:
        from labkit.serve.launcher import default_cpu_split, launch

        split = cpus or default_cpu_split()
        budget = (spec.chunk_tokens or chunk_tokens) if spec.chunked_prefill else max_num_batched_tokens
        worker = {  # every worker's settings (WorkerConfig's, by name): the mode's, then the caller's
            "model": model,
            "chunked_prefill": spec.chunked_prefill,
            "max_num_batched_tokens": budget,
            "transfer": transfer,
            "kv_cache_bytes": kv_cache_bytes,
            **(settings or {}),
            "step_log": str(Path(step_log_dir) / f"{spec.name}.jsonl") if step_log_dir else None,
        }
        srv = launch(
            spec.mode,
            mono=spec.replicas,
            prefill=max(1, spec.prefill),
            decode=max(1, spec.decode),
            prefill_threshold=spec.prefill_threshold,
            mono_cpus=split.get("mono"),
            prefill_cpus=split.get("prefill"),
            decode_cpus=split.get("decode"),
            startup_timeout_s=startup_timeout_s,
            gpus=list(gpus) if gpus else None,
            **worker,
        )
        try:
            yield srv.url
        finally:
            srv.stop()

    return factory


@dataclass(frozen=True, slots=True)
class Calibration:
    """Unloaded latencies of one workload on one mode (requests sent one at a time), in seconds."""

    workload: str
    mode: str
    ttft_s: float
    tpot_s: float
    e2e_s: float

    @property
    def sequential_rps(self) -> float:
        """Requests per second when served strictly one at a time: 1 / median E2E (a capacity floor;
        continuous batching serves more)."""
        return 1.0 / self.e2e_s

    def rates(self, fractions: Sequence[float]) -> tuple[float, ...]:
        """Request rates as multiples of `sequential_rps`, rounded to 3 significant digits."""
        return tuple(float(f"{f * self.sequential_rps:.3g}") for f in fractions)

    def slo(self, ttft_x: float = 5.0, tpot_x: float = 3.0) -> SLO:
        """An SLO `ttft_x` times the unloaded TTFT and `tpot_x` times the unloaded TPOT (DistServe
        scales SLOs the same way, from what the hardware does unloaded)."""
        return SLO(ttft_s=float(f"{self.ttft_s * ttft_x:.3g}"), tpot_s=float(f"{self.tpot_s * tpot_x:.3g}"))


def calibrate(
    start_server: ServerFactory,
    workloads: Sequence[Workload],
    *,
    mode: str = "mono",
    n: int = 4,
    seed: int = 99,
    max_model_len: int | None = None,
    scale: float | None = None,
    model: str | None = None,
) -> list[Calibration]:
    """Median unloaded TTFT, TPOT and E2E of each workload on `mode`, from `n` requests sent one at a
    time after one warm-up request (one server start for all workloads)."""
    spec = parse_mode(mode)
    with start_server(spec) as url:
        return calibrate_url(
            url, workloads, mode=spec.name, n=n, seed=seed, max_model_len=max_model_len, scale=scale, model=model
        )


def calibrate_url(
    url: str,
    workloads: Sequence[Workload],
    *,
    mode: str = "mono",
    n: int = 4,
    seed: int = 99,
    max_model_len: int | None = None,
    scale: float | None = None,
    model: str | None = None,
) -> list[Calibration]:
    """`calibrate` against a server that is already running at `url` (named `mode` in the result)."""
    import statistics

    out: list[Calibration] = []
    for w in workloads:
        ok = sequential_records(url, w, n, mode=mode, seed=seed, max_model_len=max_model_len, scale=scale, model=model)
        tpots = [r.tpot_s for r in ok if r.output_tokens > 1] or [math.nan]
        out.append(
            Calibration(
                w.name,
                mode,
                statistics.median(r.ttft_s for r in ok),
                statistics.median(tpots),
                statistics.median(r.e2e_s for r in ok),
            )
        )
    return out


def sequential_records(
    url: str,
    workload: Workload,
    n: int = 4,
    *,
    mode: str = "mono",
    seed: int = 99,
    max_model_len: int | None = None,
    scale: float | None = None,
    model: str | None = None,
    concurrency: int = 1,
) -> list[RequestRecord]:
    """Records of `n` requests of `workload` sent `concurrency` at a time (1: its unloaded latencies;
    more: all sent together when concurrency >= n) to the server at `url`, after one unmeasured
    warm-up request. RuntimeError if none succeeded."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    s = sample_requests(workload, n + 1, seed=seed, max_model_len=max_model_len, scale=scale)
    cfg = LoadConfig(
        url,
        Arrivals("burst"),
        max_concurrency=1,
        model=model,
        progress=False,
        request_timeout_s=600.0,
        label=f"warm-up {workload.name}",
    )
    run_load(cfg, s.requests[:1])  # the first request warms the server up
    res = run_load(
        _with(cfg, max_concurrency=concurrency, label=f"{concurrency} at a time: {workload.name}"), s.requests[1:]
    )
    ok = [r for r in res.records if r.ok]
    if not ok:
        raise RuntimeError(
            f"run of {workload.name} on {mode} ({concurrency} at a time) failed: {res.meta['first_errors']}"
        )
    return ok
