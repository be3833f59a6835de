"""`labkit models [list | write NAME...]`."""

from __future__ import annotations

import argparse


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", default="list", choices=["list", "write"])
    parser.add_argument("names", nargs="*", help="presets to write (with `write`)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from labkit import models

    if args.action == "write":
        if not args.names:
            print("labkit models write: name at least one preset, e.g. `labkit models write tiny small`")
            return 2
        for n in args.names:
            print(models.ensure_model(n))
        return 0
    print(f"{'preset':<14} {'arch':<8} {'params':>10} {'dtype':>9} {'layers':>6} {'kv heads':>8}  note")
    for p in models.PRESETS.values():
        n = models.parameter_count(p)
        print(
            f"{p.name:<14} {p.architecture:<8} {n / 1e6:>9.1f}M {p.writable_dtype:>9} {p.num_hidden_layers:>6} "
            f"{p.num_key_value_heads:>8}  {p.note}"
        )
    print(f"\ncache: {models.model_dir('tiny').parent}  (LABKIT_HOME to move it)")
    return 0
