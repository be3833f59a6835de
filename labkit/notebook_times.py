"""How long each notebook takes on this machine: the numbers behind the instructor guide's timing table.

`labkit notebooks time [NB ...] --profile full` executes each notebook with nbclient (kernel
python3, `LABKIT_PROFILE` and `MPLBACKEND=Agg` set, a timeout per cell), and writes
`docs/results/notebook_times-<date>-<machine>-<profile>.json`: the wall time of each notebook,
every cell slower than `slow_s` (its index, the first line of its source, seconds), the machine
(cores this process may use, CPU model, GPU name when CUDA works), and the load average before
and after, since a busy machine inflates every figure. Timing a subset merges into that day's
file, so notebooks can be timed one at a time. `labkit notebooks guide` then renders the table
(`labkit.instructor_guide`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SLOW_CELL_S = 10.0  # a cell longer than this gets a line in the guide ("warn about the long cells")
CELL_TIMEOUT_S = 3600  # per cell; the full profile's longest cells run for minutes on 2 cores
PROFILES = ("ci", "full", "gpu")
KIND = "notebook_times"


@dataclass(frozen=True, slots=True)
class CellTime:
    """One code cell slower than the threshold: its index in the notebook, its first line, seconds."""

    index: int
    first_line: str
    seconds: float


@dataclass(frozen=True)
class NotebookTime:
    """One notebook's run: wall seconds (kernel start to last cell), ok, and its slow cells."""

    notebook: str
    seconds: float
    ok: bool
    cells: int
    slow_cells: tuple[CellTime, ...] = ()
    error: str = ""
    failed_cell: int | None = None
    loadavg_before: tuple[float, ...] = ()
    loadavg_after: tuple[float, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["slow_cells"] = [asdict(c) for c in self.slow_cells]
        d["loadavg_before"], d["loadavg_after"] = list(self.loadavg_before), list(self.loadavg_after)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NotebookTime:
        return cls(
            str(d["notebook"]),
            float(d["seconds"]),
            bool(d["ok"]),
            int(d.get("cells", 0)),
            tuple(
                CellTime(int(c["index"]), str(c["first_line"]), float(c["seconds"])) for c in d.get("slow_cells", [])
            ),
            str(d.get("error", "")),
            d.get("failed_cell"),
            tuple(d.get("loadavg_before", ())),
            tuple(d.get("loadavg_after", ())),
        )


def _loadavg() -> tuple[float, ...]:
    try:
        return tuple(round(x, 2) for x in os.getloadavg())
    except OSError:
        return ()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@dataclass(frozen=True)
class Machine:
    """What the timings ran on: cores this process may use (pinning counts), CPU model, GPU or ""."""

    cores: int
    cpu_count: int
    cpu_model: str
    gpu: str = ""
    platform: str = field(default_factory=platform.platform)

    @property
    def tag(self) -> str:
        """The machine part of a result's name: "cpu-2core", or the GPU's datasheet name as "h100-sxm"."""
        if self.gpu:
            from labkit.hardware import lookup_datasheet

            sheet = lookup_datasheet(self.gpu)
            return re.sub(r"[^a-z0-9]+", "-", (sheet.name if sheet else self.gpu).lower()).strip("-")
        return f"cpu-{self.cores}core"


def this_machine() -> Machine:
    """The machine this process runs on (a GPU only when CUDA works)."""
    from labkit.config import cuda_available

    gpu = ""
    if cuda_available():
        from labkit.hardware import device_name

        gpu = device_name("cuda")
    return Machine(len(os.sched_getaffinity(0)), os.cpu_count() or 0, _cpu_model(), gpu)


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Sets environment variables for the kernels started inside (they inherit this process's env)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def first_line(source: str | list[str]) -> str:
    """The first non-empty line of a cell's source, at most 80 characters."""
    text = "".join(source) if isinstance(source, list) else source
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= 80 else line[:77] + "..."


def cell_label(source: str | list[str]) -> str:
    """What a cell does, for the guide's long-cell list: its first line that is not blank, a comment
    or an import (a cell that opens with `import inspect` and then starts a server is the server),
    or its first non-empty line when every line is one of those; at most 80 characters."""
    import ast

    text = "".join(source) if isinstance(source, list) else source
    try:
        body = ast.parse(text).body
    except SyntaxError:  # IPython magics and shell lines: the first line is the best label there is
        return first_line(text)
    doing = [st for st in body if not isinstance(st, (ast.Import, ast.ImportFrom))]
    return first_line(text.splitlines()[doing[0].lineno - 1]) if doing else first_line(text)


def time_notebook(
    path: str | Path,
    profile: str,
    *,
    cell_timeout_s: int = CELL_TIMEOUT_S,
    slow_s: float = SLOW_CELL_S,
    kernel: str = "python3",
) -> NotebookTime:
    """Executes one notebook (in its own directory, outputs discarded) and times it; a failing or
    timed-out cell ends the run with ok=False and the cell's index, never an exception."""
    import nbformat
    from nbclient import NotebookClient

    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    starts: dict[int, float] = {}
    slow: list[CellTime] = []
    current: list[int] = []

    def on_start(cell: Any, cell_index: int) -> None:
        starts[cell_index] = time.perf_counter()
        current[:] = [cell_index]

    def on_done(cell: Any, cell_index: int, execute_reply: Any) -> None:
        seconds = time.perf_counter() - starts.get(cell_index, time.perf_counter())
        if seconds > slow_s:
            slow.append(CellTime(cell_index, cell_label(cell.source), round(seconds, 2)))

    client = NotebookClient(
        nb,
        timeout=cell_timeout_s,
        kernel_name=kernel,
        allow_errors=False,
        resources={"metadata": {"path": str(path.parent.resolve())}},
        on_cell_execute=on_start,
        on_cell_executed=on_done,
    )
    before, t0 = _loadavg(), time.perf_counter()
    ok, error, failed = True, "", None
    with _env({"LABKIT_PROFILE": profile, "MPLBACKEND": "Agg"}):
        try:
            client.execute()
        except Exception as e:  # noqa: BLE001 - a cell error, timeout or dead kernel: record it, time the rest
            ok, failed = False, (current[0] if current else None)
            # CellExecutionError carries the cell's own exception (ename, evalue); a timeout only its message
            ename, evalue = getattr(e, "ename", type(e).__name__), getattr(e, "evalue", str(e))
            error = f"{ename}: {first_line(str(evalue)) or '(no message)'}"
    seconds = time.perf_counter() - t0
    code_cells = sum(1 for c in nb.cells if c.cell_type == "code")
    return NotebookTime(path.name, round(seconds, 2), ok, code_cells, tuple(slow), error, failed, before, _loadavg())


def default_out(machine: Machine, profile: str, date: str | None = None) -> Path:
    """docs/results/notebook_times-<date>-<machine>-<profile>.json of this checkout."""
    from labkit.reference import results_dir

    return results_dir() / f"{KIND}-{date or dt.date.today().isoformat()}-{machine.tag}-{profile}.json"


def time_notebooks(
    paths: Sequence[Path],
    profile: str,
    out: Path,
    *,
    machine: Machine | None = None,
    cell_timeout_s: int = CELL_TIMEOUT_S,
    slow_s: float = SLOW_CELL_S,
    progress: bool = True,
) -> dict[str, Any]:
    """Times each notebook in turn and writes (merges into) the JSON at `out`; returns what it wrote.
    An existing file of the same machine and profile keeps the notebooks not timed again."""
    from tqdm.auto import tqdm

    machine = machine or this_machine()
    doc: dict[str, Any] = {}
    if out.is_file():
        old = json.loads(out.read_text())
        if old.get("machine") == machine.tag and old.get("profile") == profile:
            doc = old
    by_name = {n["notebook"]: n for n in doc.get("notebooks", [])}
    doc.update(
        {
            "benchmark": KIND,
            "date": dt.date.today().isoformat(),
            "machine": machine.tag,
            "profile": profile,
            "cores": machine.cores,
            "cpu_count": machine.cpu_count,
            "cpu_model": machine.cpu_model,
            "gpu": machine.gpu,
            "platform": machine.platform,
            "python": platform.python_version(),
            "cell_timeout_s": cell_timeout_s,
            "slow_cell_s": slow_s,
            "load_note": "wall time includes kernel start; load averages per notebook say how busy the machine was",
        }
    )
    doc["notebooks"] = [by_name[k] for k in sorted(by_name)]
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(list(paths), desc=f"notebooks ({profile})", unit="nb", disable=not progress)
    for p in bar:
        bar.set_postfix_str(p.name)
        t = time_notebook(p, profile, cell_timeout_s=cell_timeout_s, slow_s=slow_s)
        by_name[t.notebook] = t.as_dict()
        bar.write(
            f"{t.notebook}: {t.seconds:.1f} s, {'ok' if t.ok else 'FAILED at cell ' + str(t.failed_cell)}"
            + (f" ({t.error})" if t.error else "")
        )
        # after every notebook: a run stopped part-way (a full profile takes an hour) keeps what it timed
        doc["notebooks"] = [by_name[k] for k in sorted(by_name)]
        out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def notebook_paths(names: Sequence[str], src: Path | None = None) -> list[Path]:
    """The notebooks named (file names, stems or numbers like "01"); all of them when `names` is empty."""
    from labkit.config import repo_root

    paths = sorted((src or repo_root() / "notebooks").glob("*.ipynb"))
    if names:
        wanted = {n.removesuffix(".ipynb") for n in names}
        paths = [p for p in paths if p.stem in wanted or p.stem.split("_")[0] in wanted]
        if not paths:
            raise FileNotFoundError(f"no notebook matches {sorted(wanted)}")
    return paths


# --- `labkit notebooks time` and `labkit notebooks guide` ------------------------------------


def register_actions(sub: Any) -> None:
    """Adds `time` and `guide` to the `labkit notebooks` subcommands (`sub`: its subparsers)."""
    tp = sub.add_parser("time", help="execute notebooks, time them and each slow cell; write docs/results JSON")
    tp.add_argument("notebooks", nargs="*", help="names or numbers like 01; default: all")
    tp.add_argument("--profile", choices=PROFILES, default="full")
    tp.add_argument(
        "--out", default=None, help="JSON path (default docs/results/notebook_times-<date>-<machine>-<profile>.json)"
    )
    tp.add_argument("--cell-timeout", type=int, default=CELL_TIMEOUT_S, help="seconds per cell")
    tp.add_argument("--slow", type=float, default=SLOW_CELL_S, help="report cells longer than this (s)")
    tp.set_defaults(func=_cli_time)
    gp = sub.add_parser("guide", help="rewrite the timing table of docs/instructor-guide.md from docs/results/")
    gp.add_argument("--check", action="store_true", help="only say whether the guide is up to date (exit 1 if not)")
    gp.set_defaults(func=_cli_guide)


def _cli_time(args: argparse.Namespace) -> int:
    try:
        paths = notebook_paths(args.notebooks)
    except FileNotFoundError as e:
        print(f"labkit notebooks time: {e}")
        return 1
    machine = this_machine()
    out = Path(args.out) if args.out else default_out(machine, args.profile)
    doc = time_notebooks(paths, args.profile, out, machine=machine, cell_timeout_s=args.cell_timeout, slow_s=args.slow)
    print(f"wrote {out} ({machine.tag}, {machine.cpu_model}{', ' + machine.gpu if machine.gpu else ''})")
    print("then: labkit notebooks guide   (rewrites the table in docs/instructor-guide.md)")
    return 0 if all(n["ok"] for n in doc["notebooks"]) else 1


def _cli_guide(args: argparse.Namespace) -> int:
    from labkit import instructor_guide

    changed = instructor_guide.update_guide(check=args.check)
    path = instructor_guide.guide_path()
    if args.check:
        print(f"{path}: {'out of date: run labkit notebooks guide' if changed else 'up to date'}")
        return 1 if changed else 0
    print(f"{'rewrote' if changed else 'unchanged'}: {path}")
    return 0
