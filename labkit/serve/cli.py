"""`labkit serve`: start the lab's server (mono or disaggregated) behind one OpenAI-compatible URL."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from typing import Any

from labkit.proc import LOOPBACK


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
    from labkit.serve.config import WorkerConfig
    from labkit.serve.routing import DEFAULT_POLICY, POLICIES

    parser.add_argument("--mode", choices=["mono", "disagg"], default="mono")
    parser.add_argument("--model", default="tiny", help="preset name or model directory (default: tiny)")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--mono", type=int, default=1, help="mono engine processes (mode mono)")
    parser.add_argument("--prefill", type=int, default=1, help="prefill worker processes (mode disagg)")
    parser.add_argument("--decode", type=int, default=1, help="decode worker processes (mode disagg)")
    parser.add_argument(
        "--prefill-policy",
        default=DEFAULT_POLICY,
        help=f"which prefill worker gets a request: one of {', '.join(POLICIES)} (parameters after a "
        "colon, e.g. dynamo-cost:overlap_weight=2,temperature=0.5), module:function or "
        "file.py:function",
    )
    parser.add_argument(
        "--prefill-threshold",
        type=int,
        default=0,
        metavar="TOKENS",
        help="mode disagg: prompts whose uncached suffix is shorter than this are prefilled on the "
        "decode worker itself (selective disaggregation, llm-d's decider); 0: off (default)",
    )
    parser.add_argument("--mono-cpus", default=None, help="cores for mono workers, e.g. 0,1 or 0-3")
    parser.add_argument("--prefill-cpus", default=None, help="cores for prefill workers, e.g. 0")
    parser.add_argument("--decode-cpus", default=None, help="cores for decode workers, e.g. 1")
    parser.add_argument(
        "--gpus",
        default=None,
        help="GPUs to use, e.g. 0 or 0,1: one per worker when enough, else shared (disagg on one GPU: "
        "prefill and decode share it, KV by cuda-ipc); see labkit.devices.place",
    )
    parser.add_argument("--host", default=LOOPBACK, help="router address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="router port (default 8000)")
    parser.add_argument("--duration-s", type=float, default=None, help="stop after this many seconds (default: Ctrl-C)")
    group = parser.add_argument_group("every worker's settings (labkit.serve.config.WorkerConfig)")
    # local_prefill follows from --prefill-threshold (the launcher sets it on the decode workers)
    add_flags(group, WorkerConfig, skip=("role", "name", "host", "port", "model", "policy", "local_prefill"))
    parser.set_defaults(func=run)


def run(args: Any) -> int:
    from labkit.config import flag_values
    from labkit.deployments import check_port_free, id_of
    from labkit.proc import PortInUseError
    from labkit.serve.config import WorkerConfig, check_prefill_threshold
    from labkit.serve.launcher import launch
    from labkit.serve.routing import load_policy

    try:  # launch() and the router check these too (the router only after every worker started): say it now
        check_port_free(args.port, args.host)
        check_prefill_threshold(args.prefill_threshold, args.mode)
        load_policy(args.prefill_policy)
    except PortInUseError as e:
        print(f"labkit serve: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"labkit serve: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    print(f"labkit serve: starting {args.mode} on {args.model} ...", flush=True)
    srv = launch(
        args.mode,
        model=args.model,
        mono=args.mono,
        prefill=args.prefill,
        decode=args.decode,
        mono_cpus=_ints(args.mono_cpus),
        prefill_cpus=_ints(args.prefill_cpus),
        decode_cpus=_ints(args.decode_cpus),
        gpus=_ints(args.gpus),
        port=args.port,
        host=args.host,
        served_model_name=args.served_model_name,
        prefill_policy=args.prefill_policy,
        prefill_threshold=args.prefill_threshold,
        settings=flag_values(args, WorkerConfig, nested=False),
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
        name = args.served_model_name or args.model
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
