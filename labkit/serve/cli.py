"""`labkit serve`: start the lab's server (mono or disaggregated) behind one OpenAI-compatible URL."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

# What `labkit serve` takes of the router's settings (the rest follow from the workers it starts).
ROUTER_FLAGS = ("served_model_name", "host", "port", "prefill_policy", "prefill_threshold")
# What no worker flag sets: the launcher names and places each worker; local_prefill follows from
# --prefill-threshold (the launcher sets it on the decode workers).
WORKER_SKIP = ("role", "name", "host", "port", "policy", "local_prefill")


def _ints(s: str | None) -> list[int] | None:
    """'0,1' or '0-3' -> a list of core/GPU ids; None stays None."""
    if not s:
        return None
    out: list[int] = []
    for part in s.split(","):
        if "-" in part:
            a, b = part.split("-", 1)
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    return out


def register(parser: argparse.ArgumentParser) -> None:
    from labkit.config import add_flags
    from labkit.serve.config import RouterConfig, WorkerConfig

    parser.add_argument("--mode", choices=["mono", "disagg"], default="mono")
    parser.add_argument("--mono", type=int, default=1, help="mono engine processes (mode mono)")
    parser.add_argument("--prefill", type=int, default=1, help="prefill worker processes (mode disagg)")
    parser.add_argument("--decode", type=int, default=1, help="decode worker processes (mode disagg)")
    parser.add_argument("--mono-cpus", default=None, help="cores for mono workers, e.g. 0,1 or 0-3")
    parser.add_argument("--prefill-cpus", default=None, help="cores for prefill workers, e.g. 0")
    parser.add_argument("--decode-cpus", default=None, help="cores for decode workers, e.g. 1")
    parser.add_argument(
        "--gpus",
        default=None,
        help="GPUs to use, e.g. 0 or 0,1: one per worker when enough, else shared (disagg on one GPU: "
        "prefill and decode share it, KV by cuda-ipc); see labkit.devices.place",
    )
    parser.add_argument("--duration-s", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    router = parser.add_argument_group("the router's settings (labkit.serve.config.RouterConfig)")
    add_flags(router, RouterConfig, only=ROUTER_FLAGS, keep_defaults=True)
    group = parser.add_argument_group("every worker's settings (labkit.serve.config.WorkerConfig)")
    add_flags(group, WorkerConfig, skip=WORKER_SKIP)
    parser.set_defaults(func=run)


def run(args: Any) -> int:
    from labkit.config import flag_values
    from labkit.deployments import check_port_free, id_of
    from labkit.proc import PortInUseError
    from labkit.serve.config import WorkerConfig, check_prefill_threshold, worker_config
    from labkit.serve.launcher import launch
    from labkit.serve.routing import load_policy

    try:  # launch() and the router check these too (the router only after every worker started): say it now
        check_port_free(args.port, args.host)
        check_prefill_threshold(args.prefill_threshold, args.mode)
        load_policy(args.prefill_policy)
        settings = flag_values(args, WorkerConfig, nested=False, skip=WORKER_SKIP)
        model = worker_config("mono", settings).engine.model
    except PortInUseError as e:
        print(f"labkit serve: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"labkit serve: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    print(f"labkit serve: starting {args.mode} on {model} ...", flush=True)
    srv = launch(
        args.mode,
        mono=args.mono,
        prefill=args.prefill,
        decode=args.decode,
        mono_cpus=_ints(args.mono_cpus),
        prefill_cpus=_ints(args.prefill_cpus),
        decode_cpus=_ints(args.decode_cpus),
        gpus=_ints(args.gpus),
        **{k: getattr(args, k) for k in ROUTER_FLAGS},
        **settings,
    )
    stop = {"now": False}

    def on_signal(signum: int, frame: Any) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        print(f"ready in {time.perf_counter() - t0:.1f} s: {srv.url}  (router pid {srv.router.pid})")
        for w in srv.workers:
            print(f"  {w.name:<10} {w.role:<8} {w.url}  pid {w.pid}")
        if srv.placement is not None and srv.placement.gpus_used:
            print(srv.placement.describe())
        dep_id = id_of(srv.router.pid)
        print(f"deployment {dep_id}: `labkit ps` lists it, `labkit stop {dep_id}` stops it from another shell")
        name = args.served_model_name or srv.model
        print(
            f"try: curl {srv.url}/v1/completions -H 'Content-Type: application/json' "
            f'-d \'{{"model": "{name}", "prompt": "Hello", "max_tokens": 16}}\''
        )
        print(f"     {srv.url}/health   {srv.url}/metrics   (Ctrl-C stops everything)", flush=True)
        deadline = None if args.duration_s is None else time.monotonic() + args.duration_s
        while not stop["now"] and (deadline is None or time.monotonic() < deadline):
            dead = [p for p in [srv.router, *srv.workers] if not p.alive()]
            if srv.router in dead:
                print(f"router (pid {srv.router.pid}) exited; stopping. Log tail:\n{srv.router.child.log_tail()}")
                return 1
            time.sleep(0.5)
    finally:
        srv.stop()
        print("stopped: " + ", ".join(str(p) for p in srv.pids))
    return 0
