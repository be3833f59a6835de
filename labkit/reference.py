"""Reference results: the committed runs in `docs/results/`, as small typed records.

The notebooks draw these beside the learner's own measurements, so a CPU learner sees what a
GPU shows and anyone sees whether their numbers are sane. One loader per kind of result, each
reading the newest file of that kind (date in the name; on the same date the plain run, not a
variant like `-quick` or `-1t`, unless `variant=` asks for one):

    >>> h100 = gpu_check()            # scripts/gpu_check.py on an H100 SXM, or None
    >>> h100.point("llama-3.1-8b", "transformers", "prefill").mfu       # 0.64
    >>> roofline().points             # the small model on the 2-core CPU, both runners

Every loader returns None when its file is missing or unreadable (a notebook then draws the
learner's numbers alone), never raises.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from labkit.config import repo_root

_NAME = re.compile(r"^(?P<kind>[a-z_]+)-(?P<date>\d{4}-\d{2}-\d{2})-(?P<tag>[A-Za-z0-9._-]+?)(?:\.json)?$")


def results_dir() -> Path:
    """Where the committed results live: docs/results of this checkout."""
    return repo_root() / "docs" / "results"


def write_result(
    kind: str, tag: str, doc: Mapping[str, Any], *, date: str | None = None, out: str | Path | None = None
) -> Path:
    """Writes a benchmark's result where the loaders here find it: `out` when given, else
    docs/results/<kind>-<date>-<tag>.json (date: `doc["date"]`, else today; tag: the machine and any
    variant, e.g. "cpu-2core-quick"). Numpy values and dataclasses are made JSON-able. Returns the path."""
    import datetime as dt

    from labkit.bench.metrics import jsonable

    day = date or str(doc.get("date") or dt.date.today().isoformat())
    path = Path(out) if out else results_dir() / f"{kind}-{day}-{tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(dict(doc)), indent=1, default=str))
    return path


@dataclass(frozen=True, slots=True)
class ResultFile:
    """One committed result: its kind ("roofline", "gpu_check", ...), date, machine tag and JSON path."""

    kind: str
    date: str
    tag: str  # machine and variant: "cpu-2core", "cpu-2core-quick", "h100-sxm"
    path: Path


def result_files(kind: str | None = None, directory: Path | None = None) -> list[ResultFile]:
    """Every result file (a `<kind>-<date>-<tag>.json`, or a `<kind>-<date>-<tag>/results.json` run), oldest first."""
    d = directory or results_dir()
    if not d.is_dir():
        return []
    out: list[ResultFile] = []
    for p in sorted(d.iterdir()):
        m = _NAME.match(p.name)
        if not m or (kind and m["kind"] != kind):
            continue
        path = p / "results.json" if p.is_dir() else p
        if path.suffix == ".json" and path.is_file():
            out.append(ResultFile(m["kind"], m["date"], m["tag"], path))
    return sorted(out, key=lambda f: (f.kind, f.date, f.tag))


def newest_file(kind: str, *, variant: str | None = None, directory: Path | None = None) -> ResultFile | None:
    """The newest file of `kind`; on one date the plain run (shortest tag), or the one whose tag ends in `variant`.
    Without `variant`, smoke runs (`-quick`) are never the reference, however new."""
    files = [
        f
        for f in result_files(kind, directory)
        if (f.tag.endswith(f"-{variant}") if variant is not None else not f.tag.endswith("-quick"))
    ]
    if not files:
        return None
    return max(files, key=lambda f: (f.date, -len(f.tag)))


def _load(kind: str, variant: str | None, directory: Path | None) -> tuple[ResultFile, dict[str, Any]] | None:
    f = newest_file(kind, variant=variant, directory=directory)
    if f is None:
        return None
    try:
        data = json.loads(f.path.read_text())
    except (OSError, ValueError) as e:
        warnings.warn(f"reference result {f.path} unreadable ({e}); drawing without it", stacklevel=3)
        return None
    return (f, data) if isinstance(data, dict) else None


T = TypeVar("T")


def _guard(build: Callable[[ResultFile, dict[str, Any]], T]) -> Callable[..., T | None]:
    """Loaders turn a file whose fields do not match into None (with a warning), never an exception."""

    def loader(*, variant: str | None = None, directory: Path | None = None) -> T | None:
        got = _load(build.__name__.removeprefix("_"), variant, directory)
        if got is None:
            return None
        try:
            return build(*got)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            warnings.warn(f"reference result {got[0].path} does not have the fields expected ({e!r})", stacklevel=2)
            return None

    loader.__name__ = build.__name__.removeprefix("_")
    loader.__doc__ = build.__doc__
    return loader


# --- records --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Roofs:
    """A machine's measured roofs in one dtype: matmul FLOP/s and read bandwidth (bytes/s)."""

    machine: str
    dtype: str
    peak_flops: float
    read_bytes_per_s: float

    @property
    def ridge_flop_per_byte(self) -> float:
        return self.peak_flops / self.read_bytes_per_s


