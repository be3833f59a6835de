"""`labkit doctor [--json]`."""

from __future__ import annotations

import argparse
import json


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from labkit import doctor

    findings = doctor.run_checks()
    if args.json:
        print(json.dumps(doctor.as_records(findings), indent=1))
    else:
        print(doctor.format_findings(findings))
    return 0 if doctor.lab_can_run(findings) else 1
