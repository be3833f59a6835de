"""`labkit` command line. Each command lives in its own module, imported only when used.

A command module defines `register(parser: argparse.ArgumentParser) -> None` (or the function
named after a colon, `module:function`), which adds its arguments and sets `func` (called
with the parsed args; returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). Keep `labkit --help` fast: nothing imported here.
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("labkit.doctor_cli", "what this machine has for the lab, and how to add what is missing"),
    "tour": ("labkit.tour", "the lab's main job, headless: measurements, charts, report/index.html"),
    "models": ("labkit.models_cli", "list the model presets, or write one (ensure it is on disk)"),
    "measure": ("labkit.measure", "time prefill and decode on a model; print MFU and MBU"),
    "transfer": ("labkit.transfer.cli", "measure KV-cache transfer bandwidth per backend"),
    "serve": ("labkit.serve.cli", "start the lab's server: --mode mono|disagg --prefill N --decode M"),
    "bench": ("labkit.bench.cli", "load-test an OpenAI-compatible URL; sweep serving modes"),
    "plan": ("labkit.plan.cli", "should you disaggregate? a verdict, a P:D split and launch commands"),
    "vllm": ("labkit.vllm.cli", "start vLLM monolithic or prefill/decode disaggregated (NixlConnector)"),
    "ps": ("labkit.deployments_cli:register_ps", "the lab's running servers: id, mode, model, user, URL, PIDs"),
    "stop": ("labkit.deployments_cli:register_stop", "stop a running deployment by id, or --all-mine"),
    "notebooks": (
        "labkit.exercises.edition",
        "the learner's edition (student OUT); time the notebooks (time); the guide's table (guide)",
    ),
}


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="labkit", description="disagg-lab: prefill vs decode, disaggregated serving.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        p = _top_parser()
        if argv and argv[0] not in ("-h", "--help"):
            p.print_usage(sys.stderr)
            print(f"labkit: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
            return 2
        p.print_help()
        return 0
    name = argv[0]
    spec, help_ = COMMANDS[name]
    module_name, _, register = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            print(f"labkit {name}: not part of this version of the lab yet ({module_name} missing)", file=sys.stderr)
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"labkit {name}", description=help_)
    getattr(module, register or "register")(parser)
    args = parser.parse_args(argv[1:])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