@dataclass(frozen=True, slots=True)
class PhasePoint:
    """One measured prefill or decode step of a reference machine, as a roofline point."""

    machine: str
    runner: str  # "transformers", "labkit-engine", "engine eager", "engine graphs", ...
    model: str
    dtype: str
    phase: str  # "prefill" | "decode"
    batch: int
    seq_len: int  # prompt length (prefill) or context length (decode)
    ms: float
    intensity_flop_per_byte: float
    achieved_flops_per_s: float
    mfu: float | None
    mbu: float | None

    @property
    def label(self) -> str:
        return f"{self.machine}: {self.model} {self.phase} ({self.runner})"


def _point(machine: str, r: Mapping[str, Any]) -> PhasePoint:
    seq = r.get("prompt_len", r.get("context_len"))
    return PhasePoint(
        machine,
        str(r["runner"]),
        str(r["model"]),
        str(r["dtype"]),
        str(r["phase"]),
        int(r["batch"]),
        int(seq),
        float(r["ms"]),
        float(r["intensity_flop_per_byte"]),
        float(r["achieved_flops_per_s"]),
        r.get("mfu"),
        r.get("mbu"),
    )


@dataclass(frozen=True)
class RooflineRun:
    """`benchmarks/roofline.py` on a CPU: prefill MFU and batch-1 decode MBU per runner, with the roofs beside them."""

    file: ResultFile
    machine: str
    model: str
    threads: int
    roofs: Roofs  # median of the runners' rounds
    points: tuple[PhasePoint, ...]  # prefill and decode, per runner
    mfu_range: Mapping[str, tuple[float, float]]  # runner -> (min, max) over rounds
    mbu_range: Mapping[str, tuple[float, float]]


def _cost_point(
    machine: str, runner: str, model: str, dtype: str, cost: Any, ms: float, mfu: float | None, mbu: float | None
) -> PhasePoint:
    """A batch-1 step of `cost` (labkit.roofline's prefill or decode cost) measured at `ms` milliseconds."""
    return PhasePoint(
        machine,
        runner,
        model,
        dtype,
        cost.phase,
        1,
        cost.seq_len,
        ms,
        cost.intensity_flop_per_byte,
        cost.flops / (ms / 1e3),
        mfu,
        mbu,
    )


def _runner_label(runner: str, dtype: str) -> str:
    """A runner's name on the chart: float32 (the CPU default) bare, any other dtype named."""
    return runner if dtype == "float32" else f"{runner} {dtype}"


