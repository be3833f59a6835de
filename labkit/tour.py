"""`labkit tour`: the lab's main job, headless. Prints a summary table, writes report/index.html.

The tour runs the sections in `SECTIONS`, the one registry of them, in order. A section is a
function `(report: Report, profile: str) -> None` in the module of the lab it measures; it
adds prose, tables, charts and summary rows. A failing section is reported, and the tour goes on.
"""

from __future__ import annotations

import argparse
import importlib
import time
import traceback
from pathlib import Path

from labkit.config import profile as current_profile
from labkit.report import Report

# (title, "module:function"), in the order of the story.
SECTIONS: list[tuple[str, str]] = [
    ("Doctor: this machine", "labkit.tour:doctor_section"),
    ("Hardware: measured peaks", "labkit.measure:hardware_section"),
    ("Prefill vs decode on the default model", "labkit.measure:prefill_decode_section"),
    ("The KV cache: transfer between processes", "labkit.transfer.cli:tour_section"),
    ("Interference: a long prefill stalls every decode", "labkit.bench.tour:interference_section"),
    ("Mono vs 1P1D: the gains", "labkit.bench.tour:tour_section"),
    ("Should you disaggregate?", "labkit.plan.tour:tour_section"),
    ("vLLM side by side", "labkit.vllm.tour:tour_section"),
]


def doctor_section(report: Report, profile: str) -> None:
    from labkit import doctor

    s = report.sections[-1]
    findings = doctor.run_checks()
    s.tables.append(
        (
            "What the lab found",
            [
                {"what": f.name, "ok": "yes" if f.ok else "no", "value": f.value, "how to add": f.advice}
                for f in findings
            ],
        )
    )
    s.paragraphs.append("The lab can run here." if doctor.lab_can_run(findings) else "Required pieces are missing.")
    cpu = doctor.cpu_info()
    report.add_summary("machine", f"{cpu['model']}", f"{cpu['usable_cores']} cores, {cpu['ram_gib']} GiB")
    gpus = doctor.gpu_info()
    report.add_summary("accelerator", gpus[0]["name"] if gpus else "none (CPU run)")
    report.data["doctor"] = doctor.as_records(findings)


def run_tour(out_dir: str | Path = "report", profile: str | None = None, only: list[str] | None = None) -> Report:
    """Runs every section; returns the written Report."""
    prof = profile or current_profile()
    report = Report(out_dir)
    report.data["profile"] = prof
    for title, target in SECTIONS:
        if only and not any(o.lower() in title.lower() for o in only):
            continue
        module_name, func_name = target.split(":")
        sec = report.section(title)
        print(f"== {title}", flush=True)
        t0 = time.perf_counter()
        try:
            func = getattr(importlib.import_module(module_name), func_name)
            func(report, prof)
        except Exception as e:  # noqa: BLE001 - one broken section must not hide the others
            sec.error = f"{e.__class__.__name__}: {e}"
            print(f"   section failed: {sec.error}\n{traceback.format_exc(limit=3)}", flush=True)
        sec.seconds = time.perf_counter() - t0
        print(f"   {sec.seconds:.1f} s", flush=True)
    index = report.write()
    print("\n" + report.summary_table())
    print(f"\nreport: {index.resolve()}")
    return report


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="report", help="output directory (default: report/)")
    parser.add_argument(
        "--profile",
        choices=["ci", "full", "gpu"],
        default=None,
        help="ci: minutes-long small run; full: the real lesson on a CPU; gpu: on a CUDA GPU (default: $LABKIT_PROFILE, else gpu where CUDA works, else full)",
    )
    parser.add_argument("--only", nargs="*", help="run only sections whose title contains these words")
    parser.set_defaults(
        func=lambda a: 0 if not any(s.error for s in run_tour(a.out, a.profile, a.only).sections) else 1
    )
