"""`labkit ps` (what the lab is running, whose it is) and `labkit stop ID|--all-mine`."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def _age(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _ps(args: argparse.Namespace) -> int:
    from labkit.deployments import listing, registry_dir

    deps = listing()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        **d.to_json(),
                        "url": d.url,
                        "ports": d.ports,
                        "owner_alive": d.owner_alive(),
                        "live_pids": [p.pid for p in d.live_procs()],
                    }
                    for d in deps
                ],
                indent=1,
            )
        )
        return 0
    if not deps:
        print(f"no lab deployment is running (registry: {registry_dir()})")
        return 0
    rows = [("ID", "MODE", "MODEL", "USER", "UP", "URL", "OWNER", "PROCESSES")]
    now = time.time()
    for d in deps:
        live = {p.pid for p in d.live_procs()}
        procs = " ".join(f"{p.name}:{p.port}/pid {p.pid}" + ("" if p.pid in live else " (gone)") for p in d.procs)
        owner = f"pid {d.owner_pid} {d.owner_cmd[:40]}" + ("" if d.owner_alive() else " (gone)")
        rows.append((d.id, d.mode, d.model, d.user, _age(now - d.started_at), d.url, owner, procs))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    print("stop one with `labkit stop ID`, all of yours with `labkit stop --all-mine`")
    return 0


def _stop(args: argparse.Namespace) -> int:
    from labkit.deployments import NotYours, listing, stop

    deps = listing()
    if args.all_mine:
        chosen = [d for d in deps if d.uid == os.getuid()]
        if not chosen:
            print("none of your deployments is running")
            return 0
    elif args.ids:
        by_id = {d.id: d for d in deps}
        unknown = [i for i in args.ids if i not in by_id]
        if unknown:
            known = ", ".join(by_id) or "none"
            print(
                f"labkit stop: no running deployment {', '.join(unknown)} (running: {known}; see `labkit ps`)",
                file=sys.stderr,
            )
            return 2
        chosen = [by_id[i] for i in args.ids]
    else:
        print("labkit stop: name a deployment (`labkit ps` lists them) or give --all-mine", file=sys.stderr)
        return 2
    rc = 0
    for d in chosen:
        try:
            left = stop(d, timeout_s=args.timeout_s)
        except NotYours as e:
            print(f"labkit stop: {e}", file=sys.stderr)
            rc = 1
            continue
        pids = ", ".join(f"{p.name} (pid {p.pid})" for p in d.procs)
        if left:
            print(f"{d.id}: still alive after stop: {left}", file=sys.stderr)
            rc = 1
        else:
            print(f"stopped {d.id}: {pids}")
    return rc


def register_ps(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON list, for scripts")
    parser.set_defaults(func=_ps)


def register_stop(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ids", nargs="*", metavar="ID", help="deployment ids, as `labkit ps` shows them")
    parser.add_argument("--all-mine", action="store_true", help="every deployment of yours (your user)")
    parser.add_argument("--timeout-s", type=float, default=10.0, help="SIGTERM -> SIGKILL after this long")
    parser.set_defaults(func=_stop)