def _roofline_one_roof(f: ResultFile, d: dict[str, Any], machine: str) -> RooflineRun:
    """The format with one roof for every runner (`labkit.hardware.Roof`, since 2026-12): per runner and
    dtype, prefill MFU and batch-1 decode MBU (median of rounds), and the records of every round."""
    from labkit.roofline import ModelShape, decode_cost, prefill_cost

    roof, shape = d["roof"], ModelShape.from_config(d["model"])
    points: list[PhasePoint] = []
    mfu_r: dict[str, tuple[float, float]] = {}
    mbu_r: dict[str, tuple[float, float]] = {}
    for r in d["results"]:
        label, dtype = _runner_label(r["runner"], r["dtype"]), r["dtype"]
        costs = (
            (prefill_cost(shape, d["prompt_len"], 1, dtype), r["prefill_ms"], r["mfu"], None),
            (decode_cost(shape, 1, d["context_len"], dtype), r["decode_b1_ms"], None, r["mbu_b1"]),
        )
        for cost, ms, mfu, mbu in costs:
            points.append(_cost_point(machine, label, d["model"], dtype, cost, ms, mfu, mbu))
        mine = [x for x in d["records"] if (x["runner"], x["dtype"], x["batch"]) == (r["runner"], dtype, 1)]
        for key, phase, into in (("mfu", "prefill", mfu_r), ("mbu", "decode", mbu_r)):
            vals = [float(x[key]) for x in mine if x["phase"] == phase]
            into[label] = (min(vals), max(vals)) if vals else (math.nan, math.nan)
    return RooflineRun(
        f,
        machine,
        d["model"],
        int(d["threads"]),
        Roofs(machine, "float32", float(roof["peak_flops"]["float32"]), float(roof["read_bytes_per_s"])),
        tuple(points),
        mfu_r,
        mbu_r,
    )


@_guard
def _roofline(f: ResultFile, d: dict[str, Any]) -> RooflineRun:
    """The newest CPU roofline benchmark (small model, every runner), or None."""
    from labkit.roofline import ModelShape, decode_cost, prefill_cost

    machine = f"{d.get('device_name', 'CPU')} ({f.tag}, {d['threads']} threads)"
    if "roof" in d:
        return _roofline_one_roof(f, d, machine)
    shape, dtype = ModelShape.from_config(d["model"]), d["dtype"]
    pre_c, dec_c = prefill_cost(shape, d["prompt_len"], 1, dtype), decode_cost(shape, 1, d["context_len"], dtype)
    points, mfu_r, mbu_r = [], {}, {}
    for r in d["results"]:
        for cost, ms, key in ((pre_c, r["prefill_ms"], "mfu"), (dec_c, r["decode_ms"], "mbu")):
            mfu = r["mfu"] if key == "mfu" else cost.mfu(ms / 1e3, r["peak_flops"])
            mbu = r["mbu"] if key == "mbu" else cost.mbu(ms / 1e3, r["read_bytes_per_s"])
            points.append(_cost_point(machine, r["runner"], d["model"], dtype, cost, ms, mfu, mbu))
        mfu_r[r["runner"]], mbu_r[r["runner"]] = tuple(r["mfu_range"]), tuple(r["mbu_range"])
    med = lambda k: sorted(r[k] for r in d["results"])[len(d["results"]) // 2]
    return RooflineRun(
        f,
        machine,
        d["model"],
        int(d["threads"]),
        Roofs(machine, dtype, med("peak_flops"), med("read_bytes_per_s")),
        tuple(points),
        mfu_r,
        mbu_r,
    )


@dataclass(frozen=True)
class GpuCheckRun:
    """`scripts/gpu_check.py` on a GPU: roofs, 8B and 1B prefill/decode points, sweeps, telemetry, engine forms."""

    file: ResultFile
    machine: str  # "H100 SXM"
    device_name: str
    dtype: str
    roofs: Roofs
    datasheet: str
    points: tuple[PhasePoint, ...]  # headline points of every runner and model
    decode_sweeps: Mapping[str, tuple[PhasePoint, ...]]  # "llama-3.1-8b transformers", "llama-3.1-8b engine graphs"
    prefill_sweeps: Mapping[str, tuple[PhasePoint, ...]]
    telemetry_means: Mapping[str, Mapping[str, float]]  # 8B run: phase -> metric -> mean %
    critical_batch: Mapping[str, int | None]  # "measured", "datasheet" (8B, context of the sweep)
    images: Mapping[str, Path] = field(default_factory=dict)

    def point(self, model: str, runner: str, phase: str) -> PhasePoint | None:
        """The headline point of `model` measured by `runner` in `phase`, or None."""
        return next((p for p in self.points if (p.model, p.runner, p.phase) == (model, runner, phase)), None)

    @property
    def readme(self) -> Path:
        return self.file.path.parent / "README.md"

    def readme_section(self, heading: str) -> str:
        """The README's section whose `## ` heading starts with `heading` (its text, heading included), or ""."""
        try:
            text = self.readme.read_text()
        except OSError:
            return ""
        for part in re.split(r"(?m)^(?=## )", text):
            if part.startswith(f"## {heading}"):
                return part.strip()
        return ""


@_guard
def _gpu_check(f: ResultFile, d: dict[str, Any]) -> GpuCheckRun:
    """The newest GPU check run (an H100 SXM so far), or None."""
    env, pk = d["env"], d["peaks"]
    machine = env.get("datasheet") or env["device_name"]
    dtype = env["dtype"]
    pts: list[PhasePoint] = []
    decode_sweeps: dict[str, tuple[PhasePoint, ...]] = {}
    prefill_sweeps: dict[str, tuple[PhasePoint, ...]] = {}
    for size in ("8b", "1b"):
        s = d.get(size) or {}
        pts += [_point(machine, r) for r in s.get("headline", [])]
        if s.get("decode_sweep"):
            decode_sweeps[f"{s['model']} {s['runner']}"] = tuple(_point(machine, r) for r in s["decode_sweep"])
        if s.get("prefill_sweep"):
            prefill_sweeps[f"{s['model']} {s['runner']}"] = tuple(_point(machine, r) for r in s["prefill_sweep"])
    for v in (d.get("engine") or {}).get("variants", {}).values():
        pts += [_point(machine, r) for r in v.get("headline", [])]
        if v.get("decode_sweep"):
            decode_sweeps[f"{v['model']} engine {v['form']}"] = tuple(_point(machine, r) for r in v["decode_sweep"])
    eight = d.get("8b") or {}
    images = {p.stem: p for p in f.path.parent.glob("*.png")}
    return GpuCheckRun(
        f,
        machine,
        env["device_name"],
        dtype,
        Roofs(machine, dtype, float(pk["matmul_flops"][dtype]), float(pk["read_bytes_per_s"])),
        env.get("datasheet", ""),
        tuple(pts),
        decode_sweeps,
        prefill_sweeps,
        eight.get("telemetry_means", {}),
        {"measured": eight.get("critical_batch_measured"), "datasheet": eight.get("critical_batch_datasheet")},
        images,
    )


@dataclass(frozen=True)
class EngineRun:
    """`benchmarks/engine.py`: offline throughput of the lab's engine against transformers and vLLM."""

    file: ResultFile
    model: str
    requests: int
    prompt_len: int
    output_len: int
    output_tok_per_s: Mapping[str, float]  # engine name -> output tokens/s
    efficiency: Mapping[str, float]  # the lab engine's prefill MFU, decode MBU, step times


@_guard
def _engine(f: ResultFile, d: dict[str, Any]) -> EngineRun:
    """The newest engine throughput benchmark, or None."""
    offline = d["offline"] if "offline" in d else d["rows"]  # "rows": files written before 2026-12
    return EngineRun(
        f,
        d["model"],
        int(d["requests"]),
        int(d["prompt_len"]),
        int(d["output_len"]),
        {r["engine"]: float(r["output_tok_per_s"]) for r in offline},
        dict(d.get("labkit_efficiency", {})),
    )


@dataclass(frozen=True, slots=True)
class Link:
    """A KV link: measured on the machine, emulated, or computed from a line rate."""

    label: str
    gb_per_s: float
    fixed_s: float
    how: str


@dataclass(frozen=True)
class TransferRun:
    """`benchmarks/transfer.py`: bandwidth per backend and size, the fitted links, layer-wise overlap."""

    file: ResultFile
    bandwidth: tuple[Mapping[str, Any], ...]  # {backend, nbytes, gb_per_s, ...}
    links: tuple[Link, ...]
    layerwise: tuple[Mapping[str, Any], ...]
    emulated: tuple[Mapping[str, Any], ...] = ()  # sends over an emulated link: {nbytes, seconds_median, link, ...}


@_guard
def _transfer(f: ResultFile, d: dict[str, Any]) -> TransferRun:
    """The newest KV transfer benchmark, or None."""
    return TransferRun(
        f,
        tuple(d["bandwidth"]),
        tuple(Link(x["label"], float(x["gb_per_s"]), float(x["fixed_s"]), x["how"]) for x in d["links"]),
        tuple(d.get("layerwise", ())),
        tuple(d.get("emulated", ())),
    )


@dataclass(frozen=True)
class InterferenceRun:
    """`benchmarks/serve_interference.py`: one long prompt among running decodes, per serving mode."""

    file: ResultFile
    model: str
    long_prompt_tokens: int
    num_decodes: int
    chunk_tokens: int
    stats: Mapping[
        str, Mapping[str, float]
    ]  # mode -> decode_itl_mean_ms, decode_stall_max_ms, stall_ratio, long_ttft_ms


@_guard
def _serve_interference(f: ResultFile, d: dict[str, Any]) -> InterferenceRun:
    """The newest interference run (mono, mono-chunked, 1p1d), or None."""
    return InterferenceRun(
        f,
        d["model"],
        int(d["long_prompt_tokens"]),
        int(d["num_decodes"]),
        int(d["chunk_tokens"]),
        {m: dict(v) for m, v in d["median"].items()},
    )


@dataclass(frozen=True, slots=True)
class ServingRow:
    """One (mode, rate) point of a serving sweep; `raw` keeps every field the file has."""

    workload: str
    mode: str
    rate_rps: float
    ok: int
    errors: int
    goodput_rps: float
    slo_attainment: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    tpot_p50_ms: float
    output_throughput_tps: float
    raw: Mapping[str, Any]


def _row(r: Mapping[str, Any]) -> ServingRow:
    return ServingRow(
        r["workload"],
        r["mode"],
        float(r["rate_rps"]),
        int(r["ok"]),
        int(r["errors"]),
        float(r["goodput_rps"]),
        float(r["slo_attainment"]),
        float(r["ttft_p50_ms"]),
        float(r["ttft_p99_ms"]),
        float(r["itl_p50_ms"]),
        float(r["itl_p99_ms"]),
        float(r["tpot_p50_ms"]),
        float(r["output_throughput_tps"]),
        dict(r),
    )


@dataclass(frozen=True)
class GainsWorkload:
    """One workload of the gains sweep: its SLO, the rows per (mode, rate), the mono/1P1D ratios."""

    workload: str
    slo: str
    rows: tuple[ServingRow, ...]
    gains: tuple[Mapping[str, float], ...]
    capacity_rps: Mapping[str, float]


@dataclass(frozen=True)
class GainsRun:
    """`benchmarks/gains.py`: mono against 1P1D on two workloads (conversation, short prompts)."""

    file: ResultFile
    model: str
    requests_per_rate: int
    slo_rule: str
    workloads: Mapping[str, GainsWorkload]  # "conversation", "short_prompt"
    rate_fractions: tuple[float, ...] = ()  # the swept rates, as multiples of mono's one-at-a-time rate


@_guard
def _gains(f: ResultFile, d: dict[str, Any]) -> GainsRun:
    """The newest gains sweep, or None."""
    wl = {
        k: GainsWorkload(
            v["workload"], v["slo"], tuple(_row(r) for r in v["rows"]), tuple(v["gains"]), dict(v["capacity_rps"])
        )
        for k, v in d.items()
        if isinstance(v, dict) and "rows" in v and "gains" in v
    }
    return GainsRun(
        f,
        d["model"],
        int(d["requests_per_rate"]),
        d.get("slo_rule", ""),
        wl,
        tuple(float(x) for x in d.get("rate_fractions_of_mono_sequential", ())),
    )


@dataclass(frozen=True)
class PlanValidationRun:
    """`benchmarks/plan_validation.py`: the simulator against measured serving runs."""

    file: ResultFile
    model: str
    requests_per_rate: int
    rows: tuple[Any, ...]  # labkit.plan.validate.ValidationRow (mode, rate_rps, metric, predicted, measured, .error)
    share_within_15pct: float


@_guard
def _plan_validation(f: ResultFile, d: dict[str, Any]) -> PlanValidationRun:
    """The newest planner validation, or None."""
    from labkit.plan.validate import ValidationRow

    rows = tuple(
        ValidationRow(r["mode"], float(r["rate_rps"]), r["metric"], float(r["predicted"]), float(r["measured"]))
        for r in d["rows"]
    )
    # Runs written with the report card carry no share: it is the same count, made from the rows.
    share = d.get("share_within_15pct")
    if share is None:
        share = sum(abs(r.error) <= 0.15 for r in rows) / len(rows) if rows else 0.0
    return PlanValidationRun(f, d["model"], int(d["requests_per_rate"]), rows, float(share))


# The loaders, typed for callers (the decorator builds them).
roofline = _roofline
gpu_check = _gpu_check
engine = _engine
transfer = _transfer
serve_interference = _serve_interference
gains = _gains
plan_validation = _plan_validation


@dataclass(frozen=True, slots=True)
class ArticleClaims:
    """The seed article's headline figures: claims to hold against the lab's measurements, not facts."""

    prefill_utilization_pct: float
    decode_utilization_pct: tuple[float, float]
    throughput_gain: tuple[float, float]
    cost_saving_pct: tuple[float, float]
    source: str


# As the project's DESIGN.md quotes them ("Facts worth citing": the seed article).
ARTICLE = ArticleClaims(
    prefill_utilization_pct=92.0,
    decode_utilization_pct=(28.0, 30.0),
    throughput_gain=(2.0, 6.4),
    cost_saving_pct=(15.0, 40.0),
    source="the seed article on prefill/decode disaggregation (quoted in DESIGN.md)",
)


@dataclass(frozen=True, slots=True)
class ArticleConditions:
    """Where the seed article says disaggregation pays: long prompts, low prefix reuse, more than
    `min_devices` GPUs and links faster than `min_link_gbps` (RDMA)."""

    min_devices: int
    min_link_gbps: float
    source: str


ARTICLE_CONDITIONS = ArticleConditions(
    min_devices=16,
    min_link_gbps=100.0,
    source="the seed article (quoted in DESIGN.md): long prompts, low prefix "
    "reuse, many GPUs (>16), fast links (RDMA, >100 Gbps)",
)


@dataclass(frozen=True, slots=True)
class SourcedRange:
    """A range a cited source gives (low to high, in `unit`), to print beside the lab's own figure."""

    what: str
    low: float
    high: float
    unit: str
    source: str

    def text(self) -> str:
        """E.g. "20-30%"."""
        return f"{self.low:g}-{self.high:g}{self.unit}"


# BentoML's LLM inference handbook, as DESIGN.md quotes it ("Facts worth citing").
HANDBOOK_SMALL_SETUP_LOSS = SourcedRange(
    "throughput lost by disaggregating a small setup",
    20.0,
    30.0,
    "%",
    "BentoML, LLM inference handbook (quoted in DESIGN.md)",
)


@dataclass(frozen=True)
class VllmCompareRun:
    """`benchmarks/vllm_compare.py`: lab mono and 1P1D, vLLM mono and P/D on one workload (a CPU run)."""

    file: ResultFile
    machine: str
    model: str
    vllm: str
    rows: tuple[ServingRow, ...]  # modes "mono", "1p1d", "vllm-mono", "vllm-pd"
    nixl: Mapping[str, Mapping[str, float]]  # "vllm-pd" -> transfers, bytes_transferred, mean_bytes, ...


@_guard
def _vllm_compare(f: ResultFile, d: dict[str, Any]) -> VllmCompareRun:
    """The newest four-way comparison of the lab's servers and vLLM's, or None."""
    return VllmCompareRun(
        f,
        str(d.get("machine", f.tag)),
        d["model"],
        str(d.get("vllm", "")),
        tuple(_row(r) for r in d["rows"]),
        {k: dict(v) for k, v in d.get("nixl", {}).items()},
    )


vllm_compare = _vllm_compare
